"""The launcher, `python -m batch.run`: wires the pipeline together and watches it.

source -> recipients -> loader -> broker -> worker -> mailer -> sent-log
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from batch import config, worker
from batch.broker import Broker, describe
from batch.config import Settings
from batch.errors import AlreadyRunning, BatchError, ExitCode, UsageError
from batch.loader import Loader
from batch.logs import setup_logging
from batch.mailer import Mailer, RelaySettings
from batch.message import Template
from batch.recipients import RecipientList
from batch.sentlog import SentLog, Status
from batch.source import fingerprint, read_rows

log = logging.getLogger("batch")

EXIT_CODES = """\
exit codes:
  0   every recipient was sent
  1   the run finished, but some recipients failed or are in doubt (see the sent-log)
  2   usage, configuration, list or template error: nothing was sent
  3   another run of this campaign is active
  70  an unexpected error (a bug): rerun the same command to resume
  75  the broker or the relay could not be reached, or the run was interrupted:
      rerun the same command later to resume

examples:
  python -m batch.run --source list.csv --template welcome.txt --workers 8
  python -m batch.run --config config/massmail.toml --campaign nightly-2026-12-03
"""
TICK_S = 0.5
PROGRESS_EVERY_S = 5.0
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
    except BatchError as error:
        log.error("%s", error)
        if error.exit_code in (ExitCode.TEMPFAIL, ExitCode.SOFTWARE):
            log.error("nothing is lost: rerun the same command to resume")
        return error.exit_code


class Pending:
    """Recipients this run still waits for; filled by the loader, emptied by the sent-log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recipients: set[str] = set()

    def add(self, recipient: str) -> None:
        with self._lock:
            self._recipients.add(recipient)

    def prune(self, is_settled: Any) -> set[str]:
        """Forget the settled ones; return a copy of the rest."""
        with self._lock:
            self._recipients = {r for r in self._recipients if not is_settled(r)}
            return set(self._recipients)


