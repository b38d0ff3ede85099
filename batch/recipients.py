"""Turn the rows of a recipient list into distinct, valid addresses, keeping what was refused.

Nothing here knows about the broker. Addresses are compared in one form, lower-cased and
with an internationalised domain in ASCII, so Ann@Example.com and ann@example.com, or
ann@bücher.example and ann@xn--bcher-kva.example, are one recipient, mailed once, under
the address and row where it first appears.
"""

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import idna
from email_validator import EmailNotValidError, validate_email

from batch.errors import SourceError
from batch.source import Row

# What people put between two addresses when they squeeze both into one cell.
SEPARATORS = re.compile(r"[,;\s]+")


@dataclass(frozen=True, slots=True)
class Recipient:
    """A distinct, valid address, the row it first appeared in and its place in the list."""

    address: str
    row: int
    fields: dict[str, str]
    position: int = 0  # among the list's distinct, valid recipients, from 1; what --limit counts


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that will not be mailed, the cell as found and why."""

    row: int
    value: str
    reason: str


class RecipientList:
    """Iterate a source's rows as distinct, valid recipients; keep the rejections.

    Rows are read one at a time and only once. What is kept grows with the list in two
    places only: one entry per distinct address (to find duplicates), and `rejections`, which
    holds one Rejection per refused row, filled as iteration goes.
    """

    def __init__(
        self,
        rows: Iterable[Row],
        *,
        source: str,
        email_column: str = "email",
        allow_smtputf8: bool = True,
    ) -> None:
        self._rows = rows
        self.source = source
        self._email_column = email_column
        self._allow_smtputf8 = allow_smtputf8
        # Keyed by a 128-bit digest of the address, a sixth less memory than the address
        # itself (20 MB at a million rows); two addresses share one with odds below 1e-25.
        self._first_rows: dict[int, int] = {}
        self._seen = 0
        self._started = False
        self.rejections: list[Rejection] = []

    @property
    def seen(self) -> int:
        """Return how many rows have been read so far, accepted or not."""
        return self._seen

    def __iter__(self) -> Iterator[Recipient]:
        """Yield each acceptable recipient once, recording every other row as a rejection."""
        if self._started:
            raise RuntimeError("a RecipientList can be iterated only once")
        self._started = True

        column = None
        for row in self._rows:
            self._seen += 1
            if column is None:
                column = self._address_column(row)
            recipient = self._accept(row, row.fields[column])
            if recipient is not None:
                yield recipient

    def _address_column(self, row: Row) -> str:
        """Return the column holding the address, matched without regard to case or spaces."""
        wanted = self._email_column.strip().casefold()
        matches = [name for name in row.fields if name.strip().casefold() == wanted]
        if len(matches) == 1:
            return matches[0]

        if matches:
            raise SourceError(
                f"{self.source}: more than one address column matches "
                f"'{self._email_column}' ({', '.join(matches)}): rename all but one"
            )
        found = ", ".join(row.fields) or "none"
        raise SourceError(
            f"{self.source}: no address column '{self._email_column}' "
            f"(columns found: {found}): use --email-column"
        )

    def _accept(self, row: Row, value: str) -> Recipient | None:
        """Return the row as a recipient, or record why it is refused and return None."""
        reason = _fault(value, allow_smtputf8=self._allow_smtputf8)
        if reason is None:
            address = normalise(value)
            compared = compared_form(address).encode()
            key = int.from_bytes(hashlib.blake2b(compared, digest_size=16).digest())
            first_row = self._first_rows.get(key)
            if first_row is None:
                self._first_rows[key] = row.number
                return Recipient(address, row.number, row.fields, len(self._first_rows))
            reason = f"duplicate of row {first_row}"

        self.rejections.append(Rejection(row.number, value, reason))
        return None


def normalise(address: str) -> str:
    """Return the form an address is mailed and logged in: stripped and lower-cased."""
    return address.strip().lower()


def compared_form(address: str) -> str:
    """Return the form in which two addresses of one mailbox are equal.

    Trimmed, lower-cased, in Unicode's composed form (NFC: an ö typed as o and a combining
    mark is the ö), and with the domain in ASCII whatever the local part holds, so that
    jörg@bücher.example and jörg@xn--bcher-kva.example are one recipient.
    """
    local, at, domain = unicodedata.normalize("NFC", normalise(address)).rpartition("@")
    return f"{local}@{_ascii_domain(domain)}" if at else domain


def envelope_form(address: str) -> str:
    """Return the address as it goes to the relay: an IDN domain as its ASCII (A-label) form.

    An address whose local part is ASCII needs no SMTPUTF8 once its domain is written as
    punycode (bücher.example is xn--bcher-kva.example), so it reaches any relay. Only a
    local part with non-ASCII letters still needs a relay that announces SMTPUTF8.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return address
    return f"{local}@{_ascii_domain(domain)}"


def _ascii_domain(domain: str) -> str:
    """Write a domain in ASCII (its A-labels); one that cannot be is left as it is."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain  # the relay will refuse it and say why


def _fault(value: str, *, allow_smtputf8: bool) -> str | None:
    """Return why a cell is not one valid address, or None when it is one."""
    address = value.strip()
    if not address:
        return "empty address"
    if "\r" in value or "\n" in value:
        return "contains a line break: put one address per cell, on one line"
    if sum("@" in part for part in SEPARATORS.split(address)) > 1:
        return "more than one address: put one address per row"

    # The validator's verdict counts; its normalised form is not used, so that every
    # address is keyed and mailed the same way: stripped and lower-cased.
    try:
        validate_email(
            address, check_deliverability=False, allow_smtputf8=allow_smtputf8, strict=True
        )
    except EmailNotValidError as error:
        return f"not a valid address: {error}"
    return None
