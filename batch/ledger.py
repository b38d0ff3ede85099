"""The ledger: what a worker needs to mail each recipient exactly once.

A ledger answers "may I send to this recipient?" (the claim) and records how each
attempt ended. The sent-log (batch.sentlog) is the one this project ships; a ledger in
a database shared by several hosts would implement the same four methods, and the worker
would not notice. Whatever implements it keeps two promises, which the worker builds on:

- `claim()` returns only once the claim is durable, so a claim survives a power failure
  before the message's DATA goes out;
- `record()` keeps an outcome at once (a kill -9 cannot lose it), and `sync()` or the
  next `claim()` makes it durable; the worker acks a delivery only after one of them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Status(StrEnum):
    """A recipient's status after an attempt, spelled as it appears in the sent-log."""

    CLAIMED = "claimed"  # DATA is about to be sent; no answer recorded yet
    SENT = "sent"  # the relay answered 250 to DATA
    FAILED = "failed"  # refused for good (5xx), or 4xx until the attempts ran out
    IN_DOUBT = "in-doubt"  # the relay may have accepted it; nobody can know
    DEFERRED = "deferred"  # refused for now (4xx); will be tried again
    SUPPRESSED = "suppressed"  # on the suppression list: never mailed


# Never written as an outcome: the loader queued the recipient and nothing has happened yet.
QUEUED = "queued"
# Never written as an outcome either: in doubt when this run started, and to be mailed once
# more (--in-doubt resend). A recipient left in doubt during the run stays in doubt.
RESEND = "resend"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt to mail a recipient ended."""

    status: Status
    smtp_code: int | None = None
    smtp_reply: str = ""


class Ledger(Protocol):
    """What a worker needs from a ledger."""

    def claim(self, recipient: str, message_id: str) -> bool:
        """Claim the recipient durably, or return False if it must not be mailed."""

    def record(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        """Keep the outcome of an attempt (durable after the next sync or claim)."""

    def sync(self) -> None:
        """Make every outcome kept so far durable."""

    def close(self) -> None:
        """Release what the ledger holds open."""


def worker_name(pid: int | None = None) -> str:
    """Name a process (this one by default) as the ledger records who claimed what."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"
