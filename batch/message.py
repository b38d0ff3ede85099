"""The message: a mailmerge-style template, compiled once, stamped per recipient.

A template is header lines (`From:`, `Subject:`, optional `Reply-To:` and others), a
blank line, then a Jinja2 body. Headers and body may use the list's columns. An HTML
template (a Jinja2 body only, its column values HTML-escaped), unsubscribe links and
attachments may go with it. Everything that is the same for every recipient is composed
once; per recipient only the rendered headers and bodies, `To`, `Date` and `Message-ID`
are stamped.

Header values are rendered, then written by `batch.headers`, which turns any line break
into a space, so no column value can add a header or a recipient.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import jinja2
import jinja2.meta

from batch.errors import TemplateError
from batch.headers import header_line, mailboxes
from batch.mime import Attachment, Layout, Part, read_attachment
from batch.recipients import envelope_form
from batch.rendering import render
from batch.unsubscribe import Unsubscribe

FORBIDDEN_HEADERS = frozenset({"to", "cc", "bcc", "message-id", "date", "mime-version"})
CONTENT_HEADERS = frozenset({"content-type", "content-transfer-encoding"})


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
        self.headers = [
            (field, _compile(self._env, value, name, line)) for field, value, line in header_lines
        ]
        self.body = _compile(self._env, body, name, body_line)
        self.header_variables = [self._names(value) for _, value, _ in header_lines]
        self.body_variables = self._names(body)
        self.variables = self.body_variables.union(*self.header_variables)
        self.sender = self._sender()

    @classmethod
    def from_file(cls, path: Path) -> Template:
        """Read and compile a template file."""
        return cls(_read(path, "template"), name=str(path))

    def _names(self, source: str) -> set[str]:
        """List the column names one part of the template uses."""
        return jinja2.meta.find_undeclared_variables(self._env.parse(source))

    def _sender(self) -> str:
        """Find the envelope sender in the From header; it must not depend on the row."""
        for (field, template), names in zip(self.headers, self.header_variables, strict=True):
            if field.lower() == "from":
                try:
                    value = render(template, {}, self.name)
                except TemplateError:
                    if not names:
                        raise
                    raise TemplateError(
                        f"{self.name}: the From address must not use list columns"
                    ) from None
                found = mailboxes(value)
                if len(found) != 1:
                    raise TemplateError(f"{self.name}: From needs one usable address: {value!r}")
                return found[0][1]
        raise TemplateError(f"{self.name}: the template has no From: header")

    def check_columns(self, columns: set[str], source: str) -> None:
        """Fail before anything is sent if the template uses a column the list lacks."""
        _check_columns(self.name, self.variables, columns, source)


class HtmlTemplate:
    """The HTML alternative: a Jinja2 body without headers; column values are escaped."""

    def __init__(self, text: str, *, name: str = "<html template>") -> None:
        self.name = name
        self.text = text
        env = jinja2.Environment(
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=True
        )
        self.body = _compile(env, text, name, 1)
        self.variables = jinja2.meta.find_undeclared_variables(env.parse(text))

    @classmethod
    def from_file(cls, path: Path) -> HtmlTemplate:
        """Read and compile an HTML template file."""
        return cls(_read(path, "HTML template"), name=str(path))


def html_twin(template: Path) -> Path | None:
    """Find the HTML template beside a text one: welcome.html for welcome.txt."""
    twin = template.with_suffix(".html")
    return twin if twin != template and twin.is_file() else None


@dataclass(frozen=True)
class MessageParts:
    """What every recipient's message is made of, checked and compiled."""

    template: Template
    html: HtmlTemplate | None = None
    unsubscribe: Unsubscribe | None = None
    attachments: tuple[Attachment, ...] = ()

    def __post_init__(self) -> None:
        """Refuse a template with its own List-Unsubscribe when the options make one."""
        if self.unsubscribe is None:
            return
        for field, _ in self.template.headers:
            if field.lower() in {"list-unsubscribe", "list-unsubscribe-post"}:
                raise TemplateError(
                    f"{self.template.name}: has a {field} header, and the unsubscribe "
                    "options set it too: keep one"
                )

    @classmethod
    def read(
        cls,
        template: Path,
        *,
        html: Path | None,
        unsubscribe_url: str | None,
        unsubscribe_mailto: str | None,
        attach: Sequence[Path],
    ) -> MessageParts:
        """Read the template and what goes with it; an HTML twin is found by its name."""
        html = html or html_twin(template)
        return cls(
            Template.from_file(template),
            HtmlTemplate.from_file(html) if html else None,
            Unsubscribe.of(unsubscribe_url, unsubscribe_mailto),
            tuple(read_attachment(path) for path in attach),
        )

    def check(self, row: Mapping[str, str], source: str) -> None:
        """Fail before anything is sent if a part needs a column the list's first row lacks.

        The unsubscribe links are rendered for that row too, so a link that is malformed
        for every recipient (a column not urlencoded, say) stops the run at the start.
        """
        columns = set(row)
        self.template.check_columns(columns, source)
        if self.html is not None:
            _check_columns(self.html.name, self.html.variables, columns, source)
        if self.unsubscribe is not None:
            for link in self.unsubscribe.links:
                _check_columns(link.name, link.variables, columns, source)
            try:
                self.unsubscribe.headers(row)
            except TemplateError as error:
                raise TemplateError(f"{source}, first row: {error}") from None

    def composer(self, campaign: str) -> Composer:
        """Make the composer that stamps these parts for each recipient of a campaign."""
        return Composer(
            self.template,
            campaign,
            html=self.html,
            unsubscribe=self.unsubscribe,
            attachments=self.attachments,
        )


