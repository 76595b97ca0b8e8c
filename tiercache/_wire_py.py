"""Pure-Python twin of ``ext/_wire.pyx``: the echo filter of the sync listener's socket.

A process hears its own writes on the channel. Applying such an echo is work the writer's reply
handling already did (tiercache.protocol.OwnWrites), but waking the listener's thread on the GIL
for it is not free: the writing thread waits for the listener on every write. ``EchoFilter``
reads the subscribed socket and lets the next-in-sequence set/delete echoes of this process pass
on its own, taking their sequence numbers; only the other replies reach Python. The compiled
build does this without the GIL, so an own echo never touches it; this twin keeps the same
behaviour (and is what ``TIERCACHE_NO_EXTENSIONS=1`` selects).

An echo passes only if it is, byte for byte, ``message <channel> TC1 <seq> + <version> <origin>
<op> - \\n<key>`` for a channel it was given, this process' origin, op S or D, no signature, a
non-empty key, and ``seq`` the position of the channel plus one; ``take_passed`` hands their
versions over (at most 4096 wait: beyond that, echoes go to the caller until it takes them).
Everything else, complete replies only, goes to the caller in order. A reply it cannot frame
(not RESP, or bigger than ``max_buffer``) switches it to passing all bytes through until
``reset``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from time import monotonic as _monotonic

__all__ = ["EchoFilter"]

_CHUNK = 65536
_RING = 4096  # passed echoes not taken yet stay below this
_LIMIT = 1 << 53  # versions and sequence numbers stay below (tiercache.protocol.VERSION_LIMIT)
_MAX_COUNT = 1 << 30
_LINE = frozenset(b"+-:_,#(")
_BULK = frozenset(b"$=!")
_AGGREGATE = frozenset(b"*>~%")
_INCOMPLETE, _BAD = -1, -2


class EchoFilter:
    """Lets this process' own set/delete echoes pass on a subscribed socket (see the module)."""

    def __init__(
        self,
        origin: bytes,
        channels: Sequence[bytes],
        max_message: int = 1 << 20,
        max_buffer: int = 1 << 22,
    ) -> None:
        if max_message < 1 or max_buffer < 1:
            raise ValueError("max_message and max_buffer must be >= 1")
        self._origin = bytes(origin)
        self._channels = [bytes(c) for c in channels]
        self._max_message = max_message
        self._max_buffer = max_buffer
        self._ring = [0] * _RING
        self._ring_next = self._taken = 0
        self.reset()

    def reset(self) -> None:
        """Forget the buffer and the positions; pass nothing until ``arm`` (a new connection).
        Passed echoes not taken yet stay for ``take_passed``."""
        self._buf = bytearray()
        self._start = 0
        self._positions = [0] * len(self._channels)
        self._armed = False
        self._passthrough = False

    def arm(self, positions: Sequence[int]) -> None:
        """Start passing echoes, each channel at ``positions[i]`` (the last number applied)."""
        if len(positions) != len(self._channels):
            raise ValueError("one position per channel")
        if not all(0 <= p < _LIMIT for p in positions):
            raise ValueError("positions are sequence numbers, 0 <= p < 2**53")
        self._positions = [int(p) for p in positions]
        self._armed = True

    def position(self, index: int) -> int:
        """The last sequence number of channel ``index`` (passed echoes included)."""
        if not 0 <= index < len(self._positions):
            raise IndexError(index)
        return self._positions[index]

    def take_passed(self) -> list[int]:
        """The versions of the echoes passed since the last call, oldest first."""
        out = [self._ring[i % _RING] for i in range(self._taken, self._ring_next)]
        self._taken = self._ring_next
        return out

    def heard(self, version: int) -> bool:
        """Whether an echo of ``version`` passed recently (among the last 4096)."""
        return 0 < version < _LIMIT and version in self._ring

    @property
    def passthrough(self) -> bool:
        """Whether it gave up framing replies (every byte goes to the caller until ``reset``)."""
        return self._passthrough

    def read(self, fd: int, timeout: float) -> bytes | None:
        """The next complete replies that are not passed echoes, as bytes (b"": none came in
        about ``timeout`` seconds; the socket's own receive timeout bounds each wait); None at
        end of stream. OSError for a failed receive."""
        deadline = _monotonic() + timeout
        waited = False
        while True:
            out = self._consume()
            if out:
                return out
            if waited and _monotonic() >= deadline:
                return b""
            if len(self._buf) - self._start >= self._max_buffer:
                self._passthrough = True
                continue
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):  # as recv() says of anything else
                raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))
            try:
                data = os.read(fd, _CHUNK)
            except InterruptedError:
                continue
            except BlockingIOError:  # the socket's receive timeout passed
                return b""
            if not data:
                return None
            waited = True
            if self._start:
                del self._buf[: self._start]
                self._start = 0
            self._buf += data

    # -- framing -------------------------------------------------------------------------------

    def _consume(self) -> bytes:
        """Pass the echoes at the head of the buffer; the complete replies after them, if any."""
        buf = self._buf
        if self._passthrough:
            out = bytes(buf[self._start :])
            self._buf, self._start = bytearray(), 0
            return out
        while True:
            end = _reply_end(buf, self._start)
            if end == _BAD:
                self._passthrough = True
                return self._consume()
            if end == _INCOMPLETE:
                return b""
            if (
                self._armed
                and self._ring_next - self._taken < _RING
                and self._pass(buf, self._start, end)
            ):
                self._start = end
                continue
            last = end
            while (nxt := _reply_end(buf, last)) >= 0:
                last = nxt
            out = bytes(buf[self._start : last])
            self._start = last
            return out

    def _pass(self, buf: bytearray, i: int, end: int) -> bool:
        """Whether the reply ``buf[i:end]`` is a passable own echo; if so, take its number."""
        if buf[i] not in b"*>" or buf[i + 1 : i + 4] != b"3\r\n":
            return False
        i += 4
        kind, i = _bulk(buf, i, end)
        if kind != b"message":
            return False
        channel, i = _bulk(buf, i, end)
        data, i = _bulk(buf, i, end)
        if channel is None or data is None or i != end or len(data) > self._max_message:
            return False
        try:
            index = self._channels.index(channel)
        except ValueError:
            return False
        head, sep, key = data.partition(b"\n")
        fields = head.split(b" ")
        if not sep or not key or len(fields) != 7:
            return False
        tag, seq_s, start, version_s, origin, op, sig = fields
        if (
            tag != b"TC1"
            or start != b"+"
            or origin != self._origin
            or op not in (b"S", b"D")
            or sig != b"-"
        ):
            return False
        seq, version = _number(seq_s), _number(version_s)
        if seq <= 0 or version < 0 or seq != self._positions[index] + 1:
            return False
        self._positions[index] = seq
        self._ring[self._ring_next % _RING] = version
        self._ring_next += 1
        return True


