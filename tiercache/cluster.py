"""Redis Cluster and Sentinel: a per-slot driver, and a listener that follows the topology.

Sharding scheme. A namespace is split into ``partitions`` (default ``CLUSTER_PARTITIONS`` on a
cluster, 1 elsewhere; every process of a namespace must use the same number). Partition ``p`` is
the hash tag ``{ns:p}``, so it is exactly one hash slot, owned by one master at a time::

    ns:{ns:p}:v:<key>  ns:{ns:p}:r:<key>   entries and refresh markers of the keys hashed to p
    ns:{ns:p}:seq      ns:{ns:p}:log       p's invalidation counter and replay stream
    ns:{ns:p}:inv                          p's sharded pub/sub channel (SPUBLISH/SSUBSCRIBE)

A key goes to partition ``crc32(encoded key) % partitions`` (tiercache.keys). Its entry, version,
lease and tombstone live in one key, next to its partition's counter and log, so every Lua script
touches one slot, runs on that slot's master, and numbers its message in the partition's own
sequence. A master therefore carries the sequences of the partitions whose slots it owns: the
sequence and replay log are per shard, at the granularity of a slot, and move with it when a slot
migrates (MIGRATE carries the counter and the stream like any key). Multi-key operations are
grouped: reads by slot (``MGET`` per slot), fills and leases by node (a cluster pipeline), clears
and scans with one SCAN per master.

Listener. One thread, one raw RESP2 connection per master that owns a partition, ``SSUBSCRIBE``
to each partition's channel on its owner. It resyncs a partition (replays its log from the last
number applied, or has the cache flush the local tier when the log cannot prove continuity), with
the local tier off meanwhile, whenever:

* a connection fails or a PING goes unanswered (node loss, failover): reconnect to the owners
  named by a fresh ``CLUSTER SLOTS`` and resync every partition;
* the server sends ``sunsubscribe`` for a channel (its slot moved away, Redis 7): resubscribe on
  the new owner and resync;
* the periodic audit finds a counter that moved without us (a write that ran on the importing
  node during a migration, after an ASK) or went back (a promoted replica that missed writes).
  The audit reads every counter, then PINGs each connection; once the PONGs are back, every
  message published before the PING has arrived, so a counter still ahead is a loss.

Continuity across failover. A replica promoted with missing writes has an older counter, or the
same number for a different history. A resync therefore checks that the log of the (new) owner
still holds the last message applied here, byte for byte in its fields; if not, the local tier is
flushed. Versions do the rest: a process that saw a newer version invalidated keeps refusing older
ones (FillGuard), and its next write is numbered above it.

Sentinel. ``redis.sentinel.Sentinel(...).master_for(name)`` or ``redis+sentinel://`` gives a
client that finds the master through the sentinels; the listener (the same class, with plain
``SUBSCRIBE`` on the one master) also checks at each audit that the sentinels still name the
master it listens to, and reconnects and resyncs when they do not.

URLs: ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS)
and ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``
(``rediss+sentinel://`` for TLS to the data nodes).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .commands import Call
from .driver import SyncDriver
from .keys import KeySpace, escape_glob
from .listener import HealthCheckFailed, ListenerHandler
from .protocol import Invalidation, SequenceTracker, Verdict, parse_message, replay_plan

log = logging.getLogger("tiercache.cluster")

CLUSTER_PARTITIONS = 16  # default number of partitions (hash slots) of a namespace on a cluster
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class TopologyChanged(redis.ConnectionError):
    """A partition's slot moved (``sunsubscribe``) or its master changed: resubscribe."""


# -- clients ---------------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (a client or a URL) is a Redis Cluster."""
    if isinstance(client, str):
        return _scheme(client) in CLUSTER_SCHEMES
    return isinstance(client, RedisCluster)


def is_sentinel(client: Any) -> bool:
    """Whether ``client`` (a client or a URL) reaches its master through Sentinel."""
    if isinstance(client, str):
        return _scheme(client) in SENTINEL_SCHEMES
    pool = getattr(client, "connection_pool", None)
    return isinstance(pool, SentinelConnectionPool)


