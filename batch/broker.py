"""The broker: the campaign's durable queues on RabbitMQ. The only module that imports pika.

Queues of a campaign `C`, all quorum queues (replicated, fsync'd by the broker):
- `massmail.C`: one message per recipient still to mail. A message the workers took
  `delivery_limit` times without settling it goes to `massmail.C.dead`.
- `massmail.C.retry.<ms>`: one per retry delay; a recipient refused for now (4xx) waits
  there `<ms>` milliseconds and is then dead-lettered back into `massmail.C`.

Publishing is in AMQP transactions of many messages: `tx.commit` returns only when the
broker has taken responsibility for every message of the batch.

A `Broker` belongs to the thread that opened it. Another thread may only hand it work
through `call_soon()`; acks carry the connection's generation, so an ack meant for a
connection that was lost is dropped instead of acking a stranger on the new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions

from batch.errors import Unavailable

log = logging.getLogger(__name__)

PERSISTENT = 2
CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to this worker, still to be acked."""

    tag: int
    generation: int
    body: bytes  # as published; `decode()` reads it
    attempt: int  # 1 on the first try; grows with every 4xx retry


def describe(url: str) -> str:
    """Show a broker URL without its password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Broker:
    """One connection to RabbitMQ for one campaign's queues."""

    def __init__(
        self,
        url: str,
        campaign: str,
        *,
        retry_delays_s: tuple[float, ...] = (),
        delivery_limit: int = 20,
        heartbeat_s: int = 30,
    ) -> None:
        self.url = url
        self.heartbeat_s = heartbeat_s
        self.queue = f"massmail.{campaign}"
        self.dead_queue = f"{self.queue}.dead"
        self.retry_queues = [f"{self.queue}.retry.{round(s * 1000)}" for s in retry_delays_s]
        self.delivery_limit = delivery_limit
        self.generation = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    # Connecting.

    def connect(self) -> None:
        """Open the connection and a channel, and declare the campaign's queues."""
        params = pika.URLParameters(self.url)
        params.heartbeat = self.heartbeat_s
        params.blocked_connection_timeout = 300
        params.connection_attempts = 1
        try:
            self._connection = pika.BlockingConnection(params)
            self._channel = self._connection.channel()
            self._declare()
        except CONNECTION_ERRORS as error:
            self.close()
            raise Unavailable(f"broker {describe(self.url)}: {_reason(error)}") from None
        self.generation += 1

    def reconnect(self, *, give_up_after_s: float) -> None:
        """Reconnect with growing pauses; raise Unavailable once the time is spent."""
        self.close()
        deadline = time.monotonic() + give_up_after_s
        pause = 0.5
        while True:
            try:
                self.connect()
                return
            except Unavailable as error:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("%s; trying again in %.1f s", error, pause)
                time.sleep(pause)
                pause = min(pause * 2, 10)

    def close(self) -> None:
        """Close the connection if it is open; unacked deliveries go back to the queue."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(CONNECTION_ERRORS):
                connection.close()

    def _declare(self) -> None:
        """Declare the queues; the same arguments every time, or the broker refuses."""
        declare = self._channel.queue_declare
        declare(self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"})
        declare(
            self.queue,
            durable=True,
            arguments=_dead_lettering(self.dead_queue, {"x-delivery-limit": self.delivery_limit}),
        )
        for queue in self.retry_queues:
            delay_ms = int(queue.rpartition(".")[2])
            declare(
                queue,
                durable=True,
                arguments=_dead_lettering(self.queue, {"x-message-ttl": delay_ms}),
            )

    # Loading.

    def publish(self, bodies: Iterable[dict[str, Any]]) -> int:
        """Publish messages in one transaction; return how many the broker now holds."""
        channel = self._channel
        count = 0
        try:
            channel.tx_select()
            for body in bodies:
                channel.basic_publish(
                    "",
                    self.queue,
                    encode(body),
                    pika.BasicProperties(delivery_mode=PERSISTENT),
                )
                count += 1
            channel.tx_commit()
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"broker {describe(self.url)}: {_reason(error)}") from None
        return count

    def depth(self) -> int:
        """Count the messages waiting in the campaign's queue and its retry queues."""
        total = 0
        try:
            for queue in [self.queue, *self.retry_queues]:
                declared = self._channel.queue_declare(queue, passive=True)
                total += declared.method.message_count
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"broker {describe(self.url)}: {_reason(error)}") from None
        return total

    def take_dead(self, handle: Callable[[bytes, str], None]) -> None:
        """Hand every dead-lettered message to `handle` with the broker's reason for it.

        The reason is "rejected" for a message a worker set aside, and "delivery_limit"
        for one that came back unacked too often (workers that stopped or reconnected
        while holding it). Each message is acked once `handle` returns.
        """
        try:
            while True:
                method, properties, body = self._channel.basic_get(self.dead_queue)
                if method is None:
                    return
                handle(body, self._death_reason(properties))
                self._channel.basic_ack(method.delivery_tag)
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"broker {describe(self.url)}: {_reason(error)}") from None

    def _death_reason(self, properties: Any) -> str:
        """Find why the campaign's queue dead-lettered a message, from its x-death header."""
        for death in (properties.headers or {}).get("x-death", []):
            if _text(death.get("queue")) == self.queue:
                return _text(death.get("reason"))
        return ""

    def delete_queues(self) -> None:
        """Delete the campaign's queues (for tests and finished campaigns)."""
        for queue in [self.queue, self.dead_queue, *self.retry_queues]:
            self._channel.queue_delete(queue)

    # Consuming: these run on the thread that opened the connection.

    def consume(self, prefetch: int, on_delivery: Callable[[Delivery], None]) -> None:
        """Start handing deliveries to `on_delivery`, at most `prefetch` unacked."""
        generation = self.generation

        def on_message(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
            headers = properties.headers or {}
            on_delivery(
                Delivery(
                    tag=method.delivery_tag,
                    generation=generation,
                    body=body,
                    attempt=int(headers.get("x-massmail-attempt", 1)),
                )
            )

        self._channel.confirm_delivery()  # for retries, published one at a time
        self._channel.basic_qos(prefetch_count=prefetch)
        self._channel.basic_consume(self.queue, on_message)

    def process(self, time_limit_s: float) -> None:
        """Run pika's I/O loop for a while: deliveries, heartbeats, queued callbacks."""
        try:
            self._connection.process_data_events(time_limit=time_limit_s)
        except CONNECTION_ERRORS as error:
            raise Unavailable(f"broker {describe(self.url)}: {_reason(error)}") from None

    def ack(self, generation: int, tag: int, *, multiple: bool = False) -> None:
        """Ack one delivery (or all up to it), unless its connection is gone."""
        if generation == self.generation and self._channel is not None:
            self._channel.basic_ack(tag, multiple=multiple)

    def set_aside(self, generation: int, tag: int) -> None:
        """Send a delivery nobody can handle to the dead-letter queue."""
        if generation == self.generation and self._channel is not None:
            self._channel.basic_reject(tag, requeue=False)

    def retry_later(self, delivery: Delivery) -> None:
        """Put a recipient back after the delay of its attempt, then ack the delivery."""
        if delivery.generation != self.generation:
            return
        level = min(delivery.attempt, len(self.retry_queues)) - 1
        self._channel.basic_publish(
            "",
            self.retry_queues[level],
            delivery.body,
            pika.BasicProperties(
                delivery_mode=PERSISTENT, headers={"x-massmail-attempt": delivery.attempt + 1}
            ),
        )
        self.ack(delivery.generation, delivery.tag)

    # For other threads.

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Queue a callback for the connection's thread; False if the connection is gone."""
        connection = self._connection
        if connection is None:
            return False
        try:
            connection.add_callback_threadsafe(callback)
        except CONNECTION_ERRORS:
            return False
        return True


def encode(body: dict[str, Any]) -> bytes:
    """Serialise a recipient's message for the queue."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode(body: bytes) -> dict[str, Any]:
    """Read a recipient's message; raise ValueError if it is not one."""
    content = json.loads(body)
    if not isinstance(content, dict) or not isinstance(content.get("recipient"), str):
        raise ValueError("not a recipient message")
    if not isinstance(content.get("fields"), dict):
        raise ValueError("a recipient message without fields")
    return content


def recipient_of(body: bytes) -> str | None:
    """Find the recipient a message was meant for, even if the rest of it is broken."""
    try:
        content = json.loads(body)
    except ValueError:
        return None
    recipient = content.get("recipient") if isinstance(content, dict) else None
    return recipient if isinstance(recipient, str) else None


def _dead_lettering(target: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments of a quorum queue whose dead messages go to `target`, never dropped."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": target,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        **arguments,
    }


def _reason(error: BaseException) -> str:
    """Say why a broker operation failed in a few words."""
    text = str(error) or repr(error)
    if isinstance(error, pika.exceptions.AMQPConnectionError) and not str(error):
        text = "cannot connect"
    return text


def _text(value: Any) -> str:
    """Read an AMQP header value as text; pika gives long strings as bytes or str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")
