"""The coherence protocol's decisions (tiercache.protocol), with no I/O at all.

VersionClock (versions strictly increasing, calibrated on Redis time), the invalidation message
format, SequenceTracker verdicts, replay_plan, FillGuard and OwnWrites.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.envelope import VERSION_LIMIT
from tiercache.protocol import (
    MAX_MESSAGE_BYTES,
    OP_CLEAR,
    OP_DELETE,
    OP_SET,
    OPS,
    FillGuard,
    Invalidation,
    OwnWrites,
    SequenceTracker,
    Verdict,
    VersionClock,
    format_message,
    parse_message,
    replay_plan,
)

SETTINGS = settings(deadline=None, max_examples=100)


class WallClock:
    """A settable wall clock in nanoseconds."""

    def __init__(self, ns: int = 1_700_000_000_000_000_000) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


# -- VersionClock -------------------------------------------------------------------------------


def test_versions_strictly_increase_even_when_the_wall_clock_stands_still() -> None:
    wall = WallClock()
    clock = VersionClock(wall)
    versions = [clock.next() for _ in range(1000)]
    assert versions == sorted(set(versions))
    assert versions[0] == wall.ns // 1000  # microseconds of the (uncalibrated) wall clock
    assert versions[-1] == versions[0] + 999


def test_versions_increase_when_the_wall_clock_goes_back() -> None:
    wall = WallClock()
    clock = VersionClock(wall)
    first = clock.next()
    wall.ns -= 10**12  # NTP steps back 1000 s
    assert clock.next() == first + 1
    wall.ns += 2 * 10**12
    assert clock.next() == wall.ns // 1000


@SETTINGS
@given(st.lists(st.integers(0, VERSION_LIMIT - 100), max_size=20), st.integers(0, 10**18))
def test_next_after_is_above_after_and_everything_issued(afters: list[int], wall_ns: int) -> None:
    clock = VersionClock(WallClock(wall_ns))
    issued: list[int] = []
    for after in afters:
        v = clock.next(after=after)
        assert v > after
        assert all(v > old for old in issued)
        assert v < VERSION_LIMIT
        issued.append(v)


def test_observe_moves_the_clock_past_a_version_seen_elsewhere() -> None:
    wall = WallClock()
    clock = VersionClock(wall)
    now = wall.ns // 1000
    clock.observe(now + 5_000_000)
    assert clock.next() == now + 5_000_001
    clock.observe(3)  # an older one changes nothing
    assert clock.next() == now + 5_000_002


def test_calibrate_aligns_with_the_server_time() -> None:
    wall = WallClock(10**18)
    clock = VersionClock(wall)
    server_us = 10**18 // 1000 + 250_000  # the server is 250 ms ahead
    # TIME was read between sent and received (1 ms round trip): its midpoint is the estimate.
    clock.calibrate(server_us, sent_ns=wall.ns - 500_000, received_ns=wall.ns + 500_000)
    assert clock.now_us() == server_us
    assert clock.next() == server_us
    wall.ns += 7_000
    assert clock.now_us() == server_us + 7


def test_calibrating_backwards_never_reissues_a_version() -> None:
    wall = WallClock(10**18)
    clock = VersionClock(wall)
    clock.calibrate(10**15 + 10**9, wall.ns, wall.ns)  # server far ahead
    high = clock.next()
    clock.calibrate(10**15 - 10**9, wall.ns, wall.ns)  # then far behind
    assert clock.now_us() < high
    assert clock.next() == high + 1


def test_version_space_exhaustion_raises_instead_of_wrapping() -> None:
    clock = VersionClock(WallClock())
    assert clock.next(after=VERSION_LIMIT - 2) == VERSION_LIMIT - 1
    with pytest.raises(OverflowError):
        clock.next()
    with pytest.raises(OverflowError):
        VersionClock(WallClock()).next(after=VERSION_LIMIT - 1)


def test_versions_are_unique_across_threads() -> None:
    clock = VersionClock(WallClock())  # a frozen clock: every version comes from the counter
    out: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def issue(mine: list[int]) -> None:
        start.wait()
        for _ in range(2000):
            mine.append(clock.next())

    threads = [threading.Thread(target=issue, args=(o,)) for o in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    everything = [v for o in out for v in o]
    assert len(set(everything)) == len(everything) == 16_000
    for o in out:
        assert o == sorted(o)


# -- messages -----------------------------------------------------------------------------------

ORIGINS = st.text(
    st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=16
)  # printable ASCII without space: what a token_hex origin is
R = 1_700_000_000_000_000  # a counter restarted at this Redis time (microseconds)


@st.composite
def invalidations(draw: st.DrawFn) -> Invalidation:
    op = draw(st.sampled_from([OP_SET, OP_DELETE, OP_CLEAR]))
    key = b"" if op == OP_CLEAR else draw(st.binary(min_size=1, max_size=40))
    return Invalidation(
        seq=draw(st.one_of(st.integers(1, VERSION_LIMIT - 1), st.integers(1, 5))),
        restart=draw(st.booleans()),
        version=draw(st.integers(0, VERSION_LIMIT - 1)),
        origin=draw(ORIGINS),
        op=op,
        key=key,
    )


def _fmt(m: Invalidation) -> bytes:
    return format_message(m.seq, m.version, m.origin, m.op, m.key, restart=m.restart, sig=m.sig)


@SETTINGS
@given(invalidations())
def test_message_round_trip(msg: Invalidation) -> None:
    assert parse_message(_fmt(msg)) == msg


def test_message_wire_format() -> None:
    # The exact bytes write.lua publishes (and tools/tests may forge).
    raw = format_message(42, 99, "abc123", OP_SET, b"sk\ney 1")
    assert raw == b"TC1 42 + 99 abc123 S -\nsk\ney 1"  # "-": not signed
    assert parse_message(raw).key == b"sk\ney 1"  # newlines and spaces in the key are fine
    first = format_message(R, 5, "o", OP_DELETE, b"sk", restart=True, sig="ab" * 16)
    assert first == b"TC1 %d R 5 o D %s\nsk" % (R, b"ab" * 16)
    assert parse_message(first).restart is True
    assert parse_message(first).sig == "ab" * 16
    assert format_message(3, 7, "o", OP_CLEAR, b"") == b"TC1 3 + 7 o C -\n"


GOOD = format_message(3, 7, "o", OP_SET, b"sk")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"TC1 3 + 7 o S -",  # no newline
        b"TC2 3 + 7 o S -\nsk",  # wrong tag
        b"TC1 3 + 7 o S\nsk",  # a field missing
        b"TC1 3 + 7 o S - extra\nsk",  # a field too many
        b"TC1  3 + 7 o S -\nsk",  # an empty field
        b"TC1 3 x 7 o S -\nsk",  # neither R nor +
        b"TC1 3 r 7 o S -\nsk",
        b"TC1 3 - 7 o S -\nsk",
        b"TC1 3 ++ 7 o S -\nsk",
        b"TC1 y + 7 o S -\nsk",
        b"TC1 3 + z o S -\nsk",
        b"TC1 0 + 7 o S -\nsk",  # numbers start at 1
        b"TC1 -1 + 7 o S -\nsk",
        b"TC1 %d + 7 o S -\nsk" % VERSION_LIMIT,
        b"TC1 3 + -7 o S -\nsk",
        b"TC1 3 + %d o S -\nsk" % VERSION_LIMIT,
        b"TC1 3 + %d o S -\nsk" % 2**63,
        b"TC1 3 + 7 o X -\nsk",  # unknown op
        b"TC1 3 + 7 o s -\nsk",
        b"TC1 3 + 7 o S -\n",  # a set without a key
        b"TC1 3 + 7 o D -\n",  # a delete without a key
        b"TC1 3 + 7 o C -\nsk",  # a clear with a key
        b"TC1 3 + 7 \xff S -\nsk",  # non-ASCII origin
        b"TC1 3 + 7 o \xc3\xa9 -\nsk",
        b"TC1 3 + 7 o S -\nsk" + b"x" * MAX_MESSAGE_BYTES,  # too large
        b"TC1 " + b"9" * 5000 + b" + 7 o S -\nsk",  # an absurd number
    ],
)
def test_malformed_messages_raise_value_error(data: bytes) -> None:
    assert parse_message(GOOD).seq == 3
    with pytest.raises(ValueError):
        parse_message(data)


@pytest.mark.parametrize("data", ["TC1 3 + 7 o S\nsk", bytearray(GOOD), memoryview(GOOD), None, 5])
def test_messages_that_are_not_bytes_raise_value_error(data: object) -> None:
    with pytest.raises(ValueError):
        parse_message(data)  # type: ignore[arg-type]


def _mutations(raw: bytes) -> st.SearchStrategy[bytes]:
    n = len(raw)
    return st.tuples(st.integers(0, n), st.integers(0, n), st.binary(max_size=6)).map(
        lambda t: raw[: t[0]] + t[2] + raw[t[1] :]
    )


@settings(deadline=None, max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=60),
        invalidations().map(_fmt).flatmap(_mutations),
        st.lists(
            st.sampled_from([b"TC1", b" ", b"\n", b"1", b"-", b"S", b"C", b"R", b"+", b"\xff"])
        ).map(b"".join),
    )
)
def test_parse_never_raises_anything_but_value_error(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except ValueError:
        return
    # Whatever parses is a valid message, and formats back to an equivalent one.
    assert msg.op in OPS and msg.origin and msg.sig
    assert 0 < msg.seq < VERSION_LIMIT and 0 <= msg.version < VERSION_LIMIT
    assert (msg.op == OP_CLEAR) == (msg.key == b"")
    assert parse_message(_fmt(msg)) == msg


# -- SequenceTracker ----------------------------------------------------------------------------


def _msg(seq: int, *, restart: bool = False, version: int = 1, key: bytes = b"sk") -> Invalidation:
    return Invalidation(seq, restart, version, "o", OP_SET, key)


def _at(seq: int) -> SequenceTracker:
    t = SequenceTracker()
    t.seq = seq
    return t


def test_tracker_applies_the_next_message_and_advances() -> None:
    t = _at(R + 5)
    assert t.follows(_msg(R + 6))
    assert t.classify(_msg(R + 6)) is Verdict.APPLY
    assert t.seq == R + 6
    assert t.classify(_msg(R + 7)) is Verdict.APPLY
    assert t.seq == R + 7


@pytest.mark.parametrize("seq", [1, R, R + 4, R + 5])
def test_tracker_calls_already_applied_messages_stale(seq: int) -> None:
    t = _at(R + 5)
    assert t.classify(_msg(seq)) is Verdict.STALE
    assert t.seq == R + 5


@pytest.mark.parametrize("seq", [R + 7, R + 8, R + 10**9])
def test_tracker_reports_a_gap_without_advancing(seq: int) -> None:
    t = _at(R + 5)
    assert t.classify(_msg(seq)) is Verdict.GAP
    assert t.seq == R + 5
    assert t.classify(_msg(R + 6)) is Verdict.APPLY  # the missing one still fits afterwards


def test_a_restarted_counter_is_a_gap_for_a_tracker_that_followed_the_old_one() -> None:
    # The counter was lost (FLUSHALL, eviction, restart) and restarted at Redis time, above
    # every number it gave before: the old one's last messages may be lost with it.
    t = _at(R + 5)
    restarted = _msg(R + 10**6, restart=True)
    assert not t.follows(restarted)
    assert t.classify(restarted) is Verdict.GAP
    assert t.seq == R + 5
    # Even a restart that happens to land on the very next number is not "the next one".
    assert t.classify(_msg(R + 6, restart=True)) is Verdict.GAP


def test_first_message_of_a_brand_new_counter_is_applied() -> None:
    t = SequenceTracker()  # the counter did not exist when this tracker synced
    assert t.seq == 0
    assert t.classify(_msg(R, restart=True)) is Verdict.APPLY
    assert t.seq == R
    assert t.classify(_msg(R + 1)) is Verdict.APPLY


@pytest.mark.parametrize("seq", [2, R, R + 3])
def test_a_new_counter_seen_past_its_first_message_is_a_gap(seq: int) -> None:
    t = SequenceTracker()
    assert t.classify(_msg(seq)) is Verdict.GAP
    assert t.seq == 0


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(R - 3, R + 12), st.booleans()), max_size=40),
    st.sampled_from([0, R + 3]),
)
def test_tracker_only_ever_applies_the_message_that_follows(
    stream: list[tuple[int, bool]], start: int
) -> None:
    t = _at(start)
    for seq, restart in stream:
        before = t.seq
        verdict = t.classify(_msg(seq, restart=restart))
        if verdict is Verdict.APPLY:
            assert (restart and before == 0) or (not restart and seq == before + 1)
            assert t.seq == seq
        else:
            assert t.seq == before
            assert verdict is (Verdict.STALE if seq <= before else Verdict.GAP)


# -- replay_plan --------------------------------------------------------------------------------


def _log(seqs: range | list[int], *, restart_at: int | None = None) -> list[Invalidation]:
    """A log's content, newest first (as XREVRANGE gives it)."""
    return [
        _msg(s, restart=s == restart_at, version=1000 + s, key=b"sk%d" % s)
        for s in sorted(seqs, reverse=True)
    ]


