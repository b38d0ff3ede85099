"""Measure the job's speed and memory as ratios against baselines taken in the same run.

Run it through `scripts/bench`, which prepares .venv and checks the broker. Every figure is
a ratio against something measured minutes before on the same machine, so a busy or slow
machine shifts both sides: absolute numbers are printed too, but only the ratios travel.

  baseline   one smtplib session sending N pre-built messages to postfix's smtp-sink
  job        python -m batch.run, 8 workers, N recipients: its wall-clock rate against the
             baseline, the peak RSS of all its processes against the job at 100 recipients
  fixed      the same job with a template that uses no column (first size only)
  load       the loader alone, in this process, from a CSV and an .xlsx, against the job
  profile    py-spy on one worker during one more job run of the first size

A run that does not send every recipient, a non-zero exit code or a timeout is an error,
never a figure; smtp-sink is stopped and the campaign's queues deleted either way.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openpyxl
import pika
import pika.exceptions

from batch.broker import Broker
from batch.errors import BatchError
from batch.loader import Loader
from batch.message import Composer, Template
from batch.recipients import RecipientList
from batch.sentlog import SentLog
from batch.source import read_rows

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
SMTP_SINK = Path("/usr/sbin/smtp-sink")
SINK_BACKLOG = 512

DEFAULT_SIZES = "20000,100000"
FULL_SIZE = 1_000_000
QUICK_SIZE = 2_000
MEMORY_BASELINE_SIZE = 100  # the job's memory at this size is what larger runs compare with
WORKERS = 8
RETRY_DELAYS_S = tuple(60.0 * 4**n for n in range(4))  # the job's defaults: 60 s, x4, 4 queues

SAMPLE_EVERY_S = 0.2
PROGRESS_EVERY_S = 5.0
PROFILE_DURATION_S = 10
PROFILE_TOP = 12
PROFILED = ("batch/", "smtplib.py", "sqlite3/", "pika/", "jinja2/", "<template>")

APT_TIMEOUT_S = 900
PIP_TIMEOUT_S = 300
TOOL_TIMEOUT_S = 30
SINK_START_TIMEOUT_S = 10
STOP_GRACE_S = 60  # the launcher lets its workers finish their message before leaving
SMTP_TIMEOUT_S = 30

NAMES = ("Ann Smith", "Zoë Müller", "Jean Dupont", "Li Wei", "Olúwaseun Adé")
PERSONAL_TEMPLATE = """\
From: Bench Newsletter <news@example.com>
Subject: Hello {{ name }}, here is your monthly letter
Reply-To: help@example.com

Dear {{ name }},

this is the monthly letter from the bench team. It is about as long as a real one, so
that the relay, the sent-log and the template engine see messages of a realistic size.

We are planning a meetup this spring and would be glad to see you there, {{ name }}.
The programme, the venue and the times follow in next month's letter; until then,
write to help@example.com with any question and we will answer within a day.

Three things changed since the last letter:
- the archive of past letters is searchable;
- replies to this address reach a person, not a robot;
- you can ask for a plain-text-only version.

Best regards,
The bench team

You receive this letter because {{ name }} subscribed to it.
"""
FIXED_TEMPLATE = PERSONAL_TEMPLATE.replace("{{ name }}", "reader")


EPILOG = """\
exit codes: 0 measured, 1 a step failed (the message says which), 130 interrupted

examples:
  scripts/bench --quick                      # checks the script itself in about a minute
  scripts/bench --markdown bench.md          # 20,000 and 100,000 recipients
  scripts/bench --full --markdown bench.md   # and 1,000,000
"""


class BenchError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    measurement: str
    size: int
    result: str
    compared_with: str = ""
    baseline: str = ""
    ratio: str = ""


@dataclass(frozen=True)
class Figure:
    """A measured value, named as the table's "compared with" column names it."""

    name: str
    value: float
    unit: str
    style: str = ",.0f"

    def __str__(self) -> str:
        return f"{self.value:{self.style}} {self.unit}"


def make_row(n: int, figure: Figure, against: Figure | None = None, title: str = "") -> Row:
    """A table row: a figure, and the baseline it is compared with with their ratio."""
    if against is None:
        return Row(title or figure.name, n, str(figure))
    ratio = f"{figure.value / against.value:.2f}"
    return Row(title or figure.name, n, str(figure), against.name, str(against), ratio)


