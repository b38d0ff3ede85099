"""A recording SMTP relay on aiosmtpd, for the tests and the demo.

In a test::

    with RecordingRelay() as relay:
        ...send to relay.host, relay.port...
        assert relay.received_by("ann@example.com") == 1

From a shell, appending every accepted message to an mbox file::

    python tests/relay.py --port 2525 --mbox demo-state/relay.mbox
"""

from __future__ import annotations

import argparse
import mailbox
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class Accepted:
    """One message the relay accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    message_id: str | None


# A reply such as (550, "5.1.1 no such user") or (451, "4.3.0 try again later").
Reply = tuple[int, str]

# Decides, per accepted message, whether to drop the connection instead of answering DATA.
DropRule = bool | Callable[[Accepted], bool]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on host that nothing listens on right now."""
    # aiosmtpd's Controller cannot take port 0, so ask the kernel for one and release it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class RecordingRelay:
    """Accept every message on host:port and record it; refuse or drop on request.

    refuse maps a recipient address (any case) to the reply its RCPT gets instead of 250.
    drop_after_data, when true (or when it returns true for a message), records the
    message and then closes the connection without answering the final ".": the client
    cannot know whether the relay took the message. Both may be changed while running.
    on_accept, if given, is called with each Accepted on the relay's event-loop thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        refuse: dict[str, Reply] | None = None,
        drop_after_data: DropRule = False,
        on_accept: Callable[[Accepted], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.refuse: dict[str, Reply] = dict(refuse or {})
        self.drop_after_data: DropRule = drop_after_data
        self.on_accept = on_accept

        self._lock = threading.Lock()
        self._messages: list[Accepted] = []
        self._per_address: Counter[str] = Counter()
        self._controller: Controller | None = None

    def start(self) -> RecordingRelay:
        """Start listening; return once the relay answers."""
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> RecordingRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def messages(self) -> list[Accepted]:
        """Return a copy of the accepted messages, oldest first."""
        with self._lock:
            return list(self._messages)

    def received_by(self, address: str) -> int:
        """Return how many accepted messages had address among their recipients."""
        with self._lock:
            return self._per_address[address.lower()]

    def count(self) -> int:
        """Return how many messages were accepted."""
        with self._lock:
            return len(self._messages)

    def _refusal(self, address: str) -> Reply | None:
        wanted = address.lower()
        for refused, reply in list(self.refuse.items()):
            if refused.lower() == wanted:
                return reply
        return None

    def _record(self, message: Accepted) -> None:
        with self._lock:
            self._messages.append(message)
            self._per_address.update(address.lower() for address in message.rcpt_tos)
        if self.on_accept is not None:
            self.on_accept(message)

    def _should_drop(self, message: Accepted) -> bool:
        rule = self.drop_after_data
        return rule(message) if callable(rule) else bool(rule)


class _Handler:
    """The aiosmtpd hooks; they run on the controller's event-loop thread."""

    def __init__(self, relay: RecordingRelay) -> None:
        self.relay = relay

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        reply = self.relay._refusal(address)
        if reply is not None:
            code, text = reply
            return f"{code} {text}"

        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        content = envelope.original_content or b""
        message_id = BytesHeaderParser().parsebytes(content).get("Message-ID")
        accepted = Accepted(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            message_id=message_id.strip() if message_id else None,
        )
        self.relay._record(accepted)

        # The relay has the message, but the client never hears so: its in-doubt window.
        if self.relay._should_drop(accepted):
            server.transport.close()
        return "250 OK: queued"


def _serve_until_signalled(relay: RecordingRelay) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    with relay:
        print(f"relay listening on {relay.host}:{relay.port}", flush=True)
        stop.wait()
    print(f"relay stopped after {relay.count()} messages", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run a relay in the foreground that appends what it accepts to an mbox file."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--mbox", required=True, help="mbox file to append messages to")
    args = parser.parse_args(argv)

    box = mailbox.mbox(args.mbox)

    def append(message: Accepted) -> None:
        entry = mailbox.mboxMessage(message.content)
        entry.set_from(message.mail_from or "MAILER-DAEMON", True)
        box.add(entry)
        box.flush()
        recipients = ", ".join(message.rcpt_tos)
        print(f"accepted {message.message_id or '(no Message-ID)'} for {recipients}", flush=True)

    try:
        _serve_until_signalled(RecordingRelay(args.host, args.port, on_accept=append))
    finally:
        box.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
