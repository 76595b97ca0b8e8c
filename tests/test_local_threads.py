"""Thread safety of LocalCache: several threads hammer one cache, then its invariants must hold.

The switch interval is lowered to a microsecond so that threads interleave inside operations.
Values carry their key, the writing thread and a weight, so that a value filed under the wrong
key, a lost weight or an uncounted read shows at the end. No timing is asserted.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest

from tests.local_models import assert_consistent
from tiercache import LocalCache

POLICIES = ["lru", "lfu", "tinylfu"]
THREADS = 8
MAX_WEIGHT = 9  # values weigh 1..MAX_WEIGHT


class Value(NamedTuple):
    """A value as written by a worker: its key, its writer, a sequence number and a weight."""

    key: Hashable
    thread: int
    seq: int
    weight: int


def weight_of(value: Any) -> int:
    return value.weight


class Recorder:
    """An on_evict hook that records what it is told (list.append is atomic)."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, Any, str]] = []

    def __call__(self, key: Any, value: Any, cause: str) -> None:
        self.log.append((key, value, cause))


class TickTimer:
    """A fake clock that moves one millisecond per reading (thread-safe) until frozen."""

    def __init__(self) -> None:
        self._ticks = itertools.count()
        self.frozen: float | None = None

    def __call__(self) -> float:
        if self.frozen is not None:
            return self.frozen
        return next(self._ticks) * 1e-3

    def freeze(self) -> None:
        self.frozen = next(self._ticks) * 1e-3


