"""``tiercache demo``: several processes share a key space through their own TieredCache.

The parent starts a private Redis (the embedded development server, with RedisBloom when found)
and ``workers`` processes, each with its own TieredCache on it. It runs in two phases:

1. **Warm-up.** Every worker reads the same ``warmup_keys`` cold keys, in the same order, at the
   same time, through ``get_or_load`` with a slow origin: the fill lease lets one process call the
   origin per key while the others wait for its value (SPEC 3.7). The parent shows a progress bar
   and then counts the loads: one per key across the fleet, whatever the number of processes.
2. **Run.** Every worker reads keys drawn from a Zipf law and writes a few percent of the time; a
   few "hot" keys with a short TTL are read through ``get_or_load`` too (expiry, XFetch early
   refresh and lease waits at work). The parent shows, per process, the hit ratio of each tier,
   the invalidation lag and the stampede counts (origin loads and lease waits), live.

Every read and acknowledged write of the main key space is logged; at the end the parent checks
the whole history: no worker ever reads a value older than one it has already read (monotonic
reads) or than its own last write (read-your-writes), and no read is older than a write
acknowledged more than ``bound`` seconds before it started (bounded staleness). It prints the
verdict and, when matplotlib is installed and ``plot`` names a file, writes a PNG of the hit
ratios and the lag over time.

On a terminal the display is a live table (rich); elsewhere (a pipe, CI, no rich) plain lines.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import multiprocessing as mp
import os
import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .metrics import drain, hit_ratios, metrics_of
from .server import RedisServer

NAMESPACE = "demo"
HOT_NAMESPACE = "demo-hot"
REPORT_EVERY = 0.5  # seconds between a worker's reports
READY_TIMEOUT = 60.0  # for the workers to start, and for the warm-up to end

History = list[tuple[str, str, int, int, int, int]]  # (op, key, value, t0 ns, t1 ns, worker)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (the CLI's options)."""

    workers: int = 4
    duration: float = 8.0  # seconds of the run phase
    keys: int = 2_000
    write_ratio: float = 0.03
    warmup_keys: int = 300
    load_ms: float = 1.0  # how long the demo's origin takes per load
    hot_keys: int = 8
    hot_ttl: float = 1.0
    hot_ratio: float = 0.05  # share of operations that also read a hot key
    bound_s: float = 1.0  # the staleness bound the history check holds reads to
    plot: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.keys < 1 or self.warmup_keys < 0 or self.hot_keys < 1:
            raise ValueError("workers, keys and hot_keys must be >= 1, warmup_keys >= 0")
        if not 0 <= self.write_ratio <= 1 or not 0 <= self.hot_ratio <= 1:
            raise ValueError("write_ratio and hot_ratio are shares between 0 and 1")
        if self.duration <= 0 or self.hot_ttl <= 0 or self.load_ms < 0:
            raise ValueError("duration and hot_ttl must be > 0, load_ms >= 0")


# -- the workers ---------------------------------------------------------------------------------


def _zipf_sampler(n_keys: int, s: float, rng: random.Random) -> Callable[[], int]:
    cumulative = list(itertools.accumulate(1.0 / r**s for r in range(1, n_keys + 1)))
    total = cumulative[-1]
    return lambda: bisect.bisect_left(cumulative, rng.random() * total)


class _Origin:
    """The demo's source of truth: slow, and counting who calls it (foreground or refresh)."""

    def __init__(self, load_ms: float, value: Callable[[Any], Any]) -> None:
        self._delay = load_ms / 1000.0
        self._value = value
        self._lock = threading.Lock()
        self.foreground = 0  # loads a reader waited for (misses)
        self.background = 0  # refreshes (XFetch, stale-while-revalidate) on the cache's threads

    def __call__(self, key: Any) -> Any:
        with self._lock:
            if threading.current_thread() is threading.main_thread():
                self.foreground += 1
            else:
                self.background += 1
        if self._delay:
            time.sleep(self._delay)
        return self._value(key)

    @property
    def calls(self) -> int:
        return self.foreground + self.background


