"""The benchmark report: a registry every benchmark records into, rendered as Markdown at the end.

Timing groups: a test module calls ``register_group(...)`` once at import time, and each benchmark
calls ``record_timing(...)`` (``conftest.run_loop`` does it) with the ops it ran per round. A group
names its loop-overhead row (net = median - overhead), the rows it is compared against (ratio
columns), and optionally a ``targets`` function that marks rows against SPEC 6 with ✓/✗.

Other kinds of results (hit ratio, later latency percentiles) register a section renderer with
``register_section(order, title, render)``; ``render(rows)`` returns Markdown lines.

``render_report()`` returns the whole Markdown document (conftest prints it and writes
``bench/results.md``).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PASS, FAIL = "✓", "✗"
NOISY = 1.25  # a timing row whose median exceeds its min by this factor is flagged as disturbed


@dataclass
class TimingRow:
    group: str
    name: str
    ops: int  # operations per round
    median_s: float  # per round
    min_s: float
    rounds: int
    note: str = ""
    # paired with a dict d[k] loop and an empty loop timed around each round: ratios of mins
    vs_dict: float | None = None  # min round / min dict loop
    vs_dict_net: float | None = None  # both net of the min empty loop
    loop_vs_dict: float | None = None
    ref_dict_ns: float | None = None  # min ns/op of the paired dict loop

    @property
    def median_ns(self) -> float:
        return self.median_s / self.ops * 1e9

    @property
    def min_ns(self) -> float:
        return self.min_s / self.ops * 1e9


@dataclass
class Group:
    key: str
    title: str
    order: int = 100
    note: str = ""
    overhead: str | None = None  # name of the empty-loop row; net = median - its median
    # (column label, row name): ratio columns; the first is the main baseline
    baselines: list[tuple[str, str]] = field(default_factory=list)
    # rows -> {row name: mark text}; rows are keyed by name
    targets: Callable[[dict[str, TimingRow], Group], dict[str, str]] | None = None
    target_note: str = ""
    # rows -> extra Markdown lines under the table (derived figures, e.g. the cost of a TTL check)
    footer: Callable[[dict[str, TimingRow], Group], list[str]] | None = None


@dataclass
class Section:
    order: int
    title: str
    render: Callable[[list[Any]], list[str]]
    rows: list[Any] = field(default_factory=list)


GROUPS: dict[str, Group] = {}
TIMINGS: dict[str, dict[str, TimingRow]] = {}
SECTIONS: dict[str, Section] = {}
NOTES: list[str] = []  # free-form lines printed under the header (skips, reduced runs, ...)
SKIPPED: dict[str, list[str]] = {}  # group/section key -> names of rows that did not run
_STARTED = time.time()
_LOAD_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def register_group(group: Group) -> Group:
    GROUPS.setdefault(group.key, group)
    return GROUPS[group.key]


def record_timing(row: TimingRow) -> None:
    TIMINGS.setdefault(row.group, {})[row.name] = row


def register_section(key: str, order: int, title: str, render) -> Section:
    if key not in SECTIONS:
        SECTIONS[key] = Section(order=order, title=title, render=render)
    return SECTIONS[key]


def record(section_key: str, row: Any) -> None:
    SECTIONS[section_key].rows.append(row)


def note(line: str) -> None:
    if line not in NOTES:
        NOTES.append(line)


def skipped(key: str, name: str) -> None:
    SKIPPED.setdefault(key, [])
    if name not in SKIPPED[key]:
        SKIPPED[key].append(name)


# --- helpers for target functions -------------------------------------------------------------


def net_ns(rows: dict[str, TimingRow], group: Group, name: str) -> float | None:
    """Median ns/op minus the group's loop-overhead median (unpaired)."""
    row = rows.get(name)
    if row is None:
        return None
    over = rows.get(group.overhead) if group.overhead else None
    return row.median_ns - (over.median_ns if over else 0.0)


def ratio(rows: dict[str, TimingRow], a: str, b: str, *, net: bool = False) -> float | None:
    """Paired ratio of row ``a`` to row ``b`` (each normalized to the dict loop of its own rounds),
    falling back to the ratio of medians when a row has no paired figure."""
    ra, rb = rows.get(a), rows.get(b)
    if ra is None or rb is None:
        return None
    if net:
        x, y = ra.vs_dict_net, rb.vs_dict_net
    else:
        x, y = ra.vs_dict, rb.vs_dict
    if x is not None and y:
        return x / y
    return ra.median_ns / rb.median_ns if rb.median_ns else None


def mark(ok: bool) -> str:
    return PASS if ok else FAIL


# --- implementation / environment -------------------------------------------------------------


def implementation() -> tuple[str, bool | None]:
    """(description of the tiercache LocalCache measured, EXTENSIONS or None if not importable)."""
    try:
        import tiercache
        from tiercache import LocalCache
    except Exception as exc:  # the package may be mid-construction
        return (
            f"tiercache not importable ({type(exc).__name__}: {exc}); its rows were skipped",
            None,
        )
    ext = bool(getattr(tiercache, "EXTENSIONS", False))
    mod = getattr(LocalCache, "__module__", "?")
    kind = "Cython extension" if ext else "pure-Python twin"
    env = " (TIERCACHE_NO_EXTENSIONS=1)" if os.environ.get("TIERCACHE_NO_EXTENSIONS") else ""
    path = getattr(sys.modules.get(mod), "__file__", "?")
    where = os.path.relpath(path) if path and path != "?" else "?"
    return f"{kind}{env}: `{mod}.LocalCache` from `{where}`, EXTENSIONS={ext}", ext


