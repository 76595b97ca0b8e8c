"""The ``tiercache`` command line (``python -m tiercache``)."""

from __future__ import annotations

import argparse
import bisect
import functools
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from .local import EXTENSIONS, LocalCache


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="tiercache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="several processes share a key space through their own TieredCache",
        description="Start a private Redis and several worker processes; print hit ratios per "
        "tier and invalidation lag live, then check the history for consistency.",
    )
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    demo.add_argument("--seconds", type=float, default=6.0, help="how long they run (default 6)")
    demo.add_argument("--keys", type=int, default=2000, help="size of the key space")
    demo.add_argument("--local", action="store_true", help="only the local-tier demo")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.local:
            demo_local()
            return 0
        from .demo import run_demo

        demo_local()
        print()
        return 0 if run_demo(args.workers, args.seconds, args.keys) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
