"""Observability on real Redis servers: stats(), the Prometheus collector, OpenTelemetry, hooks,
heartbeats and logging.

The metric tests run a scripted workload whose counts are known exactly, then read them three
ways: ``cache.stats()``, the Prometheus exposition (``generate_latest``, parsed back), and an
OpenTelemetry SDK ``InMemoryMetricReader``; all three must agree with the script. The hook tests
inject the events for real (writes from another cache, ``CLIENT KILL TYPE pubsub``). Nothing
sleeps to wait: every wait is a ``wait_until`` with a deadline.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import RedisServer, wait_until
from tiercache.keys import KeySpace, encode_key
from tiercache.metrics import FAMILIES, fleet_rows, metrics_of, prometheus, read_heartbeats
from tiercache.tiered import TieredCache

Factory = Callable[..., TieredCache]
PACKAGE = Path(__file__).resolve().parent.parent / "tiercache"
# Printing is the command line's job; the library logs.
PRINTING_MODULES = {"cli.py", "demo.py", "__main__.py"}


@pytest.fixture
def make(redis_client: redis.Redis, shared_redis: RedisServer) -> Iterator[Factory]:
    """``make(**options)``: a ready TieredCache on the shared (flushed) server, closed after."""
    made: list[TieredCache] = []

    def factory(url: str | None = None, **kwargs: Any) -> TieredCache:
        kwargs.setdefault("health_timeout", 5.0)  # a starved listener must not flap the tier
        cache = TieredCache(url or shared_redis.url, **kwargs)
        made.append(cache)
        assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            cache.close()


def raw_key(key: Any, namespace: str = "tc") -> bytes:
    return KeySpace(namespace).value(encode_key(key))


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a registry's exposition, parsed back: (name, labels) -> value."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(scraped: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in scraped.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, f"{name} {labels}: {len(matches)} samples"
    return matches[0]


# -- the scripted workload ------------------------------------------------------------------------


def run_workload(make: Factory, redis_client: redis.Redis, **extra: Any) -> tuple[Any, Any, Any]:
    """A: writer; B: reader with a local tier of 2 entries; C: read-through.

    Counts (exact): A writes 3 and deletes 1 (4 invalidations, received by all three). B: 3
    remote hits, 1 local eviction (3 keys in 2 slots), 1 local hit, 2 misses (an absent key and
    a planted payload that does not parse: 1 rejected payload). C: 1 miss, 1 load, 1 local hit.
    """
    a = make(**extra)
    b = make(local_maxsize=2, **extra)
    c = make(loader=lambda key: f"loaded:{key}", **extra)
    for n in (1, 2, 3):
        a[f"k{n}"] = n
    for cache in (a, b, c):
        wait_until(lambda cache=cache: cache.stats()["invalidations_received"] == 3)
    assert [b[f"k{n}"] for n in (1, 2, 3)] == [1, 2, 3]  # 3 remote hits; k1 evicted
    assert b["k3"] == 3  # local hit
    assert b.get("absent") is None  # miss
    redis_client.set(raw_key("planted"), b"not an envelope")
    assert b.get("planted") is None  # rejected payload, miss
    assert c["x"] == "loaded:x"  # miss, load
    assert c["x"] == "loaded:x"  # local hit
    del a["k1"]
    for cache in (a, b, c):
        wait_until(lambda cache=cache: cache.stats()["invalidations_received"] == 4)
    return a, b, c


EXPECTED = {
    # process: (local hits, remote hits, misses, loads, writes, deletes, evictions, rejected)
    "a": (0, 0, 0, 0, 3, 1, 0, 0),
    "b": (1, 3, 2, 0, 0, 0, 1, 1),
    "c": (1, 0, 1, 1, 0, 0, 0, 0),
}
STATS_KEYS = (
    "local_hits",
    "remote_hits",
    "misses",
    "loads",
    "writes",
    "deletes",
    "local_evictions",
    "rejected_payloads",
)


def test_stats_count_the_scripted_workload_exactly(make: Factory, redis_client: redis.Redis):
    a, b, c = run_workload(make, redis_client)
    for name, cache in zip("abc", (a, b, c), strict=True):
        s = cache.stats()
        assert tuple(s[k] for k in STATS_KEYS) == EXPECTED[name], name
        assert s["invalidations_received"] == 4
        assert (s["resyncs"], s["flushes"], s["gaps"], s["stale_served"]) == (0, 0, 0, 0)
        assert s["local_usable"] is True
    assert b.stats()["local_size"] == 2
    assert c.stats()["load_ms"]["p50"] is not None  # one timed load
    lag = b.stats()["invalidation_lag_ms"]  # a's writes, as b saw them
    assert lag["p50"] is not None and 0 <= lag["p50"] <= lag["p99"] <= lag["max"]


def test_prometheus_collector_exposes_the_same_counts(make: Factory, redis_client: redis.Redis):
    a, b, c = run_workload(make, redis_client)
    registry = CollectorRegistry()
    for name, cache in zip("abc", (a, b, c), strict=True):
        collector = prometheus.register(cache, registry, process=name)
    assert len(collector) == 3  # one collector per registry serves every cache
    got = scrape(registry)
    for name, (lh, rh, miss, loads, writes, deletes, evictions, rejected) in EXPECTED.items():
        p = {"process": name, "namespace": "tc"}
        assert sample(got, "tiercache_hits_total", tier="local", **p) == lh
        assert sample(got, "tiercache_hits_total", tier="remote", **p) == rh
        assert sample(got, "tiercache_misses_total", tier="remote", **p) == miss
        assert sample(got, "tiercache_misses_total", tier="local", **p) == rh + miss
        assert sample(got, "tiercache_loads_total", **p) == loads
        assert sample(got, "tiercache_writes_total", op="set", **p) == writes
        assert sample(got, "tiercache_writes_total", op="delete", **p) == deletes
        assert sample(got, "tiercache_invalidations_sent_total", **p) == writes + deletes
        assert sample(got, "tiercache_invalidations_received_total", **p) == 4
        assert sample(got, "tiercache_evictions_total", tier="local", **p) == evictions
        assert sample(got, "tiercache_rejected_payloads_total", **p) == rejected
        for zero in ("resyncs", "gaps", "flushes", "stale_served", "disconnects"):
            assert sample(got, f"tiercache_{zero}_total", **p) == 0
        assert sample(got, "tiercache_local_usable", **p) == 1
        assert sample(got, "tiercache_load_duration_seconds_count", **p) == loads
    assert sample(got, "tiercache_local_entries", process="b") == 2
    # The lag histogram: b saw a's 4 invalidations (those with a plausible clock are timed).
    count = sample(got, "tiercache_invalidation_lag_seconds_count", process="b")
    assert 1 <= count <= 4
    assert sample(got, "tiercache_invalidation_lag_seconds_bucket", process="b", le="+Inf") == count
    buckets = sorted(
        (float(dict(ls)["le"]), v)
        for (n, ls), v in got.items()
        if n == "tiercache_invalidation_lag_seconds_bucket" and ("process", "b") in ls
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    # (a sample may be 0: a lag below the clock calibration error is recorded as none)
    assert sample(got, "tiercache_invalidation_lag_seconds_sum", process="b") >= 0
    median = sample(got, "tiercache_invalidation_lag_recent_seconds", process="b", quantile="0.5")
    assert median >= 0
    # A second scrape counts nothing twice.
    c["y"]
    again = scrape(registry)
    assert sample(again, "tiercache_load_duration_seconds_count", process="c") == 2
    assert sample(again, "tiercache_invalidation_lag_seconds_count", process="b") == count
    # Unregistered or closed caches drop out; the last one takes the collector with it.
    assert prometheus.unregister(a, registry)
    c.close()
    left = {dict(ls).get("process") for (n, ls) in scrape(registry) if n.startswith("tiercache")}
    assert left == {"b"}
    assert prometheus.unregister(b, registry) and prometheus.unregister(c, registry)
    assert not any(n.startswith("tiercache") for n, _ in scrape(registry))


def test_every_family_is_described_and_registration_is_on_demand(make: Factory):
    cache = make()
    registry = CollectorRegistry(auto_describe=True)
    assert not any(n.startswith("tiercache") for n, _ in scrape(registry))
    prometheus.register(cache, registry)
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert names == {f"tiercache_{f.name}" for f in FAMILIES}  # bloom: described, no sample
    assert not [n for n, _ in scrape(registry) if n == "tiercache_bloom"]
    got = scrape(registry)
    assert sample(got, "tiercache_loads_total", process=str(os.getpid())) == 0  # default label
    # Another cache of the same namespace and process gets its own label value.
    other = make()
    prometheus.register(other, registry)
    processes = {dict(ls)["process"] for n, ls in scrape(registry) if n == "tiercache_loads_total"}
    assert processes == {str(os.getpid()), f"{os.getpid()}#2"}


def test_importing_tiercache_imports_no_optional_dependency() -> None:
    code = (
        "import sys, tiercache, tiercache.metrics, tiercache.cli, tiercache.demo\n"
        "bad = [m for m in ('prometheus_client', 'rich', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""


def test_opentelemetry_reports_the_same_counts(make: Factory, redis_client: redis.Redis):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from tiercache.metrics import otel

    a, b, c = run_workload(make, redis_client)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meter = provider.get_meter("tiercache-test")
        handles = [
            otel.instrument(cache, meter, process=name)
            for name, cache in zip("abc", (a, b, c), strict=True)
        ]

        def points() -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {}
            for rm in reader.get_metrics_data().resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        out.setdefault(m.name, []).extend(m.data.data_points)
            return out

        def value(got: dict, name: str, **attrs: str) -> Any:
            found = [p for p in got[name] if attrs.items() <= dict(p.attributes).items()]
            assert len(found) == 1, f"{name} {attrs}: {found}"
            return found[0]

        got = points()
        for name, (lh, rh, miss, loads, writes, deletes, evictions, _) in EXPECTED.items():
            assert value(got, "tiercache.hits", process=name, tier="local").value == lh
            assert value(got, "tiercache.hits", process=name, tier="remote").value == rh
            assert value(got, "tiercache.misses", process=name, tier="remote").value == miss
            assert value(got, "tiercache.loads", process=name).value == loads
            assert value(got, "tiercache.writes", process=name, op="delete").value == deletes
            assert value(got, "tiercache.invalidations_sent", process=name).value == (
                writes + deletes
            )
            assert value(got, "tiercache.evictions", process=name, tier="local").value == (
                evictions
            )
            assert value(got, "tiercache.local_usable", process=name).value == 1
        assert value(got, "tiercache.local_entries", process="b").value == 2
        load = value(got, "tiercache.load_duration", process="c")
        assert load.count == 1 and load.sum > 0
        lag = value(got, "tiercache.invalidation_lag", process="b")
        assert 1 <= lag.count <= 4
        # Cumulative temporality: a second collection adds only what happened in between.
        c["y"]
        again = points()
        assert value(again, "tiercache.load_duration", process="c").count == 2
        assert value(again, "tiercache.loads", process="c").value == 2
        assert value(again, "tiercache.invalidation_lag", process="b").count == lag.count
        handles[0].uninstrument()
        assert not [p for p in points()["tiercache.loads"] if p.attributes["process"] == "a"]
    finally:
        provider.shutdown()


class _FakeFilter:
    """A negative filter that calls every key absent (via a real Redis reply) and has stats()."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}

    def probe(self, encoded: bytes) -> tuple[Any, ...]:
        return ("EXISTS", b"tiercache-test:no-such-key")

    def absent(self, reply: Any) -> bool:
        return reply == 0

    def register(self, encoded: bytes) -> None:
        pass

    def note(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def stats(self) -> dict[str, Any]:
        return {
            "capacity": 1000,
            "loads_avoided": self.events.get("avoided", 0),
            "backend": "fake",  # not a number: not exported
            "complete": True,
        }


class _FakeConfig:
    def open(self, driver: Any) -> _FakeFilter:
        return _FakeFilter()


def test_bloom_savings_are_exported(make: Factory) -> None:
    loads: list[Any] = []
    cache = make(bloom=_FakeConfig(), loader=lambda key: loads.append(key) or "v")
    assert cache.get("a") is None and cache.get("b") is None
    assert loads == [] and cache.stats()["filtered"] == 2
    registry = CollectorRegistry()
    prometheus.register(cache, registry, process="p")
    got = scrape(registry)
    assert sample(got, "tiercache_filtered_total", process="p") == 2
    assert sample(got, "tiercache_bloom", process="p", stat="loads_avoided") == 2
    assert sample(got, "tiercache_bloom", process="p", stat="capacity") == 1000
    assert sample(got, "tiercache_bloom", process="p", stat="complete") == 1
    assert not [ls for n, ls in got if n == "tiercache_bloom" and ("stat", "backend") in ls]


def test_bloom_figures_of_the_real_filter(make: Factory) -> None:
    bloom = pytest.importorskip("tiercache.bloom")
    config = bloom.BloomConfig(capacity=1000, error_rate=0.01, backend="lua")
    cache = make(bloom=config, loader=lambda key: "v", namespace="bloomed")
    cache.bloom.warm(["present"])
    assert cache.get("absent") is None
    figures = {k: v for k, v in cache.bloom.stats().items() if isinstance(v, int | float)}
    snap = metrics_of(cache).snapshot()
    assert snap is not None
    exported = {s.labels["stat"]: s.value for s in snap.samples if s.family == "bloom"}
    for name, value in figures.items():
        assert name in exported
        if name in ("capacity", "loads_avoided"):
            assert exported[name] == float(value)
    assert snap.value("filtered") == cache.stats()["filtered"] == 1


# -- hooks ----------------------------------------------------------------------------------------


def test_on_invalidate_gets_the_user_key_and_version(make: Factory) -> None:
    seen: list[tuple[Any, int]] = []
    a = make()
    make(on_invalidate=lambda key, version: seen.append((key, version)))
    a["user:1"] = 1
    a[("user", 2, b"x", None)] = 2
    del a["user:1"]
    wait_until(lambda: len(seen) == 3, message="three invalidations seen by b's hook")
    keys = [k for k, _ in seen]
    assert keys == ["user:1", ("user", 2, b"x", None), "user:1"]
    versions = [v for _, v in seen]
    assert all(isinstance(v, int) and v > 0 for v in versions)
    assert versions[2] > versions[0]


def test_on_evict_reports_what_the_local_tier_lets_go(make: Factory) -> None:
    """on_evict(key, value, cause): the user key (of any type) and value of a local copy dropped
    for the local tier's size ("size") or its TTL ("expired"); the value stays in Redis."""
    seen: list[tuple[Any, Any, str]] = []
    clock = {"now": 1000.0}
    cache = make(
        local_maxsize=2,
        local_ttl=5.0,
        timer=lambda: clock["now"],
        on_evict=lambda key, value, cause: seen.append((key, value, cause)),
    )
    cache["a"] = "A"
    cache[("t", 2)] = "T"
    assert seen == []
    cache["c"] = "C"  # the local tier holds two: its least recent copy goes
    assert seen == [("a", "A", "size")]
    assert cache.local.stats()["evictions"] == 1
    clock["now"] += 6.0  # past local_ttl: the local copies of ("t", 2) and "c" expire
    assert cache["c"] == "C"  # read from Redis, and its expired copy replaced
    assert cache.local.expire() == 1
    assert sorted(seen[1:], key=repr) == [("c", "C", "expired"), (("t", 2), "T", "expired")]
    assert cache["a"] == "A"  # every value is still in Redis
    with pytest.raises(TypeError, match="on_evict"):
        TieredCache(on_evict="not callable")  # type: ignore[arg-type]


def test_a_failing_hook_is_logged_and_never_breaks_the_cache(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(key: Any, version: int) -> None:
        raise RuntimeError("hook bug")

    a = make()
    b = make(on_invalidate=broken)
    with caplog.at_level(logging.ERROR, logger="tiercache"):
        a["k"] = 1
        wait_until(lambda: b.stats()["invalidations_received"] >= 1)
        wait_until(lambda: any("hook" in r.getMessage() for r in caplog.records))
    assert b["k"] == 1 and b.stats()["local_usable"]
    record = next(r for r in caplog.records if "hook" in r.getMessage())
    assert record.name.startswith("tiercache") and record.exc_info is not None


def test_on_resync_fires_after_client_kill_pubsub(make: Factory, redis_server: RedisServer) -> None:
    reasons: list[str] = []
    cache = make(
        redis_server.url,
        on_resync=reasons.append,
        health_interval=0.2,
        health_timeout=1.0,
    )
    registry = CollectorRegistry()
    prometheus.register(cache, registry)
    admin = redis_server.client()
    try:
        assert admin.client_kill_filter(_type="pubsub") == 1
        wait_until(lambda: reasons, 10, message="on_resync called")
        wait_until(lambda: cache.stats()["local_usable"], 10, message="local tier back on")
    finally:
        admin.close()
    assert reasons[0] == "resynced"
    s = cache.stats()
    assert s["resyncs"] >= 1 and s["disconnects"] >= 1
    got = scrape(registry)
    assert sample(got, "tiercache_resyncs_total") == s["resyncs"]
    assert sample(got, "tiercache_disconnects_total") >= 1


# -- heartbeats -----------------------------------------------------------------------------------


def test_heartbeats_appear_carry_stats_and_expire(make: Factory, redis_client: redis.Redis):
    cache = make(namespace="hb", heartbeat_interval=0.2, health_interval=0.1)
    beats = wait_until(lambda: read_heartbeats(redis_client, "hb"), message="a heartbeat")
    assert len(beats) == 1
    beat = beats[0]
    assert beat.pid == os.getpid() and beat.age < 5
    assert beat.ttl_ms is not None and 0 < beat.ttl_ms <= 3000
    cache["k"] = 1
    cache["k"]
    beat = wait_until(
        lambda: [b for b in read_heartbeats(redis_client, "hb") if b.stats.get("writes") == 1],
        message="a heartbeat with the write",
    )[0]
    (row,) = fleet_rows([beat])
    assert row["writes"] == 1 and row["local"] == 1.0 and row["usable"] is True
    assert read_heartbeats(redis_client, "other-namespace") == []
    cache.close()
    wait_until(lambda: not read_heartbeats(redis_client, "hb"), 8, message="heartbeat expired")


# -- logging --------------------------------------------------------------------------------------


def _library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in PRINTING_MODULES)


def test_the_library_never_prints() -> None:
    offenders = []
    for path in _library_modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("stdout", "stderr")
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} sys.{node.attr}")
    assert offenders == []


