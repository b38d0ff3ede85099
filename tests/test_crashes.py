"""Faults a nightly run must survive, produced for real.

kill -9 of the whole job at random moments, a torn last line of the sent-log, two
overlapping launches, the broker stopped in the middle of a run, and SIGTERM. After each,
the user's checks: who received how many messages, and what the sent-log says.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    Job,
    broker_reachable,
    people,
    received_counts,
    run_batch,
    write_csv,
    write_template,
)

SENT_LOG_FIELDS = 8
CHAOS_RECIPIENTS = 3000
CHAOS_WORKERS = 4
# Where each kill lands, after a first one while the list is being loaded: shuffled per seed.
LATER_KILLS = ["loading"] + ["accept"] * 3 + ["sending"] * 7
CHAOS_MOST_PER_CYCLE = 200  # relay acceptances before a kill, at most
CYCLE_TIMEOUT_S = 90.0  # a run that accepts nothing for this long is hung
GONE_TIMEOUT_S = 30.0
BROKER_BACK_TIMEOUT_S = 120.0
RABBITMQCTL = shlex.split(os.environ.get("MASSMAIL_TEST_RABBITMQCTL", "rabbitmqctl"))
ANCIENT = "2001-01-01T00:00:00.000+00:00"  # a timestamp no line of this run can have


# Starting, killing and waiting for runs.


def start_batch(args: list[str], output: Path) -> subprocess.Popen:
    """Start `python -m batch.run` in a process group of its own, logging to output."""
    with output.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "batch.run", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def group_alive(pgid: int) -> bool:
    """Tell whether a process of the group still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its workers at once, and wait until they are gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(GONE_TIMEOUT_S)
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while group_alive(process.pid):
        assert time.monotonic() < deadline, f"process group {process.pid} survives SIGKILL"
        time.sleep(0.05)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Wait for condition while the run lives; a hang fails the test."""
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            kill_group(process)
            pytest.fail(f"hang: not {what} after {CYCLE_TIMEOUT_S:.0f} s")
        time.sleep(0.02)


def kill_cycle(
    job: Job, args: list[str], rng: random.Random, mode: str, output: Path
) -> int | None:
    """Start a run and kill -9 it at a moment picked by mode; None if killed, else its code.

    loading: a random time after the start, mostly before anything is sent;
    sending: some messages later, at a random point of a worker's cycle;
    accept:  from inside the relay, the moment it took a message and before it answers.
    """
    reached = threading.Event()
    target = job.relay.count() + rng.randint(1, CHAOS_MOST_PER_CYCLE)
    process = start_batch(args, output)

    def on_accept(_message) -> None:
        if reached.is_set() or job.relay.count() < target:
            return
        if mode == "accept":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        reached.set()

    try:
        if mode == "loading":
            time.sleep(rng.uniform(0.05, 2.0))
        else:
            job.relay.on_accept = on_accept
            deadline = time.monotonic() + CYCLE_TIMEOUT_S
            while not reached.wait(0.05) and process.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"hang: nothing accepted for {CYCLE_TIMEOUT_S:.0f} s ({output})")
            if mode == "sending":
                time.sleep(rng.uniform(0, 0.03))
        if process.poll() is not None and not reached.is_set():
            return process.returncode
    finally:
        job.relay.on_accept = None
        kill_group(process)
    return None


# What a user checks afterwards.


def sent_log_path(job: Job) -> Path:
    return job.folder / "sent-log.csv"


def assert_sent_log_well_formed(job: Job) -> None:
    """Every line of the sent-log, header included, parses into its 8 fields."""
    with sent_log_path(job).open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    bad = [(n, row) for n, row in enumerate(rows, 1) if len(row) != SENT_LOG_FIELDS]
    assert not bad, f"malformed sent-log lines (line number, fields): {bad[:5]}"
    assert rows[0][:3] == ["timestamp", "campaign", "recipient"]


def sent_log_lines(job: Job, addresses) -> str:
    """The sent-log lines of some recipients, to show in a failure."""
    wanted = set(list(addresses)[:20])
    return "\n".join(
        ",".join(row.values()) for row in job.sent_log() if row["recipient"] in wanted
    )


def assert_nobody_twice_nobody_missed(
    job: Job, addresses: list[str], in_doubt_limit: int, note: str = ""
) -> list[str]:
    """Check the promises after faults; return the recipients left in doubt.

    Nobody received two messages, nobody is missing from the sent-log, every `sent` one was
    received exactly once, and only a crash's one-per-worker may be in doubt.
    """
    assert_sent_log_well_formed(job)
    counts = received_counts(job.relay)
    statuses = job.final_statuses()

    twice = sorted(a for a, n in counts.items() if n > 1)
    assert not twice, f"{note}received more than once: {twice}\n{sent_log_lines(job, twice)}"
    strangers = sorted(set(counts) - set(addresses))
    assert not strangers, f"{note}mail to addresses not on the list: {strangers[:20]}"
    missing = [a for a in addresses if a not in statuses]
    assert not missing, f"{note}missing from the sent-log: {len(missing)}, e.g. {missing[:20]}"

    unsettled = {a: statuses[a] for a in addresses if statuses[a] not in ("sent", "in-doubt")}
    assert not unsettled, f"{note}neither sent nor in doubt: {unsettled}\n" + sent_log_lines(
        job, unsettled
    )
    lost = [a for a in addresses if statuses[a] == "sent" and counts[a] != 1]
    assert not lost, f"{note}`sent` but not received: {lost}\n{sent_log_lines(job, lost)}"
    in_doubt = sorted(a for a in addresses if statuses[a] == "in-doubt")
    assert len(in_doubt) <= in_doubt_limit, (
        f"{note}{len(in_doubt)} in doubt, more than {in_doubt_limit}\n"
        + sent_log_lines(job, in_doubt)
    )
    return in_doubt


def expected_exit_code(in_doubt: list[str]) -> int:
    """A finished run exits 0, or 1 when someone is in doubt."""
    return 1 if in_doubt else 0


# The tests.


def test_a_campaign_killed_twelve_times_still_mails_everyone_at_most_once(job, tmp_path):
    seed = int(os.environ.get("MASSMAIL_CHAOS_SEED", random.randrange(2**32)))
    print(f"chaos seed: {seed} (set MASSMAIL_CHAOS_SEED={seed} to replay the same kills)")
    rng = random.Random(seed)
    rows = people(CHAOS_RECIPIENTS)
    addresses = [row["email"] for row in rows]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    args = job.args(source, template, "--workers", str(CHAOS_WORKERS))

    modes = ["loading", *rng.sample(LATER_KILLS, len(LATER_KILLS))]
    kills = 0
    history = []
    for cycle, mode in enumerate(modes):
        before = job.relay.count()
        code = kill_cycle(job, args, rng, mode, tmp_path / f"cycle-{cycle}.log")
        kills += code is None
        ending = "killed" if code is None else f"ended with {code}"
        history.append(f"{cycle}:{mode}:{ending}:+{job.relay.count() - before}")
        log = tmp_path / f"cycle-{cycle}.log"
        assert code in (None, 0, 1), f"seed {seed}: cycle {cycle} {ending}:\n{log.read_text()}"
    print("cycles:", ", ".join(history))

    result = run_batch(args, timeout_s=RUN_TIMEOUT_S)

    note = f"seed {seed}, cycles {history}: "
    in_doubt = assert_nobody_twice_nobody_missed(
        job, addresses, in_doubt_limit=CHAOS_WORKERS * kills, note=note
    )
    received = sum(job.relay.received_by(a) for a in in_doubt)
    print(f"{len(in_doubt)} in doubt after {kills} kills, {received} of them received")
    assert result.returncode == expected_exit_code(in_doubt), note + result.stderr[-3000:]


def test_a_torn_last_line_is_cut_with_a_warning_and_nobody_is_mailed_twice(job, tmp_path):
    rows = people(600)
    addresses = [row["email"] for row in rows]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    args = job.args(source, template, "--workers", "2")
    process = start_batch(args, tmp_path / "first.log")
    try:
        wait_until(lambda: job.relay.count() >= 100, process, "100 messages were accepted")
    finally:
        kill_group(process)

    # A crash in the middle of writing a line that would settle someone not yet mailed.
    logged = set(job.final_statuses())
    victim = next(a for a in addresses if a not in logged)
    torn = f"{ANCIENT},{job.campaign},{victim},sent,25".encode()
    intact = sent_log_path(job).read_bytes()
    with sent_log_path(job).open("ab") as file:
        file.write(torn)

    result = run_batch(args)

    after = sent_log_path(job).read_bytes()
    assert after.startswith(intact)
    assert ANCIENT.encode() not in after
    assert "torn" in result.stderr
    in_doubt = assert_nobody_twice_nobody_missed(job, addresses, in_doubt_limit=2)
    assert job.relay.received_by(victim) == 1
    assert result.returncode == expected_exit_code(in_doubt), result.stderr[-3000:]


def test_an_index_damaged_by_a_power_failure_is_rebuilt_and_the_rerun_mails_the_rest_once(
    job, tmp_path
):
    rows = people(8)
    template = write_template(tmp_path / "template.txt")
    first = job.run(write_csv(tmp_path / "list.csv", rows[:5]), template, "--workers", "2")
    assert first.returncode == 0, first.stderr
    # The index is written without fsync: after a power failure it may be anything.
    index = sent_log_path(job).with_suffix(".index")
    index.write_bytes(b"\0garbage left by a power failure" * 200)

    result = job.run(write_csv(tmp_path / "list.csv", rows), template, "--workers", "2")

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {row["email"]: 1 for row in rows}
    assert "5 settled by an earlier run" in result.stderr


def test_a_second_launch_of_a_running_campaign_exits_3_and_the_first_mails_everyone_once(
    slow_job, tmp_path
):
    rows = people(200)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    args = slow_job.args(source, template, "--workers", "2")

    # The relay stalls on the first message (its event loop waits) until the second launch
    # is over: the first run is certainly still running, holding its lock.
    gate = threading.Event()
    slow_job.relay.on_accept = lambda _message: gate.wait(RUN_TIMEOUT_S)
    first = start_batch(args, tmp_path / "first.log")
    try:
        wait_until(lambda: slow_job.relay.count() >= 1, first, "a message was accepted")
        second = run_batch(args, timeout_s=120)
        still_running = first.poll() is None
        gate.set()
        first.wait(RUN_TIMEOUT_S)
    finally:
        gate.set()
        kill_group(first)

    assert still_running
    assert second.returncode == 3, second.stderr
    assert slow_job.campaign in second.stderr
    assert "another run" in second.stderr
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    addresses = [row["email"] for row in rows]
    assert_nobody_twice_nobody_missed(slow_job, addresses, in_doubt_limit=0)
    assert received_counts(slow_job.relay) == dict.fromkeys(addresses, 1)


def rabbitmqctl(*command: str) -> float:
    """Run a rabbitmqctl command on the test broker's node; return the seconds it took."""
    started = time.monotonic()
    try:
        subprocess.run([*RABBITMQCTL, *command], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.fail(
            f"`{shlex.join([*RABBITMQCTL, *command])}` failed: {error}; this test restarts the "
            "broker: set MASSMAIL_TEST_RABBITMQCTL to a command that controls its node"
        )
    return time.monotonic() - started


def wait_for_broker(timeout_s: float = BROKER_BACK_TIMEOUT_S) -> float:
    """Wait until the broker accepts a connection again; return the seconds it took."""
    started = time.monotonic()
    while not broker_reachable():
        assert time.monotonic() - started < timeout_s, f"the broker is not back in {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_broker_stopped_and_started_mid_run_costs_no_recipient_and_no_duplicate(
    slow_job, tmp_path
):
    rows = people(400)
    addresses = [row["email"] for row in rows]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    args = slow_job.args(source, template, "--workers", "2", "--reconnect-for", "60")
    process = start_batch(args, tmp_path / "first.log")
    try:
        wait_until(lambda: slow_job.relay.count() >= 40, process, "40 messages were accepted")
        sent_before_stop = slow_job.relay.count()
        stop_s = rabbitmqctl("stop_app")
        time.sleep(3)
        start_s = rabbitmqctl("start_app")
    finally:
        rabbitmqctl("start_app")
        back_s = wait_for_broker()
    print(f"stop_app {stop_s:.1f} s, start_app {start_s:.1f} s, connectable {back_s:.1f} s later")

    try:
        first_code = process.wait(RUN_TIMEOUT_S)
    finally:
        kill_group(process)
    first_log = (tmp_path / "first.log").read_text()
    print(f"the run during the restart ended with {first_code}")
    assert sent_before_stop < len(rows)
    assert first_code in (0, 75), first_log[-3000:]
    final_code, output = first_code, first_log
    if first_code == 75:
        rerun = run_batch(args)
        final_code, output = rerun.returncode, rerun.stderr

    in_doubt = assert_nobody_twice_nobody_missed(slow_job, addresses, in_doubt_limit=2)
    assert final_code == expected_exit_code(in_doubt), output[-3000:]


