"""TieredCache on a real Redis Cluster (3 masters, replicas where a test fails one over) and on a
Sentinel-managed master: routing and batching per slot and node, sharded pub/sub, slot migration
of a hot key, master loss, Sentinel failover, a promoted replica that missed writes.

The workloads under faults reuse the multi-process history runner and checker of
tests/test_consistency_procs.py: bounded staleness outside the fault windows plus the detection
bound, monotonic reads, read-your-writes, every process resynchronised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cluster import ClusterSet, SentinelSet
from tests.history import CacheProcess, hold, key_space, soak_only
from tests.servers import wait_until
from tests.test_consistency_procs import DETECT, Timeline, _run, _until, workers  # noqa: F401
from tiercache import TieredCache, tiered_cache
from tiercache.bloom import BloomConfig
from tiercache.cluster import ClusterDriver, SentinelDriver, ShardedListener
from tiercache.errors import CacheUnavailable
from tiercache.keys import KeySpace, encode_key

OPTIONS: dict[str, Any] = {
    "health_interval": 0.2,
    "health_timeout": 0.5,
    "socket_timeout": 1.0,
    "connect_timeout": 0.5,
    "startup_timeout": 5.0,
}


def _ns(tag: str) -> str:
    return f"{tag}{os.getpid()}x{time.monotonic_ns() % 10**9}"


def _slot_of(namespace: str, key: Any, partitions: int = 16) -> tuple[int, int]:
    """(partition, hash slot) of ``key`` in a namespace of ``partitions`` partitions."""
    ks = KeySpace(namespace, partitions)
    p = ks.partition(encode_key(key))
    return p, redis.crc.key_slot(ks.counter(p))


def _listener(cache: TieredCache) -> ShardedListener:
    listener = cache._listener
    assert isinstance(listener, ShardedListener)
    return listener


# -- basics ------------------------------------------------------------------------------------


def test_cluster_url_and_client_share_a_namespace(shared_cluster: ClusterSet) -> None:
    """Both forms work together: writes seen across, get_many over slots, len, iter, clear."""
    ns = _ns("basic")
    client = shared_cluster.client()
    with (
        TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as a,
        TieredCache(client, namespace=ns, **OPTIONS) as b,
    ):
        assert a.wait_ready(10) and b.wait_ready(10)
        assert isinstance(a._driver, ClusterDriver) and isinstance(b._driver, ClusterDriver)
        owners = a._driver.by_node(range(a._keys.partitions))
        assert len(owners) >= 2, "the partitions should spread over several masters"
        keys = [f"k{i}" for i in range(60)]
        for k in keys:
            a[k] = k.upper()
        assert b.get_many(keys) == {k: k.upper() for k in keys}
        assert b["k3"] == "K3" and b.stats()["local_hits"] >= 0
        b["k3"]  # from the local tier now
        a["k3"] = "new"
        wait_until(lambda: b["k3"] == "new", 5.0, message="invalidation over SPUBLISH")
        assert len(a) == 60 and set(b) == set(keys)
        del a["k4"]
        assert "k4" not in b and len(b) == 59
        a.clear()
        assert len(a) == 0 and b.get("k3") is None
    client.close()


def test_cluster_uses_sharded_pubsub(shared_cluster: ClusterSet) -> None:
    """Each partition's channel has one sharded subscriber per cache on its master, none plain."""
    ns = _ns("shard")
    with TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as cache:
        assert cache.wait_ready(10)
        keys = cache._keys
        for p in range(keys.partitions):
            channel = keys.channel(p)
            owner = shared_cluster.owner(redis.crc.key_slot(channel))
            raw = shared_cluster.raw(owner)
            (_, sharded) = raw.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            (_, plain) = raw.execute_command("PUBSUB", "NUMSUB", channel)
            assert (int(sharded), int(plain)) == (1, 0), f"partition {p} on {owner}"


def test_cluster_decorator_and_prefix_clear(shared_cluster: ClusterSet) -> None:
    """A decorated function's cache_clear and invalidate reach every process, over all slots."""
    ns = _ns("deco")
    calls: list[int] = []
    with (
        TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as a,
        TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as b,
    ):
        assert a.wait_ready(10) and b.wait_ready(10)

        def square(x: int) -> int:
            calls.append(x)
            return x * x

        fa = tiered_cache(a)(square)
        fb = tiered_cache(b)(square)
        assert [fa(i) for i in range(20)] == [i * i for i in range(20)]
        assert [fb(i) for i in range(20)] == [i * i for i in range(20)]
        assert len(calls) == 20, "b's calls were served from Redis"
        fb.invalidate(7)
        wait_until(lambda: (fa(7), len(calls))[1] == 21, 5.0, message="one entry invalidated")
        fa.cache_clear()
        assert [fb(i) for i in range(20)] == [i * i for i in range(20)]
        assert len(calls) == 41, "cache_clear emptied every slot"


