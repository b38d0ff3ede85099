"""A power cut cannot break the promises: what is fsync'd before what leaves, traced with strace.

One real run of `python -m batch.run` is traced: every write and fsync of the sent-log, every
byte sent to the relay, and every byte sent to or received from the broker. Two promises are
read off the order of those calls:

- a message's end of DATA leaves only after its recipient's `claimed` line is fsync'd, and
  after every line its worker wrote before is fsync'd too (so a power cut leaves at most the
  one recipient whose DATA is in flight per worker without a durable line);
- a basic.ack leaves only after the outcome line of every delivery it acknowledges is fsync'd.

Lines another worker wrote meanwhile may still wait for that worker's own fsync: they are not
part of either promise, and that worker's acks are checked for them.

The trace is read by tests/syscalls.py, which says why its order can be trusted. Each check
is also run on traces where the promise is broken, so that it cannot pass by finding nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    Job,
    delete_queues,
    people,
    received_counts,
    write_csv,
    write_template,
)
from tests.relay import RecordingRelay
from tests.syscalls import (
    FRAME_BODY,
    FRAME_HEADER,
    FRAME_METHOD,
    SYNCS,
    TRACED,
    UNFINISHED,
    Call,
    SentLogTrace,
    acks_sent,
    messages_sent,
    parse_trace,
    process_of,
)

RECIPIENTS = 30
GATE_S = 60.0  # the longest the relay holds an answer to DATA waiting for the second worker
STRACE = ["strace", "-f", "-yy", "-ttt", "-xx", "-s", "1048576", "-e", f"trace={TRACED}"]


# The two promises.


def late_messages(calls: list[Call], log: SentLogTrace, relay_port: int) -> list[str]:
    """Say which messages ended their DATA before their worker's lines were durable."""
    process = process_of(calls)
    problems = []
    for message in messages_sent(calls, relay_port):
        at, sender = message.end.start, process(message.end.tid)
        where = f"{message.recipient}: DATA ended on trace line {at + 1}"
        claims = [
            line
            for line in log.lines
            if (line.recipient, line.status) == (message.recipient, "claimed")
            and line.written.start < at
        ]
        if not claims:
            problems.append(f"{where} with no claimed line written before it")
            continue
        if claims[-1].worker_pid != sender:
            problems.append(f"{where} by pid {sender}; pid {claims[-1].worker_pid} claimed it")

        for line in log.lines:
            if process(line.written.tid) != sender or line.written.start >= at:
                continue
            if log.durable_after(line) >= at:
                problems.append(
                    f"{where} before the {line.status} line of {line.recipient} "
                    f"(written on trace line {line.written.start + 1}) was fsync'd"
                )
    return problems


def early_acks(calls: list[Call], log: SentLogTrace, amqp_port: int) -> list[str]:
    """Say which acks left before the outcome lines of what they acknowledge were durable."""
    problems = []
    for ack in acks_sent(calls, amqp_port):
        at = ack.sent.start
        for recipient, arrived in ack.deliveries:
            if recipient is None:
                problems.append(f"trace line {at + 1}: acks a delivery the trace never showed")
                continue
            durable = [
                line
                for line in log.lines
                if line.recipient == recipient
                and line.status != "claimed"
                and line.written.start > arrived
                and log.durable_after(line) < at
            ]
            if not durable:
                problems.append(
                    f"{recipient}: acked on trace line {at + 1} before an outcome line "
                    f"written after its delivery (trace line {arrived + 1}) was fsync'd"
                )
    return problems


# One traced run, shared by the tests below.


def hold_data_until_two_senders(relay: RecordingRelay) -> None:
    """Have a started relay answer no DATA until two sessions have begun a message.

    Each worker holds one session, so both workers are mid-transaction together and their
    sent-log lines, fsyncs and acks interleave in the trace, whichever worker started first.
    A worker holds at most --prefetch deliveries before its first answer, so with more
    recipients than that the second worker always gets some. Waits GATE_S at most.
    """
    handler = relay._controller.handler
    senders: set[tuple] = set()
    answer_mail = getattr(handler, "handle_MAIL", None)
    answer_data = handler.handle_DATA

    async def handle_mail(server, session, envelope, address, mail_options) -> str:
        senders.add(session.peer)
        if answer_mail is not None:
            return await answer_mail(server, session, envelope, address, mail_options)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_data(server, session, envelope) -> str:
        deadline = time.monotonic() + GATE_S
        while len(senders) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await answer_data(server, session, envelope)

    # aiosmtpd looks the hooks up on the handler for each new connection.
    handler.handle_MAIL = handle_mail
    handler.handle_DATA = handle_data


