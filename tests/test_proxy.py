"""The fault-injecting TCP proxy: forwarding, latency, blackhole, cut, clean shutdown."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tests.proxy import TcpProxy
from tests.servers import no_retry, wait_until
from tiercache.server import RedisServer

# Latency assertions are lower bounds only, with slack; upper bounds are sanity bounds in seconds.
SANE = 5.0


def _proxy_threads() -> list[threading.Thread]:
    """The proxy threads alive now."""
    return [t for t in threading.enumerate() if t.name.startswith("TcpProxy-")]


@pytest.fixture(autouse=True)
def _no_thread_leak() -> Iterator[None]:
    """Every proxy thread a test starts is gone when the test's fixtures are torn down."""
    before = set(_proxy_threads())
    yield
    wait_until(lambda: set(_proxy_threads()) <= before, 5.0, message="proxy threads stopped")


def _client(p: TcpProxy, timeout: float = 2.0) -> redis.Redis:
    """A client through the proxy that does not retry, so every fault is visible."""
    return redis.Redis(
        host=p.host,
        port=p.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=no_retry(),
    )


def _timed_ping(client: redis.Redis) -> float:
    """Seconds one PING takes."""
    started = time.perf_counter()
    assert client.ping()
    return time.perf_counter() - started


def test_forwards_and_counts_connections(proxy: TcpProxy) -> None:
    a, b = _client(proxy), _client(proxy)
    assert a.set("k", b"v") and b.get("k") == b"v"
    assert proxy.connections_accepted == 2
    assert proxy.active_connections == 2
    a.close()
    wait_until(lambda: proxy.active_connections == 1, 5.0, message="closed link dropped")
    b.close()


def test_large_values_and_pipelines(proxy: TcpProxy) -> None:
    client = _client(proxy, timeout=10.0)
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB: more than the proxy buffers in one go
    client.set("big", big)
    assert client.get("big") == big
    pipe = client.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"k{i}", i)
    pipe.execute()
    assert client.dbsize() == 2001
    client.close()


def test_latency_is_visible(proxy: TcpProxy) -> None:
    client = _client(proxy)
    client.ping()
    proxy.set_latency(0.05)  # each direction: a round trip gains about 100 ms
    elapsed = _timed_ping(client)
    assert 0.04 <= elapsed < SANE
    proxy.set_latency(0.05, direction="upstream")
    proxy.set_latency(0.0, direction="downstream")
    elapsed = _timed_ping(client)
    assert 0.04 <= elapsed < SANE
    proxy.set_latency(0.0, direction="upstream")
    proxy.set_latency(0.05, direction="downstream")
    elapsed = _timed_ping(client)
    assert 0.04 <= elapsed < SANE
    proxy.set_latency(0.0)
    assert _timed_ping(client) < SANE
    with pytest.raises(ValueError):
        proxy.set_latency(-1)
    with pytest.raises(ValueError):
        proxy.set_latency(0.1, direction="sideways")
    client.close()


def test_latency_keeps_order(proxy: TcpProxy) -> None:
    client = _client(proxy)
    proxy.set_latency(0.01)
    pipe = client.pipeline(transaction=False)
    for i in range(100):
        pipe.rpush("order", i)
    pipe.execute()
    assert [int(x) for x in client.lrange("order", 0, -1)] == list(range(100))
    client.close()


def test_blackhole_times_out_and_restore_recovers(proxy: TcpProxy) -> None:
    client = _client(proxy, timeout=0.2)
    assert client.ping()
    proxy.blackhole()
    assert proxy.blackholed
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        client.ping()
    assert time.monotonic() - started < SANE
    # New connections are accepted but get no answer either: a half-open link.
    fresh = _client(proxy, timeout=0.2)
    with pytest.raises(redis.exceptions.TimeoutError):
        fresh.ping()
    assert proxy.active_connections >= 1
    proxy.restore()
    assert not proxy.blackholed
    assert wait_until(client.ping, 5.0, ignore=(redis.exceptions.RedisError,))
    assert wait_until(fresh.ping, 5.0, ignore=(redis.exceptions.RedisError,))
    client.close()
    fresh.close()


def test_blackhole_holds_pubsub_messages_until_restore(
    proxy: TcpProxy, redis_server: RedisServer
) -> None:
    sub_client = _client(proxy)
    pubsub = sub_client.pubsub()
    pubsub.subscribe("ch")
    assert wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0)["type"] == "subscribe"
    publisher = redis_server.client()
    proxy.blackhole()
    assert publisher.publish("ch", b"m1") == 1  # the server delivered it to the proxy
    assert pubsub.get_message(timeout=0.2) is None
    proxy.restore()
    message = wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0)
    assert message["data"] == b"m1"
    pubsub.close()
    publisher.close()


@pytest.mark.parametrize("reset", [False, True])
def test_cut_drops_connections_and_client_reconnects(proxy: TcpProxy, reset: bool) -> None:
    held = redis.Redis(
        host=proxy.host,
        port=proxy.port,
        socket_timeout=2,
        retry=no_retry(),
        single_connection_client=True,
    )
    pooled = _client(proxy)
    assert held.ping() and pooled.ping()
    assert proxy.connections_accepted == 2
    assert proxy.cut(reset=reset) == 2
    assert proxy.active_connections == 0
    with pytest.raises(redis.exceptions.ConnectionError):
        held.ping()  # a held connection without retries meets the drop
    assert held.ping()  # and reconnects on the next command
    assert pooled.ping()  # the pool notices the dead connection at checkout and reconnects
    # (two new connections at least; a loaded machine may see a retry open one more)
    assert proxy.connections_accepted >= 4
    held.close()
    pooled.close()


def test_cut_with_redis_py_retries_is_transparent(proxy: TcpProxy) -> None:
    client = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=2)  # default retries
    assert client.set("k", b"v")
    proxy.cut()
    assert client.get("k") == b"v"
    assert proxy.connections_accepted == 2
    client.close()


def test_server_pubsub_client_kill_through_proxy(
    proxy: TcpProxy, redis_server: RedisServer
) -> None:
    """A pub/sub connection cut by the proxy sees EOF (the loss a listener must detect)."""
    pubsub = _client(proxy).pubsub()
    pubsub.subscribe("ch")
    wait_until(lambda: pubsub.get_message(timeout=0.05), 5.0)
    proxy.cut()
    with pytest.raises(redis.exceptions.ConnectionError):
        pubsub.get_message(timeout=1.0)
    pubsub.close()


def test_target_down_refuses_clients(proxy: TcpProxy, redis_server: RedisServer) -> None:
    redis_server.stop()
    client = _client(proxy)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    redis_server.restart()
    assert wait_until(client.ping, 5.0, ignore=(redis.exceptions.RedisError,))
    client.close()


def test_close_stops_thread_and_sockets(redis_server: RedisServer) -> None:
    p = TcpProxy(redis_server.host, redis_server.port)
    client = _client(p)
    assert client.ping()
    p.blackhole()  # even a frozen proxy closes promptly
    started = time.monotonic()
    p.close()
    assert time.monotonic() - started < SANE
    assert not any(t.name == f"TcpProxy-{p.port}->{redis_server.port}" for t in _proxy_threads())
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    with pytest.raises(OSError):
        socket.create_connection((p.host, p.port), timeout=1.0).close()
    p.close()  # idempotent
    with pytest.raises(RuntimeError):
        p.cut()
    client.close()


def test_context_manager(redis_server: RedisServer) -> None:
    with TcpProxy(redis_server.host, redis_server.port) as p:
        assert _client(p).ping()
    assert not p._thread.is_alive()
