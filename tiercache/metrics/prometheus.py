"""A Prometheus collector for TieredCache (needs ``prometheus-client``: the ``prometheus`` extra).

Registered on demand::

    from prometheus_client import start_http_server
    from tiercache.metrics import prometheus

    prometheus.register(cache)            # the default registry; or registry=CollectorRegistry()
    start_http_server(9100)               # or your framework's /metrics endpoint

Every family is named ``tiercache_<name>`` (counters end in ``_total``) and labelled by
``namespace`` and ``process`` (the pid unless ``process=`` says otherwise), plus ``tier``, ``op``,
``quantile`` or ``stat`` where a family has one; see :data:`tiercache.metrics.FAMILIES` for the
list. Values are read from ``cache.stats()`` (and ``cache.bloom.stats()``) at scrape time, so a
registered cache costs nothing between scrapes. One collector per registry serves every cache
registered in it; a cache that is closed or garbage-collected drops out by itself.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import FAMILIES, FAMILY, CacheMetrics, metrics_of

__all__ = ["PREFIX", "TieredCacheCollector", "register", "unregister"]

PREFIX = "tiercache_"
_BASE_LABELS = ("namespace", "process")


def _label_names(label: str | None) -> list[str]:
    return [*_BASE_LABELS, label] if label else list(_BASE_LABELS)


def _float_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class TieredCacheCollector(Collector):
    """Collects the metrics of the TieredCaches added to it (held weakly)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[int, CacheMetrics] = {}

    def add(self, cache: Any, process: str | None = None) -> None:
        """Collect ``cache`` too (``process``: the value of its ``process`` label)."""
        view = metrics_of(cache, process)
        with self._lock:
            self._views[id(cache)] = view

    def remove(self, cache: Any) -> bool:
        """Stop collecting ``cache``; whether it was collected."""
        with self._lock:
            return self._views.pop(id(cache), None) is not None

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for v in self._views.values() if v.alive)

    def _live_views(self) -> list[CacheMetrics]:
        with self._lock:
            for key in [k for k, v in self._views.items() if v.cache is None]:
                del self._views[key]
            return [v for v in self._views.values() if v.alive]

    def describe(self) -> list[Metric]:
        """The families (without samples), so a registry can check names for duplicates."""
        return list(self._families().values())

    def _families(self) -> dict[str, Metric]:
        out: dict[str, Metric] = {}
        for f in FAMILIES:
            name = PREFIX + f.name
            labels = _label_names(f.label)
            if f.kind == "counter":
                out[f.name] = CounterMetricFamily(name, f.help, labels=labels)
            elif f.kind == "gauge":
                out[f.name] = GaugeMetricFamily(name, f.help, labels=labels)
            else:
                out[f.name] = HistogramMetricFamily(name, f.help, labels=labels)
        return out

    def collect(self) -> Iterator[Metric]:
        """Every family with one sample set per live cache."""
        families = self._families()
        seen: dict[tuple[str, str], int] = {}
        for view in self._live_views():
            snap = view.snapshot()
            if snap is None:
                continue
            base = view.labels()
            ident = (base["namespace"], base["process"])
            n = seen[ident] = seen.get(ident, 0) + 1
            rename = None if n == 1 else f"{base['process']}#{n}"  # two caches, same labels
            for s in snap.samples:
                family = families[s.family]
                labels = dict(s.labels)
                if rename:
                    labels["process"] = rename
                names = _label_names(FAMILY[s.family].label)
                family.add_metric([labels[k] for k in names], s.value)  # type: ignore[attr-defined]
            for h in snap.histograms:
                labels = dict(h.labels)
                if rename:
                    labels["process"] = rename
                families[h.family].add_metric(  # type: ignore[attr-defined]
                    [labels[k] for k in _BASE_LABELS],
                    [(_float_text(bound), count) for bound, count in h.buckets],
                    h.sum,
                )
        yield from families.values()


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, TieredCacheCollector] = (
    weakref.WeakKeyDictionary()
)
_COLLECTORS_LOCK = threading.Lock()


def register(
    cache: Any, registry: CollectorRegistry | None = None, *, process: str | None = None
) -> TieredCacheCollector:
    """Publish ``cache``'s metrics in ``registry`` (default: prometheus_client's REGISTRY).

    Returns the registry's tiercache collector (one per registry, made on first use).
    ``process`` sets the ``process`` label (default: the pid, read at each scrape).
    """
    registry = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = TieredCacheCollector()
            registry.register(collector)
            _COLLECTORS[registry] = collector
    collector.add(cache, process)
    return collector


def unregister(cache: Any, registry: CollectorRegistry | None = None) -> bool:
    """Stop publishing ``cache`` in ``registry``; whether it was published there.

    The collector leaves the registry with its last cache.
    """
    registry = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            return False
        removed = collector.remove(cache)
        if not collector._views:
            registry.unregister(collector)
            del _COLLECTORS[registry]
        return removed
