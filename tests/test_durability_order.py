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

Why the order of the trace's lines can be trusted: with -f and one output file, strace stops a
thread at each entry and exit of a traced call and prints it before letting the thread go on.
So if the exit of an fsync is printed before the entry of a send, the fsync had returned before
the send began. A call that another thread's line interrupts is printed in two halves,
"<unfinished ...>" at its entry and "<... resumed>" at its exit; both positions are kept. An
fsync of any descriptor of the file, from any process, makes all its written data durable.
"""

from __future__ import annotations

import csv
import asyncio
import email
import email.utils
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller

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
from tests.relay import RecordingRelay, _Handler

RECIPIENTS = 30
GATE_S = 60.0  # the longest the relay holds an answer to DATA waiting for the second worker
TRACED = "write,writev,pwrite64,sendto,sendmsg,recvfrom,recvmsg,fsync,fdatasync,clone,clone3,vfork"
STRACE = ["strace", "-f", "-yy", "-ttt", "-xx", "-s", "1048576", "-e", f"trace={TRACED}"]

WRITES = {"write", "writev", "pwrite64"}
SYNCS = {"fsync", "fdatasync"}
SENDS = {"sendto", "sendmsg", "write", "writev"}
RECEIVES = {"recvfrom", "recvmsg"}
VECTORED = {"writev", "sendmsg", "recvmsg"}

LINE = re.compile(r"(?P<tid>\d+) +\d+\.\d+ (?P<rest>.*)")
UNFINISHED = " <unfinished ...>"
RESUMED = re.compile(r"<\.\.\. (?P<name>\w+) resumed>(?P<tail>.*)")
CALL = re.compile(r"(?P<name>\w+)\((?P<args>.*)\)\s+= (?P<ret>-?\d+|\?)(?: .*)?")
FD = re.compile(r"\d+<(?:(?P<socket>[A-Za-z0-9-]+:\[.*?\])|(?P<path>[^>]*))>")
STRING = re.compile(r'"(?P<bytes>(?:\\x[0-9a-f]{2})*)"(?P<cut>\.\.\.)?')
REMOTE_PORT = re.compile(r"->.*:(?P<port>\d+)\]$")

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_END = 1, 2, 3, 0xCE
BASIC_DELIVER, BASIC_GET_OK = (60, 60), (60, 71)
BASIC_ACK, BASIC_REJECT, BASIC_NACK = (60, 80), (60, 90), (60, 120)


# Reading the trace.


@dataclass(frozen=True)
class Call:
    """One system call as the trace shows it."""

    tid: int
    name: str
    target: str  # the file's path or the socket's endpoints, as -yy prints them
    data: bytes  # what it wrote, sent or received, as far as it returned
    ret: int | None  # None: the thread ended inside the call
    args: str
    start: int  # the trace line (0-based) of its entry
    end: int  # the trace line of its exit


def parse_trace(text: str) -> list[Call]:
    """Read an `strace -f -yy -xx` trace into calls, ordered by their entry."""
    lines = text.splitlines()
    calls = []
    open_calls: dict[int, tuple[str, int]] = {}  # tid -> (first half, line of its entry)
    for number, line in enumerate(lines):
        match = LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"trace line {number + 1}: cannot read {line[:200]!r}")
        tid, rest = int(match["tid"]), match["rest"]
        if rest.startswith(("+++ ", "--- ")):
            continue
        if rest.endswith(UNFINISHED):
            open_calls[tid] = (rest.removesuffix(UNFINISHED), number)
            continue

        start = number
        if (resumed := RESUMED.fullmatch(rest)) is not None:
            head, start = open_calls.pop(tid)
            rest = head + resumed["tail"]
        calls.append(_call(tid, rest, start, number))

    # A thread that ended inside a call: its exit never came.
    for tid, (head, start) in open_calls.items():
        calls.append(_call(tid, head + ") = ?", start, len(lines)))
    return sorted(calls, key=lambda call: call.start)


def _call(tid: int, text: str, start: int, end: int) -> Call:
    match = CALL.fullmatch(text)
    if match is None:
        raise ValueError(f"trace line {end + 1}: not a complete call: {text[:200]!r}")
    name, args = match["name"], match["args"]
    ret = None if match["ret"] == "?" else int(match["ret"])

    target = ""
    if (fd := FD.match(args)) is not None:
        target = fd["socket"] or _unescape(fd["path"]).decode("utf-8", "surrogateescape")

    strings = list(STRING.finditer(args))
    if any(string["cut"] for string in strings):
        raise ValueError(f"trace line {end + 1}: strace cut a buffer short; raise its -s")
    chunks = [_unescape(string["bytes"]) for string in strings]
    data = b"".join(chunks) if name in VECTORED else b"".join(chunks[:1])
    if ret is not None:
        data = data[: max(ret, 0)]
    return Call(tid, name, target, data, ret, args, start, end)


def _unescape(text: str) -> bytes:
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), text).encode("latin-1")


def process_of(calls: list[Call]) -> Callable[[int], int]:
    """Map a thread id to its process id, from the clone calls that made threads."""
    maker = {
        call.ret: call.tid
        for call in calls
        if call.name in ("clone", "clone3") and call.ret and "CLONE_THREAD" in call.args
    }

    def process(tid: int) -> int:
        while tid in maker:
            tid = maker[tid]
        return tid

    return process


def remote_port(call: Call) -> int | None:
    """The peer's port of the socket a call used, if it used a TCP socket."""
    match = REMOTE_PORT.search(call.target)
    return int(match["port"]) if match else None