def default_partitions(client: Any, partitions: int | None) -> int:
    """``partitions`` if given, else CLUSTER_PARTITIONS for a cluster and 1 otherwise."""
    if partitions is not None:
        return partitions
    return CLUSTER_PARTITIONS if is_cluster(client) else 1


def _hosts(netloc: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """(user, password, [(host, port)...]) of a netloc that may list several hosts."""
    auth, _, hosts = netloc.rpartition("@")
    user = password = None
    if auth:
        u, sep, p = auth.partition(":")
        user = urllib.parse.unquote(u) or None
        password = urllib.parse.unquote(p) if sep else None
    out = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {item!r}")
        out.append((host.strip("[]"), int(port)))
    return user, password, out


def make_cluster_client(
    url: str, *, socket_timeout: float, connect_timeout: float, retries: int
) -> RedisCluster:
    """A RedisCluster client for a ``redis+cluster://`` URL (any listed node is a seed)."""
    parsed = urllib.parse.urlsplit(url)
    user, password, nodes = _hosts(parsed.netloc)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in nodes],
        username=user,
        password=password,
        ssl=parsed.scheme.lower().startswith("rediss"),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), max(retries, 3)),
        decode_responses=False,
    )


def make_sentinel_client(
    url: str, *, socket_timeout: float, connect_timeout: float, retries: int
) -> redis.Redis:
    """The master client of a ``redis+sentinel://hosts/service[/db]`` URL."""
    parsed = urllib.parse.urlsplit(url)
    user, password, nodes = _hosts(parsed.netloc)
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ValueError("a redis+sentinel URL names the service: redis+sentinel://host:port/name")
    db = int(parts[1]) if len(parts) > 1 else 0
    sentinel = Sentinel(
        nodes,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
    )
    return sentinel.master_for(
        urllib.parse.unquote(parts[0]),
        username=user,
        password=password,
        db=db,
        ssl=parsed.scheme.lower().startswith("rediss"),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), max(retries, 3)),
        health_check_interval=0,
        decode_responses=False,
    )


def make_any_client(
    url: str, *, socket_timeout: float, connect_timeout: float, retries: int
) -> Any:
    """A client for a cluster or sentinel URL (None for any other scheme)."""
    kw = {"socket_timeout": socket_timeout, "connect_timeout": connect_timeout, "retries": retries}
    if is_cluster(url):
        return make_cluster_client(url, **kw)
    if is_sentinel(url):
        return make_sentinel_client(url, **kw)
    return None


@contextlib.contextmanager
def _cluster_errors() -> Iterator[None]:
    """redis-py raises some cluster troubles outside RedisError: make them RedisErrors."""
    try:
        yield
    except RedisClusterException as err:
        raise redis.ConnectionError(f"cluster: {err}") from err


# -- driver --------------------------------------------------------------------------------


