"""The mailer: one reused SMTP session to the relay, and one transaction at a time.

yagmail opens the session (host, port, TLS, login, keyring); the transaction itself is
driven here, command by command, because where it fails decides what may happen next:

- before the final "." of DATA is written, the relay cannot have accepted the message;
- after it, a lost connection or a timeout leaves the message in doubt (RFC 1047), and
  the message must not be sent again blindly.

yagmail's own `send()` is never called: it opens a new connection each time and resends
after a dropped connection. The mailer knows nothing of queues or logs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from enum import Enum

import yagmail

from batch.errors import Unavailable, UsageError
from batch.recipients import envelope_form

log = logging.getLogger(__name__)

DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)


class Result(Enum):
    """How one transaction ended, from the relay's side."""

    ACCEPTED = "accepted"  # 250 to DATA
    REFUSED_FOR_NOW = "refused for now"  # a 4xx: not accepted, may work later
    REFUSED_FOR_GOOD = "refused for good"  # a 5xx: not accepted, never will be
    NOT_REACHED = "not reached"  # the connection failed before the end of DATA
    IN_DOUBT = "in doubt"  # the end of DATA went out and no answer came back


@dataclass(frozen=True, slots=True)
class Attempt:
    """The relay's last word on one transaction."""

    result: Result
    code: int | None
    reply: str


@dataclass(frozen=True)
class RelaySettings:
    """Where the relay is and how to log in; the password never shows in a repr."""

    host: str
    port: int
    tls: str = "starttls"  # none | starttls | ssl
    user: str = ""
    password: str | None = field(default=None, repr=False)
    verify_tls: bool = True
    timeout_s: float = 60.0
    data_timeout_s: float = 600.0  # RFC 5321 lets the relay think 10 minutes after DATA
    max_per_session: int | None = None  # transactions before a new session; None: no cap

    def describe(self) -> str:
        """Name the relay for messages, never the password."""
        who = f"{self.user}@" if self.user else ""
        return f"smtp://{who}{self.host}:{self.port} ({self.tls})"