def test_replay_plan_when_the_log_covers_the_gap() -> None:
    plan = replay_plan(R + 5, R + 9, _log(range(R, R + 10), restart_at=R))
    assert plan is not None
    assert [m.seq for m in plan] == [R + 6, R + 7, R + 8, R + 9]
    assert [m.key for m in plan] == [b"sk%d" % s for s in range(R + 6, R + 10)]


def test_replay_plan_ignores_messages_before_the_position_and_beyond_the_counter() -> None:
    plan = replay_plan(R + 5, R + 8, _log(range(R + 1, R + 12)))
    assert plan is not None and [m.seq for m in plan] == [R + 6, R + 7, R + 8]


def test_replay_plan_tolerates_duplicates_and_any_order() -> None:
    logged = _log(range(R + 6, R + 9)) + _log([R + 7, R + 6])
    logged.reverse()
    plan = replay_plan(R + 5, R + 8, logged)
    assert plan is not None and [m.seq for m in plan] == [R + 6, R + 7, R + 8]


@pytest.mark.parametrize(
    "seqs",
    [
        range(R + 7, R + 10),  # trimmed: R+6 is gone
        [R + 6, R + 7, R + 9],  # a hole
        [],  # an empty log
        range(R + 6, R + 9),  # the newest one is not there yet
    ],
)
def test_replay_plan_when_the_log_does_not_cover_the_gap(seqs: range | list[int]) -> None:
    assert replay_plan(R + 5, R + 9, _log(seqs)) is None


