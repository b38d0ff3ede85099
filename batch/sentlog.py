"""The sent-log: the campaign's ledger of claims and outcomes, one CSV line each.

It is the one place that decides what "sent", "failed" and "in-doubt" mean on disk,
and it knows nothing of SMTP or AMQP. Its two promises, which the worker builds on:

- `claim()` returns only after the claim line is fsync'd, so a claim is durable
  before the message's DATA goes out;
- `record()` writes an outcome line at once (a kill -9 cannot lose it) and `sync()`
  makes every line written so far durable; the worker acks only after `sync()`
  or a later `claim()` returned.

Several processes append to the same file under one `filelock.FileLock`, so lines
never interleave, and a claim's check and its claim are one atomic step.
"""

from __future__ import annotations

import csv
import io
import os
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from batch.errors import BatchError

COLUMNS = (
    "timestamp",
    "campaign",
    "recipient",
    "status",
    "smtp_code",
    "smtp_reply",
    "message_id",
    "worker",
)
HEADER = (",".join(COLUMNS) + "\n").encode()

# Characters that make a spreadsheet read a cell as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class Status(StrEnum):
    """A sent-log line's status, spelled as it appears in the file."""

    CLAIMED = "claimed"  # DATA is about to be sent; no answer recorded yet
    SENT = "sent"  # the relay answered 250 to DATA
    FAILED = "failed"  # refused for good (5xx), or 4xx until the attempts ran out
    IN_DOUBT = "in-doubt"  # the relay may have accepted it; nobody can know
    DEFERRED = "deferred"  # refused for now (4xx); will be tried again


FINAL = frozenset({Status.SENT, Status.FAILED, Status.IN_DOUBT})


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt to mail a recipient ended."""

    status: Status
    smtp_code: int | None = None
    smtp_reply: str = ""


class Ledger(Protocol):
    """What a worker needs from a ledger; a shared database could implement it too."""

    def claim(self, recipient: str, message_id: str) -> bool:
        """Claim the recipient durably, or return False if it must not be mailed."""

    def record(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        """Write the outcome of an attempt (durable after the next sync or claim)."""

    def sync(self) -> None:
        """Make every line written so far durable."""

    def close(self) -> None:
        """Release the files."""


class SentLogError(BatchError):
    """The sent-log cannot be read or written."""


def worker_name(pid: int | None = None) -> str:
    """Name a process (this one by default) as the sent-log's `worker` column does."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


