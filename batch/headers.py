"""Header lines: each value on one logical line, encoded as RFC 2047 says where it must be.

A value's line breaks and control characters become spaces, so no column value can add
a header or a recipient. In From, Reply-To and Sender only the display names are encoded,
never the addresses, so that a mail program can still read them.
"""

from __future__ import annotations

import re
from email.header import Header
from email.utils import formataddr, getaddresses, unquote

from batch.errors import TemplateError
from batch.mime import CONTROL_CHARACTERS, MAX_LINE_BYTES
from batch.recipients import envelope_form

ADDRESS_HEADERS = frozenset({"from", "reply-to", "sender"})
PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
MAX_ADDRESS_CHARS = 254  # RFC 5321's longest path, less its angle brackets


def header_line(name: str, value: str) -> str:
    """Encode one header on one logical line; line breaks in the value become spaces.

    A value that is not plain ASCII, looks like an encoded word already ("=?"), or holds a
    word too long to fold within 998 bytes goes out as RFC 2047 encoded words, which a mail
    program shows exactly as the column held it. In an address header only names are, and
    a value with no readable address is refused (TemplateError); an empty one gives "".
    """
    value = " ".join(CONTROL_CHARACTERS.sub(" ", value).split())
    if name.lower() in ADDRESS_HEADERS:
        if not value:
            return ""  # an empty column: no such header, rather than an empty one
        found = mailboxes(value)
        if not found:
            raise TemplateError(f"{name}: no address a mail program could read in {value!r}")
        written = [_mailbox(name, display, address) for display, address in found]
        return f"{name}: " + ",\r\n ".join(written)

    plain = value.isascii() and "=?" not in value
    if plain and len(name) + len(value) < 76:
        return f"{name}: {value}"
    if plain:
        folded = Header(value, "us-ascii", header_name=name).encode(linesep="\r\n")
        if all(len(line) <= MAX_LINE_BYTES - len(name) - 2 for line in folded.split("\r\n")):
            return f"{name}: {folded}"
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}"


def mailboxes(value: str) -> list[tuple[str, str]]:
    """Read an address header's (display name, address) pairs; none if it holds no address.

    getaddresses splits "Smith, John <j@x.example>" at its unquoted comma, though whoever
    typed it meant one mailbox: when the parts are not all addresses, a value ending in one
    <address> is that mailbox, with all before the "<" as its display name.
    """
    pairs = getaddresses([value])
    if pairs and all(_usable(address) for _, address in pairs):
        return pairs
    display, bracket, address = value.partition("<")
    if bracket and address.endswith(">") and _usable(address[:-1]):
        return [(unquote(display.strip()), address[:-1])]
    return []


def _usable(address: str) -> bool:
    """Tell whether an address can go into a header as it is: one plain addr-spec."""
    return len(address) <= MAX_ADDRESS_CHARS and PLAIN_ADDRESS.fullmatch(address) is not None


def _mailbox(name: str, display: str, address: str) -> str:
    """Write one mailbox of an address header, its display name encoded once at most.

    A name that is not ASCII, looks like an encoded word or is too long for a line goes as
    RFC 2047 words, which Header keeps within 75 characters each (formataddr would write one
    word of any length). The address is never encoded: an IDN domain goes in ASCII, a local
    part with non-ASCII letters in UTF-8, the only form it has (RFC 6532).
    """
    address = envelope_form(address)
    if not display:
        return address
    if display.isascii() and "=?" not in display and address.isascii():
        mailbox = formataddr((display, address))  # quoted where the name needs it
        if len(mailbox) <= MAX_LINE_BYTES - len(name) - 2:
            return mailbox
    encoded = Header(display, "utf-8").encode(linesep="\r\n")
    return f"{encoded} <{address}>"
