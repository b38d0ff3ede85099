"""Read an `strace -f -yy -xx` trace of the job: its calls, sent-log lines, messages and acks.

Why the order of a trace's lines can be trusted: with -f and one output file, strace stops a
thread at each entry and exit of a traced call and prints it before letting the thread go on.
So if the exit of an fsync is printed before the entry of a send, the fsync had returned before
the send began. A call that another thread's line interrupts is printed in two halves,
"<unfinished ...>" at its entry and "<... resumed>" at its exit; both positions are kept.
-yy names the file or the TCP endpoints behind each descriptor, -xx prints every byte as \\xNN.
"""

from __future__ import annotations

import csv
import email
import email.utils
import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# The calls to trace, and what each kind does.
TRACED = "write,writev,pwrite64,sendto,sendmsg,recvfrom,recvmsg,fsync,fdatasync,clone,clone3,vfork"
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

# AMQP 0-9-1: frame types, and (class-id, method-id) of the methods that matter here.
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_END = 1, 2, 3, 0xCE
BASIC_DELIVER, BASIC_GET_OK = (60, 60), (60, 71)
BASIC_ACK, BASIC_REJECT, BASIC_NACK = (60, 80), (60, 90), (60, 120)


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
    """Read a trace into calls, ordered by their entry."""
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
    """Read one whole call: name, descriptor, bytes, result."""
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
    """Turn strace's \\xNN escapes back into bytes."""
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), text).encode("latin-1")


def process_of(calls: list[Call]) -> Callable[[int], int]:
    """Map a thread id to its process id, from the clone calls that made threads."""
    maker = {
        call.ret: call.tid
        for call in calls
        if call.name in ("clone", "clone3") and (call.ret or 0) > 0 and "CLONE_THREAD" in call.args
    }

    def process(tid: int) -> int:
        while tid in maker:
            tid = maker[tid]
        return tid

    return process


def remote_port(call: Call) -> int | None:
    """Return the peer's port of the TCP socket a call used, or None."""
    match = REMOTE_PORT.search(call.target)
    return int(match["port"]) if match else None


# The sent-log.


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
        # An fsync of any descriptor of the file, from any process, makes it all durable.
        self._durable = {
            write.start: min((s.end for s in syncs if s.start > write.end), default=math.inf)
            for write in writes
        }

    def durable_after(self, line: LogLine) -> float:
        """Return the trace line where the first fsync begun after line's write ends."""
        return self._durable[line.written.start]


def _log_lines(write: Call) -> Iterator[LogLine]:
    """Read the complete sent-log lines one write carried, without the header."""
    complete = write.data.rpartition(b"\n")[0]
    for fields in csv.reader(io.StringIO(complete.decode("utf-8"))):
        if fields and fields[0] != "timestamp":
            pid = int(fields[7].rpartition(":")[2])
            yield LogLine(fields[2], fields[3], pid, write)


# The relay.


@dataclass(frozen=True)
class Message:
    """One message's DATA as sent to the relay."""

    recipient: str  # from its To: header
    end: Call  # the send that carried its final "."


def messages_sent(calls: list[Call], relay_port: int) -> list[Message]:
    """Find every message sent to the relay, by following each session's SMTP dialogue."""
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


# The broker.


@dataclass(frozen=True)
class Ack:
    """One basic.ack frame sent to the broker, and the deliveries it settles."""

    deliveries: tuple[tuple[str | None, int], ...]  # (recipient, trace line of its arrival)
    sent: Call  # the send that carried the frame's first byte


class FrameStream:
    """One direction of one AMQP connection, cut into frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.parts: list[list] = []  # [call, how many of its bytes are still in the buffer]

    def feed(self, call: Call) -> Iterator[tuple[int, int, bytes, Call]]:
        """Add what call carried; yield (type, channel, payload, call of the first byte)."""
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


@dataclass
class Channel:
    """The deliveries one AMQP channel holds, by delivery tag."""

    held: dict[int, tuple[str | None, int]] = field(default_factory=dict)
    arriving: dict | None = None  # tag, size and body so far of a delivery not complete yet

    def receive(self, kind: int, payload: bytes, call: Call) -> None:
        """Follow a delivery's frames: basic.deliver or get-ok, content header, body."""
        if kind == FRAME_METHOD:
            method = _method(payload)
            if method == BASIC_DELIVER:
                at = 5 + payload[4]  # past the consumer tag
                self.arriving = {"tag": int.from_bytes(payload[at : at + 8], "big"), "body": b""}
            elif method == BASIC_GET_OK:
                self.arriving = {"tag": int.from_bytes(payload[4:12], "big"), "body": b""}
            return
        delivery = self.arriving
        if delivery is None:
            return
        if kind == FRAME_HEADER:
            delivery["size"] = int.from_bytes(payload[4:12], "big")
        elif kind == FRAME_BODY:
            delivery["body"] += payload
        if len(delivery["body"]) >= delivery.get("size", math.inf):
            self.arriving = None
            recipient = json.loads(delivery["body"]).get("recipient")
            self.held[delivery["tag"]] = (recipient, call.end)

    def settle(self, tag: int, multiple: bool) -> list[tuple[str | None, int]]:
        """Take the deliveries an ack, reject or nack settles; (None, -1) for unknown tags."""
        tags = [t for t in self.held if t <= tag or tag == 0] if multiple else [tag]
        return [self.held.pop(t, (None, -1)) for t in tags]


def acks_sent(calls: list[Call], amqp_port: int) -> list[Ack]:
    """Find every basic.ack sent to the broker and the recipients of what it acknowledged."""
    amqp = [c for c in calls if c.name in SENDS | RECEIVES and remote_port(c) == amqp_port]
    # A received byte counts from the exit of its call, a sent one from the entry.
    amqp.sort(key=lambda c: c.end if c.name in RECEIVES else c.start)

    streams: dict[tuple[str, bool], FrameStream] = {}
    channels: dict[tuple[str, int], Channel] = {}
    acks = []
    for call in amqp:
        inbound = call.name in RECEIVES
        stream = streams.setdefault((call.target, inbound), FrameStream())
        for kind, number, payload, first in stream.feed(call):
            channel = channels.setdefault((call.target, number), Channel())
            if inbound:
                channel.receive(kind, payload, call)
                continue
            method = _method(payload)
            if kind != FRAME_METHOD or method not in (BASIC_ACK, BASIC_REJECT, BASIC_NACK):
                continue
            tag = int.from_bytes(payload[4:12], "big")
            multiple = method != BASIC_REJECT and bool(payload[12] & 1)
            settled = channel.settle(tag, multiple)
            if method == BASIC_ACK:
                acks.append(Ack(tuple(settled), first))
    return acks


def _method(payload: bytes) -> tuple[int, int]:
    """Read (class-id, method-id) from a method frame's payload."""
    return int.from_bytes(payload[:2], "big"), int.from_bytes(payload[2:4], "big")
