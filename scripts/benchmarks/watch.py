"""Run the job as a child process: time it, sample the RSS of its process tree, profile it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .common import BenchError, say, tail
from .profiling import py_spy
from .settings import (
    PROFILE_DURATION_S,
    PROGRESS_EVERY_S,
    ROOT,
    SAMPLE_EVERY_S,
    STOP_GRACE_S,
    WORKERS,
    job_timeout_s,
)


@dataclass(frozen=True)
class JobRun:
    """What one run of the job measured."""

    wall_s: float
    rate: float
    peak_rss_mb: float


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
                self._show_progress(now - started)
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(timeout=SAMPLE_EVERY_S)
                return

    def _show_progress(self, elapsed_s: float) -> None:
        """Estimate the recipients done from the sent-log: a claim and an outcome each."""
        lines = self.sent_log.count()
        say(
            f"job: {elapsed_s:.0f} s, ~{max(lines - 1, 0) // 2:,} of "
            f"{self.n:,} done, {self.peak_kb / 1024:,.0f} MB peak"
        )

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
        """Return the lines written so far; a file not yet created has none."""
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as file:
            file.seek(self.offset)
            added = file.read()
            self.offset += len(added)
            self.lines += added.count(b"\n")
        return self.lines


def stop_group(job: subprocess.Popen[bytes]) -> None:
    """Stop the launcher and its workers: politely first, then by force."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        job.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=10)


# What /proc says of a process.


def process_tree(root: int) -> list[int]:
    """Return root and all its descendants, found through each process's parent id."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            children[parent_pid(pid)].append(pid)  # one gone meanwhile lands under 0

    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, ()))
    return tree


def rss_kb(pid: int) -> int:
    """Return a process's resident memory in kB; 0 when it is gone."""
    found = re.search(r"^VmRSS:\s+(\d+) kB", read_proc(pid, "status"), re.MULTILINE)
    return int(found.group(1)) if found else 0


def is_worker(pid: int) -> bool:
    """Tell a worker from the resource tracker, the fork server and other processes."""
    command = read_proc(pid, "cmdline")
    if "multiprocessing" not in command or "resource_tracker" in command:
        return False
    # A fork server and the workers it forks share one command line: a worker is its child.
    if "forkserver" in command:
        return "forkserver" in read_proc(parent_pid(pid), "cmdline")
    return True


def parent_pid(pid: int) -> int:
    """Return a process's parent id; 0 when it is gone."""
    stat = read_proc(pid, "stat")
    try:
        return int(stat.rpartition(")")[2].split()[1])  # the name may hold spaces and ")"
    except (IndexError, ValueError):
        return 0


def read_proc(pid: int, name: str) -> str:
    """Read /proc/<pid>/<name>; a process gone meanwhile reads as empty."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace")
    except OSError:
        return ""
