"""Shared measurement helpers for the benchmark modules.

Timing method (as research/peer-performance.md): one benchmark round is a tight loop over a list of
keys, repeated ``INNER`` times; ``benchmark.pedantic`` runs ``ROUNDS`` rounds after ``WARMUP``
warm-up rounds, and ns/op = round time / ops per round. The statement under test is compiled into
the loop body (as ``timeit`` does), with the cache and keys as fast locals, so every variant pays
the same loop and the empty loop (``pass``) measures that overhead for the net figures.

Knobs (environment): ``BENCH_ROUNDS`` (default 40), ``BENCH_INNER`` (default 10, the passes
per round; a variant whose pass takes over 1 ms gets fewer, so a round stays near 10 ms),
``BENCH_QUICK=1`` (5 rounds, inner 2, hit ratio on a 200k prefix: a smoke run, not for figures).
"""

from __future__ import annotations

import gc
import os
import textwrap
import time
from collections.abc import Callable
from typing import Any

import report

QUICK = bool(os.environ.get("BENCH_QUICK"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 5 if QUICK else 40))
INNER = int(os.environ.get("BENCH_INNER", 2 if QUICK else 10))
WARMUP = 3
ROUND_TARGET_S = 0.01  # slow variants get fewer passes per round, down to one pass


def tiercache_or_none() -> Any:
    """The tiercache package, or None when it is not importable yet (its rows are then skipped)."""
    try:
        import tiercache
        from tiercache import LocalCache  # noqa: F401
    except Exception:
        return None
    return tiercache


def make_local(tc: Any, maxsize: int, policy: str, **kw: Any) -> Any:
    """A LocalCache with ``seed=0`` when the constructor takes one."""
    try:
        return tc.LocalCache(maxsize, policy=policy, seed=0, **kw)
    except TypeError:
        return tc.LocalCache(maxsize, policy=policy, **kw)


_LOOP_SRC = """\
def run(c, keys, inner):
    for _ in range(inner):
        for k in keys:
{body}
"""


def compile_loop(stmt: str, env: dict[str, Any] | None = None) -> Callable[..., None]:
    """``run(c, keys, inner)``: ``for k in keys: <stmt>`` repeated ``inner`` times."""
    src = _LOOP_SRC.format(body=textwrap.indent(textwrap.dedent(stmt).strip(), " " * 12))
    ns: dict[str, Any] = dict(env or {})
    exec(compile(src, f"<bench loop: {stmt.strip()!r}>", "exec"), ns)
    return ns["run"]


def run_loop(
    benchmark: Any,
    group: str,
    name: str,
    stmt: str,
    obj: Any,
    keys: list[Any],
    *,
    inner: int | None = None,
    rounds: int | None = None,
    note: str = "",
) -> None:
    """Time ``stmt`` over ``keys`` (``c`` is ``obj``, ``k`` the key) and record it in the report.

    Paired reference: right before every round (in pedantic's untimed ``setup``) a dict ``d[k]``
    loop and an empty loop over the same keys are timed, each run for about as long as one round
    of the variant. The ratio columns of the report are (min over the variant's rounds) / (min over
    its reference timings), per op. Why: this shared 2-core machine flips between a fast and a
    ~2x slower state every few milliseconds when the other core is busy; the fastest of many
    short samples is the clean one, and a reference sampled as often, as long and at the same
    moments as the variant has the same chance of being caught clean. A ratio of medians taken
    seconds apart moved by 10-20% between runs here.
    """
    rounds = ROUNDS if rounds is None else rounds
    fn = compile_loop(stmt)
    ref_dict, ref_loop = compile_loop("c[k]"), compile_loop("pass")
    ref = {k: k for k in keys}
    clock = time.perf_counter

    def one_pass(f: Callable[..., None], o: Any) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = clock()
            f(o, keys, 1)
            best = min(best, clock() - t0)
        return best

    var_pass = one_pass(fn, obj)  # calibration (and warm-up) passes
    if inner is None:
        inner = max(1, min(INNER, round(ROUND_TARGET_S / max(var_pass, 1e-9))))
    round_s = inner * var_pass
    inner_dict = max(1, round(round_s / one_pass(ref_dict, ref)))
    inner_loop = max(1, round(round_s / one_pass(ref_loop, None)))
    refs: list[tuple[float, float]] = []  # (empty loop, dict d[k]) seconds per round
    args = (obj, keys, inner)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        t0 = clock()
        ref_loop(None, keys, inner_loop)
        t1 = clock()
        ref_dict(ref, keys, inner_dict)
        t2 = clock()
        refs.append((t1 - t0, t2 - t1))
        return args, {}

    benchmark.group = group
    benchmark.extra_info["ops_per_round"] = inner * len(keys)
    gc.collect()
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=WARMUP)
    st = getattr(benchmark, "stats", None)
    if st is None:  # --benchmark-disable: ran once, nothing to report
        return
    s = st.stats
    refs = refs[WARMUP:]  # the warm-up rounds called setup too
    n = len(keys)
    ops = inner * n
    var_op = s.min / ops
    loop_op = min(lp for lp, _ in refs) / (inner_loop * n)
    dict_op = min(d for _, d in refs) / (inner_dict * n)
    report.record_timing(
        report.TimingRow(
            group=group,
            name=name,
            ops=ops,
            median_s=s.median,
            min_s=s.min,
            rounds=s.rounds,
            note=note,
            vs_dict=var_op / dict_op,
            vs_dict_net=(var_op - loop_op) / (dict_op - loop_op) if dict_op > loop_op else None,
            loop_vs_dict=loop_op / dict_op,
            ref_dict_ns=dict_op * 1e9,
        )
    )


class Variant:
    """One row of a timing group: ``make(tc)`` builds the object (``tc`` is the tiercache package
    for ``ours`` rows, else None); ``stmt`` is the loop body (``c`` the object, ``k`` the key)."""

    def __init__(
        self,
        name: str,
        stmt: str,
        make: Callable[[Any], Any],
        *,
        ours: bool = False,
        note: str = "",
        close: Callable[[Any], None] | None = None,
    ) -> None:
        self.name, self.stmt, self.make, self.ours, self.note = name, stmt, make, ours, note
        self.close = close

    def __repr__(self) -> str:  # the pytest id
        return self.name


def run_variant(benchmark: Any, group: str, v: Variant, keys: list[Any]) -> None:
    """Build ``v`` and time it; skip (noted in the report) when its library is missing."""
    import pytest

    tc = None
    if v.ours:
        tc = tiercache_or_none()
        if tc is None:
            report.skipped(group, f"{v.name} (tiercache not importable)")
            pytest.skip("tiercache is not importable yet")
    try:
        obj = v.make(tc)
    except ImportError as exc:
        report.skipped(group, f"{v.name} ({exc})")
        pytest.skip(str(exc))
    try:
        run_loop(benchmark, group, v.name, v.stmt, obj, keys, note=v.note)
    finally:
        if v.close is not None:
            v.close(obj)


def theine_cache(size: int, *, nolock: bool = False) -> Any:
    from theine import Cache

    return Cache(size, nolock=nolock)


def close_theine(c: Any) -> None:
    """Stop the cache's once-a-second maintenance task (it would keep the cache alive)."""
    c.close()