@dataclass
class Tally:
    """What one worker did and saw."""

    reads: int = 0
    written: set[Value] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond for the duration of the test."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def hammer(
    c: LocalCache,
    make_key: Callable[[int], Hashable],
    *,
    keyspace: int,
    ops: int,
    ttls: list[float | None],
) -> list[Tally]:
    """Run THREADS workers doing mixed operations on ``c``; return their tallies."""
    tallies = [Tally() for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def check(tally: Tally, key: Hashable, got: Any) -> None:
        if not isinstance(got, Value) or got.key != key:
            tally.errors.append(f"read {got!r} under {key!r}")

    def worker(t: int) -> None:
        tally = tallies[t]
        rnd = random.Random(t)
        barrier.wait()
        try:
            for i in range(ops):
                key = make_key(rnd.randrange(keyspace))
                value = Value(key, t, i, rnd.randint(1, MAX_WEIGHT))
                op = rnd.random()
                if op < 0.25:
                    tally.written.add(value)
                    c.set(key, value, rnd.choice(ttls))
                elif op < 0.40:
                    tally.reads += 1
                    try:
                        check(tally, key, c[key])
                    except KeyError:
                        pass
                elif op < 0.55:
                    tally.reads += 1
                    got = c.get(key)
                    if got is not None:
                        check(tally, key, got)
                elif op < 0.65:
                    tally.reads += 1
                    tally.written.add(value)
                    check(tally, key, c.setdefault(key, value))
                elif op < 0.72:
                    try:
                        del c[key]
                    except KeyError:
                        pass
                elif op < 0.80:
                    got = c.pop(key, None)
                    if got is not None:
                        check(tally, key, got)
                elif op < 0.83:
                    try:
                        k, got = c.popitem()
                        check(tally, k, got)
                    except KeyError:
                        pass
                elif op < 0.88:
                    other = make_key(rnd.randrange(keyspace))
                    extra = Value(other, t, -i, rnd.randint(1, MAX_WEIGHT))
                    tally.written.update((value, extra))
                    c.update([(key, value), (other, extra)])
                elif op < 0.97:
                    # Mid-run, len() and currbytes may be read without the mutex and see a
                    # write in flight (inserted, not yet evicted). The mutex lets one write be
                    # in flight at a time, so the bounds may be exceeded by one entry and one
                    # value's weight, never more; the exact bounds are checked at the end.
                    _ = key in c
                    _ = c.stats()
                    size = len(c)
                    if size > c.maxsize + 1:
                        tally.errors.append(f"len {size} > maxsize + 1")
                    heavy = c.currbytes
                    if c.maxbytes is not None and heavy > c.maxbytes + MAX_WEIGHT:
                        tally.errors.append(f"currbytes {heavy} > maxbytes + {MAX_WEIGHT}")
                else:
                    try:  # iterating while others write may raise like a dict, nothing else
                        for k, got in list(c.items()):
                            check(tally, k, got)
                    except RuntimeError:
                        pass
        except BaseException as exc:
            tally.errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a worker hung (deadlock?)"
    return tallies


def check_final_state(c: LocalCache, tallies: list[Tally], timer: TickTimer | None) -> None:
    """After the storm: no worker error, bounds held, every value its key's, counters exact."""
    errors = [e for tally in tallies for e in tally.errors]
    assert not errors, errors[:10]
    if timer is not None:
        timer.freeze()
        c.expire()  # now every remaining entry is live, and stays so
    keys = list(c)
    assert len(c) == len(keys) == len(set(keys)) <= c.maxsize
    written = set().union(*(tally.written for tally in tallies))
    for key, value in c.items():
        assert isinstance(value, Value) and value.key == key
        assert value in written, f"{key!r} maps to {value!r}, which no thread wrote"
    if c.maxbytes is not None:
        assert c.currbytes == sum(v.weight for v in c.values()) <= c.maxbytes
    stats = c.stats()
    assert stats["hits"] + stats["misses"] == sum(tally.reads for tally in tallies)
    assert stats["currsize"] == len(keys)
    # on_evict was told once per eviction and expiration, each time a value its key's, no
    # longer in the cache (every Value object is written once)
    log = c.on_evict.log
    causes = [cause for _, _, cause in log]
    assert (causes.count("size"), causes.count("expired")) == (
        stats["evictions"],
        stats["expirations"],
    )
    for key, value, _ in log:
        assert isinstance(value, Value) and value.key == key and value in written
        assert c.peek(key) is not value
    assert_consistent(c)  # the policy's structures still hold exactly the live entries


CONFIGS = {
    "plain": {"ttl": False, "maxbytes": None},
    "ttl": {"ttl": True, "maxbytes": None},
    "maxbytes": {"ttl": False, "maxbytes": 120},
    "ttl+maxbytes": {"ttl": True, "maxbytes": 120},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("policy", POLICIES)
def test_threads_hammer_one_cache(policy: str, config: str, fast_switching: None) -> None:
    """8 threads of mixed reads and writes over 3x more keys than fit keep the cache sound."""
    use_ttl, maxbytes = CONFIGS[config]["ttl"], CONFIGS[config]["maxbytes"]
    timer = TickTimer() if use_ttl else None
    kwargs: dict[str, Any] = {"policy": policy, "getsizeof": weight_of, "on_evict": Recorder()}
    if timer is not None:
        kwargs.update(timer=timer, ttl=0.5)
    if maxbytes is not None:
        kwargs["maxbytes"] = maxbytes
    c = LocalCache(32, **kwargs)
    ttls: list[float | None] = [None, 0.05, 0.2, 2.0] if use_ttl else [None]
    tallies = hammer(c, lambda n: n, keyspace=96, ops=5000, ttls=ttls)
    check_final_state(c, tallies, timer)


class SlowKey:
    """A key whose hash collides often and whose __eq__ runs Python code and yields the GIL."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return self.n % 5

    def __eq__(self, other: object) -> bool:
        time.sleep(0)  # give the GIL away in the middle of a dict lookup
        return isinstance(other, SlowKey) and sum(range(20)) > 0 and other.n == self.n

    def __repr__(self) -> str:
        return f"SlowKey({self.n})"


def slow_weight(value: Any) -> int:
    """A getsizeof in Python that yields the GIL before answering."""
    time.sleep(0)
    total = 0
    for _ in range(value.weight):
        total += 1
    return total


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", POLICIES)
def test_threads_with_slow_keys_and_getsizeof(policy: str, fast_switching: None) -> None:
    """Python-level __eq__ and getsizeof release the GIL mid-operation: the mutex must hold."""
    timer = TickTimer()
    c = LocalCache(
        12,
        policy=policy,
        maxbytes=60,
        getsizeof=slow_weight,
        timer=timer,
        ttl=1.0,
        on_evict=Recorder(),
    )
    tallies = hammer(c, SlowKey, keyspace=30, ops=400, ttls=[None, 0.1, 1.0])
    check_final_state(c, tallies, timer)