@pytest.mark.parametrize("whom", ["the launcher", "the whole process group"])
def test_sigterm_stops_the_run_with_75_and_leaves_no_claim_open(slow_job, tmp_path, whom):
    rows = people(300)
    addresses = [row["email"] for row in rows]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    args = slow_job.args(source, template, "--workers", "2")
    process = start_batch(args, tmp_path / "first.log")
    try:
        wait_until(lambda: slow_job.relay.count() >= 20, process, "20 messages were accepted")
        if whom == "the launcher":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(RUN_TIMEOUT_S)
    finally:
        kill_group(process)

    first_log = (tmp_path / "first.log").read_text()
    assert code == 75, first_log[-3000:]
    assert "interrupted" in first_log
    assert slow_job.relay.count() < len(rows)
    open_or_doubtful = {
        a: s for a, s in slow_job.final_statuses().items() if s in ("claimed", "in-doubt")
    }
    assert not open_or_doubtful, sent_log_lines(slow_job, open_or_doubtful)

    rerun = run_batch(args)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_nobody_twice_nobody_missed(slow_job, addresses, in_doubt_limit=0)
    assert received_counts(slow_job.relay) == dict.fromkeys(addresses, 1)
    assert not [row for row in slow_job.sent_log() if row["status"] == "in-doubt"]