def _cache_options() -> dict[str, Any]:
    # Heartbeats every second: `tiercache stats --namespace demo` can watch the demo live. A
    # generous PONG deadline: on a busy 2-core machine a starved listener thread must not turn
    # the local tier off for nothing (a real loss is still detected by the sequence numbers).
    return {
        "local_ttl": 30.0,
        "health_interval": 0.25,
        "health_timeout": 2.0,
        "heartbeat_interval": 1.0,
        "startup_timeout": 10.0,
    }


def worker_main(
    worker: int, url: str, config: DemoConfig, out: Any, go_warm: Any, go_run: Any
) -> None:
    """One process: warm up, then read and write through its own TieredCache; report home."""
    try:
        _worker(worker, url, config, out, go_warm, go_run)
    except BaseException:
        out.put(("error", worker, traceback.format_exc()))


def _worker(worker: int, url: str, config: DemoConfig, out: Any, go_warm: Any, go_run: Any) -> None:
    from .tiered import TieredCache

    rng = random.Random(worker)
    pick = _zipf_sampler(config.keys, 1.0, rng)
    origin = _Origin(config.load_ms, lambda key: 0)  # 0: "not written yet", like a plain miss
    hot_origin = _Origin(config.load_ms, lambda key: time.time_ns())
    history: History = []
    seq = itertools.count(1)
    options = _cache_options()
    with (
        TieredCache(url, namespace=NAMESPACE, **options) as cache,
        TieredCache(url, namespace=HOT_NAMESPACE, ttl=config.hot_ttl, **options) as hot,
    ):
        cache.wait_ready(10.0)
        hot.wait_ready(10.0)
        out.put(("ready", worker, os.getpid()))
        if not go_warm.wait(READY_TIMEOUT):
            return

        # Warm-up: every worker reads the same cold keys in the same order, at the same time.
        misses_before = cache.stats()["misses"]
        for i in range(config.warmup_keys):
            key = f"k{i}"
            t0 = time.time_ns()
            value = cache.get_or_load(key, origin)
            history.append(("r", key, value, t0, time.time_ns(), worker))
            if (i + 1) % 20 == 0 or i + 1 == config.warmup_keys:
                out.put(("warm", worker, i + 1, cache.stats()))
        stats = cache.stats()
        waits = stats["misses"] - misses_before - origin.foreground
        out.put(("warmed", worker, origin.foreground, waits, stats, hot.stats()))
        if not go_run.wait(READY_TIMEOUT):
            return

        deadline = time.monotonic() + config.duration
        next_report = time.monotonic() + REPORT_EVERY
        ops = 0
        # The invalidation lag of each write from another process, as the cache measured it.
        lag_window = metrics_of(cache).window("invalidation_lag_seconds")
        _, lag_seen = drain(lag_window, 0)
        while time.monotonic() < deadline:
            if rng.random() < config.hot_ratio:
                hot.get_or_load(f"h{rng.randrange(config.hot_keys)}", hot_origin)
            key = f"k{pick()}"
            t0 = time.time_ns()
            if rng.random() < config.write_ratio:
                version = worker * 10**9 + next(seq)  # unique per write, ordered per worker
                cache[key] = version
                history.append(("w", key, version, t0, time.time_ns(), worker))
            else:  # read-through: a key never written is loaded (as 0) once, then cached
                value = cache.get_or_load(key, origin)
                history.append(("r", key, value, t0, time.time_ns(), worker))
            ops += 1
            if time.monotonic() >= next_report:
                lags, lag_seen = drain(lag_window, lag_seen)
                counts = _counts(origin, hot_origin)
                out.put(("report", worker, ops, cache.stats(), hot.stats(), counts, lags))
                next_report += REPORT_EVERY
        lags, lag_seen = drain(lag_window, lag_seen)
        final = (ops, cache.stats(), hot.stats(), _counts(origin, hot_origin), lags)
        out.put(("done", worker, *final, history))


