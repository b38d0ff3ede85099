"""The sent-log's file: its columns, how one line is written, and how lines are read back.

Auditors open this file in a spreadsheet, so every line is one CSV record that no
spreadsheet reads as a formula, and no field holds a line break: one line is one record.
A line is whole or missing after a crash, except the last one, which a crash can tear;
`create_or_repair()` cuts it before a run appends, and readers leave it for the next look.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from batch.errors import BatchError
from batch.ledger import Outcome

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

NEEDS_QUOTES = re.compile(r'[,"\r\n]')
# Characters that make a spreadsheet read a cell as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class SentLogError(BatchError):
    """The sent-log cannot be read or written."""


def format_line(
    campaign: str, recipient: str, outcome: Outcome, message_id: str, worker: str
) -> bytes:
    """Render one sent-log line, safe to open in a spreadsheet."""
    fields = (
        _timestamp(),
        campaign,
        recipient,
        outcome.status.value,
        "" if outcome.smtp_code is None else str(outcome.smtp_code),
        safe_cell(" ".join(outcome.smtp_reply.split())),
        message_id,
        worker,
    )
    # Only these two can hold a comma, a quote or a line break; the rest are ours.
    if not (NEEDS_QUOTES.search(fields[5]) or NEEDS_QUOTES.search(recipient)):
        return (",".join(fields) + "\n").encode()
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue().encode()


def _timestamp() -> str:
    """Format now in UTC as ISO 8601 with milliseconds."""
    now = time.time()
    second = int(now)
    return f"{_second(second)}.{int((now - second) * 1000):03d}+00:00"


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def safe_cell(text: str) -> str:
    """Keep a spreadsheet from reading a cell as a formula, as OWASP advises."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


class SentLogRows:
    """The complete lines of a sent-log as rows, read from its start when iterated.

    A last line without its newline is being written right now (or was torn by a crash,
    and the next run cuts it): it is left for the next look, and its size is kept in
    `unfinished_bytes`. `lines` counts the lines read, the header aside.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self.unfinished_bytes = 0

    def __iter__(self) -> Iterator[dict[str, str]]:
        with self.path.open("rb") as file:
            records = csv.reader(self._complete(file))
            try:
                yield from self._rows(records)
            except csv.Error as error:
                raise SentLogError(
                    f"{self.path}: line {records.line_num}: {error}: the file is damaged"
                ) from None

    def _rows(self, records: Iterator[list[str]]) -> Iterator[dict[str, str]]:
        for number, fields in enumerate(records, start=1):
            if number == 1 and fields == list(COLUMNS):
                continue
            self.lines += 1
            if len(fields) != len(COLUMNS):
                raise SentLogError(
                    f"{self.path}: line {number} has {len(fields)} fields"
                    f" instead of {len(COLUMNS)}: the file is damaged"
                )
            yield dict(zip(COLUMNS, fields, strict=True))

    def _complete(self, file: Iterable[bytes]) -> Iterator[str]:
        """Decode each complete line; a line is decoded whole, so no character is split."""
        for number, line in enumerate(file, start=1):
            if not line.endswith(b"\n"):
                self.unfinished_bytes = len(line)
                return
            try:
                yield line.decode()
            except UnicodeDecodeError:
                raise SentLogError(
                    f"{self.path}: line {number} is not UTF-8: the file is damaged"
                ) from None


def create_or_repair(path: Path) -> int:
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
