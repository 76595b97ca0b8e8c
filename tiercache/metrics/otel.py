"""OpenTelemetry metrics for TieredCache (needs ``opentelemetry-api``: the ``otel`` extra).

::

    from tiercache.metrics import otel

    otel.instrument(cache)                 # the global MeterProvider's meter "tiercache"
    otel.instrument(cache, meter=meter)    # or a meter of your own

The figures are the ones of :data:`tiercache.metrics.FAMILIES`, named ``tiercache.<name>``:
counters and gauges are *observable* instruments whose callbacks read ``cache.stats()`` when the
SDK collects (nothing is done between collections); the two durations (invalidation lag, load
time) are histograms (in seconds, with tiercache's bucket bounds as advice), fed at each
collection with the samples the cache measured since the previous one. Attributes:
``namespace``, ``process`` (the pid unless ``process=`` says otherwise), and ``tier``, ``op``,
``quantile`` or ``stat`` where a family has one. Without an SDK configured, the API's no-op meter
makes all of this free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tiercache.metrics.otel needs opentelemetry-api: pip install 'tiercache[otel]'"
    ) from err

from .. import __version__
from . import FAMILIES, LAG_BUCKETS, LOAD_BUCKETS, CacheMetrics, Snapshot, drain, metrics_of

__all__ = ["Instrumentation", "instrument", "name_of"]

_HISTOGRAM_NAMES = {
    "invalidation_lag_seconds": "invalidation_lag",
    "load_duration_seconds": "load_duration",
}


def name_of(family: str) -> str:
    """The OpenTelemetry instrument name of a family: ``tiercache.<name>`` (no ``_seconds``)."""
    base = _HISTOGRAM_NAMES.get(family, family)
    if base.endswith("_seconds"):
        base = base[: -len("_seconds")]
    return f"tiercache.{base}"


def _histogram(meter: Any, name: str, unit: str, help_text: str, family: str) -> Any:
    """A histogram with tiercache's bucket bounds as advice (API >= 1.23), else the default."""
    bounds = LAG_BUCKETS if family == "invalidation_lag_seconds" else LOAD_BUCKETS
    try:
        return meter.create_histogram(
            name,
            unit=unit,
            description=help_text,
            explicit_bucket_boundaries_advisory=list(bounds),
        )
    except TypeError:  # an older API without bucket advice
        return meter.create_histogram(name, unit=unit, description=help_text)


class _MeterState:
    """The instruments made on one meter, and the caches whose figures they report."""

    def __init__(self, meter: Any) -> None:
        self.meter = meter
        self.lock = threading.Lock()
        self.views: dict[int, CacheMetrics] = {}
        self._snapshots: dict[int, Snapshot] = {}
        self._taken = -1e9  # time.monotonic() of the snapshots
        self._histograms: dict[str, Any] = {}
        self._seen: dict[tuple[int, str], int] = {}
        for f in FAMILIES:
            name = name_of(f.name)
            if f.kind == "histogram":
                self._histograms[f.name] = _histogram(meter, name, f.unit, f.help, f.name)
                continue
            create = (
                meter.create_observable_counter
                if f.kind == "counter"
                else meter.create_observable_gauge
            )
            create(name, callbacks=[self._callback(f.name)], unit=f.unit, description=f.help)

    def _callback(self, family: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self._observe(family)

        return observe

    def _fresh_snapshots(self) -> dict[int, Snapshot]:
        """One snapshot per cache per collection (the first callback of a round takes them)."""
        with self.lock:
            views = [v for v in self.views.values() if v.alive]
        snaps = {}
        for view in views:
            snap = view.snapshot()
            if snap is not None:
                snaps[id(view)] = snap
                self._record_histograms(view, snap)
        return snaps

    def _observe(self, family: str) -> list[Observation]:
        # Callbacks run in FAMILIES order within a collection: the first family starts a round
        # (and a round older than a second is retaken, should that family not be collected).
        now = time.monotonic()
        if family == FAMILIES[0].name or now - self._taken > 1.0:
            self._snapshots = self._fresh_snapshots()
            self._taken = now
        out = []
        for snap in self._snapshots.values():
            for s in snap.samples:
                if s.family == family:
                    out.append(Observation(s.value, dict(s.labels)))
        return out

    def _record_histograms(self, view: CacheMetrics, snap: Snapshot) -> None:
        """Record into the histograms the durations the cache measured since the last round."""
        for h in snap.histograms:
            instrument = self._histograms.get(h.family)
            if instrument is None:
                continue
            key = (id(view), h.family)
            new, self._seen[key] = drain(view.window(h.family), self._seen.get(key, 0))
            labels = dict(h.labels)
            for ms in new:
                instrument.record(ms / 1000.0, labels)


class Instrumentation:
    """What :func:`instrument` returns: ``uninstrument()`` stops reporting the cache."""

    def __init__(self, state: _MeterState, view: CacheMetrics) -> None:
        self._state = state
        self._view = view

    @property
    def meter(self) -> Any:
        """The meter the instruments were made on."""
        return self._state.meter

    def uninstrument(self) -> None:
        """Stop reporting this cache (the instruments stay, for the meter's other caches)."""
        with self._state.lock:
            for key, view in list(self._state.views.items()):
                if view is self._view:
                    del self._state.views[key]


_STATES: dict[int, _MeterState] = {}
_STATES_LOCK = threading.Lock()


def instrument(cache: Any, meter: Any = None, *, process: str | None = None) -> Instrumentation:
    """Report ``cache``'s metrics through OpenTelemetry instruments on ``meter``.

    ``meter`` defaults to ``opentelemetry.metrics.get_meter("tiercache")`` (the global provider).
    The instruments are made once per meter and report every cache instrumented on it.
    """
    if meter is None:
        meter = otel_metrics.get_meter("tiercache", __version__)
    with _STATES_LOCK:
        state = _STATES.get(id(meter))
        if state is None or state.meter is not meter:
            state = _STATES[id(meter)] = _MeterState(meter)
    view = metrics_of(cache, process)
    with state.lock:
        state.views[id(cache)] = view
    return Instrumentation(state, view)
