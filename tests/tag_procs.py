"""The worker of tests/test_tags_procs.py: an OS process that reads, loads and writes tagged keys.

It talks to the test only through Redis (plain keys under ``ctl:``) and its result queue:

* ``ctl:ready`` (a list): each worker pushes its id when its cache is warm;
* ``ctl:epoch``: the origin's epoch, which the loader reads (0 before the change, 1 after);
* ``ctl:fence``: set by the test once ``invalidate_tag`` has returned, to the tag's new version;
* ``ctl:applied`` (a list): each worker pushes its id once its cache has applied that version;
* ``ctl:stop``: the end.

A read after the worker's own cache applied the invalidation must never return a value of
epoch 0 (a seeded value, or a value loaded before the change); a key this worker wrote after
the fence must read back as its last write. Violations are returned, with counts.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import redis

NAMESPACE = "tagprocs"
TAG = "grp"


def key_of(i: int) -> str:
    """The cache key of item ``i``."""
    return f"k{i}"


def worker(
    wid: int, url: str, keys: int, workers: int, deadline: float, options: dict[str, Any], out: Any
) -> None:
    """Run reads, loads and writes until told to stop (or ``deadline``, a time.time())."""
    from tiercache.tiered import TieredCache

    ctl = redis.Redis.from_url(url)
    rng = random.Random(wid)

    def loader(key: str) -> tuple[str, int, int]:
        epoch = int(ctl.get("ctl:epoch") or 0)
        time.sleep(rng.random() * 0.002)  # widen the window between the origin read and fill
        return ("load", int(key[1:]), epoch)

    def slow_loader(key: str) -> tuple[str, int, int]:
        epoch = int(ctl.get("ctl:epoch") or 0)
        time.sleep(0.01 + rng.random() * 0.02)
        return ("load", int(key[1:]), epoch)

    result: dict[str, Any] = {"reads": 0, "writes": 0, "violations": [], "after_reads": 0}
    with TieredCache(url, namespace=NAMESPACE, ttl=300.0, **options) as cache:
        cache.wait_ready(10.0)
        for i in rng.sample(range(keys), min(keys, 500)):  # warm the local tier
            cache.get(key_of(i))
        applied_wall: list[float] = []
        original = cache._tag_invalidated

        def spy(key: bytes, version: int | None) -> None:  # when the G message is applied
            original(key, version)
            if not applied_wall:
                applied_wall.append(time.time())

        cache._tag_invalidated = spy  # type: ignore[method-assign]
        stop = threading.Event()

        def racer() -> None:  # keeps a slow load in flight, so some straddle the invalidation
            r = random.Random(wid + 100)
            mine = list(range(0, keys, 10))[wid::workers]
            while not stop.is_set():
                key = key_of(r.choice(mine))
                cache.invalidate(key)
                cache.get_or_load(key, slow_loader, tags=(TAG,))

        thread = threading.Thread(target=racer, daemon=True)
        thread.start()
        ctl.rpush("ctl:ready", wid)
        fence = 0
        applied = False
        last_written: dict[str, Any] = {}
        n = 0
        while time.time() < deadline and not ctl.exists("ctl:stop"):
            if not fence:
                fence = int(ctl.get("ctl:fence") or 0)
            if fence and not applied:
                known = cache._tags.known(0, TAG)  # the version this process has applied
                if known is not None and known >= fence:
                    applied = True
                    ctl.rpush("ctl:applied", wid)
            i = rng.randrange(keys)
            key = key_of(i)
            if i % workers == wid and i % 10 and rng.random() < 0.2:  # (racers own i % 10 == 0)
                n += 1
                value = ("w", wid, i, n)
                after = bool(fence)  # the write starts after invalidate_tag returned
                cache.set(key, value, tags=(TAG,))
                result["writes"] += 1
                if after:
                    last_written[key] = value
                continue
            value = cache.get_or_load(key, loader, tags=(TAG,))
            result["reads"] += 1
            if not applied:
                continue
            result["after_reads"] += 1
            stale = value[0] == "seed" or (value[0] == "load" and value[2] == 0)
            if stale:
                result["violations"].append(f"stale read of {key}: {value!r}")
            elif key in last_written and value != last_written[key]:
                result["violations"].append(f"{key}: wrote {last_written[key]!r}, read {value!r}")
        stop.set()
        thread.join(10)
        result["applied"] = applied
        result["applied_wall"] = applied_wall[0] if applied_wall else None
        result["last_written"] = last_written
        stats = cache.stats()
        result["lag_ms"] = stats["invalidation_lag_ms"]
        result["stats"] = {
            k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
        }
    ctl.close()
    out.put((wid, result))
