"""Real Redis Cluster and Sentinel set-ups for the tests, built from Python and stopped by pid.

``ClusterSet`` starts ``masters`` (+ ``replicas`` per master) ``redis-server --cluster-enabled yes``
processes on free 127.0.0.1 ports and wires them with plain commands (``CLUSTER ADDSLOTSRANGE``,
``MEET``, ``REPLICATE``), so no ``redis-cli`` binary is needed (Valkey's pip build lacks one).
``SentinelSet`` starts a master, a replica and three ``redis-server --sentinel`` processes.
Every wait has a deadline (``tests.servers.wait_until``); teardown stops each process by pid.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from tests.servers import _stop_and_check, pid_alive, wait_until
from tiercache.cluster import CLUSTER_PARTITIONS
from tiercache.server import HOST, RedisServer, _free_port, _pdeathsig_preexec

SLOTS = 16384


def _node_args(node_timeout_ms: int) -> list[str]:
    return [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--cluster-require-full-coverage",
        "no",
        "--cluster-replica-validity-factor",
        "0",
    ]


class ClusterSet:
    """A running cluster: ``masters`` primaries, each with ``replicas`` replicas."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.masters: list[RedisServer] = []
        self.replicas: list[RedisServer] = []
        self._want = (masters, replicas)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> ClusterSet:
        """Start every node, assign the slots evenly, attach the replicas; wait for state ok."""
        masters, replicas = self._want
        args = _node_args(self.node_timeout_ms)
        if self.password is not None:
            args += ["--masterauth", self.password]
        try:
            for _ in range(masters):
                self.masters.append(self._node(args))
            for _ in range(masters * replicas):
                self.replicas.append(self._node(args))
            self._wire(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, args: list[str]) -> RedisServer:
        server = RedisServer(
            bloom=False, extra_args=args, die_with_parent=True, password=self.password
        )
        return server.start()

    def _wire(self, timeout: float) -> None:
        nodes = self.masters + self.replicas
        per = SLOTS // len(self.masters)
        for i, m in enumerate(self.masters):
            c = self.raw(m)
            c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            end = SLOTS - 1 if i == len(self.masters) - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)
        first = self.raw(nodes[0])
        for n in nodes[1:]:
            first.execute_command("CLUSTER", "MEET", HOST, n.port)
        wait_until(
            lambda: all(len(self._nodes_lines(n)) == len(nodes) for n in nodes),
            timeout,
            interval=0.05,
            message="every node knows every other",
        )
        for j, r in enumerate(self.replicas):
            master = self.masters[j % len(self.masters)]
            self.raw(r).execute_command("CLUSTER", "REPLICATE", self.node_id(master))
        self.wait_ok(timeout)

    def stop(self) -> None:
        """Stop every node by pid (and check it is gone)."""
        errors: list[BaseException] = []
        for s in self.masters + self.replicas:
            try:
                _stop_and_check(s)
            except BaseException as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- inspection ----------------------------------------------------------------------------

    @staticmethod
    def raw(server: RedisServer) -> redis.Redis:
        """A plain client of one node (no cluster routing)."""
        return server.client(socket_timeout=5.0)

    def _nodes_lines(self, server: RedisServer) -> list[str]:
        try:
            out = self.raw(server).execute_command("CLUSTER", "NODES")
        except redis.RedisError:
            return []
        text = out.decode() if isinstance(out, bytes) else out
        return [line for line in text.splitlines() if line.strip()]

    def node_id(self, server: RedisServer) -> str:
        """The cluster node id of a server."""
        out = self.raw(server).execute_command("CLUSTER", "MYID")
        return out.decode() if isinstance(out, bytes) else out

    def live(self) -> list[RedisServer]:
        """The nodes whose process runs."""
        return [s for s in self.masters + self.replicas if s.running]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports cluster_state:ok and sees every slot served."""

        def ok() -> bool:
            for s in self.live():
                info = self.raw(s).execute_command("CLUSTER", "INFO")
                info = info.decode() if isinstance(info, bytes) else info
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
            return True

        wait_until(
            ok, timeout, interval=0.05, message="cluster_state ok", ignore=(redis.RedisError,)
        )
        wait_until(
            self._served,
            timeout,
            interval=0.05,
            message="every slot served by a live master",
            ignore=(redis.RedisError,),
        )

    def _served(self) -> bool:
        """Whether every live node maps all 16384 slots to live masters."""
        ports = {s.port for s in self.live()}
        for s in self.live():
            ranges = self.raw(s).execute_command("CLUSTER", "SLOTS")
            if sum(end - start + 1 for start, end, *_ in ranges) != SLOTS:
                return False
            if any(int(primary[1]) not in ports for _, _, primary, *_ in ranges):
                return False
        return True

    def owner(self, slot: int) -> RedisServer:
        """The live master serving ``slot`` (as the nodes agree)."""
        for s in self.live():
            for start, end, primary, *_ in self.raw(s).execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(x for x in self.live() if x.port == port)
        raise LookupError(f"slot {slot} is not served")

    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node."""
        return [(HOST, s.port) for s in self.masters + self.replicas]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL of the first master."""
        auth = ""
        if self.password is not None:
            auth = ":" + urllib.parse.quote(self.password, safe="") + "@"
        return f"redis+cluster://{auth}{HOST}:{self.masters[0].port}"

    def client(self, **kwargs: Any) -> RedisCluster:
        """A RedisCluster client with short timeouts."""
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 1.0)
        kwargs.setdefault("password", self.password)
        return RedisCluster(host=HOST, port=self.masters[0].port, **kwargs)

    paused = False  # (the history runner asks, as of a RedisServer)
    can_restart = False  # a node restarted empty would come back as a stranger to the cluster

    @property
    def partitions(self) -> int:
        """The number of partitions a TieredCache uses on this cluster by default."""
        return CLUSTER_PARTITIONS

    def raw_view(self) -> ClusterRaw:
        """A client with the few redis.Redis methods the model test uses, over every node."""
        return ClusterRaw(self)

    def kill_pubsub(self) -> int:
        """CLIENT KILL TYPE pubsub on every live node; how many were killed."""
        return sum(int(self.raw(s).client_kill_filter(_type="pubsub")) for s in self.live())

    def flushall(self) -> None:
        """Empty every live master (replicas follow)."""
        for s in self.live():
            with contextlib.suppress(redis.ReadOnlyError, redis.ResponseError):
                self.raw(s).flushall()

    # -- faults --------------------------------------------------------------------------------

    def migrate_slot(self, slot: int, target: RedisServer) -> None:
        """Move ``slot`` to ``target`` as redis-cli does: IMPORTING/MIGRATING, MIGRATE, NODE."""
        source = self.owner(slot)
        if source is target:
            return
        self.begin_migration(slot, source, target)
        self.move_keys(slot, source, target)
        self.finish_migration(slot, source, target)

    def begin_migration(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """CLUSTER SETSLOT IMPORTING on the target, MIGRATING on the source."""
        self.raw(target).execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source)
        )
        self.raw(source).execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target)
        )

    def move_keys(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """MIGRATE every key of ``slot`` from source to target; how many."""
        src = self.raw(source)
        moved = 0
        deadline = time.monotonic() + 30.0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "REPLACE", "KEYS", *keys)
            moved += len(keys)
            if time.monotonic() > deadline:
                raise TimeoutError(f"slot {slot} did not drain in time")
        return moved

    def finish_migration(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """CLUSTER SETSLOT NODE on the target, the source, then the others."""
        target_id = self.node_id(target)
        self.raw(target).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.raw(source).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for s in self.live():
            if s not in (source, target):
                with contextlib.suppress(redis.ResponseError):
                    self.raw(s).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def kill_master_of(self, slot: int, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the master of ``slot``; wait until a replica has taken over (state ok)."""
        victim = self.owner(slot)
        victim.kill()
        self.masters.remove(victim)
        self.wait_ok(timeout)
        promoted = self.owner(slot)
        if promoted not in self.masters:
            self.replicas.remove(promoted)
            self.masters.append(promoted)
        return promoted


