"""Synthetic request traces for the hit-ratio benchmarks, and Belady's MIN as their ceiling.

Every trace is deterministic (fixed seeds) and built once per process (``get_trace`` memoizes).

- ``zipf-0.9`` / ``zipf-1.1``: 1,000,000 requests over 100,000 keys, bounded Zipf over ranks
  1..100,000 (p(r) ~ r**-s) sampled by inverse CDF; rank r is mapped to an int key through a fixed
  random permutation, so a key's value says nothing about its popularity.
- ``zipf-0.9+scan``: the same Zipf(0.9) stream for 80% of the requests; the other 20% are loop
  scans in bursts: 100 bursts of 2,000 consecutive keys, placed at random points of the Zipf stream,
  each continuing a cyclic walk over 20,000 scan keys (100,000..119,999, disjoint from the Zipf
  keys and larger than every cache size measured, so LRU never hits on them).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

N_REQUESTS = 1_000_000
N_KEYS = 100_000
SCAN_BASE = N_KEYS  # keys >= SCAN_BASE are scan keys; below are Zipf keys
SCAN_FRACTION = 0.2
SCAN_BURST = 2_000
SCAN_RANGE = 20_000


@dataclass(frozen=True)
class Trace:
    name: str
    title: str
    keys: list[int]  # the requests, as a list for fast iteration
    array: np.ndarray  # the same requests as int64
    n_zipf: int  # requests to Zipf keys (< SCAN_BASE)

    @property
    def n(self) -> int:
        return len(self.keys)


def zipf_ranks(s: float, n: int, n_keys: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` 0-based ranks drawn from the Zipf(s) law bounded to ``n_keys`` ranks."""
    weights = np.arange(1, n_keys + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(ranks, n_keys - 1)


def zipf_keys(s: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N_KEYS)  # rank -> key, so key order is unrelated to popularity
    return perm[zipf_ranks(s, n, N_KEYS, rng)].astype(np.int64)


def _make_zipf_scan(seed: int) -> np.ndarray:
    n_scan = int(N_REQUESTS * SCAN_FRACTION)
    n_bursts = n_scan // SCAN_BURST
    base = zipf_keys(0.9, N_REQUESTS - n_scan, seed)
    rng = np.random.default_rng(seed + 1)
    points = np.sort(rng.integers(0, len(base) + 1, size=n_bursts))
    scan = SCAN_BASE + (np.arange(n_scan, dtype=np.int64) % SCAN_RANGE)
    # np.insert keeps the order of values inserted at the same index: each burst stays sequential.
    return np.insert(base, np.repeat(points, SCAN_BURST), scan)


TRACE_SPECS = {
    "zipf-0.9": "Zipf s=0.9",
    "zipf-1.1": "Zipf s=1.1",
    "zipf-0.9+scan": "Zipf s=0.9 + 20% loop scans",
}

_CACHE: dict[tuple[str, int], Trace] = {}


def get_trace(name: str, n_requests: int = N_REQUESTS) -> Trace:
    """The named trace (memoized). ``n_requests`` < full takes a prefix of the full trace."""
    key = (name, n_requests)
    if key in _CACHE:
        return _CACHE[key]
    if n_requests != N_REQUESTS:
        full = get_trace(name)
        arr = full.array[:n_requests]
    elif name == "zipf-0.9":
        arr = zipf_keys(0.9, N_REQUESTS, seed=9)
    elif name == "zipf-1.1":
        arr = zipf_keys(1.1, N_REQUESTS, seed=11)
    elif name == "zipf-0.9+scan":
        arr = _make_zipf_scan(seed=90)
    else:
        raise KeyError(name)
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    trace = Trace(
        name=name,
        title=TRACE_SPECS[name],
        keys=arr.tolist(),
        array=arr,
        n_zipf=int(np.count_nonzero(arr < SCAN_BASE)),
    )
    _CACHE[key] = trace
    return trace


def next_use(arr: np.ndarray) -> np.ndarray:
    """For each request i, the index of the next request to the same key (len(arr) if none)."""
    n = len(arr)
    order = np.argsort(arr, kind="stable")
    sorted_keys = arr[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    nxt = np.full(n, n, dtype=np.int64)
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady_misses(trace: Trace, size: int) -> tuple[int, int]:
    """Belady's MIN (demand paging: every miss is admitted, the victim is the resident key whose
    next use is farthest away). Returns (misses, misses on scan keys)."""
    keys = trace.keys
    nxt = next_use(trace.array).tolist()
    resident: dict[int, int] = {}  # key -> index of its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries are skipped lazily
    push, pop = heapq.heappush, heapq.heappop
    misses = scan_misses = 0
    for i, k in enumerate(keys):
        nu = nxt[i]
        if k in resident:
            resident[k] = nu
            push(heap, (-nu, k))
            continue
        misses += 1
        if k >= SCAN_BASE:
            scan_misses += 1
        if size <= 0:
            continue
        if len(resident) >= size:
            while True:
                neg, victim = pop(heap)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    break
        resident[k] = nu
        push(heap, (-nu, k))
        if len(heap) > 4 * size + 1024:  # compact stale entries now and then
            heap = [(-v, kk) for kk, v in resident.items()]
            heapq.heapify(heap)
    return misses, scan_misses
