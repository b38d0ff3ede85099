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
import asyncio
import contextlib
import itertools
import mailbox
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult


@dataclass(frozen=True)
class Accepted:
    """One message the relay accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    message_id: str | None
    received_at: float = 0.0  # time.monotonic() when its DATA ended
    connection: int = 0  # which SMTP connection carried it, numbered from 1


# A reply such as (550, "5.1.1 no such user") or (451, "4.3.0 try again later").
Reply = tuple[int, str]

# Decides, per accepted message, whether to drop the connection instead of answering DATA.
DropRule = bool | Callable[[Accepted], bool]

# Seconds to wait before answering DATA, for every message or per accepted message.
DelayRule = float | Callable[[Accepted], float]


class Hold:
    """DATA answers held back from a given message on, until the test lets them go."""

    def __init__(self, after: int) -> None:
        self.after = after  # the first `after` messages are answered as usual
        self.holding = threading.Event()  # set once a message waits for its answer
        self.released = threading.Event()

    def release(self) -> None:
        """Answer the held messages, and every later one, as usual."""
        self.released.set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on host that nothing listens on right now."""
    # aiosmtpd's Controller cannot take port 0, so ask the kernel for one and release it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class RecordingRelay:
    """Accept every message on host:port and record it; refuse, drop or stall on request.

    refuse maps a recipient address (any case) to the reply its RCPT gets instead of 250.
    refuse_next maps an address to a list of replies its next RCPTs get, one each, before
    it is treated as usual: [(451, "busy")] * 2 refuses twice, then accepts.
    drop_after_data, when true (or when it returns true for a message), records the
    message and then closes the connection without answering the final ".": the client
    cannot know whether the relay took the message. data_delay_s (seconds, or a function
    of the message) records the message, then waits that long before answering the final
    ".". closing, when true, has every MAIL's RCPT answered by closing the connection: a
    relay going down, whose clients learn before sending a message that it has nothing.
    close_next, when above 0, does the same to that many RCPTs, counting down, and the
    relay then serves again: an outage that ends once its clients have knocked N times.
    data_answer, if set, is the line the relay answers the final "." with instead of 250,
    say one without a reply code; mail_answer likewise replaces MAIL's "250 OK", though the
    sender is taken. All of these may be changed while running.
    held_after(n) holds the answers to DATA from the (n+1)th message on, until the test
    releases them.
    on_accept, if given, is called with each Accepted on the relay's event-loop thread;
    it must not call stop() (stop waits for that thread).

    stop() and start() may alternate on the same port: the record is kept across them.

    Like a real relay, it can also be stricter: smtputf8 announces SMTPUTF8 (RFC 6531);
    pipelining announces PIPELINING (RFC 2920), so the client sends MAIL, RCPT and DATA at once;
    login=(user, password) refuses mail until AUTH with exactly these (over plain text, for
    the tests; changing `login` while running refuses the next logins, with login_refusal
    as the reply if set); tls_context offers
    STARTTLS with that server context, ssl_context speaks TLS from the first byte.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        refuse: dict[str, Reply] | None = None,
        refuse_next: dict[str, list[Reply]] | None = None,
        drop_after_data: DropRule = False,
        data_delay_s: DelayRule = 0.0,
        on_accept: Callable[[Accepted], None] | None = None,
        smtputf8: bool = False,
        pipelining: bool = False,
        login: tuple[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.refuse: dict[str, Reply] = dict(refuse or {})
        self.refuse_next: dict[str, list[Reply]] = {
            address: list(replies) for address, replies in (refuse_next or {}).items()
        }
        self.drop_after_data: DropRule = drop_after_data
        self.data_delay_s: DelayRule = data_delay_s
        self.data_answer: str | None = None
        self.mail_answer: str | None = None
        self.pipelining = pipelining
        self.on_accept = on_accept
        self.login = login
        self._ssl_context = ssl_context
        self._smtp_options: dict[str, object] = {"enable_SMTPUTF8": smtputf8}
        if tls_context is not None:
            self._smtp_options["tls_context"] = tls_context
        if login is not None:
            self._smtp_options.update(
                auth_required=True, auth_require_tls=False, authenticator=_Authenticator(self)
            )

        self._lock = threading.Lock()
        self._messages: list[Accepted] = []
        self._per_address: Counter[str] = Counter()
        self._rcpts: Counter[str] = Counter()
        self.closing = False
        self.close_next = 0
        self.closed_rcpts = 0  # RCPTs answered by closing the connection
        self.refused_logins = 0  # AUTH commands refused (a client may try two a login)
        self.login_refusal: str | None = None  # the reply to a refused AUTH; None: 535
        self._holds: list[Hold] = []
        self._controller: _Controller | None = None

    def start(self) -> RecordingRelay:
        """Start listening; return once the relay answers."""
        self.closing = False
        self._controller = _Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            ssl_context=self._ssl_context,
            **self._smtp_options,
        )
        self._controller.start()
        return self

    def stop(self, *, graceful: bool = False, timeout_s: float = 60.0) -> None:
        """Stop listening and close open connections.

        graceful sets `closing` and lets every transaction that got past RCPT finish with
        its answer first, so that no client is left in doubt. It waits at most timeout_s
        seconds for that.
        """
        controller, self._controller = self._controller, None
        if controller is None:
            return
        for hold in list(self._holds):  # a test that fails while holding must not hang
            hold.release()
        if graceful:
            self.closing = True
            deadline = time.monotonic() + timeout_s
            while controller.on_loop(controller.busy_connections()) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
        controller.on_loop(controller.close_connections())
        controller.stop()

    def __enter__(self) -> RecordingRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def held_after(self, count: int) -> Iterator[Hold]:
        """Answer DATA for `count` messages, then hold every later answer until released.

        The held messages are recorded (count() includes them); their clients wait for the
        answer. Leaving the block releases them, whatever happened inside it.
        """
        hold = Hold(count)
        self._holds.append(hold)
        try:
            yield hold
        finally:
            hold.release()
            self._holds.remove(hold)

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

    def rcpt_count(self, address: str) -> int:
        """Return how many RCPT commands named address, refused or not."""
        with self._lock:
            return self._rcpts[address.lower()]

    def _refusal(self, address: str) -> Reply | None:
        wanted = address.lower()
        with self._lock:
            self._rcpts[wanted] += 1
        for scripted_for, replies in list(self.refuse_next.items()):
            if scripted_for.lower() == wanted and replies:
                return replies.pop(0)
        for refused, reply in list(self.refuse.items()):
            if refused.lower() == wanted:
                return reply
        return None

    def _record(self, message: Accepted) -> int:
        """Record a message; return how many have been accepted, this one included."""
        with self._lock:
            self._messages.append(message)
            self._per_address.update(address.lower() for address in message.rcpt_tos)
            ordinal = len(self._messages)
        if self.on_accept is not None:
            self.on_accept(message)
        return ordinal

    def _closes(self) -> bool:
        """Tell whether this RCPT is to be answered by closing the connection."""
        if not self.closing and self.close_next <= 0:
            return False
        if not self.closing:
            self.close_next -= 1
        with self._lock:
            self.closed_rcpts += 1
        return True

    async def _wait_if_held(self, ordinal: int) -> None:
        """Wait while a hold covers the ordinal-th message."""
        for hold in list(self._holds):
            if ordinal > hold.after:
                hold.holding.set()
                while not hold.released.is_set():
                    await asyncio.sleep(0.01)  # asyncio's: the other connections go on

    def _should_drop(self, message: Accepted) -> bool:
        rule = self.drop_after_data
        return rule(message) if callable(rule) else bool(rule)

    def _delay_s(self, message: Accepted) -> float:
        rule = self.data_delay_s
        return float(rule(message) if callable(rule) else rule)


class _Controller(Controller):
    """aiosmtpd's controller, keeping track of the connections it serves."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list[SMTP] = []

    def factory(self) -> SMTP:
        connection = super().factory()
        self.connections.append(connection)
        return connection

    def on_loop(self, coroutine):
        """Run a coroutine on the relay's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def busy_connections(self) -> int:
        """Count the connections in a transaction that got past RCPT."""
        self.connections = [c for c in self.connections if c.transport is not None]
        return sum(1 for c in self.connections if c.envelope and c.envelope.rcpt_tos)

    async def close_connections(self) -> None:
        """Close every open connection, and let the closes reach the sockets."""
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.close()
        self.connections.clear()
        await asyncio.sleep(0.05)


class _Authenticator:
    """Accept AUTH with the relay's current user and password only."""

    def __init__(self, relay: RecordingRelay) -> None:
        self.relay = relay

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        given = (auth_data.login.decode(), auth_data.password.decode())
        success = given == self.relay.login
        if not success:
            with self.relay._lock:
                self.relay.refused_logins += 1
        # handled=False: aiosmtpd answers a failure with the message, or 535 without one.
        return AuthResult(success=success, handled=False, message=self.relay.login_refusal)