def test_replay_plan_with_nothing_missed() -> None:
    assert replay_plan(R + 5, R + 5, _log(range(R, R + 6))) == []
    assert replay_plan(R + 5, R + 5, []) == []
    assert replay_plan(0, 0, []) == []


def test_replay_plan_across_a_restarted_counter_is_a_flush() -> None:
    # The counter restarted (data loss): even a complete log of the new counter is not enough,
    # since what happened between the old position and the loss is unknown.
    r2 = R + 10**9
    assert replay_plan(R + 5, r2 + 2, _log(range(r2, r2 + 3), restart_at=r2)) is None
    # The old log survived (only the counter was evicted): still a restart in the chain.
    logged = _log(range(R, R + 6), restart_at=R) + _log(range(r2, r2 + 2), restart_at=r2)
    assert replay_plan(R + 5, r2 + 1, logged) is None


def test_replay_plan_when_the_counter_is_gone_or_went_back() -> None:
    assert replay_plan(R + 5, 0, []) is None  # Redis lost it: flush
    assert replay_plan(R + 5, R + 2, _log(range(R, R + 3), restart_at=R)) is None


def test_replay_plan_for_a_tracker_that_synced_before_the_counter_existed() -> None:
    # Position 0: the first message of the new counter, with its "R", starts the chain.
    plan = replay_plan(0, R + 2, _log(range(R, R + 3), restart_at=R))
    assert plan is not None and [m.seq for m in plan] == [R, R + 1, R + 2]
    assert plan[0].restart
    assert replay_plan(0, R + 2, _log(range(R + 1, R + 3))) is None  # its first one was trimmed


