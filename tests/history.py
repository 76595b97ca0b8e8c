"""Helpers of the consistency tests: cache worker processes, routed connections, history checks.

* :class:`CacheProcess` runs one ``TieredCache`` in its own OS process (``spawn`` context, or
  ``fork`` when asked) and executes commands sent over a pipe: every call has a deadline, and
  :meth:`CacheProcess.terminate` (used in teardowns) resumes, asks, then kills the process by pid.
* :func:`routed_client` makes a redis-py client whose *listener* connections (the ones the library
  names ``tiercache:listener:...``) go to another port than its data connections, so a test can
  put a :class:`tests.proxy.TcpProxy` on one path only (delay the data path, blackhole the pub/sub
  path) without touching the library.
* :func:`run_history` is the random read/write loop of a worker; every operation is logged with its
  wall-clock start and end (``time.time_ns``, one host) and the unique id it wrote or read.
* :func:`check_history` checks such a log: bounded staleness (every read returns a value at least as
  new as the newest write acknowledged ``delta`` before it started; ``delta`` widens inside fault
  windows), monotonic reads per process, read-your-writes, no value from the future, and a miss
  only where a delete or a loss of Redis data explains it. It reports the measured staleness.

Write order. Most keys have one writer (their *owner*), so the order of their versions is the
owner's program order and the check is exact. A few *contended* keys are written by every process;
for them a write is known to be newer than another only when it started after the other was
acknowledged (versions follow real time for non-overlapping writes), so that check is sound but
cannot see staleness between overlapping writes.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

LISTENER_PREFIX = "tiercache:listener:"

# -- small utilities ----------------------------------------------------------------------------


def hold(seconds: float) -> None:
    """Keep an injected fault in place for ``seconds`` (its duration, not a wait for a state)."""
    threading.Event().wait(seconds)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def listener_clients(client: redis.Redis, namespace: str | None = None) -> list[dict[str, Any]]:
    """The library's listener connections (CLIENT LIST), optionally of one namespace only."""
    prefix = LISTENER_PREFIX + (f"{namespace}:" if namespace else "")
    return [c for c in client.client_list() if str(c.get("name", "")).startswith(prefix)]


def kill_listener(client: redis.Redis, name: str) -> int:
    """CLIENT KILL the listener connection named ``name``; how many were killed."""
    killed = 0
    for c in client.client_list():
        if c.get("name") == name:
            killed += int(client.execute_command("CLIENT", "KILL", "ID", c["id"]))
    return killed


# -- connections routed per role ------------------------------------------------------------------


class RoutedConnection(redis.Connection):
    """A redis-py connection that goes to ``listener_port`` when it is a tiercache listener.

    The library opens its listener's connections from the data client's pool settings (class and
    keyword arguments), naming them ``tiercache:listener:<ns>:<origin>``; this class sends those to
    another port (a proxy) and every other connection to the pool's own host and port.
    """

    def __init__(self, *, listener_port: int | None = None, **kwargs: Any) -> None:
        name = kwargs.get("client_name") or ""
        if listener_port and str(name).startswith(LISTENER_PREFIX):
            kwargs["port"] = listener_port
        super().__init__(**kwargs)


def routed_client(
    host: str,
    port: int,
    *,
    listener_port: int | None = None,
    socket_timeout: float = 2.0,
    connect_timeout: float = 1.0,
    retries: int = 1,
) -> redis.Redis:
    """A client for ``TieredCache(redis=...)``: data to ``port``, listener to ``listener_port``.

    The settings mirror the library's own client (``tiercache.driver.make_client``): bounded
    timeouts, ``retries`` retries with a short backoff, raw bytes.
    """
    pool = redis.ConnectionPool(
        connection_class=RoutedConnection,
        host=host,
        port=port,
        listener_port=listener_port,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries),
        health_check_interval=0,
        decode_responses=False,
    )
    return redis.Redis(connection_pool=pool)


# -- worker processes -----------------------------------------------------------------------------


class RemoteError(RuntimeError):
    """A command raised in the worker process (its type name and traceback are in the message)."""

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(f"{type_name}: {text}")
        self.type_name = type_name