class ClusterDriver(SyncDriver):
    """SyncDriver on a RedisCluster: scripts per slot, batches grouped per node."""

    sharded = True

    def __init__(self, client: RedisCluster, keys: KeySpace, *, log_maxlen: int = 10_000) -> None:
        super().__init__(client, keys, log_maxlen=log_maxlen)
        self.commands.sharded = True  # SPUBLISH from the write script
        self._ns_prefix = f"{keys.namespace}:{{{keys.namespace}:".encode()

    def listener_class(self) -> type[ShardedListener]:
        """The listener that fits this driver."""
        return ShardedListener

    def call(self, call: Call) -> Any:
        """One round trip, to the master of the call's slot."""
        with _cluster_errors():
            return super().call(call)

    def call_many(self, calls: list[Call]) -> list[Any]:
        """Several calls, one pipeline per node."""
        with _cluster_errors():
            return super().call_many(calls)

    def get(self, name: bytes) -> bytes | None:
        """The raw value under ``name``."""
        with _cluster_errors():
            return self.client.get(name)

    def mget(self, names: list[bytes]) -> list[bytes | None]:
        """Raw values of keys in many slots: one MGET per slot, in input order."""
        if not names:
            return []
        with _cluster_errors():
            return self.client.mget_nonatomic(names)

    def heartbeats(self) -> dict[str, dict[bytes, bytes]]:
        """Every live heartbeat (SCAN on every master)."""
        with _cluster_errors():
            return super().heartbeats()

    def server_time(self) -> tuple[int, int, int]:
        """Redis TIME of the master of partition 0, with the local clock around it."""
        with _cluster_errors():
            node = self.client.get_node_from_key(self.keys.counter(0))
            sent = time.time_ns()
            seconds, micros = self.client.get_redis_connection(node).time()
            return seconds * 1_000_000 + micros, sent, time.time_ns()

    def owner(self, partition: int) -> ClusterNode:
        """The master that owns a partition's slot, as the client's slot map says."""
        with _cluster_errors():
            return self.client.get_node_from_key(self.keys.counter(partition))

    def by_node(self, partitions: Iterable[int]) -> dict[str, tuple[ClusterNode, list[int]]]:
        """Partitions grouped by the master that owns them: name -> (node, partitions)."""
        out: dict[str, tuple[ClusterNode, list[int]]] = {}
        for p in partitions:
            node = self.owner(p)
            out.setdefault(node.name, (node, []))[1].append(p)
        return out

    def _partition_of(self, name: bytes) -> int | None:
        if not name.startswith(self._ns_prefix):
            return None
        end = name.find(b"}", len(self._ns_prefix))
        try:
            return int(name[len(self._ns_prefix) : end])
        except ValueError:
            return None

    def _node_scan(self, node: ClusterNode, pattern: bytes) -> Iterator[bytes]:
        with _cluster_errors():
            yield from self.client.get_redis_connection(node).scan_iter(match=pattern, count=1000)

    def _grouped_names(self, partitions: Iterable[int], tail: bytes) -> Iterator[tuple[int, bytes]]:
        """(partition, name) of the names ``ns:{ns:<p>}:<tail>*`` of ``partitions``: one SCAN per
        master, whatever the number of partitions it owns."""
        for node, group in self.by_node(partitions).values():
            wanted = set(group)
            if len(group) == 1:
                pattern = escape_glob(self.keys.prefix(group[0]) + tail) + b"*"
            else:
                pattern = escape_glob(self._ns_prefix) + b"*" + escape_glob(b"}:" + tail) + b"*"
            for name in self._node_scan(node, pattern):
                p = self._partition_of(name)
                if p in wanted and name.startswith(self.keys.prefix(p) + tail):
                    yield p, name

    def scan_values(self, partition: int, count: int = 1000) -> Iterator[bytes]:
        """Entry names of one partition holding a value (SCAN on its master)."""
        yield from self.scan_values_of([partition], count)

    def scan_values_of(self, partitions: Iterable[int], count: int = 1000) -> Iterator[bytes]:
        """Entry names of several partitions holding a value, one SCAN per master."""
        names: list[bytes] = []
        for _, name in self._grouped_names(partitions, b"v:"):
            names.append(name)
            if len(names) >= count:
                yield from self._holding_values(names)
                names = []
        yield from self._holding_values(names)

    def unlink_partition(self, partition: int, prefix: bytes = b"", batch: int = 500) -> int:
        """Unlink one partition's keys (see ``unlink_partitions``)."""
        return self.unlink_partitions([partition], prefix, batch)

    def unlink_partitions(
        self, partitions: Iterable[int], prefix: bytes = b"", batch: int = 500
    ) -> int:
        """Unlink the keys of ``partitions`` but their counters and logs (or only the entries
        whose encoded key starts with ``prefix``): one SCAN per master, UNLINK per slot."""
        tail = b"v:" + prefix if prefix else b""
        pending: dict[int, list[bytes]] = defaultdict(list)
        removed = 0
        for p, name in self._grouped_names(partitions, tail):
            if name in self.commands.kept_by_clear(p):
                continue
            pending[p].append(name)
            if len(pending[p]) >= batch:
                removed += self._unlink(pending.pop(p))
        for names in pending.values():
            removed += self._unlink(names)
        return removed

    def _unlink(self, names: list[bytes]) -> int:
        with _cluster_errors():
            return int(self.client.unlink(*names))  # one slot: one node

    def positions(self, partitions: Sequence[int]) -> dict[int, int]:
        """The counters of several partitions (one pipeline per node)."""
        replies = self.call_many([self.commands.position(p) for p in partitions])
        out = {}
        for p, r in zip(partitions, replies, strict=True):
            if isinstance(r, Exception):
                raise r
            out[p] = r
        return out

    def refresh_topology(self) -> None:
        """Re-read the slot map from the cluster."""
        with _cluster_errors():
            self.client.nodes_manager.initialize()

    def subscriber(self, node: ClusterNode, client_name: str) -> Any:
        """A new raw connection to ``node`` with the client's settings (AUTH, TLS, timeouts)."""
        pool = self.client.get_redis_connection(node).connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["client_name"] = client_name
        kwargs["protocol"] = 2
        conn = pool.connection_class(**kwargs)
        conn.connect()
        return conn