def _versions() -> str:
    from importlib import metadata

    names = ["cachebox", "cachetools", "lru-dict", "theine", "theine-core", "numpy"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            out.append(f"{n} (missing)")
    try:
        out.insert(0, f"tiercache {metadata.version('tiercache')}")
    except metadata.PackageNotFoundError:
        out.insert(0, "tiercache (from source tree)")
    return ", ".join(out)


def _load() -> str:
    if _LOAD_START is None:
        return "n/a"
    end = os.getloadavg()
    fmt = " ".join(f"{x:.2f}" for x in _LOAD_START)
    return f"{fmt} at start, {' '.join(f'{x:.2f}' for x in end)} at end"


def _busy() -> str:
    """A warning when other work shared the machine (load average above ~ our one busy core)."""
    if _LOAD_START is None:
        return ""
    peak = max(_LOAD_START[0], os.getloadavg()[0])
    if peak < (os.cpu_count() or 1) - 0.5:
        return ""
    return (
        f"the machine was busy (1-min load average up to {peak:.2f} on {os.cpu_count()} CPUs): "
        "timings marked † were disturbed; rerun on a quiet machine for figures to publish"
    )


# --- rendering ----------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def render_group(group: Group) -> list[str]:
    rows = TIMINGS.get(group.key, {})
    if not rows:
        return []
    over = rows.get(group.overhead) if group.overhead else None
    over_ns = over.median_ns if over else 0.0
    marks = group.targets(rows, group) if group.targets else {}
    rounds = sorted({r.rounds for r in rows.values()})
    ops = sorted({r.ops for r in rows.values()})
    refs = [r.ref_dict_ns for r in rows.values() if r.ref_dict_ns]
    lines = [f"### {group.title}", ""]
    meta = f"{'/'.join(map(str, rounds))} rounds of {ops[-1]:,} ops"
    if len(ops) > 1:
        meta += f" ({ops[0]:,} for the slowest rows)"
    meta += "; median/min ns = per op, over rounds"
    if over:
        meta += f"; net = median - loop overhead ({over_ns:.1f} ns)"
    if refs:
        meta += (
            "; x columns: paired ratios, per op, of the row's fastest round to the fastest of the "
            "dict `d[k]` loops (and empty loops, for net) timed, as long as a round, right before "
            f"each of its rounds (that dict loop: {statistics.median(refs):.1f} ns/op); "
            "† = disturbed row (median > 1.25 x min): rerun when the machine is quiet"
        )
    lines.append(meta + (f". {group.note}" if group.note else "."))
    lines.append("")
    head = ["variant", "median ns", "min ns", "net ns"]
    for label, _ in group.baselines:
        head += [f"x {label}", f"x {label} (net)"]
    if group.targets:
        head.append("SPEC 6")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 2) + ("---|" if group.targets else "---:|"))
    for name, row in rows.items():
        is_over = name == group.overhead
        net = row.median_ns - over_ns if over and not is_over else None
        cells = [name + (f" ({row.note})" if row.note else "")]
        if row.median_s > NOISY * row.min_s:
            cells[0] += " †"
        cells += [_fmt(row.median_ns), _fmt(row.min_ns), _fmt(net)]
        for _, base_name in group.baselines:
            if is_over:
                cells += ["", ""]
                continue
            g = ratio(rows, name, base_name)
            n = ratio(rows, name, base_name, net=True)
            cells += [_fmt(g, 2), _fmt(n, 2)]
        if group.targets:
            cells.append(marks.get(name, ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if group.footer:
        extra = group.footer(rows, group)
        if extra:
            lines += [*extra, ""]
    if group.target_note:
        lines += [group.target_note, ""]
    if SKIPPED.get(group.key):
        lines += ["Not run: " + "; ".join(SKIPPED[group.key]) + ".", ""]
    return lines


def render_report() -> str:
    impl, _ = implementation()
    lines = [
        "## Benchmarks",
        "",
        f"- tiercache measured: {impl}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; load average {_load()}",
        f"- {_versions()}",
        f"- run took {time.time() - _STARTED:,.0f} s; "
        "ratios are from one run on a shared machine: expect a few % of noise between runs",
    ]
    busy = _busy()
    if busy:
        lines.append(f"- **{busy}**")
    lines += [f"- {n}" for n in NOTES]
    lines.append("")
    blocks: list[tuple[int, list[str]]] = []
    for g in GROUPS.values():
        blocks.append((g.order, render_group(g)))
    for key, s in SECTIONS.items():
        body = s.render(s.rows) if s.rows else []
        if body and SKIPPED.get(key):
            body += ["Not run: " + "; ".join(SKIPPED[key]) + ".", ""]
        blocks.append((s.order, body))
    for _, body in sorted(blocks, key=lambda b: b[0]):
        lines += body
    return "\n".join(lines).rstrip() + "\n"


def median(xs: list[float]) -> float:
    return statistics.median(xs)
