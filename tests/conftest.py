"""Fixtures: a real RabbitMQ, a recording SMTP relay, and the job run as a user runs it."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.relay import RecordingRelay

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("MASSMAIL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RUN_TIMEOUT_S = 240

TEMPLATE = """\
From: Test Sender <sender@example.com>
Subject: Hello {{ name }}

Dear {{ name }},
this is message for {{ email }}.
"""


def broker_reachable(url: str = AMQP_URL) -> bool:
    """Tell whether a RabbitMQ answers at url."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    try:
        pika.BlockingConnection(params).close()
    except pika.exceptions.AMQPError:
        return False
    return True


@pytest.fixture(scope="session")
def amqp_url():
    """The broker the tests use; fail (never skip) with what to start if there is none.

    The local one (or MASSMAIL_TEST_AMQP_URL) when it answers; otherwise a RabbitMQ in a
    container, where a Docker engine is reachable.
    """
    if broker_reachable():
        yield AMQP_URL
        return
    container, why_not = start_container_broker()
    if container is None:
        pytest.fail(
            f"no RabbitMQ answers at {AMQP_URL} and none can run in a container ({why_not}): "
            "start one with `rabbitmq-server -detached` or set MASSMAIL_TEST_AMQP_URL",
            pytrace=False,
        )
    params = container.get_connection_params()
    try:
        yield f"amqp://guest:guest@{params.host}:{params.port}/%2F"
    finally:
        container.stop()


def start_container_broker():
    """Start testcontainers' RabbitMQ; return (container, None) or (None, the reason)."""
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer

        return RabbitMqContainer("rabbitmq:3.10").start(), None
    except Exception as error:  # no Docker engine, no image: say why, then fail
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


@pytest.fixture
def relay():
    """A real SMTP server that records what it accepted."""
    with RecordingRelay() as server:
        yield server


@dataclass
class Job:
    """One way of running `python -m batch.run` for a test's campaign."""

    state_dir: Path
    amqp_url: str
    relay: RecordingRelay
    campaign: str

    def args(self, source: Path, template: Path, *extra: str) -> list[str]:
        return [
            "--source", str(source),
            "--template", str(template),
            "--campaign", self.campaign,
            "--state-dir", str(self.state_dir),
            "--amqp-url", self.amqp_url,
            "--smtp-host", self.relay.host,
            "--smtp-port", str(self.relay.port),
            "--smtp-tls", "none",
            *extra,
        ]  # fmt: skip

    def run(self, source: Path, template: Path, *extra: str, campaign: bool = True):
        """Run the job to its end and return the finished process."""
        args = self.args(source, template, *extra)
        if not campaign:
            at = args.index("--campaign")
            del args[at : at + 2]
        return run_batch(args)

    @property
    def folder(self) -> Path:
        return self.state_dir / self.campaign

    def sent_log(self, campaign: str | None = None) -> list[dict[str, str]]:
        path = self.state_dir / (campaign or self.campaign) / "sent-log.csv"
        with path.open(newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))

    def final_statuses(self, campaign: str | None = None) -> dict[str, str]:
        """Each recipient's last status in the sent-log."""
        return {row["recipient"]: row["status"] for row in self.sent_log(campaign)}


def run_batch(
    args: list[str], timeout_s: float = RUN_TIMEOUT_S, **kwargs
) -> subprocess.CompletedProcess:
    """Run `python -m batch.run` with args; a hang fails the test.

    The job runs in a session of its own: on a timeout its whole process group is killed,
    workers included, so that none of them lives on to send for a later test.
    """
    command = [sys.executable, "-m", "batch.run", *args]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout_s, stdout, stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def campaign_queues(campaign: str) -> list[str]:
    """Name every queue the job may declare for a campaign (the default retry delays)."""
    retries = [f"massmail.{campaign}.retry.{ms}" for ms in (60000, 240000, 960000, 3840000)]
    return [f"massmail.{campaign}", f"massmail.{campaign}.dead", *retries]


def delete_queues(url: str, campaign: str) -> None:
    """Remove a test campaign's queues from the shared broker."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for name in campaign_queues(campaign):
        channel.queue_delete(name)
    connection.close()


@pytest.fixture
def job(tmp_path, amqp_url, relay):
    """A fresh campaign against the real broker and the recording relay."""
    campaign = f"test-{uuid.uuid4().hex[:12]}"
    yield Job(tmp_path / "state", amqp_url, relay, campaign)
    delete_queues(amqp_url, campaign)


@pytest.fixture
def slow_job(tmp_path, amqp_url):
    """A fresh campaign whose relay waits 50 ms before answering each message."""
    with RecordingRelay(data_delay_s=0.05) as relay:
        campaign = f"test-{uuid.uuid4().hex[:12]}"
        yield Job(tmp_path / "state", amqp_url, relay, campaign)
        delete_queues(amqp_url, campaign)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write a recipient list as a person would export it."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def people(count: int, domain: str = "example.com") -> list[dict[str, str]]:
    """Make count distinct recipients with a name each."""
    return [{"email": f"person{n}@{domain}", "name": f"Person {n}"} for n in range(count)]


def write_template(path: Path, text: str = TEMPLATE) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def received_counts(relay: RecordingRelay) -> Counter[str]:
    """How many messages the relay accepted per recipient."""
    counts: Counter[str] = Counter()
    for message in relay.messages():
        counts.update(address.lower() for address in message.rcpt_tos)
    return counts


def wait_for_a_claiming_worker(job, process, timeout_s: float = 60) -> int:
    """Return the pid of a worker once it has claimed and sent a few recipients."""
    deadline = time.monotonic() + timeout_s
    path = job.folder / "sent-log.csv"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before a worker could be killed"
        if path.exists():
            with path.open(newline="", encoding="utf-8") as file:
                sent = [row for row in csv.DictReader(file) if row["status"] == "sent"]
            if len(sent) >= 5:
                return int(sent[-1]["worker"].rpartition(":")[2])
        time.sleep(0.05)
    raise AssertionError("no worker sent anything in time")


def wait_until(done: Callable[[], bool], what: str, process: subprocess.Popen) -> None:
    """Poll until done() holds; fail if the run ends or RUN_TIMEOUT_S passes first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not done():
        assert process.poll() is None, f"the run ended before {what}"
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {RUN_TIMEOUT_S} s")
        time.sleep(0.05)


@contextlib.contextmanager
def batch_in_background(args: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `python -m batch.run` in its own process group; kill the group if still running."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "batch.run", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def kill_a_worker_midway(job, args: list[str], log_path: Path) -> tuple[int, int]:
    """Run the job, kill -9 one worker once it has sent a few; return (exit code, its pid)."""
    with batch_in_background(args, log_path) as process:
        victim = wait_for_a_claiming_worker(job, process)
        os.kill(victim, signal.SIGKILL)
        return process.wait(RUN_TIMEOUT_S), victim
