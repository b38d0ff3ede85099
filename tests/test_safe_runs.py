"""Runs an operator holds back: --limit, --rate, --max-per-connection and --suppress."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from tests.conftest import (
    delete_queues,
    kill_a_worker_midway,
    people,
    received_counts,
    write_csv,
    write_template,
)
from tests.test_report import report

# How unevenly a loaded machine may delay messages after their send slots.
JITTER_S = 1.0


def list_and_template(tmp_path: Path, count: int):
    """Write a list of count people and the standard template."""
    rows = people(count)
    source = write_csv(tmp_path / "list.csv", rows)
    return rows, source, write_template(tmp_path / "template.txt")


def assert_no_faster_than(relay, rate_per_s: float) -> None:
    """Check that the relay received its messages no faster than rate_per_s, all together.

    Slots are 1/rate apart, but a message reaches the relay a little after its slot, and a
    loaded machine makes that delay uneven: a second of it is allowed. A slower run passes;
    only a pace kept per worker, which multiplies the rate, can fail this.
    """
    times = sorted(m.received_at for m in relay.messages())
    allowed_s = (len(times) - 1) / rate_per_s - JITTER_S
    taken_s = times[-1] - times[0]
    assert taken_s >= allowed_s, (
        f"{len(times)} messages in {taken_s:.2f} s: faster than {rate_per_s:g}/s asked"
    )


def senders(job) -> set[str]:
    """Name the workers that sent at least one message, as the sent-log records them."""
    return {line["worker"] for line in job.sent_log() if line["status"] == "sent"}


def test_limit_sends_to_the_first_n_and_a_later_run_without_it_sends_the_rest(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 50)
    first, rest = [r["email"] for r in rows[:20]], [r["email"] for r in rows[20:]]

    limited = job.run(source, template, "--workers", "3", "--limit", "20")

    assert limited.returncode == 0, limited.stderr
    assert received_counts(job.relay) == dict.fromkeys(first, 1)
    assert set(job.final_statuses()) == set(first)
    assert "30 left for a later run by --limit 20" in limited.stderr

    again = job.run(source, template, "--workers", "3", "--limit", "20")

    assert again.returncode == 0, again.stderr
    assert job.relay.count() == 20  # the same first 20, all settled: nothing more

    rest_run = job.run(source, template, "--workers", "3")

    assert rest_run.returncode == 0, rest_run.stderr
    assert received_counts(job.relay) == dict.fromkeys(first + rest, 1)
    assert set(job.final_statuses().values()) == {"sent"}


def test_the_rate_limit_holds_for_all_workers_together(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 120)

    result = job.run(source, template, "--workers", "4", "--rate", "20/s")

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)
    assert len(senders(job)) >= 2  # a pace is only shared where several workers send
    # Four workers each allowed 20/s would send the 120 in 1.5 s; sharing one pace, they take
    # 119 / 20 s at the least. How close to 20/s it gets is measured in scripts/bench.
    assert_no_faster_than(job.relay, 20)


def test_the_rate_limit_is_per_minute_when_asked_so(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 12)

    result = job.run(source, template, "--workers", "2", "--rate", "120/min")

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)
    # 120 a minute is 2 a second: the 12 take 5.5 s at the least; 120 a second would take 0.1 s.
    assert_no_faster_than(job.relay, 2)


def test_a_session_never_carries_more_than_max_per_connection_messages(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 60)

    result = job.run(source, template, "--workers", "2", "--max-per-connection", "7")

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)
    per_connection = Counter(message.connection for message in job.relay.messages())
    assert max(per_connection.values()) <= 7
    # Each worker fills its sessions before it opens another: at most one part-filled each.
    assert len(per_connection) <= math.ceil(60 / 7) + 1


def test_suppressed_addresses_are_never_mailed_and_are_logged_suppressed(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 30)
    suppress = tmp_path / "suppressed.txt"
    suppress.write_text(
        "# asked not to be mailed\nPerson3@Example.com\nPerson 7 <person7@example.com>\n"
        "nobody@elsewhere.example\n",
        encoding="utf-8",
    )

    result = job.run(source, template, "--workers", "2", "--suppress", str(suppress))

    assert result.returncode == 0, result.stderr
    counts = received_counts(job.relay)
    assert counts["person3@example.com"] == 0 and counts["person7@example.com"] == 0
    assert sum(counts.values()) == 28 and set(counts.values()) == {1}
    statuses = job.final_statuses()
    assert statuses["person3@example.com"] == statuses["person7@example.com"] == "suppressed"
    assert [s for s in statuses.values() if s != "sent"] == ["suppressed"] * 2
    assert "2 suppressed" in result.stderr


def test_a_csv_suppression_list_with_an_email_column_is_read_too(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 10)
    suppress = write_csv(
        tmp_path / "suppressed.csv", [{"since": "2026-01-01", "Email": "person4@example.com"}]
    )

    result = job.run(source, template, "--suppress", str(suppress))

    assert result.returncode == 0, result.stderr
    assert received_counts(job.relay)["person4@example.com"] == 0
    assert job.final_statuses()["person4@example.com"] == "suppressed"
    assert job.relay.count() == 9


def test_a_csv_suppression_list_with_a_quote_left_open_stops_the_run_naming_its_line(
    job, tmp_path
):
    rows, source, template = list_and_template(tmp_path, 10)
    suppress = tmp_path / "suppressed.csv"
    # The open quote would swallow person5 and person6 into one field, and they be mailed,
    # whether it stays open to the end or a later value closes it.
    for ending, problem in (("", "unexpected end of data"), ("6'2\"", "a quoted value runs over")):
        suppress.write_text(
            'email,note\nperson4@example.com,"moved\nperson5@example.com,\n'
            f"person6@example.com,{ending}\n"
        )

        result = job.run(source, template, "--suppress", str(suppress))

        assert result.returncode == 2, result.stderr
        assert f"{suppress}: line 2: not readable as CSV: {problem}" in result.stderr
        assert job.relay.count() == 0


def test_a_text_suppression_list_whose_first_line_holds_a_comma_is_not_taken_for_a_csv(
    job, tmp_path
):
    rows, source, template = list_and_template(tmp_path, 10)
    suppress = tmp_path / "suppressed.txt"
    suppress.write_text('"Four, Person" <person4@example.com>\nperson5@example.com\n')

    result = job.run(source, template, "--suppress", str(suppress))

    assert result.returncode == 0, result.stderr
    counts = received_counts(job.relay)
    assert counts["person4@example.com"] == counts["person5@example.com"] == 0
    assert job.relay.count() == 8
    assert "2 suppressed" in result.stderr


def test_a_slow_rate_runs_only_the_workers_it_can_keep_busy(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 1)

    result = job.run(source, template, "--workers", "8", "--rate", "1/min")

    # A worker waits for its slot holding a message: eight at one a minute would hold some
    # for eight minutes. Five minutes' worth is the most any worker waits.
    assert result.returncode == 0, result.stderr
    assert "5 workers instead of 8" in result.stderr
    assert ", 5 workers," in result.stderr  # the start banner
    assert received_counts(job.relay) == {rows[0]["email"]: 1}


def test_a_slow_paced_run_never_takes_the_messages_its_workers_hold_for_lost(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 3)

    # One every 12 s: the sent-log stays quiet longer than the launcher waits, by default,
    # before it queues again what is neither queued nor claimed. The worker holds the rest.
    result = job.run(source, template, "--workers", "1", "--rate", "5/min")

    assert result.returncode == 0, result.stderr
    assert "queuing them again" not in result.stderr
    assert received_counts(job.relay) == dict.fromkeys([r["email"] for r in rows], 1)
    assert_no_faster_than(job.relay, 5 / 60)


def test_addresses_refused_for_good_are_exported_and_then_suppressed(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 12)
    job.relay.refuse = {
        "person1@example.com": (550, "5.1.1 no such user"),
        "person2@example.com": (554, "5.7.1 message looks like spam"),
    }
    suppress = tmp_path / "suppressed.txt"
    suppress.write_text("person9@example.com\n", encoding="utf-8")

    first = job.run(source, template, "--suppress", str(suppress))
    exported = report(str(job.folder), "--export-refused", str(suppress))

    assert first.returncode == 1, first.stderr  # two failed
    assert exported.returncode == 0, exported.stderr
    # The unknown user is suppressed from now on; a refusal of the content is not the address's.
    assert suppress.read_text(encoding="utf-8").splitlines() == [
        "person9@example.com",
        "person1@example.com",
    ]
    assert "1 added to" in exported.stdout

    job.relay.refuse = {}
    job.campaign += "-next"
    try:
        second = job.run(source, template, "--suppress", str(suppress))
    finally:
        delete_queues(job.amqp_url, job.campaign)
    assert second.returncode == 0, second.stderr
    counts = received_counts(job.relay)
    assert counts["person1@example.com"] == 0 and counts["person9@example.com"] == 0
    assert counts["person2@example.com"] == 1  # refused once, then mailed by the next campaign
    assert job.final_statuses()["person1@example.com"] == "suppressed"
    assert "2 suppressed" in second.stderr


def test_an_export_to_a_suppression_list_that_cannot_be_written_ends_with_2_naming_it(
    job, tmp_path
):
    rows, source, template = list_and_template(tmp_path, 3)
    job.relay.refuse = {"person1@example.com": (550, "5.1.1 no such user")}
    assert job.run(source, template).returncode == 1
    unwritable = tmp_path / "no-such-folder" / "suppressed.txt"
    not_utf8 = tmp_path / "suppressed.txt"
    not_utf8.write_bytes(b"caf\xe9@example.com\n")

    for path, problem in ((unwritable, "No such file"), (not_utf8, "can't decode byte 0xe9")):
        exported = report(str(job.folder), "--export-refused", str(path))

        assert exported.returncode == 2, exported.stderr
        assert "Traceback" not in exported.stderr
        assert f"{path}: cannot " in exported.stderr and problem in exported.stderr
    assert not_utf8.read_bytes() == b"caf\xe9@example.com\n"


def test_an_unreadable_suppression_list_stops_the_run_before_anything_is_sent(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(5))
    template = write_template(tmp_path / "template.txt")
    missing = tmp_path / "no-such-list.txt"

    result = job.run(source, template, "--suppress", str(missing))

    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert job.relay.count() == 0


def test_a_paced_run_goes_on_at_its_rate_after_a_worker_is_killed(job, tmp_path):
    rows, source, template = list_and_template(tmp_path, 120)
    log_path = tmp_path / "job.log"
    args = job.args(source, template, "--workers", "3", "--rate", "15/s")

    code, victim = kill_a_worker_midway(job, args, log_path)

    output = log_path.read_text()
    assert code in (0, 1), output[-3000:]
    assert f"(pid {victim}) stopped with code" in output
    counts = received_counts(job.relay)
    statuses = job.final_statuses()
    assert all(counts[r["email"]] <= 1 for r in rows)
    assert all(statuses[r["email"]] in ("sent", "in-doubt") for r in rows)
    assert sum(s == "in-doubt" for s in statuses.values()) <= 1
    # Killed early on, the worker leaves two to go on alone; at 15/s they would take 4 s
    # if each kept its own pace, or if its replacement started a pace of its own.
    assert_no_faster_than(job.relay, 15)