class _Handler:
    """The aiosmtpd hooks; they run on the controller's event-loop thread."""

    def __init__(self, relay: RecordingRelay) -> None:
        self.relay = relay
        self._connections = itertools.count(1)

    def _connection_number(self, session) -> int:
        """Number each connection the first time it carries a message."""
        if not hasattr(session, "massmail_connection"):
            session.massmail_connection = next(self._connections)
        return session.massmail_connection

    async def handle_EHLO(self, server, session, envelope, hostname, responses) -> list[str]:
        session.host_name = hostname
        if self.relay.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before the last line, "250 HELP"
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self.relay.mail_answer or "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        # A relay going down: the client hears nothing, before it has sent any message.
        if self.relay._closes():
            server.transport.close()
            return "421 closing"

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
            received_at=time.monotonic(),
            connection=self._connection_number(session),
        )
        ordinal = self.relay._record(accepted)

        # The relay has the message, but the client never hears so: its in-doubt window.
        if self.relay._should_drop(accepted):
            server.transport.close()
            return "250 OK: queued"

        # A slow relay; asyncio's sleep, so that the other connections are served meanwhile.
        delay_s = self.relay._delay_s(accepted)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await self.relay._wait_if_held(ordinal)
        return self.relay.data_answer or "250 OK: queued"


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
