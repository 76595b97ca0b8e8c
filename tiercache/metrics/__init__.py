"""The metrics of a TieredCache as plain data, shared by every exporter.

``cache.stats()`` is the source of truth: a dict of counters since the cache was created, the
local tier's size, and percentiles of the recent invalidation lag and load time. This module turns
it into metric families (a name, a kind, a help text and labelled samples) that
:mod:`tiercache.metrics.prometheus` and :mod:`tiercache.metrics.otel` publish, so both speak of the
same figures under the same names. It imports nothing beyond the standard library: importing
tiercache never imports ``prometheus_client`` or OpenTelemetry.

It also reads the fleet's heartbeats (:func:`read_heartbeats`): each TieredCache publishes its
``stats()`` under its namespace every ``heartbeat_interval`` seconds, in a Redis hash that expires
by itself, and ``tiercache stats`` shows them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("tiercache.metrics")

__all__ = [
    "FAMILIES",
    "CacheMetrics",
    "Family",
    "HeartbeatView",
    "Histogram",
    "Sample",
    "Snapshot",
    "drain",
    "fleet_rows",
    "hit_ratios",
    "metrics_of",
    "read_heartbeats",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """One metric: its name (exporters add a prefix), kind, help text, unit and extra label.

    ``source`` says where the value comes from in ``stats()``: a key, or, with ``label``, a
    mapping from each label value to a key; ``None`` for the computed ones (see CacheMetrics).
    """

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    unit: str = ""
    label: str | None = None
    source: str | Mapping[str, str] | None = None


# The families, in the order exporters publish them. Counters count events since the cache was
# created (a forked child starts from zero).
FAMILIES: tuple[Family, ...] = (
    Family(
        "hits",
        "counter",
        "Reads answered by a tier: local (in-process) or remote (Redis).",
        "{read}",
        "tier",
        {"local": "local_hits", "remote": "remote_hits"},
    ),
    Family(
        "misses",
        "counter",
        "Reads a tier could not answer: local (went on to Redis: remote hits + remote misses) "
        "or remote (in neither tier).",
        "{read}",
        "tier",
        {"remote": "misses"},
    ),
    Family(
        "loads",
        "counter",
        "Loader calls: read-through misses, background refreshes and fallbacks.",
        "{call}",
        source="loads",
    ),
    Family(
        "load_duration_seconds",
        "histogram",
        "Time a loader took, for the loads whose result was stored (read-through fills).",
        "s",
    ),
    Family(
        "refreshes",
        "counter",
        "Background refreshes stored (stale-while-revalidate, XFetch early refresh).",
        "{refresh}",
        source="refreshes",
    ),
    Family(
        "lease_timeouts",
        "counter",
        "Waits for another process' fill lease that ran out (the load ran without storing).",
        "{wait}",
        source="lease_timeouts",
    ),
    Family(
        "evictions",
        "counter",
        "Entries evicted by the local tier's policy to stay within its bounds.",
        "{entry}",
        "tier",
        {"local": "local_evictions"},
    ),
    Family(
        "writes",
        "counter",
        "Writes applied in Redis, by operation (each one publishes one invalidation).",
        "{write}",
        "op",
        {"set": "writes", "delete": "deletes"},
    ),
    Family(
        "invalidations_sent",
        "counter",
        "Invalidations published by this process' writes and deletes (clears not counted).",
        "{message}",
    ),
    Family(
        "invalidations_received",
        "counter",
        "Invalidations applied from the channel, this process' own echoes included.",
        "{message}",
        source="invalidations_received",
    ),
    Family(
        "invalidation_lag_seconds",
        "histogram",
        "From a write in Redis (its version's Redis time) to its invalidation here "
        "(other processes' writes only).",
        "s",
    ),
    Family(
        "invalidation_lag_recent_seconds",
        "gauge",
        "Invalidation lag over the last 1024 invalidations: quantile 0.5, 0.99 and 1 (max).",
        "s",
        "quantile",
    ),
    Family(
        "resyncs",
        "counter",
        "Times the invalidation channel came back after trouble (replayed from the log).",
        "{event}",
        source="resyncs",
    ),
    Family(
        "gaps",
        "counter",
        "Gaps detected in an invalidation sequence (a lost or reordered message).",
        "{event}",
        source="gaps",
    ),
    Family(
        "flushes",
        "counter",
        "Local tier flushes: messages lost beyond what the invalidation log holds.",
        "{event}",
        source="flushes",
    ),
    Family(
        "disconnects",
        "counter",
        "Invalidation channel connections lost (errors, EOF, unanswered PINGs).",
        "{event}",
        source="disconnects",
    ),
    Family(
        "stale_served",
        "counter",
        "Stale values served: within stale_ttl while refreshing, or stale_if_error on failure.",
        "{read}",
        source="stale_served",
    ),
    Family(
        "fills_rejected",
        "counter",
        "Fills discarded because a write landed meanwhile: in Redis (lease lost) or locally.",
        "{fill}",
        "tier",
        {"remote": "stale_fills_rejected", "local": "local_fills_rejected"},
    ),
    Family(
        "rejected_payloads",
        "counter",
        "Values read from Redis that failed verification or decoding (treated as misses).",
        "{payload}",
        source="rejected_payloads",
    ),
    Family(
        "stale_reads_refused",
        "counter",
        "Entries read from Redis older than an invalidation already applied (treated as misses).",
        "{read}",
        source="stale_reads_refused",
    ),
    Family(
        "unsigned_messages",
        "counter",
        "Invalidations whose signature did not verify (obeyed as a drop, version ignored).",
        "{message}",
        source="unsigned_messages",
    ),
    Family(
        "malformed_messages",
        "counter",
        "Messages on the invalidation channel that did not parse.",
        "{message}",
        source="malformed_messages",
    ),
    Family(
        "filtered",
        "counter",
        "Loads the negative (Bloom) filter avoided: keys it proved absent from the origin.",
        "{read}",
        source="filtered",
    ),
    Family(
        "errors",
        "counter",
        "Redis errors met by reads and writes.",
        "{error}",
        "op",
        {"read": "read_errors", "write": "write_errors"},
    ),
    Family(
        "local_entries",
        "gauge",
        "Entries in the local tier.",
        "{entry}",
        source="local_size",
    ),
    Family(
        "local_usable",
        "gauge",
        "1 while the local tier may serve (the invalidation channel is whole), else 0.",
        "1",
        source="local_usable",
    ),
    Family(
        "bloom",
        "gauge",
        "The negative filter's own figures (cache.bloom.stats()), one per stat label.",
        "1",
        "stat",
    ),
)

FAMILY = {f.name: f for f in FAMILIES}

# Histogram bucket bounds, in seconds.
LAG_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
)
LAG_BUCKETS += (1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
LOAD_BUCKETS += (10.0, 30.0)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One value of a counter or gauge family: its labels (namespace, process, extra) and value."""

    family: str
    labels: dict[str, str]
    value: float


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: ``buckets`` pairs (upper bound, count <= bound), then the total."""

    family: str
    labels: dict[str, str]
    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every figure of one cache at one moment."""

    samples: tuple[Sample, ...]
    histograms: tuple[Histogram, ...]
    stats: dict[str, Any]

    def value(self, family: str, **labels: str) -> float | None:
        """The value of one sample (None if absent), selected by family and extra labels."""
        for s in self.samples:
            if s.family == family and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None


