"""Give every step the same error, progress lines, tool runner and time limit."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator


class BenchError(Exception):
    """A step failed; the message says which and why."""


def say(text: str) -> None:
    """Print a progress line at once."""
    print(f"bench {time.strftime('%H:%M:%S')} {text}", flush=True)


def tail(text: str, lines: int = 15) -> str:
    """Keep the last lines of a tool's output for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])


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
