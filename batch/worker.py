"""A worker process: takes recipients from the broker and mails each one exactly once.

For every delivery the order is the promise itself:

1. claim the recipient in the sent-log (fsync'd) - or ack and drop it if it is claimed
   or settled already, whatever the broker says about redelivery;
2. send it through the relay;
3. record the outcome in the sent-log at once;
4. ack the delivery only after that outcome is fsync'd.

The process's main thread owns the pika connection and does nothing else, so heartbeats
flow while the relay thinks. A sender thread holds the SMTP session and the sent-log, and
hands acks back through `Broker.call_soon()`. Outcomes of consecutive deliveries share
one fsync when more deliveries are waiting (group commit); a kill -9 still leaves at most
the one recipient whose DATA was in flight without an outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from batch.broker import Broker, Delivery, decode
from batch.errors import BatchError, ExitCode, TemplateError, Unavailable, UsageError
from batch.ledger import Ledger, Outcome, Status
from batch.logs import setup_logging
from batch.mailer import Attempt, Mailer, RelaySettings, Result
from batch.message import Composer, HtmlTemplate, MessageParts, Template
from batch.mime import Attachment
from batch.sentlog import SentLog
from batch.throttle import Throttle
from batch.unsubscribe import Unsubscribe

log = logging.getLogger(__name__)

STOP = object()
# A paced worker acks what it holds before a wait this long; shorter waits keep the outcomes
# for the next group commit, which a flush before each message would defeat.
FLUSH_BEFORE_WAIT_S = 1.0


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs, as plain values; it opens its own connections."""

    campaign: str
    sent_log: Path
    template_text: str
    template_name: str
    html_text: str | None  # the HTML template, if any
    html_name: str
    unsubscribe_url: str | None
    unsubscribe_mailto: str | None
    attachments: tuple[Attachment, ...]  # read and encoded once, by the launcher
    relay: RelaySettings
    amqp_url: str
    retry_delays_s: tuple[float, ...]
    max_attempts: int
    prefetch: int
    verbosity: int
    heartbeat_s: int
    reconnect_for_s: float  # how long to keep trying a lost broker or relay
    limit: int | None = None  # mail only the list's first N recipients
    rate_per_s: float | None = None  # all workers together, through the schedule file
    rate_schedule: Path | None = None


def main(settings: WorkerSettings, stop: Any, lifeline: Any) -> None:
    """Run one worker until `stop` is set or `lifeline` closes; exit with an ExitCode."""
    setup_logging(settings.verbosity)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        code = Worker(settings, stop, lifeline).run()
    except BatchError as error:
        log.error("%s", error)
        code = error.exit_code
    os._exit(int(code))