@dataclass(frozen=True)
class JobRun:
    """What one run of the job measured."""

    wall_s: float
    rate: float
    peak_rss_mb: float


def main(argv: list[str] | None = None) -> int:
    """Install what is missing, measure every size, print the table."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    try:
        ensure_smtp_sink()
        ensure_py_spy()
        machine = describe_machine()
        say("machine: " + "; ".join(f"{key} {value}" for key, value in machine.items()))
        with tempfile.TemporaryDirectory(prefix="massmail-bench-") as tmp, SmtpSink() as sink:
            bench = Bench(Path(tmp), args.amqp_url, sink.port)
            if args.memory_only:
                rows, profile = bench.measure_memory(args.sizes), Profile.skipped()
            else:
                rows = bench.measure(args.sizes)
                profile = bench.profile(args.sizes[0])
    except (BenchError, BatchError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130

    print()
    print(render_table(rows))
    print()
    print(profile.text())
    if args.markdown:
        args.markdown.write_text(render_markdown(machine, rows, profile), encoding="utf-8")
        say(f"wrote {args.markdown}")
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line; --quick and --full adjust the list of sizes."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="list sizes, comma-separated")
    parser.add_argument("--full", action="store_true", help=f"add a size of {FULL_SIZE:,}")
    parser.add_argument("--quick", action="store_true", help=f"one size of {QUICK_SIZE:,} only")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="run only the job at each size and compare its peak RSS (for large sizes)",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("MASSMAIL_TEST_AMQP_URL")
        or os.environ.get("MASSMAIL_AMQP_URL")
        or DEFAULT_AMQP_URL,
        help="the broker (default: as scripts/broker checks it)",
    )
    args = parser.parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of numbers: {args.sizes}")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes: give at least one positive size")
    args.sizes = [QUICK_SIZE] if args.quick else sizes + ([FULL_SIZE] if args.full else [])
    return args


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `finally`, so smtp-sink is stopped


def say(text: str) -> None:
    """Print a progress line at once."""
    print(f"bench {time.strftime('%H:%M:%S')} {text}", flush=True)


# Tools.


def ensure_smtp_sink() -> None:
    """Install postfix (for smtp-sink) with apt-get when it is missing."""
    if SMTP_SINK.exists():
        return
    say("installing postfix for smtp-sink (apt-get)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postfix"]):
        result = run_tool([*sudo, *command], timeout_s=APT_TIMEOUT_S, env=env)
        if result.returncode != 0:
            raise BenchError(
                f"{' '.join(command)} failed ({result.returncode}): {tail(result.stdout)}; "
                f"install postfix by hand so that {SMTP_SINK} exists"
            )
    if not SMTP_SINK.exists():
        raise BenchError(f"postfix is installed but {SMTP_SINK} is missing")


def ensure_py_spy() -> None:
    """Install py-spy into this virtualenv when it is missing."""
    if py_spy().exists():
        return
    say("installing py-spy (pip)")
    result = run_tool([sys.executable, "-m", "pip", "install", "py-spy"], PIP_TIMEOUT_S)
    if result.returncode != 0 or not py_spy().exists():
        raise BenchError(f"pip install py-spy failed: {tail(result.stdout)}")


def py_spy() -> Path:
    return Path(sys.executable).parent / "py-spy"


def run_tool(
    command: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end, output captured; a timeout is an error."""
    try:
        return subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(command)}: no end after {timeout_s:.0f} s") from None
    except OSError as error:
        raise BenchError(f"{command[0]}: cannot run: {error.strerror}") from None


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def describe_machine() -> dict[str, str]:
    """Name what the numbers were measured on."""
    meminfo = Path("/proc/meminfo").read_text()
    memory_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": f"{memory_kb / 1024**2:.1f} GiB",
        "CPU": model.group(1).strip() if model else platform.processor() or "unknown",
        "load average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "python": platform.python_version(),
        "RabbitMQ": rabbitmq_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def rabbitmq_version() -> str:
    if shutil.which("rabbitmqctl") is None:
        return "unknown (no rabbitmqctl)"
    try:
        result = run_tool(["rabbitmqctl", "version"], TOOL_TIMEOUT_S)
    except BenchError as error:
        return f"unknown ({error})"
    return result.stdout.strip() if result.returncode == 0 else "unknown (rabbitmqctl failed)"


# The relay.


