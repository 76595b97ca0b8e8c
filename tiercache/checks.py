"""Checks of the Redis server's configuration, logged once per server when a cache starts.

What matters to a cache (``check_server``): a ``maxmemory`` bound (else Redis grows until the
machine runs out of memory) and an eviction policy that evicts (``noeviction`` makes writes fail
once full; a ``volatile-*`` policy never evicts keys without a TTL, which is every entry of a cache
without ``ttl=``). tiercache relies on no keyspace notification (invalidations travel by its own
pub/sub messages and stream), so ``notify-keyspace-events`` is not checked.

What matters to write-behind (``check_write_behind``): queued writes live in a Redis stream, so
an ``allkeys-*`` policy may evict them under memory pressure, and without AOF a Redis crash loses
those not yet flushed.

Servers that refuse CONFIG (an ACL without ``+config``, a managed service, a renamed command) are
not checked: that is logged at debug level, never raised.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis as redis_lib

log = logging.getLogger("tiercache.checks")

_checked: set[tuple[str, str]] = set()
_checked_lock = threading.Lock()


def _server_id(client: redis_lib.Redis) -> str:
    """host:port/db of a client (any other client type: its identity)."""
    try:
        kw = client.get_connection_kwargs()
    except AttributeError:  # a cluster client: one check per client object
        return f"{type(client).__name__}@{id(client):x}"
    return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}/{kw.get('db', 0)}"


def _first_time(client: redis_lib.Redis, what: str) -> bool:
    key = (_server_id(client), what)
    with _checked_lock:
        if key in _checked:
            return False
        _checked.add(key)
        return True


def _config(client: redis_lib.Redis, *names: str) -> dict[str, str] | None:
    """The values of CONFIG GET ``names``, or None if the server does not let us read them."""
    out: dict[str, str] = {}
    try:
        for name in names:
            reply: Any = client.config_get(name)
            for k, v in dict(reply).items():
                k = k.decode() if isinstance(k, bytes) else str(k)
                out[k] = v.decode() if isinstance(v, bytes) else str(v)
    except redis_lib.RedisError as err:  # NOPERM, unknown command, a closed connection...
        log.debug("Redis configuration not checked (CONFIG GET refused): %s", err)
        return None
    except Exception as err:  # a client of another shape: never fail a cache for a check
        log.debug("Redis configuration not checked: %r", err)
        return None
    return out


def server_problems(config: dict[str, str], *, entries_expire: bool) -> list[str]:
    """What in ``config`` does not fit a cache (``entries_expire``: the cache sets TTLs)."""
    problems = []
    maxmemory = config.get("maxmemory")
    policy = config.get("maxmemory-policy", "")
    if maxmemory is not None and maxmemory.strip() in ("0", ""):
        problems.append(
            "Redis has no maxmemory: it grows until the machine runs out of memory; set "
            "maxmemory and an eviction policy such as allkeys-lru or volatile-lru"
        )
        return problems  # (without a bound, the policy never applies)
    if policy == "noeviction":
        problems.append(
            "Redis maxmemory-policy is noeviction: once full, every cache write fails; use "
            "allkeys-lru/allkeys-lfu (or volatile-* with a cache ttl)"
        )
    elif policy.startswith("volatile-") and not entries_expire:
        problems.append(
            f"Redis maxmemory-policy is {policy}, which only evicts keys with a TTL, and this "
            "cache stores entries without one (ttl=None): they are never evicted"
        )
    return problems


def check_server(client: redis_lib.Redis, *, entries_expire: bool = False) -> list[str]:
    """Warn (once per server and process) about a configuration unfit for a cache."""
    if not _first_time(client, "cache"):
        return []
    config = _config(client, "maxmemory", "maxmemory-policy")
    if config is None:
        return []
    problems = server_problems(config, entries_expire=entries_expire)
    for problem in problems:
        log.warning("%s (server %s)", problem, _server_id(client))
    return problems


async def check_server_async(client: Any, *, entries_expire: bool = False) -> list[str]:
    """``check_server`` for a redis.asyncio client (AsyncTieredCache.start)."""
    if not _first_time(client, "cache"):
        return []
    out: dict[str, str] = {}
    try:
        for name in ("maxmemory", "maxmemory-policy"):
            reply: Any = await client.config_get(name)
            for k, v in dict(reply).items():
                k = k.decode() if isinstance(k, bytes) else str(k)
                out[k] = v.decode() if isinstance(v, bytes) else str(v)
    except redis_lib.RedisError as err:  # NOPERM, unknown command, a closed connection...
        log.debug("Redis configuration not checked (CONFIG GET refused): %s", err)
        return []
    except Exception as err:  # a client of another shape: never fail a cache for a check
        log.debug("Redis configuration not checked: %r", err)
        return []
    problems = server_problems(out, entries_expire=entries_expire)
    for problem in problems:
        log.warning("%s (server %s)", problem, _server_id(client))
    return problems


def write_behind_problems(config: dict[str, str]) -> list[str]:
    """What in ``config`` puts queued write-behind writes at risk."""
    problems = []
    if config.get("maxmemory-policy", "").startswith("allkeys-") and config.get(
        "maxmemory", "0"
    ).strip() not in ("0", ""):
        problems.append(
            f"Redis maxmemory-policy is {config['maxmemory-policy']}: under memory pressure it "
            "may evict the write-behind stream and lose queued writes; use a volatile-* policy "
            "with a cache ttl, or a Redis of its own for write-behind"
        )
    if config.get("appendonly") == "no":
        problems.append(
            "Redis appendonly is off: a Redis crash loses the write-behind writes not yet "
            "flushed to the origin"
        )
    return problems


def check_write_behind(client: redis_lib.Redis) -> list[str]:
    """Warn (once per server and process) about a configuration that risks queued writes."""
    if not _first_time(client, "write-behind"):
        return []
    config = _config(client, "maxmemory", "maxmemory-policy", "appendonly")
    if config is None:
        return []
    problems = write_behind_problems(config)
    for problem in problems:
        log.warning("%s (server %s)", problem, _server_id(client))
    return problems


def forget_checks() -> None:
    """Check every server again (for tests)."""
    with _checked_lock:
        _checked.clear()
