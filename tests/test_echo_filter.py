"""The listener socket's echo filter, ``EchoFilter``: the Cython build and its pure-Python twin.

Bytes go through a real ``socket.socketpair()``: the test writes with one end and the filter reads
the other end's file descriptor, which has a kernel receive timeout (``SO_RCVTIMEO``) as
``tiercache.wire.SocketWire`` sets it, so no read waits long. Streams are sent in chunks and,
after each chunk, read only while the socket holds bytes (``drain``), so which echoes may pass is
known: a reply the filter finds complete at the head of its buffer passes if it is the next own
echo; from the first reply that does not pass, it hands on every complete reply of the read.
``model`` computes that outcome for comparison. Every test runs on both implementations, except
the differential fuzz test, which feeds both the same bytes and compares them with each other.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache.protocol import format_message

pytestmark = pytest.mark.timeout(120)

ORIGIN = "proc-a1"
OTHER = "proc-b2"
CHANNELS = [b"tc:{inv}:0", b"tc:{inv}:1"]
START = [5, 9]  # the positions most tests arm
RCVTIMEO = 0.1  # the reading socket's receive timeout (bounds every wait in recv)
LIMIT = 1 << 53
RING = 4096  # passed versions kept for ``heard`` (and at most that many waiting to be taken)
DRAIN_DEADLINE = 10.0

SUBSCRIBE_ACK = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
RESP2_PONG = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
# Complete replies the filter never passes, RESP2 and RESP3.
OTHER_REPLIES = [
    b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n",  # a push on a channel it was not given
    b"%1\r\n+a\r\n:1\r\n",  # map
    b"%0\r\n",
    b"~2\r\n+a\r\n+b\r\n",  # set
    b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*1\r\n:2\r\n",  # attribute, then its reply
    b"_\r\n",
    b"#t\r\n",
    b",1.5\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"(123\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"$0\r\n\r\n",
    b"$4\r\na\r\nb\r\n",  # a bulk holding CRLF
    b"*2\r\n*1\r\n:1\r\n*2\r\n$1\r\na\r\n%1\r\n+k\r\n+v\r\n",  # nested
    b"+PONG\r\n",
    b"-ERR x\r\n",
    b":5\r\n",
    b":-5\r\n",
    SUBSCRIBE_ACK,
    RESP2_PONG,
]


# -- builders --------------------------------------------------------------------------------------


def bulk(data: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pubsub(
    data: bytes, channel: bytes = CHANNELS[0], kind: bytes = b"message", head: bytes = b"*3"
) -> bytes:
    """A pub/sub message reply (RESP2 ``*3`` or, with ``head=b">3"``, a RESP3 push)."""
    return head + b"\r\n" + bulk(kind) + bulk(channel) + bulk(data)


def echo_data(
    seq: int,
    version: int,
    *,
    origin: str = ORIGIN,
    op: str = "S",
    key: bytes = b"user:1",
    restart: bool = False,
    sig: str = "-",
) -> bytes:
    """The data of an invalidation message (an own set echo unless told otherwise)."""
    return format_message(seq, version, origin, op, key, restart, sig)


def echo(seq: int, version: int, channel: int = 0, *, head: bytes = b"*3", **kw: Any) -> bytes:
    """A complete message reply carrying an invalidation (an own set echo by default)."""
    return pubsub(echo_data(seq, version, **kw), CHANNELS[channel], head=head)


def make(wire_impl: Any, **kw: Any) -> Any:
    """An EchoFilter of ``wire_impl`` for ORIGIN on CHANNELS."""
    return wire_impl(ORIGIN.encode(), CHANNELS, **kw)


# -- sockets ---------------------------------------------------------------------------------------


@contextmanager
def socket_pair(rcvtimeo: float = RCVTIMEO) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(writer, reader): the reader blocks in the kernel for at most ``rcvtimeo`` seconds."""
    writer, reader = socket.socketpair()
    try:
        seconds = int(rcvtimeo)
        micros = int((rcvtimeo - seconds) * 1_000_000) or (0 if seconds else 1)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
        writer.settimeout(5.0)  # a full socket buffer fails the test instead of hanging it
        yield writer, reader
    finally:
        writer.close()
        reader.close()


@pytest.fixture(params=["compiled", "python"])
def wire_impl(request: pytest.FixtureRequest) -> Any:
    """The EchoFilter class under test."""
    if request.param == "compiled":
        return _compiled().EchoFilter
    from tiercache._wire_py import EchoFilter as Python

    return Python


