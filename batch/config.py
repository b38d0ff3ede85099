"""Settings: read once in the launcher from a TOML file, the environment and the flags.

Each option can come from `--config FILE` (its name with underscores), from the
environment variable `MASSMAIL_<NAME>` and from the flag `--<name-with-dashes>`;
a flag wins over the environment, the environment over the file, the file over the
default. The SMTP password is no option: it comes from `MASSMAIL_SMTP_PASSWORD` or
from the keyring, as yagmail stores it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.errors import UsageError
from batch.throttle import SLOWEST_RATE_PER_S

ENV_PREFIX = "MASSMAIL_"
PASSWORD_ENV = "MASSMAIL_SMTP_PASSWORD"
CAMPAIGN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DEFAULT_PORTS = {"none": 25, "starttls": 587, "ssl": 465}
URL_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError("must be a port number, 1 to 65535")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not 0 < number < math.inf:  # also false for NaN
        raise ValueError("must be a number of seconds, more than 0")
    return number


RATE_UNITS_S = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}


def _rate(value: str) -> float:
    """Read '10/s', '300/min' or '5000/h' as messages per second."""
    count, slash, unit = value.replace(" ", "").partition("/")
    try:
        number = float(count)
    except ValueError:
        number = 0.0
    if not slash or unit.lower() not in RATE_UNITS_S or not 0 < number < math.inf:
        raise ValueError("must be a number of messages per s, min or h, such as 300/min")
    rate_per_s = number / RATE_UNITS_S[unit.lower()]
    if rate_per_s < SLOWEST_RATE_PER_S:
        raise ValueError(
            f"must be at least {SLOWEST_RATE_PER_S * 3600:g}/h: a worker waiting longer for its "
            "slot would hold its message past the broker's 30-minute consumer timeout"
        )
    return rate_per_s


def _boolean(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class Option:
    """One setting: how to parse it, its default, and what it means."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    repeatable: bool = False  # a flag given again adds a value; a file gives a list


OPTIONS = (
    Option("source", Path, None, "the recipient list: .csv, .xlsx, or a SQLite .db/.sqlite"),
    Option("template", Path, None, "the message template: headers, a blank line, a Jinja2 body"),
    Option("campaign", str, None, "the mailing's name; rerunning it resumes (default: derived)"),
    Option("workers", _positive, 8, "worker processes, each with one SMTP session"),
    Option("state_dir", Path, Path("state"), "where DIR/<campaign>/sent-log.csv and co. live"),
    Option("amqp_url", str, "amqp://guest:guest@127.0.0.1:5672/%2F", "the RabbitMQ broker"),
    Option("smtp_host", str, "localhost", "the SMTP relay's host"),
    Option("smtp_port", _port, None, "the relay's port (default: 25, 587 or 465 by TLS)"),
    Option("smtp_tls", _choice("none", "starttls", "ssl"), "starttls", "none, starttls or ssl"),
    Option("smtp_user", str, "", "the relay login (password: $MASSMAIL_SMTP_PASSWORD)"),
    Option("smtp_verify", _boolean, True, "verify the relay's TLS certificate"),
    Option("smtp_timeout", _seconds, 60.0, "seconds to wait for the relay, except after DATA"),
    Option("email_column", str, "email", "the list's address column (case-insensitive)"),
    Option("query", str, None, "for SQLite: the rows to read (default: the recipients table)"),
    Option("sheet", str, None, "for Excel: the sheet to read (default: the first)"),
    Option("in_doubt", _choice("skip", "resend"), "skip", "what a rerun does with in-doubt ones"),
    Option("max_attempts", _positive, 5, "tries for a recipient the relay refuses for now (4xx)"),
    Option("retry_delay", _seconds, 60.0, "seconds before the first retry; each next one x4"),
    Option("prefetch", _positive, 20, "deliveries a worker holds ahead of the one it sends"),
    Option("amqp_heartbeat", _positive, 30, "seconds between AMQP heartbeats"),
    Option(
        "reconnect_for", _seconds, 120.0, "seconds to keep reconnecting a lost broker or relay"
    ),
    Option("limit", _positive, None, "mail the list's first N recipients; the rest wait"),
    Option("rate", _rate, None, "at most this many messages, all workers together: 300/min"),
    Option("max_per_connection", _positive, None, "messages per relay session before a new one"),
    Option("suppress", Path, None, "a CSV or text file of addresses never to mail"),
    Option("html_template", Path, None, "the HTML part (default: the template's .html twin)"),
    Option("unsubscribe_url", str, None, "an https URL template for List-Unsubscribe"),
    Option("unsubscribe_mailto", str, None, "an address template for List-Unsubscribe"),
    Option("attach", Path, (), "a file to attach to every message (repeatable)", True),
)
BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Every option, resolved; the password is kept out of the repr."""

    source: Path
    template: Path
    campaign: str | None
    workers: int
    state_dir: Path
    amqp_url: str
    smtp_host: str
    smtp_port: int
    smtp_tls: str
    smtp_user: str
    smtp_verify: bool
    smtp_timeout: float
    email_column: str
    query: str | None
    sheet: str | None
    in_doubt: str
    max_attempts: int
    retry_delay: float
    prefetch: int
    amqp_heartbeat: int
    reconnect_for: float
    limit: int | None = None
    rate: float | None = None  # messages per second, all workers together
    max_per_connection: int | None = None
    suppress: Path | None = None
    html_template: Path | None = None
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    attach: tuple[Path, ...] = ()
    verbosity: int = 0
    dry_run: bool = False
    smtp_password: str | None = field(default=None, repr=False)

    @property
    def retry_delays_s(self) -> tuple[float, ...]:
        """The pause before each retry of a 4xx, growing four-fold."""
        return tuple(self.retry_delay * 4**n for n in range(max(self.max_attempts - 1, 1)))


def parser(epilog: str) -> argparse.ArgumentParser:
    """Build the command line; every default is None so that given flags can be told."""
    parser = argparse.ArgumentParser(
        prog="python -m batch.run",
        description="Send one message to every recipient of a list, exactly once.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="a TOML file with any of these options")
    for option in OPTIONS:
        default = f" [{_shown(option.default)}]" if option.default not in (None, ()) else ""
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            metavar=option.name.upper(),
            help=(option.help + default).replace("%", "%%"),
            action="append" if option.repeatable else "store",
        )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="render every message and check the whole list; send and queue nothing",
    )
    parser.add_argument("-v", "--verbose", action="count", help="log more")
    parser.add_argument("-q", "--quiet", action="count", help="log only warnings and errors")
    return parser


def _shown(default: Any) -> str:
    """Show a default in --help, a URL without its password, as the log shows it."""
    return URL_PASSWORD.sub(r"\1@", str(default))


def load(argv: Sequence[str] | None, epilog: str = "") -> Settings:
    """Resolve every option from file, environment and flags, in that order."""
    flags = vars(parser(epilog).parse_args(argv))
    config_path = flags.pop("config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
    verbosity = flags.pop("verbose", 0) - flags.pop("quiet", 0)
    dry_run = flags.pop("dry_run", False)

    raw: dict[str, tuple[str, Any]] = {}
    if config_path:
        for key, value in _read_toml(Path(config_path)).items():
            raw[key] = (f"{config_path}: {key}", value)
    for option in OPTIONS:
        env = ENV_PREFIX + option.name.upper()
        if env in os.environ:
            value = os.environ[env]
            if option.repeatable:  # several values, separated as in $PATH
                value = [part for part in value.split(os.pathsep) if part]
            raw[option.name] = (f"${env}", value)
    for key, value in flags.items():
        raw[key] = ("--" + key.replace("_", "-"), value)

    values = {option.name: option.default for option in OPTIONS}
    for key, (origin, value) in raw.items():
        values[key] = _parse(BY_NAME[key], origin, value)
    return _settle(values, verbosity, dry_run)


def _read_toml(path: Path) -> dict[str, Any]:
    """Read a config file and refuse keys it does not know."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise UsageError(f"{path}: cannot read the configuration: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: the configuration is not UTF-8: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(BY_NAME))
    if "smtp_password" in unknown:
        raise UsageError(f"{path}: smtp_password is not read from files: set {PASSWORD_ENV}")
    if unknown:
        raise UsageError(f"{path}: unknown option {', '.join(unknown)}")
    return data


