"""The coherence protocol's decisions, with no I/O: versions, invalidation messages, sequence gaps
and which values may enter the local tier. The sync and async drivers share all of it.

Versions. A version is an integer below 2**53 (Lua reads it as a double), strictly increasing per
key: microseconds of Redis server time (this process measures the offset of its own clock at
connect), or one more than the newest version this process has seen, whichever is larger. The
write script accepts a proposed version only if it is above both the stored value's and the
tombstone's, else it answers the current version and the writer proposes again. Because the
clock part follows wall time, versions stay monotone across a Redis restart with an empty
dataset, FLUSHALL and eviction: a new write after the loss is numbered by the clock, which has
moved past every version issued before (a bare INCR counter would start again at 1).

Invalidations. Every write, delete or clear publishes, from the same Lua script and after the
change is applied, ``TC1 <seq> <start> <version> <origin> <op>\n<encoded key>``. ``seq`` numbers
the messages of one partition, one by one. When the counter is lost with the data it restarts at
the current time in microseconds (above every number it gave before) and that first message says
``start = R`` (else ``+``). The same message is appended to a capped stream, from which a listener
replays what it missed.

A listener keeps, per partition, the number it has applied up to; the next message is applied only
if it is the next number (or starts a counter the listener saw nothing of). Anything else (a gap,
a restarted counter, a lost connection, a missed PONG) means messages may have been lost: the
local tier stops serving until the missed messages are replayed from the log, or, when the log no
longer covers the gap, it is flushed.

Local fills. A value read from Redis (or loaded from the origin) is installed in the local tier
only if no invalidation of a newer version of that key was applied since the read began:
``FillGuard`` keeps a bounded map of the newest version invalidated per key and a generation
counter; a read takes a ticket (the generation) before it starts and presents it to install.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

from .envelope import VERSION_LIMIT

MESSAGE_TAG = b"TC1"
MAX_MESSAGE_BYTES = 1 << 20
OP_SET = "S"
OP_DELETE = "D"
OP_CLEAR = "C"
OP_CLEAR_PREFIX = "P"  # every key whose encoding starts with the message's key
OP_TAG = "G"  # a tag was invalidated: the key is "<partition>:<tag>", the version its new one
OP_NAMESPACE = "N"  # the namespace generation changed: the version is the new generation
OPS = frozenset((OP_SET, OP_DELETE, OP_CLEAR, OP_CLEAR_PREFIX, OP_TAG, OP_NAMESPACE))


class VersionClock:
    """Issues versions: Redis-calibrated microseconds, strictly increasing in this process."""

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_ns = wall_ns
        self._offset_us = 0
        self._last = 0
        self._lock = threading.Lock()

    def calibrate(self, server_us: int, sent_ns: int, received_ns: int) -> None:
        """Align with Redis ``TIME`` (``server_us``) read between two local clock readings."""
        self._offset_us = server_us - (sent_ns + received_ns) // 2000

    def now_us(self) -> int:
        """Redis time in microseconds, as estimated from the local clock."""
        return self._wall_ns() // 1000 + self._offset_us

    def next(self, after: int = 0) -> int:
        """A new version above ``after`` and above every version this clock issued or saw."""
        with self._lock:
            now_us = self._wall_ns() // 1000 + self._offset_us  # (now_us(), without the call)
            version = max(now_us, self._last + 1, after + 1)
            if version >= VERSION_LIMIT:
                raise OverflowError("version space exhausted")
            self._last = version
            return version

    def copy(self) -> VersionClock:
        """A clock in the same state with a lock of its own (for a forked child)."""
        clock = VersionClock(self._wall_ns)
        clock._offset_us, clock._last = self._offset_us, self._last
        return clock

    def observe(self, version: int) -> None:
        """Note a version issued elsewhere, so the next one issued here is above it."""
        if version <= self._last:  # (_last only grows: no lock needed to see it is behind)
            return
        with self._lock:
            if version > self._last:
                self._last = version


class Invalidation(NamedTuple):
    """One invalidation message (a tuple: cheap to build, as the listener does per message)."""

    seq: int
    restart: bool  # the first message of a (re)started counter
    version: int
    origin: str
    op: str
    key: bytes  # the encoded key; empty for a clear
    sig: str = "-"  # the writer's signature of (key, version, op, origin), "-" if none


def format_message(
    seq: int,
    version: int,
    origin: str,
    op: str,
    key: bytes,
    restart: bool = False,
    sig: str = "-",
) -> bytes:
    """The message bytes the write script publishes (for tests and tools)."""
    return b"%s %d %s %d %s %s %s\n%s" % (
        MESSAGE_TAG,
        seq,
        b"R" if restart else b"+",
        version,
        origin.encode(),
        op.encode(),
        sig.encode(),
        key,
    )


def parse_message(data: bytes) -> Invalidation:
    """The invalidation in ``data``; ``ValueError`` for anything malformed."""
    if type(data) is not bytes or len(data) > MAX_MESSAGE_BYTES:
        raise ValueError("invalidation message of the wrong type or too large")
    head, sep, key = data.partition(b"\n")
    try:
        tag, seq_s, start, version_s, origin_b, op_b, sig_b = head.split(b" ")
        seq, version = int(seq_s), int(version_s)
        origin, op, sig = origin_b.decode("ascii"), op_b.decode("ascii"), sig_b.decode("ascii")
    except (UnicodeDecodeError, ValueError) as err:  # (also the wrong number of fields)
        raise ValueError("malformed invalidation message") from err
    if not sep or tag != MESSAGE_TAG or (start != b"+" and start != b"R"):
        raise ValueError("malformed invalidation message")
    if not origin or not sig:  # the write script always fills both ("-": no signature)
        raise ValueError("invalidation message with an empty origin or signature")
    if op not in OPS or not 0 < seq < VERSION_LIMIT or not 0 <= version < VERSION_LIMIT:
        raise ValueError("invalidation message with invalid fields")
    if (op == OP_CLEAR) != (not key):
        raise ValueError("invalidation message with a missing or unexpected key")
    return Invalidation(seq, start == b"R", version, origin, op, key, sig)


class Verdict(enum.Enum):
    """What to do with a message, given the position of its partition."""

    APPLY = "apply"  # the next one: apply it and advance
    STALE = "stale"  # number already seen (replay overlap, duplicate, or a forged message took
    # it): applied again, harmlessly, but the position does not move
    GAP = "gap"  # messages may be missing: catch up from the log, or flush


class SequenceTracker:
    """The number a partition has been applied up to, and the verdict on new messages."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq = 0  # 0: the counter did not exist when we synced

    def follows(self, msg: Invalidation) -> bool:
        """Whether ``msg`` comes right after the position."""
        return msg.seq == self.seq + 1 if not msg.restart else self.seq == 0

    def classify(self, msg: Invalidation) -> Verdict:
        """The verdict on ``msg``; an APPLY verdict also advances the position."""
        if self.follows(msg):
            self.seq = msg.seq
            return Verdict.APPLY
        if msg.seq <= self.seq:
            return Verdict.STALE
        return Verdict.GAP