def test_every_logger_is_under_tiercache() -> None:
    names = []
    for path in _library_modules() + [PACKAGE / m for m in PRINTING_MODULES]:
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getLogger"
                and node.args
            ):
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    names.append(str(arg.value))
                elif isinstance(arg, ast.Name) and arg.id == "__name__":
                    names.append("tiercache." + path.stem)  # a module of the package
                else:
                    names.append(f"<{ast.dump(arg)}>")
    assert names and all(n == "tiercache" or n.startswith("tiercache.") for n in names), names


def test_using_a_cache_prints_nothing(
    make: Factory, redis_client: redis.Redis, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    a = make(loader=lambda key: "v")
    b = make()
    a["k"] = 1
    assert b["k"] == 1 and a["other"] == "v"
    redis_client.set(raw_key("bad"), b"garbage")
    assert b.get("bad") is None
    del a["k"]
    b.invalidate("nothing")
    a.close()
    out, _ = capfd.readouterr()
    assert out == ""


def test_warnings_are_rate_limited(
    make: Factory, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(namespace="noisy")
    for n in range(5):
        redis_client.set(raw_key(f"bad{n}", "noisy"), b"garbage")
    with caplog.at_level(logging.DEBUG, logger="tiercache"):
        for n in range(5):
            assert cache.get(f"bad{n}") is None
    assert cache.stats()["rejected_payloads"] == 5
    rejected = [r for r in caplog.records if "rejected the payload" in r.getMessage()]
    assert len(rejected) == 5
    assert [r.levelno for r in rejected].count(logging.WARNING) == 1  # then DEBUG, for 10 s
    assert all(r.name.startswith("tiercache") for r in rejected)
    assert not math.isnan(rejected[0].created)


def test_the_operations_guide_lists_every_metric() -> None:
    from tiercache.metrics.otel import name_of as otel_name

    guide = (PACKAGE.parent / "docs" / "operations.md").read_text()
    for family in FAMILIES:
        suffix = "_total" if family.kind == "counter" else ""
        assert f"`tiercache_{family.name}{suffix}`" in guide, family.name
        assert f"`{otel_name(family.name)}`" in guide, family.name
