"""Warm-up: pre-load keys into Redis in batches, never overwriting a newer value.

Each batch takes the fill leases of its keys in one round trip (``lua/lease.lua``): a key that
holds a value is already warm and skipped, a key another process is filling is left to it. The
batch's leased keys go to one ``loader_many`` call, and each value is stored by the fill script
(``lua/fill.lua``) only if its lease still stands: a write or delete since the lease was taken
replaced the lease, so a value the loader read before that write is discarded, never stored over
the newer one. Keys the loader leaves out are released (not cached as absent).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from ._sentinel import MISSING
from .errors import CacheUnavailable
from .keys import encode_key

if TYPE_CHECKING:
    from .tiered import TieredCache

Progress = Callable[[int, "int | None"], None]


@dataclass(slots=True)
class WarmResult:
    """What a warm-up did, in keys."""

    total: int = 0  # keys seen
    loaded: int = 0  # stored in Redis
    present: int = 0  # already held a value: skipped
    busy: int = 0  # another process was filling them: skipped
    absent: int = 0  # the loader did not return them
    overtaken: int = 0  # a write landed while loading: the loaded value was discarded


def warm(
    cache: TieredCache,
    keys: Iterable[Hashable],
    loader_many: Callable[[list[Any]], Mapping[Any, Any]],
    *,
    batch_size: int = 500,
    progress: Progress | None = None,
    ttl: float | None = None,
) -> WarmResult:
    """Load the missing ``keys`` with ``loader_many`` in batches; ``progress(done, total)``."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    total = len(keys) if hasattr(keys, "__len__") else None  # type: ignore[arg-type]
    ttl = cache._ttl if ttl is None else ttl
    result = WarmResult()
    it = iter(keys)
    while batch := list(itertools.islice(it, batch_size)):
        _warm_batch(cache, batch, loader_many, ttl, result)
        result.total += len(batch)
        if progress is not None:
            progress(result.total, total)
    return result


def _warm_batch(
    cache: TieredCache,
    batch: list[Hashable],
    loader_many: Callable[[list[Any]], Mapping[Any, Any]],
    ttl: float | None,
    result: WarmResult,
) -> None:
    driver = cache._driver
    encoded = [encode_key(k) for k in batch]
    token = secrets.token_bytes(16)
    try:
        leases = driver.leases(encoded, token, cache._lease_ms)
    except redis_lib.RedisError as err:
        raise CacheUnavailable(f"Redis failed during warm-up: {err}") from err
    to_load = []
    for key, enc, lease in zip(batch, encoded, leases, strict=True):
        if lease.kind == "v":
            result.present += 1
        elif lease.kind == "w":
            result.busy += 1
        elif lease.envelope is not None:
            to_load.append((key, enc, lease.envelope, lease.version))
    if not to_load:
        return
    cache._counters.add("loads")
    started = time.monotonic()
    try:
        loaded = loader_many([key for key, _, _, _ in to_load])
    except BaseException:
        _release(cache, [(enc, lease) for _, enc, lease, _ in to_load])
        raise
    load_ms = (time.monotonic() - started) * 1000.0
    fills, unused = [], []
    try:
        for key, enc, lease, version in to_load:
            value = loaded.get(key, MISSING)
            if value is MISSING:
                result.absent += 1
                unused.append((enc, lease))
                continue
            payload, flags = cache._payload(value)
            cache._filter_learns(enc, value)
            env = cache._value_envelope(payload, flags, ttl, version, load_ms)
            fills.append((enc, lease, cache._pack(env, enc), cache._redis_ttl_ms(env)))
    except BaseException:
        _release(cache, [(enc, lease) for _, enc, lease, _ in to_load])
        raise
    try:
        stored = driver.fills(fills) if fills else []
    except redis_lib.RedisError as err:
        raise CacheUnavailable(f"Redis failed during warm-up: {err}") from err
    ok = sum(1 for s in stored if s)
    result.loaded += ok
    result.overtaken += len(stored) - ok
    if len(stored) - ok:
        cache._counters.add("stale_fills_rejected", len(stored) - ok)
    _release(cache, unused)


def _release(cache: TieredCache, leases: list[tuple[bytes, bytes]]) -> None:
    """Give up leases in one round trip (they expire by themselves if this fails)."""
    if not leases:
        return
    commands = cache._driver.commands
    try:
        cache._driver.call_many([commands.release(enc, lease) for enc, lease in leases])
    except redis_lib.RedisError:
        pass