def _compiled() -> Any:
    """The compiled module, whichever implementation the run selected (as tests of the local
    tier's twins do); missing, it fails the run that requires the build and skips elsewhere."""
    if os.environ.get("TIERCACHE_REQUIRE_EXTENSIONS"):
        from tiercache import _wire

        return _wire
    return pytest.importorskip("tiercache._wire", reason="the Cython build is not importable")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (writer, reader) socket pair, closed after the test."""
    with socket_pair() as p:
        yield p


def readable(sock: socket.socket) -> bool:
    """Whether ``sock`` holds bytes (or EOF) right now."""
    return bool(select.select([sock], [], [], 0)[0])


def drain(filt: Any, reader: socket.socket) -> list[bytes]:
    """Read through ``filt`` while the socket holds bytes (never waits on an empty socket)."""
    outs: list[bytes] = []
    deadline = time.monotonic() + DRAIN_DEADLINE
    while readable(reader):
        if time.monotonic() > deadline:
            pytest.fail("the filter did not drain the socket in time")
        got = filt.read(reader.fileno(), 0.0)
        assert got is not None, "unexpected end of stream"
        if got:
            outs.append(got)
    return outs


def send(filt: Any, writer: socket.socket, reader: socket.socket, data: bytes) -> bytes:
    """Send ``data`` as one chunk and return what the filter hands on for it."""
    writer.sendall(data)
    return b"".join(drain(filt, reader))


def bounds(cuts: Sequence[int], size: int) -> list[int]:
    """The chunk ends for split points ``cuts`` of a stream of ``size`` bytes."""
    return sorted({c for c in cuts if 0 < c < size} | {size}) if size else []


# -- the model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One complete reply; ``echo`` is (channel index, seq, version) if it is a well-formed own
    echo (which passes when armed and its seq is its channel's position plus one)."""

    raw: bytes
    echo: tuple[int, int, int] | None = None


def model(
    replies: Sequence[Reply], cuts: Sequence[int], positions: Sequence[int], armed: bool
) -> tuple[bytes, list[int], list[int]]:
    """(bytes handed on, final positions, versions passed) for ``replies`` sent in chunks."""
    stream = b"".join(r.raw for r in replies)
    ends = list(itertools.accumulate(len(r.raw) for r in replies))
    starts = [e - len(r.raw) for e, r in zip(ends, replies, strict=True)]
    pos, passed, out, i = list(positions), [], bytearray(), 0
    for received in bounds(cuts, len(stream)):
        while i < len(replies) and ends[i] <= received:
            e = replies[i].echo
            if armed and e is not None and e[1] == pos[e[0]] + 1:
                pos[e[0]] = e[1]
                passed.append(e[2])
                i += 1
                continue
            j = i
            while j + 1 < len(replies) and ends[j + 1] <= received:
                j += 1
            out += stream[starts[i] : ends[j]]
            i = j + 1
            break
    return bytes(out), pos, passed


def run(filt: Any, replies: Sequence[Reply], cuts: Sequence[int]) -> bytes:
    """Send ``replies`` split at ``cuts`` through a fresh socket pair; what ``filt`` hands on."""
    stream = b"".join(r.raw for r in replies)
    out = bytearray()
    with socket_pair() as (writer, reader):
        prev = 0
        for end in bounds(cuts, len(stream)):
            out += send(filt, writer, reader, stream[prev:end])
            prev = end
    return bytes(out)


def check_run(
    filt: Any, replies: Sequence[Reply], cuts: Sequence[int], positions: Sequence[int], armed: bool
) -> None:
    """Run ``replies`` through ``filt``; compare bytes, positions and versions with the model."""
    expected, pos, passed = model(replies, cuts, positions, armed)
    assert run(filt, replies, cuts) == expected
    assert [filt.position(i) for i in range(len(CHANNELS))] == pos
    assert filt.take_passed() == passed
    assert filt.take_passed() == []
    assert all(filt.heard(v) for v in passed)
    assert not filt.passthrough


class Stream:
    """Builds a realistic stream: each channel numbers its messages one by one."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.counters = list(positions)
        self.replies: list[Reply] = []
        self._version = 1_000_000

    def _next(self, channel: int) -> tuple[int, int]:
        self.counters[channel] += 1
        self._version += 1
        return self.counters[channel], self._version

    def own(self, channel: int, head: bytes = b"*3", key: bytes = b"user:1", op: str = "S") -> None:
        """An own set/delete echo, next in its channel."""
        seq, version = self._next(channel)
        raw = echo(seq, version, channel, head=head, key=key, op=op)
        self.replies.append(Reply(raw, (channel, seq, version)))

    def own_random(self, channel: int, seq: int, version: int, head: bytes = b"*3") -> None:
        """An own echo with any sequence number (it takes none)."""
        self.replies.append(Reply(echo(seq, version, channel, head=head), (channel, seq, version)))

    def own_clear(self, channel: int) -> None:
        """An own clear (op C): never passes, but takes a number."""
        seq, version = self._next(channel)
        self.replies.append(Reply(echo(seq, version, channel, op="C", key=b"")))

    def foreign(self, channel: int, key: bytes = b"user:2") -> None:
        """Another process' set: never passes, but takes a number."""
        seq, version = self._next(channel)
        self.replies.append(Reply(echo(seq, version, channel, origin=OTHER, key=key)))

    def other(self, raw: bytes) -> None:
        """Any other complete reply."""
        self.replies.append(Reply(raw))


