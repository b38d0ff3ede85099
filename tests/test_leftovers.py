"""A rerun with other options meets the messages an interrupted run left in the queue.

Workers start taking messages before the loader has read the list, so what decides
whether a leftover message may go out is checked where each message is taken: the
limit by the recipient's place in the list, the suppression list by the claim.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pika

from tests.conftest import (
    RUN_TIMEOUT_S,
    batch_in_background,
    people,
    received_counts,
    wait_until,
    write_csv,
    write_template,
)

COUNT = 40
STOPPING = "stopping: finishing the message in hand"  # a worker's debug line


def deferred(job, recipient: str) -> bool:
    """Tell whether the recipient's last sent-log line says deferred."""
    log = job.folder / "sent-log.csv"
    return log.exists() and job.final_statuses().get(recipient) == "deferred"


def interrupt_with_a_full_queue(job, source: Path, template: Path, log_path: Path) -> set[str]:
    """Run the job, stop it with SIGTERM while most messages are queued; return whom it mailed.

    The relay answers two messages and holds the next answers, so both workers are stuck
    in a message while the loader queues the whole list; the answers come once both
    workers have stopped taking messages.
    """
    args = job.args(source, template, "--workers", "2", "-v")
    with job.relay.held_after(2) as hold, batch_in_background(args, log_path) as process:
        wait_until(hold.holding.is_set, "a message was held", process)
        wait_until((job.folder / "loaded.json").exists, "the list was queued", process)
        os.kill(process.pid, signal.SIGTERM)
        wait_until(lambda: log_path.read_text().count(STOPPING) == 2, "both workers", process)
        hold.release()
        assert process.wait(RUN_TIMEOUT_S) == 75, log_path.read_text()
    mailed = set(received_counts(job.relay))
    assert len(mailed) <= 4, f"{len(mailed)} mailed: the queue was not full when the run stopped"
    assert queued_messages(job) == COUNT - len(mailed)  # the rerun meets all the others
    return mailed


def queued_messages(job, queue: str | None = None) -> int:
    """Count the messages waiting in a queue, by default the campaign's."""
    connection = pika.BlockingConnection(pika.URLParameters(job.amqp_url))
    try:
        declared = connection.channel().queue_declare(
            queue or f"massmail.{job.campaign}", passive=True
        )
    finally:
        connection.close()
    return declared.method.message_count


def test_a_rerun_with_a_limit_mails_only_the_first_n_though_the_queue_holds_more(job, tmp_path):
    rows = people(COUNT)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    addresses = [r["email"] for r in rows]
    mailed = interrupt_with_a_full_queue(job, source, template, tmp_path / "first.log")

    limited = job.run(source, template, "--workers", "2", "--limit", "10")

    assert limited.returncode == 0, limited.stderr
    assert received_counts(job.relay) == dict.fromkeys(mailed | set(addresses[:10]), 1)
    left = len(set(addresses[10:]) - mailed)
    assert f"{left} left for a later run by --limit 10" in limited.stderr

    rest = job.run(source, template, "--workers", "2")

    assert rest.returncode == 0, rest.stderr
    assert received_counts(job.relay) == dict.fromkeys(addresses, 1)
    assert set(job.final_statuses().values()) == {"sent"}


def test_a_rerun_with_a_limit_does_not_wait_for_a_recipient_past_it_left_deferred(job, tmp_path):
    rows = people(COUNT)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    late = "person30@example.com"
    job.relay.refuse = {late: (451, "4.3.0 try again later")}

    # The first run sends everyone else; the late one waits a minute in a retry queue.
    args = job.args(source, template, "--workers", "2", "--retry-delay", "60")
    log_path = tmp_path / "first.log"
    with batch_in_background(args, log_path) as process:
        wait_until(lambda: deferred(job, late), "the deferral", process)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(RUN_TIMEOUT_S) == 75, log_path.read_text()
    assert job.relay.count() == COUNT - 1

    # Past the limit, it is not this run's to wait for: the run ends at once.
    limited = job.run(source, template, "--workers", "2", "--limit", "10")

    assert limited.returncode == 0, limited.stderr
    assert "1 left for a later run by --limit 10" in limited.stderr
    assert job.relay.count() == COUNT - 1

    job.relay.refuse = {}
    rest = job.run(source, template, "--workers", "2")

    assert rest.returncode == 0, rest.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)


