"""Start-up checks of the Redis configuration (tiercache.checks), on real servers.

A cache warns once per server (logger ``tiercache.checks``) when Redis has no ``maxmemory``, or a
policy that does not evict the cache's entries; a WriteBehind warns when queued writes are at
risk (``allkeys-*`` eviction, no AOF). A server that refuses CONFIG is skipped with a debug line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from tests.servers import RedisServer
from tiercache import TieredCache, WriteBehind
from tiercache.checks import forget_checks, server_problems

LOGGER = "tiercache.checks"


@pytest.fixture(autouse=True)
def fresh_checks() -> Iterator[None]:
    forget_checks()
    yield
    forget_checks()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


def test_no_maxmemory_warns_once(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory(extra_args=("--maxmemory", "0"))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with TieredCache(server.url, namespace="c1", heartbeat_interval=0):
        pass
    with TieredCache(server.url, namespace="c2", heartbeat_interval=0):
        pass
    found = _warnings(caplog)
    assert len(found) == 1 and "no maxmemory" in found[0]


def test_a_bounded_evicting_server_passes(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with TieredCache(server.url, namespace="c", heartbeat_interval=0):
        pass
    assert _warnings(caplog) == []


def test_noeviction_and_volatile_without_ttl_warn(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "noeviction"))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with TieredCache(server.url, namespace="c", heartbeat_interval=0):
        pass
    assert any("noeviction" in w for w in _warnings(caplog))
    client = server.client()
    client.config_set("maxmemory-policy", "volatile-lru")
    forget_checks()
    caplog.clear()
    with TieredCache(server.url, namespace="c", heartbeat_interval=0, ttl=60):
        pass
    assert _warnings(caplog) == []  # entries have a TTL: volatile-lru evicts them
    forget_checks()
    with TieredCache(server.url, namespace="c", heartbeat_interval=0):
        pass
    assert any("volatile-lru" in w and "ttl=None" in w for w in _warnings(caplog))
    client.close()


def test_write_behind_risks_warn(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with TieredCache(server.url, namespace="c", heartbeat_interval=0) as cache:
        WriteBehind(cache, writer=None)
    found = _warnings(caplog)
    assert any("evict the write-behind stream" in w for w in found)
    assert any("appendonly is off" in w for w in found)


def test_config_refused_by_acl_is_skipped_quietly(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory(extra_args=("--maxmemory", "0"))
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-config")
    admin.close()
    url = server.url.replace("redis://", "redis://app:pw@", 1)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with TieredCache(url, namespace="c", heartbeat_interval=0) as cache:
        cache["k"] = 1
        WriteBehind(cache, writer=None)
        assert cache["k"] == 1
    assert _warnings(caplog) == []
    debug = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("not checked" in m for m in debug)


def test_problems_as_data() -> None:
    assert server_problems(
        {"maxmemory": "0", "maxmemory-policy": "noeviction"}, entries_expire=True
    )
    assert not server_problems(
        {"maxmemory": "1000", "maxmemory-policy": "allkeys-lfu"}, entries_expire=False
    )
    assert not server_problems(
        {"maxmemory": "1000", "maxmemory-policy": "volatile-ttl"}, entries_expire=True
    )