class Worker:
    """One broker connection, one relay session, one sender thread."""

    def __init__(self, settings: WorkerSettings, stop: Any, lifeline: Any) -> None:
        self.settings = settings
        self.stop = stop
        self.lifeline = lifeline
        self.throttle = None
        if settings.rate_per_s and settings.rate_schedule:
            self.throttle = Throttle(settings.rate_schedule, settings.rate_per_s)
        self.leaving = threading.Event()  # set once the main thread stops consuming
        self.exit_code = ExitCode.OK
        self.giving_up = False  # the broker stayed away longer than reconnect_for_s
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.done: list[Delivery] = []
        self.sending: tuple[str, str, bool] | None = None  # recipient, Message-ID, mailer called
        self.ledger: Ledger = SentLog(Path(settings.sent_log), settings.campaign)
        self.composer = _composer(settings)
        self.mailer = Mailer(settings.relay)
        self.broker = Broker(
            settings.amqp_url,
            settings.campaign,
            retry_delays_s=settings.retry_delays_s,
            heartbeat_s=settings.heartbeat_s,
        )

    def run(self) -> ExitCode:
        """Consume until told to stop, then finish the delivery in hand and leave."""
        self.broker.connect()
        sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)
        sender.start()
        self.broker.consume(self.settings.prefetch, self.inbox.put)

        while not self._should_stop(sender):
            try:
                self.broker.process(time_limit_s=0.5)
            except Unavailable as error:
                log.warning("%s; reconnecting", error)
                self._reconnect_broker()

        # Deliveries not begun go back to the queue when the connection closes.
        log.debug("stopping: finishing the message in hand; the others go back to the queue")
        self.leaving.set()
        with self.inbox.mutex:
            self.inbox.queue.clear()
        self.inbox.put(STOP)
        sender.join()
        self._drain_callbacks()
        self.broker.close()
        self.mailer.close()
        self.ledger.close()
        if self.throttle is not None:
            self.throttle.close()
        return self.exit_code

    def _should_stop(self, sender: threading.Thread) -> bool:
        if self.stop.is_set() or self.giving_up or not sender.is_alive():
            return True
        if self.lifeline.poll():
            log.warning("the launcher is gone; stopping")
            return True
        return False

    def _reconnect_broker(self) -> None:
        """Reconnect; deliveries of the old connection come back by themselves."""
        try:
            self.broker.reconnect(give_up_after_s=self.settings.reconnect_for_s)
        except Unavailable as error:
            log.error("%s; giving up", error)
            self.exit_code = ExitCode.TEMPFAIL
            self.giving_up = True
            return
        self.broker.consume(self.settings.prefetch, self.inbox.put)

    def _drain_callbacks(self) -> None:
        """Let queued acks reach the broker before the connection closes."""
        with contextlib.suppress(Unavailable):
            self.broker.process(time_limit_s=0)

    # The sender thread.

    def _send_loop(self) -> None:
        try:
            while (delivery := self.inbox.get()) is not STOP:
                # Once leaving, a delivery not begun goes back to the queue, even one that
                # slipped in before the inbox was emptied.
                if delivery.generation == self.broker.generation and not self.leaving.is_set():
                    self._guarded(delivery)
                if self.inbox.empty():
                    self._flush()
            self._flush()
        except Unavailable as error:
            log.error("%s; stopping this worker", error)
            self._flush()
            self.exit_code = ExitCode.TEMPFAIL
        except Exception:
            log.critical("the sender thread failed", exc_info=True)
            self.exit_code = ExitCode.SOFTWARE

    def _guarded(self, delivery: Delivery) -> None:
        """Handle one delivery; a message that breaks its handling must not stop the rest."""
        self.sending = None
        try:
            content = decode(delivery.body)
        except ValueError as error:
            log.error("a message is no recipient's (%s); setting it aside", error)
            self._set_aside(delivery)
            return
        try:
            self._handle(delivery, content)
        except (Unavailable, OSError):
            raise
        except Exception as error:
            log.error("cannot handle a message: %r", error, exc_info=True)
            if self.sending is None:
                self._set_aside(delivery)
                return
            # Claimed: whether the final "." went out decides between failed and in doubt.
            recipient, message_id, mailer_called = self.sending
            in_doubt = mailer_called and self.mailer.past_data_end
            status = Status.IN_DOUBT if in_doubt else Status.FAILED
            reply = f"the worker could not handle this message: {error!r}"
            self.ledger.record(recipient, message_id, Outcome(status, None, reply))
            self.done.append(delivery)

    def _set_aside(self, delivery: Delivery) -> None:
        """Send a delivery to the dead-letter queue, where the launcher reports it."""
        self._flush()
        self.broker.call_soon(partial(self.broker.set_aside, delivery.generation, delivery.tag))

    def _handle(self, delivery: Delivery, content: dict[str, Any]) -> None:
        """Claim, send, record; the ack follows once the outcome is durable."""
        if self._past_limit(content):
            # Queued by an earlier run without the limit; a later run queues it again.
            log.debug("%s is past --limit; dropping its message", content["recipient"])
            self.done.append(delivery)
            return
        if not self._await_slot():
            return  # leaving: the delivery goes back to the queue unacked
        recipient = content["recipient"]
        message_id = self.composer.message_id(recipient)
        if not self.ledger.claim(recipient, message_id):
            log.debug("%s is claimed, settled or suppressed; dropping its message", recipient)
            self.done.append(delivery)
            return
        self.sending = (recipient, message_id, False)

        try:
            letter = self.composer.compose(recipient, content["fields"], message_id)
        except TemplateError as error:
            self.ledger.record(recipient, message_id, Outcome(Status.FAILED, None, str(error)))
            self.done.append(delivery)
            return

        self.sending = (recipient, message_id, True)
        attempt = self._send(letter.sender, recipient, letter.data)
        outcome = self._outcome(attempt, delivery)
        self.ledger.record(recipient, message_id, outcome)
        if attempt.result is Result.NOT_REACHED:
            # The delivery stays unacked and goes back to the queue when this worker stops.
            if self.leaving.is_set():
                return
            raise Unavailable(attempt.reply)
        if outcome.status is Status.DEFERRED:
            self._flush()
            self.broker.call_soon(partial(self.broker.retry_later, delivery))
        else:
            self.done.append(delivery)

    def _past_limit(self, content: dict[str, Any]) -> bool:
        """Tell whether the recipient's place in the list is beyond this run's limit."""
        limit = self.settings.limit
        return limit is not None and int(content.get("position", 0)) > limit

    def _await_slot(self) -> bool:
        """Wait for the run's rate limit to allow one more message; False if leaving."""
        if self.throttle is None:
            return True
        wait_s = self.throttle.reserve()
        if wait_s <= 0:
            return True
        if wait_s >= FLUSH_BEFORE_WAIT_S:
            self._flush()  # ack what is settled rather than hold it through a long wait
        return not self.leaving.wait(wait_s)

    def _send(self, sender: str, recipient: str, data: bytes) -> Attempt:
        """Send, reopening the session as long as the relay was not reached."""
        deadline = time.monotonic() + self.settings.reconnect_for_s
        pause = 0.5
        while True:
            try:
                attempt = self.mailer.send(sender, recipient, data)
            except Unavailable as error:  # an outage, or a login refused for now (4xx)
                attempt = Attempt(Result.NOT_REACHED, None, str(error))
            except UsageError as error:
                # A login or certificate refused for good, though the launcher's was taken:
                # the password or the certificate changed mid-run. Nothing was sent, and
                # each retry would be one more failed login, which relays lock accounts for.
                return Attempt(Result.NOT_REACHED, None, str(error))
            if attempt.result is not Result.NOT_REACHED:
                return attempt
            if time.monotonic() + pause > deadline:
                return attempt
            # Nothing reached the relay, so the same claim may carry a second try, unless
            # the worker is told to stop: the launcher would not wait out the retries.
            log.warning("%s; trying again in %.1f s", attempt.reply, pause)
            if self.leaving.wait(pause):
                return attempt
            pause = min(pause * 2, 10)

    def _outcome(self, attempt: Attempt, delivery: Delivery) -> Outcome:
        """Turn the relay's answer into what the sent-log records."""
        match attempt.result:
            case Result.ACCEPTED:
                return Outcome(Status.SENT, attempt.code, attempt.reply)
            case Result.REFUSED_FOR_GOOD:
                return Outcome(Status.FAILED, attempt.code, attempt.reply)
            case Result.IN_DOUBT:
                return Outcome(Status.IN_DOUBT, attempt.code, attempt.reply)
            case Result.NOT_REACHED:
                return Outcome(Status.DEFERRED, None, f"not sent: {attempt.reply}")
        if delivery.attempt >= self.settings.max_attempts:
            reply = f"gave up after {delivery.attempt} attempts: {attempt.reply}"
            return Outcome(Status.FAILED, attempt.code, reply)
        return Outcome(Status.DEFERRED, attempt.code, attempt.reply)

    def _flush(self) -> None:
        """Fsync the outcomes written so far, then ack their deliveries in one go."""
        self.ledger.sync()
        if not self.done:
            return
        last = self.done[-1]
        self.done.clear()
        self.broker.call_soon(partial(self.broker.ack, last.generation, last.tag, multiple=True))


def _composer(settings: WorkerSettings) -> Composer:
    """Compile the campaign's message from its settings."""
    html = None
    if settings.html_text is not None:
        html = HtmlTemplate(settings.html_text, name=settings.html_name)
    parts = MessageParts(
        Template(settings.template_text, name=settings.template_name),
        html,
        Unsubscribe.of(settings.unsubscribe_url, settings.unsubscribe_mailto),
        settings.attachments,
    )
    return parts.composer(settings.campaign)
