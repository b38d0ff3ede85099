"""The launcher: wires the pipeline together for one campaign and watches it.

source -> recipients -> loader -> broker -> worker -> mailer -> sent-log
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from batch import config
from batch.broker import Broker, describe, recipient_of
from batch.campaign import create_folder, derive_name
from batch.config import Settings
from batch.dry_run import dry_run
from batch.errors import AlreadyRunning, BatchError, ExitCode, Unavailable, UsageError
from batch.ledger import Outcome, Status
from batch.loader import Loader, message_of
from batch.logs import setup_logging
from batch.mailer import Mailer, RelaySettings
from batch.message import MessageParts
from batch.pool import WorkerPool
from batch.progress import Progress, Tally
from batch.recipients import RecipientList, compared_form
from batch.sentlog import SentLog
from batch.sentlog_file import SentLogError
from batch.source import Row, read_rows
from batch.suppression import Suppressions
from batch.throttle import paced_prefetch, paced_workers, start_schedule
from batch.worker import WorkerSettings

log = logging.getLogger("batch")

EXIT_CODES = """\
exit codes:
  0   every recipient was sent (with --limit N: every one of the first N)
  1   the run finished, but some recipients failed or are in doubt (see the sent-log)
  2   usage, configuration, list or template error: nothing was sent
  3   another run of this campaign is active
  70  an unexpected error (a bug): rerun the same command to resume
  75  the broker or the relay could not be reached, or the run was interrupted:
      rerun the same command later to resume

examples:
  python -m batch.run --source list.csv --template welcome.txt --workers 8
  python -m batch.run --config config/massmail.toml --campaign nightly-2026-12-03
  python -m batch.run --source list.csv --template welcome.txt --dry-run
  python -m batch.run --source list.csv --template welcome.txt --limit 500 --rate 300/min \\
      --suppress suppressed.txt --attach terms.pdf \\
      --unsubscribe-url 'https://example.com/u?e={{ email | urlencode }}'
"""
TICK_S = 0.5
DEAD_LETTERS_EVERY_S = 5.0  # how often the launcher looks for messages set aside
LOST_AFTER_S = 10.0  # quiet time before unsettled recipients missing from the queue go again


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job from the command line and return its exit code."""
    try:
        settings = config.load(argv, epilog=EXIT_CODES)
    except BatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    setup_logging(settings.verbosity)
    try:
        return Launcher(settings).run()
    except SentLogError as error:  # a rerun meets the same damage until the file is mended
        log.error("%s; put it back as the job wrote it, then rerun", error)
        return error.exit_code
    except BatchError as error:
        log.error("%s", error)
        code = error.exit_code
    except Exception:  # a bug: say so, with the traceback, and never exit 1 ("finished")
        log.critical("unexpected error", exc_info=True)
        code = ExitCode.SOFTWARE
    if code in (ExitCode.TEMPFAIL, ExitCode.SOFTWARE):
        log.error("nothing is lost: rerun the same command to resume")
    return code


