"""A campaign: the name a mailing is known by, and the folder that keeps its state.

A run without `--campaign` is named after what it sends (the list, the templates, the
links and attachments), so running the same command again resumes the same campaign, and
an edited template starts a new one. The folder, `<state_dir>/<campaign>/`, holds the
sent-log and its index, `rejected.csv`, the loader's checkpoint and the run's lock.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from batch.config import Settings
from batch.errors import UsageError
from batch.message import MessageParts
from batch.source import fingerprint


def derive_name(settings: Settings, parts: MessageParts) -> str:
    """Name a campaign after its list and templates, so the same command resumes it."""
    digest = hashlib.sha256()
    digest.update(
        fingerprint(settings.source, query=settings.query, sheet=settings.sheet).encode()
    )
    digest.update(parts.template.text.encode())
    # What a campaign of plain text alone lacks adds nothing: its name stays what it was.
    if parts.html is not None:
        digest.update(b"\0html\0" + parts.html.text.encode())
    for link in (settings.unsubscribe_url, settings.unsubscribe_mailto):
        if link:
            digest.update(b"\0unsubscribe\0" + link.encode())
    for attachment in parts.attachments:
        digest.update(b"\0attachment\0" + attachment.part)
    digest.update(settings.email_column.lower().encode())
    return f"auto-{digest.hexdigest()[:16]}"


def create_folder(state_dir: Path, campaign: str) -> Path:
    """Create the campaign's folder, readable by owner and group only."""
    folder = state_dir / campaign
    try:
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{folder}: cannot create the campaign folder: {error}") from None
    return folder
