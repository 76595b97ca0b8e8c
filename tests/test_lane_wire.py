"""The sync driver's I/O shortcuts against a real server: the lane (tiercache.lane), the listener's
socket reader (tiercache.wire) and the own-echo pass (tiercache.protocol.OwnWrites).

Each shortcut must behave as the path it replaces: same replies and errors, reconnects after a
killed connection or a restarted server, never a wait on a busy lane, a fresh connection in a
forked child, and no local copy older than a write left behind when its echo is let pass.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.servers import RedisServer, wait_until
from tiercache.keys import local_key
from tiercache.lane import Lane, lane_for
from tiercache.tiered import TieredCache
from tiercache.wire import ConnectionWire, SocketWire, open_wire

DEADLINE = 10.0


def _client(server: RedisServer, **kw: Any) -> redis.Redis:
    kw.setdefault("socket_timeout", 2.0)
    return redis.Redis(host=server.host, port=server.port, **kw)


@contextlib.contextmanager
def opened_lane(server: RedisServer, **kw: Any) -> Iterator[tuple[Lane, redis.Redis]]:
    """A lane on a new client of ``server`` (``kw``: client settings); both closed after."""
    client = _client(server, **kw)
    made = lane_for(client)
    assert made is not None
    try:
        yield made, client
    finally:
        made.close()
        client.close()


def _client_id_of(client: redis.Redis, name: str) -> int:
    for c in client.client_list():
        if c.get("name") == name:
            return int(c["id"])
    raise AssertionError(f"no connection named {name!r}")


# -- the lane -------------------------------------------------------------------------------------


@pytest.fixture
def lane(shared_redis: RedisServer, redis_client: redis.Redis) -> Iterator[tuple[Lane, Any]]:
    with opened_lane(shared_redis, client_name="lane-test") as made:
        yield made


def test_the_lane_answers_as_execute_command_does(lane: tuple[Lane, Any]) -> None:
    ln, _ = lane
    assert ln.execute("SET", b"k", b"v") is True  # the response callback still applies
    assert ln.execute("GET", b"k") == b"v"
    assert ln.execute("GET", b"absent") is None
    assert ln.execute("INCR", b"n") == 1
    with pytest.raises(redis.ResponseError):
        ln.execute("INCR", b"k")  # WRONGTYPE-like error: raised, and the lane stays usable
    assert ln.execute("GET", b"k") == b"v"


def test_the_lane_keeps_one_connection_checked_out(lane: tuple[Lane, Any]) -> None:
    ln, client = lane
    for i in range(50):
        ln.execute("SET", b"k%d" % i, b"v")
    pool = client.connection_pool
    assert len(pool._in_use_connections) == 1  # the lane's, held between calls
    ln.close()
    assert len(pool._in_use_connections) == 0  # given back on close
    assert ln.execute("GET", b"k1") == b"v"  # a closed lane still answers, through the pool


def test_a_busy_lane_sends_callers_to_the_pool_instead_of_waiting(lane: tuple[Lane, Any]) -> None:
    ln, client = lane
    ln.execute("SET", b"k", b"v")
    ln._lock.acquire()  # another thread is on the lane
    try:
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(ln.execute("GET", b"k")))
        t.start()
        t.join(DEADLINE)
        assert not t.is_alive() and got == [b"v"]
        assert len(client.connection_pool._in_use_connections) == 1  # the pool's went back
    finally:
        ln._lock.release()


def test_the_lane_reconnects_after_its_connection_is_killed(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    with opened_lane(shared_redis, client_name="lane-kill") as (ln, _):
        ln.execute("SET", b"k", b"v")
        redis_client.client_kill_filter(_id=_client_id_of(redis_client, "lane-kill"))
        assert ln.execute("GET", b"k") == b"v"  # the client's Retry reconnected it


def test_the_lane_survives_a_restart_with_an_empty_dataset(redis_server: RedisServer) -> None:
    with opened_lane(redis_server) as (ln, _):
        ln.execute("SET", b"k", b"v")
        redis_server.restart()
        wait_until(lambda: _answers(ln), DEADLINE)
        assert ln.execute("GET", b"k") is None


def _answers(ln: Lane) -> bool:
    try:
        ln.execute("PING")
    except redis.ConnectionError:
        return False
    return True


def test_the_lane_times_out_on_a_frozen_server(redis_server: RedisServer) -> None:
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1)
    with opened_lane(redis_server, socket_timeout=0.3, retry=retry) as (ln, _):
        ln.execute("PING")
        redis_server.pause()
        try:
            start = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                ln.execute("GET", b"k")
            assert time.monotonic() - start < 5.0  # two attempts of 0.3 s, not a hang
        finally:
            redis_server.resume()
        assert ln.execute("GET", b"k") is None  # and it recovers


def test_clients_that_must_keep_redis_py_s_path_get_no_lane(shared_redis: RedisServer) -> None:
    single = _client(shared_redis, single_connection_client=True)
    try:
        assert lane_for(single) is None
    finally:
        single.close()
    assert lane_for(object()) is None


@pytest.mark.sync_only("os.fork")
def test_a_forked_child_uses_a_connection_of_its_own(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    with opened_lane(shared_redis, client_name="lane-fork") as (ln, _):
        ln.execute("SET", b"k", b"parent")
        parent_id = ln.execute("CLIENT", "ID")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its lane's connection id and what it reads
            code = 1
            try:
                child_id = ln.execute("CLIENT", "ID")
                value = ln.execute("GET", b"k")
                os.write(write, b"%d %s" % (child_id, value))
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        out = os.read(read, 100).split()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0
        assert int(out[0]) != parent_id and out[1] == b"parent"
        assert ln.execute("CLIENT", "ID") == parent_id  # the parent's lane is untouched


def test_a_cache_runs_its_hot_calls_on_the_lane(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    client = _client(shared_redis, client_name="lane-cache")
    cache = TieredCache(client, local_maxsize=1, heartbeat_interval=0)
    try:
        assert cache.wait_ready(DEADLINE)
        lane_id = cache._driver._execute("CLIENT", "ID")  # asked on the lane
        before = redis_client.info("commandstats")
        for i in range(20):
            cache[f"k{i}"] = i
        cache.local.clear()
        assert [cache[f"k{i}"] for i in range(20)] == list(range(20))
        lane_conn = next(c for c in redis_client.client_list() if int(c["id"]) == lane_id)
        assert lane_conn["cmd"] == "get"  # the last hot call rode the lane
        after = redis_client.info("commandstats")
        assert after["cmdstat_get"]["calls"] - before.get("cmdstat_get", {}).get("calls", 0) >= 20
    finally:
        cache.close()
        client.close()
    assert len(client.connection_pool._in_use_connections) == 0  # the lane gave it back


# -- the listener's socket reader -----------------------------------------------------------------


@pytest.fixture(params=["socket", "connection"])
def wire(request: pytest.FixtureRequest, shared_redis: RedisServer) -> Iterator[Any]:
    client = _client(shared_redis)
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.update(protocol=2, client_name="wire-test")
    conn = client.connection_pool.connection_class(**kwargs)
    conn.connect()
    w = open_wire(conn) if request.param == "socket" else ConnectionWire(conn)
    assert isinstance(w, SocketWire if request.param == "socket" else ConnectionWire)
    w.send("SUBSCRIBE", b"wire-chan")
    replies = _read_until(w, 1)
    assert replies[0][0] == b"subscribe"
    try:
        yield w
    finally:
        conn.disconnect()
        client.close()


def _read_until(w: Any, n: int) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + DEADLINE
    while len(out) < n and time.monotonic() < deadline:
        out.extend(w.read(0.1))
    return out


def test_a_read_with_nothing_to_read_returns_empty_after_its_timeout(wire: Any) -> None:
    start = time.monotonic()
    assert wire.read(0.2) == []
    assert 0.1 <= time.monotonic() - start < 3.0
    assert wire.read(0) == []


def test_messages_published_in_a_burst_all_arrive_in_order(
    wire: Any, redis_client: redis.Redis
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(200):
        pipe.publish(b"wire-chan", b"m%d" % i)
    pipe.execute()
    got = _read_until(wire, 200)
    assert [r[2] for r in got] == [b"m%d" % i for i in range(200)]
    assert all(r[0] == b"message" and r[1] == b"wire-chan" for r in got)


def test_a_ping_gets_its_pong(wire: Any) -> None:
    wire.send("PING")
    assert _read_until(wire, 1)[0][0] == b"pong"


def test_a_killed_connection_raises_a_connection_error(
    wire: Any, redis_client: redis.Redis
) -> None:
    redis_client.client_kill_filter(_type="pubsub")
    with pytest.raises((redis.ConnectionError, OSError)):
        _read_until(wire, 1)


# -- the own-echo pass ----------------------------------------------------------------------------


@pytest.fixture
def cache(shared_redis: RedisServer, redis_client: redis.Redis) -> Iterator[TieredCache]:
    c = TieredCache(shared_redis.url, heartbeat_interval=0)
    try:
        assert c.wait_ready(DEADLINE)
        yield c
    finally:
        c.close()


def _slip_in_an_old_copy(cache: TieredCache, key: str) -> None:
    """Run each write with an old local copy installed while it is in flight (as a concurrent
    fill of this process could), before its reply or echo can drop it."""
    call = cache._driver.call

    def racing(c: Any) -> Any:
        l1 = cache.local
        l1.set(local_key(key, b""), "old", version=1, fresh_until=l1.timer() + 60)
        return call(c)

    cache._driver.call = racing  # type: ignore[method-assign]


@pytest.mark.parametrize("op", ["set", "delete"])
def test_no_older_copy_survives_an_own_write_whose_echo_passes(cache: TieredCache, op: str) -> None:
    cache["k"] = "first"
    seen = cache.stats()["invalidations_received"]
    _slip_in_an_old_copy(cache, "k")
    if op == "set":
        cache["k"] = "second"
        assert cache.local.get("k") in ("second", None)  # never the old copy
        assert cache["k"] == "second"
    else:
        del cache["k"]
        assert "k" not in cache.local
        assert "k" not in cache
    # the echo still counts as received, and left nothing in flight behind
    wait_until(lambda: cache.stats()["invalidations_received"] >= seen + 1, DEADLINE)
    wait_until(lambda: len(cache._own) == 0, DEADLINE)


def test_own_writes_pass_the_listener_without_a_resync(cache: TieredCache) -> None:
    for i in range(300):
        cache[f"k{i}"] = i
    wait_until(lambda: cache.stats()["invalidations_received"] >= 300, DEADLINE)
    wait_until(lambda: len(cache._own) == 0, DEADLINE)
    s = cache.stats()
    assert s["resyncs"] == 0 and s["local_usable"]
    assert all(cache.local.get(f"k{i}") == i for i in range(300))


def test_own_echoes_pass_the_socket_filter_without_reaching_python(cache: TieredCache) -> None:
    """The listener's filter takes the sequence numbers of this process' echoes itself: the
    Python handler (own_echo/apply) sees next to none of them, yet every one is counted and
    the partition's position follows the counter (no gap, no resync)."""
    handled: list[Any] = []
    own_echo, apply = cache.own_echo, cache.apply
    cache.own_echo = lambda msg: handled.append(msg) or own_echo(msg)  # type: ignore[method-assign]
    cache.apply = lambda msg: handled.append(msg) or apply(msg)  # type: ignore[method-assign]
    before = cache.stats()["invalidations_received"]
    for i in range(200):
        cache[f"f{i}"] = i
    wait_until(lambda: cache.stats()["invalidations_received"] >= before + 200, DEADLINE)
    listener = cache._listener
    assert listener is not None and listener._echoes is not None
    assert len(handled) < 20  # a PONG in the same read hands the echoes behind it to Python
    entry = cache.local.entry("f199")
    assert entry is not None
    assert listener.heard(entry.version) or any(m.version == entry.version for m in handled)
    position = cache.redis.get(cache._keys.prefix(0) + b"seq")
    wait_until(lambda: listener._trackers[0].seq == int(position), DEADLINE)
    s = cache.stats()
    assert s["resyncs"] == 0 and s["local_usable"]