@SETTINGS
@given(
    st.integers(0, 20),
    st.integers(0, 20),
    st.sets(st.integers(1, 25)),
)
def test_replay_plan_is_exactly_the_missing_run_or_none(
    have: int, counter: int, logged: set[int]
) -> None:
    # A counter that started at R + 1 (so position R + 0 is "before its first message").
    position, current = R + have, R + counter
    plan = replay_plan(position, current, _log([R + s for s in logged], restart_at=R + 1))
    needed = list(range(position + 1, current + 1))
    if current < position:
        assert plan is None
    elif {s - R for s in needed} <= logged and R + 1 not in needed:
        assert plan is not None and [m.seq for m in plan] == needed
    elif not needed:
        assert plan == []
    else:
        assert plan is None


# -- FillGuard ----------------------------------------------------------------------------------


def test_guard_admits_when_nothing_was_invalidated_since_the_ticket() -> None:
    g = FillGuard()
    g.observe("k", 50)
    t = g.ticket()
    assert g.admit(t, "k", 1)  # the read saw whatever Redis had after the invalidation
    assert g.admit(t, "k", 50)
    assert g.admit(t, "other", 1)


def test_guard_refuses_a_version_older_than_a_newer_invalidation() -> None:
    g = FillGuard()
    t = g.ticket()
    g.observe("k", 10)
    assert not g.admit(t, "k", 9)
    assert g.admit(t, "k", 10)  # equal: the invalidation announced this very version
    assert g.admit(t, "k", 11)
    assert g.admit(t, "other", 1)  # another key is not affected
    assert g.newest("k") == 10 and g.newest("other") == 0