class ClusterRaw:
    """``redis.Redis``-like access to a cluster for tests written for one server: routed GET,
    CLIENT LIST of every node (one entry per client name, ids as ``port:id``), CLIENT KILL by
    such an id, CLIENT KILL TYPE on every node, FLUSHALL of every master."""

    def __init__(self, cluster: ClusterSet) -> None:
        self._cluster = cluster
        self._client = cluster.client()

    def get(self, name: bytes) -> bytes | None:
        """GET routed to the key's master."""
        return self._client.get(name)  # type: ignore[no-any-return]

    def client_list(self) -> list[dict[str, Any]]:
        """Clients of every live node, the first connection of each name only."""
        out: dict[str, dict[str, Any]] = {}
        for s in self._cluster.live():
            for c in self._cluster.raw(s).client_list():
                c = dict(c, id=f"{s.port}:{c['id']}")
                out.setdefault(str(c.get("name", "")) or c["id"], c)
        return list(out.values())

    def execute_command(self, *args: Any) -> Any:
        """Only ``CLIENT KILL ID port:id``."""
        if [str(a).upper() for a in args[:3]] != ["CLIENT", "KILL", "ID"]:
            raise NotImplementedError(args)
        port, _, cid = str(args[3]).partition(":")
        server = next(s for s in self._cluster.live() if s.port == int(port))
        return self._cluster.raw(server).execute_command("CLIENT", "KILL", "ID", cid)

    def client_kill_filter(self, _type: str) -> int:
        """CLIENT KILL TYPE on every node."""
        assert _type == "pubsub"
        return self._cluster.kill_pubsub()

    def flushall(self) -> None:
        """FLUSHALL on every master."""
        self._cluster.flushall()

    def close(self) -> None:
        """Close the cluster client."""
        self._client.close()


