"""The whole job, as a user runs it: list -> RabbitMQ -> workers -> relay -> sent-log."""

from __future__ import annotations

import csv
import email
import email.policy
import sqlite3
import uuid

import openpyxl

from tests.conftest import (
    delete_queues,
    people,
    received_counts,
    run_batch,
    write_csv,
    write_template,
)


def assert_each_sent_once(job, addresses, campaign=None):
    """Every address was accepted exactly once and the sent-log says `sent` for it."""
    counts = received_counts(job.relay)
    assert {a: counts[a] for a in addresses} == dict.fromkeys(addresses, 1)
    statuses = job.final_statuses(campaign)
    assert {a: statuses.get(a) for a in addresses} == dict.fromkeys(addresses, "sent")
    sent_rows = [r for r in job.sent_log(campaign) if r["status"] == "sent"]
    assert len(sent_rows) == len(addresses)


def test_every_recipient_of_a_2000_row_csv_gets_exactly_one_message(job, tmp_path):
    rows = people(2000)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template, "--workers", "8")

    assert result.returncode == 0, result.stderr
    assert_each_sent_once(job, [r["email"] for r in rows])
    assert job.relay.count() == 2000


def test_the_sent_log_records_code_reply_and_a_message_id_the_relay_saw(job, tmp_path):
    rows = people(20)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    assert job.run(source, template, "--workers", "2").returncode == 0

    seen_ids = {m.message_id: m.rcpt_tos[0] for m in job.relay.messages()}
    for row in job.sent_log():
        if row["status"] != "sent":
            continue
        assert row["campaign"] == job.campaign
        assert row["smtp_code"] == "250"
        assert row["timestamp"].endswith("+00:00")
        assert seen_ids[row["message_id"]] == row["recipient"]


def test_messages_are_rendered_from_the_template_with_the_rows_columns(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", [{"email": "Ann@Example.com ", "name": "Ann Lee"}])
    template = write_template(tmp_path / "template.txt")

    assert job.run(source, template, "--workers", "1").returncode == 0

    [accepted] = job.relay.messages()
    message = email.message_from_bytes(accepted.content, policy=email.policy.default)
    assert accepted.rcpt_tos == ("ann@example.com",)
    assert accepted.mail_from == "sender@example.com"
    assert message["Subject"] == "Hello Ann Lee"
    assert message["To"] == "ann@example.com"
    assert "Dear Ann Lee," in message.get_content()


def test_a_300_row_excel_list_is_mailed_once_each(job, tmp_path):
    rows = people(300)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["Email", "Name"])
    for row in rows:
        sheet.append([row["email"], row["name"]])
    workbook.save(tmp_path / "list.xlsx")
    template = write_template(
        tmp_path / "template.txt", "From: a@example.com\nSubject: Hi\n\nHi {{ Name }}\n"
    )

    result = job.run(tmp_path / "list.xlsx", template, "--workers", "8")

    assert result.returncode == 0, result.stderr
    assert_each_sent_once(job, [r["email"] for r in rows])


def test_a_300_row_sqlite_table_is_mailed_once_each(job, tmp_path):
    rows = people(300)
    database = sqlite3.connect(tmp_path / "list.db")
    database.execute("CREATE TABLE recipients (email TEXT, name TEXT)")
    database.executemany("INSERT INTO recipients VALUES (:email, :name)", rows)
    database.commit()
    database.close()
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.db", template, "--workers", "8")

    assert result.returncode == 0, result.stderr
    assert_each_sent_once(job, [r["email"] for r in rows])


