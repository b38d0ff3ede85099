"""The job against a relay that misbehaves: refuses, stalls, drops, goes away.

Every fault is produced for real by the recording relay; the tests check what a user
would: who received how many messages, what the sent-log says, and the exit code.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime

import pika
import pytest

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    people,
    received_counts,
    write_csv,
    write_template,
)
from tests.relay import RecordingRelay

OUTAGE_S = 3.0  # how long a relay that comes back stays away
RETRY_DELAYS_MS = (1000, 4000, 16000, 64000)  # the retry queues of --retry-delay 1


@pytest.fixture
def faulty_job(job):
    """The job fixture, also removing the retry queues of `--retry-delay 1`."""
    yield job
    connection = pika.BlockingConnection(pika.URLParameters(job.amqp_url))
    channel = connection.channel()
    for delay_ms in RETRY_DELAYS_MS:
        channel.queue_delete(f"massmail.{job.campaign}.retry.{delay_ms}")
    connection.close()


def mailing(tmp_path, count: int) -> tuple:
    """Write a list of count people and the template; return their paths and addresses."""
    rows = people(count)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    return source, template, [row["email"] for row in rows]


def history(job, recipient: str) -> list[dict[str, str]]:
    """The recipient's sent-log lines, oldest first."""
    return [row for row in job.sent_log() if row["recipient"] == recipient]


def statuses(job, recipient: str) -> list[str]:
    return [row["status"] for row in history(job, recipient)]


def at(row: dict[str, str]) -> datetime:
    return datetime.fromisoformat(row["timestamp"])


def assert_sent_once(job, addresses: list[str]) -> None:
    """Each address was received exactly once and its sent-log line says `sent`."""
    counts = received_counts(job.relay)
    assert {a: counts[a] for a in addresses} == dict.fromkeys(addresses, 1)
    final = job.final_statuses()
    assert {a: final.get(a) for a in addresses} == dict.fromkeys(addresses, "sent")


def go_down_after(relay: RecordingRelay, accepted: int) -> threading.Event:
    """Close the relay's door once it accepted that many messages; the event says when."""
    reached = threading.Event()

    def on_accept(_message) -> None:
        if relay.count() >= accepted and not reached.is_set():
            relay.closing = True  # at once, on the relay's own thread: nothing more gets in
            reached.set()

    relay.on_accept = on_accept
    return reached


def run_meanwhile(job, tmp_path, action: Callable[[], None], *args: str) -> tuple[int, str]:
    """Run the job in the background, do action meanwhile; return its exit code and stderr."""
    stderr_path = tmp_path / f"stderr-{uuid.uuid4().hex[:8]}.txt"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "batch.run", *job.args(*args)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            action()
            code = process.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, stderr_path.read_text()


def test_recipients_refused_with_550_are_failed_at_once_and_never_retried(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 20)
    refused = addresses[3:6]
    job.relay.refuse = dict.fromkeys(refused, (550, "5.1.1 no such user"))

    result = job.run(source, template, "--workers", "2")

    assert result.returncode == 1, result.stderr
    for address in refused:
        assert statuses(job, address) == ["claimed", "failed"]
        assert history(job, address)[-1]["smtp_code"] == "550"
        assert "no such user" in history(job, address)[-1]["smtp_reply"]
        assert job.relay.rcpt_count(address) == 1
        assert job.relay.received_by(address) == 0
    assert_sent_once(job, [a for a in addresses if a not in refused])


def test_a_recipient_refused_with_451_twice_is_retried_from_the_broker_and_sent_once(
    faulty_job, tmp_path
):
    job = faulty_job
    source, template, addresses = mailing(tmp_path, 30)
    flaky = addresses[0]
    job.relay.refuse_next = {flaky: [(451, "4.3.0 try again later")] * 2}

    result = job.run(
        source, template, "--workers", "1", "--retry-delay", "1", "--max-attempts", "5"
    )

    assert result.returncode == 0, result.stderr
    assert_sent_once(job, addresses)
    assert job.relay.rcpt_count(flaky) == 3
    lines = history(job, flaky)
    assert [row["status"] for row in lines] == [
        "claimed", "deferred", "claimed", "deferred", "claimed", "sent",
    ]  # fmt: skip
    assert [row["smtp_code"] for row in lines[1:4:2]] == ["451", "451"]

    # Each retry waited its delay (1 s, then 4 s), in the broker: the only worker
    # went on sending to others meanwhile instead of sleeping.
    first_deferred, second_claim, second_deferred, third_claim = map(at, lines[1:5])
    assert (second_claim - first_deferred).total_seconds() >= 0.9
    assert (third_claim - second_deferred).total_seconds() >= 3.6
    sent_meanwhile = [
        row
        for row in job.sent_log()
        if row["status"] == "sent" and first_deferred < at(row) < second_claim
    ]
    assert sent_meanwhile


