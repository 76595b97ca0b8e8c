"""Write-behind, write-around and warm-up on real Redis servers, with real OS processes.

* write-behind: the write and its queueing are one step; batches coalesce to the last version of
  each key; a flusher SIGKILLed in the middle of a batch leaves its entries pending and another
  process claims and finishes them; the SQLite origin ends with exactly the last version of every
  key, and no key's versions were ever applied out of order; a failing writer is retried, then
  its batch goes to the dead-letter stream;
* write-around reaches every process;
* warm-up never stores a value over a newer write (deterministic and multi-process races).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.servers import RedisServer, pid_alive, wait_until
from tests.wb_procs import SqliteOrigin, applied_log, connect, origin_rows
from tiercache import CacheUnavailable, TieredCache, WriteBehind, WriteBehindItem, write_around
from tiercache.envelope import unpack
from tiercache.keys import encode_key
from tiercache.writebehind import coalesce, mark_key, stream_key

ROOT = Path(__file__).resolve().parent.parent
PROCS = str(ROOT / "tests" / "wb_procs.py")


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``tests/wb_procs.py`` roles as OS processes; any still alive is killed by pid."""
    started: list[subprocess.Popen[str]] = []

    def start(role: str, opts: dict[str, Any], **kw: Any) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, PROCS, role, json.dumps(opts)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            **kw,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert not pid_alive(proc.pid)