def test_a_suppressed_address_left_queued_by_an_earlier_run_is_never_mailed(job, tmp_path):
    rows = people(COUNT)
    template = write_template(tmp_path / "template.txt")
    first_source = write_csv(tmp_path / "list.csv", rows)
    mailed = interrupt_with_a_full_queue(job, first_source, template, tmp_path / "first.log")

    # The operator takes two people off the list and onto the suppression list. Their
    # messages are still queued: only the claim can stop them now.
    gone = {"person29@example.com", "person39@example.com"}
    assert not gone & mailed
    source = write_csv(tmp_path / "list.csv", [r for r in rows if r["email"] not in gone])
    suppress = tmp_path / "suppressed.txt"
    suppress.write_text("Person29@Example.com\nperson39@example.com\n", encoding="utf-8")

    result = job.run(source, template, "--workers", "2", "--suppress", str(suppress))

    assert result.returncode == 0, result.stderr
    counts = received_counts(job.relay)
    assert counts["person29@example.com"] == counts["person39@example.com"] == 0
    assert counts == dict.fromkeys([r["email"] for r in rows if r["email"] not in gone], 1)
    statuses = job.final_statuses()
    assert statuses["person29@example.com"] == statuses["person39@example.com"] == "suppressed"
    suppressed = [row for row in job.sent_log() if row["status"] == "suppressed"]
    assert all(str(suppress) in row["smtp_reply"] for row in suppressed)


def test_a_rerun_without_the_suppression_list_suppresses_nobody_new(job, tmp_path):
    rows, template = people(6), write_template(tmp_path / "template.txt")
    source = write_csv(tmp_path / "list.csv", rows)
    suppress = tmp_path / "suppressed.txt"
    suppress.write_text("person1@example.com\n", encoding="utf-8")
    assert job.run(source, template, "--suppress", str(suppress), "--limit", "1").returncode == 0

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)


def test_a_message_the_broker_took_back_too_often_is_sent_not_failed(job, tmp_path):
    rows = people(COUNT)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    mailed = interrupt_with_a_full_queue(job, source, template, tmp_path / "first.log")

    # Runs that stop while holding the messages (the relay down night after night) hand
    # them back unacked each time; past the delivery limit the broker sets them aside.
    queue, dead_queue = f"massmail.{job.campaign}", f"massmail.{job.campaign}.dead"
    for _ in range(40):
        if not queued_messages(job, queue):
            break
        connection = pika.BlockingConnection(pika.URLParameters(job.amqp_url))
        channel = connection.channel()
        while channel.basic_get(queue)[0] is not None:  # taken, never acked
            pass
        connection.close()
    assert queued_messages(job, dead_queue) == COUNT - len(mailed)
    # One of them still queued, as the ones handed back less often would be: the rerun then
    # takes the queue for the list's (the loader publishes nothing again).
    connection = pika.BlockingConnection(pika.URLParameters(job.amqp_url))
    channel = connection.channel()
    method, _, body = channel.basic_get(dead_queue)
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    channel.basic_ack(method.delivery_tag)
    connection.close()

    rerun = job.run(source, template, "--workers", "2")

    assert rerun.returncode == 0, rerun.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)
    assert set(job.final_statuses().values()) == {"sent"}


def test_a_campaign_queued_from_another_state_folder_is_refused_and_mails_nobody_twice(
    job, tmp_path
):
    rows = people(COUNT)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    mailed = interrupt_with_a_full_queue(job, source, template, tmp_path / "first.log")

    # The same campaign from another folder (a relative --state-dir run elsewhere, a
    # second host): its empty sent-log knows nobody the first one mailed.
    elsewhere = dataclasses.replace(job, state_dir=tmp_path / "elsewhere")
    refused = elsewhere.run(source, template, "--workers", "2")

    assert refused.returncode == 2, refused.stderr
    assert f"the broker holds {COUNT - len(mailed)} of its messages" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert job.relay.count() == len(mailed)
    assert not (elsewhere.folder / "sent-log.csv").exists()  # refused again next time

    resumed = job.run(source, template, "--workers", "2")

    assert resumed.returncode == 0, resumed.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)
