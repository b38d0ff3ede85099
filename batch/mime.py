"""The MIME structure of a campaign's messages: plain text, an HTML alternative, attachments.

A message without HTML and attachments is a single text/plain body. With an HTML template
it is multipart/alternative (text first, the richer HTML last, as RFC 2046 orders them);
with attachments it is multipart/mixed: the body first, then each file. Everything that is
the same for every recipient (boundaries, part headers, the encoded attachments) is
composed once; per recipient only the text and HTML bodies are joined in.
"""

from __future__ import annotations

import hashlib
import mimetypes
import quopri
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import MIMEPart
from email.policy import SMTP
from pathlib import Path

from batch.errors import UsageError

MAX_LINE_BYTES = 998
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")  # tab and line breaks included
MIME_VERSION = "MIME-Version: 1.0"
TEXT_TYPE = 'Content-Type: text/plain; charset="utf-8"'
HTML_TYPE = 'Content-Type: text/html; charset="utf-8"'
# Every boundary starts with "=_". Quoted-printable writes "=" only before two hex digits
# or a line break, and base64 has no "_", so neither can produce a boundary; a 7bit body
# that holds "=_" goes out as quoted-printable (see encode_part). Part header lines start
# with a field name or, folded, with white space: never with the "--" of a boundary line.
BOUNDARY_MARK = "=_"

# One body, encoded: its Content-Transfer-Encoding and its bytes (CRLF line endings).
Part = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file attached to every message, encoded once."""

    path: Path
    part: bytes  # its MIME headers, a blank line, its base64 lines; no CRLF after the last


def read_attachment(path: Path) -> Attachment:
    """Read a file and encode it as an attachment part; fail naming the file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"{path}: cannot read the attachment: {reason}") from None

    # Base64 is not allowed for message/* and multipart/* (RFC 2046), and a compressed
    # file (.tar.gz) is not of the type its inner suffix names: send those as plain bytes.
    guessed, compression = mimetypes.guess_type(path.name)
    if guessed is None or compression or guessed.startswith(("message/", "multipart/")):
        guessed = "application/octet-stream"
    maintype, _, subtype = guessed.partition("/")

    # The email package writes the headers, with RFC 2231 for a name that is not ASCII.
    part = MIMEPart(policy=SMTP)
    filename = CONTROL_CHARACTERS.sub("_", path.name)
    part.set_content(data, maintype, subtype, disposition="attachment", filename=filename)
    return Attachment(path, part.as_bytes().removesuffix(b"\r\n"))


def encode_text(body: str, *, quoted_printable: bool = False) -> Part:
    """Encode a body as 7bit when it is plain short ASCII, else quoted-printable."""
    lines = body.replace("\r\n", "\n").split("\n")
    if (
        not quoted_printable
        and body.isascii()
        and all(len(line) <= MAX_LINE_BYTES for line in lines)
    ):
        return "7bit", "\r\n".join(lines).encode("ascii")
    encoded = quopri.encodestring("\n".join(lines).encode("utf-8"))
    return "quoted-printable", encoded.replace(b"\n", b"\r\n")


def encode_part(body: str) -> Part:
    """Encode a body for a multipart message, where it must not hold a boundary.

    A body holding the boundary mark goes out as quoted-printable, which encodes the "=":
    no column value can then end a part early.
    """
    return encode_text(body, quoted_printable=BOUNDARY_MARK in body)


class Layout:
    """Assemble a recipient's bodies into the campaign's MIME structure."""

    def __init__(self, campaign: str, *, html: bool, attachments: Sequence[Attachment]) -> None:
        # One boundary pair per campaign, so the static parts are composed once; it needs no
        # secrecy, since no part this job encodes can hold the mark (see BOUNDARY_MARK).
        stem = BOUNDARY_MARK + hashlib.sha256(campaign.encode()).hexdigest()[:16]
        alternative, mixed = f"{stem}.alt", f"{stem}.mix"
        self.multipart = html or bool(attachments)
        self.encode = encode_part if self.multipart else encode_text  # a rendered body
        self._plain = {
            encoding: [MIME_VERSION, TEXT_TYPE, f"Content-Transfer-Encoding: {encoding}"]
            for encoding in ("7bit", "quoted-printable")
        }
        self._alternative = alternative.encode()
        nested = f'Content-Type: multipart/alternative; boundary="{alternative}"'
        if not attachments:
            self._headers = [MIME_VERSION, nested]
            self._attachments = None
            return

        # The body is the first part of the mixed one; the attachments follow, composed once.
        self._headers = [MIME_VERSION, f'Content-Type: multipart/mixed; boundary="{mixed}"']
        opening = f"--{mixed}\r\n{nested}\r\n\r\n" if html else f"--{mixed}\r\n"
        self._opening = opening.encode()
        self._attachments = _multipart(mixed.encode(), [a.part for a in attachments])

    def assemble(self, text: Part, html: Part | None) -> tuple[list[str], bytes]:
        """Return the message's MIME headers and its body, given its encoded parts."""
        if not self.multipart:
            encoding, payload = text
            return self._plain[encoding], payload

        body = _part(TEXT_TYPE, text)
        if html is not None:
            body = _multipart(self._alternative, [body, _part(HTML_TYPE, html)])
        if self._attachments is not None:
            body = self._opening + body + b"\r\n" + self._attachments
        return self._headers, body


def _part(content_type: str, part: Part) -> bytes:
    """Put one encoded body under its headers."""
    encoding, payload = part
    return f"{content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode() + payload


def _multipart(boundary: bytes, parts: list[bytes]) -> bytes:
    """Join parts with boundary lines; the CRLF before each boundary line belongs to it."""
    delimiter = b"--" + boundary
    return b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts) + delimiter + b"--\r\n"
