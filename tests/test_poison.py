"""Messages that break a worker: the campaign goes on, and the sent-log says what happened."""

from __future__ import annotations

import json

import pika

from batch.broker import Broker
from tests.conftest import (
    kill_a_worker_midway,
    people,
    received_counts,
    write_csv,
    write_template,
)


def publish_raw(job, bodies: list[bytes]) -> None:
    """Put messages straight into the campaign's queue, as a buggy producer would."""
    broker = Broker(job.amqp_url, job.campaign, retry_delays_s=(60.0, 240.0, 960.0, 3840.0))
    broker.connect()  # declares the queues with the job's own arguments
    broker.close()
    connection = pika.BlockingConnection(pika.URLParameters(job.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish(
            "", f"massmail.{job.campaign}", body, pika.BasicProperties(delivery_mode=2)
        )
    connection.close()


def test_a_message_no_worker_can_handle_is_set_aside_as_failed_and_the_rest_is_sent(job, tmp_path):
    rows = people(30)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    # The campaign has begun (with the list's first row), so its queue is its own.
    first = job.run(write_csv(tmp_path / "first.csv", rows[:1]), template)
    assert first.returncode == 0, first.stderr
    poison = {"recipient": "broken@example.com", "row": 99, "fields": ["not", "a", "row"]}
    publish_raw(job, [json.dumps(poison).encode(), b"\x00 not even json"])

    result = job.run(source, template, "--workers", "2")

    assert result.returncode == 1, result.stderr
    counts = received_counts(job.relay)
    assert counts["broken@example.com"] == 0
    assert {row["email"]: counts[row["email"]] for row in rows} == {r["email"]: 1 for r in rows}
    statuses = job.final_statuses()
    assert statuses["broken@example.com"] == "failed"
    assert "no recipient's" in result.stderr  # the unreadable one is reported, not lost quietly


def test_a_worker_killed_while_sending_is_replaced_and_only_its_own_message_is_in_doubt(
    slow_job, tmp_path
):
    rows = people(60)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    log_path = tmp_path / "run.log"
    args = slow_job.args(source, template, "--workers", "2")

    code, victim = kill_a_worker_midway(slow_job, args, log_path)

    output = log_path.read_text()
    assert code in (0, 1), output[-3000:]
    assert "stopped with code" in output
    counts = received_counts(slow_job.relay)
    statuses = slow_job.final_statuses()
    assert all(counts[r["email"]] <= 1 for r in rows)
    in_doubt = [a for a, s in statuses.items() if s == "in-doubt"]
    assert len(in_doubt) <= 1
    assert all(statuses[r["email"]] in ("sent", "in-doubt") for r in rows)
    assert all(counts[a] == 1 for a, s in statuses.items() if s == "sent")
    assert all(f"worker {victim} " in row["smtp_reply"] for row in lines_of(slow_job, in_doubt))


def lines_of(job, recipients: list[str]) -> list[dict[str, str]]:
    """The in-doubt lines of these recipients."""
    return [
        row
        for row in job.sent_log()
        if row["recipient"] in recipients and row["status"] == "in-doubt"
    ]