def replay_plan(
    position: int, current: int, logged: list[Invalidation]
) -> list[Invalidation] | None:
    """The messages that lead from ``position`` to the counter's ``current`` number, in order.

    ``logged`` is the log's content (any order, at least back to ``position`` or all of it).
    Returns None when the log does not hold an unbroken chain (the caller flushes).
    """
    if current == position:
        return []
    if current < position:
        return None  # the counter went back: it was lost and restarted lower (cannot happen)
    tracker = SequenceTracker()
    tracker.seq = position
    plan = []
    by_seq = {m.seq: m for m in logged if position < m.seq <= current}
    for msg in sorted(by_seq.values(), key=lambda m: m.seq):
        if not tracker.follows(msg):
            return None
        tracker.seq = msg.seq
        plan.append(msg)
    return plan if tracker.seq == current else None


class FillGuard:
    """Whether a value read before now may still enter the local tier (see the module doc).

    ``lock`` must be held across ``admit`` and the install it allows, and across ``observe`` and
    the local drop that goes with it, so no invalidation slips between a check and its effect.
    """

    def __init__(self, max_keys: int = 65_536) -> None:
        self.lock = threading.RLock()
        self._max_keys = max_keys
        self._gen = 0  # bumped by every invalidation and every loss of knowledge
        self._floor = 0  # tickets older than this may have missed a forgotten invalidation
        # key -> (newest version seen changing, newest version known applied in Redis)
        self._newest: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()
        self._kept: OrderedDict[Hashable, int] = OrderedDict()  # see refuse_pending

    def ticket(self) -> int:
        """Taken before a read of Redis (or a load) that may end in a local install."""
        return self._gen

    def observe(self, key: Hashable, version: int, applied: bool = True) -> None:
        """Note that ``key`` changed at ``version`` (an invalidation or this process' write).

        ``applied=False``: a write whose outcome is unknown (it may or may not land).
        """
        self._gen += 1
        newest = self._newest
        seen, known = newest.get(key, (0, 0))
        newest[key] = (max(seen, version), max(known, version) if applied else known)
        newest.move_to_end(key)
        if len(newest) > self._max_keys:
            newest.popitem(last=False)
            self._floor = self._gen  # the forgotten key might be one a pending read needs

    def forget_all(self) -> None:
        """Drop all knowledge (the local tier was flushed): every pending read is refused."""
        self._gen += 1
        self._floor = self._gen
        self._newest.clear()
        self._kept.clear()

    def refuse_pending(self) -> None:
        """Refuse every pending read; from now on refuse, even to a fresh ticket, any version of
        a key older than the newest known now (a promoted replica may serve what it missed)."""
        self._gen += 1
        self._floor = self._gen
        for key, (_, known) in self._newest.items():
            if known > self._kept.get(key, 0):
                self._kept[key] = known
        while len(self._kept) > self._max_keys:
            self._kept.popitem(last=False)

    def admit(self, ticket: int, key: Hashable, version: int) -> bool:
        """Whether a value of ``version`` read under ``ticket`` may enter the local tier."""
        if self._kept and version < self._kept.get(key, 0):
            return False
        if ticket == self._gen:
            return True
        if ticket < self._floor:
            return False
        return version >= self._newest.get(key, (0, 0))[0]

    def newest(self, key: Hashable) -> int:
        """The newest version known to be invalidated for ``key`` (0 if none remembered)."""
        return self._newest.get(key, (0, 0))[0]

    def applied(self, key: Hashable) -> int:
        """The newest version of ``key`` known to be in Redis: older entries there are stale
        (also across a ``refuse_pending`` flush)."""
        known = self._newest.get(key, (0, 0))[1]
        return max(known, self._kept.get(key, 0)) if self._kept else known

    def __len__(self) -> int:
        return len(self._newest)


