"""Rendering one part of a message (a header, a body, a link) for one recipient.

A template is code the user wrote: besides a column it lacks, its own expressions can fail
(`{{ name + 1 }}`, `{{ total // count }}`). Whatever the failure, it comes out here as a
TemplateError naming the part, so it fails one recipient with a reason, or stops the run
with 2 when it fails for everyone, and never escapes as a bare Python error.
"""

from __future__ import annotations

from collections.abc import Mapping

import jinja2

from batch.errors import TemplateError


def render(template: jinja2.Template, fields: Mapping[str, str], name: str) -> str:
    """Render a part with a recipient's columns; a failure names the part."""
    try:
        return template.render(fields)
    except jinja2.UndefinedError as error:
        raise TemplateError(f"{name}: {error.message}") from None
    except Exception as error:  # the template's own expression failed
        raise TemplateError(f"{name}: cannot be rendered: {error!r}") from None
