"""`python -m batch.report`: a campaign's state for the morning check and for auditors."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from batch.ledger import Outcome, Status
from batch.sentlog import SentLog
from batch.sentlog_file import SentLogRows
from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    batch_in_background,
    people,
    wait_until,
    write_csv,
    write_template,
)

REPORT_TIMEOUT_S = 60
EXPORT_COLUMNS = [
    "recipient",
    "status",
    "smtp_code",
    "smtp_reply",
    "message_id",
    "last_timestamp",
]
FORMULA_STARTS = ("=", "+", "-", "@")
COUNT_LINE = re.compile(r"^  (recipients|refused rows|[a-z-]+) +(\d+)\b", re.MULTILINE)


def report(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m batch.report` as a user does; a hang fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "batch.report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=REPORT_TIMEOUT_S,
    )


def counts_in(text: str) -> dict[str, int]:
    """Read the counts a report printed."""
    return {name: int(number) for name, number in COUNT_LINE.findall(text)}


def section(text: str, title: str) -> list[str]:
    """Return the lines listed under `title (n):`."""
    match = re.search(rf"^{title} \(\d+\):\n((?:  .*\n?)*)", text, re.MULTILINE)
    return match.group(1).splitlines() if match else []


def read_export(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == EXPORT_COLUMNS
    assert all(len(row) == len(EXPORT_COLUMNS) for row in rows)
    return [dict(zip(EXPORT_COLUMNS, row, strict=True)) for row in rows[1:]]


def finish_a_campaign_with_failures(job, tmp_path) -> list[str]:
    """Mail 40 recipients: 3 refused for good, 2 left in doubt, and 2 bad rows."""
    rows = people(38) + [{"email": "=cmd@example.com", "name": "Formula"}]
    rows += [{"email": "no address", "name": "x"}, {"email": "person5@example.com", "name": "y"}]
    rows.append({"email": "-dash@example.com", "name": "Dash"})
    for address in ("person3@example.com", "person13@example.com", "-dash@example.com"):
        job.relay.refuse[address] = (550, "5.1.1 no such user")
    doubtful = {"person7@example.com", "=cmd@example.com"}
    job.relay.drop_after_data = lambda message: bool(doubtful & set(message.rcpt_tos))
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_template(tmp_path / "template.txt")

    result = job.run(source, template, "--workers", "2")

    assert result.returncode == 1, result.stderr
    return [r["email"] for r in rows if "@" in r["email"] and r["name"] != "y"]


def test_the_report_of_a_finished_campaign_counts_each_recipient_by_its_last_line(job, tmp_path):
    addresses = finish_a_campaign_with_failures(job, tmp_path)

    result = report("--state-dir", str(job.state_dir), "--campaign", job.campaign)

    assert result.returncode == 0, result.stderr
    counts = counts_in(result.stdout)
    truth = Counter(job.final_statuses().values())
    assert truth == {"sent": 35, "failed": 3, "in-doubt": 2}
    assert counts == {"recipients": 40, **truth, "refused rows": 2}
    # The relay accepted the sent ones and, unknown to the job, the two in doubt.
    assert counts["sent"] == job.relay.count() - 2
    assert len(addresses) == 40

    # Each failed and in-doubt recipient with its Message-ID and the relay's reply.
    last_lines = {row["recipient"]: row for row in job.sent_log()}
    failed = section(result.stdout, "failed")
    assert len(failed) == 3
    for line in failed:
        recipient = line.split()[0]
        assert last_lines[recipient]["status"] == "failed"
        assert last_lines[recipient]["message_id"] in line
        assert "550 5.1.1 no such user" in line
    relay_ids = {m.rcpt_tos[0]: m.message_id for m in job.relay.messages()}
    in_doubt = section(result.stdout, "in doubt")
    assert {line.split()[0] for line in in_doubt} == {"person7@example.com", "=cmd@example.com"}
    for line in in_doubt:
        assert relay_ids[line.split()[0]] == line.split()[1]

    # Named by its folder, the campaign gets the same report.
    by_folder = report(str(job.folder))
    assert by_folder.returncode == 0, by_folder.stderr
    assert by_folder.stdout == result.stdout


def test_the_auditors_export_has_one_spreadsheet_safe_row_per_recipient(job, tmp_path):
    addresses = finish_a_campaign_with_failures(job, tmp_path)
    export = tmp_path / "audit.csv"

    result = report(str(job.folder), "--csv", str(export))

    assert result.returncode == 0, result.stderr
    rows = read_export(export)
    assert sorted(row["recipient"].removeprefix("'") for row in rows) == sorted(addresses)
    assert all(not cell.startswith(FORMULA_STARTS) for row in rows for cell in row.values())
    assert {"'=cmd@example.com", "'-dash@example.com"} <= {row["recipient"] for row in rows}

    # Each row is the recipient's last sent-log line; a sent one names what the relay got.
    last_lines = {row["recipient"]: row for row in job.sent_log()}
    relay_ids = {m.rcpt_tos[0]: m.message_id for m in job.relay.messages()}
    for row in rows:
        last = last_lines[row["recipient"].removeprefix("'")]
        assert (row["status"], row["smtp_code"], row["last_timestamp"]) == (
            last["status"],
            last["smtp_code"],
            last["timestamp"],
        )
        assert row["message_id"] == last["message_id"] != ""
        if row["status"] == "sent":
            assert relay_ids[last["recipient"]] == row["message_id"]
            assert row["smtp_reply"].startswith("250")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_report_taken_while_the_job_runs_shows_part_sent_and_well_formed_rows(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(300))
    template = write_template(tmp_path / "template.txt")
    args = job.args(source, template, "--workers", "2")
    export = tmp_path / "midway.csv"

    # The relay holds its answers after 30 messages: both workers wait, each with one claimed.
    with (
        job.relay.held_after(30) as hold,
        batch_in_background(args, tmp_path / "run.log") as process,
    ):
        wait_until(lambda: job.relay.count() == 32, "both workers wait for the relay", process)
        midway = report(str(job.folder), "--csv", str(export))
        hold.release()
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0

    assert midway.returncode == 0, midway.stderr
    assert counts_in(midway.stdout) == {
        "recipients": 300,
        "sent": 30,
        "claimed": 2,
        "queued": 268,
        "refused rows": 0,
    }
    rows = read_export(export)
    assert len(rows) == len({row["recipient"] for row in rows}) == 300
    assert Counter(row["status"] for row in rows) == {"sent": 30, "claimed": 2, "queued": 268}

    # Once the relay answers again, the run ends and the report has everyone sent.
    after = report(str(job.folder), "--csv", str(export))
    assert after.returncode == 0, after.stderr
    assert counts_in(after.stdout) == {"recipients": 300, "sent": 300, "refused rows": 0}
    assert {row["status"] for row in read_export(export)} == {"sent"}
    assert job.relay.count() == 300


def test_a_recipient_resent_under_the_lists_other_spelling_is_counted_once_by_her_first(
    job, tmp_path
):
    template = write_template(tmp_path / "template.txt")
    job.relay.drop_after_data = lambda message: "ann@xn--bcher-kva.example" in message.rcpt_tos
    rows = [{"email": "ann@bücher.example", "name": "Ann"}, *people(2)]
    assert job.run(write_csv(tmp_path / "list.csv", rows), template).returncode == 1

    # The list re-exported with the domain in ASCII; the one in doubt is sent again.
    job.relay.drop_after_data = False
    rows[0]["email"] = "Ann@xn--bcher-kva.example"
    again = job.run(write_csv(tmp_path / "again.csv", rows), template, "--in-doubt", "resend")
    assert again.returncode == 0, again.stderr
    assert {row["recipient"] for row in job.sent_log()} == {
        "ann@bücher.example",
        "ann@xn--bcher-kva.example",
        "person0@example.com",
        "person1@example.com",
    }
    export = tmp_path / "audit.csv"

    result = report(str(job.folder), "--csv", str(export))

    assert result.returncode == 0, result.stderr
    assert counts_in(result.stdout) == {"recipients": 3, "sent": 3, "refused rows": 0}
    assert section(result.stdout, "in doubt") == []
    standings = {row["recipient"]: row for row in read_export(export)}
    assert sorted(standings) == [
        "ann@bücher.example",
        "person0@example.com",
        "person1@example.com",
    ]
    resent = [m for m in job.relay.messages() if m.rcpt_tos == ("ann@xn--bcher-kva.example",)]
    assert standings["ann@bücher.example"]["message_id"] == resent[-1].message_id


def test_a_last_line_still_being_written_is_left_for_the_next_look(tmp_path):
    folder = tmp_path / "state" / "spring"
    folder.mkdir(parents=True)
    ledger = SentLog(folder / "sent-log.csv", "spring")
    for n in range(3):
        ledger.claim(f"p{n}@example.com", f"<{n}@example.com>")
        ledger.record(f"p{n}@example.com", f"<{n}@example.com>", Outcome(Status.SENT, 250, "ok"))
    ledger.sync()
    ledger.close()
    with (folder / "sent-log.csv").open("a", encoding="utf-8") as file:
        file.write('2026-12-03T02:00:00.000+00:00,spring,p9@example.com,failed,550,"5.1.1 no')
    assert len(list(SentLogRows(folder / "sent-log.csv"))) == 6  # the partial line is left out

    result = report(str(folder), "--csv", str(tmp_path / "audit.csv"))

    assert result.returncode == 0, result.stderr
    assert counts_in(result.stdout) == {"recipients": 3, "sent": 3}
    assert "bytes of a line being written" in result.stdout
    assert [row["recipient"] for row in read_export(tmp_path / "audit.csv")] == [
        "p0@example.com",
        "p1@example.com",
        "p2@example.com",
    ]


def test_campaign_files_saved_back_by_a_spreadsheet_end_the_report_with_70_naming_them(
    tmp_path,
):
    folder = tmp_path / "state" / "spring"
    folder.mkdir(parents=True)
    ledger = SentLog(folder / "sent-log.csv", "spring")
    ledger.claim("p0@example.com", "<0@example.com>")
    ledger.record("p0@example.com", "<0@example.com>", Outcome(Status.SENT, 250, "ok"))
    ledger.sync()
    ledger.close()
    rejected = folder / "rejected.csv"
    rejected.write_bytes("row,value,reason\n3,caf\xe9,not a valid address\n".encode("cp1252"))

    result = report(str(folder))

    assert result.returncode == 70, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{rejected}: cannot read the refused rows:" in result.stderr

    # A quote left open swallows the lines below it, which a reader must not take for one.
    rejected.unlink()
    with (folder / "sent-log.csv").open("a", encoding="utf-8") as file:
        file.write('2026-12-03T02:00:00.000+00:00,spring,p1@example.com,failed,550,"5.1.1\n')
        file.write("2026-12-03T02:00:01.000+00:00,spring,p2@example.com,sent,250,ok,,w\n" * 3000)

    result = report(str(folder))

    assert result.returncode == 70, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{folder / 'sent-log.csv'}: line " in result.stderr
    assert "the file is damaged" in result.stderr


def test_a_campaign_that_does_not_exist_ends_the_report_with_exit_code_2(tmp_path):
    (tmp_path / "state" / "empty").mkdir(parents=True)

    for args in (
        ["--state-dir", str(tmp_path / "state"), "--campaign", "nightly-1999-12-31"],
        [str(tmp_path / "state" / "empty")],
        ["--state-dir", str(tmp_path / "state")],
    ):
        result = report(*args)
        assert result.returncode == 2, args
        assert result.stdout == ""
        assert result.stderr.startswith("error: "), result.stderr