class SentinelDriver(SyncDriver):
    """SyncDriver on a Sentinel-managed master client."""

    sharded = False

    def listener_class(self) -> type[ShardedListener]:
        """The listener that fits this driver."""
        return ShardedListener

    def positions(self, partitions: Sequence[int]) -> dict[int, int]:
        """The counters of several partitions in one round trip."""
        replies = self.call_many([self.commands.position(p) for p in partitions])
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return dict(zip(partitions, replies, strict=True))

    def master_address(self) -> tuple[str, int]:
        """The master the sentinels name now."""
        pool = self.client.connection_pool
        host, port = pool.get_master_address()
        return str(host), int(port)


def open_driver(client: Any, keys: KeySpace, *, log_maxlen: int) -> SyncDriver:
    """The driver that fits ``client``: cluster, sentinel or a plain SyncDriver."""
    if is_cluster(client):
        return ClusterDriver(client, keys, log_maxlen=log_maxlen)
    if is_sentinel(client):
        return SentinelDriver(client, keys, log_maxlen=log_maxlen)
    return SyncDriver(client, keys, log_maxlen=log_maxlen)


# -- listener -------------------------------------------------------------------------------------


class _Link:
    """One subscriber connection and the partitions it carries."""

    __slots__ = ("address", "conn", "partitions", "pong_due")

    def __init__(self, conn: Any, address: tuple[str, int], partitions: list[int]) -> None:
        self.conn = conn
        self.address = address
        self.partitions = partitions
        self.pong_due: float | None = None


