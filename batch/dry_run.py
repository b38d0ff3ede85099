"""The dry run: every recipient's message rendered, the first one shown, nothing sent.

It reads the whole list and the templates as a real run would, so what would stop a real
run (a bad row, a column a template needs, a link that will not render) shows here
first; it touches no broker, no relay and no file.
"""

from __future__ import annotations

import logging
import re

from batch.errors import ExitCode, TemplateError
from batch.message import Composer
from batch.recipients import RecipientList
from batch.suppression import Suppressions

log = logging.getLogger(__name__)

SAMPLE_BASE64_LINES = 4  # how much of each attachment the sample shows
BASE64_LINE = re.compile(r"[A-Za-z0-9+/]{76}")
BASE64_TAIL = re.compile(r"[A-Za-z0-9+/]{0,75}={0,2}")


def dry_run(
    composer: Composer, recipients: RecipientList, suppressions: Suppressions | None
) -> ExitCode:
    """Render every recipient's message and print the first; exit 2 if one cannot be."""
    rendered = unrenderable = suppressed = 0
    for recipient in recipients:
        if suppressions and recipient.address in suppressions:
            suppressed += 1
            continue
        try:
            letter = composer.compose(recipient.address, recipient.fields)
        except TemplateError as error:
            unrenderable += 1
            log.error("%s: row %d (%s): %s", recipients.source, recipient.row,
                      recipient.address, error)  # fmt: skip
            continue
        if not rendered:
            print(f"--- the message for {recipient.address} ---", flush=True)
            print(sample_text(letter.data), flush=True)
        rendered += 1

    for rejection in recipients.rejections:
        log.warning("%s: row %d refused: %s", recipients.source, rejection.row,
                    rejection.reason)  # fmt: skip
    log.info(
        "dry run of campaign %s: %d %s rendered, %d could not be, %d rows refused, "
        "%d suppressed; nothing was sent or queued",
        composer.campaign, rendered, "message" if rendered == 1 else "messages", unrenderable,
        len(recipients.rejections), suppressed,
    )  # fmt: skip
    return ExitCode.USAGE if unrenderable else ExitCode.OK


def sample_text(data: bytes) -> str:
    """Show a message as text, each attachment's encoded lines cut short."""
    shown: list[str] = []
    run = 0  # consecutive lines of an attachment's base64
    for line in data.decode("utf-8", "replace").split("\r\n"):
        full = BASE64_LINE.fullmatch(line)
        run = run + 1 if full or (run and BASE64_TAIL.fullmatch(line)) else 0
        if run <= SAMPLE_BASE64_LINES:
            shown.append(line)
        elif run == SAMPLE_BASE64_LINES + 1:
            shown.append("[... the rest of this attachment is not shown ...]")
    return "\n".join(shown)
