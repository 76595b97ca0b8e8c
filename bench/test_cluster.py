"""TieredCache on one Redis node vs a 3-master Redis Cluster (issue 8).

- Mixed-workload throughput: 4 OS processes (spawn), each with its own TieredCache, run 80% reads
  and 20% writes over 20,000 keys with a 1,000-entry local tier (so most reads reach Redis) for
  ``SECONDS`` seconds; the figure is the sum of operations per second.
- Invalidation latency: a writer instance and a reader instance (own listeners) in one process;
  the reader's ``on_invalidate`` hook timestamps each applied invalidation; latency = hook time -
  time before the write call. Paced writes, p50/p99 over ``N_INV`` writes.

Both configurations run back to back in one session on the same machine; no timing assertions.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import report

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/cluster.py builds the cluster
    sys.path.insert(0, str(ROOT))

BENCH_ORDER = 35
SECTION = "cluster"
QUICK = bool(os.environ.get("BENCH_QUICK"))
SECONDS = 2.0 if QUICK else 6.0
PROCS = 4
N_KEYS = 20_000
N_INV = 100 if QUICK else 500
CTX = mp.get_context("spawn")
OPTIONS: dict[str, Any] = {"local_maxsize": 1000, "socket_timeout": 2.0, "startup_timeout": 10.0}


def _worker(url: str, namespace: str, seed: int, go: Any, seconds: float, q: Any) -> None:
    """One process of the mixed workload: reports ready, waits for ``go``, counts operations."""
    from tiercache import TieredCache

    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(N_KEYS)]
    with TieredCache(url, namespace=namespace, **OPTIONS) as cache:
        cache.wait_ready(10.0)
        q.put(("ready", seed))
        if not go.wait(120.0):
            return
        end = time.monotonic() + seconds
        ops = errors = 0
        while time.monotonic() < end:
            for _ in range(100):
                k = keys[rng.randrange(N_KEYS)]
                try:
                    if rng.random() < 0.2:
                        cache[k] = ops
                    else:
                        cache.get(k)
                except Exception:
                    errors += 1
                ops += 1
        q.put(("done", (ops, errors)))


def _throughput(url: str, label: str) -> dict[str, Any]:
    namespace = f"bench{os.getpid()}{len(label)}"
    q, go = CTX.Queue(), CTX.Event()
    procs = [
        CTX.Process(target=_worker, args=(url, namespace, i, go, SECONDS, q)) for i in range(PROCS)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # every process imported, connected and subscribed
            assert q.get(timeout=120)[0] == "ready"
        go.set()
        results = [q.get(timeout=SECONDS + 60)[1] for _ in procs]
    finally:
        go.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    ops = sum(r[0] for r in results)
    return {
        "kind": "tp",
        "name": label,
        "ops_s": ops / SECONDS,
        "errors": sum(r[1] for r in results),
    }


def _latency(url: str, label: str) -> dict[str, Any]:
    from tiercache import TieredCache

    namespace = f"binv{os.getpid()}{len(label)}"
    arrived: dict[str, int] = {}
    event = threading.Event()

    def hook(key: Any, version: int) -> None:
        arrived[key] = time.perf_counter_ns()
        event.set()

    lat: list[float] = []
    with (
        TieredCache(url, namespace=namespace, **OPTIONS) as writer,
        TieredCache(url, namespace=namespace, on_invalidate=hook, **OPTIONS) as reader,
    ):
        writer.wait_ready(10.0)
        reader.wait_ready(10.0)
        for i in range(N_INV + 20):
            key = f"k{i % 64}"
            event.clear()
            arrived.pop(key, None)
            t0 = time.perf_counter_ns()
            writer[key] = i
            if not event.wait(2.0):
                continue
            if i >= 20:  # warm-up writes load the scripts and fill the pools
                lat.append((arrived[key] - t0) / 1e6)
            time.sleep(0.002)
    lat.sort()
    return {
        "kind": "lat",
        "name": label,
        "p50": lat[len(lat) // 2] if lat else None,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "n": len(lat),
    }


def _render(rows: list[dict[str, Any]]) -> list[str]:
    tp = {r["name"]: r for r in rows if r["kind"] == "tp"}
    lat = {r["name"]: r for r in rows if r["kind"] == "lat"}
    out = [
        f"Mixed workload (80% get / 20% set, {N_KEYS} keys, local tier 1,000), {PROCS} processes, "
        f"{SECONDS:.0f} s; invalidation latency write -> other instance applied, {N_INV} writes.",
        "",
        "| setup | ops/s (sum of 4 processes) | errors | invalidation p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("1 node", "3-master cluster"):
        t, la = tp.get(name, {}), lat.get(name, {})
        out.append(
            f"| {name} | {t.get('ops_s', 0):,.0f} | {t.get('errors', '-')} | "
            f"{_f(la.get('p50'))} | {_f(la.get('p99'))} |"
        )
    if "1 node" in tp and "3-master cluster" in tp:
        ratio = tp["3-master cluster"]["ops_s"] / max(tp["1 node"]["ops_s"], 1.0)
        out += ["", f"Cluster / single-node throughput: {ratio:.2f} x (all on one 2-core host)."]
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


report.register_section(
    SECTION, order=35, title="Redis Cluster vs one node (issue 8)", render=_render
)


@pytest.fixture(scope="module")
def backends() -> Any:
    from tests.cluster import ClusterSet
    from tiercache.server import RedisServer

    single = RedisServer(bloom=False, die_with_parent=True).start()
    cluster = ClusterSet(3, 0)
    try:
        cluster.start()
        yield {"1 node": single.url, "3-master cluster": cluster.url}
    finally:
        cluster.stop()
        single.stop()


@pytest.mark.parametrize("name", ["1 node", "3-master cluster"])
def test_cluster_throughput(backends: dict[str, str], name: str) -> None:
    """Mixed-workload throughput from 4 processes."""
    report.record(SECTION, _throughput(backends[name], name))


@pytest.mark.parametrize("name", ["1 node", "3-master cluster"])
def test_cluster_invalidation_latency(backends: dict[str, str], name: str) -> None:
    """Write -> other instance's invalidation applied."""
    report.record(SECTION, _latency(backends[name], name))