def test_a_recipient_refused_with_451_every_time_fails_after_the_last_attempt(
    faulty_job, tmp_path
):
    job = faulty_job
    source, template, addresses = mailing(tmp_path, 20)
    stuck = addresses[7]
    job.relay.refuse = {stuck: (451, "4.2.1 mailbox busy")}

    result = job.run(
        source, template, "--workers", "2", "--retry-delay", "1", "--max-attempts", "3"
    )

    assert result.returncode == 1, result.stderr
    assert statuses(job, stuck) == [
        "claimed", "deferred", "claimed", "deferred", "claimed", "failed",
    ]  # fmt: skip
    last = history(job, stuck)[-1]
    assert last["smtp_code"] == "451"
    assert "gave up after 3 attempts" in last["smtp_reply"]
    assert job.relay.rcpt_count(stuck) == 3
    assert job.relay.received_by(stuck) == 0
    assert_sent_once(job, [a for a in addresses if a != stuck])


def test_a_message_whose_answer_is_lost_is_in_doubt_and_resent_only_when_asked(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 20)
    doubtful = addresses[5]
    job.relay.drop_after_data = lambda message: doubtful in message.rcpt_tos

    first = job.run(source, template, "--workers", "2")

    assert first.returncode == 1, first.stderr
    assert statuses(job, doubtful) == ["claimed", "in-doubt"]
    assert job.relay.received_by(doubtful) == 1
    assert_sent_once(job, [a for a in addresses if a != doubtful])

    # By default a rerun leaves the recipient alone: it may have the message already.
    log_before = job.sent_log()
    again = job.run(source, template, "--workers", "2")
    assert again.returncode == 1, again.stderr
    assert job.relay.count() == 20
    assert job.sent_log() == log_before

    # Asked to, it sends once more, as the same message.
    job.relay.drop_after_data = False
    resend = job.run(source, template, "--workers", "2", "--in-doubt", "resend")
    assert resend.returncode == 0, resend.stderr
    copies = [m for m in job.relay.messages() if doubtful in m.rcpt_tos]
    assert len(copies) == 2
    assert copies[0].message_id is not None
    assert copies[0].message_id == copies[1].message_id
    assert history(job, doubtful)[-1]["status"] == "sent"
    assert history(job, doubtful)[-1]["message_id"] == copies[0].message_id
    assert job.relay.count() == 21


def test_a_relay_down_at_start_is_a_temporary_failure_and_a_later_rerun_sends_everyone(
    job, tmp_path
):
    source, template, addresses = mailing(tmp_path, 10)
    job.relay.stop()

    down = job.run(source, template, "--workers", "2")

    assert down.returncode == 75, down.stderr
    assert f"{job.relay.host}:{job.relay.port}" in down.stderr
    assert job.relay.count() == 0
    assert job.sent_log() == []

    job.relay.start()
    up = job.run(source, template, "--workers", "2")
    assert up.returncode == 0, up.stderr
    assert_sent_once(job, addresses)
    assert job.relay.count() == 10


def test_a_relay_that_goes_away_and_comes_back_mid_run_gets_each_message_once(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 40)
    relay = job.relay
    gone = go_down_after(relay, 10)
    accepted_before_outage = []

    def outage() -> None:
        assert gone.wait(RUN_TIMEOUT_S), "the relay never accepted 10 messages"
        relay.stop(graceful=True)
        accepted_before_outage.append(relay.count())
        time.sleep(OUTAGE_S)
        relay.start()

    code, stderr = run_meanwhile(
        job, tmp_path, outage, source, template, "--workers", "2", "--reconnect-for", "120"
    )

    assert code == 0, stderr
    assert accepted_before_outage[0] < 40
    assert "trying again" in stderr  # the workers did meet the outage
    assert_sent_once(job, addresses)
    # A message cut off before the end of DATA went again under its one claim.
    assert {a: statuses(job, a) for a in addresses} == dict.fromkeys(
        addresses, ["claimed", "sent"]
    )


def test_a_relay_that_goes_away_for_good_stops_the_run_and_a_rerun_finishes_it(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 40)
    relay = job.relay
    gone = go_down_after(relay, 10)

    def outage() -> None:
        assert gone.wait(RUN_TIMEOUT_S), "the relay never accepted 10 messages"
        relay.stop(graceful=True)

    code, stderr = run_meanwhile(
        job, tmp_path, outage, source, template, "--workers", "2", "--reconnect-for", "3"
    )

    assert code == 75, stderr
    counts = received_counts(relay)
    assert 0 < sum(counts.values()) < 40
    assert max(counts.values()) == 1

    relay.start()
    rerun = job.run(source, template, "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert_sent_once(job, addresses)
    # The relay was unreachable, never silent after DATA: nobody is in doubt.
    assert {row["status"] for row in job.sent_log()} <= {"claimed", "sent"}


def test_a_relay_slow_to_answer_data_keeps_the_broker_connection_alive(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 12)
    slow = set(addresses[:3])
    job.relay.data_delay_s = lambda message: 7.0 if slow & set(message.rcpt_tos) else 0.0

    result = job.run(source, template, "--workers", "2", "--amqp-heartbeat", "2")

    assert result.returncode == 0, result.stderr
    assert_sent_once(job, addresses)
    assert "reconnecting" not in result.stderr