class _WindowHistogram:
    """A cumulative histogram fed from one of the cache's duration windows.

    Each collection adds the samples recorded since the previous one (see :func:`drain`).
    """

    def __init__(self, bounds: tuple[float, ...], scale: float) -> None:
        self.bounds = bounds
        self.scale = scale  # window units -> seconds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative), then +Inf
        self.count = 0
        self.sum = 0.0
        self._seen = 0

    def update(self, window: Any) -> None:
        new, self._seen = drain(window, self._seen)
        for value in new:
            self._add(value * self.scale)

    def _add(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        out = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return tuple(out)


def drain(window: Any, seen: int) -> tuple[list[float], int]:
    """The samples added to a duration window since it had ``seen`` in all, and its new total.

    The cache keeps the last 1024 samples of each duration and a running count
    (``tiercache.tiered._Window``); when more than it holds arrived since ``seen``, the ones still
    there stand in for the lost ones (the count stays exact, the distribution is approximate).
    """
    if window is None:
        return [], seen
    taken, total = window.since(seen)
    new = total - seen
    if new <= 0 or not taken:
        return [], max(total, seen)
    return [taken[i % len(taken)] for i in range(new)], total


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class CacheMetrics:
    """The metric view of one cache (held weakly): ``snapshot()`` gives every figure.

    One view per cache (:func:`metrics_of`), shared by the exporters, so its histograms count
    each duration sample once whoever collects.
    """

    def __init__(self, cache: Any, process: str | None = None) -> None:
        self._cache = weakref.ref(cache)
        self.process = process
        self._lock = threading.Lock()
        self._lag = _WindowHistogram(LAG_BUCKETS, 1e-3)
        self._load = _WindowHistogram(LOAD_BUCKETS, 1e-3)
        self.namespace = str(getattr(cache, "namespace", "?"))

    @property
    def cache(self) -> Any:
        """The cache, or None once it was garbage-collected."""
        return self._cache()

    @property
    def alive(self) -> bool:
        """Whether the cache still exists and is not closed."""
        cache = self._cache()
        return cache is not None and not getattr(cache, "_closed", False)

    def window(self, family: str) -> Any:
        """The cache's window of raw samples (ms) behind a histogram family, or None."""
        cache = self._cache()
        if cache is None:
            return None
        name = {
            "invalidation_lag_seconds": "invalidation_lag_ms",
            "load_duration_seconds": "load_ms",
        }
        return cache.duration_windows.get(name.get(family, ""))

    def labels(self) -> dict[str, str]:
        """The labels every sample carries: namespace and process (default: the pid)."""
        return {"namespace": self.namespace, "process": self.process or str(os.getpid())}

    def snapshot(self) -> Snapshot | None:
        """Every figure of the cache now (None if it is gone)."""
        cache = self._cache()
        if cache is None:
            return None
        stats = cache.stats()
        base = self.labels()
        samples: list[Sample] = []
        for family in FAMILIES:
            if family.kind == "histogram" or family.name == "bloom":
                continue
            if family.name == "misses":
                remote = [_number(stats.get(k)) for k in ("remote_hits", "misses")]
                if all(v is not None for v in remote):
                    labels = {**base, "tier": "local"}
                    samples.append(Sample(family.name, labels, sum(remote)))  # type: ignore[arg-type]
            if family.name == "invalidations_sent":
                sent = [_number(stats.get(k)) for k in ("writes", "deletes")]
                if all(v is not None for v in sent):
                    samples.append(Sample(family.name, base, sum(sent)))  # type: ignore[arg-type]
                continue
            if family.name == "invalidation_lag_recent_seconds":
                lag = stats.get("invalidation_lag_ms") or {}
                for quantile, key in (("0.5", "p50"), ("0.99", "p99"), ("1", "max")):
                    value = _number(lag.get(key))
                    if value is not None:
                        labels = {**base, "quantile": quantile}
                        samples.append(Sample(family.name, labels, value / 1000.0))
                continue
            if isinstance(family.source, Mapping):
                assert family.label is not None
                for label_value, key in family.source.items():
                    value = _number(stats.get(key))
                    if value is not None:
                        labels = {**base, family.label: label_value}
                        samples.append(Sample(family.name, labels, value))
            elif family.source is not None:
                value = _number(stats.get(family.source))
                if value is not None:
                    samples.append(Sample(family.name, base, value))
        samples.extend(self._bloom_samples(cache, base))
        with self._lock:
            self._lag.update(self.window("invalidation_lag_seconds"))
            self._load.update(self.window("load_duration_seconds"))
            histograms = tuple(
                Histogram(name, base, h.cumulative(), h.count, h.sum)
                for name, h in (
                    ("invalidation_lag_seconds", self._lag),
                    ("load_duration_seconds", self._load),
                )
            )
        return Snapshot(tuple(samples), histograms, stats)

    def _bloom_samples(self, cache: Any, base: dict[str, str]) -> list[Sample]:
        bloom = getattr(cache, "bloom", None)
        stats_of = getattr(bloom, "stats", None)
        if bloom is None or not callable(stats_of):
            return []
        try:
            figures = stats_of()
        except Exception as err:  # a filter whose Redis is down must not break a scrape
            log.debug("bloom stats unavailable: %r", err)
            return []
        out = []
        for name, raw in (figures or {}).items():
            value = _number(raw)
            if value is not None:
                out.append(Sample("bloom", {**base, "stat": str(name)}, value))
        return out


_VIEWS: dict[int, CacheMetrics] = {}
_VIEWS_LOCK = threading.Lock()


def metrics_of(cache: Any, process: str | None = None) -> CacheMetrics:
    """The shared metric view of ``cache`` (made on first use, dropped with the cache)."""
    key = id(cache)
    with _VIEWS_LOCK:
        view = _VIEWS.get(key)
        if view is None or view.cache is not cache:
            view = _VIEWS[key] = CacheMetrics(cache, process)
            weakref.finalize(cache, _forget_view, key, view)
        elif process is not None:
            view.process = process
        return view


def _forget_view(key: int, view: CacheMetrics) -> None:
    with _VIEWS_LOCK:
        if _VIEWS.get(key) is view:
            del _VIEWS[key]


def hit_ratios(stats: Mapping[str, Any]) -> tuple[float, float, float]:
    """(local, remote, miss) shares of the reads counted in ``stats`` (zeros before any read)."""
    local = float(stats.get("local_hits", 0) or 0)
    remote = float(stats.get("remote_hits", 0) or 0)
    miss = float(stats.get("misses", 0) or 0)
    reads = local + remote + miss
    if not reads:
        return 0.0, 0.0, 0.0
    return local / reads, remote / reads, miss / reads


# -- the fleet: heartbeats ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeartbeatView:
    """One process' last heartbeat: who it is, when it beat, and its ``stats()`` then."""

    origin: str
    pid: int | None
    host: str
    time: float
    stats: dict[str, Any]
    ttl_ms: int | None = None

    @property
    def age(self) -> float:
        """Seconds since the heartbeat was published (by the publisher's clock)."""
        return max(0.0, time.time() - self.time)

    @property
    def process(self) -> str:
        """``host:pid``."""
        return f"{self.host}:{self.pid}" if self.pid is not None else self.origin


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_heartbeats(client: Any, namespace: str) -> list[HeartbeatView]:
    """The live heartbeats of ``namespace`` on ``client`` (a redis-py client), oldest pid first.

    A heartbeat is the hash ``<namespace prefix>hb:<origin>`` (see tiercache.keys) with the
    fields ``pid``, ``host``, ``time`` and ``stats`` (JSON), expiring after three intervals.
    """
    from ..keys import KeySpace

    keys = KeySpace(namespace)
    names = list(client.scan_iter(match=keys.heartbeat_pattern(), count=1000))
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
        pipe.pttl(name)
    replies = pipe.execute()
    out = []
    for name, fields, ttl in zip(names, replies[::2], replies[1::2], strict=True):
        if not fields:
            continue  # expired between SCAN and HGETALL
        got = {_text(k): _text(v) for k, v in fields.items()}
        try:
            stats = json.loads(got.get("stats", "{}"))
        except ValueError:
            stats = {}
        try:
            pid: int | None = int(got["pid"])
        except (KeyError, ValueError):
            pid = None
        try:
            beat = float(got.get("time", "0"))
        except ValueError:
            beat = 0.0
        out.append(
            HeartbeatView(
                origin=_text(name).rsplit(":", 1)[-1],
                pid=pid,
                host=got.get("host", "?"),
                time=beat,
                stats=stats if isinstance(stats, dict) else {},
                ttl_ms=int(ttl) if isinstance(ttl, int) and ttl >= 0 else None,
            )
        )
    out.sort(key=lambda h: (h.host, h.pid or 0, h.origin))
    return out


def fleet_rows(beats: list[HeartbeatView]) -> list[dict[str, Any]]:
    """One row of display figures per heartbeat (what ``tiercache stats`` shows)."""
    rows = []
    for beat in beats:
        s = beat.stats
        local, remote, miss = hit_ratios(s)
        lag = s.get("invalidation_lag_ms") or {}
        rows.append(
            {
                "process": beat.process,
                "origin": beat.origin,
                "age_s": beat.age,
                "local": local,
                "remote": remote,
                "miss": miss,
                "reads": sum(int(s.get(k) or 0) for k in ("local_hits", "remote_hits", "misses")),
                "loads": int(s.get("loads") or 0),
                "writes": int((s.get("writes") or 0) + (s.get("deletes") or 0)),
                "invalidations": int(s.get("invalidations_received") or 0),
                "lag_p50_ms": lag.get("p50"),
                "lag_p99_ms": lag.get("p99"),
                "resyncs": int(s.get("resyncs") or 0),
                "flushes": int(s.get("flushes") or 0),
                "entries": int(s.get("local_size") or 0),
                "usable": bool(s.get("local_usable", False)),
            }
        )
    return rows