# The sent-log as the trace shows it.


@dataclass(frozen=True)
class LogLine:
    """One sent-log line and the write that put it in the file."""

    recipient: str
    status: str
    worker_pid: int
    written: Call


class SentLogTrace:
    """The sent-log's lines and fsyncs, in the order of the trace."""

    def __init__(self, calls: list[Call], path: str) -> None:
        writes = [c for c in calls if c.target == path and c.name in WRITES]
        syncs = [c for c in calls if c.target == path and c.name in SYNCS and c.ret == 0]
        self.lines = [line for write in writes for line in _log_lines(write)]
        self._durable = {
            write.start: min((s.end for s in syncs if s.start > write.end), default=math.inf)
            for write in writes
        }

    def durable_after(self, line: LogLine) -> float:
        """The trace line after which `line` is on disk: the end of the first fsync begun
        after its write returned (infinite if none)."""
        return self._durable[line.written.start]


def _log_lines(write: Call) -> Iterator[LogLine]:
    complete = write.data.rpartition(b"\n")[0]
    for fields in csv.reader(io.StringIO(complete.decode("utf-8"))):
        if fields and fields[0] != "timestamp":
            pid = int(fields[7].rpartition(":")[2])
            yield LogLine(fields[2], fields[3], pid, write)


# What went to the relay.


@dataclass(frozen=True)
class Message:
    """One message's DATA as sent to the relay."""

    recipient: str  # from its To: header
    end: Call  # the send that carried its final "."


def messages_sent(calls: list[Call], relay_port: int) -> list[Message]:
    """Find every message sent on a socket to the relay, by following the SMTP dialogue."""
    messages = []
    streams: dict[str, bytearray] = {}
    in_data: set[str] = set()
    for call in calls:
        if call.name not in SENDS or remote_port(call) != relay_port:
            continue
        stream = streams.setdefault(call.target, bytearray())
        stream += call.data
        while True:
            if call.target not in in_data:
                line, found, rest = bytes(stream).partition(b"\r\n")
                if not found:
                    break
                stream[:] = rest
                if line.upper() == b"DATA":
                    in_data.add(call.target)
                continue

            # The body ends with CRLF "." CRLF; an empty body is "." CRLF alone.
            at = (b"\r\n" + stream).find(b"\r\n.\r\n")
            if at < 0:
                break
            body = bytes(stream[:at])
            del stream[: at + 3]
            in_data.discard(call.target)
            to = email.message_from_bytes(body)["To"] or ""
            messages.append(Message(email.utils.parseaddr(to)[1].lower(), call))
    return messages


# What went to and came from the broker.


@dataclass(frozen=True)
class Ack:
    """One basic.ack frame sent to the broker, and the deliveries it settles."""

    deliveries: tuple[tuple[str | None, int], ...]  # (recipient, trace line of its arrival)
    sent: Call  # the send that carried the frame's first byte


