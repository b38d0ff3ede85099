"""The message: a mailmerge-style template, compiled once, stamped per recipient.

A template is header lines (`From:`, `Subject:`, optional `Reply-To:` and others), a
blank line, then a Jinja2 body. Headers and body may use the list's columns. Everything
that is the same for every recipient is composed once; per recipient only the rendered
headers, the body, `To`, `Date` and `Message-ID` are stamped.

Header values are rendered, then any line break in them becomes a space, so no column
value can add a header or a recipient.
"""

from __future__ import annotations

import hashlib
import quopri
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr
from pathlib import Path

import jinja2
import jinja2.meta

from batch.errors import TemplateError
from batch.recipients import envelope_form

FORBIDDEN_HEADERS = frozenset({"to", "cc", "bcc", "message-id", "date", "mime-version"})
CONTENT_HEADERS = frozenset({"content-type", "content-transfer-encoding"})
MAX_LINE_BYTES = 998
PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")  # tab and line breaks included


@dataclass(frozen=True, slots=True)
class Letter:
    """One recipient's message, ready for the relay."""

    sender: str  # the envelope sender (the From address)
    recipient: str
    message_id: str
    data: bytes  # CRLF line endings, not yet dot-stuffed


class Template:
    """A parsed and compiled message template."""

    def __init__(self, text: str, *, name: str = "<template>") -> None:
        self.name = name
        self.text = text
        header_lines, body, body_line = _split(text, name)
        self._env = jinja2.Environment(
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
        )
        self.headers = [(field, self._compile(value, line)) for field, value, line in header_lines]
        self.body = self._compile(body, body_line)
        self.header_variables = [self._names(value) for _, value, _ in header_lines]
        self.body_variables = self._names(body)
        self.variables = self.body_variables.union(*self.header_variables)
        self.sender = self._sender()

    @classmethod
    def from_file(cls, path: Path) -> Template:
        """Read and compile a template file."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TemplateError(f"{path}: cannot read the template: {error}") from None
        return cls(text, name=str(path))

    def _compile(self, source: str, first_line: int) -> jinja2.Template:
        """Compile one part, reporting syntax errors with the template's line number."""
        try:
            template = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            line = first_line + (error.lineno or 1) - 1
            raise TemplateError(f"{self.name}: line {line}: {error.message}") from None
        # A plain dict instead of Jinja2's layered globals: every render copies them, and
        # copying a dict is several times cheaper than walking the layers.
        template.globals = dict(template.globals)
        return template

    def _names(self, source: str) -> set[str]:
        """List the column names one part of the template uses."""
        return jinja2.meta.find_undeclared_variables(self._env.parse(source))

    def _sender(self) -> str:
        """Find the envelope sender in the From header; it must not depend on the row."""
        for field, template in self.headers:
            if field.lower() == "from":
                try:
                    _, address = parseaddr(template.render())
                except jinja2.UndefinedError:
                    raise TemplateError(
                        f"{self.name}: the From address must not use list columns"
                    ) from None
                if not PLAIN_ADDRESS.fullmatch(address):
                    raise TemplateError(f"{self.name}: From has no usable address: {address!r}")
                return address
        raise TemplateError(f"{self.name}: the template has no From: header")

    def check_columns(self, columns: set[str], source: str) -> None:
        """Fail before anything is sent if the template uses a column the list lacks."""
        missing = sorted(self.variables - columns)
        if missing:
            raise TemplateError(
                f"{self.name}: uses {', '.join(missing)}, which {source} does not have "
                f"(columns: {', '.join(sorted(columns))})"
            )


