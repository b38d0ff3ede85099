"""A dry run: every message rendered and the list checked, nothing sent, nothing queued."""

from __future__ import annotations

import pika
import pika.exceptions

from tests.conftest import TEMPLATE, people, write_csv, write_template


def queue_exists(url: str, name: str) -> bool:
    """Ask the broker whether a queue exists, without creating it."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == 404:
            return False
        raise
    finally:
        if connection.is_open:
            connection.close()
    return True


def test_a_dry_run_shows_a_rendered_message_and_sends_and_queues_nothing(job, tmp_path):
    rows = people(40) + [{"email": "not-an-email", "name": "Bad"}]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "Subject: Hello Person 0" in result.stdout
    assert "To: person0@example.com" in result.stdout
    assert "40 messages rendered" in result.stderr
    assert "1 rows refused" in result.stderr
    assert job.relay.count() == 0
    assert not job.folder.exists()
    assert not queue_exists(job.amqp_url, f"massmail.{job.campaign}")


def test_a_dry_run_then_a_real_run_mails_everyone_once(job, tmp_path):
    rows = people(15)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    assert job.run(source, template, "--dry-run").returncode == 0
    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 15
    assert set(job.final_statuses().values()) == {"sent"}


def test_a_dry_run_needs_no_relay_password(job, tmp_path, monkeypatch):
    monkeypatch.delenv("MASSMAIL_SMTP_PASSWORD", raising=False)
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template, "--dry-run", "--smtp-user", "mailer@example.com")

    assert result.returncode == 0, result.stderr
    assert "1 message rendered, 0 could not be" in result.stderr
    assert job.relay.count() == 0


def test_a_dry_run_names_the_file_and_row_of_a_later_recipient_it_cannot_render(job, tmp_path):
    rows = [{**person, "language": "en"} for person in people(10)]
    rows[6]["language"] = "fr"  # on line 8 of the file, after the header and six rows
    source = write_csv(tmp_path / "list.csv", rows)
    # The greeting comes from a table in the template, which has no French.
    template = write_template(
        tmp_path / "template.txt",
        TEMPLATE.replace(
            "Dear {{ name }}", '{{ {"en": "Dear", "de": "Liebe"}[language] }} {{ name }}'
        ),
    )

    result = job.run(source, template, "--dry-run")

    assert result.returncode == 2, result.stderr
    [error] = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert f"{source}: row 8 (person6@example.com): {template}: " in error
    assert "'fr'" in error
    assert "9 messages rendered, 1 could not be" in result.stderr
    assert "To: person0@example.com" in result.stdout  # the first message is still shown
    assert job.relay.count() == 0
    assert not job.folder.exists()


def test_a_dry_run_touches_no_broker_even_an_unreachable_one(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(5))
    template = write_template(tmp_path / "template.txt")
    nowhere = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens on port 1

    result = job.run(source, template, "--dry-run", "--amqp-url", nowhere)

    assert result.returncode == 0, result.stderr
    assert "5 messages rendered" in result.stderr
    assert "To: person0@example.com" in result.stdout
    assert job.relay.count() == 0
    assert not job.folder.exists()