class FrameStream:
    """One direction of one AMQP connection, cut into frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.parts: list[list] = []  # [call, bytes of it still in the buffer]

    def feed(self, call: Call) -> Iterator[tuple[int, int, bytes, Call]]:
        """Add what `call` carried; yield (type, channel, payload, call of its first byte)."""
        if call.data:
            self.buffer += call.data
            self.parts.append([call, len(call.data)])
        while len(self.buffer) >= 8:
            if self.buffer.startswith(b"AMQP"):  # the client's protocol header
                self._consume(8)
                continue
            size = int.from_bytes(self.buffer[3:7], "big")
            if len(self.buffer) < 8 + size:
                return
            if self.buffer[7 + size] != FRAME_END:
                raise ValueError(f"{call.target}: not an AMQP 0-9-1 frame stream")
            kind, channel = self.buffer[0], int.from_bytes(self.buffer[1:3], "big")
            payload, first = bytes(self.buffer[7 : 7 + size]), self.parts[0][0]
            self._consume(8 + size)
            yield kind, channel, payload, first

    def _consume(self, count: int) -> None:
        del self.buffer[:count]
        while count:
            taken = min(count, self.parts[0][1])
            self.parts[0][1] -= taken
            count -= taken
            if not self.parts[0][1]:
                self.parts.pop(0)


def acks_sent(calls: list[Call], amqp_port: int) -> list[Ack]:
    """Find every basic.ack sent to the broker and the recipients of what it acknowledged."""
    amqp = [c for c in calls if c.name in SENDS | RECEIVES and remote_port(c) == amqp_port]
    # A received byte counts from the exit of its call, a sent one from the entry.
    amqp.sort(key=lambda c: c.end if c.name in RECEIVES else c.start)

    streams: dict[tuple[str, bool], FrameStream] = {}
    held: dict[tuple[str, int], dict[int, tuple[str | None, int]]] = {}  # tag -> delivery
    arriving: dict[tuple[str, int], dict] = {}
    acks = []
    for call in amqp:
        inbound = call.name in RECEIVES
        stream = streams.setdefault((call.target, inbound), FrameStream())
        for kind, channel, payload, first in stream.feed(call):
            key = (call.target, channel)
            if inbound:
                _receive(kind, payload, arriving, held.setdefault(key, {}), key, call)
                continue
            method = (int.from_bytes(payload[:2], "big"), int.from_bytes(payload[2:4], "big"))
            if kind != FRAME_METHOD or method not in (BASIC_ACK, BASIC_REJECT, BASIC_NACK):
                continue
            tag, multiple = int.from_bytes(payload[4:12], "big"), method != BASIC_REJECT
            settled = _settle(held.setdefault(key, {}), tag, multiple and payload[12] & 1)
            if method == BASIC_ACK:
                acks.append(Ack(tuple(settled), first))
    return acks


def _receive(kind: int, payload: bytes, arriving: dict, held: dict, key: tuple, call: Call):
    """Follow deliveries on one channel: method, content header, body frames."""
    if kind == FRAME_METHOD:
        method = (int.from_bytes(payload[:2], "big"), int.from_bytes(payload[2:4], "big"))
        if method == BASIC_DELIVER:
            at = 5 + payload[4]  # past the consumer tag
            arriving[key] = {"tag": int.from_bytes(payload[at : at + 8], "big"), "body": b""}
        elif method == BASIC_GET_OK:
            arriving[key] = {"tag": int.from_bytes(payload[4:12], "big"), "body": b""}
        return
    delivery = arriving.get(key)
    if delivery is None:
        return
    if kind == FRAME_HEADER:
        delivery["size"] = int.from_bytes(payload[4:12], "big")
    elif kind == FRAME_BODY:
        delivery["body"] += payload
    if "size" in delivery and len(delivery["body"]) >= delivery["size"]:
        del arriving[key]
        recipient = json.loads(delivery["body"]).get("recipient")
        held[delivery["tag"]] = (recipient, call.end)


def _settle(held: dict, tag: int, multiple: bool) -> list[tuple[str | None, int]]:
    """Take the deliveries an ack, reject or nack settles off the channel's list."""
    tags = [t for t in held if t <= tag or tag == 0] if multiple else [tag]
    return [held.pop(t, (None, -1)) for t in tags]


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


class BothWorkersRelay(RecordingRelay):
    """A recording relay that answers no DATA until two sessions have begun a message.

    Each worker holds one session, so both workers are mid-transaction together and their
    sent-log lines, fsyncs and acks interleave in the trace, whichever started first.
    """

    def start(self) -> BothWorkersRelay:
        self._controller = Controller(_GatedHandler(self), hostname=self.host, port=self.port)
        self._controller.start()
        return self


