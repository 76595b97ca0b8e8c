"""Child processes of the TieredCache benchmarks (``bench/test_tiered.py``), started with spawn.

- :class:`Peer`: "process B", another OS process on the same Redis, driven by commands over a
  pipe. It opens TieredCaches whose listener thread timestamps each invalidation it applies
  (``time.monotonic_ns``: CLOCK_MONOTONIC, one clock for every process on the host), receives raw
  redis-py pub/sub messages for the baseline, and can keep a thread busy running Python (an
  application under load: the listener then waits for the GIL).
- :func:`run_child`: run one function in a fresh process (the memory probes), with a timeout.

Every process is joined with a timeout and killed if it does not exit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from typing import Any

CTX = mp.get_context("spawn")
CALL_TIMEOUT = 120.0
JOIN_TIMEOUT = 10.0

# -- process B ------------------------------------------------------------------------------------


def _peer_main(conn: Any, url: str) -> None:
    from tiercache import TieredCache
    from tiercache.driver import make_client
    from tiercache.keys import local_key_of

    class ProbedCache(TieredCache):
        """A TieredCache whose listener notes when it dropped a local copy (while armed)."""

        probe: list[tuple[int, bytes, bool, bool]] | None = None

        def apply(self, msg: Any) -> None:
            probe = self.probe
            if probe is None:
                super().apply(msg)
                return
            lkey = local_key_of(msg.key)
            had = self.local.peek(lkey, None) is not None
            super().apply(msg)
            t = time.monotonic_ns()  # right after the local copy was popped
            probe.append((t, msg.key, had, self.local.peek(lkey, None) is None))

    caches: dict[str, ProbedCache] = {}
    busy: tuple[threading.Event, threading.Thread] | None = None

    def busy_loop(stop: threading.Event) -> None:
        d = {i: i for i in range(1000)}
        while not stop.is_set():
            for i in range(1000):
                d.get(i)

    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "close":
                break
            if cmd == "open":  # name, namespace, kwargs
                name, ns, kw = args
                c = caches[name] = ProbedCache(url, namespace=ns, **kw)
                conn.send(c.wait_ready(10.0))
            elif cmd == "preload":  # name, keys: read each (an L2 hit fills the local tier)
                c = caches[args[0]]
                for k in args[1]:
                    c[k]
                conn.send(sum(c.local.peek(k, None) is not None for k in args[1]))
            elif cmd == "arm":
                caches[args[0]].probe = []
                conn.send(True)
            elif cmd == "collect":
                c = caches[args[0]]
                out, c.probe = c.probe or [], None
                conn.send(out)
            elif cmd == "stats":
                conn.send(caches[args[0]].stats())
            elif cmd == "busy":
                if busy is not None:
                    busy[0].set()
                    busy[1].join(JOIN_TIMEOUT)
                    busy = None
                if args[0]:
                    stop = threading.Event()
                    t = threading.Thread(target=busy_loop, args=(stop,), daemon=True)
                    t.start()
                    busy = (stop, t)
                conn.send(True)
            elif cmd == "raw_sub":  # channel, n, end marker, client settings
                channel, n, end, kw = args
                client = make_client(url, **kw)
                ps = client.pubsub(ignore_subscribe_messages=False)
                ps.subscribe(channel)
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline:
                    m = ps.get_message(timeout=0.1)
                    if m is not None and m["type"] == "subscribe":
                        break
                conn.send("ready")
                got: list[tuple[int, bytes]] = []
                deadline = time.monotonic() + CALL_TIMEOUT
                while len(got) < n and time.monotonic() < deadline:
                    m = ps.get_message(timeout=0.1)  # as the listener polls
                    if m is None or m["type"] != "message":
                        continue
                    t = time.monotonic_ns()
                    if m["data"] == end:
                        break
                    got.append((t, m["data"]))
                ps.close()
                client.close()
                conn.send(got)
            else:
                conn.send(ValueError(f"unknown command {cmd!r}"))
    finally:
        if busy is not None:
            busy[0].set()
        for c in caches.values():
            c.close()
        conn.close()


class Peer:
    """Process B: ``call(cmd, *args)`` sends a command and returns its reply (with a timeout)."""

    def __init__(self, url: str) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=_peer_main, args=(child, url), name="bench-peer", daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, *args))

    def reply(self, timeout: float = CALL_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"bench peer pid={self.proc.pid} did not answer in {timeout}s")
        out = self.conn.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def call(self, cmd: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        self.send(cmd, *args)
        return self.reply(timeout)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(JOIN_TIMEOUT)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(JOIN_TIMEOUT)
        self.conn.close()


# -- one-shot children ----------------------------------------------------------------------------


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(fn(*args))
    except BaseException as exc:  # reported to the parent
        conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_child(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = CALL_TIMEOUT,
    env: dict[str, str] | None = None,
) -> Any:
    """``fn(*args)`` in a fresh spawned process (``env``: variables set around its start)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=_child_main, args=(child, fn, args), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"child pid={proc.pid} ({fn.__name__}) gave no result in {timeout}s")
        out = parent.recv()
    finally:
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN_TIMEOUT)
        parent.close()
    if isinstance(out, Exception):
        raise out
    return out


# -- memory probes --------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(kind: str, n: int, method: str) -> float:
    """Bytes per entry a container of ``kind`` holds for ``n`` str keys -> int values, net of the
    keys and values (created, and kept alive, before the measurement starts).

    ``method``: "tracemalloc" (Python allocators: objects, dict tables, PyMem blocks) or "rss"
    (resident set size delta; includes allocator slack). Runs in a fresh process.
    """
    import collections
    import gc
    import tracemalloc

    keys = [f"key:{i:06d}" for i in range(n)]  # 10-char str keys
    values = list(range(n))  # ints (0..256 shared; the rest preallocated here)
    for k in keys:
        hash(k)  # a str caches its hash: computed now, not counted as the container's
    build: Callable[[], Any]
    if kind == "dict":
        build = dict
    elif kind == "OrderedDict":
        build = collections.OrderedDict
    else:  # "<impl>:<config>", impl cython|python, config plain|l1
        impl, config = kind.split(":")
        if impl == "cython":
            from tiercache._local import LocalCache
        else:
            from tiercache._local_py import LocalCache
        if config == "plain":
            build = lambda: LocalCache(2 * n)  # noqa: E731
        else:  # the configuration of a TieredCache's local tier: ttl, version and freshness

            def build() -> Any:
                return LocalCache(2 * n, ttl=60.0)

    obj = build()  # the empty container's own size is not per-entry: create it first
    l1 = kind.endswith(":l1")
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = _rss()
    if l1:
        fresh = time.monotonic() + 60.0
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            obj.set(k, v, version=1_700_000_000_000_000 + i, fresh_until=fresh)
    else:
        for k, v in zip(keys, values, strict=True):
            obj[k] = v
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if method == "tracemalloc" else _rss()
    if method == "tracemalloc":
        tracemalloc.stop()
    assert len(obj) == n
    return (after - before) / n