class Composer:
    """Stamp a campaign's template for each recipient.

    Parts that use no column (often From, Reply-To, sometimes the body) are rendered and
    encoded once; per recipient only the rest is rendered.
    """

    def __init__(self, template: Template, campaign: str) -> None:
        self.template = template
        self.campaign = campaign
        self._domain = template.sender.rpartition("@")[2]
        self._headers: list[tuple[str, jinja2.Template | None, str]] = [
            (name, tmpl, "" if names else _header(name, tmpl.render()))
            for (name, tmpl), names in zip(
                template.headers, template.header_variables, strict=True
            )
        ]
        self._body = None if template.body_variables else _encode_body(template.body.render())
        self._date = (0, "")

    def message_id(self, recipient: str) -> str:
        """Derive the Message-ID from campaign and recipient: the same on every attempt."""
        digest = hashlib.sha256(f"{self.campaign}\n{recipient}".encode()).hexdigest()
        return f"<{digest[:32]}.{self.campaign}@{self._domain}>"

    def compose(
        self, recipient: str, fields: Mapping[str, str], message_id: str | None = None
    ) -> Letter:
        """Render the template for one recipient and encode it for SMTP."""
        try:
            lines = [
                static or _header(name, tmpl.render(fields))
                for name, tmpl, static in self._headers
            ]
            encoding, payload = self._body or _encode_body(self.template.body.render(fields))
        except jinja2.UndefinedError as error:
            raise TemplateError(f"{self.template.name}: {error.message}") from None

        # The address is validated (no spaces, commas or line breaks), so it goes in as it
        # is; a non-ASCII local part stays raw UTF-8, as SMTPUTF8 mail carries it (RFC 6532).
        message_id = message_id or self.message_id(recipient)
        lines.append(f"To: {envelope_form(recipient)}")
        lines.append(f"Date: {self._now()}")
        lines.append(f"Message-ID: {message_id}")
        lines.append("MIME-Version: 1.0")
        lines.append('Content-Type: text/plain; charset="utf-8"')
        lines.append(f"Content-Transfer-Encoding: {encoding}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        return Letter(self.template.sender, recipient, message_id, head + payload)

    def _now(self) -> str:
        """Format the Date header, once a second."""
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, formatdate(second, usegmt=True))
        return self._date[1]


def _split(text: str, name: str) -> tuple[list[tuple[str, str, int]], str, int]:
    """Split a template into (field, value, line) headers and the body."""
    lines = text.replace("\r\n", "\n").split("\n")
    headers: list[tuple[str, str, int]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            return headers, "\n".join(lines[number:]), number + 1
        if line[0] in " \t" and headers:
            field, value, first = headers[-1]
            headers[-1] = (field, f"{value} {line.strip()}", first)
            continue
        field, colon, value = line.partition(":")
        if not colon or not field.strip() or " " in field.strip():
            raise TemplateError(f"{name}: line {number}: expected a header such as 'Subject: ...'")
        field = field.strip()
        if field.lower() in FORBIDDEN_HEADERS | CONTENT_HEADERS:
            raise TemplateError(f"{name}: line {number}: the {field} header is set by the job")
        headers.append((field, value.strip(), number))
    raise TemplateError(f"{name}: no blank line between the headers and the body")


def _header(name: str, value: str) -> str:
    """Encode one header on one logical line; line breaks in the value become spaces.

    A value that is not plain ASCII, looks like an encoded word already ("=?"), or holds a
    word too long to fold within 998 bytes goes out as RFC 2047 encoded words, which a mail
    program shows exactly as the column held it.
    """
    value = " ".join(CONTROL_CHARACTERS.sub(" ", value).split())
    if name.lower() in {"from", "reply-to", "to", "sender"}:
        display, address = parseaddr(value)
        address = envelope_form(address)
        if "@" in address and address.isascii():
            value = formataddr((display, address), charset="utf-8")
    plain = value.isascii() and "=?" not in value
    if plain and len(name) + len(value) < 76:
        return f"{name}: {value}"
    if plain:
        folded = Header(value, "us-ascii", header_name=name).encode(linesep="\r\n")
        if all(len(line) <= MAX_LINE_BYTES - len(name) - 2 for line in folded.split("\r\n")):
            return f"{name}: {folded}"
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}"


def _encode_body(body: str) -> tuple[str, bytes]:
    """Encode the body as 7bit when it is plain short ASCII, else quoted-printable."""
    lines = body.replace("\r\n", "\n").split("\n")
    if body.isascii() and all(len(line) <= MAX_LINE_BYTES for line in lines):
        return "7bit", "\r\n".join(lines).encode("ascii")
    encoded = quopri.encodestring("\n".join(lines).encode("utf-8"))
    return "quoted-printable", encoded.replace(b"\n", b"\r\n")