def _counts(origin: _Origin, hot_origin: _Origin) -> tuple[int, int, int]:
    """(foreground loads of the main key space, of the hot keys, background refreshes)."""
    return origin.foreground, hot_origin.foreground, origin.background + hot_origin.background


# -- the history check --------------------------------------------------------------------------


def check_history(history: History, bound_s: float) -> list[str]:
    """Violations of monotonic reads, read-your-writes and bounded staleness (empty: none).

    Writes of one key are ordered only when one was acknowledged before the other started;
    concurrent writes may land in either order, and reading either is fine. A value that no
    logged write wrote (0, "not written yet") precedes every write.
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


# -- what the parent knows -----------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    """The parent's view of one worker."""

    index: int
    pid: int | None = None
    warmed_keys: int = 0
    warm_loads: int = 0
    warm_waits: int = 0
    ops: int = 0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    hot: dict[str, Any] = dataclasses.field(default_factory=dict)
    origin: tuple[int, int, int] = (0, 0, 0)  # see _counts
    base: dict[str, Any] = dataclasses.field(default_factory=dict)  # stats when the run began
    hot_base: dict[str, Any] = dataclasses.field(default_factory=dict)
    lags: list[float] = dataclasses.field(default_factory=list)  # run phase, ms
    done: bool = False
    error: str | None = None
    dead_since: float = 0.0

    def delta(self, name: str) -> int:
        return int(self.stats.get(name, 0) or 0) - int(self.base.get(name, 0) or 0)

    def row(self, elapsed: float) -> dict[str, Any]:
        """Display figures of the run phase so far."""
        run = {k: self.delta(k) for k in ("local_hits", "remote_hits", "misses")}
        local, remote, miss = hit_ratios(run)
        p50, p99 = _percentiles(self.lags)
        hot_misses = int(self.hot.get("misses", 0) or 0) - int(self.hot_base.get("misses", 0) or 0)
        main_fg, hot_fg, bg = self.origin
        run_fg = max(0, main_fg - self.warm_loads)  # the origin's count includes the warm-up
        return {
            "name": str(self.pid or f"#{self.index}"),
            "ops": self.ops,
            "ops_s": self.ops / elapsed if elapsed > 0 else 0.0,
            "local": local,
            "remote": remote,
            "miss": miss,
            "inval": self.delta("invalidations_received"),
            "lag_p50": p50,
            "lag_p99": p99,
            "loads": self.warm_loads + run_fg + hot_fg + bg,
            "waits": self.warm_waits + max(0, run["misses"] - run_fg) + max(0, hot_misses - hot_fg),
            "resyncs": int(self.stats.get("resyncs", 0) or 0),
            "usable": bool(self.stats.get("local_usable", False)),
        }


def _total_row(rows: list[dict[str, Any]], workers: list[_Worker], elapsed: float) -> dict:
    run = {k: sum(w.delta(k) for w in workers) for k in ("local_hits", "remote_hits", "misses")}
    local, remote, miss = hit_ratios(run)
    p50, p99 = _percentiles([lag for w in workers for lag in w.lags])
    ops = sum(r["ops"] for r in rows)
    return {
        "name": "all",
        "ops": ops,
        "ops_s": ops / elapsed if elapsed > 0 else 0.0,
        "local": local,
        "remote": remote,
        "miss": miss,
        "inval": sum(r["inval"] for r in rows),
        "lag_p50": p50,
        "lag_p99": p99,
        "loads": sum(r["loads"] for r in rows),
        "waits": sum(r["waits"] for r in rows),
        "resyncs": sum(r["resyncs"] for r in rows),
        "usable": all(r["usable"] for r in rows),
    }