# -- 1, 2: armed and not armed ---------------------------------------------------------------------


def test_armed_run_of_own_echoes_passes(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """A run of next-in-sequence own echoes passes whole: b"" back, versions, positions moved."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    versions = [7_000_000 + i for i in range(20)]
    data = b"".join(echo(6 + i, v, op="SD"[i % 2]) for i, v in enumerate(versions))
    data += echo(10, 8_000_000, 1, head=b">3") + echo(11, 8_000_001, 1)
    writer.sendall(data)
    start = time.monotonic()
    assert filt.read(reader.fileno(), 0.5) == b""
    assert time.monotonic() - start < 3.0
    assert filt.take_passed() == [*versions, 8_000_000, 8_000_001]
    assert filt.position(0) == 25
    assert filt.position(1) == 11
    assert all(filt.heard(v) for v in [*versions, 8_000_000, 8_000_001])
    assert not filt.heard(6_999_999)
    assert filt.take_passed() == []
    assert not filt.passthrough


def test_armed_echo_as_resp3_push_passes(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """An own echo framed as a RESP3 push (``>3``) passes like a RESP2 one."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    assert send(filt, writer, reader, echo(6, 42, head=b">3")) == b""
    assert filt.position(0) == 6
    assert filt.take_passed() == [42]
    assert filt.heard(42)


def test_armed_echo_with_odd_key_bytes_passes(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """The key is any non-empty bytes after the first newline (CRLF, newlines and all)."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    keys = [b"\n", b"\r\n", b"a b\nc", b"\x00\xff", b"$3\r\nabc\r\n", b"k" * 5000]
    data = b"".join(echo(6 + i, 100 + i, key=k) for i, k in enumerate(keys))
    assert send(filt, writer, reader, data) == b""
    assert filt.position(0) == 5 + len(keys)
    assert filt.take_passed() == [100 + i for i in range(len(keys))]


def test_version_and_seq_limits_pass(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """Sequence numbers and versions up to 2**53 - 1 (16 digits) pass; version 0 passes too."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm([LIMIT - 2, 0])
    data = echo(LIMIT - 1, LIMIT - 1) + echo(1, 0, 1)
    assert send(filt, writer, reader, data) == b""
    assert filt.position(0) == LIMIT - 1
    assert filt.position(1) == 1
    assert filt.heard(LIMIT - 1)
    assert filt.take_passed() == [LIMIT - 1, 0]


def test_max_message_boundary_passes(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """An echo whose data is exactly ``max_message`` bytes long passes."""
    writer, reader = pair
    data = echo_data(6, 77, key=b"x" * 100)
    filt = make(wire_impl, max_message=len(data))
    filt.arm(START)
    assert send(filt, writer, reader, pubsub(data)) == b""
    assert filt.position(0) == 6


def stream_of_echoes() -> bytes:
    """Own echoes that would pass when armed at START."""
    return echo(6, 11) + echo(7, 12) + echo(10, 13, 1) + echo(8, 14, head=b">3")


def test_not_armed_returns_everything(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """A fresh filter (never armed) hands on even next-in-sequence own echoes, byte for byte."""
    writer, reader = pair
    filt = make(wire_impl)
    data = echo(1, 1) + echo(2, 2) + echo(1, 3, 1)
    assert send(filt, writer, reader, data) == data
    assert filt.take_passed() == []
    assert filt.position(0) == 0
    assert not filt.heard(1)


def test_reset_disarms(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """After ``reset`` nothing passes until armed again and positions start over at 0; versions
    passed before it and not taken yet are still handed over by ``take_passed``."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    assert send(filt, writer, reader, echo(6, 1)) == b""
    assert filt.take_passed() == [1]
    assert send(filt, writer, reader, echo(7, 2)) == b""
    filt.reset()
    assert [filt.position(0), filt.position(1)] == [0, 0]
    data = stream_of_echoes()
    assert send(filt, writer, reader, data) == data
    assert filt.take_passed() == [2]
    assert filt.take_passed() == []
    filt.arm(START)
    assert send(filt, writer, reader, data) == b""
    assert filt.take_passed() == [11, 12, 13, 14]


def test_reset_drops_a_buffered_partial_reply(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """``reset`` forgets an incomplete reply held in the buffer (a new connection)."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    partial = echo(6, 1)[:20]
    assert send(filt, writer, reader, partial) == b""
    filt.reset()
    assert send(filt, writer, reader, b"+OK\r\n") == b"+OK\r\n"
    filt.arm(START)
    assert send(filt, writer, reader, echo(6, 1)) == b""
    assert filt.position(0) == 6


# -- 3: each rule broken alone ---------------------------------------------------------------------


def header(seq: bytes, version: bytes, tail: bytes = b"S -") -> bytes:
    """Message data with hand-written fields (``TC1 <seq> + <version> ORIGIN <tail>\\nuser:1``)."""
    return b"TC1 %s + %s %s %s\nuser:1" % (seq, version, ORIGIN.encode(), tail)


GOOD = echo_data(6, 777)
BROKEN: dict[str, bytes] = {
    "foreign-origin": echo(6, 777, origin=OTHER),
    "origin-prefix": echo(6, 777, origin=ORIGIN[:-1]),
    "origin-longer": echo(6, 777, origin=ORIGIN + "x"),
    "origin-case": echo(6, 777, origin=ORIGIN.upper()),
    "op-C": echo(6, 777, op="C"),
    "op-P": echo(6, 777, op="P"),
    "op-T": echo(6, 777, op="T"),
    "op-G": echo(6, 777, op="G"),
    "op-N": echo(6, 777, op="N"),
    "op-lowercase": echo(6, 777, op="s"),
    "op-two-letters": echo(6, 777, op="SD"),
    "restart-R": echo(6, 777, restart=True),
    "sig-x": echo(6, 777, sig="x"),
    "sig-long": echo(6, 777, sig="abc123"),
    "sig-dashes": echo(6, 777, sig="--"),
    "sig-empty": echo(6, 777, sig=""),
    "empty-key": echo(6, 777, key=b""),
    "no-key-line": pubsub(GOOD.partition(b"\n")[0]),
    "crlf-before-key": pubsub(GOOD.replace(b"\n", b"\r\n", 1)),
    "seq-gap": echo(7, 777),
    "seq-stale": echo(5, 777),
    "seq-old": echo(1, 777),
    "seq-zero": echo(0, 777),
    "seq-of-other-channel": echo(10, 777),
    "unknown-channel": pubsub(GOOD, b"tc:{inv}:2"),
    "channel-prefix": pubsub(GOOD, CHANNELS[0][:-1]),
    "channel-longer": pubsub(GOOD, CHANNELS[0] + b"0"),
    "seq-17-digits": pubsub(header(b"0" * 16 + b"6", b"777")),
    "seq-signed": pubsub(header(b"+6", b"777")),
    "seq-not-a-number": pubsub(header(b"6a", b"777")),
    "version-17-digits": pubsub(header(b"6", b"0" * 14 + b"777")),
    "version-2**53": echo(6, LIMIT),
    "version-negative": pubsub(header(b"6", b"-777")),
    "version-empty": pubsub(header(b"6", b"")),
    "two-spaces": pubsub(GOOD.replace(b" + ", b"  + ", 1)),
    "two-spaces-before-op": pubsub(header(b"6", b"777", b" S -")),
    "trailing-space": pubsub(header(b"6", b"777", b"S - ")),
    "leading-space": pubsub(b" " + GOOD),
    "tab-separator": pubsub(GOOD.replace(b" ", b"\t", 1)),
    "tag-TC2": pubsub(b"TC2" + GOOD[3:]),
    "tag-lowercase": pubsub(b"tc1" + GOOD[3:]),
    "start-field-missing": pubsub(GOOD.replace(b" + ", b" ", 1)),
    "four-elements": b"*4\r\n" + bulk(b"message") + bulk(CHANNELS[0]) + bulk(GOOD) + bulk(b"x"),
    "two-elements": b"*2\r\n" + bulk(b"message") + bulk(CHANNELS[0]),
    "pmessage": b"*4\r\n" + bulk(b"pmessage") + bulk(b"tc:*") + bulk(CHANNELS[0]) + bulk(GOOD),
    "pmessage-three": pubsub(GOOD, kind=b"pmessage"),
    "smessage": pubsub(GOOD, kind=b"smessage"),
    "message-uppercase": pubsub(GOOD, kind=b"MESSAGE"),
    "set-of-three": pubsub(GOOD, head=b"~3"),
    "count-with-leading-zero": pubsub(GOOD, head=b"*03"),
    "channel-simple-string": b"*3\r\n"
    + bulk(b"message")
    + b"+"
    + CHANNELS[0]
    + b"\r\n"
    + bulk(GOOD),
    "data-verbatim": b"*3\r\n"
    + bulk(b"message")
    + bulk(CHANNELS[0])
    + b"=%d\r\n" % len(GOOD)
    + GOOD
    + b"\r\n",
    "attribute-before": b"|1\r\n+a\r\n+b\r\n" + pubsub(GOOD),
    "nested-data": b"*3\r\n" + bulk(b"message") + bulk(CHANNELS[0]) + b"*1\r\n" + bulk(GOOD),
}


def test_good_echo_passes(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """The control for the broken cases: the well-formed echo (seq 6, version 777) passes."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    assert send(filt, writer, reader, pubsub(GOOD)) == b""
    assert filt.position(0) == 6
    assert filt.take_passed() == [777]
    assert filt.heard(777)


@pytest.mark.parametrize("data", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_rule_is_handed_on(
    wire_impl: Any, pair: tuple[socket.socket, ...], data: bytes
) -> None:
    """A reply breaking one rule of an own echo is handed on verbatim; positions do not move."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    assert send(filt, writer, reader, data) == data
    assert [filt.position(0), filt.position(1)] == START
    assert filt.take_passed() == []
    assert not filt.heard(777)
    assert not filt.passthrough
    # the position did not move: the genuine next echo still passes
    assert send(filt, writer, reader, echo(6, 778)) == b""
    assert filt.position(0) == 6
    assert filt.take_passed() == [778]


def test_seq_at_2_53_is_handed_on(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """Sequence number 2**53 is not passed even when it would be next."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm([LIMIT - 1, 0])
    data = echo(LIMIT, 5)
    assert send(filt, writer, reader, data) == data
    assert filt.position(0) == LIMIT - 1
    assert filt.take_passed() == []


def test_data_longer_than_max_message_is_handed_on(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """An echo whose data is one byte over ``max_message`` is handed on."""
    writer, reader = pair
    data = echo_data(6, 77, key=b"x" * 100)
    filt = make(wire_impl, max_message=len(data) - 1)
    filt.arm(START)
    assert send(filt, writer, reader, pubsub(data)) == pubsub(data)
    assert filt.position(0) == 5
    assert filt.take_passed() == []


# -- 4: order --------------------------------------------------------------------------------------


def test_echo_after_a_handed_on_reply_is_not_passed(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """echo, foreign, echo in one chunk: the first passes, the other two are handed on together."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    first, foreign, second = echo(6, 61), echo(7, 62, origin=OTHER), echo(7, 63)
    out = send(filt, writer, reader, first + foreign + second)
    assert out == foreign + second
    parser = hiredis.Reader()
    parser.feed(out)
    replies = []
    while (reply := parser.gets()) is not False:
        replies.append(reply)
    assert len(replies) == 2
    assert replies[0][2] == echo_data(7, 62, origin=OTHER)
    assert replies[1][2] == echo_data(7, 63)
    assert filt.position(0) == 6
    assert filt.take_passed() == [61]
    assert filt.heard(61)
    assert not filt.heard(63)
    # the listener re-arms after handing on (here it applied the second echo as 7)
    filt.arm([7, 9])
    assert send(filt, writer, reader, echo(8, 64)) == b""
    assert filt.position(0) == 8


def test_echoes_before_a_foreign_reply_pass(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """Leading echoes of both channels pass; the rest of the chunk is handed on from the first
    reply that does not pass."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    head = echo(6, 1) + echo(10, 2, 1) + echo(7, 3)
    tail = b"+PONG\r\n" + echo(8, 4) + b":1\r\n"
    assert send(filt, writer, reader, head + tail) == tail
    assert [filt.position(0), filt.position(1)] == [7, 10]
    assert filt.take_passed() == [1, 2, 3]


# -- 5: partial delivery ---------------------------------------------------------------------------


def mixed_stream() -> Stream:
    """Own echoes among foreign messages and every kind of RESP2/RESP3 reply, from START."""
    s = Stream(START)
    s.other(SUBSCRIBE_ACK)
    s.other(b"*3\r\n$9\r\nsubscribe\r\n$10\r\ntc:{inv}:1\r\n:2\r\n")
    for i, raw in enumerate(OTHER_REPLIES):
        s.own(i % 2, head=b">3" if i % 3 == 0 else b"*3", key=b"k\r\n%d" % i)
        s.own(0, op="D")
        s.other(raw)
        if i % 4 == 0:
            s.foreign(i % 2)
            s.own(i % 2)  # after a foreign one: its seq is not position + 1
        if i % 5 == 0:
            s.own_clear(0)
        s.own(1)
    s.other(RESP2_PONG)
    return s


def test_byte_by_byte_delivery(wire_impl: Any) -> None:
    """One byte per chunk: every echo is alone when complete, so exactly the in-sequence ones
    pass and all other replies come back in order."""
    s = mixed_stream()
    stream = b"".join(r.raw for r in s.replies)
    cuts = list(range(1, len(stream)))
    expected, _, passed = model(s.replies, cuts, START, True)
    # (the same as the plain rule: a reply passes iff it is the next own echo when it completes)
    pos, plain = list(START), bytearray()
    for r in s.replies:
        if r.echo is not None and r.echo[1] == pos[r.echo[0]] + 1:
            pos[r.echo[0]] = r.echo[1]
        else:
            plain += r.raw
    assert expected == bytes(plain)
    assert len(passed) > 20
    filt = make(wire_impl)
    filt.arm(START)
    check_run(filt, s.replies, cuts, START, True)


@pytest.mark.parametrize("seed", range(8))
def test_random_chunk_delivery(wire_impl: Any, seed: int) -> None:
    """Random split points: the handed-on bytes, positions and passed versions match the model."""
    rng = random.Random(seed)
    s = mixed_stream()
    size = sum(len(r.raw) for r in s.replies)
    cuts = rng.sample(range(1, size), rng.choice([3, 20, 100, 400]))
    filt = make(wire_impl)
    filt.arm(START)
    check_run(filt, s.replies, cuts, START, True)


def test_random_chunk_delivery_not_armed(wire_impl: Any) -> None:
    """Not armed, any chunking hands on the whole stream unchanged."""
    s = mixed_stream()
    size = sum(len(r.raw) for r in s.replies)
    cuts = random.Random(99).sample(range(1, size), 150)
    filt = make(wire_impl)
    stream = b"".join(r.raw for r in s.replies)
    assert run(filt, s.replies, cuts) == stream
    assert filt.take_passed() == []


# -- 6: property test against the model ------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], bool, list[Reply], list[int]]:
    """(positions, armed, replies, split points) with own echoes in and out of sequence."""
    positions = [draw(st.integers(0, 5)) for _ in CHANNELS]
    armed = draw(st.sampled_from([True, True, True, False]))
    s = Stream(positions)
    kinds = st.sampled_from(["own", "own", "own", "own_random", "foreign", "other", "clear"])
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(kinds)
        channel = draw(st.integers(0, len(CHANNELS) - 1))
        head = draw(st.sampled_from([b"*3", b">3"]))
        if kind == "own":
            s.own(
                channel, head, draw(st.binary(min_size=1, max_size=12)), draw(st.sampled_from("SD"))
            )
        elif kind == "own_random":
            s.own_random(channel, draw(st.integers(1, 15)), draw(st.integers(0, LIMIT - 1)), head)
        elif kind == "foreign":
            s.foreign(channel, draw(st.binary(min_size=1, max_size=12)))
        elif kind == "clear":
            s.own_clear(channel)
        else:
            s.other(draw(st.sampled_from(OTHER_REPLIES)))
    size = sum(len(r.raw) for r in s.replies)
    cuts = draw(st.lists(st.integers(1, max(size - 1, 1)), max_size=15))
    return positions, armed, s.replies, cuts


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_matches_model(
    wire_impl: Any, scenario: tuple[list[int], bool, list[Reply], list[int]]
) -> None:
    """Random replies in random chunks: bytes, positions and passed versions match the model."""
    positions, armed, replies, cuts = scenario
    filt = make(wire_impl)
    if armed:
        filt.arm(positions)
    check_run(filt, replies, cuts, positions if armed else [0, 0], armed)


# -- 7: passthrough --------------------------------------------------------------------------------


BAD_FRAMING: dict[str, bytes] = {
    "unknown-type": b"?x\r\n",
    "lone-letter": b"x",
    "nul-byte": b"\x00\r\n",
    "empty-line": b"\r\n",
    "bulk-length-not-a-number": b"$abc\r\n",
    "bulk-length-empty": b"$\r\n",
    "bulk-length-plus": b"$+5\r\nhello\r\n",
    "count-minus-only": b"*-\r\n",
    "count-19-digits": b"*1234567890123456789\r\n",
    "count-over-2**30": b"*1073741825\r\n",
    "bulk-without-crlf": b"$2\r\nabcd\r\n",
}


@pytest.mark.parametrize("bad", list(BAD_FRAMING.values()), ids=list(BAD_FRAMING))
def test_unframable_bytes_switch_to_passthrough(
    wire_impl: Any, pair: tuple[socket.socket, ...], bad: bytes
) -> None:
    """Bytes it cannot frame: echoes before them pass, then everything is handed on (own echoes
    included) until ``reset``."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    tail = bad + b"+OK\r\n" + echo(7, 2)
    writer.sendall(echo(6, 1) + tail)
    assert filt.read(reader.fileno(), 1.0) == tail
    assert filt.passthrough
    assert filt.position(0) == 6
    assert filt.take_passed() == [1]
    # still passthrough: a well-formed next echo, even half of one, comes back as it is
    nxt = echo(7, 3)
    assert send(filt, writer, reader, nxt[:10]) == nxt[:10]
    assert send(filt, writer, reader, nxt[10:]) == nxt[10:]
    assert filt.position(0) == 6
    assert filt.take_passed() == []
    filt.reset()
    assert not filt.passthrough
    filt.arm(START)
    assert send(filt, writer, reader, echo(6, 4)) == b""
    assert filt.position(0) == 6


def test_unframable_bytes_after_a_handed_on_reply(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """A reply before unframable bytes is handed on first; the next read hands on the rest."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    writer.sendall(b"+PONG\r\n" + b"?x\r\n" + echo(6, 1))
    assert filt.read(reader.fileno(), 1.0) == b"+PONG\r\n"
    assert filt.read(reader.fileno(), 1.0) == b"?x\r\n" + echo(6, 1)
    assert filt.passthrough
    assert filt.take_passed() == []


def test_incomplete_reply_over_max_buffer_switches_to_passthrough(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """An incomplete reply larger than ``max_buffer`` is handed on raw, and so is what follows."""
    writer, reader = pair
    filt = make(wire_impl, max_buffer=1024)
    filt.arm(START)
    big = b"$5000\r\n" + b"a" * 2000
    writer.sendall(echo(6, 1) + big)
    assert filt.read(reader.fileno(), 1.0) == big
    assert filt.passthrough
    assert filt.position(0) == 6
    assert filt.take_passed() == [1]
    rest = b"a" * 3000 + b"\r\n" + echo(7, 2)
    assert send(filt, writer, reader, rest) == rest
    assert filt.position(0) == 6
    filt.reset()
    assert not filt.passthrough


def test_complete_replies_within_max_buffer_stay_framed(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """Many complete replies totalling more than ``max_buffer`` do not switch to passthrough."""
    writer, reader = pair
    filt = make(wire_impl, max_buffer=1024)
    filt.arm(START)
    data = b"".join(echo(6 + i, i) for i in range(50)) + b"+OK\r\n"
    assert len(data) > 2048
    assert send(filt, writer, reader, data) == b"+OK\r\n"
    assert not filt.passthrough
    assert filt.position(0) == 55


# -- 8: EOF, timeout, errors -----------------------------------------------------------------------


def test_eof_after_pending_replies(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """At end of stream the pending complete replies come first, then None."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    writer.sendall(echo(6, 1) + b"+PONG\r\n" + echo(7, 2) + b"$10\r\nabc")
    writer.shutdown(socket.SHUT_WR)
    assert filt.read(reader.fileno(), 1.0) == b"+PONG\r\n" + echo(7, 2)
    assert filt.read(reader.fileno(), 1.0) is None
    assert filt.position(0) == 6


def test_eof_after_passed_echoes(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """Echoes passed right before end of stream are taken, and the read says None."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    writer.sendall(echo(6, 1) + echo(7, 2))
    writer.close()
    assert filt.read(reader.fileno(), 1.0) is None
    assert filt.take_passed() == [1, 2]
    assert filt.position(0) == 7


def test_timeout_with_nothing_sent(wire_impl: Any, pair: tuple[socket.socket, ...]) -> None:
    """Nothing sent: the read returns b"" (the socket's receive timeout ends the wait)."""
    _, reader = pair
    filt = make(wire_impl)
    filt.arm(START)
    start = time.monotonic()
    assert filt.read(reader.fileno(), 0.5) == b""
    assert time.monotonic() - start < 3.0
    filt2 = make(wire_impl)  # not armed either
    assert filt2.read(reader.fileno(), 0.0) == b""


def test_timeout_while_passed_echoes_keep_coming(wire_impl: Any) -> None:
    """Echoes that pass arriving without pause do not keep the read past about its timeout."""
    with socket_pair(1.0) as (writer, reader):
        timed_read_under_echo_flood(wire_impl, writer, reader)


def timed_read_under_echo_flood(
    wire_impl: Any, writer: socket.socket, reader: socket.socket
) -> None:
    """One read(timeout=0.3) while a thread sends a passing echo every 5 ms for up to 25 s."""
    filt = make(wire_impl)
    filt.arm(START)
    stop = threading.Event()
    sent = [0]

    def feed() -> None:
        seq = 6
        while not stop.is_set() and seq < 5000:
            try:
                writer.sendall(echo(seq, seq))
            except OSError:
                return
            sent[0] = seq
            seq += 1
            time.sleep(0.005)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        assert filt.read(reader.fileno(), 0.3) == b""
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(5.0)
    assert elapsed < 3.0
    passed = filt.take_passed()
    assert passed == list(range(6, 6 + len(passed)))  # (each echo's version is its seq)
    assert len(passed) >= 1
    assert filt.position(0) == 5 + len(passed)
    assert len(passed) <= sent[0] - 5


def test_read_on_a_closed_fd_raises(wire_impl: Any) -> None:
    """A receive that fails (a closed descriptor: EBADF) raises OSError."""
    filt = make(wire_impl)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        filt.read(fd, 0.1)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDONLY], ids=["write-only", "read-only"])
def test_read_on_a_non_socket_fd_raises(wire_impl: Any, flags: int) -> None:
    """A descriptor that is not a socket (``/dev/null``) cannot be received from: OSError."""
    filt = make(wire_impl)
    fd = os.open(os.devnull, flags)
    try:
        with pytest.raises(OSError):
            filt.read(fd, 0.1)
    finally:
        os.close(fd)


# -- 9: argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [[], [1], [1, 2, 3]])
def test_arm_needs_one_position_per_channel(wire_impl: Any, positions: list[int]) -> None:
    """``arm`` with the wrong number of positions raises ValueError and does not arm."""
    filt = make(wire_impl)
    with pytest.raises(ValueError):
        filt.arm(positions)
    assert filt.position(0) == 0


@pytest.mark.parametrize("positions", [[-1, 0], [0, 1 << 53]])
def test_arm_refuses_positions_that_are_no_sequence_numbers(
    wire_impl: Any, positions: list[int]
) -> None:
    """``arm`` with a negative position or one of 2**53 and above raises ValueError."""
    filt = make(wire_impl)
    with pytest.raises(ValueError):
        filt.arm(positions)


@pytest.mark.parametrize("limits", [{"max_message": 0}, {"max_buffer": 0}, {"max_buffer": -5}])
def test_limits_below_one_are_refused(wire_impl: Any, limits: dict[str, int]) -> None:
    """A max_message or max_buffer below 1 (which could never frame anything) is refused."""
    with pytest.raises(ValueError):
        wire_impl(ORIGIN.encode(), CHANNELS, **limits)


@pytest.mark.parametrize("version", [0, -1, 1 << 53, 1 << 64])
def test_heard_of_an_impossible_version_is_false(wire_impl: Any, version: int) -> None:
    """No version outside 0 < v < 2**53 is ever heard (nor raises), even on a fresh filter."""
    assert make(wire_impl).heard(version) is False


@pytest.mark.parametrize("index", [2, 100, -1, -3])
def test_position_out_of_range(wire_impl: Any, index: int) -> None:
    """``position`` of an index that is not a channel's raises IndexError."""
    filt = make(wire_impl)
    filt.arm(START)
    with pytest.raises(IndexError):
        filt.position(index)


# -- 10: the heard ring ----------------------------------------------------------------------------


def test_heard_keeps_the_last_4096_versions(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """After 4096 + 44 passed (and taken) echoes the first 44 versions are forgotten and the
    last 4096 are heard."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm([0, 0])
    versions = [1_000_000 + 7 * i for i in range(RING + 44)]
    for at in range(0, len(versions), 500):
        batch = versions[at : at + 500]
        data = b"".join(echo(at + i + 1, v) for i, v in enumerate(batch))
        assert send(filt, writer, reader, data) == b""
        assert filt.take_passed() == batch
    assert filt.position(0) == len(versions)
    assert not any(filt.heard(v) for v in versions[:44])
    assert all(filt.heard(v) for v in versions[44:])
    assert not filt.heard(versions[-1] + 1)


def test_untaken_versions_hold_back_further_echoes(
    wire_impl: Any, pair: tuple[socket.socket, ...]
) -> None:
    """With 4096 passed versions not taken yet, the next own echo is handed on (none is lost);
    once they are taken, echoes pass again."""
    writer, reader = pair
    filt = make(wire_impl)
    filt.arm([0, 0])
    for at in range(0, RING, 512):
        data = b"".join(echo(at + i + 1, at + i + 1) for i in range(512))
        assert send(filt, writer, reader, data) == b""
    assert filt.position(0) == RING
    held = echo(RING + 1, RING + 1) + echo(1, 1, 1)
    assert send(filt, writer, reader, held) == held
    assert [filt.position(0), filt.position(1)] == [RING, 0]
    assert filt.take_passed() == list(range(1, RING + 1))
    assert send(filt, writer, reader, echo(RING + 1, 5) + echo(1, 6, 1)) == b""
    assert filt.take_passed() == [5, 6]
    assert [filt.position(0), filt.position(1)] == [RING + 1, 1]


# -- the two implementations side by side ----------------------------------------------------------


FRAGMENTS = st.one_of(
    st.sampled_from(OTHER_REPLIES),
    st.sampled_from(list(BAD_FRAMING.values())),
    st.sampled_from(list(BROKEN.values())),
    st.builds(
        lambda seq, version, channel, head: echo(seq, version, channel, head=head),
        st.integers(0, 12),
        st.integers(0, LIMIT + 5),
        st.integers(0, 1),
        st.sampled_from([b"*3", b">3"]),
    ),
    st.binary(max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fragments=st.lists(FRAGMENTS, max_size=20),
    cuts=st.lists(st.integers(1, 4000), max_size=12),
    positions=st.lists(st.integers(0, 6), min_size=2, max_size=2),
    armed=st.booleans(),
)
def test_implementations_agree(
    fragments: list[bytes], cuts: list[int], positions: list[int], armed: bool
) -> None:
    """Any bytes (valid, broken or random) in any chunks: both implementations hand on the same
    bytes per read and end in the same state."""
    from tiercache import _wire_py

    stream = b"".join(fragments)
    filters = [make(_compiled().EchoFilter), make(_wire_py.EchoFilter)]
    if armed:
        for f in filters:
            f.arm(positions)
    with socket_pair(0.01) as (w0, r0), socket_pair(0.01) as (w1, r1):
        ends = [(w0, r0), (w1, r1)]
        prev = 0
        for end in bounds(cuts, len(stream)):
            got = [send(f, w, r, stream[prev:end]) for f, (w, r) in zip(filters, ends, strict=True)]
            assert got[0] == got[1], stream[:end]
            prev = end
            states = [(f.passthrough, f.position(0), f.position(1)) for f in filters]
            assert states[0] == states[1]
        # one more read each: a reply handed on may have left unframable bytes behind it
        last = [f.read(r.fileno(), 0.0) for f, (_, r) in zip(filters, ends, strict=True)]
        assert last[0] == last[1]
    assert filters[0].take_passed() == filters[1].take_passed()
    for v in {0, 1, 2, 777, 778, LIMIT - 1, LIMIT}:
        assert filters[0].heard(v) == filters[1].heard(v)
