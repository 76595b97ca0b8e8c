"""``python -m tiercache demo``: several processes share a key space through their own TieredCache.

The parent starts a private Redis (the embedded server) and ``workers`` processes. Each reads keys
drawn from a Zipf law and writes a few percent of the time, through its own TieredCache; one key
("probe") is rewritten by the parent every 20 ms with the time of the write, and every worker polls
it to measure how long a write takes to show in another process. Every read and acknowledged
write is logged; at the end the parent checks the history: no worker ever reads a value older
than one it has already read (monotonic reads) or than its own last write (read-your-writes),
and no read is older than a write acknowledged more than ``bound`` seconds before it started.
"""

from __future__ import annotations

import bisect
import itertools
import multiprocessing as mp
import queue
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .server import RedisServer

NAMESPACE = "demo"
PROBE = "probe"
REPORT_EVERY = 0.5


@dataclass
class WorkerReport:
    """What a worker sends home: a snapshot of its stats, or its final history."""

    worker: int
    stats: dict[str, Any]
    ops: int
    lags_ms: list[float] = field(default_factory=list)
    history: list[tuple[str, str, int, int, int, int]] | None = None  # (op, key, ver, t0, t1, w)


def _zipf_sampler(n_keys: int, s: float, rng: random.Random) -> Callable[[], int]:
    cumulative = list(itertools.accumulate(1.0 / r**s for r in range(1, n_keys + 1)))
    total = cumulative[-1]
    return lambda: bisect.bisect_left(cumulative, rng.random() * total)


def worker_main(
    worker: int, url: str, seconds: float, keys: int, write_ratio: float, out: Any
) -> None:
    """One process: read and write through its own TieredCache, report, then send its history."""
    from .tiered import TieredCache

    rng = random.Random(worker)
    pick = _zipf_sampler(keys, 1.0, rng)
    history: list[tuple[str, str, int, int, int, int]] = []
    lags: list[float] = []
    seq = itertools.count(1)
    with TieredCache(
        url, namespace=NAMESPACE, local_ttl=30.0, health_interval=0.2, health_timeout=0.5
    ) as cache:
        cache.wait_ready(5.0)
        deadline = time.monotonic() + seconds
        next_report = time.monotonic() + REPORT_EVERY
        last_probe = 0
        ops = 0
        while time.monotonic() < deadline:
            key = f"k{pick()}"
            t0 = time.time_ns()
            if rng.random() < write_ratio:
                version = worker * 10**9 + next(seq)  # unique per write, ordered per worker
                cache[key] = version
                history.append(("w", key, version, t0, time.time_ns(), worker))
            else:
                value = cache.get(key, 0)
                history.append(("r", key, value, t0, time.time_ns(), worker))
            ops += 1
            probe = cache.get(PROBE, 0)
            if probe != last_probe:
                if last_probe:
                    lags.append((time.time_ns() - probe) / 1e6)
                last_probe = probe
            if time.monotonic() >= next_report:
                out.put(WorkerReport(worker, cache.stats(), ops, lags))
                lags = []
                next_report += REPORT_EVERY
        out.put(WorkerReport(worker, cache.stats(), ops, lags, history))


def check_history(history: list[tuple[str, str, int, int, int, int]], bound_s: float) -> list[str]:
    """Violations of monotonic reads, read-your-writes and bounded staleness (empty: none).

    Writes of one key are ordered only when one was acknowledged before the other started;
    concurrent writes may land in either order, and reading either is fine.
    """
    problems: list[str] = []
    span: dict[tuple[str, int], tuple[int, int]] = {}  # (key, value) -> (write start, ack)
    settled: dict[str, list[tuple[int, int]]] = {}  # key -> [(ack, start)] sorted by ack
    for op, key, value, t0, t1, _ in history:
        if op == "w":
            span[(key, value)] = (t0, t1)
            settled.setdefault(key, []).append((t1, t0))
    latest_start: dict[str, tuple[list[int], list[int]]] = {}
    for key, acks in settled.items():
        acks.sort()
        starts = list(itertools.accumulate((t0 for _, t0 in acks), max))
        latest_start[key] = ([t1 for t1, _ in acks], starts)
    never = (-1, -1)  # the initial "no value" precedes every write
    seen: dict[tuple[int, str], tuple[int, int]] = {}
    bound_ns = int(bound_s * 1e9)
    for op, key, value, t0, _, worker in sorted(history, key=lambda h: h[3]):
        this = span.get((key, value), never)
        prev = seen.get((worker, key), never)
        if this[1] < prev[0]:  # what was read was overwritten before what was seen began
            kind = "read-your-writes" if op == "r" and prev != never else "monotonic reads"
            problems.append(f"worker {worker} {kind}: {key} went back")
        if op == "r":
            acks, starts = latest_start.get(key, ([], []))
            i = bisect.bisect_left(acks, t0 - bound_ns)
            if i and this[1] < starts[i - 1]:
                problems.append(f"worker {worker} read {key} older than a write settled earlier")
        if this[1] >= prev[1]:
            seen[(worker, key)] = this
    return problems


