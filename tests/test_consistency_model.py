"""A Hypothesis state machine: three TieredCache instances (own connections and listeners, one
namespace) on one real Redis, against a model of the truth.

The model (the "origin") is a dict key -> value of the last acknowledged write or delete; every
value is unique, and its rank (a global counter) orders the writes, so "older than" is exact.
Instance 0 reads through a loader that reads the model, as a cache-aside application would; 1 and
2 have no loader (a miss reads as None). A fourth instance only writes the sentinel of :meth:`sync`.

Knowing what an instance has applied. Every write or delete publishes exactly one invalidation,
applied by every instance in publish order, and ``stats()["invalidations_received"]`` counts them
(it is incremented when a message starts to be applied, so only ``count - 1`` messages are surely
done). After :meth:`sync` (a sentinel write whose invalidation must drop the previous sentinel from
every local tier) an instance's count is lined up with the model's message list again; faults end
with a sync.

Invariants, after every step:
* L2 holds, for every key, the truth or nothing (no overwritten value, no fill that lost its race),
  and the newest version stored for a key (value or tombstone) never decreases, across restarts and
  FLUSHALL too (SPEC 3 first paragraph, P7);
* every local tier holds, per key, nothing or a value at least as new as every invalidation of that
  key the instance has applied (P1, P2: no resurrection).
Checks on every read: delivered-invalidation freshness (P2), read-your-writes in the writer (P4),
monotonic reads per instance (P5); a miss only when Redis has no value (and, for the reader with a
loader, the truth has none); after :meth:`sync`, exactly the truth.
Rules: write, delete, cache-aside origin write (truth changes, cache invalidated), clear(), read
(immediate and synced), a read-through fill whose slow loader is overtaken by a write (set,
invalidate or delete) on another instance or the same one, CLIENT KILL of one or every listener
(with a write in the gap), crash-restart of Redis with no data, FLUSHALL.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import tiercache
from tests.aio_facade import make_cache
from tests.history import kill_listener, listener_clients, percentile, soak_only
from tests.servers import RedisServer, wait_until
from tiercache.codec import resolve_codec
from tiercache.envelope import unpack
from tiercache.keys import KeySpace, encode_key, local_key
from tiercache.tiered import TieredCache

KEYS: list[Hashable] = ["a", "b", ("t", 1)]  # str keys take the local fast path, a tuple does not
LABELS = {"a": "a", "b": "b", ("t", 1): "t"}
SYNC_KEY = "__sync__"
CLEAR = "__clear__"  # the model's message for a clear(): {key: rank of its truth then}
ABSENT = object()  # a cached absence in Redis (an envelope flagged ABSENT)
# The value a local tier holds for a cached absence ("the origin has no such key"), if the library
# caches absences; nothing is ever identical to the fallback.
MISSING = getattr(tiercache, "MISSING", object())
HEALTH_INTERVAL = 0.25
HEALTH_TIMEOUT = 1.0
# Detection and recovery bound of a lost channel: health check, reconnect backoff (1 s at most),
# and a margin for a noisy machine.
DETECT = HEALTH_INTERVAL + HEALTH_TIMEOUT + 1.0 + 1.5
SYNC_TIMEOUT = 5.0  # propagation bound for sync (generous; the measured times are printed)
RECOVERY_TIMEOUT = 15.0
OPTIONS: dict[str, Any] = {
    "health_interval": HEALTH_INTERVAL,
    "health_timeout": HEALTH_TIMEOUT,
    "socket_timeout": 2.0,
    "startup_timeout": 5.0,
    "local_ttl": 60.0,
}
INSTANCES = st.integers(0, 2)
KEY = st.sampled_from(KEYS)
CODEC = resolve_codec(None)
_namespaces = itertools.count()
SYNC_TIMES: list[float] = []  # seconds from a sentinel write to its arrival everywhere
RULES: Counter[str] = Counter()  # how often each rule ran (printed: the faults were exercised)


class TieredModel(RuleBasedStateMachine):
    """Three instances against the model; see the module docstring."""

    def __init__(self, server: RedisServer, impl: str = "sync") -> None:
        super().__init__()
        self.server = server
        # "async": instances 0 and 2 are AsyncTieredCache (tests.aio_facade), 1 a TieredCache,
        # so one namespace is shared by both drivers in one process.
        self.impls = ["sync"] * 3 if impl == "sync" else ["async", "sync", "async"]
        self.ns = f"model{next(_namespaces)}"
        self.keyspace = KeySpace(self.ns)
        # A cluster (tests/cluster.py) gets one partition here, one slot and one channel: the
        # count-based floors below need one total order of messages (tests/test_cluster.py runs
        # many partitions against wall-clock bounds instead).
        cluster = hasattr(server, "raw_view")
        self.options = dict(OPTIONS, partitions=1) if cluster else OPTIONS
        self.raw = server.raw_view() if cluster else server.client()
        self.truth: dict[Hashable, str | None] = {}
        self.rank_of: dict[str, int] = {}
        self.n = 0
        # (key, rank it guarantees) or (CLEAR, {key: rank}), in publish order
        self.messages: list[tuple[Hashable, Any]] = []
        self.truth_rank: dict[Hashable, int] = {}  # rank of each key's last write/delete
        self.absent_rank: dict[Hashable, int] = {}  # rank of each key's newest absent state
        self.max_read: dict[tuple[int, Hashable], int] = {}
        self.own_write: dict[tuple[int, Hashable], int] = {}
        self.l2_version: dict[Hashable, int] = {}
        self.gate: threading.Event | None = None
        self.gate_key: Hashable = None
        self.loading = threading.Event()
        self.sync_value: str | None = None
        self.faults = 0
        self.restarts = 0
        self.instances: list[TieredCache] = []
        self.names: list[str] = []
        self.syncer: TieredCache | None = None
        try:
            for i in range(3):
                self.instances.append(self._open(self._loader if i == 0 else None, self.impls[i]))
            self.syncer = TieredCache(server.url, namespace=self.ns, **self.options)
            self.base_count = [0, 0, 0]
            self.base_pub = [0, 0, 0]
            self.sync()
        except BaseException:
            self.teardown()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    def _open(self, loader: Any, impl: str = "sync") -> TieredCache:
        before = {c["name"] for c in listener_clients(self.raw, self.ns)}
        cache = make_cache(impl, self.server.url, namespace=self.ns, loader=loader, **self.options)
        assert cache.wait_ready(10.0), "a new instance never got its channel ready"
        new = {c["name"] for c in listener_clients(self.raw, self.ns)} - before
        assert len(new) == 1, f"cannot tell the new instance's listener among {new}"
        self.names.append(str(new.pop()))
        return cache

    def teardown(self) -> None:
        if self.gate is not None:
            self.gate.set()
        for cache in [*self.instances, self.syncer]:
            if cache is not None:
                cache.close()
        self.raw.close()

    def _loader(self, key: Hashable) -> Any:
        """The origin: reads the truth, then (when gated) blocks until the test releases it."""
        value = self.truth.get(key)
        gate = self.gate
        if gate is not None and key == self.gate_key:
            self.loading.set()
            if not gate.wait(10.0):
                raise TimeoutError("the test never released the slow loader")
        if value is None:
            raise KeyError(key)
        return value

    def _new_value(self, key: Hashable) -> tuple[str, int]:
        self.n += 1
        value = f"{LABELS[key]}{self.n}"
        self.rank_of[value] = self.n
        return value, self.n

    def _count(self, i: int) -> int:
        return int(self.instances[i].stats()["invalidations_received"])

    def _floor(self, i: int, key: Hashable, count: int) -> int:
        """The rank every read of ``key`` by instance ``i`` must reach, given its count then."""
        applied = self.base_pub[i] + max(0, count - 1 - self.base_count[i])
        floor = 0
        for k, rank in self.messages[: min(applied, len(self.messages))]:
            if k == key:
                floor = max(floor, rank)
            elif k == CLEAR:  # after a clear, only values at least as new as the truth then
                floor = max(floor, rank.get(key, 0))
        return max(floor, self.own_write.get((i, key), 0))

    def _l2(self, key: Hashable) -> tuple[Any, int]:
        """(value, version) of ``key``'s entry in Redis, read raw: value None when there is no
        value (no entry, a tombstone, a fill lease), ``ABSENT`` for a cached absence.

        The version is that of whatever the entry holds (a fill lease keeps the version the key
        had), 0 when there is no entry.
        """
        raw = self.raw.get(self.keyspace.value(encode_key(key)))
        if raw is None:
            return None, 0
        env = unpack(raw)
        if not getattr(env, "is_value", True):
            return None, env.version
        if env.absent:
            return ABSENT, env.version
        return CODEC.loads(env.payload), env.version

    def _entry(self, i: int, key: Hashable) -> Any:
        return self.instances[i].local.entry(local_key(key, encode_key(key)))

    def _published(self, i: int, key: Hashable, rank: int) -> None:
        self.messages.append((key, rank))
        self.own_write[(i, key)] = rank
        self.truth_rank[key] = rank
        if self.truth.get(key) is None:
            self.absent_rank[key] = rank

    # -- the checks of one read ------------------------------------------------------------------

    def _read(self, i: int, key: Hashable, *, synced: bool = False) -> Any:
        count = self._count(i)
        got = self.instances[i].get(key)
        floor = self._floor(i, key, count)
        truth = self.truth.get(key)
        where = f"instance {i} read {key!r} -> {got!r} (truth {truth!r})"
        if got is None:
            # A miss is an absent state of the truth (its newest one must not be older than what
            # the instance applied), or, for an instance without loader, data Redis lost.
            value, _ = self._l2(key)
            absent = self.absent_rank.get(key, 0)
            if value is not None and value is not ABSENT:
                assert absent >= floor, f"{where}: a miss while Redis holds {value!r}"
            elif i == 0 and truth is not None:
                assert absent >= floor, f"{where}: a miss although the loader has a value"
            return got
        rank = self.rank_of.get(got)
        assert rank is not None and got.startswith(LABELS[key]), f"{where}: never written there"
        assert rank >= floor, (
            f"{where}: older than rank {floor}, whose invalidation this instance had applied "
            f"(or wrote itself) before the read"
        )
        previous = self.max_read.get((i, key), 0)
        assert rank >= previous, f"{where}: monotonic reads: it had read rank {previous} before"
        self.max_read[(i, key)] = rank
        if synced:
            assert got == truth, f"{where}: after every invalidation was applied"
        return got

    # -- synchronisation ---------------------------------------------------------------------------

    def _write_sentinel(self) -> str:
        assert self.syncer is not None
        self.n += 1
        value = f"sync{self.n}"
        self.syncer[SYNC_KEY] = value
        self.messages.append((SYNC_KEY, 0))
        self.sync_value = value
        return value

    def sync(self) -> None:
        """Wait until every instance has applied every invalidation published so far; rebase."""
        current = self.sync_value
        if current is None or self._l2(SYNC_KEY)[0] != current:
            current = self._write_sentinel()
        for i, cache in enumerate(self.instances):

            def holds(cache: TieredCache = cache, v: str | None = current, i: int = i) -> bool:
                e = self._entry(i, SYNC_KEY)
                if e is not None and e.value == v:
                    return True
                cache.get(SYNC_KEY)  # read it (into the local tier, once the channel is whole)
                return False

            wait_until(holds, SYNC_TIMEOUT, message=f"instance {i} caching the sentinel")
        started = time.monotonic()
        value = self._write_sentinel()
        for i in range(len(self.instances)):
            wait_until(
                lambda i=i: self._entry(i, SYNC_KEY) is None,
                SYNC_TIMEOUT,
                0.0005,
                message=f"instance {i} applying the invalidation of the sentinel {value}",
            )
        SYNC_TIMES.append(time.monotonic() - started)
        self.base_count = [self._count(i) for i in range(len(self.instances))]
        self.base_pub = [len(self.messages)] * len(self.instances)

    # -- rules ------------------------------------------------------------------------------

    @rule(i=INSTANCES, key=KEY)
    def write(self, i: int, key: Hashable) -> None:
        RULES["write"] += 1
        value, rank = self._new_value(key)
        self.truth[key] = value
        self.instances[i][key] = value
        self._published(i, key, rank)
        assert self._read(i, key) == value, "read-your-writes"

    @rule(i=INSTANCES, key=KEY)
    def delete(self, i: int, key: Hashable) -> None:
        RULES["delete"] += 1
        self.n += 1
        self.truth[key] = None
        self.instances[i].invalidate(key)
        self._published(i, key, self.n)
        assert self._read(i, key) is None, "read-your-writes (a delete)"

    @rule(i=INSTANCES, key=KEY)
    def origin_write(self, i: int, key: Hashable) -> None:
        RULES["origin_write"] += 1
        """Cache-aside: the origin changes, then the cache entry is invalidated."""
        value, rank = self._new_value(key)
        self.truth[key] = value
        self.instances[i].invalidate(key)
        self._published(i, key, rank)
        assert self._read(i, key) == (value if i == 0 else None), "read-your-writes (origin)"

    @rule(i=INSTANCES, key=KEY)
    def read(self, i: int, key: Hashable) -> None:
        RULES["read"] += 1
        self._read(i, key)

    @rule(i=INSTANCES, key=KEY)
    def read_synced(self, i: int, key: Hashable) -> None:
        RULES["read_synced"] += 1
        self.sync()
        self._read(i, key, synced=True)

    @rule(writer=INSTANCES, key=KEY, how=st.sampled_from(["set", "invalidate", "delete"]))
    def slow_fill(self, writer: int, key: Hashable, how: str) -> None:
        """Instance 0 misses and loads v1 slowly; a write lands meanwhile; the fill must lose."""
        RULES[f"slow_fill/{how}"] += 1
        v1, r1 = self._new_value(key)
        self.truth[key] = v1
        self.instances[writer].invalidate(key)
        self._published(writer, key, r1)
        self.sync()  # instance 0 has dropped any copy: its read will reach the loader
        reader = self.instances[0]
        rejected = reader.stats()["stale_fills_rejected"]
        result: dict[str, Any] = {}

        def read() -> None:
            try:
                result["value"] = reader.get(key)
            except BaseException as exc:  # reported below
                result["error"] = exc

        self.loading.clear()
        self.gate, self.gate_key = threading.Event(), key
        thread = threading.Thread(target=read, name="slow-fill", daemon=True)
        thread.start()
        try:
            wait_until(self.loading.is_set, 5.0, message="the reader calling its loader")
            v2, r2 = self._new_value(key)
            if how == "set":
                self.truth[key] = v2
                self.instances[writer][key] = v2
            else:
                self.truth[key] = v2 if how == "invalidate" else None
                self.instances[writer].invalidate(key)
            self._published(writer, key, r2)
        finally:
            self.gate.set()
            thread.join(10.0)
            self.gate = None
        assert not thread.is_alive(), "the slow read did not return"
        assert "error" not in result, f"the slow read raised {result.get('error')!r}"
        assert result["value"] == v1, f"the slow read returned {result['value']!r}, not {v1!r}"
        self.max_read[(0, key)] = max(self.max_read.get((0, key), 0), r1)
        assert reader.stats()["stale_fills_rejected"] == rejected + 1, (
            "the fill that started before the write was not rejected"
        )
        value, _ = self._l2(key)
        assert value != v1, f"Redis holds the overtaken fill {v1!r}"
        self.sync()
        for i in range(3):
            e = self._entry(i, key)
            assert e is None or e.value != v1, f"instance {i} caches the overtaken fill {v1!r}"
            self._read(i, key, synced=True)

    @rule(i=INSTANCES)
    def clear(self, i: int) -> None:
        """clear(): the namespace is emptied in Redis and in every instance's local tier."""
        RULES["clear"] += 1
        ranks = dict(self.truth_rank)
        self.instances[i].clear()
        self.messages.append((CLEAR, ranks))
        self.sync_value = None  # the sentinel went too
        assert len(self.instances[i].local) == 0, "the clearing instance kept local copies"
        for key in KEYS:
            assert self._l2(key)[0] is None, f"{key!r} survived clear() in Redis"

    @precondition(lambda self: self.faults < 3)
    @rule(victim=st.sampled_from([None, 0, 1, 2]), gap_write=st.booleans(), key=KEY)
    def kill_pubsub(self, victim: int | None, gap_write: bool, key: Hashable) -> None:
        """CLIENT KILL one listener (or all), maybe write in the gap; each victim must resync."""
        RULES["kill_pubsub/" + ("all" if victim is None else "one")] += 1
        self.faults += 1
        victims = range(3) if victim is None else [victim]
        before = {i: self.instances[i].stats()["resyncs"] for i in victims}
        if victim is None:
            assert self.raw.client_kill_filter(_type="pubsub") >= 4
        else:
            assert kill_listener(self.raw, self.names[victim]) == 1
        if gap_write:
            self.write((victims[0] + 1) % 3, key)
        for i in victims:
            wait_until(
                lambda i=i: (
                    self.instances[i].stats()["resyncs"] > before[i]
                    and self.instances[i].stats()["local_usable"]
                ),
                DETECT,
                message=(
                    f"instance {i} resynchronising after its pub/sub connection was killed "
                    f"(a silent resubscribe loses what was published meanwhile)"
                ),
            )
        self.sync()

    @precondition(lambda self: self.restarts < 1 and getattr(self.server, "can_restart", True))
    @rule()
    def restart_redis(self) -> None:
        """Crash Redis and restart it empty: every local tier is flushed, versions stay ordered."""
        RULES["restart_redis"] += 1
        self.restarts += 1
        before = [c.stats()["resyncs"] for c in self.instances]
        self.server.kill()
        self.server.restart()
        self.raw.close()
        self.raw = self.server.client()
        for i, cache in enumerate(self.instances):
            wait_until(
                lambda c=cache, b=before[i]: c.stats()["resyncs"] > b and c.stats()["local_usable"],
                RECOVERY_TIMEOUT,
                message=f"instance {i} recovering after the restart",
            )
            assert len(cache.local) == 0, f"instance {i} kept local copies over the data loss"
        self.sync()
        self.sync()

    @precondition(lambda self: self.restarts < 1)
    @rule()
    def flushall(self) -> None:
        """FLUSHALL: values, counters and log are gone; the next writes must still be newer."""
        RULES["flushall"] += 1
        self.restarts += 1
        self.raw.flushall()
        self.sync_value = None
        self.sync()  # its first write restarts the sequence: every instance must notice
        self.sync()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def redis_holds_truth_or_nothing(self) -> None:
        for key in KEYS:
            value, newest = self._l2(key)
            expected = ABSENT if self.truth.get(key) is None else self.truth.get(key)
            assert value is None or value == expected, (
                f"Redis holds {'an absence' if value is ABSENT else repr(value)} for {key!r}, "
                f"the truth is {self.truth.get(key)!r}"
            )
            if newest:
                assert newest >= self.l2_version.get(key, 0), (
                    f"the version of {key!r} in Redis went back from "
                    f"{self.l2_version.get(key)} to {newest}"
                )
                self.l2_version[key] = newest

    @invariant()
    def local_tiers_hold_nothing_overwritten(self) -> None:
        for i in range(3):
            count = self._count(i)
            for key in KEYS:
                e = self._entry(i, key)
                if e is None:
                    continue
                if e.value is MISSING:  # a cached absence: as new as the newest absent state
                    rank = self.absent_rank.get(key, 0)
                else:
                    rank = self.rank_of.get(e.value, -1)
                floor = self._floor(i, key, count)
                assert rank >= floor, (
                    f"instance {i} caches {e.value!r} for {key!r} although it applied the "
                    f"invalidation of rank {floor}"
                )


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def _run(
    server: RedisServer, capsys: pytest.CaptureFixture[str], cfg: settings, impl: str = "sync"
) -> None:
    SYNC_TIMES.clear()
    RULES.clear()
    try:
        run_state_machine_as_test(lambda: TieredModel(server, impl), settings=cfg)
    finally:
        with capsys.disabled():
            times = [t * 1000 for t in SYNC_TIMES]
            print(
                f"\n[model] {len(times)} syncs: invalidation of a write applied by all 3 "
                f"instances within max {max(times, default=0):.1f} ms, "
                f"p99 {percentile(times, 0.99):.1f} ms, p50 {percentile(times, 0.5):.1f} ms"
            )
            print(f"[model] rules run: {dict(sorted(RULES.items()))}")