def test_cluster_auth_reaches_every_connection() -> None:
    """A password in the URL reaches the data connections and every listener connection."""
    cluster = ClusterSet(3, 0, password="s3cret:/@").start()
    try:
        url = cluster.url
        assert "s3cret%3A%2F%40@" in url
        ns = _ns("auth")
        with (
            TieredCache(url, namespace=ns, **OPTIONS) as a,
            TieredCache(url, namespace=ns, **OPTIONS) as b,
        ):
            assert a.wait_ready(10) and b.wait_ready(10), "a listener failed to authenticate"
            a["k"] = 1
            assert b["k"] == 1
            a["k"] = 2
            wait_until(lambda: b["k"] == 2, 5.0, message="invalidation with AUTH")
            links = _listener(b)._links
            assert len(links) >= 2, "one subscriber connection per master"
    finally:
        cluster.stop()


def test_cluster_fleet_view(shared_cluster: ClusterSet) -> None:
    """``tiercache stats --url redis+cluster://...`` reads the heartbeats on the cluster."""
    ns = _ns("fleet")
    with TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as cache:
        assert cache.wait_ready(10)
        cache.heartbeat()
        command = [sys.executable, "-m", "tiercache", "stats", "--url", shared_cluster.url]
        command += ["--namespace", ns, "--json"]
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        assert out.returncode == 0, out.stderr
        beats = json.loads(out.stdout)
        assert [b["pid"] for b in beats] == [os.getpid()]


def test_cluster_refuses_the_negative_filter(shared_cluster: ClusterSet) -> None:
    """bloom= on a cluster is refused with a clear error (documented limit), not half-working."""
    with pytest.raises(ValueError, match="not supported on Redis Cluster"):
        TieredCache(shared_cluster.url, bloom=BloomConfig(1000), **OPTIONS)


# -- slot migration ----------------------------------------------------------------------------


def test_hot_key_slot_migration(shared_cluster: ClusterSet) -> None:
    """Move the slot of a cached key while it is written: a write that runs on the importing
    node (after ASK) is caught by the audit before the slot is handed over; after the hand-over
    the listener resubscribes on the new master; no stale read once resynced."""
    ns = _ns("mig")
    with (
        TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as writer,
        TieredCache(shared_cluster.url, namespace=ns, **OPTIONS) as reader,
    ):
        assert writer.wait_ready(10) and reader.wait_ready(10)
        key = "hot"
        _, slot = _slot_of(ns, key)
        writer[key] = "v1"
        assert reader[key] == "v1"
        assert reader.local.entry(key) is not None
        source = shared_cluster.owner(slot)
        target = next(m for m in shared_cluster.masters if m is not source)
        shared_cluster.begin_migration(slot, source, target)
        moved = shared_cluster.move_keys(slot, source, target)
        assert moved >= 3, "the entry, the counter and the log moved"
        writer[key] = "v2"  # runs on the importing node (ASK): its SPUBLISH reaches no one
        wait_until(lambda: reader[key] == "v2", 5.0, message="the audit finding the lost message")
        assert _listener(reader).audit_gaps >= 1
        before = _listener(reader).resubscribes
        shared_cluster.finish_migration(slot, source, target)
        wait_until(
            lambda: _listener(reader).resubscribes > before and reader.stats()["local_usable"],
            5.0,
            message="resubscribed on the new master",
        )
        assert shared_cluster.owner(slot) is target
        for n in range(3, 8):
            writer[key] = f"v{n}"
            wait_until(lambda n=n: reader[key] == f"v{n}", 5.0, message=f"v{n} after the move")
        assert writer.stats()["write_errors"] == 0


# -- workloads under faults (4 OS processes, history checked) -----------------------------------


def _hot_slots(namespace: str) -> list[int]:
    """The slots of the contended keys of the history workload (key_space's layout)."""
    keys, owners = key_space(4, 3, 2)
    return sorted({_slot_of(namespace, k)[1] for k, o in zip(keys, owners, strict=True) if o < 0})


def _migrations(cluster: ClusterSet, cycles: int) -> Callable[[float, Timeline, str], None]:
    """Kill every pub/sub connection, then move the hot keys' slots around, ``cycles`` times."""

    def inject(start_at: float, timeline: Timeline, namespace: str) -> None:
        for cycle in range(cycles):
            _until(start_at + 1.0 + cycle * 4.0)
            with timeline.fault("client-kill-pubsub"):
                assert cluster.kill_pubsub() >= 4
            hold(1.0)
            for slot in _hot_slots(namespace):
                source = cluster.owner(slot)
                target = next(m for m in cluster.masters if m is not source)
                with timeline.fault(f"migrate-slot-{slot}"):
                    cluster.migrate_slot(slot, target)

    return inject