class OwnWrites:
    """This process' writes whose echo on the channel needs no applying.

    The writer registers a write's version before sending it (``begin``). The listener, hearing
    the next message of its partition from this origin with that version, only takes its
    sequence number (``heard``): the writer's handling of the reply does what applying the echo
    would (observe the version, drop older local copies), and the writing thread does not wait
    for the listener's work on the GIL. Echoes the listener's socket filter let pass without
    Python (tiercache.wire) are reported in batches (``passed``). ``end`` closes the write and
    tells a writer whose reply never came whether the echo proved the write landed. Bounded: a
    version pushed out of the map, or ended unapplied, is applied in full when its echo comes
    (harmless, only slower).
    """

    _PENDING, _DONE, _HEARD = 0, 1, 2

    def __init__(self, max_pending: int = 4096) -> None:
        self._lock = threading.Lock()
        self._state: OrderedDict[int, int] = OrderedDict()  # oldest first, popped in O(1)
        self._max = max_pending

    def begin(self, version: int) -> None:
        """A write at ``version`` is about to be sent."""
        with self._lock:
            state = self._state
            state[version] = self._PENDING
            if len(state) > self._max:
                state.popitem(last=False)

    def heard(self, version: int) -> bool:
        """The echo of ``version`` arrived: whether it is an own write that needs no applying."""
        with self._lock:
            return self._hear(version)

    def passed(self, versions: list[int]) -> None:
        """The echoes of ``versions`` arrived (``heard`` for each, under one lock)."""
        with self._lock:
            for version in versions:
                self._hear(version)

    def _hear(self, version: int) -> bool:
        s = self._state.get(version)
        if s is None:
            return False
        if s == self._DONE:
            del self._state[version]
        else:
            self._state[version] = self._HEARD
        return True

    def end(self, version: int, applied: bool) -> bool:
        """The write at ``version`` is over (``applied``: its reply said so); whether its echo
        was heard, which proves it landed."""
        with self._lock:
            s = self._state.get(version)
            if s == self._HEARD or not applied:
                self._state.pop(version, None)
            elif s is not None:
                self._state[version] = self._DONE  # the listener drops it on the echo
            return s == self._HEARD

    def discard(self, version: int) -> None:
        """Forget ``version`` (its echo was applied in full, e.g. replayed from the log)."""
        with self._lock:
            self._state.pop(version, None)

    def __len__(self) -> int:
        return len(self._state)


def xfetch_due(now: float, fresh_until: float, delta: float, beta: float, u: float) -> bool:
    """Whether to recompute early (XFetch, Vattani et al. 2015).

    ``delta`` is how long the last recomputation took, ``u`` a uniform draw in [0, 1). Early when
    ``now - delta * beta * ln(1 - u) >= fresh_until``: for ``t = fresh_until - now`` the chance is
    ``exp(-t / (beta * delta))``; at or after ``fresh_until`` it is certain. ``1 - u`` keeps the
    logarithm finite for ``u = 0``.
    """
    if now >= fresh_until:
        return True
    if delta <= 0 or beta <= 0:
        return False
    return now - delta * beta * math.log(1.0 - u) >= fresh_until


def jittered(ttl: float, jitter: float, u: float) -> float:
    """``ttl`` spread by ``±jitter`` (a fraction) with a uniform draw ``u`` in [0, 1)."""
    return ttl * (1.0 + jitter * (2.0 * u - 1.0)) if jitter else ttl
