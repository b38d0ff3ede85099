"""List-Unsubscribe (RFC 2369), with the one-click POST of RFC 8058 for an https link.

`--unsubscribe-url` and `--unsubscribe-mailto` are Jinja2 templates with the list's
columns, like the message template. A rendered link goes into the header as it is, so it
must be a well-formed URI: spaces, angle brackets, quotes and other characters outside
ASCII percent-encoded (`| urlencode` does that). A long header folds only between links,
never inside one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import jinja2
import jinja2.meta

from batch.errors import TemplateError
from batch.mime import MAX_LINE_BYTES
from batch.rendering import render

# What RFC 3986 allows in a URI: unreserved and reserved characters, and %XX.
URI = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
MAILTO_ADDRESS = re.compile(r"[^@?]+@[^@?]+")
HEADER = "List-Unsubscribe"
ONE_CLICK = "List-Unsubscribe-Post: List-Unsubscribe=One-Click"
FOLD_AFTER = 78  # characters; RFC 5322's recommended line length
MAX_LINK = MAX_LINE_BYTES - len(f"{HEADER}: <>,")  # one link must fit one header line


class Link:
    """One unsubscribe link: a template of a URI, rendered per recipient."""

    def __init__(self, name: str, source: str, scheme: str) -> None:
        self.name = name  # the option that gave it, for errors
        self.scheme = scheme
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        try:
            self._template = env.from_string(source)
            self.variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as error:
            raise TemplateError(f"{name}: {source!r}: {error.message}") from None
        # Flat globals render faster, as in the message template (batch.message).
        self._template.globals = dict(self._template.globals)
        self._static: str | None = None  # the rendered link, when it uses no column
        if not self.variables:
            self._static = self.render({})

    def render(self, fields: Mapping[str, str]) -> str:
        """Render the link for one recipient; refuse one that would not be a sound URI."""
        if self._static is not None:
            return self._static
        value = render(self._template, fields, self.name)
        link = f"{self.scheme}:{value}" if self.scheme == "mailto" else value

        if not URI.fullmatch(link):
            problem = (
                "not a well-formed URI: spaces, angle brackets, quotes and non-ASCII "
                "characters must be percent-encoded (| urlencode does it)"
            )
        elif len(link) > MAX_LINK:
            problem = f"{len(link)} characters, more than a header line holds ({MAX_LINK})"
        elif self.scheme == "https" and not urlsplit(link).hostname:
            problem = "the URL names no host"
        elif self.scheme == "mailto" and not MAILTO_ADDRESS.fullmatch(value.partition("?")[0]):
            problem = "no address before the '?'"
        else:
            return link
        raise TemplateError(f"{self.name}: renders {link!r}: {problem}")


class Unsubscribe:
    """The List-Unsubscribe headers of a campaign, from its link templates."""

    def __init__(self, url: str | None, mailto: str | None) -> None:
        self.links: list[Link] = []
        if mailto:
            # The target may be given with or without its scheme.
            target = mailto[len("mailto:") :] if mailto.lower().startswith("mailto:") else mailto
            self.links.append(Link("--unsubscribe-mailto", target, "mailto"))
        if url:
            if not url.lower().startswith("https://"):
                raise TemplateError(
                    f"--unsubscribe-url {url!r}: must be an https URL (https://...): "
                    "one-click unsubscribing (RFC 8058) requires it"
                )
            self.links.append(Link("--unsubscribe-url", url, "https"))
        self.one_click = bool(url)
        self.variables = set().union(*(link.variables for link in self.links))

    @classmethod
    def of(cls, url: str | None, mailto: str | None) -> Unsubscribe | None:
        """Return the campaign's unsubscribe headers, or None if no link is given."""
        return cls(url, mailto) if url or mailto else None

    def headers(self, fields: Mapping[str, str]) -> list[str]:
        """Render the header lines for one recipient."""
        entries = [f"<{link.render(fields)}>" for link in self.links]
        line = f"{HEADER}: {', '.join(entries)}"
        if len(line) > FOLD_AFTER:
            line = f"{HEADER}: " + ",\r\n ".join(entries)
        return [line, ONE_CLICK] if self.one_click else [line]