def _parse(option: Option, origin: str, value: Any) -> Any:
    """Parse one value, saying where it came from if it is wrong."""
    if option.repeatable:
        values = value if isinstance(value, list) else [value]
        return tuple(_parse_one(option, origin, one) for one in values)
    return _parse_one(option, origin, value)


def _parse_one(option: Option, origin: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and option.parse is not str and not value):
        return option.default
    try:
        return option.parse(value if isinstance(value, str) else str(value))
    except ValueError as error:
        reason = str(error) if "must" in str(error) else f"not a valid {option.name}"
        raise UsageError(f"{origin}: {value!r}: {reason}") from None


def _settle(values: dict[str, Any], verbosity: int, dry_run: bool) -> Settings:
    """Check what only the whole set can tell, and fill the derived defaults."""
    for name in ("source", "template"):
        if values[name] is None:
            flag = "--" + name
            raise UsageError(
                f"{flag} is required (or {name} in --config, or ${ENV_PREFIX}{name.upper()})"
            )
    campaign = values["campaign"]
    if campaign is not None and not CAMPAIGN_PATTERN.fullmatch(campaign):
        raise UsageError(
            f"--campaign {campaign!r}: use letters, digits, '.', '_' and '-' (at most 100)"
        )
    if values["smtp_port"] is None:
        values["smtp_port"] = DEFAULT_PORTS[values["smtp_tls"]]
    password = None if dry_run else _password(values["smtp_user"])  # a dry run logs in nowhere
    return Settings(**values, verbosity=verbosity, dry_run=dry_run, smtp_password=password)


def _password(user: str) -> str | None:
    """Find the relay password in the environment, then in the keyring; never prompt."""
    if not user:
        return None
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV]
    try:
        import keyring
    except ImportError:
        raise UsageError(
            f"--smtp-user {user}: no password: set {PASSWORD_ENV}, or install the keyring "
            "extra (pip install -e '.[keyring]') and store it there with yagmail.register"
        ) from None
    try:
        password = keyring.get_password("yagmail", user)
    except Exception:  # any keyring backend failure means: no password stored
        password = None
    if password is None:
        raise UsageError(
            f"--smtp-user {user}: no password: set {PASSWORD_ENV} or store it in the keyring "
            f"with: python -c 'import yagmail; yagmail.register(\"{user}\", input())'"
        )
    return password