class ShardedListener:
    """The listener of a cluster (SSUBSCRIBE per partition on its master) or a Sentinel master
    (SUBSCRIBE on the master the sentinels name), with per-partition resync and the audit."""

    def __init__(
        self,
        driver: ClusterDriver | SentinelDriver,
        handler: ListenerHandler,
        *,
        partitions: Sequence[int] = (0,),
        health_interval: float = 1.0,
        health_timeout: float = 1.0,
        subscribe_timeout: float = 2.0,
        max_backoff: float = 1.0,
        name: str = "tiercache-listener",
    ) -> None:
        self._driver = driver
        self._handler = handler
        self._sharded = isinstance(driver, ClusterDriver)
        self._partitions = list(partitions)
        self._channels = {driver.keys.channel(p): p for p in self._partitions}
        self._trackers = {p: SequenceTracker() for p in self._partitions}
        self._last: dict[int, Invalidation | None] = dict.fromkeys(self._partitions)
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._subscribe_timeout = subscribe_timeout
        self._max_backoff = max_backoff
        self._name = name
        self._stop = threading.Event()
        self._healthy = threading.Event()
        self._thread: threading.Thread | None = None
        self._links: list[_Link] = []
        self._synced_once = False
        self._was_healthy = False
        self._audit: dict[int, tuple[int, int]] | None = None  # p -> (seq before, counter)
        self.malformed = 0
        self.gaps = 0
        self.disconnects = 0
        self.resubscribes = 0
        self.audit_gaps = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its connections, waiting at most ``timeout`` seconds."""
        self._stop.set()
        self._healthy.clear()
        for link in list(self._links):
            sock = getattr(link.conn, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """Whether every partition's channel is whole."""
        return self._healthy.is_set()

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait_healthy(self, timeout: float) -> bool:
        """Block until healthy or ``timeout`` seconds pass; returns whether healthy."""
        return self._healthy.wait(timeout)

    def heard(self, version: int) -> bool:
        """No echo filter here: every echo reaches the handler (OwnWrites answers)."""
        return False

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.02
        while not self._stop.is_set():
            self._was_healthy = False
            try:
                self._session()
            except (redis.RedisError, OSError, ValueError) as err:
                self.disconnects += 1  # (stats()["disconnects"] counts resubscriptions too)
                if isinstance(err, TopologyChanged):
                    self.resubscribes += 1
                self._set_unhealthy(f"{type(err).__name__}: {err}")
                log.debug("listener %s: %r", self._name, err)
            finally:
                self._close_links()
            if self._was_healthy:
                backoff = 0.02
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self._max_backoff)
        self._close_links()

    def _routes(self) -> list[tuple[tuple[str, int], Callable[[], Any], list[int]]]:
        """(address, connect, partitions) per master to subscribe to."""
        driver = self._driver
        if isinstance(driver, ClusterDriver):
            driver.refresh_topology()
            return [
                (
                    (node.host, node.port),
                    lambda node=node: driver.subscriber(node, self._name),
                    group,
                )
                for node, group in driver.by_node(self._partitions).values()
            ]
        address = driver.master_address()
        return [(address, lambda: driver.listener_connection(self._name), self._partitions)]

    def _session(self) -> None:
        """Subscribe on every owner, resync every partition, then pump until trouble."""
        self._audit = None
        for address, connect, group in self._routes():
            link = _Link(connect(), address, group)
            self._links.append(link)
            command = "SSUBSCRIBE" if self._sharded else "SUBSCRIBE"
            for p in group:  # one command per channel: SSUBSCRIBE takes channels of one slot
                link.conn.send_command(command, self._driver.keys.channel(p))
        for link in self._links:
            self._await_subscriptions(link)
        if self._stop.is_set():
            return
        for p in self._partitions:
            self._catch_up(p)
        self._set_healthy()
        self._pump()

    def _await_subscriptions(self, link: _Link) -> None:
        pending = {self._driver.keys.channel(p) for p in link.partitions}
        deadline = time.monotonic() + self._subscribe_timeout
        while pending and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no subscription acknowledgement in time")
            if not link.conn.can_read(timeout=min(left, 0.1)):
                continue
            reply = link.conn.read_response()
            if isinstance(reply, Exception):  # e.g. MOVED: the slot map changed meanwhile
                raise TopologyChanged(str(reply))
            kind = reply[0]
            if kind in (b"subscribe", b"ssubscribe"):
                pending.discard(reply[1])
            elif kind in (b"message", b"smessage"):
                self._on_message(reply[1], reply[2])
            elif kind == b"sunsubscribe":
                raise TopologyChanged(f"slot of {reply[1]!r} moved while subscribing")

    def _pump(self) -> None:
        next_audit = time.monotonic() + self._health_interval
        while not self._stop.is_set():
            ready = [link for link in self._links if link.conn.can_read(timeout=0)]
            if not ready:
                due = [lk.pong_due for lk in self._links if lk.pong_due is not None]
                wait = min([next_audit, *due]) - time.monotonic()
                socks = [lk.conn._sock for lk in self._links if lk.conn._sock is not None]
                if wait > 0 and socks:
                    select.select(socks, [], [], min(wait, 0.1))
                ready = [link for link in self._links if link.conn.can_read(timeout=0)]
            for link in ready:
                self._handle(link, link.conn.read_response())
            now = time.monotonic()
            for link in self._links:
                if link.pong_due is not None and now > link.pong_due:
                    raise HealthCheckFailed(
                        f"no PONG from {link.address} within {self._health_timeout}s"
                    )
            if self._audit is not None and all(lk.pong_due is None for lk in self._links):
                self._finish_audit()
            if now >= next_audit and self._audit is None:
                next_audit = now + self._health_interval
                self._start_audit()
                self._tick()

    def _handle(self, link: _Link, reply: Any) -> None:
        if isinstance(reply, Exception):
            raise reply
        kind = reply[0]
        if kind in (b"message", b"smessage"):
            self._on_message(reply[1], reply[2])
        elif kind == b"pong":
            link.pong_due = None
        elif kind == b"sunsubscribe":  # the server dropped us: the slot moved to another node
            raise TopologyChanged(f"slot of {reply[1]!r} moved away from {link.address}")

    def _start_audit(self) -> None:
        """Read every counter, then PING every link; compared in ``_finish_audit``."""
        driver = self._driver
        if isinstance(driver, SentinelDriver):
            address = driver.master_address()
            if self._links and address != self._links[0].address:
                raise TopologyChanged(f"the sentinels name {address} as master now")
        before = {p: self._trackers[p].seq for p in self._partitions}
        counters = driver.positions(self._partitions)
        self._audit = {p: (before[p], counters[p]) for p in self._partitions}
        now = time.monotonic()
        for link in self._links:
            link.conn.send_command("PING")
            link.pong_due = now + self._health_timeout

    def _finish_audit(self) -> None:
        audit, self._audit = self._audit or {}, None
        for p, (before, counter) in audit.items():
            if counter < before or self._trackers[p].seq < counter:
                self.audit_gaps += 1
                self.gaps += 1
                self._check_owner(p)
                self._resync(p, f"partition {p}: counter {counter}, applied {before}")

    def _check_owner(self, p: int) -> None:
        """After a loss in partition ``p``: if its slot has another master now, resubscribe."""
        driver = self._driver
        if not isinstance(driver, ClusterDriver):
            return
        driver.refresh_topology()
        node = driver.owner(p)
        link = next(lk for lk in self._links if p in lk.partitions)
        if (node.host, node.port) != link.address:
            raise TopologyChanged(f"partition {p} is served by {node.name} now")

    def _on_message(self, channel: bytes, data: bytes) -> None:
        p = self._channels.get(channel)
        if p is None:
            return
        try:
            inv = parse_message(data)
        except ValueError:
            self.malformed += 1
            return
        verdict = self._trackers[p].classify(inv)
        if verdict is Verdict.APPLY:
            self._last[p] = inv
            self._handler.apply(inv)
        elif verdict is not Verdict.STALE:
            self.gaps += 1
            self._resync(p, f"{verdict.value} in partition {p}")

    def _resync(self, p: int, reason: str) -> None:
        was = self._healthy.is_set()
        self._set_unhealthy(reason)
        self._catch_up(p)
        if was:
            self._set_healthy()

    def _catch_up(self, p: int) -> None:
        """Bring partition ``p`` up to its counter: replay from the log if the log shows our
        last applied message in it, else have the cache flush."""
        tracker = self._trackers[p]
        current = self._driver.position(p)
        plan: list[Invalidation] | None = []
        if tracker.seq and (current != tracker.seq or self._last[p] is not None):
            logged = self._driver.logged_since(p, tracker.seq) if current else []
            plan = replay_plan(tracker.seq, current, logged)
            last = self._last[p]
            if plan is not None and last is not None:
                mine = [m for m in logged if m.seq == last.seq]
                if not mine or _fields(mine[0]) != _fields(last):
                    plan = None  # another history (a promoted replica that missed writes)
        elif current != tracker.seq and tracker.seq == 0 and self._synced_once:
            plan = None if current else []
        if plan is None:
            if self._synced_once:
                reason = f"partition {p}: continuity not provable from the log"
                self._handler.flush(reason, keep_versions=True)  # type: ignore[call-arg]
            self._last[p] = None
        else:
            for inv in plan:
                self._handler.apply(inv)
                self._last[p] = inv
        tracker.seq = current
        if current == 0:
            self._last[p] = None

    def _tick(self) -> None:
        try:
            self._handler.tick()
        except Exception:
            log.debug("listener tick failed", exc_info=True)

    # -- state ---------------------------------------------------------------------------------

    def _set_unhealthy(self, reason: str) -> None:
        if self._healthy.is_set() or not self._synced_once:
            self._healthy.clear()
            self._handler.on_unhealthy(reason)

    def _set_healthy(self) -> None:
        self._was_healthy = True
        if not self._healthy.is_set() and not self._stop.is_set():
            self._handler.on_healthy(recovered=self._synced_once)
            self._synced_once = True
            self._healthy.set()

    def _close_links(self) -> None:
        links, self._links = self._links, []
        for link in links:
            with contextlib.suppress(Exception):
                link.conn.disconnect()


def _fields(m: Invalidation) -> tuple[Any, ...]:
    return (m.seq, m.restart, m.version, m.origin, m.op, m.key, m.sig)
