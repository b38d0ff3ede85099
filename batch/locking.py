"""Exclusive locks on open files, which the operating system drops when a process dies.

A process killed while it holds one (kill -9 included) leaves no stale lock behind:
`flock` on Linux and macOS; elsewhere (Windows) a lock file beside the file, held
through filelock with the system's own file locking.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    from filelock import FileLock


def file_lock(path: Path, fd: int) -> AbstractContextManager[object]:
    """Return a reusable exclusive lock on the file open as fd at path."""
    if fcntl is None:
        return FileLock(f"{path}.lock")
    return _Flock(fd)


class _Flock:
    """An exclusive lock on an open file, for as long as the `with` block runs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
