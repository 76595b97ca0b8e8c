"""Multi-process histories: four or more OS processes, each with its own TieredCache on one real
Redis, run a random mix of reads, writes and deletes on a small shared key space while the test
injects real faults; every operation is logged (wall-clock start/end, the unique id written or
read) and the history is checked afterwards by ``tests.history.check_history``:

* bounded staleness (SPEC 3.4): no read returns a value older than the newest write acknowledged
  more than ``DELTA`` before the read started; a read that starts during a fault or within the
  detection bound after it (``DETECT`` = health_interval + health_timeout + margin) is held to the
  fault's length plus ``DETECT`` instead, so any read after detection must be fresh again;
* per process: monotonic reads, read-your-writes; no value from the future, no unexplained miss;
* every fault that can lose invalidations is detected by every process (``stats()["resyncs"]``).

The measured staleness (max, p99) is printed with the result. ``slow`` variants run longer with
more fault cycles (``make soak``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.history import (
    CacheProcess,
    FaultWindow,
    check_history,
    hold,
    key_space,
    listener_clients,
    load_logs,
    soak_only,
)
from tests.servers import RedisServer
from tiercache.tiered import TieredCache

PROCS = 4
DELTA = 1.0  # the propagation bound of fault-free operation (generous: shared 2-core machines)
HEALTH_INTERVAL = 0.2
HEALTH_TIMEOUT = 0.3
DETECT = HEALTH_INTERVAL + HEALTH_TIMEOUT + 1.0  # detection bound, with a margin for noise
CACHE_OPTIONS: dict[str, Any] = {
    "health_interval": HEALTH_INTERVAL,
    "health_timeout": HEALTH_TIMEOUT,
    "socket_timeout": 0.5,
    "connect_timeout": 0.5,
    "startup_timeout": 5.0,
    "local_ttl": 60.0,  # an undetected loss would show as seconds of staleness
}
WORKLOAD: dict[str, Any] = {
    "rate": 400.0,  # operations per second per process
    "write_ratio": 0.25,
    "delete_ratio": 0.1,
    "contended_ratio": 0.15,
}


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> Iterator[Callable[[int], list[CacheProcess]]]:
    """Start N cache worker processes; all of them are resumed, stopped and killed at teardown."""
    started: list[CacheProcess] = []

    def start(n: int) -> list[CacheProcess]:
        batch = [CacheProcess(f"history-{len(started) + i}") for i in range(n)]
        started.extend(batch)
        return batch

    try:
        yield start
    finally:
        for w in started:
            w.terminate()
        assert not any(w.process.is_alive() for w in started)


class Timeline:
    """The faults the test injected, with wall-clock spans."""

    def __init__(self) -> None:
        self.faults: list[FaultWindow] = []

    @contextlib.contextmanager
    def fault(self, kind: str, *, loss: bool = False) -> Iterator[None]:
        start = time.time_ns()
        try:
            yield
        finally:
            self.faults.append(FaultWindow(kind, start, time.time_ns(), loss))


def _until(t: float) -> None:
    """Hold the workload's phase until wall-clock ``t`` (a phase length, not a wait for a state)."""
    left = t - time.time()
    if left > 0:
        hold(left)