class SmtpSink:
    """postfix's smtp-sink on a free local port, stopped when the `with` block ends."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSink:
        as_nobody = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [str(SMTP_SINK), *as_nobody, f"127.0.0.1:{self.port}", str(SINK_BACKLOG)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._wait_until_listening()
        except BaseException:
            self.__exit__()
            raise
        say(f"smtp-sink listening on 127.0.0.1:{self.port} (pid {self.process.pid})")
        return self

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + SINK_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace")
                raise BenchError(f"smtp-sink exited with {self.process.returncode}: {error}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.1)
        raise BenchError(f"smtp-sink does not listen after {SINK_START_TIMEOUT_S} s")

    def __exit__(self, *_exc: object) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        say("smtp-sink stopped")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The measurements.


class Bench:
    """The measurements of one invocation, sharing a relay, a broker and a scratch folder."""

    def __init__(self, tmp: Path, amqp_url: str, sink_port: int) -> None:
        self.tmp = tmp
        self.amqp_url = amqp_url
        self.sink_port = sink_port

    def measure(self, sizes: list[int]) -> list[Row]:
        """Take every measurement at every size; each ratio's two sides are taken together."""
        say(f"memory baseline: the job with {MEMORY_BASELINE_SIZE} recipients")
        small = self.run_job(MEMORY_BASELINE_SIZE, PERSONAL_TEMPLATE)
        memory_base = Figure(f"job, {MEMORY_BASELINE_SIZE} recipients", small.peak_rss_mb, "MB")
        startup = Figure("job, wall clock (start-up and stop)", small.wall_s, "s", ".1f")
        rows = [make_row(MEMORY_BASELINE_SIZE, startup)]
        for position, n in enumerate(sizes):
            rows += self._size(n, memory_base, with_fixed=position == 0)
        return rows

    def measure_memory(self, sizes: list[int]) -> list[Row]:
        """Take only the memory figures: the job's peak RSS at each size against a small run."""
        small = self.run_job(MEMORY_BASELINE_SIZE, PERSONAL_TEMPLATE)
        memory_base = Figure(f"job, {MEMORY_BASELINE_SIZE} recipients", small.peak_rss_mb, "MB")
        rows = []
        for n in sizes:
            job = self.run_job(n, PERSONAL_TEMPLATE)
            rows.append(make_row(n, Figure("job, personalised", job.rate, "msg/s")))
            rows.append(make_row(n, Figure("job, peak RSS", job.peak_rss_mb, "MB"), memory_base))
        return rows

    def _size(self, n: int, memory_base: Figure, *, with_fixed: bool) -> list[Row]:
        """Baseline, job, fixed template (optional) and loading at one size."""
        base = Figure("smtplib baseline", self.baseline_rate(n), "msg/s")
        rows = [make_row(n, base)]

        job = self.run_job(n, PERSONAL_TEMPLATE)
        sent = Figure("job, personalised", job.rate, "msg/s")
        rows.append(make_row(n, sent, base))
        rows.append(make_row(n, Figure("job, peak RSS", job.peak_rss_mb, "MB"), memory_base))
        if with_fixed:
            fixed = Figure("job, fixed template", self.run_job(n, FIXED_TEMPLATE).rate, "msg/s")
            rows.append(make_row(n, fixed, base))
            rows.append(make_row(n, sent, fixed, title="personalised / fixed (target >= 0.80)"))

        for kind in ("csv", "xlsx"):
            loaded = Figure(f"load alone, {kind}", self.load_rate(n, kind), "rcpt/s")
            rows.append(make_row(n, loaded, sent))
        return rows

    # 1. The baseline.

    def baseline_rate(self, n: int) -> float:
        """Send n pre-built messages over one smtplib session; return messages per second."""
        say(f"baseline: smtplib sends {n:,} messages to smtp-sink over one session")
        fields = {"email": recipient_address(1), "name": recipient_name(1)}
        letter = Composer(Template(PERSONAL_TEMPLATE), "bench").compose(fields["email"], fields)
        recipients = [recipient_address(i) for i in range(1, n + 1)]

        with time_limit(job_timeout_s(n), "the smtplib baseline"):
            try:
                with smtplib.SMTP("127.0.0.1", self.sink_port, timeout=SMTP_TIMEOUT_S) as smtp:
                    smtp.ehlo()
                    started = time.perf_counter()
                    for recipient in recipients:
                        smtp.sendmail(letter.sender, [recipient], letter.data)
                    elapsed = time.perf_counter() - started
            except (smtplib.SMTPException, OSError) as error:
                raise BenchError(f"smtplib baseline: {error}") from None
        rate = n / elapsed
        say(f"baseline: {rate:,.0f} msg/s ({len(letter.data):,} bytes a message)")
        return rate

    # 2 and 3. The job end to end.

    def run_job(self, n: int, template: str, profile_to: Path | None = None) -> JobRun:
        """Run batch.run on a fresh list of n recipients; time it and sample its memory."""
        campaign = f"bench-{secrets.token_hex(4)}"
        folder = self.tmp / campaign
        folder.mkdir()
        source, template_path = folder / "list.csv", folder / "template.txt"
        write_csv(source, n)
        template_path.write_text(template, encoding="utf-8")
        kind = "personalised" if "{{" in template else "fixed"
        say(f"job: {n:,} recipients, {kind} template, {WORKERS} workers, campaign {campaign}")

        options = {
            "--source": source, "--template": template_path, "--campaign": campaign,
            "--state-dir": self.tmp, "--smtp-host": "127.0.0.1", "--smtp-port": self.sink_port,
            "--smtp-tls": "none", "--workers": WORKERS, "--amqp-url": self.amqp_url,
        }  # fmt: skip
        command = [sys.executable, "-m", "batch.run", "-q"]
        for option, value in options.items():
            command += [option, str(value)]
        try:
            run = JobWatch(command, folder, n, profile_to).run()
        finally:
            delete_queues(self.amqp_url, campaign, quiet=sys.exc_info()[0] is not None)
        check_sent(folder / "sent-log.csv", n)
        say(f"job: {run.rate:,.0f} msg/s ({run.wall_s:.1f} s), peak RSS {run.peak_rss_mb:,.0f} MB")
        return run

    # 4. Loading alone.

    def load_rate(self, n: int, kind: str) -> float:
        """Publish n recipients from a list with the project's loader; return recipients/s."""
        campaign = f"bench-load-{secrets.token_hex(4)}"
        folder = self.tmp / campaign
        folder.mkdir()
        source = folder / f"list.{kind}"
        say(f"load: writing {n:,} recipients to {source.name}")
        (write_csv if kind == "csv" else write_xlsx)(source, n)

        say(f"load: publishing {n:,} recipients from {source.name}, no workers")
        broker = Broker(self.amqp_url, campaign, retry_delays_s=RETRY_DELAYS_S)
        ledger = SentLog(folder / "sent-log.csv", campaign, rebuild=True)
        recipients = RecipientList(read_rows(source), source=str(source))
        loader = Loader(recipients, broker, folder, ledger, publish_all=True, reconnect_for_s=30)
        try:
            with time_limit(job_timeout_s(n), f"loading {source.name}"):
                broker.connect()
                started = time.perf_counter()
                loader.load()
                elapsed = time.perf_counter() - started
        finally:
            broker.close()
            ledger.close()
            delete_queues(self.amqp_url, campaign, quiet=sys.exc_info()[0] is not None)

        if loader.counts.published != n:
            raise BenchError(f"load: published {loader.counts.published:,} of {n:,} recipients")
        say(f"load: {n / elapsed:,.0f} recipients/s from {kind}")
        return n / elapsed

    # 5. Where a worker's time goes.

    def profile(self, n: int) -> Profile:
        """Run the job once more with py-spy on one worker; sum the samples by frame."""
        raw = self.tmp / "profile.txt"
        say(f"profile: a job of {n:,} recipients, py-spy on one worker for {PROFILE_DURATION_S} s")
        self.run_job(n, PERSONAL_TEMPLATE, profile_to=raw)
        return Profile.from_raw(raw)