@dataclass
class TracedRun:
    """A finished run of the job under strace, and where to look."""

    job: Job
    result: subprocess.CompletedProcess
    addresses: list[str]
    trace: Path
    calls: list[Call]
    sent_log: str
    relay_port: int
    amqp_port: int

    def log(self, calls: list[Call] | None = None) -> SentLogTrace:
        """Read the sent-log's lines and fsyncs from the trace (or from other calls)."""
        return SentLogTrace(self.calls if calls is None else calls, self.sent_log)


@pytest.fixture(scope="module")
def traced(tmp_path_factory, amqp_url) -> Iterator[TracedRun]:
    """Run the job once for 30 recipients with 2 workers, every relevant call traced."""
    if shutil.which("strace") is None:
        pytest.fail(
            "strace is not installed: `apt-get install strace` "
            "(./scripts/test installs it where apt-get is available)",
            pytrace=False,
        )
    folder = tmp_path_factory.mktemp("traced")
    rows = people(RECIPIENTS)
    source = write_csv(folder / "list.csv", rows)
    template = write_template(folder / "template.txt")
    trace = folder / "trace.txt"

    with RecordingRelay() as relay:
        hold_data_until_two_senders(relay)
        job = Job(folder / "state", amqp_url, relay, f"test-{uuid.uuid4().hex[:12]}")
        command = [*STRACE, "-o", str(trace), sys.executable, "-m", "batch.run"]
        try:
            result = subprocess.run(
                [*command, *job.args(source, template, "--workers", "2", "--prefetch", "10")],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
        finally:
            delete_queues(amqp_url, job.campaign)
        if not trace.exists() or result.stderr.startswith("strace:"):
            pytest.fail(f"strace could not trace the run: {result.stderr[-2000:]}", pytrace=False)

        yield TracedRun(
            job=job,
            result=result,
            addresses=[row["email"] for row in rows],
            trace=trace,
            calls=parse_trace(trace.read_text(encoding="ascii")),
            sent_log=os.path.realpath(job.folder / "sent-log.csv"),
            relay_port=relay.port,
            amqp_port=urlsplit(amqp_url).port or 5672,
        )


def test_the_traced_run_mails_every_recipient_exactly_once(traced):
    assert traced.result.returncode == 0, traced.result.stderr[-3000:]
    counts = received_counts(traced.job.relay)
    assert {a: counts[a] for a in traced.addresses} == dict.fromkeys(traced.addresses, 1)
    statuses = traced.job.final_statuses()
    assert {a: statuses.get(a) for a in traced.addresses} == dict.fromkeys(
        traced.addresses, "sent"
    )
    assert len({row["worker"] for row in traced.job.sent_log()}) == 2, "both workers sent"


def test_no_data_ends_before_its_claim_and_its_workers_earlier_lines_are_fsynced(traced):
    messages = messages_sent(traced.calls, traced.relay_port)
    assert sorted(m.recipient for m in messages) == sorted(traced.addresses), traced.trace

    assert late_messages(traced.calls, traced.log(), traced.relay_port) == [], traced.trace


def test_no_ack_leaves_before_the_outcomes_it_acknowledges_are_fsynced(traced):
    acks = acks_sent(traced.calls, traced.amqp_port)
    acked = [recipient for ack in acks for recipient, _ in ack.deliveries]
    assert sorted(acked) == sorted(traced.addresses), traced.trace

    assert early_acks(traced.calls, traced.log(), traced.amqp_port) == [], traced.trace


def test_the_checks_report_every_message_and_ack_once_the_fsyncs_leave_the_trace(traced):
    unsynced = [c for c in traced.calls if not (c.name in SYNCS and c.target == traced.sent_log)]
    assert len(unsynced) < len(traced.calls)
    log = traced.log(unsynced)

    late = late_messages(unsynced, log, traced.relay_port)
    assert {problem.partition(":")[0] for problem in late} == set(traced.addresses)
    early = early_acks(unsynced, log, traced.amqp_port)
    assert {problem.partition(":")[0] for problem in early} == set(traced.addresses)


# A hand-made trace: worker pid 100 (sender thread 101) mails ann, then acks her delivery.

SENT_LOG = "/state/c/sent-log.csv"
BROKER = "TCP:[127.0.0.1:40000->127.0.0.1:5672]"
RELAY = "TCP:[127.0.0.1:40001->127.0.0.1:2525]"


def _escaped(data: bytes) -> str:
    """Print bytes as `strace -xx` does."""
    return "".join(f"\\x{byte:02x}" for byte in data)


def _frame(kind: int, payload: bytes) -> bytes:
    """Make an AMQP 0-9-1 frame on channel 1."""
    return bytes([kind]) + b"\0\1" + len(payload).to_bytes(4, "big") + payload + b"\xce"


def _delivery(tag: int, body: bytes) -> bytes:
    """Make the frames of a basic.deliver: method, content header, body."""
    method = bytes([0, 60, 0, 60, 3]) + b"ctg" + tag.to_bytes(8, "big") + b"\0\0\0"
    header = bytes([0, 60, 0, 0]) + len(body).to_bytes(8, "big") + b"\0\0"
    return _frame(FRAME_METHOD, method) + _frame(FRAME_HEADER, header) + _frame(FRAME_BODY, body)


def _io(tid: int, name: str, target: str, data: bytes) -> str:
    """Make the trace line of a call that moved data through a descriptor of target."""
    return f'{tid} 1.0 {name}(3<{target}>, "{_escaped(data)}", {len(data)}) = {len(data)}'


def _synthetic_trace(ack_during_fsync: bool) -> str:
    log = _escaped(SENT_LOG.encode())
    ack = _frame(FRAME_METHOD, bytes([0, 60, 0, 80]) + (7).to_bytes(8, "big") + b"\1")
    lines = [
        "100 1.0 clone3({flags=CLONE_VM|CLONE_THREAD, exit_signal=0}, 88) = 101",
        _io(100, "recvfrom", BROKER, _delivery(7, b'{"recipient":"ann@example.com"}')),
        _io(101, "write", log, b"t,c,ann@example.com,claimed,,,<m>,host:100\n"),
        f"101 1.0 fsync(3<{log}>) = 0",
        _io(101, "sendto", RELAY, b"DATA\r\n"),
        _io(101, "sendto", RELAY, b"To: ann@example.com\r\n\r\nHello\r\n.\r\n"),
        _io(101, "write", log, b"t,c,ann@example.com,sent,250,ok,<m>,host:100\n"),
    ]
    if ack_during_fsync:
        lines += [
            f"101 1.0 fsync(3<{log}>{UNFINISHED}",
            _io(100, "sendto", BROKER, ack),
            "101 1.0 <... fsync resumed>) = 0",
        ]
    else:
        lines += [f"101 1.0 fsync(3<{log}>) = 0", _io(100, "sendto", BROKER, ack)]
    return "\n".join([*lines, "101 1.0 +++ exited with 0 +++"]) + "\n"


def test_an_ack_sent_while_the_fsync_of_its_outcome_is_still_running_is_reported():
    calls = parse_trace(_synthetic_trace(ack_during_fsync=True))
    log = SentLogTrace(calls, SENT_LOG)

    assert late_messages(calls, log, 2525) == []
    [problem] = early_acks(calls, log, 5672)
    assert problem.startswith("ann@example.com: acked on trace line 9")


def test_an_ack_sent_after_the_fsync_of_its_outcome_returned_passes():
    calls = parse_trace(_synthetic_trace(ack_during_fsync=False))
    log = SentLogTrace(calls, SENT_LOG)

    assert [m.recipient for m in messages_sent(calls, 2525)] == ["ann@example.com"]
    assert [a.deliveries for a in acks_sent(calls, 5672)] == [(("ann@example.com", 1),)]
    assert late_messages(calls, log, 2525) == []
    assert early_acks(calls, log, 5672) == []