class Launcher:
    """One run of one campaign."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.interrupted = False
        self.unreadable = 0
        self.progress = Progress(sys.stderr, settings.verbosity, settings.source)
        self.workers = paced_workers(settings.workers, settings.rate)
        self.prefetch = paced_prefetch(settings.prefetch, self.workers, settings.rate)
        # Paced workers hold their deliveries unacked (out of the queue's count) while they
        # wait for slots: no recipient counts as lost before all of those could have gone.
        held_s = self.prefetch * self.workers / settings.rate if settings.rate else 0.0
        self.lost_after_s = LOST_AFTER_S + held_s

    def run(self) -> ExitCode:
        """Check the inputs, hold the campaign's lock, and run it."""
        s = self.settings
        parts = self._message_parts()
        first = self._check_columns(parts)
        self.suppressions = Suppressions.read(s.suppress) if s.suppress else None
        campaign = s.campaign or derive_name(s, parts)
        composer = parts.composer(campaign)  # refuses a fixed header it cannot write
        if s.dry_run:
            return dry_run(composer, self._recipients(), self.suppressions)
        if first is not None:
            composer.check(first.fields, str(s.source))
        folder = create_folder(s.state_dir, campaign)

        lock = FileLock(folder / "run.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise AlreadyRunning(
                f"campaign {campaign}: another run is active (it holds {folder / 'run.lock'})"
            ) from None
        try:
            return self._run_locked(campaign, folder, parts)
        finally:
            lock.release()

    def _run_locked(self, campaign: str, folder: Path, parts: MessageParts) -> ExitCode:
        """Recover, load, send and watch, then sum up."""
        s = self.settings
        if not (folder / "sent-log.csv").exists():
            self._refuse_a_queue_of_another_sent_log(campaign, folder)
        ledger = self._sent_log(folder, campaign, rebuild=True)
        self._recover(ledger)
        self._suppress_at_claim(ledger)
        relay = self._relay_settings()
        Mailer(relay).open()  # fail fast, before anything is queued

        broker = self._broker(campaign)
        broker.connect()
        loader = self._loader(campaign, folder, publish_all=broker.depth() == 0)
        log.info(
            "campaign %s: list %s, %d workers, relay %s, broker %s, state %s%s",
            campaign, s.source, self.workers, relay.describe(), describe(s.amqp_url), folder,
            Tally.of(ledger).earlier_runs(),
        )  # fmt: skip

        if s.rate:
            log.info("rate limit: %s messages per second, all workers together", f"{s.rate:g}")
        if self.workers < s.workers:
            log.info(
                "%d workers instead of %d: at this rate more would only wait, each holding "
                "a message the broker takes back after 30 minutes", self.workers, s.workers,
            )  # fmt: skip
        pool = WorkerPool(
            self._worker_settings(campaign, ledger.path, parts, relay),
            self.workers,
            max_restarts=3 * self.workers,
        )
        pool.start()
        loader.start()
        self._catch_signals()
        try:
            code = self._watch(ledger, loader, broker, pool)
        finally:
            self.progress.close()
            pool.stop(ledger, grace_s=s.smtp_timeout + 30)
            broker.close()
        return self._summary(ledger, loader, folder, code)

    # Before the run.

    def _message_parts(self) -> MessageParts:
        """Read the template, its HTML twin, the unsubscribe links and the attachments."""
        s = self.settings
        return MessageParts.read(
            s.template,
            html=s.html_template,
            unsubscribe_url=s.unsubscribe_url,
            unsubscribe_mailto=s.unsubscribe_mailto,
            attach=s.attach,
        )

    def _check_columns(self, parts: MessageParts) -> Row | None:
        """Refuse a part that uses a column the list lacks; return the list's first row."""
        s = self.settings
        first = next(iter(read_rows(s.source, query=s.query, sheet=s.sheet)), None)
        if first is not None:
            parts.check(first.fields, str(s.source))
        return first

    def _refuse_a_queue_of_another_sent_log(self, campaign: str, folder: Path) -> None:
        """Refuse to start a campaign afresh while the broker holds messages of it.

        A run that keeps its sent-log elsewhere (another --state-dir, another host, or a
        folder since deleted) queued them; a fresh sent-log would mail again everyone
        that run has mailed.
        """
        broker = self._broker(campaign)
        broker.connect()
        try:
            waiting = broker.depth()
        finally:
            broker.close()
        if waiting:
            raise UsageError(
                f"campaign {campaign}: the broker holds {waiting} of its messages, but "
                f"{folder} has no sent-log: they were queued by a run that keeps its sent-log "
                "elsewhere (another --state-dir or host). Run with that state folder, or name "
                "a new --campaign"
            )

    def _recover(self, ledger: SentLog) -> None:
        """Repair what a crash left in the sent-log."""
        if ledger.torn_bytes:
            log.warning(
                "%s: cut a torn last line (%d bytes) left by a crash",
                ledger.path,
                ledger.torn_bytes,
            )
        settled = ledger.settle_open_claims(
            "claimed by a run that stopped before the relay's answer was recorded"
        )
        if settled:
            log.warning(
                "%d recipient(s) are in doubt: their message may or may not have been accepted "
                "(see the sent-log; --in-doubt resend sends them again)",
                len(settled),
            )
        if self.settings.in_doubt == "resend" and (resent := ledger.resend_in_doubt()):
            log.warning("%d recipient(s) in doubt are mailed again (--in-doubt resend)", resent)

    def _suppress_at_claim(self, ledger: SentLog) -> None:
        """Hand the suppression list to the claim, before any worker takes a message."""
        if self.suppressions is None:
            ledger.suppress_at_claim((), "")
        else:
            ledger.suppress_at_claim(self.suppressions, self.suppressions.reason)

    def _recipients(self) -> RecipientList:
        s = self.settings
        return RecipientList(
            read_rows(s.source, query=s.query, sheet=s.sheet),
            source=str(s.source),
            email_column=s.email_column,
        )

    def _sent_log(self, folder: Path, campaign: str, *, rebuild: bool = False) -> SentLog:
        return SentLog(folder / "sent-log.csv", campaign, rebuild=rebuild)

    def _loader(self, campaign: str, folder: Path, publish_all: bool) -> Loader:
        loader = Loader(
            self._recipients(),
            self._broker(campaign),
            folder,
            self._sent_log(folder, campaign),
            publish_all=publish_all,
            reconnect_for_s=self.settings.reconnect_for,
            suppressions=self.suppressions,
            limit=self.settings.limit,
        )
        loader.broker.connect()
        return loader

    def _relay_settings(self) -> RelaySettings:
        s = self.settings
        return RelaySettings(
            host=s.smtp_host,
            port=s.smtp_port,
            tls=s.smtp_tls,
            user=s.smtp_user,
            password=s.smtp_password,
            verify_tls=s.smtp_verify,
            timeout_s=s.smtp_timeout,
            max_per_session=s.max_per_connection,
        )

    def _broker(self, campaign: str) -> Broker:
        s = self.settings
        return Broker(
            s.amqp_url, campaign, retry_delays_s=s.retry_delays_s, heartbeat_s=s.amqp_heartbeat
        )

    def _worker_settings(
        self, campaign: str, sent_log: Path, parts: MessageParts, relay: RelaySettings
    ) -> WorkerSettings:
        s = self.settings
        return WorkerSettings(
            campaign=campaign,
            sent_log=sent_log,
            template_text=parts.template.text,
            template_name=parts.template.name,
            html_text=parts.html.text if parts.html else None,
            html_name=parts.html.name if parts.html else "",
            unsubscribe_url=s.unsubscribe_url,
            unsubscribe_mailto=s.unsubscribe_mailto,
            attachments=parts.attachments,
            relay=relay,
            amqp_url=s.amqp_url,
            retry_delays_s=s.retry_delays_s,
            max_attempts=s.max_attempts,
            prefetch=self.prefetch,
            verbosity=s.verbosity,
            heartbeat_s=s.amqp_heartbeat,
            reconnect_for_s=s.reconnect_for,
            limit=s.limit,
            rate_per_s=s.rate,
            rate_schedule=start_schedule(sent_log.parent / "rate.schedule") if s.rate else None,
        )

    # During the run.

    def _catch_signals(self) -> None:
        def interrupt(_signum: int, _frame: Any) -> None:
            self.interrupted = True

        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)

    def _watch(
        self, ledger: SentLog, loader: Loader, broker: Broker, pool: WorkerPool
    ) -> ExitCode:
        """Wait until every pending recipient is settled; keep workers and broker alive."""
        last_dead_letters = last_growth = time.monotonic()
        last_size = 0
        while True:
            try:
                broker.process(time_limit_s=TICK_S)
            except Unavailable as error:
                log.warning("%s; reconnecting", error)
                broker.reconnect(give_up_after_s=self.settings.reconnect_for)
            if self.interrupted:
                log.warning("interrupted: stopping the workers after their current message")
                return ExitCode.TEMPFAIL
            if loader.error is not None:
                raise loader.error
            code = pool.check(ledger)
            if code is not None:
                return code

            # Done first: read after the count, it could include a last batch the count missed.
            loaded = loader.counts.done
            if loaded and not ledger.remaining():
                broker.take_dead(partial(self.settle_dead_letter, ledger))
                return ExitCode.OK

            now = time.monotonic()
            size = ledger.path.stat().st_size
            if size != last_size:
                last_size, last_growth = size, now
            self.progress.tick(ledger, loader)
            if now - last_dead_letters >= DEAD_LETTERS_EVERY_S:
                last_dead_letters = now
                broker.take_dead(partial(self.settle_dead_letter, ledger))
            if loader.counts.done and now - last_growth >= self.lost_after_s:
                last_growth = now
                self._requeue_lost(ledger, broker)

    def settle_dead_letter(self, ledger: SentLog, body: bytes, reason: str) -> None:
        """Record a message the broker set aside as failed, unless it is settled already.

        One the broker took back unacked too often was never answered for: workers that
        stopped or reconnected held it (a run after run with the relay down, say). Its
        recipient stays unsettled, and goes out again with the others the queue lost.
        """
        recipient = recipient_of(body)
        if recipient is None:
            self.unreadable += 1
            log.error("the broker set aside a message that is no recipient's: %.200r", body)
            return
        if reason == "delivery_limit":
            if not ledger.is_final(recipient):
                log.warning(
                    "%s: its message came back unanswered too often; it goes again", recipient
                )
            return
        reply = "set aside: every worker that took this message failed on it"
        if ledger.settle([recipient], Outcome(Status.FAILED, None, reply)):
            log.error("%s: its message was set aside after repeated failures", recipient)

    def _requeue_lost(self, ledger: SentLog, broker: Broker) -> None:
        """Publish again the unsettled recipients the broker no longer holds."""
        if ledger.open_claims() or broker.depth() > 0:
            return
        lost = {compared_form(address): address for address in ledger.unsettled()}
        if not lost:
            return
        log.warning("%d recipient(s) are unsettled but not queued; queuing them again", len(lost))
        # The list may spell a recipient otherwise than the sent-log saw it first.
        found = [r for r in self._recipients() if compared_form(r.address) in lost]
        broker.publish(message_of(r) for r in found)
        gone = [lost[form] for form in lost.keys() - {compared_form(r.address) for r in found}]
        reason = "no longer in the list, and its queued message was lost"
        ledger.settle(gone, Outcome(Status.FAILED, None, reason))

    # After the run.

    def _summary(self, ledger: SentLog, loader: Loader, folder: Path, code: ExitCode) -> ExitCode:
        """Log the closing summary and tell the exit code it adds up to."""
        tally = Tally.of(ledger)
        self.progress.summary(tally, loader, folder, finished=code is ExitCode.OK)
        if code is not ExitCode.OK:
            return code
        if tally.waiting:  # never 0 while anyone of this run is still to be mailed
            return ExitCode.TEMPFAIL
        if tally.failed or tally.in_doubt or self.unreadable:
            return ExitCode.RECIPIENTS_NOT_SENT
        return ExitCode.OK