class Composer:
    """Stamp a campaign's message for each recipient.

    Parts that use no column (often From, Reply-To, the unsubscribe links, sometimes the
    bodies) are rendered and encoded once, the attachments and the MIME structure too;
    per recipient only the rest is rendered.
    """

    def __init__(
        self,
        template: Template,
        campaign: str,
        *,
        html: HtmlTemplate | None = None,
        unsubscribe: Unsubscribe | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> None:
        self.template = template
        self.html = html
        self.unsubscribe = unsubscribe
        self.campaign = campaign
        self._domain = envelope_form(template.sender).rpartition("@")[2]  # an IDN in ASCII
        self._headers: list[tuple[str, jinja2.Template | None, str]] = [
            (name, tmpl, "" if names else self._header_line(name, self._render(tmpl, {})))
            for (name, tmpl), names in zip(
                template.headers, template.header_variables, strict=True
            )
        ]
        self._layout = Layout(campaign, html=html is not None, attachments=attachments)
        self._body: Part | None = None  # each body, when it is the same for everyone
        if not template.body_variables:
            self._body = self._layout.encode(self._render(template.body, {}))
        self._html: Part | None = None
        if html is not None and not html.variables:
            self._html = self._layout.encode(render(html.body, {}, html.name))
        self._links: list[str] | None = None  # the unsubscribe headers, likewise
        if unsubscribe is not None and not unsubscribe.variables:
            self._links = unsubscribe.headers({})
        self._date = (0, "")

    def message_id(self, recipient: str) -> str:
        """Derive the Message-ID from campaign and recipient: the same on every attempt."""
        digest = hashlib.sha256(f"{self.campaign}\n{recipient}".encode()).hexdigest()
        return f"<{digest[:32]}.{self.campaign}@{self._domain}>"

    def compose(
        self, recipient: str, fields: Mapping[str, str], message_id: str | None = None
    ) -> Letter:
        """Render the template for one recipient and encode it for SMTP."""
        lines = [
            static or self._header_line(name, self._render(tmpl, fields))
            for name, tmpl, static in self._headers
        ]
        text = self._body or self._layout.encode(self._render(self.template.body, fields))
        html = None if self.html is None else self._html_part(self.html, fields)

        # The address is validated (no spaces, commas or line breaks), so it goes in as it
        # is; a non-ASCII local part stays raw UTF-8, as SMTPUTF8 mail carries it (RFC 6532).
        message_id = message_id or self.message_id(recipient)
        lines.append(f"To: {envelope_form(recipient)}")
        lines.append(f"Date: {self._now()}")
        lines.append(f"Message-ID: {message_id}")
        if self.unsubscribe is not None:
            lines.extend(self._links or self.unsubscribe.headers(fields))
        mime_headers, payload = self._layout.assemble(text, html)
        lines.extend(mime_headers)
        head = ("\r\n".join(line for line in lines if line) + "\r\n\r\n").encode("utf-8")
        return Letter(self.template.sender, recipient, message_id, head + payload)

    def check(self, row: Mapping[str, str], source: str) -> None:
        """Render the template's parts for the list's first row, before anything is sent.

        An expression that fails for that row (`{{ name + 1 }}`) most likely fails for
        every row: it stops the run rather than fail each recipient one by one. A value
        that renders but makes no header (a Reply-To without an address) is the row's
        problem, not the template's: it fails that recipient alone, when it is sent.
        """
        try:
            for _, template, static in self._headers:
                if not static:
                    self._render(template, row)
            if self._body is None:
                self._render(self.template.body, row)
            if self.html is not None:
                self._html_part(self.html, row)
        except TemplateError as error:
            raise TemplateError(f"{source}, first row: {error}") from None

    def _render(self, template: jinja2.Template, fields: Mapping[str, str]) -> str:
        """Render a header or the body of the text template."""
        return render(template, fields, self.template.name)

    def _header_line(self, name: str, value: str) -> str:
        """Write one header of the template, naming the template if it cannot be written."""
        try:
            return header_line(name, value)
        except TemplateError as error:
            raise TemplateError(f"{self.template.name}: {error}") from None

    def _html_part(self, html: HtmlTemplate, fields: Mapping[str, str]) -> Part:
        """Render and encode the HTML body for one recipient, unless it is the same for all."""
        if self._html is not None:
            return self._html
        return self._layout.encode(render(html.body, fields, html.name))

    def _now(self) -> str:
        """Format the Date header, once a second."""
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, formatdate(second, usegmt=True))
        return self._date[1]


def _read(path: Path, what: str) -> str:
    """Read a template file as UTF-8, naming it if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"{path}: cannot read the {what}: {error}") from None


def _compile(env: jinja2.Environment, source: str, name: str, first_line: int) -> jinja2.Template:
    """Compile one part, reporting syntax errors with the file's line number."""
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        line = first_line + (error.lineno or 1) - 1
        raise TemplateError(f"{name}: line {line}: {error.message}") from None
    # A plain dict instead of Jinja2's layered globals: every render copies them, and
    # copying a dict is several times cheaper than walking the layers.
    template.globals = dict(template.globals)
    return template


def _check_columns(name: str, variables: set[str], columns: set[str], source: str) -> None:
    """Refuse a part that uses a column the list lacks."""
    missing = sorted(variables - columns)
    if missing:
        raise TemplateError(
            f"{name}: uses {', '.join(missing)}, which {source} does not have "
            f"(columns: {', '.join(sorted(columns))})"
        )


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
