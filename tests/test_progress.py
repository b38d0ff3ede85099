"""What a person watching a run sees: a bar on a terminal, plain log lines under cron."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable

import pytest

from batch.progress import Tally, bar_line
from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    people,
    received_counts,
    run_batch,
    write_csv,
    write_template,
)

# Time, level, then the process's name and id, on every log line.
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"\[(?P<process>\S+) \d+\] "
)
BAR = re.compile(
    r"^\[[#.]+\] +\d+% +(?P<done>\d+)/(?P<total>\d+)  sent +(?P<sent>\d+)"
    r"  failed (?P<failed>\d+)  in doubt (?P<in_doubt>\d+)  waiting +(?P<waiting>\d+)"
    r"  \d+/s  ETA \S+$"
)
PROGRESS_LINE = re.compile(
    r"progress: (?P<sent>\d+) sent, (?P<failed>\d+) failed, (?P<in_doubt>\d+) in doubt, "
    r"(?P<waiting>\d+) waiting, of (?P<total>\d+); [\d.]+/s, ETA \S+"
)
COLUMNS = 100
CLOSE_TIMEOUT_S = 30.0  # after the launcher ends, for its last children to let go of the pty


# Running the job on a pseudo-terminal, and reading what a terminal would show.


class Terminal:
    """`python -m batch.run` with its standard error on a pseudo-terminal, read as it goes."""

    def __init__(self, args: list[str], columns: int) -> None:
        self.leader, follower = pty.openpty()
        tty.setraw(follower)  # no newline translation: read exactly the bytes the job wrote
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "batch.run", *args],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=follower,
                start_new_session=True,
            )
        finally:
            os.close(follower)
        self.output = bytearray()
        self.closed = False  # nobody holds the terminal any more
        self.deadline = time.monotonic() + RUN_TIMEOUT_S

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.leader)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def wait_for(self, seen: Callable[[str], bool], what: str) -> None:
        """Read until seen(the output so far) holds; fail if the job ends or hangs first."""
        while not seen(self.output.decode(errors="replace")):
            if self.closed:
                pytest.fail(f"the run ended before {what}: {self.output[-2000:]!r}")
            self._fail_if_late(what)
            self._read(timeout_s=0.5)

    def finish(self) -> tuple[int, str]:
        """Read until every process lets go of the terminal; return the exit code and output."""
        ended_at = None
        while not self.closed:
            if ended_at is None and self.process.poll() is not None:
                ended_at = time.monotonic()
            if ended_at is not None and time.monotonic() - ended_at > CLOSE_TIMEOUT_S:
                break
            self._fail_if_late("the end of the run")
            self._read(timeout_s=0.5)
        return self.process.wait(timeout=CLOSE_TIMEOUT_S), self.output.decode()

    def _read(self, timeout_s: float) -> None:
        ready, _, _ = select.select([self.leader], [], [], timeout_s)
        if not ready:
            return
        try:
            chunk = os.read(self.leader, 65536)
        except OSError:  # EIO: nobody holds the terminal any more
            chunk = b""
        self.output += chunk
        self.closed = not chunk

    def _fail_if_late(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            pytest.fail(f"{what}: not within {RUN_TIMEOUT_S} s: {self.output[-2000:]!r}")


def screen(output: str) -> list[str]:
    """Replay output as a terminal shows it: \\r returns, ESC[K erases, \\n moves down."""
    lines: list[str] = []
    line: list[str] = []
    column = 0
    at = 0
    while at < len(output):
        if output.startswith("\x1b[K", at):
            del line[column:]
            at += 3
            continue
        char = output[at]
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(line))
            line, column = [], 0
        else:
            line[column : column + 1] = [char]
            column += 1
        at += 1
    lines.append("".join(line))
    return [text for text in lines if text]


def drawn_bars(output: str) -> list[dict[str, int]]:
    """Every bar the job drew, as numbers, in order."""
    pieces = re.split(r"\r|\n|\x1b\[K", output)
    return [
        {key: int(value) for key, value in match.groupdict().items()}
        for match in map(BAR.match, pieces)
        if match
    ]


# The bar on a terminal.


def wait_for_bar(terminal: Terminal, **wanted: int) -> None:
    """Read the terminal until the job draws a bar with these counts."""

    def drawn(output: str) -> bool:
        return any(wanted.items() <= bar.items() for bar in drawn_bars(output))

    terminal.wait_for(drawn, "a bar with " + ", ".join(f"{k} {v}" for k, v in wanted.items()))


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_on_a_terminal_one_bar_is_redrawn_in_place_and_cleared_before_each_log_line(job, tmp_path):
    rows = people(300)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    relay = job.relay
    relay.refuse["person0@example.com"] = (550, "5.1.1 no such user")
    args = job.args(source, template, "--workers", "2")

    # The relay holds its answers after 100 and after 200 messages until the bar has shown
    # that count; between the two it drops two sessions, and the workers log warnings.
    with (
        relay.held_after(100) as first,
        relay.held_after(200) as second,
        Terminal(args, COLUMNS) as terminal,
    ):
        wait_for_bar(terminal, sent=100)
        relay.close_next = 2
        first.release()
        wait_for_bar(terminal, sent=200, failed=1)
        second.release()
        code, output = terminal.finish()

    assert code == 1, output[-3000:]  # one recipient refused for good
    assert received_counts(relay) == Counter(r["email"] for r in rows[1:])
    assert relay.closed_rcpts == 2

    # Drawn again and again on the same line, with counts that only grow.
    bars = drawn_bars(output)
    assert output.count("\r") - output.count("\r\n") >= len(bars)
    assert [b["sent"] for b in bars] == sorted(b["sent"] for b in bars)
    assert {100, 200} <= {b["sent"] for b in bars}
    assert all(b["total"] <= 300 and b["sent"] <= b["done"] <= b["total"] for b in bars)
    assert all(b["done"] + b["waiting"] == b["total"] for b in bars)
    assert all(b["failed"] <= 1 and b["in_doubt"] == 0 for b in bars)
    assert bars[-1]["total"] == 300 and bars[-1]["failed"] == 1
    assert all(len(bar) < COLUMNS for bar in re.findall(r"\r(\[[#.]+\][^\r\n\x1b]*)", output))

    # What stays on the screen: log lines only, the bar gone, no line per message.
    shown = screen(output)
    assert all(LOG_LINE.match(line) for line in shown), shown
    assert any(" WARNING " in line and "[worker-" in line for line in shown), shown
    assert "@example.com" not in output
    assert len([line for line in shown if " INFO " in line]) == 3, shown
    assert "299 sent, 1 failed, 0 in doubt, 0 waiting" in shown[-1]


def test_the_bar_line_never_reaches_the_last_column_of_a_narrow_or_wide_terminal():
    tally = Tally(sent=123456, failed=12, in_doubt=3, waiting=876543, total=1000014)

    for columns in (10, 40, 60, 80, 120, 300):
        line = bar_line(tally, rate=1234.5, eta="1:02:03", columns=columns)
        assert 0 < len(line) < columns
    assert bar_line(tally, 1234.5, "1:02:03", 300).startswith("[")


# Under cron: no terminal.


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_without_a_terminal_a_banner_periodic_counts_and_a_summary_are_logged(slow_job, tmp_path):
    rows = people(250) + [{"email": "not an address", "name": "x"}, people(1)[0]]
    refused = ["person3@example.com", "person30@example.com", "person130@example.com"]
    for address in refused:
        slow_job.relay.refuse[address] = (550, "5.1.1 no such user")
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = run_batch(slow_job.args(source, template, "--workers", "1"))

    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert all(LOG_LINE.match(line) for line in lines), result.stderr
    assert "@example.com" not in result.stderr

    # The banner says what runs where; the broker's password stays out.
    relay = slow_job.relay
    banner = lines[0]
    assert f"campaign {slow_job.campaign}: list {source}, 1 workers" in banner
    assert f"relay smtp://{relay.host}:{relay.port}" in banner
    assert "broker amqp://guest@127.0.0.1" in banner and "guest:guest" not in banner
    assert f"state {slow_job.folder}" in banner
    assert any(f"list {source} read: 252 rows, 2 refused" in line for line in lines)

    # A line every few seconds on a slow relay, with counts that add up.
    progress = [
        {key: int(value) for key, value in match.groupdict().items()}
        for match in map(PROGRESS_LINE.search, lines)
        if match
    ]
    assert len(progress) >= 2, result.stderr
    assert [p["sent"] for p in progress] == sorted(p["sent"] for p in progress)
    for p in progress:
        assert p["sent"] + p["failed"] + p["in_doubt"] + p["waiting"] == p["total"] == 250
    assert progress[0]["sent"] < 247

    # The closing summary, with the refused rows.
    assert "247 sent, 3 failed, 0 in doubt, 0 waiting; 2 rows refused" in lines[-1]
    assert "done in " in lines[-1]


def test_quiet_logs_only_warnings_and_above_and_the_closing_summary(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(20))
    template = write_template(tmp_path / "template.txt")
    # A sent-log torn by a crash: the run repairs it and warns about it.
    job.folder.mkdir(parents=True)
    (job.folder / "sent-log.csv").write_bytes(
        b"timestamp,campaign,recipient,status,smtp_code,smtp_reply,message_id,worker\n"
        b"2026-01-01T00:00:00.000+00:00," + job.campaign.encode() + b",person1@exa"
    )

    result = run_batch(job.args(source, template, "--workers", "1", "-q"))

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 20
    lines = result.stderr.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), result.stderr
    # No banner, no "list read", no progress: only the warning, then the summary.
    assert [LOG_LINE.match(line)["level"] for line in lines] == ["WARNING", "INFO"], lines
    assert "torn last line" in lines[0]
    assert "20 sent, 0 failed, 0 in doubt, 0 waiting" in lines[1]


def test_verbose_adds_debug_lines_from_the_launcher_and_every_worker(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(20))
    template = write_template(tmp_path / "template.txt")

    result = run_batch(job.args(source, template, "--workers", "2", "-v"))

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 20
    lines = [match for match in map(LOG_LINE.match, result.stderr.splitlines()) if match]
    debugging = {line["process"] for line in lines if line["level"] == "DEBUG"}
    assert {"MainProcess", "worker-1", "worker-2"} <= debugging, result.stderr[-3000:]
    # The banner and the summary are still there.
    info = [line.string for line in lines if line["level"] == "INFO"]
    assert any(f"campaign {job.campaign}: list {source}, 2 workers" in line for line in info)
    assert any("20 sent, 0 failed, 0 in doubt, 0 waiting" in line for line in info)


def test_a_run_over_before_its_first_progress_line_still_says_what_it_made_of_the_list(
    job, tmp_path
):
    rows = [*people(5), {"email": "not an address", "name": "Nobody"}]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = run_batch(job.args(source, template, "--workers", "1"))

    assert result.returncode == 0, result.stderr
    assert f"list {source} read: 6 rows, 1 refused, 0 settled by an earlier run" in result.stderr
    assert "5 queued now" in result.stderr
