"""Install py-spy, and sum one worker's samples by the frame of our code they fell in."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .common import BenchError, run_tool, say, tail
from .settings import PIP_TIMEOUT_S, PROFILE_TOP, PROFILED


def ensure_py_spy() -> None:
    """Install py-spy into this virtualenv when it is missing."""
    if py_spy().exists():
        return
    say("installing py-spy (pip)")
    result = run_tool([sys.executable, "-m", "pip", "install", "py-spy"], PIP_TIMEOUT_S)
    if result.returncode != 0 or not py_spy().exists():
        raise BenchError(f"pip install py-spy failed: {tail(result.stdout)}")


def py_spy() -> Path:
    """Return where pip puts py-spy in this virtualenv."""
    return Path(sys.executable).parent / "py-spy"


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
        """Yield each frame's share of the samples, then the share outside our modules."""
        for label, samples in self.frames:
            yield f"{100 * samples / self.total:.1f}%", label
        yield f"{100 * self.elsewhere / self.total:.1f}%", "(no frame in those modules)"

    def heading(self) -> str:
        """Say what the samples cover and how they were counted."""
        return (
            f"Profile of one worker: {self.total:,} samples of both its threads (py-spy leaves\n"
            "out what it judges idle; waits in poll and fsync still count), each counted on\n"
            "its innermost frame in batch/, smtplib, sqlite3, pika or jinja2"
        )

    def text(self) -> str:
        """Lay the profile out for the terminal."""
        if not self.total:
            return "Profile: not taken in this run."
        return "\n".join(
            [self.heading(), *(f"  {pct:>6}  {label}" for pct, label in self.lines())]
        )


def is_profiled(frame: str) -> bool:
    """Tell whether a frame lies in one of the modules the profile reports."""
    file = frame.rpartition("(")[2]
    return file.startswith(PROFILED)


def frame_label(frame: str) -> str:
    """Name a frame by function and file, without the line, so a function counts once."""
    return re.sub(r":\d+\)$", ")", frame)
