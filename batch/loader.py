"""The loader: reads the list and puts every recipient still to mail into the broker.

It reads the whole list on every run, so duplicates and bad rows are found and reported
again. Each batch is noted in the sent-log's index (which tells the settled recipients
apart and tells the launcher whom to wait for), and the rest is published in one AMQP
transaction. After each committed batch it fsyncs a checkpoint (the last row the broker
holds), so a rerun publishes only rows past it, unless the broker holds nothing of the
campaign any more, in which case everything unsettled goes in again. Publishing a
recipient twice is harmless: the worker's claim drops the second copy.

Recipients on the suppression list are settled as `suppressed` instead. With a limit,
only the list's first N recipients are considered; the rest are counted and left out of
the run (the workers drop any message of theirs an earlier run left queued), so a later
run with a higher limit (or none) goes on where this one stopped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from batch.broker import Broker
from batch.errors import Unavailable
from batch.ledger import RESEND, Outcome, Status
from batch.recipients import Recipient, RecipientList, Rejection
from batch.sentlog import SentLog
from batch.sentlog_file import safe_cell
from batch.suppression import Suppressions

log = logging.getLogger(__name__)


@dataclass
class LoadCounts:
    """What the loader has seen so far."""

    rows: int = 0
    rejected: int = 0
    settled: int = 0  # settled in an earlier run
    published: int = 0
    suppressed: int = 0
    held: int = 0  # unsettled recipients past the limit, left for a later run
    done: bool = False


class Loader:
    """Publish a list's unsettled recipients; run in a thread of the launcher."""

    def __init__(
        self,
        recipients: RecipientList,
        broker: Broker,
        campaign_dir: Path,
        ledger: SentLog,
        *,
        publish_all: bool,
        reconnect_for_s: float,
        suppressions: Suppressions | None = None,
        limit: int | None = None,
        batch_size: int = 500,
    ) -> None:
        self.recipients = recipients
        self.suppressions = suppressions
        self.limit = limit
        self.broker = broker
        self.checkpoint = campaign_dir / "loaded.json"
        self.rejected_path = campaign_dir / "rejected.csv"
        self.ledger = ledger
        self.publish_after = 0 if publish_all else read_checkpoint(self.checkpoint)
        self.batch_size = batch_size
        self.reconnect_for_s = reconnect_for_s
        self.counts = LoadCounts()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="loader", daemon=True)

    def start(self) -> None:
        """Start loading in the background."""
        self.thread.start()

    def _run(self) -> None:
        try:
            self.load()
        except BaseException as error:  # handed to the launcher, which reports it
            self.error = error
        finally:
            self.broker.close()
            self.ledger.close()

    def load(self) -> None:
        """Read the list and publish the recipients still to mail, in batches."""
        # The refused rows of an earlier run are not this list's until it is read through.
        self.rejected_path.unlink(missing_ok=True)
        batch: list[Recipient] = []
        past_limit: list[str] = []
        for recipient in self.recipients:
            self.counts.rows = self.recipients.seen
            if self.limit is not None and recipient.position > self.limit:
                past_limit.append(recipient.address)
                if len(past_limit) >= self.batch_size:
                    self._leave_out(past_limit)
                continue
            batch.append(recipient)
            if len(batch) >= self.batch_size:
                self._publish(batch)
        self._publish(batch)
        self._leave_out(past_limit)
        self.counts.rows = self.recipients.seen
        self.counts.rejected = len(self.recipients.rejections)
        write_rejections(self.rejected_path, self.recipients.rejections)
        self.counts.done = True

    def _publish(self, batch: list[Recipient]) -> None:
        """Publish a batch's unsettled recipients in one transaction, then checkpoint."""
        if not batch:
            return
        mailable = self._suppress(batch) if self.suppressions else batch
        unsettled = self.ledger.expect(r.address for r in mailable)
        self.counts.settled += len(mailable) - len(unsettled)
        bodies = [
            message_of(r)
            for r in mailable
            if r.address in unsettled
            and (r.row > self.publish_after or unsettled[r.address] == RESEND)
        ]
        if bodies:
            try:
                self.counts.published += self.broker.publish(bodies)
            except Unavailable as error:
                # An uncommitted batch is dropped by the broker; publishing it again is safe.
                log.warning("%s; reconnecting to publish the batch again", error)
                self.broker.reconnect(give_up_after_s=self.reconnect_for_s)
                self.counts.published += self.broker.publish(bodies)
        write_checkpoint(self.checkpoint, batch[-1].row)
        batch.clear()

    def _suppress(self, batch: list[Recipient]) -> list[Recipient]:
        """Settle the batch's suppressed recipients; return the others."""
        listed = [r.address for r in batch if r.address in self.suppressions]
        if listed:
            reason = self.suppressions.reason
            newly = self.ledger.settle(listed, Outcome(Status.SUPPRESSED, None, reason))
            self.counts.suppressed += newly
            self.counts.settled += len(listed) - newly
        return [r for r in batch if r.address not in self.suppressions]

    def _leave_out(self, addresses: list[str]) -> None:
        """Count the unsettled recipients past the limit and leave them out of this run."""
        self.counts.held += self.ledger.leave_out(addresses)
        addresses.clear()


def message_of(recipient: Recipient) -> dict[str, object]:
    """Describe a recipient as its queue message: address, row, place in the list, columns."""
    return {
        "recipient": recipient.address,
        "row": recipient.row,
        "position": recipient.position,
        "fields": recipient.fields,
    }


def read_checkpoint(path: Path) -> int:
    """Return the last row the broker was known to hold, or 0."""
    try:
        return int(json.loads(path.read_text())["through_row"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable; every unsettled recipient is published again", path)
        return 0


def write_checkpoint(path: Path, through_row: int) -> None:
    """Replace the checkpoint atomically and durably."""
    with replacing(path) as file:
        json.dump({"through_row": through_row}, file)


def write_rejections(path: Path, rejections: list[Rejection]) -> None:
    """List the refused rows with their reasons, safe to open in a spreadsheet."""
    with replacing(path) as file:
        writer = csv.writer(file)
        writer.writerow(["row", "value", "reason"])
        for rejection in rejections:
            writer.writerow(
                [rejection.row, safe_cell(rejection.value), safe_cell(rejection.reason)]
            )


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[TextIO]:
    """Write a file beside path, fsync it, then put it in path's place in one step.

    A reader (the report) sees the old file or the whole new one, never a part.
    """
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
