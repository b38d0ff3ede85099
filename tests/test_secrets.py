"""Secrets and transport: passwords stay out of every output, certificates are checked."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    Job,
    batch_in_background,
    delete_queues,
    people,
    received_counts,
    run_batch,
    wait_until,
    write_csv,
    write_template,
)
from tests.relay import RecordingRelay

RELAY_USER = "mailer@example.com"


@pytest.fixture
def relay_password() -> str:
    return f"pw-{uuid.uuid4().hex}"


@pytest.fixture
def login_job(tmp_path, amqp_url, relay_password):
    """A campaign whose relay refuses mail until AUTH with RELAY_USER and relay_password."""
    with RecordingRelay(login=(RELAY_USER, relay_password)) as relay:
        campaign = f"test-{uuid.uuid4().hex[:12]}"
        yield Job(tmp_path / "state", amqp_url, relay, campaign)
        delete_queues(amqp_url, campaign)


def with_password(password: str) -> dict[str, str]:
    """The environment of a run that logs in to the relay with password."""
    return {**os.environ, "MASSMAIL_SMTP_PASSWORD": password}


def assert_broker_password_hidden(text: str) -> None:
    """The broker password (guest) shows only as the user of a URL: never as a password."""
    assert ":guest@" not in text
    assert text.count("guest") == text.count("//guest@")


def everything_written(folder: Path) -> str:
    """The text of every file the run left in the campaign folder."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    return "\n".join(path.read_bytes().decode("utf-8", "replace") for path in files)