def _run(
    server: RedisServer,
    workers: list[CacheProcess],
    tmp_path: Path,
    duration: float,
    inject: Callable[[float, Timeline, str], None],
    capsys: pytest.CaptureFixture[str],
    label: str,
    *,
    min_resyncs: int,
    owned_per_proc: int = 3,
    contended: int = 2,
    impl: str = "sync",
) -> None:
    """Run the workload for ``duration`` s while ``inject`` runs; check the history.

    ``impl="async"``: the odd-numbered processes use an AsyncTieredCache, the others a
    TieredCache, all on one namespace.
    """
    namespace = f"hist{os.getpid()}x{time.monotonic_ns() % 10**9}"
    keys, owners = key_space(len(workers), owned_per_proc, contended)
    for i, w in enumerate(workers):
        kind = impl if i % 2 else "sync"
        w.send("open", server.url, {"namespace": namespace, **CACHE_OPTIONS, "impl": kind})
    for w in workers:
        w.receive(timeout=60)
    start_at = time.time() + 0.5
    end_at = start_at + duration
    logs = [str(tmp_path / f"log{i}.pickle") for i in range(len(workers))]
    for i, w in enumerate(workers):
        params = {
            "proc": i,
            "keys": keys,
            "owners": owners,
            "start_at": start_at,
            "end_at": end_at,
            "seed": 1000 + i,
            "log_path": logs[i],
            **WORKLOAD,
        }
        w.send("history", params)
    timeline = Timeline()
    try:
        inject(start_at, timeline, namespace)
    finally:
        if server.paused:
            server.resume()
        for w in workers:
            w.cont_signal()
    summaries = [w.receive(timeout=duration + 60) for w in workers]
    ops, _ = load_logs(logs)
    report = check_history(ops, keys, owners, delta=DELTA, detect=DETECT, faults=timeline.faults)
    stats = [s["stats"] for s in summaries]
    with capsys.disabled():
        print(
            f"\n[{label}] {len(workers)} processes, {duration:.0f}s, faults: "
            f"{[f.kind for f in timeline.faults]}"
        )
        print("  " + report.summary())
        print(
            "  per process (resyncs/flushes/gaps/disconnects, local hits/remote hits): "
            + "; ".join(
                f"{s['resyncs']}/{s['flushes']}/{s['gaps']}/{s['disconnects']}, "
                f"{s['local_hits']}/{s['remote_hits']}"
                for s in stats
            )
        )
    errors = [e for s in summaries for e in s["errors"]]
    assert not errors, f"unexpected exceptions in the workers: {errors[:5]}"
    assert report.checked_exact > 1000 and report.writes > 300, "the workload did too little"
    if report.violation_count:
        pytest.fail(
            f"{report.violation_count} consistency violations, first ones:\n  "
            + "\n  ".join(report.violations)
            + f"\n{report.summary()}",
            pytrace=False,
        )
    for i, s in enumerate(stats):
        assert s["resyncs"] >= min_resyncs, (
            f"process {i} reported {s['resyncs']} resyncs for {min_resyncs} injected faults that "
            f"can lose invalidations: a loss went unnoticed (stats {s})"
        )


def _kill_pubsub(server: RedisServer, timeline: Timeline) -> None:
    client = server.client()
    try:
        with timeline.fault("client-kill-pubsub"):
            killed = client.client_kill_filter(_type="pubsub")
        assert killed >= PROCS
    finally:
        client.close()


def _pause_redis(server: RedisServer, timeline: Timeline, seconds: float) -> None:
    with timeline.fault("sigstop-redis"):
        server.pause()
        try:
            hold(seconds)
        finally:
            server.resume()


def _restart_empty(server: RedisServer, timeline: Timeline) -> None:
    with timeline.fault("restart-empty", loss=True):
        server.kill()
        server.restart()


def _flushall(server: RedisServer, timeline: Timeline) -> None:
    client = server.client()
    try:
        with timeline.fault("flushall", loss=True):
            client.flushall()
    finally:
        client.close()


def test_history_under_faults(
    redis_server: RedisServer,
    workers: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    impl: str,
) -> None:
    """4 processes; CLIENT KILL TYPE pubsub, SIGSTOP of Redis for 1.5 s, restart with no data."""
    procs = workers(PROCS)

    def inject(t0: float, timeline: Timeline, namespace: str) -> None:
        _until(t0 + 3.0)
        _kill_pubsub(redis_server, timeline)
        _until(t0 + 6.0)
        _pause_redis(redis_server, timeline, 1.5)
        _until(t0 + 10.5)
        _restart_empty(redis_server, timeline)

    label = f"faults, {impl}"
    _run(redis_server, procs, tmp_path, 14.0, inject, capsys, label, min_resyncs=3, impl=impl)