def job_timeout_s(n: int) -> float:
    """Allow a run at least 100 recipients a second, and two minutes to start and stop."""
    return 120 + n / 100


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Turn a step of this process that hangs into an error."""

    def expire(_signum: int, _frame: object) -> None:
        raise BenchError(f"{what}: no end after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Lists.


def recipient_address(i: int) -> str:
    return f"reader{i:07d}@example.com"


def recipient_name(i: int) -> str:
    return f"{NAMES[i % len(NAMES)]} {i}"


def write_csv(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "name"])
        writer.writerows((recipient_address(i), recipient_name(i)) for i in range(1, n + 1))


def write_xlsx(path: Path, n: int) -> None:
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("recipients")
    sheet.append(["email", "name"])
    for i in range(1, n + 1):
        sheet.append([recipient_address(i), recipient_name(i)])
    book.save(path)


# Watching a run of the job.


class JobWatch:
    """One run of the launcher: its wall clock, its memory, and optionally a profile."""

    def __init__(self, command: list[str], folder: Path, n: int, profile_to: Path | None):
        self.command = command
        self.folder = folder
        self.n = n
        self.profile_to = profile_to
        self.sent_log = LineCounter(folder / "sent-log.csv")
        self.spy: subprocess.Popen[bytes] | None = None
        self.spy_log = folder / "py-spy.log"
        self.peak_kb = 0

    def run(self) -> JobRun:
        """Start the launcher, sample until it exits, and check how it ended."""
        log_path = self.folder / "job.log"
        with log_path.open("wb") as log:
            started = time.monotonic()
            job = subprocess.Popen(
                self.command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that a timeout can stop the workers too
            )
            try:
                self._sample_until_exit(job, started)
            except BaseException:
                stop_group(job)
                raise
            finally:
                self._finish_profile()
            wall_s = time.monotonic() - started

        if job.returncode != 0:
            raise BenchError(
                f"job: batch.run exited with {job.returncode} (expected 0); its output:\n"
                + tail(log_path.read_text(errors="replace"))
            )
        return JobRun(wall_s, self.n / wall_s, self.peak_kb / 1024)

    def _sample_until_exit(self, job: subprocess.Popen[bytes], started: float) -> None:
        """Every SAMPLE_EVERY_S: sum the tree's RSS, show progress, attach py-spy once."""
        deadline = started + job_timeout_s(self.n)
        last_progress = started
        while True:
            tree = process_tree(job.pid)
            self.peak_kb = max(self.peak_kb, sum(rss_kb(pid) for pid in tree))
            if self.profile_to is not None and self.spy is None:
                self._attach_profiler(job.pid, tree)

            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"job: no end after {job_timeout_s(self.n):.0f} s")
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                lines = self.sent_log.count()
                say(
                    f"job: {now - started:.0f} s, ~{max(lines - 1, 0) // 2:,} of "
                    f"{self.n:,} done, {self.peak_kb / 1024:,.0f} MB peak"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(timeout=SAMPLE_EVERY_S)
                return

    def _attach_profiler(self, launcher: int, tree: list[int]) -> None:
        """Start py-spy on the first worker once the workers are sending."""
        workers = [pid for pid in tree if pid != launcher and is_worker(pid)]
        if len(workers) < WORKERS or self.sent_log.count() < 1 + 2 * WORKERS:
            return
        say(f"profile: py-spy on worker pid {workers[0]}")
        command = [
            str(py_spy()), "record", "--pid", str(workers[0]),
            "--duration", str(PROFILE_DURATION_S), "--format", "raw", "--threads",
            "--output", str(self.profile_to),
        ]  # fmt: skip
        with self.spy_log.open("wb") as log:
            self.spy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _finish_profile(self) -> None:
        """Wait for py-spy to write its samples; a profile that failed is an error."""
        if self.profile_to is None:
            return
        if self.spy is None:
            raise BenchError("profile: the job ended before its workers could be profiled")
        try:
            code = self.spy.wait(timeout=PROFILE_DURATION_S + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.spy.kill()
            raise BenchError("profile: py-spy did not finish") from None
        if code != 0 or not self.profile_to.exists():
            output = tail(self.spy_log.read_text(errors="replace"))
            raise BenchError(f"profile: py-spy failed ({code}); needs ptrace: {output}")


class LineCounter:
    """Count the lines of a growing file, reading only what was added since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as file:
            file.seek(self.offset)
            added = file.read()
            self.offset += len(added)
            self.lines += added.count(b"\n")
        return self.lines


def process_tree(root: int) -> list[int]:
    """Return root and all its descendants, found through each process's parent id."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(stat.rpartition(")")[2].split()[1])  # the name may hold spaces and ")"
        children[parent].append(int(entry.name))

    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, ()))
    return tree


def rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else 0


def is_worker(pid: int) -> bool:
    """Tell a worker from the resource tracker, the fork server and other processes."""
    command = command_line(pid)
    if "multiprocessing" not in command or "resource_tracker" in command:
        return False
    # A fork server and the workers it forks share one command line: a worker is its child.
    if "forkserver" in command:
        return "forkserver" in command_line(parent_pid(pid))
    return True


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def stop_group(job: subprocess.Popen[bytes]) -> None:
    """Stop the launcher and its workers: politely first, then by force."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        job.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=10)


def check_sent(path: Path, n: int) -> None:
    """Refuse a run whose sent-log does not say `sent` for exactly n recipients."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            sent = sum(row["status"] == "sent" for row in csv.DictReader(file))
    except OSError as error:
        raise BenchError(f"job: cannot read the sent-log {path}: {error.strerror}") from None
    if sent != n:
        raise BenchError(f"job: the sent-log has {sent:,} sent lines instead of {n:,}: {path}")


def delete_queues(url: str, campaign: str, *, quiet: bool = False) -> None:
    """Delete a campaign's queues: main, dead-letter and one per default retry delay.

    `quiet` (while another error is on its way) reports a failure instead of raising it.
    """
    queue = f"massmail.{campaign}"
    names = [queue, f"{queue}.dead", *(f"{queue}.retry.{round(s * 1000)}" for s in RETRY_DELAYS_S)]
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            for name in names:
                channel.queue_delete(name)
        finally:
            connection.close()
    except pika.exceptions.AMQPError as error:
        problem = f"cannot delete the queues of {campaign}: {error!r}"
        if not quiet:
            raise BenchError(problem) from None
        print(f"bench: {problem}", file=sys.stderr)