def test_the_relay_and_broker_passwords_appear_in_no_log_line_file_or_help(
    login_job, tmp_path, relay_password
):
    source = write_csv(tmp_path / "list.csv", people(5))
    template = write_template(tmp_path / "template.txt")
    env = with_password(relay_password)

    args = login_job.args(source, template, "--smtp-user", RELAY_USER, "-v")
    result = run_batch(args, env=env)
    helped = subprocess.run(
        [sys.executable, "-m", "batch.run", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert login_job.relay.count() == 5
    assert RELAY_USER in result.stderr  # the log names the login, so it was there to leak
    outputs = [result.stdout, result.stderr, helped.stdout, everything_written(login_job.folder)]
    for text in outputs:
        assert relay_password not in text
        assert_broker_password_hidden(text)


def test_a_wrong_relay_password_stops_the_run_with_2_naming_host_and_user_only(
    login_job, tmp_path, relay_password
):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_template(tmp_path / "template.txt")
    wrong = f"wrong-{uuid.uuid4().hex}"

    args = login_job.args(source, template, "--smtp-user", RELAY_USER)
    result = run_batch(args, env=with_password(wrong))

    assert result.returncode == 2, result.stderr
    assert f"{login_job.relay.host}:{login_job.relay.port}" in result.stderr
    assert f"login refused for user '{RELAY_USER}'" in result.stderr
    assert wrong not in result.stderr and relay_password not in result.stderr
    assert "Traceback" not in result.stderr
    assert login_job.relay.count() == 0


def test_a_login_refused_mid_run_leaves_its_recipients_unsent_and_a_rerun_sends_them(
    login_job, tmp_path, relay_password
):
    rows = people(12)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    relay = login_job.relay

    def change_password_after_three(_message) -> None:
        if relay.count() >= 3:
            relay.login = (RELAY_USER, f"changed-{uuid.uuid4().hex}")

    relay.on_accept = change_password_after_three
    args = login_job.args(
        source, template, "--smtp-user", RELAY_USER, "--workers", "1",
        "--max-per-connection", "3", "--reconnect-for", "120",
    )  # fmt: skip
    first = run_batch(args, env=with_password(relay_password))

    # The next session's login is refused: nothing was sent on it, so nobody is in doubt.
    # A 535 is not tried again: each try would count as one more failed login.
    assert first.returncode == 75, first.stderr
    assert relay.count() == 3
    assert relay.refused_logins <= 2  # one login, tried with each of the relay's mechanisms
    assert relay_password not in first.stderr
    assert [row for row in login_job.sent_log() if row["status"] == "in-doubt"] == []

    relay.on_accept = None
    relay.login = (RELAY_USER, relay_password)
    rerun = run_batch(args, env=with_password(relay_password))

    assert rerun.returncode == 0, rerun.stderr
    assert received_counts(relay) == dict.fromkeys([r["email"] for r in rows], 1)
    assert set(login_job.final_statuses().values()) == {"sent"}


def test_a_login_refused_for_now_mid_run_is_waited_out_and_the_run_goes_on(
    login_job, tmp_path, relay_password, monkeypatch
):
    rows = people(8)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    relay = login_job.relay
    relay.login_refusal = "454 4.7.0 too many logins, try again later"

    def refuse_logins_after_three(_message) -> None:
        if relay.count() >= 3:
            relay.login = (RELAY_USER, "nobody's")

    relay.on_accept = refuse_logins_after_three
    args = login_job.args(
        source, template, "--smtp-user", RELAY_USER, "--workers", "1",
        "--max-per-connection", "3", "--reconnect-for", "120",
    )  # fmt: skip
    monkeypatch.setenv("MASSMAIL_SMTP_PASSWORD", relay_password)
    with batch_in_background(args, tmp_path / "run.log") as process:
        wait_until(lambda: relay.refused_logins >= 4, "two refused logins", process)
        relay.on_accept, relay.login = None, (RELAY_USER, relay_password)
        assert process.wait(RUN_TIMEOUT_S) == 0, (tmp_path / "run.log").read_text()

    assert received_counts(relay) == dict.fromkeys([r["email"] for r in rows], 1)
    assert set(login_job.final_statuses().values()) == {"sent"}


def test_an_unreachable_broker_is_named_without_its_password(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_template(tmp_path / "template.txt")
    secret = f"pw-{uuid.uuid4().hex}"
    args = job.args(source, template, "--reconnect-for", "1")
    args[args.index(job.amqp_url)] = f"amqp://massmail:{secret}@127.0.0.1:1/%2F"

    result = run_batch(args)

    assert result.returncode == 75, result.stderr
    assert "massmail@127.0.0.1:1" in result.stderr
    assert secret not in result.stderr + result.stdout
    assert job.relay.count() == 0


def test_the_campaign_folder_and_sent_log_are_closed_to_other_users(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_template(tmp_path / "template.txt")

    assert job.run(source, template).returncode == 0

    assert stat.S_IMODE(job.folder.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE((job.folder / "sent-log.csv").stat().st_mode) & 0o007 == 0


# TLS: a relay whose certificate nobody vouches for.


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 and localhost, signed by nobody but itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "relay.crt", folder / "relay.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(params=["starttls", "ssl"])
def tls_job(request, tmp_path, amqp_url, self_signed):
    """A campaign whose relay speaks TLS (STARTTLS or from the start) with a self-signed cert."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed)
    mode = request.param
    relay_options = {"tls_context" if mode == "starttls" else "ssl_context": context}
    with RecordingRelay(**relay_options) as relay:
        campaign = f"test-{uuid.uuid4().hex[:12]}"
        yield mode, Job(tmp_path / "state", amqp_url, relay, campaign)
        delete_queues(amqp_url, campaign)


def tls_args(job: Job, mode: str, source: Path, template: Path, *extra: str) -> list[str]:
    args = job.args(source, template, *extra)
    args[args.index("--smtp-tls") + 1] = mode
    return args


def test_a_relay_with_an_untrusted_certificate_is_refused_by_default(tls_job, tmp_path):
    mode, job = tls_job
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_template(tmp_path / "template.txt")

    result = run_batch(tls_args(job, mode, source, template))

    assert result.returncode == 2, result.stderr
    assert "certificate is not trusted" in result.stderr
    assert "Traceback" not in result.stderr
    assert job.relay.count() == 0


def test_with_verification_off_the_relay_is_used_and_a_warning_says_so(tls_job, tmp_path):
    mode, job = tls_job
    rows = people(3)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = run_batch(tls_args(job, mode, source, template, "--smtp-verify", "false"))

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {row["email"]: 1 for row in rows}
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert any("verification is off" in line for line in warnings), result.stderr