COLUMNS = (
    ("process", "name", "{}"),
    ("ops/s", "ops_s", "{:,.0f}"),
    ("L1 hit", "local", "{:.1%}"),
    ("L2 hit", "remote", "{:.1%}"),
    ("miss", "miss", "{:.1%}"),
    ("inval", "inval", "{:,}"),
    ("lag p50", "lag_p50", "{:.2f}ms"),
    ("lag p99", "lag_p99", "{:.1f}ms"),
    ("loads", "loads", "{:,}"),
    ("waits", "waits", "{:,}"),
    ("resync", "resyncs", "{:,}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


# -- displays ------------------------------------------------------------------------------------


class _PlainDisplay:
    """Plain lines: for pipes, CI logs, and machines without rich."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self._next_line = 0.0
        self._warm_shown = -1
        self._header_shown = False

    def text(self, line: str = "") -> None:
        self.out(line)

    def warm(self, done: int, total: int) -> None:
        quarter = 4 * done // max(1, total)
        if quarter > self._warm_shown:
            self._warm_shown = quarter
            self.out(f"warm-up {done / max(1, total):5.0%}  ({done:,}/{total:,} reads)")

    def run(self, elapsed: float, duration: float, total: dict[str, Any], rows: list) -> None:
        if elapsed < self._next_line or elapsed < 1.0:
            return
        self._next_line = elapsed + 1.0
        if not self._header_shown:
            self._header_shown = True
            self.out(
                f"{'t':>5} {'ops/s':>8} {'L1 hit':>7} {'L2 hit':>7} {'miss':>6} {'inval':>7} "
                f"{'lag p50':>9} {'lag p99':>9} {'loads':>6} {'waits':>6}"
            )
        self.out(_status_line(f"{elapsed:4.1f}s", total))

    def final(self, rows: list[dict[str, Any]], total: dict[str, Any]) -> None:
        widths = [
            max(len(title), *(len(_cell(r, key, fmt)) for r in [*rows, total]))
            for title, key, fmt in COLUMNS
        ]
        self.out("")
        self.out("  ".join(t.rjust(w) for (t, _, _), w in zip(COLUMNS, widths, strict=True)))
        for r in [*rows, total]:
            cells = [_cell(r, key, fmt) for _, key, fmt in COLUMNS]
            self.out("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))

    def close(self) -> None:
        pass


def _status_line(label: str, t: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return f"{v:6.2f}ms" if v is not None else f"{'-':>8}"

    return (
        f"{label:>5} {t['ops_s']:8,.0f} {t['local']:7.1%} {t['remote']:7.1%} {t['miss']:6.1%} "
        f"{t['inval']:7,} {ms(t['lag_p50']):>9} {ms(t['lag_p99']):>9} {t['loads']:6,} "
        f"{t['waits']:6,}"
    )


class _LiveDisplay:
    """A live rich table per process, with a progress bar for the warm-up."""

    def __init__(self, console: Any) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]warm-up[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reads"),
            console=console,
        )
        self._task = self.progress.add_task("warm-up", total=1)
        self._table: Any = None
        self._live = Live(self.progress, console=console, refresh_per_second=4, transient=False)
        self._started = False

    def text(self, line: str = "") -> None:
        style = None
        if line.startswith(("verdict:", "consistency:", "stampede:")):
            style = "bold green" if ": OK" in line else "bold red"
        self.console.print(line, highlight=False, style=style)

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._live.start()

    def warm(self, done: int, total: int) -> None:
        self._start()
        self.progress.update(self._task, completed=done, total=max(1, total))
        self._live.update(self.progress)

    def run(self, elapsed: float, duration: float, total: dict[str, Any], rows: list) -> None:
        from rich.console import Group
        from rich.text import Text

        self._start()
        caption = Text(f"run: {min(elapsed, duration):4.1f} s of {duration:.0f} s", style="bold")
        self._live.update(Group(self.progress, caption, self._render(rows, total)))

    def final(self, rows: list[dict[str, Any]], total: dict[str, Any]) -> None:
        from rich.console import Group

        self._start()
        self._live.update(Group(self.progress, self._render(rows, total)))
        self.close()

    def _render(self, rows: list[dict[str, Any]], total: dict[str, Any]) -> Any:
        from rich import box
        from rich.table import Table

        table = Table(
            title="per process, run phase (loads: origin calls; waits: misses served by "
            "another process' load)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            pad_edge=False,
        )
        for title, _, _ in COLUMNS:
            table.add_column(title, justify="left" if title == "process" else "right")
        for r in rows:
            style = None if r["usable"] else "yellow"
            table.add_row(*(_cell(r, key, fmt) for _, key, fmt in COLUMNS), style=style)
        table.add_section()
        table.add_row(*(_cell(total, key, fmt) for _, key, fmt in COLUMNS), style="bold")
        return table

    def close(self) -> None:
        if self._started:
            self._started = False
            self._live.stop()


def make_display(mode: str = "auto", out: Callable[[str], None] = print) -> Any:
    """A live display ("live": rich, forced even without a terminal), plain lines ("plain"), or
    the live one when stdout is a terminal and rich is installed ("auto")."""
    if mode not in ("auto", "live", "plain"):
        raise ValueError("display must be 'auto', 'live' or 'plain'")
    if mode == "plain":
        return _PlainDisplay(out)
    try:
        from rich.console import Console
    except ImportError:
        if mode == "live":
            raise RuntimeError(
                "the live display needs rich: pip install 'tiercache[cli]'"
            ) from None
        return _PlainDisplay(out)
    if mode == "auto" and not sys.stdout.isatty():
        return _PlainDisplay(out)
    return _LiveDisplay(Console(force_terminal=True if mode == "live" else None))


# -- the plot ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Point:
    t: float
    local: float
    remote: float
    miss: float
    lag_p50: float | None
    lag_p99: float | None


def write_plot(points: list[_Point], path: str, warm_end: float | None, title: str) -> str:
    """A PNG of the fleet's hit ratios per tier and invalidation lag over time, at ``path``.

    Raises ImportError without matplotlib (the ``plot`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hit, ax_lag) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5), dpi=100)
    ts = [p.t for p in points]
    ax_hit.plot(ts, [100 * p.local for p in points], label="L1 (local) hit", color="tab:green")
    ax_hit.plot(ts, [100 * p.remote for p in points], label="L2 (Redis) hit", color="tab:blue")
    ax_hit.plot(ts, [100 * p.miss for p in points], label="miss", color="tab:red")
    ax_hit.set_ylabel("share of reads (%)")
    ax_hit.set_ylim(0, 100)
    ax_hit.legend(loc="center right")
    ax_hit.grid(alpha=0.3)
    lag = [(p.t, p.lag_p50, p.lag_p99) for p in points if p.lag_p50 is not None]
    if lag:
        ax_lag.plot([t for t, _, _ in lag], [v for _, v, _ in lag], label="p50", color="tab:blue")
        ax_lag.plot(
            [t for t, _, _ in lag], [v or 0.0 for _, _, v in lag], label="p99", color="tab:orange"
        )
        ax_lag.legend(loc="upper right")
        ax_lag.set_yscale("log")
    ax_lag.set_ylabel("invalidation lag (ms, log)")
    ax_lag.set_xlabel("seconds since the warm-up began")
    ax_lag.grid(alpha=0.3)
    for ax in (ax_hit, ax_lag):
        if warm_end is not None and warm_end > 0:
            ax.axvspan(0, warm_end, color="0.9", zorder=0)
    if warm_end is not None:
        ax_hit.text(0.005, 0.97, "warm-up", transform=ax_hit.transAxes, va="top", fontsize=8)
    ax_hit.set_title(title)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    plt.close(fig)
    return str(target)


# -- the parent ----------------------------------------------------------------------------------


def run_demo(
    config: DemoConfig | None = None,
    *,
    display: str = "auto",
    out: Callable[[str], None] = print,
) -> bool:
    """Run the multi-process demo with a display; whether the history was consistent."""
    config = config or DemoConfig()
    screen = make_display(display, out)
    try:
        return _run(config, screen)
    finally:
        screen.close()


def _run(config: DemoConfig, screen: Any) -> bool:
    ctx = mp.get_context("spawn")
    with RedisServer(die_with_parent=True) as server:
        bloom = "RedisBloom loaded" if server.has_bloom else "no RedisBloom"
        screen.text(
            f"tiercache demo: {config.workers} processes, {server.server_name} {server.version} "
            f"({bloom}) at {server.url}"
        )
        screen.text(
            f"Zipf(1.0) over {config.keys:,} keys, {config.write_ratio:.0%} writes, "
            f"{config.duration:g} s after a warm-up of {config.warmup_keys:,} keys; "
            f"{config.hot_keys} hot keys with a {config.hot_ttl:g} s TTL"
        )
        screen.text(
            f"watch it from another terminal: tiercache stats --url {server.url} "
            f"--namespace {NAMESPACE}"
        )
        reports: Any = ctx.Queue()
        go_warm, go_run = ctx.Event(), ctx.Event()
        procs = [
            ctx.Process(
                target=worker_main,
                args=(w, server.url, config, reports, go_warm, go_run),
                daemon=True,
                name=f"tiercache-demo-{w}",
            )
            for w in range(config.workers)
        ]
        for p in procs:
            p.start()
        try:
            return _drive(config, screen, reports, procs, go_warm, go_run)
        finally:
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def _drive(
    config: DemoConfig, screen: Any, reports: Any, procs: list[Any], go_warm: Any, go_run: Any
) -> bool:
    workers = [_Worker(i) for i in range(config.workers)]
    histories: History = []
    points: list[_Point] = []
    pending_lags: list[float] = []  # lag samples since the last point
    phase = "start"
    t_warm = t_run = t_end = 0.0
    deadline = time.monotonic() + READY_TIMEOUT
    next_point = next_screen = 0.0
    last: dict[str, int] = {}
    warm_total = config.workers * config.warmup_keys
    screen.text("starting the worker processes ...")

    while True:
        try:
            msg = reports.get(timeout=0.05)
        except queue.Empty:
            msg = None
        now = time.monotonic()
        if msg is not None:
            kind, w = msg[0], workers[msg[1]]
            if kind == "ready":
                w.pid = msg[2]
            elif kind == "warm":
                w.warmed_keys, w.stats = msg[2], msg[3]
            elif kind == "warmed":
                w.warmed_keys = config.warmup_keys
                w.warm_loads, w.warm_waits, w.stats, w.hot = msg[2], msg[3], msg[4], msg[5]
                w.base, w.hot_base = dict(w.stats), dict(w.hot)
            elif kind in ("report", "done"):
                w.ops, w.stats, w.hot, w.origin = msg[2], msg[3], msg[4], msg[5]
                w.lags.extend(msg[6])
                pending_lags.extend(msg[6])
                if kind == "done":
                    histories.extend(msg[7])
                    w.done = True
            elif kind == "error":
                w.error, w.done = msg[2], True
        if any(w.error for w in workers):
            break
        for w, p in zip(workers, procs, strict=True):
            if not w.done and not p.is_alive():  # died without a word (its last words may
                w.dead_since = w.dead_since or now  # still be in the queue: wait a little)
                if now - w.dead_since > 2.0:
                    w.error = f"exited with code {p.exitcode} before it finished"
        if any(w.error for w in workers):
            break
        if phase == "start" and all(w.pid for w in workers):
            phase, t_warm = "warm", now
            deadline = now + READY_TIMEOUT
            screen.text(
                f"warm-up: every process reads the {config.warmup_keys:,} hottest keys in the "
                f"same order through get_or_load (the origin takes {config.load_ms:g} ms)"
            )
            go_warm.set()
        elif phase == "warm":
            screen.warm(sum(w.warmed_keys for w in workers), warm_total)
            if all(w.base for w in workers):
                phase, t_run = "run", now
                deadline = now + config.duration + READY_TIMEOUT
                loads = sum(w.warm_loads for w in workers)
                waits = sum(w.warm_waits for w in workers)
                screen.text(
                    f"warm-up done in {now - t_warm:.1f} s: {warm_total:,} reads of "
                    f"{config.warmup_keys:,} cold keys, {loads:,} origin loads, {waits:,} waited "
                    "for another process' load (fill lease)"
                )
                screen.text(f"run: {config.duration:g} s, figures per process below")
                go_run.set()
                next_point = now  # a point now: what follows is the run
        elif phase == "run":
            if all(w.done for w in workers):
                t_end = now
                break
            if now >= next_screen:
                next_screen = now + 0.25
                elapsed = min(now - t_run, config.duration)
                rows = [w.row(elapsed) for w in workers]
                screen.run(elapsed, config.duration, _total_row(rows, workers, elapsed), rows)
        in_run = phase == "run" and now - t_run <= config.duration + REPORT_EVERY
        if (phase == "warm" or in_run) and now >= next_point:
            next_point = now + REPORT_EVERY
            point = _point(now - t_warm, workers, last, pending_lags)
            if point is not None:  # (an interval without reads has no ratios)
                points.append(point)
        if now > deadline:
            break

    failed = [w for w in workers if w.error or not w.done]
    elapsed = min((t_end or time.monotonic()) - (t_run or time.monotonic()), config.duration)
    rows = [w.row(elapsed) for w in workers]
    total = _total_row(rows, workers, elapsed)
    if phase == "run":
        screen.final(rows, total)
    if failed:
        for w in failed:
            why = w.error or f"no result (phase {phase}, pid {w.pid})"
            screen.text(f"worker {w.index} failed: {why}")
        screen.text("verdict: FAILED (a worker did not finish)")
        return False

    problems = check_history(histories, bound_s=config.bound_s)
    screen.text("")
    if problems:
        screen.text(f"consistency: FAILED, {len(problems)} violations, e.g. {problems[:3]}")
    else:
        screen.text(
            f"consistency: OK ({len(histories):,} operations checked: monotonic reads, "
            f"read-your-writes, no read older than a write acknowledged {config.bound_s:g} s "
            "before it began)"
        )
    warm_loads = sum(w.warm_loads for w in workers)
    stampede_ok = warm_loads <= config.warmup_keys
    if config.warmup_keys:
        screen.text(
            f"stampede: {'OK' if stampede_ok else 'FAILED'} ({config.workers} processes read "
            f"{config.warmup_keys:,} cold keys at once: {warm_loads:,} origin loads, "
            f"{sum(w.warm_waits for w in workers):,} lease waits; the bound is one load per key)"
        )
    if config.plot:
        title = (
            f"tiercache demo: {config.workers} processes, Zipf(1.0) over {config.keys:,} keys, "
            f"{config.write_ratio:.0%} writes"
        )
        try:
            path = write_plot(points, config.plot, t_run - t_warm if t_run else None, title)
        except ImportError:
            screen.text(
                f"plot: skipped, matplotlib is not installed (pip install 'tiercache[plot]'); "
                f"{config.plot} not written"
            )
        else:
            screen.text(f"plot: {path} (hit ratio per tier and invalidation lag over time)")
    ok = not problems and stampede_ok
    screen.text(f"verdict: {'OK' if ok else 'FAILED'}")
    return ok


def _percentiles(samples: list[float]) -> tuple[float | None, float | None]:
    """(p50, p99) of some samples, (None, None) without any."""
    if not samples:
        return None, None
    data = sorted(samples)
    return data[len(data) // 2], data[min(len(data) - 1, int(len(data) * 0.99))]


def _point(
    t: float, workers: list[_Worker], last: dict[str, int], lags: list[float]
) -> _Point | None:
    """The fleet's hit ratios and invalidation lag since the previous point (None: no reads)."""
    totals = {
        k: sum(int(w.stats.get(k, 0) or 0) for w in workers)
        for k in ("local_hits", "remote_hits", "misses")
    }
    interval = {k: totals[k] - last.get(k, 0) for k in totals}
    last.update(totals)
    if not any(interval.values()):
        return None
    local, remote, miss = hit_ratios(interval)
    p50, p99 = _percentiles(lags)
    lags.clear()
    return _Point(t, local, remote, miss, p50, p99)