def test_guard_applied_ignores_writes_of_unknown_outcome() -> None:
    g = FillGuard()
    g.observe("k", 10)
    g.observe("k", 20, applied=False)  # a write that timed out: it may never land
    assert g.newest("k") == 20 and g.applied("k") == 10
    t = g.ticket()
    g.observe("k", 15)
    assert g.applied("k") == 15 and g.newest("k") == 20
    assert not g.admit(t, "k", 19)  # fills are still held to the unknown write
    assert g.applied("other") == 0


def test_guard_newest_only_rises() -> None:
    g = FillGuard()
    g.observe("k", 10)
    g.observe("k", 4)  # a late, reordered message
    assert g.newest("k") == 10
    t = g.ticket()
    g.observe("k", 7)
    assert not g.admit(t, "k", 9)
    assert g.admit(t, "k", 10)


def test_guard_forget_all_refuses_every_older_ticket() -> None:
    g = FillGuard()
    t = g.ticket()
    g.observe("k", 10)
    g.forget_all()
    assert len(g) == 0 and g.newest("k") == 0
    assert not g.admit(t, "k", 10**9)
    assert not g.admit(t, "never-seen", 10**9)
    fresh = g.ticket()
    assert g.admit(fresh, "k", 1)


def test_guard_forget_all_refuses_even_a_ticket_taken_right_before() -> None:
    g = FillGuard()
    t = g.ticket()
    g.forget_all()
    assert not g.admit(t, "k", 1)


def test_guard_is_bounded_and_evicting_a_key_refuses_older_tickets() -> None:
    g = FillGuard(max_keys=3)
    old = g.ticket()
    for k in ("a", "b", "c"):
        g.observe(k, 10)
    mid = g.ticket()
    assert g.admit(old, "zz", 1)  # nothing forgotten yet: an unrelated key is fine
    g.observe("d", 10)  # "a" is forgotten
    assert len(g) == 3
    assert g.newest("a") == 0 and g.newest("d") == 10
    # "a" might have been what an older read needed: every ticket from before is refused.
    assert not g.admit(old, "a", 1)
    assert not g.admit(mid, "a", 5)
    assert not g.admit(mid, "zz", 10**9)
    later = g.ticket()
    assert g.admit(later, "a", 1)
    g.observe("b", 20)
    assert g.admit(later, "a", 1)  # an unrelated invalidation after the ticket