@pytest.fixture(params=["single", "cluster"])
def model_backend(request: pytest.FixtureRequest) -> Any:
    """One real Redis, or the session's 3-master cluster (emptied; no restart rule there)."""
    if request.param == "single":
        return request.getfixturevalue("redis_server")
    if request.getfixturevalue("impl") == "async":
        pytest.skip("AsyncTieredCache does not support Redis Cluster (docs/asyncio.md)")
    cluster = request.getfixturevalue("shared_cluster")
    cluster.flushall()
    return cluster


def test_tiered_cache_model(
    model_backend: Any, capsys: pytest.CaptureFixture[str], impl: str
) -> None:
    """Three cache instances against the model on one real Redis or a cluster (see the module
    docstring); with ``impl="async"`` two of them are AsyncTieredCache."""
    cluster = not isinstance(model_backend, RedisServer)
    cfg = settings(SETTINGS, max_examples=8) if cluster else SETTINGS
    _run(model_backend, capsys, cfg, impl)


@pytest.mark.slow
def test_tiered_cache_model_long(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    impl: str,
) -> None:
    """The same machine with more and longer examples (``make soak``)."""
    soak_only(request)
    long = settings(SETTINGS, max_examples=150, stateful_step_count=50)
    _run(redis_server, capsys, long, impl)