def _evict_slow_subscriber(
    server: RedisServer, victim: CacheProcess, burst: TieredCache, timeline: Timeline, cycle: int
) -> None:
    """Freeze ``victim``, publish until Redis drops its subscription, then let it run again."""
    client = server.client(decode_responses=True)
    try:
        name = _listener_name_of(client, burst.namespace, victim.pid)
        filler = [f"filler:{cycle}:{i}:" + "x" * 2000 for i in range(50)]
        with timeline.fault("slow-subscriber-evicted"):
            victim.stop_signal()
            try:
                deadline = time.monotonic() + 30.0  # (the writes crawl on a loaded machine)
                while any(c["name"] == name for c in listener_clients(client, burst.namespace)):
                    for k in filler:
                        burst[k] = cycle
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Redis never dropped the frozen subscriber {name}")
                hold(0.3)  # the others keep writing while the victim is frozen and unsubscribed
            finally:
                victim.cont_signal()
    finally:
        client.close()


def _listener_name_of(client: redis.Redis, namespace: str, pid: int) -> str:
    """The name of the listener connection that process ``pid`` holds (matched by its port)."""
    ports = _local_ports(pid)
    for c in listener_clients(client, namespace):
        if int(c["addr"].rsplit(":", 1)[1]) in ports:
            return str(c["name"])
    raise AssertionError(f"process {pid} has no listener connection")


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process' sockets (read from /proc)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def test_history_slow_subscriber_evicted(
    redis_factory: Callable[..., RedisServer],
    workers: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    impl: str,
) -> None:
    """Redis drops a frozen subscriber (``client-output-buffer-limit pubsub 1kb 1kb 0``) while
    the others write: the victim must notice the loss before it serves from its local tier."""
    server = redis_factory(extra_args=["--client-output-buffer-limit", "pubsub 1kb 1kb 0"])
    procs = workers(PROCS)

    def inject(t0: float, timeline: Timeline, namespace: str) -> None:
        with TieredCache(server.url, namespace=namespace, **CACHE_OPTIONS) as burst:
            _until(t0 + 2.0)
            _evict_slow_subscriber(server, procs[1], burst, timeline, 1)
            _until(t0 + 5.5)
            _evict_slow_subscriber(server, procs[3], burst, timeline, 2)
            _until(t0 + 9.0)

    label = f"slow subscriber, {impl}"  # (the victims, 1 and 3, run the parametrized driver)
    _run(server, procs, tmp_path, 10.0, inject, capsys, label, min_resyncs=0, impl=impl)
    # Each victim was dropped by Redis while frozen, and must have resynchronised afterwards.
    for victim in (procs[1], procs[3]):
        stats = victim.call("stats")
        assert stats["resyncs"] >= 1, f"victim {victim.name} never resynchronised: {stats}"


@pytest.mark.slow
def test_history_under_faults_long(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    workers: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """6 processes, 56 s: repeated pub/sub kills, Redis pauses, restarts and FLUSHALLs."""
    soak_only(request)
    procs = workers(6)

    def inject(t0: float, timeline: Timeline, namespace: str) -> None:
        t = t0 + 3.0
        for cycle in range(4):
            _until(t)
            _kill_pubsub(redis_server, timeline)
            _until(t + 3.0)
            _pause_redis(redis_server, timeline, 1.0 + cycle * 0.3)
            _until(t + 7.0)
            if cycle % 2:
                _restart_empty(redis_server, timeline)
            else:
                _flushall(redis_server, timeline)
            t += 13.0

    _run(redis_server, procs, tmp_path, 56.0, inject, capsys, "faults, long", min_resyncs=10)


@pytest.mark.slow
def test_history_slow_subscriber_long(
    request: pytest.FixtureRequest,
    redis_factory: Callable[..., RedisServer],
    workers: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """5 processes, 40 s, a frozen subscriber evicted every 4.5 s (rotating victims)."""
    soak_only(request)
    server = redis_factory(extra_args=["--client-output-buffer-limit", "pubsub 1kb 1kb 0"])
    procs = workers(5)

    def inject(t0: float, timeline: Timeline, namespace: str) -> None:
        with TieredCache(server.url, namespace=namespace, **CACHE_OPTIONS) as burst:
            for cycle in range(8):
                _until(t0 + 2.0 + cycle * 4.5)
                _evict_slow_subscriber(server, procs[cycle % 5], burst, timeline, cycle)

    _run(server, procs, tmp_path, 40.0, inject, capsys, "slow subscriber, long", min_resyncs=0)