class SentLog:
    """The campaign's sent-log file, opened by one process."""

    def __init__(self, path: Path, campaign: str, *, resend_in_doubt: bool = False) -> None:
        self.path = path
        self.campaign = campaign
        self.worker = worker_name()
        self._blocking = {Status.CLAIMED, Status.SENT, Status.FAILED, Status.IN_DOUBT}
        if resend_in_doubt:
            self._blocking.discard(Status.IN_DOUBT)
        self._lock = FileLock(f"{path}.lock")
        self._fd = -1
        self._offset = 0
        self._tail = b""
        self._dirty = False
        self.statuses: dict[str, Status] = {}
        self.open_claims: dict[str, tuple[str, str]] = {}  # recipient -> (worker, message_id)

        with self._lock:
            self.torn_bytes = _create_or_repair(path)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND)
        with self._lock:
            self._catch_up()

    # The worker's side.

    def claim(self, recipient: str, message_id: str) -> bool:
        """Claim the recipient and fsync, unless it is claimed or settled already."""
        with self._lock:
            self._catch_up()
            if self.statuses.get(recipient) in self._blocking:
                return False
            self._append(recipient, message_id, Outcome(Status.CLAIMED))
            self._fsync()
        return True

    def record(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        """Write the outcome line now; it is durable after the next `sync()` or `claim()`."""
        with self._lock:
            self._catch_up()
            self._append(recipient, message_id, outcome)

    def sync(self) -> None:
        """Fsync the lines this process wrote, if any are not durable yet."""
        if self._dirty:
            self._fsync()

    def close(self) -> None:
        """Close the file; call `sync()` first if the last lines matter."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # The launcher's side.

    def settle_open_claims(self, reason: str, worker: str | None = None) -> list[str]:
        """Record every claim without an outcome (of one worker, or all) as in-doubt."""
        with self._lock:
            self._catch_up()
            settled = [
                (recipient, message_id)
                for recipient, (claimer, message_id) in self.open_claims.items()
                if worker is None or claimer == worker
            ]
            for recipient, message_id in settled:
                self._append(recipient, message_id, Outcome(Status.IN_DOUBT, None, reason))
            self._fsync()
        return [recipient for recipient, _ in settled]

    def refresh(self) -> None:
        """Read the lines other processes appended since the last look."""
        with self._lock:
            self._catch_up()

    def counts(self) -> Counter[Status]:
        """Count recipients by their latest status."""
        return Counter(self.statuses.values())

    def is_final(self, recipient: str) -> bool:
        """Tell whether nothing more will be attempted for this recipient."""
        return self.statuses.get(recipient) in self._blocking - {Status.CLAIMED}

    # Inside the lock.

    def _append(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        line = format_line(self.campaign, recipient, outcome, message_id, self.worker)
        os.write(self._fd, line)
        self._offset += len(line)
        self._note(recipient, outcome.status, message_id, self.worker)
        self._dirty = True

    def _fsync(self) -> None:
        os.fsync(self._fd)
        self._dirty = False

    def _catch_up(self) -> None:
        """Apply the complete lines appended since the last read."""
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        chunk = self._tail + os.pread(self._fd, size - self._offset, self._offset)
        self._offset = size
        complete, _, self._tail = chunk.rpartition(b"\n")
        for row in parse_lines(complete, self.path):
            self._note(row["recipient"], Status(row["status"]), row["message_id"], row["worker"])

    def _note(self, recipient: str, status: Status, message_id: str, worker: str) -> None:
        self.statuses[recipient] = status
        if status is Status.CLAIMED:
            self.open_claims[recipient] = (worker, message_id)
        else:
            self.open_claims.pop(recipient, None)


def format_line(
    campaign: str, recipient: str, outcome: Outcome, message_id: str, worker: str
) -> bytes:
    """Render one sent-log line, safe to open in a spreadsheet."""
    reply = safe_cell(" ".join(outcome.smtp_reply.split()))
    fields = (
        datetime.now(UTC).isoformat(timespec="milliseconds"),
        campaign,
        recipient,
        outcome.status.value,
        "" if outcome.smtp_code is None else str(outcome.smtp_code),
        reply,
        message_id,
        worker,
    )
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue().encode()


def safe_cell(text: str) -> str:
    """Keep a spreadsheet from reading a cell as a formula, as OWASP advises."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def parse_lines(data: bytes, path: Path) -> Iterator[dict[str, str]]:
    """Parse complete sent-log lines (no header) into rows keyed by column."""
    if not data:
        return
    for fields in csv.reader(io.StringIO(data.decode("utf-8"))):
        if fields and fields[0] == COLUMNS[0]:
            continue
        if len(fields) != len(COLUMNS):
            raise SentLogError(
                f"{path}: a line has {len(fields)} fields instead of {len(COLUMNS)}: {fields!r}"
            )
        yield dict(zip(COLUMNS, fields, strict=True))


def read_rows(path: Path) -> Iterator[dict[str, str]]:
    """Read every complete line of a sent-log, for reports and checks."""
    data = path.read_bytes()
    complete, _, _ = data.rpartition(b"\n")
    yield from parse_lines(complete, path)


def _create_or_repair(path: Path) -> int:
    """Create the file with its header, or cut a torn last line; return the bytes cut."""
    if not path.exists() or path.stat().st_size == 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, HEADER)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return 0

    with open(path, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - 65536))
        data = file.read()
        if data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n")
        keep = size - len(data) + cut + 1 if cut >= 0 else 0
        file.truncate(keep)
        if keep == 0:
            file.write(HEADER)
        file.flush()
        os.fsync(file.fileno())
    return size - keep


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
