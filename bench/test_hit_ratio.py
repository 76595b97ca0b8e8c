"""Hit ratio of each policy on the traces of ``traces.py``, with Belady's MIN as the ceiling.

Not a timing benchmark: each (trace, size, policy) runs once (``benchmark.pedantic(rounds=1)``, so
the simulation time is recorded too, as sim ns/request). Simulation, for every cache alike:
``v = c.get(k); if v is None: miss; c[k] = k`` (theine: ``get`` returns ``(value, ok)``, ``set``).

theine's W-TinyLFU samples its read buffer with ``random.getrandbits``, so its hit ratio varies a
little from run to run; it is run ``BENCH_THEINE_REPEATS`` times (default 3) with
``random.seed(0..n-1)`` and the median is compared. Ours runs with ``seed=0``.

SPEC 6: ``tinylfu`` hit ratio >= theine's W-TinyLFU on every trace (and at every size here).

Size of the run: the full traces (1,000,000 requests) with the Cython build. With the pure-Python
twin (~10x slower) every policy runs on the first 250,000 requests instead, said in the tables;
``BENCH_HR_REQUESTS`` overrides the count either way.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import harness
import pytest
import report
import traces

BENCH_ORDER = 90
SECTION = "hit-ratio"
SIZES = (1_000, 10_000)
TRACES = tuple(traces.TRACE_SPECS)
THEINE_REPEATS = int(os.environ.get("BENCH_THEINE_REPEATS", 3))
PURE_REQUESTS = 250_000

OURS = {"lru": "tiercache lru", "lfu": "tiercache lfu", "tinylfu": "tiercache tinylfu"}
CB_LRU, CB_LFU = "LRU (cachebox)", "LFU (cachebox)"
THEINE = "W-TinyLFU (theine)"
BELADY = "Belady MIN (offline optimum)"
POLICIES = (*OURS.values(), CB_LRU, CB_LFU, THEINE, BELADY)


def n_requests() -> tuple[int, str]:
    """(requests per trace, why) for this run."""
    if os.environ.get("BENCH_HR_REQUESTS"):
        return int(os.environ["BENCH_HR_REQUESTS"]), "BENCH_HR_REQUESTS"
    if harness.QUICK:
        return 200_000, "BENCH_QUICK"
    tc = harness.tiercache_or_none()
    if tc is not None and not getattr(tc, "EXTENSIONS", False):
        return PURE_REQUESTS, "pure-Python twin measured (about 10x slower than the Cython build)"
    return traces.N_REQUESTS, ""


@dataclass
class HitRow:
    trace: str
    size: int
    policy: str
    n: int
    n_zipf: int
    misses: int
    scan_misses: int
    sim_s: float
    spread: list[float] = field(default_factory=list)  # hit % of each repeat (theine)
    note: str = ""

    @property
    def hit_pct(self) -> float:
        return 100.0 * (self.n - self.misses) / self.n

    @property
    def zipf_hit_pct(self) -> float:
        zipf_misses = self.misses - self.scan_misses
        return 100.0 * (self.n_zipf - zipf_misses) / self.n_zipf if self.n_zipf else 0.0


def sim_mapping(c, keys: list[int], scan_base: int) -> tuple[int, int]:
    misses = scan_misses = 0
    get = c.get
    for k in keys:
        v = get(k)
        if v is None:
            misses += 1
            if k >= scan_base:
                scan_misses += 1
            c[k] = k
    return misses, scan_misses


def sim_theine(c, keys: list[int], scan_base: int) -> tuple[int, int]:
    misses = scan_misses = 0
    get, put = c.get, c.set
    for k in keys:
        if not get(k)[1]:
            misses += 1
            if k >= scan_base:
                scan_misses += 1
            put(k, k)
    return misses, scan_misses


# --- report section ------------------------------------------------------------------------------


def _cell(row: HitRow | None, scan: bool) -> str:
    if row is None:
        return "n/a"
    text = f"{row.hit_pct:.2f}"
    if scan:
        text += f" / {row.zipf_hit_pct:.2f}"
    if len(row.spread) > 1:
        text += f" ({min(row.spread):.2f}..{max(row.spread):.2f}, n={len(row.spread)})"
    return text


def render(rows: list[HitRow]) -> list[str]:
    by = {(r.trace, r.size, r.policy): r for r in rows}
    n_req = rows[0].n
    reduced = n_req < traces.N_REQUESTS
    lines: list[str] = []
    checks: list[str] = []
    for name in TRACES:
        trows = [r for r in rows if r.trace == name]
        if not trows:
            continue
        scan = "scan" in name
        title = (
            f"### Hit ratio: {traces.TRACE_SPECS[name]}, {n_req:,} requests, "
            f"{traces.N_KEYS:,} Zipf keys — hit %"
        )
        if scan:
            title += " (all requests / Zipf-only requests)"
        if reduced:
            title += f" — REDUCED: first {n_req:,} of {traces.N_REQUESTS:,} requests"
        lines += [title, ""]
        head = ["policy", *[f"size {s:,} ({100 * s // traces.N_KEYS}%)" for s in SIZES]]
        head.append("sim ns/req (" + " / ".join(f"{s:,}" for s in SIZES) + ")")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * (len(head) - 1))
        for policy in POLICIES:
            cells = [by.get((name, s, policy)) for s in SIZES]
            if not any(cells):
                continue
            sims = " / ".join(f"{c.sim_s / c.n * 1e9:,.0f}" if c else "n/a" for c in cells)
            label = policy
            if policy == THEINE and THEINE_REPEATS > 1:
                label += f" (median of {THEINE_REPEATS} seeds)"
            lines.append("| " + " | ".join([label, *[_cell(c, scan) for c in cells], sims]) + " |")
        # tinylfu vs theine and vs the ceiling
        delta_cells, opt_cells = [], []
        for s in SIZES:
            ours, theirs = by.get((name, s, OURS["tinylfu"])), by.get((name, s, THEINE))
            opt = by.get((name, s, BELADY))
            if ours and theirs:
                d = ours.hit_pct - theirs.hit_pct
                ok = d >= 0
                txt = f"{report.mark(ok)} {d:+.2f} pp"
                if scan:
                    txt += f" / {ours.zipf_hit_pct - theirs.zipf_hit_pct:+.2f} pp"
                delta_cells.append(txt)
                checks.append(f"{report.mark(ok)} {name} @ {s:,}: {d:+.2f} pp")
            else:
                delta_cells.append("n/a")
            opt_cells.append(
                f"{100 * ours.hit_pct / opt.hit_pct:.1f}% of MIN" if ours and opt else "n/a"
            )
        lines.append("| **tinylfu - theine (SPEC 6: ≥ 0)** | " + " | ".join(delta_cells) + " | |")
        lines.append("| tinylfu / Belady MIN | " + " | ".join(opt_cells) + " | |")
        lines.append("")
        # exact-LRU cross-check: ours lru and cachebox LRU must agree to the request
        for s in SIZES:
            a, b = by.get((name, s, OURS["lru"])), by.get((name, s, CB_LRU))
            if a and b and a.misses != b.misses:
                lines.append(
                    f"Cross-check ✗: tiercache lru misses {a.misses:,} ≠ cachebox LRU "
                    f"{b.misses:,} at size {s:,} (both are exact LRU)."
                )
        notes = sorted({r.note for r in trows if r.note})
        lines += [f"Note: {n}" for n in notes]
        if lines[-1] != "":
            lines.append("")
    if checks:
        ok = all(c.startswith(report.PASS) for c in checks)
        lines.append(
            f"SPEC 6 hit ratio (tinylfu ≥ theine on every trace and size): {report.mark(ok)} — "
            + "; ".join(checks)
        )
        lines.append("")
    if reduced:
        lines.append(
            f"Hit ratios above are on the first {n_req:,} requests of each trace (cold start "
            "weighs more than in the full trace), for every policy alike."
        )
        lines.append("")
    return lines


report.register_section(SECTION, order=50, title="hit ratio", render=render)


# --- the tests ------------------------------------------------------------------------------------


def _run(benchmark, fn):
    """Run ``fn`` once under pytest-benchmark (so the simulation time shows up there too)."""
    benchmark.group = SECTION
    t0 = time.perf_counter()
    out = benchmark.pedantic(fn, rounds=1, iterations=1)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("trace_name", TRACES)
def test_hit_ratio(benchmark, trace_name: str, size: int, policy: str) -> None:
    n, why = n_requests()
    trace = traces.get_trace(trace_name, n)
    spread: list[float] = []
    note = ""
    if policy == BELADY:
        (misses, scan_misses), sim_s = _run(benchmark, lambda: traces.belady_misses(trace, size))
    elif policy == THEINE:
        results = []
        sim_s = 0.0
        for seed in range(max(1, THEINE_REPEATS)):
            random.seed(seed)  # theine's read buffer samples with random.getrandbits
            c = harness.theine_cache(size, nolock=True)
            try:
                if seed == 0:
                    res, dt = _run(
                        benchmark, lambda c=c: sim_theine(c, trace.keys, traces.SCAN_BASE)
                    )
                else:
                    t0 = time.perf_counter()
                    res = sim_theine(c, trace.keys, traces.SCAN_BASE)
                    dt = time.perf_counter() - t0
            finally:
                harness.close_theine(c)
            sim_s += dt
            results.append(res)
            spread.append(100.0 * (trace.n - res[0]) / trace.n)
        sim_s /= len(results)
        results.sort()
        misses, scan_misses = results[len(results) // 2]  # median by misses
    elif policy in (CB_LRU, CB_LFU):
        cachebox = pytest.importorskip("cachebox")
        c = (cachebox.LRUCache if policy == CB_LRU else cachebox.LFUCache)(size)
        (misses, scan_misses), sim_s = _run(
            benchmark, lambda: sim_mapping(c, trace.keys, traces.SCAN_BASE)
        )
    else:
        tc = harness.tiercache_or_none()
        if tc is None:
            report.skipped(SECTION, f"{policy} (tiercache not importable)")
            pytest.skip("tiercache is not importable yet")
        kind = next(k for k, v in OURS.items() if v == policy)
        c = harness.make_local(tc, size, kind)
        (misses, scan_misses), sim_s = _run(
            benchmark, lambda: sim_mapping(c, trace.keys, traces.SCAN_BASE)
        )
        st = c.stats() if hasattr(c, "stats") else {}
        if st and (st.get("misses"), st.get("hits")) != (misses, trace.n - misses):
            note = (
                f"{policy} stats() disagree with the simulation at size {size:,}: "
                f"hits={st.get('hits')}, misses={st.get('misses')} vs counted "
                f"{trace.n - misses}/{misses}"
            )
    if why and n != traces.N_REQUESTS:
        report.note(f"hit ratio run on the first {n:,} requests of each trace ({why})")
    report.record(
        SECTION,
        HitRow(
            trace=trace_name,
            size=size,
            policy=policy,
            n=trace.n,
            n_zipf=trace.n_zipf,
            misses=misses,
            scan_misses=scan_misses,
            sim_s=sim_s,
            spread=spread,
            note=note,
        ),
    )