class _GatedHandler(_Handler):
    def __init__(self, relay: RecordingRelay) -> None:
        super().__init__(relay)
        self.senders: set[tuple] = set()

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        self.senders.add(session.peer)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        deadline = time.monotonic() + GATE_S
        while len(self.senders) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


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

    with BothWorkersRelay() as relay:
        job = Job(folder / "state", amqp_url, relay, f"test-{uuid.uuid4().hex[:12]}")
        command = [*STRACE, "-o", str(trace), sys.executable, "-m", "batch.run"]
        try:
            result = subprocess.run(
                [*command, *job.args(source, template, "--workers", "2")],
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
    assert {a: statuses.get(a) for a in traced.addresses} == dict.fromkeys(traced.addresses, "sent")
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
    unsynced = [
        c for c in traced.calls if not (c.name in SYNCS and c.target == traced.sent_log)
    ]
    assert len(unsynced) < len(traced.calls)
    log = traced.log(unsynced)

    late = late_messages(unsynced, log, traced.relay_port)
    assert {problem.partition(":")[0] for problem in late} == set(traced.addresses)
    early = early_acks(unsynced, log, traced.amqp_port)
    assert {problem.partition(":")[0] for problem in early} == set(traced.addresses)


# A hand-made trace: one worker (pid 100, sender thread 101) mails ann and acks her delivery.

SENT_LOG = "/state/c/sent-log.csv"
AMQP_SOCKET = "TCP:[127.0.0.1:40000->127.0.0.1:5672]"
RELAY_SOCKET = "TCP:[127.0.0.1:40001->127.0.0.1:2525]"


def _hex(data: bytes) -> str:
    return "".join(f"\\x{byte:02x}" for byte in data)


def _frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + (1).to_bytes(2, "big") + len(payload).to_bytes(4, "big") + payload + b"\xce"


def _synthetic_trace(fsync_ends_before_ack: bool) -> str:
    path = _hex(SENT_LOG.encode())
    body = b'{"recipient":"ann@example.com","fields":{}}'
    delivery = (
        _frame(FRAME_METHOD, bytes([0, 60, 0, 60, 3]) + b"ctg" + (7).to_bytes(8, "big") + b"\0\0\0")
        + _frame(FRAME_HEADER, bytes([0, 60, 0, 0]) + len(body).to_bytes(8, "big") + b"\0\0")
        + _frame(FRAME_BODY, body)
    )
    ack = _frame(FRAME_METHOD, bytes([0, 60, 0, 80]) + (7).to_bytes(8, "big") + b"\1")
    claimed = b"t,c,ann@example.com,claimed,,,<m>,host:100\n"
    sent = b"t,c,ann@example.com,sent,250,ok,<m>,host:100\n"
    message = b"To: ann@example.com\r\n\r\nHello\r\n.\r\n"

    def line(tid: int, text: str) -> str:
        return f"{tid} 1.000000 {text}"

    def send(tid: int, socket: str, data: bytes) -> str:
        return line(tid, f'sendto(5<{socket}>, "{_hex(data)}", {len(data)}, 0, NULL, 0) = {len(data)}')

    lines = [
        line(100, "clone3({flags=CLONE_VM|CLONE_THREAD, exit_signal=0}, 88) = 101"),
        line(100, f'recvfrom(4<{AMQP_SOCKET}>, "{_hex(delivery)}", 4096, 0, NULL, NULL) = {len(delivery)}'),
        line(101, f'write(3<{path}>, "{_hex(claimed)}", {len(claimed)}) = {len(claimed)}'),
        line(101, f"fsync(3<{path}>) = 0"),
        send(101, RELAY_SOCKET, b"DATA\r\n"),
        send(101, RELAY_SOCKET, message),
        line(101, f'write(3<{path}>, "{_hex(sent)}", {len(sent)}) = {len(sent)}'),
    ]
    if fsync_ends_before_ack:
        lines += [line(101, f"fsync(3<{path}>) = 0"), send(100, AMQP_SOCKET, ack)]
    else:
        lines += [
            line(101, f"fsync(3<{path}>{UNFINISHED}"),
            send(100, AMQP_SOCKET, ack),
            line(101, "<... fsync resumed>) = 0"),
        ]
    return "\n".join([*lines, line(101, "+++ exited with 0 +++")]) + "\n"


def test_an_ack_sent_while_the_fsync_of_its_outcome_is_still_running_is_reported():
    calls = parse_trace(_synthetic_trace(fsync_ends_before_ack=False))
    log = SentLogTrace(calls, SENT_LOG)

    assert late_messages(calls, log, 2525) == []
    [problem] = early_acks(calls, log, 5672)
    assert problem.startswith("ann@example.com: acked on trace line 9")


def test_an_ack_sent_after_the_fsync_of_its_outcome_returned_passes():
    calls = parse_trace(_synthetic_trace(fsync_ends_before_ack=True))
    log = SentLogTrace(calls, SENT_LOG)

    assert [m.recipient for m in messages_sent(calls, 2525)] == ["ann@example.com"]
    assert [a.deliveries for a in acks_sent(calls, 5672)] == [(("ann@example.com", 1),)]
    assert late_messages(calls, log, 2525) == []
    assert early_acks(calls, log, 5672) == []