class SentinelSet:
    """A master, one replica and three sentinels watching them as ``service``."""

    def __init__(self, service: str = "tcmaster", down_after_ms: int = 1000) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.master = RedisServer(bloom=False, die_with_parent=True)
        self.replica = RedisServer(bloom=False, die_with_parent=True)
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []
        self._dirs: list[Path] = []
        self.paused = False  # (the history runner asks, as of a RedisServer)

    def start(self, timeout: float = 30.0) -> SentinelSet:
        """Start the data nodes, then the sentinels; wait until each sentinel sees the replica."""
        try:
            self.master.start()
            self.replica.start()
            self.replica.client().execute_command("REPLICAOF", HOST, self.master.port)
            wait_until(
                lambda: self.replica.client().info("replication")["master_link_status"] == "up",
                timeout,
                interval=0.05,
                message="replica linked",
            )
            for _ in range(3):
                self._start_sentinel()
            wait_until(self._sentinels_ready, timeout, interval=0.05, message="sentinels ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self) -> None:
        port = _free_port()
        workdir = Path(tempfile.mkdtemp(prefix="tiercache-sentinel-"))
        conf = workdir / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind {HOST}\ndir {workdir}\n"
            f"sentinel monitor {self.service} {HOST} {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 5000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        binary = self.master.binary
        log = open(workdir / "sentinel.log", "wb")  # noqa: SIM115 - closed by the child's exit
        proc = subprocess.Popen(
            [binary, str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            preexec_fn=_pdeathsig_preexec(),
            close_fds=True,
        )
        log.close()
        self.sentinels.append(proc)
        self.sentinel_ports.append(port)
        self._dirs.append(workdir)

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                c = redis.Redis(host=HOST, port=port, socket_timeout=1.0)
                replicas = c.execute_command("SENTINEL", "REPLICAS", self.service)
                sentinels = c.execute_command("SENTINEL", "SENTINELS", self.service)
            except redis.RedisError:
                return False
            if not replicas or len(sentinels) < 2:
                return False
        return True

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of the sentinels."""
        return [(HOST, p) for p in self.sentinel_ports]

    @property
    def url(self) -> str:
        """A ``redis+sentinel://`` URL naming every sentinel and the service."""
        hosts = ",".join(f"{HOST}:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def current_master(self) -> tuple[str, int]:
        """The master the sentinels name now."""
        c = redis.Redis(host=HOST, port=self.sentinel_ports[0], socket_timeout=1.0)
        host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return (host.decode() if isinstance(host, bytes) else host), int(port)

    def kill_master(self, timeout: float = 30.0) -> None:
        """SIGKILL the master; wait until the sentinels promote the replica."""
        old = self.master.port
        self.master.kill()
        self._await_promotion(old, timeout)

    def failover(self, timeout: float = 30.0) -> None:
        """``SENTINEL FAILOVER``: the replica is promoted, the old master turns replica (alive)."""
        old = self.master.port
        c = redis.Redis(host=HOST, port=self.sentinel_ports[0], socket_timeout=2.0)
        c.execute_command("SENTINEL", "FAILOVER", self.service)
        self._await_promotion(old, timeout)
        wait_until(
            lambda: self.replica.client().info("replication").get("master_link_status") == "up",
            timeout,
            interval=0.05,
            message="the old master replicating from the new one",
            ignore=(redis.RedisError,),
        )

    def _await_promotion(self, old: int, timeout: float) -> None:
        wait_until(
            lambda: self.current_master()[1] != old,
            timeout,
            interval=0.05,
            message="sentinels promoted the replica",
            ignore=(redis.RedisError,),
        )
        wait_until(
            lambda: self.replica.client().info("replication")["role"] == "master",
            timeout,
            interval=0.05,
            message="replica is master",
            ignore=(redis.RedisError,),
        )
        self.master, self.replica = self.replica, self.master

    def stop(self) -> None:
        """Stop sentinels and data nodes by pid."""
        for proc in self.sentinels:
            if proc.poll() is None:
                os.kill(proc.pid, 15)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait(timeout=5.0)
            wait_until(lambda p=proc.pid: not pid_alive(p), 5.0, message="sentinel gone")
        self.sentinels.clear()
        for d in self._dirs:
            with contextlib.suppress(OSError):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
        for s in (self.replica, self.master):
            _stop_and_check(s)


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[ClusterSet]:
    """One 3-master cluster (no replicas) for the session's cheap cluster tests."""
    cluster = ClusterSet(3, 0).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_with_replicas() -> Iterator[ClusterSet]:
    """A fresh 3-master cluster with one replica each, for failover tests."""
    cluster = ClusterSet(3, 1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    """A master + replica + 3 sentinels for a test module (a failover test ends its use)."""
    s = SentinelSet().start()
    try:
        yield s
    finally:
        s.stop()