def _number(digits: bytes) -> int:
    """A decimal below 2**53 (at most 16 digits, no sign), or -1."""
    if not 0 < len(digits) <= 16 or not digits.isdigit():
        return -1
    n = int(digits)
    return n if n < _LIMIT else -1


def _line(buf: bytearray, i: int) -> tuple[int, int]:
    """(the integer on the line at ``i``, the index after its CRLF); (0, -1) if incomplete,
    (0, -2) if it is not an integer."""
    j = buf.find(b"\r\n", i)
    if j < 0:
        return 0, _INCOMPLETE
    text = bytes(buf[i:j])
    digits = text[1:] if text[:1] == b"-" else text
    if not 0 < len(digits) <= 18 or not digits.isdigit():
        return 0, _BAD
    return int(text), j + 2


def _reply_end(buf: bytearray, i: int) -> int:
    """The index after the complete RESP2/RESP3 reply at ``i``; -1 incomplete, -2 not RESP."""
    remaining = 1
    size = len(buf)
    while remaining:
        if i >= size:
            return _INCOMPLETE
        t = buf[i]
        if t in _LINE:
            j = buf.find(b"\r\n", i + 1)
            if j < 0:
                return _INCOMPLETE
            i = j + 2
        elif t in _BULK or t in _AGGREGATE or t == 0x7C:  # "|": attributes
            n, nxt = _line(buf, i + 1)
            if nxt < 0:
                return nxt
            if n > _MAX_COUNT:
                return _BAD
            i = nxt
            if t == 0x7C:  # an attribute map precedes the reply it annotates
                remaining += 2 * max(n, 0)
                continue
            if t in _BULK:
                if n >= 0:
                    if i + n + 2 > size:
                        return _INCOMPLETE
                    if buf[i + n : i + n + 2] != b"\r\n":
                        return _BAD
                    i += n + 2
            elif n > 0:
                remaining += 2 * n if t == 0x25 else n  # "%": a map
        else:
            return _BAD
        remaining -= 1
    return i


def _bulk(buf: bytearray, i: int, end: int) -> tuple[bytes | None, int]:
    """The bulk string at ``i`` (within a complete reply ending at ``end``) and the index after."""
    if i >= end or buf[i] != 0x24:  # "$"
        return None, end
    n, nxt = _line(buf, i + 1)
    if nxt < 0 or n < 0 or nxt + n + 2 > end:
        return None, end
    return bytes(buf[nxt : nxt + n]), nxt + n + 2