def test_a_query_picks_the_sqlite_rows_to_mail(job, tmp_path):
    database = sqlite3.connect(tmp_path / "list.sqlite")
    database.execute("CREATE TABLE members (mail TEXT, name TEXT, active INTEGER)")
    database.executemany(
        "INSERT INTO members VALUES (?, ?, ?)",
        [("on@example.com", "On", 1), ("off@example.com", "Off", 0)],
    )
    database.commit()
    database.close()
    template = write_template(
        tmp_path / "template.txt", "From: a@example.com\nSubject: x\n\nHi {{ name }}\n"
    )

    result = job.run(
        tmp_path / "list.sqlite", template,
        "--query", "SELECT mail, name FROM members WHERE active = 1",
        "--email-column", "MAIL",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {"on@example.com": 1}


def test_rerunning_a_finished_campaign_sends_nothing(job, tmp_path):
    rows = people(200)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    assert job.run(source, template, "--workers", "4").returncode == 0
    log_before = job.sent_log()

    result = job.run(source, template, "--workers", "4")

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 200
    assert job.sent_log() == log_before


def test_a_second_campaign_on_the_same_list_sends_again(job, tmp_path):
    rows = people(50)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")
    assert job.run(source, template, "--workers", "2").returncode == 0

    second = f"{job.campaign}-b"
    args = job.args(source, template, "--workers", "2")
    args[args.index(job.campaign)] = second
    try:
        result = run_batch(args)
    finally:
        delete_queues(job.amqp_url, second)

    assert result.returncode == 0, result.stderr
    assert set(received_counts(job.relay).values()) == {2}
    assert_each_sent_once_in(job, second, [r["email"] for r in rows])


def assert_each_sent_once_in(job, campaign, addresses):
    statuses = job.final_statuses(campaign)
    assert {a: statuses.get(a) for a in addresses} == dict.fromkeys(addresses, "sent")


def test_without_a_campaign_the_same_command_resumes_the_same_mailing(job, tmp_path):
    rows = people(30)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    first = job.run(source, template, campaign=False)
    second = job.run(source, template, campaign=False)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert job.relay.count() == 30
    [folder] = list(job.state_dir.iterdir())
    assert folder.name.startswith("auto-")
    delete_queues(job.amqp_url, folder.name)


def test_duplicate_and_malformed_rows_are_reported_and_never_stop_the_run(job, tmp_path):
    rows = people(10) + [
        {"email": " PERSON3@example.com", "name": "Again"},
        {"email": "not-an-email", "name": "Bad"},
        {"email": "", "name": "Empty"},
    ]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert_each_sent_once(job, [r["email"] for r in rows[:10]])
    with (job.folder / "rejected.csv").open(newline="") as file:
        rejected = {row["row"]: row for row in csv.DictReader(file)}
    assert set(rejected) == {"12", "13", "14"}
    assert "duplicate of row 5" in rejected["12"]["reason"]
    assert rejected["13"]["value"] == "not-an-email"
    assert "3 rows refused" in result.stderr


def test_an_unreachable_broker_is_a_temporary_failure_that_names_it(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_template(tmp_path / "template.txt")
    args = job.args(source, template)
    args[args.index(job.amqp_url)] = "amqp://guest:secret-pw@127.0.0.1:1/%2F"

    result = run_batch(args)

    assert result.returncode == 75
    assert "127.0.0.1:1" in result.stderr
    assert "secret-pw" not in result.stderr
    assert job.relay.count() == 0


def test_an_unreachable_relay_is_a_temporary_failure_and_nothing_is_queued(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_template(tmp_path / "template.txt")
    args = job.args(source, template)
    args[args.index(str(job.relay.port))] = "1"

    result = run_batch(args)

    assert result.returncode == 75, result.stderr
    assert "127.0.0.1:1" in result.stderr


def test_a_template_using_a_missing_column_stops_before_anything_is_sent(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_template(
        tmp_path / "template.txt", "From: a@example.com\nSubject: {{ nmae }}\n\nx\n"
    )

    result = job.run(source, template)

    assert result.returncode == 2
    assert "nmae" in result.stderr
    assert job.relay.count() == 0


def test_a_random_campaign_name_is_refused_with_the_rule(tmp_path, amqp_url, relay):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_template(tmp_path / "template.txt")

    result = run_batch(
        ["--source", str(source), "--template", str(template), "--campaign", f"a b{uuid.uuid4()}"]
    )

    assert result.returncode == 2
    assert "--campaign" in result.stderr
