"""The suppression list: addresses never to mail, whatever list they turn up in.

The file is plain text, one address a line ("#" starts a comment), or a CSV with an
`email` column: a file named `.csv`, or one whose first line is a header naming `email`.
Addresses are compared as the recipient list compares them (stripped and lower-cased),
with an internationalised domain in its ASCII form, so `ann@bücher.example` and
`Ann@xn--bcher-kva.example` are one entry.

Recipients whose address the relay refused for good can be added to it from a campaign's
sent-log with `python -m batch.report --campaign NAME --export-refused FILE`. Only refusals
of the address count: an enhanced status 5.1.x (no such mailbox or domain) or 5.2.1
(mailbox disabled), or, from a relay that gives none, 550, 551 or 553. A 554 to DATA
("looks like spam") refuses the message, not the address, and would suppress a whole list.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable, Iterator
from email.utils import parseaddr
from pathlib import Path

from batch.errors import SourceError, UsageError
from batch.recipients import compared_form

log = logging.getLogger(__name__)

ADDRESS_COLUMN = "email"
ENHANCED_STATUS = re.compile(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
ADDRESS_REFUSALS = ("5.1.", "5.2.1")
ADDRESS_REFUSAL_CODES = ("550", "551", "553")


def address_refused(smtp_code: str, smtp_reply: str) -> bool:
    """Tell whether a relay's reply (as the sent-log holds it) refused the address for good."""
    enhanced = ENHANCED_STATUS.match(smtp_reply)
    if enhanced:
        return enhanced.group(1).startswith(ADDRESS_REFUSALS)
    return smtp_code in ADDRESS_REFUSAL_CODES


class Suppressions:
    """The addresses of a suppression file, ready to be looked up."""

    def __init__(self, path: Path, addresses: Iterable[str] = ()) -> None:
        self.path = path
        self._keys = {compared_form(address) for address in addresses}

    def __contains__(self, address: str) -> bool:
        return compared_form(address) in self._keys

    @property
    def reason(self) -> str:
        """Say why a recipient on this list is not mailed, as the sent-log records it."""
        return f"on the suppression list {self.path}"

    def __iter__(self) -> Iterator[str]:
        """Yield each address once, in the form addresses are compared in."""
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def read(cls, path: Path) -> Suppressions:
        """Read a suppression file; refuse one that cannot be read, skip blank lines."""
        try:
            with path.open(encoding="utf-8-sig", newline="") as file:
                lines = file.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise SourceError(f"{path}: cannot read the suppression list: {error}") from None
        suppressions = cls(path, _addresses(path, lines))
        log.info("suppression list %s: %d addresses", path, len(suppressions))
        return suppressions


def _addresses(path: Path, lines: list[str]) -> list[str]:
    """Pick the addresses out of a text file's lines or a CSV's email column."""
    column = _csv_column(path, lines)
    if column is None:
        return [address for line in lines if (address := _address(line))]
    # Strict: a quote left open would otherwise swallow the addresses below it unnoticed.
    rows = csv.reader(lines[1:], strict=True)
    addresses, start = [], 2  # the file's line where the next record starts
    try:
        for row in rows:
            if rows.line_num + 1 > start:  # no value of a suppression list spans lines
                raise csv.Error("a quoted value runs over several lines")
            if len(row) > column and row[column].strip():
                addresses.append(row[column])
            start = rows.line_num + 2
    except csv.Error as error:
        raise SourceError(
            f"{path}: line {start}: not readable as CSV: {error} (a quote left open?)"
        ) from None
    return addresses


def _csv_column(path: Path, lines: list[str]) -> int | None:
    """Return the email column of a CSV suppression list, or None for a text file."""
    # A comma alone does not make a CSV: a text line may be `"Smith, John" <j@example.com>`.
    header = [name.strip().casefold() for name in next(csv.reader(lines[:1]), [])]
    if path.suffix.lower() != ".csv" and ADDRESS_COLUMN not in header:
        return None
    if ADDRESS_COLUMN not in header:
        raise SourceError(
            f"{path}: line 1: a CSV suppression list needs an '{ADDRESS_COLUMN}' column "
            f"(found: {', '.join(header) or 'none'})"
        )
    return header.index(ADDRESS_COLUMN)


def _address(line: str) -> str:
    """Read one text line: an address, maybe with a display name; "#" starts a comment."""
    line = line.strip()
    if not line or line.startswith("#"):
        return ""
    return parseaddr(line)[1] or line


def add(path: Path, addresses: Iterable[str]) -> int:
    """Append the addresses the file does not hold yet, durably; return how many."""
    try:
        return _append_new(path, addresses)
    except OSError as error:
        raise UsageError(f"{path}: cannot add to the suppression list: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: cannot read the suppression list: {error}") from None


def _append_new(path: Path, addresses: Iterable[str]) -> int:
    text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
    known = Suppressions(path, _addresses(path, text.splitlines()))
    new = sorted({compared_form(a) for a in addresses if a not in known})
    if not new:
        return 0

    column = _csv_column(path, text.splitlines()) if text.strip() else None
    width = len(next(csv.reader(text.splitlines()[:1]), [])) if column is not None else 1
    with path.open("a", encoding="utf-8", newline="") as file:
        if text and not text.endswith("\n"):
            file.write("\n")
        writer = csv.writer(file, lineterminator="\n")
        for address in new:
            row = [""] * width
            row[column or 0] = address
            writer.writerow(row)
        file.flush()
        os.fsync(file.fileno())
    return len(new)