def run_demo(
    workers: int = 4,
    seconds: float = 6.0,
    keys: int = 2_000,
    write_ratio: float = 0.03,
    out: Callable[[str], None] = print,
) -> bool:
    """Run the multi-process demo; print live figures and the verdict; whether it was consistent."""
    from .tiered import TieredCache

    ctx = mp.get_context("spawn")
    with RedisServer() as server:
        out(f"tiercache demo: {workers} processes, Redis {server.version} at {server.url}")
        out(f"Zipf(1.0) over {keys:,} keys, {write_ratio:.0%} writes, {seconds:.0f} s\n")
        reports: Any = ctx.Queue()
        procs = [
            ctx.Process(
                target=worker_main,
                args=(w, server.url, seconds, keys, write_ratio, reports),
                daemon=True,
            )
            for w in range(workers)
        ]
        for p in procs:
            p.start()
        latest: dict[int, WorkerReport] = {}
        lags: list[float] = []
        histories: list[tuple[str, str, int, int, int, int]] = []
        finished = 0
        deadline = time.monotonic() + seconds + 60
        with TieredCache(server.url, namespace=NAMESPACE) as probe_writer:
            next_probe = time.monotonic()
            next_line = time.monotonic() + 1.0
            out(
                f"{'t':>5} {'ops/s':>8} {'local':>7} {'redis':>7} {'miss':>7} {'inval':>7} "
                f"{'lag p50':>8} {'lag p99':>8}"
            )
            while finished < workers and time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_probe:
                    probe_writer[PROBE] = time.time_ns()
                    next_probe = now + 0.02
                try:
                    report = reports.get(timeout=0.01)
                except queue.Empty:
                    report = None
                if report is not None:
                    lags.extend(report.lags_ms)
                    latest[report.worker] = report
                    if report.history is not None:
                        histories.extend(report.history)
                        finished += 1
                if now >= next_line and latest:
                    out(_status_line(now - (deadline - seconds - 60), latest, lags))
                    next_line = now + 1.0
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        problems = check_history(histories, bound_s=1.0)
        out("")
        out(_status_line(seconds, latest, lags, final=True))
        if problems:
            out(f"\nconsistency: {len(problems)} violations, e.g. {problems[:3]}")
        else:
            out(
                f"\nconsistency: OK ({len(histories):,} operations checked: monotonic reads, "
                "read-your-writes, no read older than a write acknowledged 1 s before)"
            )
        return not problems and finished == workers


def _status_line(
    t: float, latest: dict[int, WorkerReport], lags: list[float], final: bool = False
) -> str:
    stats = [r.stats for r in latest.values()]
    local = sum(s["local_hits"] for s in stats)
    remote = sum(s["remote_hits"] for s in stats)
    miss = sum(s["misses"] for s in stats)
    reads = max(1, local + remote + miss)
    ops = sum(r.ops for r in latest.values())
    inval = sum(s["invalidations_received"] for s in stats)
    window = sorted(lags[-2000:]) or [0.0]
    p50 = statistics.median(window)
    p99 = window[min(len(window) - 1, int(len(window) * 0.99))]
    label = "total" if final else f"{t:4.1f}s"
    rate = f"{ops / max(t, 1e-9):8.0f}" if t else f"{0:8d}"
    return (
        f"{label:>5} {rate} {local / reads:7.1%} {remote / reads:7.1%} {miss / reads:7.1%} "
        f"{inval:7d} {p50:6.2f}ms {p99:6.2f}ms"
    )