def test_guard_keeps_the_most_recently_invalidated_keys() -> None:
    g = FillGuard(max_keys=2)
    g.observe("a", 1)
    g.observe("b", 1)
    g.observe("a", 2)  # "a" is recent again
    g.observe("c", 1)  # "b" goes
    assert g.newest("a") == 2 and g.newest("b") == 0 and g.newest("c") == 1


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 100)), max_size=200))
def test_guard_map_never_exceeds_its_bound(events: list[tuple[int, int]]) -> None:
    g = FillGuard(max_keys=8)
    for key, version in events:
        g.observe(key, version)
        assert len(g) <= 8


@SETTINGS
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("observe"), st.integers(0, 5), st.integers(1, 50)),
            st.tuples(st.just("forget"), st.just(0), st.just(0)),
        ),
        max_size=30,
    ),
    st.integers(0, 5),
    st.integers(1, 50),
)
def test_guard_never_admits_a_version_below_one_invalidated_after_the_ticket(
    events: list[tuple[str, int, int]], key: int, version: int
) -> None:
    g = FillGuard(max_keys=3)
    t = g.ticket()
    newest_after: dict[int, int] = {}
    forgot = False
    for kind, k, v in events:
        if kind == "observe":
            g.observe(k, v)
            newest_after[k] = max(newest_after.get(k, 0), v)
        else:
            g.forget_all()
            forgot = True
    admitted = g.admit(t, key, version)
    if forgot or version < newest_after.get(key, 0):
        assert not admitted
    if not events:
        assert admitted


# -- OwnWrites ------------------------------------------------------------------------------------


def test_an_echo_heard_before_the_reply_passes_and_proves_the_write_landed() -> None:
    own = OwnWrites()
    own.begin(10)
    assert own.heard(10)  # the listener lets it pass
    assert own.end(10, applied=False)  # the reply was lost, but the echo proves it landed
    assert len(own) == 0


def test_an_echo_heard_after_the_reply_passes_and_is_then_forgotten() -> None:
    own = OwnWrites()
    own.begin(10)
    assert not own.end(10, applied=True)
    assert len(own) == 1  # waiting for its echo
    assert own.heard(10)
    assert len(own) == 0
    assert not own.heard(10)  # a second copy (a replay) is applied in full


def test_versions_not_written_here_or_ended_unapplied_are_applied_in_full() -> None:
    own = OwnWrites()
    assert not own.heard(7)
    own.begin(8)
    assert not own.end(8, applied=False)  # rejected or unknown: no echo may be skipped
    assert not own.heard(8)
    own.begin(9)
    own.discard(9)  # applied in full from the log
    assert not own.heard(9)


def test_own_writes_stay_bounded_when_echoes_never_come() -> None:
    own = OwnWrites(max_pending=100)
    for v in range(1, 1001):
        own.begin(v)
        own.end(v, applied=True)
    assert len(own) == 100
    assert not own.heard(1)  # pushed out: applied in full, which is only slower
    assert own.heard(1000)


@given(st.lists(st.tuples(st.sampled_from("bhpe"), st.integers(1, 5), st.booleans()), max_size=60))
@SETTINGS
def test_own_writes_against_a_model(steps: list[tuple[str, int, bool]]) -> None:
    """begin/heard/passed/end in any order: an echo passes only while its write is registered,
    and end reports the echo exactly when it came (heard, or passed by the socket's filter)
    between begin and end."""
    own = OwnWrites()
    model: dict[int, str] = {}

    def hear(v: int) -> bool:
        state = model.get(v)
        if state == "done":
            del model[v]
        elif state is not None:
            model[v] = "heard"
        return state is not None

    for op, v, applied in steps:
        if op == "b":
            own.begin(v)
            model[v] = "pending"
        elif op == "h":
            assert own.heard(v) == hear(v)
        elif op == "p":  # the filter passed two echoes, taken together
            pair = [v, v % 5 + 1]
            own.passed(pair)
            for version in pair:
                hear(version)
        else:
            state = model.get(v)
            assert own.end(v, applied) == (state == "heard")
            if state == "heard" or not applied:
                model.pop(v, None)
            elif state is not None:
                model[v] = "done"
        assert len(own) == len(model)