def test_an_on_invalidate_hook_sees_the_own_echoes_the_filter_would_pass(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    seen: list[tuple[Any, int]] = []
    cache = TieredCache(
        shared_redis.url, heartbeat_interval=0, on_invalidate=lambda k, v: seen.append((k, v))
    )
    try:
        assert cache.wait_ready(DEADLINE)
        assert cache._listener is not None and cache._listener._echoes is None
        for i in range(20):
            cache[f"h{i}"] = i
        wait_until(lambda: len(seen) == 20, DEADLINE, message="the hook saw every own write")
        assert [k for k, _ in seen] == [f"h{i}" for i in range(20)]
    finally:
        cache.close()


def test_the_lane_packs_as_redis_py_does(lane: tuple[Lane, Any]) -> None:
    from tiercache.lane import _pack

    _, client = lane
    conn = client.connection_pool.get_connection()
    try:
        args = ("EVALSHA", "ab" * 20, 2, b"k1", b"k\r\n2", "S", 12345, "origin", b"\x00\xff", -7)
        assert b"".join(_pack(conn, args)) == b"".join(conn.pack_command(*args))
        assert b"".join(_pack(conn, ("CONFIG GET", "x"))) == b"".join(
            conn.pack_command("CONFIG GET", "x")
        )
        with pytest.raises(redis.DataError):
            _pack(conn, ("SET", b"k", None))
    finally:
        client.connection_pool.release(conn)


def test_a_write_whose_reply_is_lost_but_whose_echo_came_is_known_applied(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    cache = TieredCache(shared_redis.url, heartbeat_interval=0, on_write_error="invalidate_local")
    try:
        assert cache.wait_ready(DEADLINE)
        call = cache._driver.call
        versions: list[int] = []

        def reply_lost(c: Any) -> Any:
            result = call(c)
            versions.append(result.version)
            wait_until(lambda: _heard(cache, result.version), DEADLINE)
            raise redis.ConnectionError("reply lost (simulated after the write ran)")

        cache._driver.call = reply_lost  # type: ignore[method-assign]
        cache["k"] = "v"  # the error is swallowed (invalidate_local)
        assert cache.stats()["write_errors"] == 1
        assert cache._guard.applied("k") == versions[0]  # the echo proved it landed
        assert "k" not in cache.local
        cache._driver.call = call  # type: ignore[method-assign]
        assert cache["k"] == "v"
    finally:
        cache.close()


def _heard(cache: TieredCache, version: int) -> bool:
    return cache._own._state.get(version) == cache._own._HEARD