class Mailer:
    """One SMTP session to the relay, reopened when the relay drops it."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self._client: yagmail.SMTP | None = None
        self._in_session = 0  # transactions begun in the current session
        # Whether the last transaction's final "." went out: from then on, in doubt.
        self.past_data_end = False
        if settings.tls != "none" and not settings.verify_tls:
            log.warning(
                "relay %s: TLS certificate verification is off (--smtp-verify false): "
                "anyone between here and the relay can read the mail and the password",
                settings.describe(),
            )

    def open(self) -> None:
        """Connect and log in; raise Unavailable or UsageError with the reason."""
        if self._client is not None:
            return
        relay = self.settings.describe()
        try:
            client = _yagmail_client(self.settings)
            client.login()
            client.smtp.ehlo_or_helo_if_needed()
        except smtplib.SMTPAuthenticationError as error:
            reason = (
                f"relay {relay}: login refused for user {self.settings.user!r}: "
                f"{_reply_text(error.smtp_code, error.smtp_error)}"
            )
            if 400 <= error.smtp_code < 500:  # "454 4.7.0 try again later": for now only
                raise Unavailable(reason) from None
            raise UsageError(reason) from None
        except ssl.SSLCertVerificationError as error:
            raise UsageError(
                f"relay {relay}: its certificate is not trusted: {error.verify_message}"
            ) from None
        except UnicodeError as error:  # from the IDNA encoding of the host name
            raise UsageError(f"relay {relay}: not a host name: {error}") from None
        except (OSError, smtplib.SMTPException) as error:
            raise Unavailable(f"relay {relay}: cannot connect: {_describe(error)}") from None
        self._client = client
        self._in_session = 0

    def close(self) -> None:
        """Say QUIT if the session is still up; a relay gone already needs no goodbye."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except (OSError, smtplib.SMTPException):
                client.is_closed = True

    def send(self, sender: str, recipient: str, message: bytes) -> Attempt:
        """Run one MAIL/RCPT/DATA transaction and say how it ended."""
        self.past_data_end = False
        cap = self.settings.max_per_session
        if cap is not None and self._in_session >= cap:
            self.close()  # a relay that caps its sessions refuses the one past the cap
        self.open()
        self._in_session += 1
        smtp = self._client.smtp

        # Until the final "." is written, a failure means the relay has nothing.
        try:
            refusal = self._envelope(smtp, sender, recipient, message)
            if refusal is not None:
                return refusal
            smtp.send(_dot_stuffed(message))
            self.past_data_end = True
        except (OSError, smtplib.SMTPServerDisconnected) as error:
            self._drop()
            reason = f"connection lost before the end of DATA: {_describe(error)}"
            return Attempt(Result.NOT_REACHED, None, f"relay {self.settings.describe()}: {reason}")

        # After it, only the relay's answer tells; without one, nobody knows.
        try:
            smtp.sock.settimeout(self.settings.data_timeout_s)
            code, reply = smtp.getreply()
            smtp.sock.settimeout(self.settings.timeout_s)
        except (OSError, smtplib.SMTPServerDisconnected) as error:
            self._drop()
            return Attempt(Result.IN_DOUBT, None, f"no answer to the end of DATA: {error}")
        if code < 0:  # smtplib's -1: a line without a reply code, which says nothing
            self._drop()
            text = _reply_text(code, reply)
            return Attempt(Result.IN_DOUBT, None, f"unreadable answer to the end of DATA: {text}")
        return self._verdict(code, reply, accepted=(250,))

    def _envelope(
        self, smtp: smtplib.SMTP, sender: str, recipient: str, message: bytes
    ) -> Attempt | None:
        """Send MAIL, RCPT and DATA; return the refusal, or None once DATA may follow.

        Both addresses come validated (no spaces, brackets or line breaks), so they go
        into the commands as they are, an internationalised domain as its A-label.
        """
        smtp.ehlo_or_helo_if_needed()
        sender, recipient = envelope_form(sender), envelope_form(recipient)
        options = self._mail_options(smtp, sender + recipient, message)
        if isinstance(options, Attempt):
            return options
        commands = (
            (f"MAIL FROM:<{sender}>{options}", (250,)),
            (f"RCPT TO:<{recipient}>", (250, 251)),
            ("DATA", (354,)),
        )

        replies = _exchange(smtp, commands)
        for (_, accepted), (code, reply) in zip(commands, replies, strict=False):
            if code not in accepted:
                if len(replies) == len(commands) and replies[-1][0] == 354:
                    # DATA was taken after all. A "." would have the relay queue an empty
                    # message; a session cut off in mid-DATA leaves it nothing (RFC 5321).
                    self._drop()
                else:
                    self._reset()
                return self._verdict(code, reply, accepted=())
        return None

    def _mail_options(self, smtp: smtplib.SMTP, addresses: str, message: bytes) -> str | Attempt:
        """Choose MAIL FROM's options and the commands' encoding, or refuse the transaction."""
        options = ""
        if not message.isascii() and smtp.has_extn("8bitmime"):
            options += " BODY=8BITMIME"
        smtp.command_encoding = "ascii"
        if addresses.isascii():
            return options
        if not smtp.has_extn("smtputf8"):
            reason = (
                "not sent: the address has non-ASCII letters before the @ and the relay "
                f"{self.settings.describe()} does not announce SMTPUTF8 (RFC 6531)"
            )
            return Attempt(Result.REFUSED_FOR_GOOD, None, reason)
        smtp.command_encoding = "utf-8"
        return options + " SMTPUTF8"

    def _verdict(self, code: int, reply: bytes, accepted: tuple[int, ...]) -> Attempt:
        """Classify the relay's answer to one command."""
        text = _reply_text(code, reply)
        if code in accepted:
            return Attempt(Result.ACCEPTED, code, text)
        if code == 421 or code < 0:
            self._drop()
        if 400 <= code < 500 or code < 0:
            return Attempt(Result.REFUSED_FOR_NOW, code, text)
        if 500 <= code < 600:
            return Attempt(Result.REFUSED_FOR_GOOD, code, text)
        return Attempt(Result.IN_DOUBT, code, f"unexpected answer to DATA: {text}")

    def _reset(self) -> None:
        """Abort a refused transaction so the session can carry the next one."""
        try:
            self._client.smtp.rset()
        except (OSError, smtplib.SMTPException):
            self._drop()

    def _drop(self) -> None:
        """Forget a broken session without talking to the relay again."""
        client, self._client = self._client, None
        if client is None:
            return
        client.is_closed = True  # keeps yagmail from saying QUIT on a dead socket
        with contextlib.suppress(OSError):
            client.smtp.close()


def _yagmail_client(settings: RelaySettings) -> yagmail.SMTP:
    """Build the yagmail client that opens the session, without connecting yet."""
    context = ssl.create_default_context()
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    options: dict[str, object] = {"timeout": settings.timeout_s}
    if settings.tls == "ssl":
        options["context"] = context
    starttls = {"context": context} if settings.tls == "starttls" else False
    return yagmail.SMTP(
        user=settings.user or "massmail@localhost",
        password=settings.password,
        host=settings.host,
        port=settings.port,
        smtp_ssl=settings.tls == "ssl",
        smtp_starttls=starttls,
        smtp_skip_login=not settings.user,
        soft_email_validation=False,
        **options,
    )


def _exchange(
    smtp: smtplib.SMTP, commands: tuple[tuple[str, tuple[int, ...]], ...]
) -> list[tuple[int, bytes]]:
    """Send the commands and collect their replies, stopping at the first refusal.

    A relay that announces PIPELINING takes them in one write and answers each one.
    """
    if smtp.has_extn("pipelining"):
        smtp.send("".join(f"{command}\r\n" for command, _ in commands))
        return [smtp.getreply() for _ in commands]
    replies = []
    for command, accepted in commands:
        smtp.putcmd(command)
        replies.append(smtp.getreply())
        if replies[-1][0] not in accepted:
            break
    return replies


def _dot_stuffed(message: bytes) -> bytes:
    """Escape lines that start with a dot and add the end-of-data line."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return DOT_AT_LINE_START.sub(b"..", message) + b".\r\n"


def _reply_text(code: int, reply: bytes | str) -> str:
    """Join the relay's reply into one readable line."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return f"{code} {' '.join(reply.split())}".strip()


def _describe(error: BaseException) -> str:
    """Say what went wrong with the connection in a few words."""
    if isinstance(error, socket.timeout):
        return "timed out"
    return str(error) or type(error).__name__
