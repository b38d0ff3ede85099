"""The job against a relay that misbehaves: refuses, stalls, drops, goes away.

Every fault is produced for real by the recording relay; the tests check what a user
would: who received how many messages, what the sent-log says, and the exit code.
"""

from __future__ import annotations

import signal
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
    batch_in_background,
    people,
    received_counts,
    wait_until,
    write_csv,
    write_template,
)
from tests.relay import RecordingRelay

OUTAGE_S = 3.0  # how long a relay that comes back stays away
# The retry queues of --retry-delay 1 (up to --max-attempts 5) and of --retry-delay 600.
RETRY_DELAYS_MS = (1000, 4000, 16000, 64000, 600000)


@pytest.fixture
def faulty_job(job):
    """The job fixture, also removing the retry queues these tests declare."""
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
    """The statuses of the recipient's sent-log lines, oldest first."""
    return [row["status"] for row in history(job, recipient)]


def at(row: dict[str, str]) -> datetime:
    """When a sent-log line was written."""
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


def run_meanwhile(
    job, tmp_path, when: Callable[[], bool], action: Callable[[subprocess.Popen], None], *args
) -> tuple[int, str]:
    """Run the job in the background and do action to it once `when()` is true.

    Return the job's exit code and its stderr; the action is skipped if the job ends first.
    """
    stderr_path = tmp_path / f"stderr-{uuid.uuid4().hex[:8]}.txt"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "batch.run", *job.args(*args)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while process.poll() is None and time.monotonic() < deadline:
                if when():
                    action(process)
                    break
                time.sleep(0.2)
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, stderr_path.read_text()