# The profile.


@dataclass
class Profile:
    """Samples of one worker, each counted on the innermost frame of the code we care about."""

    total: int
    frames: list[tuple[str, int]]
    elsewhere: int

    @classmethod
    def from_raw(cls, path: Path) -> Profile:
        """Read py-spy's raw format: `frame;frame;...;frame count` per line."""
        owners: Counter[str] = Counter()
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            owner = next((f for f in reversed(frames) if is_profiled(f)), "")
            owners[frame_label(owner)] += int(count)
        elsewhere = owners.pop("", 0)
        total = sum(owners.values()) + elsewhere
        if not total:
            raise BenchError(f"profile: py-spy recorded no samples ({path})")
        return cls(total, owners.most_common(PROFILE_TOP), elsewhere)

    @classmethod
    def skipped(cls) -> Profile:
        """No profile: for --memory-only runs."""
        return cls(0, [], 0)

    def lines(self) -> Iterator[tuple[str, str]]:
        for label, samples in self.frames:
            yield f"{100 * samples / self.total:.1f}%", label
        yield f"{100 * self.elsewhere / self.total:.1f}%", "(no frame in those modules)"

    def heading(self) -> str:
        return (
            f"Profile of one worker: {self.total:,} samples of both its threads (py-spy leaves\n"
            "out what it judges idle; waits in poll and fsync still count), each counted on\n"
            "its innermost frame in batch/, smtplib, sqlite3, pika or jinja2"
        )

    def text(self) -> str:
        if not self.total:
            return "Profile: not taken in this run."
        return "\n".join(
            [self.heading(), *(f"  {pct:>6}  {label}" for pct, label in self.lines())]
        )


def is_profiled(frame: str) -> bool:
    file = frame.rpartition("(")[2]
    return file.startswith(PROFILED)


def frame_label(frame: str) -> str:
    """Name a frame by function and file, without the line, so a function counts once."""
    return re.sub(r":\d+\)$", ")", frame)


# Output.

COLUMNS = ("measurement", "size", "result", "compared with", "baseline", "ratio")


def cells(row: Row) -> list[str]:
    return [
        row.measurement,
        f"{row.size:,}",
        row.result,
        row.compared_with,
        row.baseline,
        row.ratio,
    ]


def render_table(rows: list[Row]) -> str:
    """Lay the rows out in aligned columns, numbers to the right."""
    table = [list(COLUMNS), *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    right = {1, 2, 4, 5}
    out = []
    for line in table:
        out.append(
            "  ".join(
                cell.rjust(width) if i in right else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)


def render_markdown(machine: dict[str, str], rows: list[Row], profile: Profile) -> str:
    """The same results as Markdown, with the machine they were measured on."""
    out = ["# massmail benchmark", "", "| machine | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in machine.items()]
    out += ["", "| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---|---:|---:|"]
    out += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    if profile.total:
        out += ["", profile.heading() + ":", "", "| share | frame |", "|---:|---|"]
        out += [f"| {pct} | `{label}` |" for pct, label in profile.lines()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