class Launcher:
    """One run of one campaign."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.stop = multiprocessing.get_context("spawn").Event()
        self.interrupted = False
        self.workers: dict[int, Any] = {}
        self.restarts = 0
        self.pending = Pending()

    def run(self) -> ExitCode:
        """Check, load, send, watch, and sum up."""
        s = self.settings
        template = Template.from_file(s.template)
        self._check_columns(template)
        campaign = s.campaign or derive_campaign(s, template)
        folder = campaign_folder(s.state_dir, campaign)

        lock = FileLock(folder / "run.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise AlreadyRunning(
                f"campaign {campaign}: another run is active (it holds {folder / 'run.lock'})"
            ) from None
        try:
            return self._run_locked(campaign, folder, template)
        finally:
            lock.release()

    def _run_locked(self, campaign: str, folder: Path, template: Template) -> ExitCode:
        s = self.settings
        ledger = SentLog(folder / "sent-log.csv", campaign, resend_in_doubt=s.in_doubt == "resend")
        self._recover(ledger)
        relay = self._relay_settings()
        Mailer(relay).open()  # fail fast, before anything is queued

        broker = self._broker(campaign)
        broker.connect()
        publish_all = broker.depth() == 0
        loader = Loader(
            RecipientList(
                read_rows(s.source, query=s.query, sheet=s.sheet),
                source=str(s.source),
                email_column=s.email_column,
            ),
            self._broker(campaign),
            folder,
            is_settled=ledger.is_final,
            on_pending=self.pending.add,
            publish_all=publish_all,
        )
        loader.broker.connect()
        log.info(
            "campaign %s: list %s, %d workers, relay %s, broker %s, state %s",
            campaign, s.source, s.workers, relay.describe(), describe(s.amqp_url), folder,
        )  # fmt: skip

        settings = self._worker_settings(campaign, ledger.path, template, relay)
        for _ in range(s.workers):
            self._start_worker(settings)
        loader.start()
        self._catch_signals()
        try:
            code = self._watch(ledger, loader, broker, settings)
        finally:
            self._stop_workers(ledger)
            broker.close()
        return self._summary(ledger, loader, folder, code)

    # Before the run.

    def _check_columns(self, template: Template) -> None:
        """Refuse a template that uses a column the list lacks, before anything is sent."""
        s = self.settings
        first = next(iter(read_rows(s.source, query=s.query, sheet=s.sheet)), None)
        if first is not None:
            template.check_columns(set(first.fields), str(s.source))

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
        )

    def _broker(self, campaign: str) -> Broker:
        return Broker(
            self.settings.amqp_url, campaign, retry_delays_s=self.settings.retry_delays_s
        )

    def _worker_settings(
        self, campaign: str, sent_log: Path, template: Template, relay: RelaySettings
    ) -> worker.WorkerSettings:
        s = self.settings
        return worker.WorkerSettings(
            campaign=campaign,
            sent_log=sent_log,
            template_text=template.text,
            template_name=template.name,
            relay=relay,
            amqp_url=s.amqp_url,
            retry_delays_s=s.retry_delays_s,
            max_attempts=s.max_attempts,
            prefetch=s.prefetch,
            resend_in_doubt=s.in_doubt == "resend",
            launcher_pid=multiprocessing.current_process().pid,
            verbosity=s.verbosity,
        )

    # During the run.

    def _start_worker(self, settings: worker.WorkerSettings) -> None:
        context = multiprocessing.get_context("spawn")
        number = len(self.workers) + self.restarts + 1
        process = context.Process(
            target=worker.main, args=(settings, self.stop), name=f"worker-{number}"
        )
        process.start()
        self.workers[process.pid] = process

    def _catch_signals(self) -> None:
        def interrupt(signum: int, _frame: Any) -> None:
            self.interrupted = True

        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)

    def _watch(
        self, ledger: SentLog, loader: Loader, broker: Broker, settings: worker.WorkerSettings
    ) -> ExitCode:
        """Wait until every pending recipient is settled, keeping the workers alive."""
        last_report = last_growth = time.monotonic()
        last_size = 0
        while True:
            broker.process(time_limit_s=TICK_S)
            ledger.refresh()
            if self.interrupted:
                log.warning("interrupted: stopping the workers after their current message")
                return ExitCode.TEMPFAIL
            if loader.error is not None:
                raise loader.error
            code = self._check_workers(ledger, settings)
            if code is not None:
                return code

            pending = self.pending.prune(ledger.is_final)
            if loader.counts.done and not pending:
                return ExitCode.OK

            now = time.monotonic()
            size = ledger.path.stat().st_size
            if size != last_size:
                last_size, last_growth = size, now
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                self._progress(ledger, loader, len(pending))
                self._settle_dead_letters(ledger, broker)
            if loader.counts.done and now - last_growth >= LOST_AFTER_S:
                last_growth = now
                self._requeue_lost(ledger, broker, pending)

    def _check_workers(self, ledger: SentLog, settings: worker.WorkerSettings) -> ExitCode | None:
        """Replace a worker that died; stop the run if one gave up on broker or relay."""
        for pid, process in list(self.workers.items()):
            if process.exitcode is None:
                continue
            del self.workers[pid]
            if process.exitcode == ExitCode.TEMPFAIL:
                return ExitCode.TEMPFAIL
            in_doubt = ledger.settle_open_claims(
                f"worker {pid} stopped before the relay's answer was recorded",
                worker=f"{socket.gethostname()}:{pid}",
            )
            log.critical(
                "%s (pid %d) stopped with code %s; %d recipient(s) it held are in doubt",
                process.name, pid, process.exitcode, len(in_doubt),
            )  # fmt: skip
            if process.exitcode == ExitCode.USAGE:
                return ExitCode.USAGE
            if self.restarts >= 3 * self.settings.workers:
                log.error("workers keep stopping; giving up")
                return ExitCode.SOFTWARE
            self.restarts += 1
            self._start_worker(settings)
        return None

    def _progress(self, ledger: SentLog, loader: Loader, pending: int) -> None:
        counts = ledger.counts()
        elapsed = time.monotonic() - self.started
        log.info(
            "%d read, %d queued, %d sent, %d failed, %d in doubt, %d waiting (%.0f/s)",
            loader.counts.rows,
            loader.counts.published,
            counts[Status.SENT],
            counts[Status.FAILED],
            counts[Status.IN_DOUBT],
            pending,
            counts[Status.SENT] / elapsed if elapsed else 0.0,
        )

    def _settle_dead_letters(self, ledger: SentLog, broker: Broker) -> None:
        """Put messages the broker dead-lettered back, unless they are settled already."""
        dead = [body for body in broker.take_dead() if not ledger.is_final(body["recipient"])]
        if dead:
            log.warning(
                "%d message(s) came back from the dead-letter queue; queued again", len(dead)
            )
            broker.publish(dead)

    def _requeue_lost(self, ledger: SentLog, broker: Broker, pending: set[str]) -> None:
        """Publish again the unsettled recipients the broker no longer holds."""
        if not pending or ledger.open_claims or broker.depth() > 0:
            return
        log.warning(
            "%d recipient(s) are unsettled but not queued; queuing them again", len(pending)
        )
        s = self.settings
        recipients = RecipientList(
            read_rows(s.source, query=s.query, sheet=s.sheet),
            source=str(s.source),
            email_column=s.email_column,
        )
        broker.publish(
            {"recipient": r.address, "row": r.row, "fields": r.fields}
            for r in recipients
            if r.address in pending
        )

    # After the run.

    def _stop_workers(self, ledger: SentLog) -> None:
        """Ask every worker to finish its message and leave; settle what a killed one held."""
        self.stop.set()
        deadline = time.monotonic() + self.settings.smtp_timeout + 30
        for pid, process in self.workers.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("%s (pid %d) does not stop; killing it", process.name, pid)
                process.kill()
                process.join()
                ledger.settle_open_claims(
                    f"worker {pid} was killed before the relay's answer was recorded",
                    worker=f"{socket.gethostname()}:{pid}",
                )

    def _summary(self, ledger: SentLog, loader: Loader, folder: Path, code: ExitCode) -> ExitCode:
        ledger.refresh()
        counts = ledger.counts()
        elapsed = time.monotonic() - self.started
        log.info(
            "done in %.1f s: %d sent, %d failed, %d in doubt, %d waiting; %d rows refused "
            "(see %s); sent-log: %s",
            elapsed,
            counts[Status.SENT],
            counts[Status.FAILED],
            counts[Status.IN_DOUBT],
            counts[Status.DEFERRED] + counts[Status.CLAIMED],
            loader.counts.rejected,
            folder / "rejected.csv",
            ledger.path,
        )
        if code is not ExitCode.OK:
            return code
        if counts[Status.FAILED] or counts[Status.IN_DOUBT]:
            return ExitCode.RECIPIENTS_NOT_SENT
        return ExitCode.OK


def derive_campaign(settings: Settings, template: Template) -> str:
    """Name a campaign after its list and template, so the same command resumes it."""
    digest = hashlib.sha256()
    digest.update(
        fingerprint(settings.source, query=settings.query, sheet=settings.sheet).encode()
    )
    digest.update(template.text.encode())
    digest.update(settings.email_column.lower().encode())
    return f"auto-{digest.hexdigest()[:16]}"


def campaign_folder(state_dir: Path, campaign: str) -> Path:
    """Create the campaign's folder, readable by owner and group only."""
    folder = state_dir / campaign
    try:
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{folder}: cannot create the campaign folder: {error}") from None
    return folder


if __name__ == "__main__":
    sys.exit(main())
