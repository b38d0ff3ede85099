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
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from batch.errors import BatchError

from .common import BenchError, say
from .machine import describe_machine
from .measure import Bench
from .profiling import Profile, ensure_py_spy
from .results import render_markdown, render_table
from .settings import DEFAULT_AMQP_URL, DEFAULT_SIZES, FULL_SIZE, QUICK_SIZE
from .sink import SmtpSink, ensure_smtp_sink

EPILOG = """\
exit codes: 0 measured, 1 a step failed (the message says which), 130 interrupted

examples:
  scripts/bench --quick                      # checks the script itself in about a minute
  scripts/bench --markdown bench.md          # 20,000 and 100,000 recipients
  scripts/bench --full --markdown bench.md   # and 1,000,000
"""


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
    """Turn SIGTERM into an interrupt."""
    raise KeyboardInterrupt  # unwinds through every `finally`, so smtp-sink is stopped


if __name__ == "__main__":
    sys.exit(main())