class CacheProcess:
    """One TieredCache in another OS process, driven over a pipe.

    ``open(url_or_spec, **options)`` builds the cache there; a ``spec`` dict
    ``{"host", "port", "listener_port"}`` builds it on a :func:`routed_client`. Each command
    returns the worker's answer or raises :class:`RemoteError` / ``TimeoutError`` (deadline).
    """

    def __init__(self, name: str = "worker", *, context: str = "spawn") -> None:
        ctx = multiprocessing.get_context(context)
        self.name = name
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), name=name, daemon=True)
        self.process.start()
        child.close()
        self._pending = 0

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, *command: Any) -> None:
        """Send a command without waiting for its answer (collect it with :meth:`receive`)."""
        self._conn.send(command)
        self._pending += 1

    def receive(self, timeout: float = 30.0) -> Any:
        """The answer to the oldest command sent with :meth:`send`."""
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name} (pid {self.process.pid}) gave no answer in {timeout}s")
        self._pending -= 1
        status, payload = self._conn.recv()
        if status == "ok":
            return payload
        raise RemoteError(*payload)

    def call(self, *command: Any, timeout: float = 30.0) -> Any:
        """Run a command in the worker and return its answer."""
        self.send(*command)
        return self.receive(timeout)

    def open(self, url: str | dict[str, Any], timeout: float = 30.0, **options: Any) -> Any:
        """Create the worker's TieredCache and wait until its channel is ready; its stats."""
        return self.call("open", url, options, timeout=timeout)

    def stop_signal(self) -> None:
        """SIGSTOP the worker (every thread of it: a frozen process)."""
        os.kill(self.pid, signal.SIGSTOP)

    def cont_signal(self) -> None:
        """SIGCONT the worker."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def terminate(self, timeout: float = 5.0) -> None:
        """Resume, ask the worker to close its cache and exit, then kill it if it is still there."""
        if self.process.pid is None:
            return
        self.cont_signal()
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("exit",))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._conn.close()


def _worker_main(conn: Any) -> None:
    """The worker process: run commands until ``exit`` (or the pipe closes)."""
    cache: Any = None
    client: redis.Redis | None = None
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            name, args = command[0], command[1:]
            if name == "exit":
                return
            try:
                if name == "open":
                    cache, client = _worker_open(*args)
                    result: Any = cache.stats()
                elif name == "close":
                    if cache is not None:
                        cache.close()
                    cache = None
                    result = None
                else:
                    result = _worker_command(cache, name, args)
            except BaseException as exc:  # every failure goes back to the test
                conn.send(("err", (type(exc).__name__, f"{exc}\n{traceback.format_exc()}")))
            else:
                conn.send(("ok", result))
    finally:
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _worker_open(url: str | dict[str, Any], options: dict[str, Any]) -> tuple[Any, Any]:
    from tiercache.tiered import TieredCache

    client = None
    target: Any = url
    if isinstance(url, dict):
        client = routed_client(
            url["host"],
            url["port"],
            listener_port=url.get("listener_port"),
            socket_timeout=options.get("socket_timeout", 2.0),
        )
        target = client
    options = dict(options)
    impl = options.pop("impl", "sync")
    if impl == "sync":
        cache = TieredCache(target, **options)
    else:  # an AsyncTieredCache behind the sync facade (its own event loop thread)
        from tests.aio_facade import make_cache

        cache = make_cache(impl, target, **options)
    if not cache.wait_ready(options.get("startup_timeout", 5.0) + 5.0):
        raise TimeoutError("the worker's cache did not become ready")
    return cache, client


def _worker_command(cache: Any, name: str, args: tuple[Any, ...]) -> Any:
    if cache is None and name not in ("pid", "threads"):
        raise RuntimeError("no cache: send 'open' first")
    if name == "set":
        cache[args[0]] = args[1]
        return None
    if name == "get":
        return cache.get(args[0])
    if name == "invalidate":
        return cache.invalidate(args[0])
    if name == "stats":
        return cache.stats()
    if name == "entry":
        import tiercache
        from tiercache.keys import encode_key, local_key

        e = cache.local.entry(local_key(args[0], encode_key(args[0])))
        if e is None:
            return None
        absent = e.value is getattr(tiercache, "MISSING", object())  # a cached absence
        return (None if absent else e.value), e.version
    if name == "local_len":
        return len(cache.local)
    if name == "pid":
        return os.getpid()
    if name == "threads":
        return threading.active_count()
    if name == "read_until":
        key, expected, timeout = args
        return read_until(cache, key, expected, timeout)
    if name == "set_many":
        keys, value = args
        for k in keys:
            cache[k] = value
        return len(keys)
    if name == "history":
        return run_history(cache, **args[0])
    raise ValueError(f"unknown command {name!r}")


def read_until(cache: Any, key: Hashable, expected: Any, timeout: float) -> float | None:
    """Read ``key`` until it returns ``expected``; the seconds it took, or None at the deadline."""
    start = time.monotonic()
    while True:
        if cache.get(key) == expected:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.001)


# -- the random workload of one worker ------------------------------------------------------------

# One logged operation: (proc, kind, key index, value, start ns, end ns, outcome).
# kind: "r" read, "w" set, "d" delete. value: the id written, or the id read (None: a miss).
# outcome: "ok"; "info" (a write whose outcome is unknown: it raised CacheUnavailable);
# "fail" (a read that raised CacheUnavailable); "error" (any other exception: a bug).
Op = tuple[int, str, int, Any, int, int, str]


def key_space(procs: int, owned_per_proc: int, contended: int) -> tuple[list[Hashable], list[int]]:
    """The shared keys and their owners (-1: contended, written by everyone).

    Odd-numbered owned keys are tuples, so the slow (encoded) local path is exercised as well as
    the str fast path.
    """
    keys: list[Hashable] = []
    owners: list[int] = []
    for p in range(procs):
        for j in range(owned_per_proc):
            keys.append(f"o{p}.{j}" if j % 2 == 0 else ("o", p, j))
            owners.append(p)
    for j in range(contended):
        keys.append(f"c{j}")
        owners.append(-1)
    return keys, owners


def run_history(
    cache: Any,
    *,
    proc: int,
    keys: list[Hashable],
    owners: list[int],
    start_at: float,
    end_at: float,
    rate: float,
    write_ratio: float,
    delete_ratio: float,
    contended_ratio: float,
    seed: int,
    log_path: str,
) -> dict[str, Any]:
    """Run the random mix from ``start_at`` to ``end_at`` (wall clock) and pickle the log."""
    from tiercache.errors import CacheUnavailable

    rng = random.Random(seed)
    own = [i for i, o in enumerate(owners) if o == proc]
    contended = [i for i, o in enumerate(owners) if o < 0]
    ops: list[Op] = []
    errors: list[str] = []
    n = 0
    interval = 1.0 / rate
    now = time.time()
    if start_at > now:
        hold(start_at - now)
    next_at = time.monotonic()
    clock = time.time_ns
    while time.time() < end_at:
        # Pacing of the load generator (bounded rate), not a wait for a condition.
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.1:
            next_at = time.monotonic()
        r = rng.random()
        if r < write_ratio and (own or contended):
            if contended and (not own or rng.random() < contended_ratio):
                idx, kind = rng.choice(contended), "w"
            else:
                idx = rng.choice(own)
                kind = "d" if rng.random() < delete_ratio else "w"
            n += 1
            value = f"{proc}:{n}" if kind == "w" else None
            key = keys[idx]
            t0 = clock()
            try:
                if kind == "w":
                    cache[key] = value
                else:
                    cache.invalidate(key)
                outcome = "ok"
            except CacheUnavailable:
                outcome = "info"
            except Exception as exc:
                outcome = "error"
                if len(errors) < 20:
                    errors.append(f"{kind} {key!r}: {type(exc).__name__}: {exc}")
            t1 = clock()
            # A delete is logged with the id "d<proc>:<n>" so every write has a unique id.
            ops.append((proc, kind, idx, value if kind == "w" else f"d{proc}:{n}", t0, t1, outcome))
        else:
            idx = rng.randrange(len(keys))
            key = keys[idx]
            t0 = clock()
            try:
                got = cache.get(key)
                outcome = "ok"
            except CacheUnavailable:
                got, outcome = None, "fail"
            except Exception as exc:
                got, outcome = None, "error"
                if len(errors) < 20:
                    errors.append(f"r {key!r}: {type(exc).__name__}: {exc}")
            t1 = clock()
            ops.append((proc, "r", idx, got, t0, t1, outcome))
    summary = {"proc": proc, "count": len(ops), "errors": errors, "stats": cache.stats()}
    with open(log_path, "wb") as f:
        pickle.dump({"ops": ops, **summary}, f)
    return summary


def load_logs(paths: Iterable[str]) -> tuple[list[Op], list[dict[str, Any]]]:
    """All operations of the workers' logs, and each worker's summary."""
    ops: list[Op] = []
    summaries: list[dict[str, Any]] = []
    for path in paths:
        with open(path, "rb") as f:
            data = pickle.load(f)
        ops.extend(data.pop("ops"))
        summaries.append(data)
    return ops, summaries


# -- the checker ----------------------------------------------------------------------------------


@dataclass
class FaultWindow:
    """An injected fault: its kind and wall-clock span (ns); ``loss``: Redis lost its data."""

    kind: str
    start: int
    end: int
    loss: bool = False


@dataclass
class HistoryReport:
    """What :func:`check_history` found."""

    violations: list[str] = field(default_factory=list)
    reads: int = 0
    writes: int = 0
    failed: int = 0
    errors: int = 0
    checked_exact: int = 0
    checked_contended: int = 0
    misses: int = 0
    staleness_clean: list[float] = field(default_factory=list)  # ms, reads outside fault windows
    staleness_fault: list[float] = field(default_factory=list)  # ms, reads inside fault windows
    violation_count: int = 0
    windows: list[str] = field(default_factory=list)

    def violate(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 25:
            self.violations.append(text)

    def summary(self) -> str:
        clean, fault = self.staleness_clean, self.staleness_fault

        def fmt(values: list[float]) -> str:
            stale = sum(1 for v in values if v > 0)
            return (
                f"n={len(values)} stale>0: {stale} max={max(values, default=0.0):.2f}ms "
                f"p99={percentile(values, 0.99):.2f}ms p50={percentile(values, 0.5):.3f}ms"
            )

        return (
            f"reads={self.reads} (exact {self.checked_exact}, contended {self.checked_contended}, "
            f"misses {self.misses}) writes={self.writes} failed={self.failed} "
            f"errors={self.errors} violations={self.violation_count}\n"
            f"  staleness outside faults: {fmt(clean)}\n"
            f"  staleness in fault windows: {fmt(fault)}\n"
            f"  fault windows: {', '.join(self.windows)}"
        )


def check_history(
    ops: Sequence[Op],
    keys: Sequence[Hashable],
    owners: Sequence[int],
    *,
    delta: float,
    detect: float,
    faults: Sequence[FaultWindow] = (),
) -> HistoryReport:
    """Check a history (see the module docstring); ``delta``/``detect`` in seconds.

    A read that starts inside ``[fault.start, fault.end + detect]`` is held to the bound
    ``fault.end - fault.start + detect``; every other read to ``delta``.
    """
    report = HistoryReport()
    delta_ns, detect_ns = int(delta * 1e9), int(detect * 1e9)
    windows = [(f.start, f.end + detect_ns, f.end - f.start + detect_ns) for f in faults]
    losses = sorted((f.start, f.end) for f in faults if f.loss)

    def bound(t: int) -> tuple[int, bool]:
        best, inside = delta_ns, False
        for lo, hi, width in windows:
            if lo <= t <= hi:
                best, inside = max(best, width), True
        return best, inside

    def loss_between(a: int, b: int) -> bool:
        """Whether data may have been lost after a write that started at ``a``, before ``b``."""
        return any(a < end and start < b for start, end in losses)

    base = min((op[4] for op in ops), default=0)

    def at(t: int) -> str:
        return f"+{(t - base) / 1e9:.3f}s"

    report.windows = [f"{f.kind} {at(f.start)}..{at(f.end)}" for f in faults]
    by_key: dict[int, list[Op]] = {}
    for op in ops:
        if op[6] == "error":
            report.errors += 1
            report.violate(f"unexpected exception in proc {op[0]} ({op[1]} {keys[op[2]]!r})")
            continue
        by_key.setdefault(op[2], []).append(op)

    for idx, key_ops in by_key.items():
        key_ops.sort(key=lambda o: (o[4], o[5]))
        if owners[idx] >= 0:
            _check_owned(report, keys[idx], owners[idx], key_ops, bound, loss_between, at)
        else:
            _check_contended(report, keys[idx], key_ops, bound, loss_between, at)
    return report


def _record(report: HistoryReport, stale_ns: int, inside: bool) -> None:
    (report.staleness_fault if inside else report.staleness_clean).append(max(0, stale_ns) / 1e6)


def _check_owned(
    report: HistoryReport,
    key: Hashable,
    owner: int,
    key_ops: list[Op],
    bound: Callable[[int], tuple[int, bool]],
    loss_between: Callable[[int, int], bool],
    at: Callable[[int], str],
) -> None:
    writes = [o for o in key_ops if o[1] in "wd" and o[0] == owner]
    writes.sort(key=lambda o: o[4])  # the owner's program order = the version order
    rank_of = {o[3]: i + 1 for i, o in enumerate(writes)}
    ok_ends: list[int] = []  # end times of acknowledged writes, increasing with rank
    ok_ranks: list[int] = []
    for i, o in enumerate(writes):
        report.writes += 1
        if o[6] == "ok":
            ok_ends.append(o[5])
            ok_ranks.append(i + 1)
    delete_starts = [(o[4], i + 1) for i, o in enumerate(writes) if o[1] == "d"]

    def acked_before(t: int) -> int:
        """The highest rank acknowledged before ``t`` (0: none)."""
        i = bisect.bisect_left(ok_ends, t)
        return ok_ranks[i - 1] if i else 0

    def first_ack_after_rank(j: int) -> int | None:
        """When the first acknowledged write newer than rank ``j`` was acknowledged."""
        i = bisect.bisect_right(ok_ranks, j)
        return ok_ends[i] if i < len(ok_ranks) else None

    newest_read: dict[int, tuple[int, Any, int]] = {}  # proc -> (rank, value, time) of its newest
    for r in key_ops:
        if r[1] != "r":
            continue
        report.reads += 1
        if r[6] != "ok":
            report.failed += 1
            continue
        report.checked_exact += 1
        proc, value, t0, t1 = r[0], r[3], r[4], r[5]
        width, inside = bound(t0)
        if value is None:
            report.misses += 1
            a0 = acked_before(t0)
            if a0 and writes[a0 - 1][1] == "w":
                later_delete = any(s < t1 and rk > a0 for s, rk in delete_starts)
                if not later_delete and not loss_between(writes[a0 - 1][4], t1):
                    report.violate(
                        f"{key!r}: proc {proc} read a miss at {at(t0)} although "
                        f"{writes[a0 - 1][3]} was acknowledged at {at(writes[a0 - 1][5])} and "
                        f"nothing deleted or lost it"
                    )
            _record(report, 0, inside)
            continue
        j = rank_of.get(value)
        if j is None or writes[j - 1][1] != "w":
            report.violate(f"{key!r}: proc {proc} read {value!r}, which was never written to it")
            continue
        if writes[j - 1][4] > t1:
            report.violate(f"{key!r}: proc {proc} read {value!r} before it was written")
        newer_ack = first_ack_after_rank(j)
        stale = t0 - newer_ack if newer_ack is not None and newer_ack < t0 else 0
        _record(report, stale, inside)
        a = acked_before(t0 - width)
        if j < a:
            report.violate(
                f"{key!r}: proc {proc} read {value!r} (rank {j}) at {at(t0)}, but rank {a} "
                f"({writes[a - 1][3]}) was acknowledged {(t0 - writes[a - 1][5]) / 1e6:.1f} ms "
                f"before (bound {width / 1e6:.0f} ms)"
            )
        if proc == owner:
            own = acked_before(t0)
            if j < own:
                report.violate(
                    f"{key!r}: read-your-writes: owner {proc} read {value!r} (rank {j}) after its "
                    f"write of rank {own} was acknowledged"
                )
        prev = newest_read.get(proc)
        if prev is not None and j < prev[0]:
            report.violate(
                f"{key!r}: monotonic reads: proc {proc} read {value!r} (rank {j}, written "
                f"{at(writes[j - 1][4])}..{at(writes[j - 1][5])}) at {at(t0)}..{at(t1)} after "
                f"having read {prev[1]!r} (rank {prev[0]}) at {at(prev[2])}"
            )
        if prev is None or j > prev[0]:
            newest_read[proc] = (j, value, t0)


def _check_contended(
    report: HistoryReport,
    key: Hashable,
    key_ops: list[Op],
    bound: Callable[[int], tuple[int, bool]],
    loss_between: Callable[[int, int], bool],
    at: Callable[[int], str],
) -> None:
    writes = {o[3]: o for o in key_ops if o[1] == "w"}
    report.writes += len(writes)
    acked = [o for o in writes.values() if o[6] == "ok"]
    by_start = sorted(acked, key=lambda o: o[4])
    starts = [o[4] for o in by_start]
    # suffix minimum of the ack times over writes sorted by start
    suffix_min_end = [0] * (len(by_start) + 1)
    suffix_min_end[-1] = 2**63
    for i in range(len(by_start) - 1, -1, -1):
        suffix_min_end[i] = min(by_start[i][5], suffix_min_end[i + 1])
    by_end = sorted(acked, key=lambda o: o[5])
    ends = [o[5] for o in by_end]
    prefix_max_start = []
    best = -1
    for o in by_end:
        best = max(best, o[4])
        prefix_max_start.append(best)

    def first_ack_of_newer(w: Op) -> int | None:
        """The earliest acknowledgement of a write that surely follows ``w`` (started after it)."""
        i = bisect.bisect_right(starts, w[5])
        m = suffix_min_end[i]
        return None if m == 2**63 else m

    newest_start: dict[int, tuple[int, Any, int]] = {}  # proc -> latest write start it read
    for r in key_ops:
        if r[1] != "r":
            continue
        report.reads += 1
        if r[6] != "ok":
            report.failed += 1
            continue
        report.checked_contended += 1
        proc, value, t0, t1 = r[0], r[3], r[4], r[5]
        width, inside = bound(t0)
        if value is None:
            report.misses += 1
            i = bisect.bisect_left(ends, t0)
            if i:
                latest = prefix_max_start[i - 1]
                if not loss_between(latest, t1):
                    report.violate(
                        f"{key!r}: proc {proc} read a miss at {at(t0)} after a write started at "
                        f"{at(latest)} was acknowledged, with no loss of data in between"
                    )
            _record(report, 0, inside)
            continue
        w = writes.get(value)
        if w is None:
            report.violate(f"{key!r}: proc {proc} read {value!r}, which was never written to it")
            continue
        if w[4] > t1:
            report.violate(f"{key!r}: proc {proc} read {value!r} before it was written")
        newer = first_ack_of_newer(w)
        stale = t0 - newer if newer is not None and newer < t0 else 0
        _record(report, stale, inside)
        if newer is not None and newer < t0 - width:
            report.violate(
                f"{key!r}: proc {proc} read {value!r} at {at(t0)}, but a newer write was "
                f"acknowledged {(t0 - newer) / 1e6:.1f} ms before (bound {width / 1e6:.0f} ms)"
            )
        prev = newest_start.get(proc)
        if prev is not None and w[5] < prev[0]:
            report.violate(
                f"{key!r}: monotonic reads: proc {proc} read {value!r} at {at(t0)} after having "
                f"read {prev[1]!r} at {at(prev[2])}, written after {value!r} was acknowledged"
            )
        if prev is None or w[4] > prev[0]:
            newest_start[proc] = (w[4], value, t0)


def soak_only(request: Any) -> None:
    """Skip a ``slow`` test unless the run selected slow tests (``-m slow``: ``make soak``)."""
    import pytest

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a soak variant: run with -m slow (make soak)")


# -- a MONITOR tap: which commands Redis executed, from which client, in which order -------------

_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Executed:
    """One command Redis executed (a MONITOR line): client address ("lua" inside a script)."""

    index: int
    client: str
    args: tuple[bytes, ...]

    @property
    def command(self) -> str:
        return self.args[0].decode(errors="replace").upper() if self.args else ""


class MonitorTap:
    """A raw MONITOR connection read by a thread, so a test can wait for a command to execute.

    Staging with it needs no timing: "wait until A's GET of k has executed, then write" is exact.
    """

    def __init__(self, host: str, port: int, password: str | None = None) -> None:
        self._sock = socket.create_connection((host, port), timeout=5.0)
        if password:
            self._sock.sendall(b"AUTH %s\r\n" % password.encode())
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self.executed: list[Executed] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="monitor-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = b""
        while not self._stop:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            parsed = [e for e in (self._parse(line) for line in lines) if e is not None]
            if parsed:
                with self._cond:
                    for client, args in parsed:
                        self.executed.append(Executed(len(self.executed), client, args))
                    self._cond.notify_all()

    @staticmethod
    def _parse(line: bytes) -> tuple[str, tuple[bytes, ...]] | None:
        if not line.startswith(b"+") or b"[" not in line or line == b"+OK":
            return None
        head, _, rest = line.partition(b"] ")
        client = head.rsplit(b" ", 1)[-1].decode(errors="replace")
        args = tuple(
            m.group(1).decode("unicode_escape").encode("latin-1") for m in _QUOTED.finditer(rest)
        )
        return client, args

    def wait_for(
        self, predicate: Callable[[Executed], bool], timeout: float, *, after: int = -1
    ) -> Executed:
        """The first executed command with index > ``after`` matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.executed[after + 1 :]:
                    if predicate(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the awaited command was not executed in time")
                self._cond.wait(min(left, 0.1))

    @property
    def last_index(self) -> int:
        with self._cond:
            return len(self.executed) - 1

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(5.0)