def queue_depth(url: str, queue: str) -> int:
    """How many messages wait in a queue of the broker."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


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

    # Each retry waited its delay: 1 s, then 4 s.
    first_deferred, second_claim, second_deferred, third_claim = map(at, lines[1:5])
    assert (second_claim - first_deferred).total_seconds() >= 0.9
    assert (third_claim - second_deferred).total_seconds() >= 3.6


def test_a_recipient_refused_for_now_waits_in_the_broker_while_the_worker_mails_the_rest(
    faulty_job, tmp_path
):
    job = faulty_job
    source, template, addresses = mailing(tmp_path, 20)
    flaky, others = addresses[0], addresses[1:]
    job.relay.refuse = {flaky: (451, "4.3.0 try again later")}
    retry_queue = f"massmail.{job.campaign}.retry.600000"

    def others_sent() -> bool:
        final = job.final_statuses() if (job.folder / "sent-log.csv").exists() else {}
        return final.get(flaky) == "deferred" and all(final.get(a) == "sent" for a in others)

    waiting = []

    def look_then_interrupt(process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 60
        while queue_depth(job.amqp_url, retry_queue) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        waiting.append(queue_depth(job.amqp_url, retry_queue))
        process.send_signal(signal.SIGTERM)

    # With one worker and a 10-minute retry delay, the others are mailed only if that
    # worker does not sit out the delay itself.
    code, stderr = run_meanwhile(
        job, tmp_path, others_sent, look_then_interrupt,
        source, template, "--workers", "1", "--retry-delay", "600", "--max-attempts", "2",
    )  # fmt: skip

    assert code == 75, stderr
    assert waiting == [1]
    assert statuses(job, flaky) == ["claimed", "deferred"]
    assert job.relay.rcpt_count(flaky) == 1
    assert_sent_once(job, others)


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


def test_with_in_doubt_resend_a_message_whose_answer_is_lost_again_is_not_resent_in_that_run(
    job, tmp_path
):
    source, template, addresses = mailing(tmp_path, 10)
    doubtful = addresses[3]
    job.relay.drop_after_data = lambda message: doubtful in message.rcpt_tos

    # In doubt from the start: resending it in the same run would repeat the loss, unseen.
    first = job.run(source, template, "--workers", "2", "--in-doubt", "resend")

    assert first.returncode == 1, first.stderr
    assert job.relay.received_by(doubtful) == 1
    assert statuses(job, doubtful) == ["claimed", "in-doubt"]
    assert_sent_once(job, [a for a in addresses if a != doubtful])

    # The next run with resend mails it once more, and again leaves it in doubt once.
    again = job.run(source, template, "--workers", "2", "--in-doubt", "resend")

    assert again.returncode == 1, again.stderr
    assert "1 recipient(s) in doubt are mailed again" in again.stderr
    assert job.relay.received_by(doubtful) == 2
    assert statuses(job, doubtful) == ["claimed", "in-doubt", "claimed", "in-doubt"]
    assert job.relay.count() == 11


def test_an_answer_to_data_without_a_reply_code_is_in_doubt_and_never_taken_for_a_4xx(
    job, tmp_path
):
    source, template, addresses = mailing(tmp_path, 5)
    job.relay.data_answer = "queued, thanks"  # the message is in; the line says nothing

    result = job.run(source, template, "--workers", "2", "--retry-delay", "1")

    # A 4xx would be retried and mailed again: after the final "." nobody can know.
    assert result.returncode == 1, result.stderr
    assert received_counts(job.relay) == dict.fromkeys(addresses, 1)
    assert set(job.final_statuses().values()) == {"in-doubt"}
    replies = {row["smtp_reply"] for row in job.sent_log() if row["status"] == "in-doubt"}
    assert all(reply.startswith("unreadable answer to the end of DATA") for reply in replies)


def test_a_pipelined_envelope_refused_after_data_was_taken_never_sends_an_empty_message(
    job, tmp_path
):
    source, template, addresses = mailing(tmp_path, 3)
    job.relay.pipelining = True  # MAIL, RCPT and DATA go in one write, DATA gets its 354
    job.relay.mail_answer = "2.1.0 sender ok"  # no reply code: the client must take it as no

    result = job.run(
        source, template, "--workers", "1", "--retry-delay", "1", "--max-attempts", "2"
    )

    # Ending that DATA with "." would have the relay queue an empty message each time.
    assert result.returncode == 1, result.stderr
    assert job.relay.count() == 0
    assert set(job.final_statuses().values()) == {"failed"}


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
    accepted_before_outage = []

    def outage(_job_process) -> None:
        relay.stop(graceful=True)
        accepted_before_outage.append(relay.count())
        time.sleep(OUTAGE_S)
        relay.start()

    code, stderr = run_meanwhile(
        job, tmp_path, go_down_after(relay, 10).is_set, outage,
        source, template, "--workers", "2", "--reconnect-for", "120",
    )  # fmt: skip

    assert code == 0, stderr
    assert accepted_before_outage and accepted_before_outage[0] < 40
    assert "trying again" in stderr  # the workers did meet the outage
    assert_sent_once(job, addresses)
    # A message cut off before the end of DATA went again under its one claim.
    assert {a: statuses(job, a) for a in addresses} == dict.fromkeys(
        addresses, ["claimed", "sent"]
    )


def test_a_relay_that_goes_away_for_good_stops_the_run_and_a_rerun_finishes_it(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 40)
    relay = job.relay
    code, stderr = run_meanwhile(
        job, tmp_path, go_down_after(relay, 10).is_set, lambda _: relay.stop(graceful=True),
        source, template, "--workers", "2", "--reconnect-for", "3",
    )  # fmt: skip

    assert code == 75, stderr
    counts = received_counts(relay)
    assert 0 < sum(counts.values()) < 40
    assert max(counts.values()) == 1

    relay.start()
    rerun = job.run(source, template, "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert_sent_once(job, addresses)
    # The relay was unreachable, never silent after DATA: nobody was ever in doubt.
    assert [row for row in job.sent_log() if row["status"] == "in-doubt"] == []


def test_a_run_stopped_while_it_waits_out_an_unreachable_relay_leaves_nobody_in_doubt(
    job, tmp_path
):
    source, template, addresses = mailing(tmp_path, 6)
    relay = job.relay

    def go_down_after_two(_message) -> None:
        if relay.count() >= 2:
            relay.closing = True  # every later RCPT: the connection closes, nothing is sent

    relay.on_accept = go_down_after_two
    # The retries would outlast the launcher's patience with a stopping worker (the SMTP
    # timeout and 30 s): the worker must give them up when told to stop.
    args = job.args(
        source, template, "--workers", "1", "--reconnect-for", "600", "--smtp-timeout", "2"
    )
    log_path = tmp_path / "run.log"
    with batch_in_background(args, log_path) as process:
        wait_until(lambda: "trying again in" in log_path.read_text(), "a retry", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(RUN_TIMEOUT_S) == 75, log_path.read_text()

    assert relay.count() == 2
    assert [row for row in job.sent_log() if row["status"] == "in-doubt"] == []
    assert "was killed" not in log_path.read_text()

    relay.on_accept, relay.closing = None, False
    rerun = job.run(source, template, "--workers", "1")

    assert rerun.returncode == 0, rerun.stderr
    assert_sent_once(job, addresses)


def test_a_relay_slow_to_answer_data_keeps_the_broker_connection_alive(job, tmp_path):
    source, template, addresses = mailing(tmp_path, 12)
    slow = set(addresses[:3])
    job.relay.data_delay_s = lambda message: 7.0 if slow & set(message.rcpt_tos) else 0.0

    result = job.run(source, template, "--workers", "2", "--amqp-heartbeat", "2")

    assert result.returncode == 0, result.stderr
    assert_sent_once(job, addresses)
    assert "reconnecting" not in result.stderr