def test_history_cluster_migrations(
    shared_cluster: ClusterSet,
    workers: Callable[[int], list[CacheProcess]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """4 processes on the cluster; pub/sub connections killed, hot slots migrated mid-run."""
    _run(
        shared_cluster,
        workers(4),
        tmp_path,
        4.5,
        _migrations(shared_cluster, 1),
        capsys,
        "cluster, migrations",
        min_resyncs=2,
    )


@pytest.mark.slow
def test_history_cluster_migrations_long(
    request: pytest.FixtureRequest,
    shared_cluster: ClusterSet,
    workers: Callable[[int], list[CacheProcess]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same, with 8 cycles of faults."""
    soak_only(request)
    _run(
        shared_cluster,
        workers(4),
        tmp_path,
        34.0,
        _migrations(shared_cluster, 8),
        capsys,
        "cluster, migrations, long",
        min_resyncs=16,
    )


def _kill_master(cluster: ClusterSet, at: float) -> Callable[[float, Timeline, str], None]:
    def inject(start_at: float, timeline: Timeline, namespace: str) -> None:
        _until(start_at + at)
        with timeline.fault("kill-master", loss=True):  # async replication may lose writes
            cluster.kill_master_of(_hot_slots(namespace)[0])

    return inject


def test_history_cluster_master_killed(
    cluster_with_replicas: ClusterSet,
    workers: Callable[[int], list[CacheProcess]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """4 processes; the master of a hot slot is SIGKILLed; its replica takes over."""
    _run(
        cluster_with_replicas,
        workers(4),
        tmp_path,
        8.0,  # (the replica's election can take seconds on a loaded machine: resync after it)
        _kill_master(cluster_with_replicas, 1.0),
        capsys,
        "cluster, master killed",
        min_resyncs=1,
    )


@pytest.mark.slow
def test_history_cluster_master_killed_long(
    request: pytest.FixtureRequest,
    cluster_with_replicas: ClusterSet,
    workers: Callable[[int], list[CacheProcess]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same with 8 processes and 25 s of workload (most of it after the failover)."""
    soak_only(request)
    _run(
        cluster_with_replicas,
        workers(8),
        tmp_path,
        25.0,
        _kill_master(cluster_with_replicas, 4.0),
        capsys,
        "cluster, master killed, long",
        min_resyncs=1,
    )


# -- a promoted replica that missed writes --------------------------------------------------------


def test_promoted_replica_missing_writes(cluster_with_replicas: ClusterSet) -> None:
    """A write acknowledged by a master that dies before its replica got it: the replica takes
    over with the older value; no process that saw the newer one caches the older one, and the
    next write is numbered above both."""
    cluster = cluster_with_replicas
    ns = _ns("lost")
    with (
        TieredCache(cluster.url, namespace=ns, **OPTIONS) as writer,
        TieredCache(cluster.url, namespace=ns, **OPTIONS) as reader,
    ):
        assert writer.wait_ready(10) and reader.wait_ready(10)
        key = "k"
        _, slot = _slot_of(ns, key)
        writer[key] = "v1"
        master = cluster.owner(slot)
        replica = next(r for r in cluster.replicas if _master_port(cluster, r) == master.port)
        wait_until(lambda: cluster.raw(replica).execute_command("DBSIZE") > 0, 5.0)
        replica.pause()  # SIGSTOP, and its replication link cut: it misses what comes next
        try:
            assert cluster.raw(master).client_kill_filter(_type="replica") == 1
            writer[key] = "v2"
            wait_until(lambda: reader[key] == "v2", 5.0, message="reader caching v2")
            v2 = reader.local.entry(key).version
            master.kill()
        finally:
            replica.resume()
        cluster.masters.remove(master)
        cluster.wait_ok(30.0)
        assert cluster.owner(slot) is replica
        wait_until(lambda: reader.stats()["local_usable"], 10.0, message="reader resynced")
        assert reader.stats()["flushes"] >= 1, "the lost history was not noticed"
        for cache in (reader, writer):  # v1 is in Redis again; neither process serves it
            for _ in range(5):
                assert cache.get(key) is None, "an older value came back"
                assert cache.get_many([key]) == {}
                e = cache.local.entry(key)
                assert e is None or e.version >= v2, "the local tier took the older value"
        assert reader.get_or_load(key, lambda k: "origin") == "origin", "a loader replaces it"
        writer[key] = "v3"
        wait_until(lambda: reader[key] == "v3", 5.0, message="the next write wins everywhere")
        assert reader.local.entry(key).version > v2


def _master_port(cluster: ClusterSet, replica: Any) -> int:
    info = cluster.raw(replica).info("replication")
    return int(info["master_port"])


# -- sentinel --------------------------------------------------------------------------------


def test_sentinel_url_and_client(sentinel_set: SentinelSet) -> None:
    """``redis+sentinel://`` and ``Sentinel(...).master_for(...)`` both find the master."""
    ns = _ns("sent")
    sentinel = redis.sentinel.Sentinel(sentinel_set.addresses, socket_timeout=1.0)
    client = sentinel.master_for(sentinel_set.service, socket_timeout=1.0)
    with (
        TieredCache(sentinel_set.url, namespace=ns, **OPTIONS) as a,
        TieredCache(client, namespace=ns, **OPTIONS) as b,
    ):
        assert a.wait_ready(10) and b.wait_ready(10)
        assert isinstance(a._driver, SentinelDriver) and isinstance(b._driver, SentinelDriver)
        a["x"] = 1
        assert b["x"] == 1
        a["x"] = 2
        wait_until(lambda: b["x"] == 2, 5.0, message="invalidation through the master")
    client.close()


def test_sentinel_graceful_failover_is_followed(sentinel_set: SentinelSet) -> None:
    """SENTINEL FAILOVER leaves the old master running (as a replica): the audit sees the
    sentinels name another master, the listener moves to it and resyncs."""
    ns = _ns("grace")
    with (
        TieredCache(sentinel_set.url, namespace=ns, **OPTIONS) as writer,
        TieredCache(sentinel_set.url, namespace=ns, **OPTIONS) as reader,
    ):
        assert writer.wait_ready(10) and reader.wait_ready(10)
        writer["k"] = "v1"
        assert reader["k"] == "v1"
        before = _listener(reader).resubscribes
        sentinel_set.failover()
        wait_until(
            lambda: _listener(reader).resubscribes > before and reader.stats()["local_usable"],
            10.0,
            message="the reader following the new master",
        )
        assert _listener(reader)._links[0].address == sentinel_set.current_master()

        def write_v2() -> bool:
            try:
                writer["k"] = "v2"  # the writer's pool finds the new master after READONLY
            except CacheUnavailable:
                return False
            return True

        wait_until(write_v2, 10.0, message="the writer reaching the new master")
        wait_until(lambda: reader["k"] == "v2", 5.0, message="invalidation from the new master")


def _sentinel_failover(sentinel: SentinelSet, at: float) -> Callable[[float, Timeline, str], None]:
    def inject(start_at: float, timeline: Timeline, namespace: str) -> None:
        _until(start_at + at)
        with timeline.fault("sentinel-failover", loss=True):  # (as above)
            sentinel.kill_master()

    return inject


def test_history_sentinel_failover(
    sentinel_set: SentinelSet,
    workers: Callable[[int], list[CacheProcess]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """4 processes on a Sentinel-managed master; it is SIGKILLed and the replica promoted."""
    _run(
        sentinel_set,
        workers(4),
        tmp_path,
        5.0,
        _sentinel_failover(sentinel_set, 1.0),
        capsys,
        "sentinel failover",
        min_resyncs=1,
    )


@pytest.mark.slow
def test_history_sentinel_failover_long(
    request: pytest.FixtureRequest,
    workers: Callable[[int], list[CacheProcess]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same with 8 processes, 25 s of workload, on a set of its own."""
    soak_only(request)
    sentinel = SentinelSet().start()
    try:
        _run(
            sentinel,
            workers(8),
            tmp_path,
            25.0,
            _sentinel_failover(sentinel, 4.0),
            capsys,
            "sentinel failover, long",
            min_resyncs=1,
        )
    finally:
        sentinel.stop()


# -- URLs ------------------------------------------------------------------------------------


def test_cluster_and_sentinel_urls_parse() -> None:
    """Several hosts, percent-encoded credentials, IPv6, the service name and db are read."""
    from tiercache.cluster import _hosts, is_cluster, is_sentinel, make_sentinel_client

    assert _hosts("u%40x:p%3Aw@10.0.0.1:7000,[::1]:7001") == (
        "u@x",
        "p:w",
        [("10.0.0.1", 7000), ("::1", 7001)],
    )
    assert _hosts("h:1") == (None, None, [("h", 1)])
    with pytest.raises(ValueError, match="host:port"):
        _hosts("nohostport")
    assert is_cluster("redis+cluster://h:1") and is_cluster("REDISS+CLUSTER://h:1")
    assert is_sentinel("redis+sentinel://h:1/svc") and not is_cluster("redis://h:1")
    with pytest.raises(ValueError, match="names the service"):
        make_sentinel_client(
            "redis+sentinel://127.0.0.1:1", socket_timeout=0.1, connect_timeout=0.1, retries=0
        )
    client = make_sentinel_client(
        "redis+sentinel://:pw@127.0.0.1:1/svc/3", socket_timeout=0.1, connect_timeout=0.1, retries=0
    )
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["db"], client.connection_pool.service_name) == (
        "pw",
        3,
        "svc",
    )
    client.close()