def _result(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _stored_version(cache: TieredCache, key: str) -> int:
    raw = cache.redis.get(cache._keys.value(encode_key(key)))
    assert raw is not None
    return unpack(raw).version


def _assert_in_version_order(log: list[tuple[str, int, int]]) -> None:
    """No key was ever applied at a version below one applied before it."""
    seen: dict[str, int] = {}
    for key, version, pid in log:
        assert version >= seen.get(key, 0), f"{key}: version {version} after {seen[key]} ({pid})"
        seen[key] = version


def _consumers(client: redis.Redis, stream: bytes) -> list[bytes]:
    return [c["name"] for c in client.xinfo_consumers(stream, "tiercache-flush")]


def _ns(tag: str) -> str:
    return f"{tag}{os.getpid()}"


# -- one process ----------------------------------------------------------------------------


def test_write_behind_queues_in_the_same_step(redis_client: redis.Redis) -> None:
    with TieredCache(redis_client, namespace="wb1", heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, writer=None)
        cache.set("a", {"n": 1}, write_behind=True)
        wb.set("b", [1, 2])
        cache["c"] = 3  # write-through: not queued
        assert cache["a"] == {"n": 1} and cache["b"] == [1, 2]
        assert wb.pending() == 2
        entries = redis_client.xrange(stream_key(cache._keys, 0))
        by_key = {f[b"k"]: int(f[b"v"]) for _, f in entries}
        assert by_key == {
            encode_key("a"): _stored_version(cache, "a"),
            encode_key("b"): _stored_version(cache, "b"),
        }
        cache.clear()  # a clear of the cache does not cancel queued origin writes
        assert wb.pending() == 2


def test_batches_coalesce_to_the_last_version_in_order(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    db = tmp_path / "origin.db"
    seen: list[list[WriteBehindItem]] = []
    origin = SqliteOrigin(db)

    def writer(batch: list[WriteBehindItem]) -> None:
        seen.append(batch)
        for item in batch:
            origin.apply(item)

    with TieredCache(redis_client, namespace="wb2", heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, writer, batch_size=1000, start=False)
        last = {}
        for n in range(5):
            for k in ("x", "y", "z"):
                last[k] = f"{k}{n}"
                wb.set(k, last[k])
        assert wb.delete("y")
        assert wb.flush(10.0)
        assert [[(i.key, i.deleted) for i in b] for b in seen] == [
            [("x", False), ("z", False), ("y", True)]
        ]
        rows = origin_rows(db)
        assert rows == {
            "x": ("x4", _stored_version(cache, "x")),
            "z": ("z4", _stored_version(cache, "z")),
        }
        assert wb.stats()["coalesced"] == 13 and wb.pending() == 0
        wb.close()
        stream = stream_key(cache._keys, 0)
        assert redis_client.xinfo_consumers(stream, "tiercache-flush") == []  # record removed
        assert redis_client.exists(mark_key(cache._keys, 0)) == 0  # no high-water mark left


def test_a_tagged_write_behind_is_queued_flushed_and_dropped_with_its_tag(
    redis_client: redis.Redis,
) -> None:
    seen: list[WriteBehindItem] = []
    with TieredCache(redis_client, namespace="wbtag", heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, lambda batch: seen.extend(batch), start=False)
        cache.set("a", {"n": 1}, tags=("user:1",), write_behind=True)
        cache.set("b", "plain", write_behind=True)
        assert wb.pending() == 2
        assert wb.flush(10.0)
        assert sorted((i.key, repr(i.value)) for i in seen) == [("a", "{'n': 1}"), ("b", "'plain'")]
        cache.invalidate_tag("user:1")
        assert cache.get("a") is None and cache["b"] == "plain"
        # A tagged write-behind after the invalidation survives it, and is queued again.
        cache.set("a", {"n": 2}, tags=("user:1",), write_behind=True)
        assert cache["a"] == {"n": 2} and wb.pending() == 1
        wb.close()


def test_records_of_stopped_flushers_are_removed(redis_client: redis.Redis) -> None:
    with TieredCache(redis_client, namespace="wb7", heartbeat_interval=0) as cache:
        stream = stream_key(cache._keys, 0)
        redis_client.xgroup_create(stream, "tiercache-flush", id="0", mkstream=True)
        redis_client.xgroup_createconsumer(stream, "tiercache-flush", "gone-flusher")
        wb = WriteBehind(cache, lambda batch: None, lock_ttl=0.05, start=False)
        wait_until(
            lambda: (
                wb.flush_once() == 0 and b"gone-flusher" not in _consumers(redis_client, stream)
            ),
            10.0,
            message="an idle consumer record holding nothing is removed",
        )
        wb.set("k", 1)
        assert wb.flush(10.0)
        wb.close()
        assert redis_client.xinfo_consumers(stream, "tiercache-flush") == []


def test_coalesce_keeps_the_highest_version() -> None:
    class E:
        def __init__(self, i: bytes, k: bytes, v: int) -> None:
            self.id, self.encoded, self.version = i, k, v

    entries = [E(b"1-0", b"a", 5), E(b"2-0", b"b", 1), E(b"3-0", b"a", 7), E(b"10-0", b"b", 2)]
    assert [(e.encoded, e.version) for e in coalesce(entries)] == [(b"a", 7), (b"b", 2)]


def test_writer_failures_retry_then_succeed(redis_client: redis.Redis) -> None:
    calls: list[int] = []

    def flaky(batch: list[WriteBehindItem]) -> None:
        calls.append(len(batch))
        if len(calls) < 3:
            raise ConnectionError("origin down")

    with TieredCache(redis_client, namespace="wb3", heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, flaky, max_attempts=5, retry_backoff=0.01, start=False)
        wb.set("k", 1)
        assert wb.flush(10.0)
        assert calls == [1, 1, 1]
        assert wb.dead_letters() == [] and wb.stats()["failures"] == 2
        wb.close()


def test_writer_failures_dead_letter_after_max_attempts(redis_client: redis.Redis) -> None:
    attempts: list[list[Any]] = []

    def broken(batch: list[WriteBehindItem]) -> None:
        attempts.append([i.key for i in batch])
        raise ValueError("constraint violated")

    with TieredCache(redis_client, namespace="wb4", heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, broken, max_attempts=3, retry_backoff=0.01, start=False)
        wb.set("p", "poison")
        wb.set(("t", 1), b"bytes")
        assert wb.flush(10.0)  # nothing left pending: dead letters are not pending
        assert len(attempts) == 3
        dead = wb.dead_letters()
        assert sorted(map(repr, (d["key"] for d in dead))) == ["'p'", "('t', 1)"]
        assert all(d["attempts"] == 3 and "constraint violated" in d["error"] for d in dead)
        assert wb.stats()["dead_letters"] == 2 and wb.pending() == 0
        assert cache["p"] == "poison"  # the cache keeps the value
        wb.close()


def test_background_flusher_and_secret(redis_client: redis.Redis, tmp_path: Path) -> None:
    db = tmp_path / "origin.db"
    with TieredCache(
        redis_client, namespace="wb5", heartbeat_interval=0, secret=b"k" * 32
    ) as cache:
        with WriteBehind(cache, SqliteOrigin(db), flush_interval=0.01) as wb:
            for n in range(50):
                cache.set(f"k{n % 10}", n, write_behind=True)
            wait_until(lambda: wb.pending() == 0, 20.0, message="flushed in the background")
        assert {k: v for k, (v, _) in origin_rows(db).items()} == {
            f"k{i}": 40 + i for i in range(10)
        }


def test_partitions_each_have_their_stream(redis_client: redis.Redis) -> None:
    applied: dict[Any, tuple[Any, int]] = {}

    def writer(batch: list[WriteBehindItem]) -> None:
        for item in batch:
            assert item.version > applied.get(item.key, (None, 0))[1]
            applied[item.key] = (item.value, item.version)

    with TieredCache(redis_client, namespace="wb8", heartbeat_interval=0, partitions=4) as cache:
        wb = WriteBehind(cache, writer, batch_size=7, start=False)
        for n in range(120):
            wb.set(n % 40, n)
        streams = [stream_key(cache._keys, p) for p in range(4)]
        assert sum(redis_client.xlen(s) for s in streams) == wb.pending() == 120
        assert sum(1 for s in streams if redis_client.xlen(s)) > 1
        assert wb.flush(20.0)
        wb.close()
    assert {k: v for k, (v, _) in applied.items()} == {k: 80 + k for k in range(40)}


WRITE_BEHIND_COMMANDS = (
    "evalsha script|load get mget set getrange scan unlink time xrevrange subscribe ping "
    "client|setname hset pexpire hgetall incr xadd publish del pttl "  # the cache (docs/security)
    "xgroup xreadgroup xautoclaim xpending xinfo xack xdel xrange xlen hget hdel exists"
)


def test_write_behind_under_a_least_privilege_acl_user(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    rules = "on >pw resetkeys ~wbacl:* resetchannels &wbacl:* -@all"
    admin.execute_command(
        "ACL", "SETUSER", "app", *rules.split(), *(f"+{c}" for c in WRITE_BEHIND_COMMANDS.split())
    )
    admin.execute_command("ACL", "LOG", "RESET")
    url = redis_server.url.replace("redis://", "redis://app:pw@", 1)
    seen: list[WriteBehindItem] = []
    with TieredCache(url, namespace="wbacl", heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, seen.extend, start=False)
        wb.set("k", 1)
        wb.delete("gone")
        assert wb.flush(10.0) and wb.dead_letters() == [] and wb.stats()["pending"] == 0
        wb.close()
    assert [(i.key, i.deleted) for i in seen] == [("k", False), ("gone", True)]
    denied = admin.execute_command("ACL", "LOG")
    assert {e[b"object"] for e in denied} <= {b"config|get"}  # only the optional check
    admin.close()


def test_a_failed_write_behind_always_raises(redis_server: RedisServer) -> None:
    with TieredCache(
        redis_server.url,
        namespace="wb6",
        heartbeat_interval=0,
        on_write_error="invalidate_local",
        retries=0,
    ) as cache:
        cache.set("k", 1, write_behind=True)
        redis_server.stop()
        cache.set("plain", 1)  # swallowed, as configured: the caller wrote the origin itself
        with pytest.raises(CacheUnavailable):  # never swallowed: the origin write would be lost
            cache.set("k", 2, write_behind=True)


# -- processes: a flusher SIGKILLed in the middle of a batch -------------------------------


def test_sigkilled_flusher_is_taken_over(
    redis_server: RedisServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    db, marker = tmp_path / "origin.db", tmp_path / "stalled"
    connect(db).close()
    ns = _ns("wbkill")
    keys = [f"k{i}" for i in range(40)]
    last: dict[str, str] = {}
    opts = {"url": redis_server.url, "namespace": ns, "db": str(db), "lock_ttl": 1.0}
    with TieredCache(redis_server.url, namespace=ns, heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, writer=None)

        def write_round(n: int) -> None:
            for k in keys:
                last[k] = f"{k}:{n}"
                cache.set(k, last[k], write_behind=True)

        for n in range(5):
            write_round(n)
        first = spawn(
            "flusher", {**opts, "stall_after": 10, "marker": str(marker), "batch_size": 100}
        )
        wait_until(marker.exists, 60.0, message="the first flusher is in the middle of a batch")
        for n in range(5, 8):  # written while the first flusher hangs
            write_round(n)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        half_done = [row for row in applied_log(db) if row[2] == first.pid]
        assert len(half_done) == 10  # applied, never acknowledged
        assert wb.pending() == 8 * len(keys)

        second = _result(spawn("flusher", {**opts, "batch_size": 50}))
        assert second["ok"] and second["claimed"] >= 100
        assert wb.pending() == 0
        assert cache.redis.hlen(mark_key(cache._keys, 0)) == 0
        rows = origin_rows(db)
        assert {k: v for k, (v, _) in rows.items()} == last
        assert {k: ver for k, (_, ver) in rows.items()} == {
            k: _stored_version(cache, k) for k in keys
        }
    _assert_in_version_order(applied_log(db))


def test_concurrent_flushers_apply_each_key_in_version_order(
    redis_server: RedisServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    db = tmp_path / "origin.db"
    connect(db).close()
    ns = _ns("wbconc")
    opts = {"url": redis_server.url, "namespace": ns, "db": str(db), "lock_ttl": 1.0}
    flushers = [spawn("flusher", {**opts, "run_for": 2.0, "batch_size": 20}) for _ in range(3)]
    last: dict[str, str] = {}
    with TieredCache(redis_server.url, namespace=ns, heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, writer=None)
        for n in range(600):
            k = f"k{n % 15}"
            last[k] = f"{k}:{n}"
            cache.set(k, last[k], write_behind=True)
        results = [_result(p) for p in flushers]
        assert sum(r["written"] for r in results) > 0
        final = _result(spawn("flusher", opts))  # whatever the three left
        assert final["ok"] and wb.pending() == 0
    assert {k: v for k, (v, _) in origin_rows(db).items()} == last
    _assert_in_version_order(applied_log(db))


@pytest.mark.slow
def test_soak_flushers_killed_repeatedly(
    redis_server: RedisServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    db = tmp_path / "origin.db"
    connect(db).close()
    ns = _ns("wbsoak")
    opts = {"url": redis_server.url, "namespace": ns, "db": str(db), "lock_ttl": 0.5}
    last: dict[str, str] = {}
    with TieredCache(redis_server.url, namespace=ns, heartbeat_interval=0) as cache:
        wb = WriteBehind(cache, writer=None)
        for cycle in range(8):
            marker = tmp_path / f"stalled{cycle}"
            for n in range(300):
                k = f"k{(n * 7 + cycle) % 60}"
                last[k] = f"{k}:{cycle}:{n}"
                cache.set(k, last[k], write_behind=True)
            victim = spawn(
                "flusher",
                {**opts, "stall_after": 5 + cycle, "marker": str(marker), "batch_size": 40},
            )
            wait_until(marker.exists, 60.0, message="flusher stalled")
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
        assert _result(spawn("flusher", opts))["ok"] and wb.pending() == 0
    assert {k: v for k, (v, _) in origin_rows(db).items()} == last
    _assert_in_version_order(applied_log(db))


# -- write-around ---------------------------------------------------------------------------


def test_write_around_reaches_every_process(
    redis_server: RedisServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    db = tmp_path / "origin.db"
    origin = SqliteOrigin(db)
    origin.apply(WriteBehindItem("user:1", "old", 1))
    ns = _ns("wa")
    opts = {"url": redis_server.url, "namespace": ns, "db": str(db), "key": "user:1"}
    readers = [spawn("reader", {**opts, "expect": "new"}, stdin=subprocess.PIPE) for _ in range(3)]
    for r in readers:
        assert r.stdout is not None
        assert json.loads(r.stdout.readline()) == {"ready": "old"}
    with TieredCache(redis_server.url, namespace=ns, heartbeat_interval=0) as cache:
        assert cache["user:1"] == "old"

        @write_around(cache, key=lambda user_id, value: f"user:{user_id}")
        def save_user(user_id: int, value: str) -> None:
            origin.apply(WriteBehindItem(f"user:{user_id}", value, 2))

        save_user(1, "new")
        assert cache.get("user:1") is None  # dropped here too; the next read loads
    for r in readers:
        out, _ = r.communicate("go\n", timeout=60)
        assert json.loads(out.strip().splitlines()[-1])["value"] == "new"


def test_write_around_decorator_on_a_cached_function(redis_client: redis.Redis) -> None:
    from tiercache import tiered_cache

    origin = {1: "a"}
    with TieredCache(redis_client, namespace="wa2", heartbeat_interval=0) as cache:

        @tiered_cache(cache)
        def get_user(user_id: int) -> str:
            return origin[user_id]

        @write_around(get_user, key=lambda user_id, value: (user_id,))
        def save_user(user_id: int, value: str) -> None:
            origin[user_id] = value

        assert get_user(1) == "a"
        save_user(1, "b")
        assert get_user(1) == "b"

        @write_around(cache)
        def fails(key: str) -> None:
            raise RuntimeError("origin write failed half way")

        cache["k"] = 1
        with pytest.raises(RuntimeError):
            fails("k")
        assert "k" not in cache  # invalidated anyway: the origin may hold either value


# -- warm-up --------------------------------------------------------------------------------


def test_warm_loads_missing_keys_in_batches_with_progress(redis_client: redis.Redis) -> None:
    calls: list[list[Any]] = []
    progress: list[tuple[int, int | None]] = []

    def loader_many(keys: list[Any]) -> dict[Any, Any]:
        calls.append(keys)
        return {k: f"v{k}" for k in keys if k != 13}

    with TieredCache(redis_client, namespace="warm1", heartbeat_interval=0, ttl=60) as cache:
        cache[3] = "written"
        result = cache.warm(
            range(30), loader_many, batch_size=10, progress=lambda d, t: progress.append((d, t))
        )
        assert progress == [(10, 30), (20, 30), (30, 30)]
        assert [len(c) for c in calls] == [9, 10, 10]
        assert (result.loaded, result.present, result.absent, result.overtaken) == (28, 1, 1, 0)
        assert cache[3] == "written" and cache[29] == "v29" and 13 not in cache
        assert 0 < redis_client.pttl(cache._keys.value(encode_key(29))) <= 60_000
        gen = cache.warm(
            (k for k in range(30, 35)), loader_many, progress=lambda d, t: progress.append((d, t))
        )
        assert gen.loaded == 5 and progress[-1] == (5, None)  # an iterator: total unknown


def test_warm_never_overwrites_a_concurrent_write(redis_client: redis.Redis) -> None:
    keys = [f"k{i}" for i in range(40)]
    with (
        TieredCache(redis_client, namespace="warm2", heartbeat_interval=0) as cache,
        TieredCache(redis_client, namespace="warm2", heartbeat_interval=0) as other,
    ):

        def loader_many(batch: list[str]) -> dict[str, str]:
            for k in batch[::2]:  # newer writes land while the loader reads the origin
                other[k] = f"new:{k}"
            other.invalidate(batch[1])  # and a delete
            return {k: f"old:{k}" for k in batch}

        result = cache.warm(keys, loader_many, batch_size=10)
        assert result.overtaken == 24 and result.loaded == 16
        for i, k in enumerate(keys):
            if i % 2 == 0:
                assert other[k] == cache[k] == f"new:{k}"
            elif i % 10 == 1:
                assert k not in cache
            else:
                assert cache[k] == f"old:{k}"


def test_warm_races_a_writer_process(
    redis_server: RedisServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    ns = _ns("warm3")
    keys = [f"k{i}" for i in range(600)]
    opts = {
        "url": redis_server.url,
        "namespace": ns,
        "keys": keys,
        "prefix": "w",
        "seed": 1,
        "pause": 0.001,
    }

    def slow_origin(batch: list[str]) -> dict[str, str]:
        time.sleep(0.005)  # the origin read takes a while: writes land meanwhile
        return {k: "old" for k in batch}

    writer = spawn("writer", opts)
    with TieredCache(redis_server.url, namespace=ns, heartbeat_interval=0) as cache:
        wait_until(lambda: cache.redis.dbsize() > 2, 60.0, message="the writer has begun")
        result = cache.warm(keys, slow_origin, batch_size=10)
        assert _result(writer)["written"] == len(keys)
        values = cache.get_many(keys)
    print(f"warm vs writer: {result}")
    assert result.total == len(keys)
    assert all(str(v).startswith("w") for v in values.values()), [
        k for k, v in values.items() if v == "old"
    ]
    assert len(values) == len(keys)
