"""The synchronous Redis driver: runs the cache's calls (tiercache.commands) on a redis-py client.

Thin by design: tiercache.commands says what to send and how to read replies, tiercache.protocol
and tiercache.tiered decide; this module only does the I/O. Redis errors propagate as redis-py
raises them; the cache maps them to CacheUnavailable.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from .commands import (
    SCRIPTS,
    Call,
    Commands,
    LeaseResult,
    WriteResult,
    is_value_head,
    lease_envelope,
    load_script_source,
)
from .keys import KeySpace
from .lane import lane_for
from .protocol import Invalidation, parse_message

__all__ = [
    "SCRIPTS",
    "LeaseResult",
    "SyncDriver",
    "WriteResult",
    "is_value_head",
    "lease_envelope",
    "load_script_source",
    "make_client",
]


def make_client(
    url: str, *, socket_timeout: float, connect_timeout: float, retries: int
) -> redis.Redis:
    """A client for ``url`` with bounded timeouts and retries (AUTH/TLS come from the URL)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries),
        health_check_interval=0,
        decode_responses=False,
    )


class SyncDriver:
    """Runs the cache's commands and Lua scripts on one redis-py client."""

    def __init__(self, client: redis.Redis, keys: KeySpace, *, log_maxlen: int = 10_000) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must not decode responses (decode_responses=False)")
        self.client = client
        self.keys = keys
        self.commands = Commands(keys, log_maxlen)
        # Single commands: on the lane when the client allows one (tiercache.lane; not for
        # Cluster or Sentinel clients), else through the client.
        self._lane = lane_for(client)
        self._execute = self._lane.execute if self._lane is not None else client.execute_command

    # -- running calls ----------------------------------------------------------------------

    def call(self, call: Call) -> Any:
        """One round trip (a script: EVALSHA, loading it first if Redis does not know it)."""
        if call.script is None:
            return call.parse(self._execute(*call.args))
        keys, sha = call.keys, self.commands.shas.get(call.script) or self._sha(call.script)
        try:
            reply = self._execute("EVALSHA", sha, len(keys), *keys, *call.args)
        except NoScriptError:  # a restarted Redis
            self.client.script_load(self._source(call.script))
            reply = self._execute("EVALSHA", sha, len(keys), *keys, *call.args)
        return call.parse(reply)

    def call_many(self, calls: list[Call]) -> list[Any]:
        """Several calls in one round trip (a pipeline); an error reply comes back as a value."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for c in calls:
                if c.script is None:
                    pipe.execute_command(*c.args)
                else:
                    pipe.execute_command(
                        "EVALSHA", self._sha(c.script), len(c.keys), *c.keys, *c.args
                    )
            replies = pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
            for name in {c.script for c in calls if c.script is not None}:
                self.client.script_load(self._source(name))
        return [
            r if isinstance(r, Exception) else c.parse(r)
            for c, r in zip(calls, replies, strict=True)
        ]

    def _source(self, name: str) -> str:
        source = self.commands.sources.get(name)
        if source is None:
            source = self.commands.sources[name] = load_script_source(name)
        return source

    def _sha(self, name: str) -> str:
        sha = self.commands.shas.get(name)
        if sha is None:
            sha = self.commands.shas[name] = hashlib.sha1(self._source(name).encode()).hexdigest()
        return sha

    # -- values -----------------------------------------------------------------------------

    def get(self, name: bytes) -> bytes | None:
        """The raw value stored under the key ``name``."""
        return self._execute("GET", name)

    def get_and(self, name: bytes, command: tuple[Any, ...]) -> tuple[bytes | None, Any]:
        """GET ``name`` and run ``command`` in the same round trip; (value, command's reply).

        The command's error (say, an unknown command) comes back as its reply, not raised.
        """
        raw, reply = self.call_many([Call(None, ("GET", name)), Call(None, tuple(command))])
        if isinstance(raw, Exception):
            raise raw
        return raw, reply

    def mget(self, names: list[bytes]) -> list[bytes | None]:
        """The raw values of several keys in one round trip."""
        return self.client.mget(names) if names else []

    def write(self, encoded: bytes, op: str, version: int, envelope: bytes, **kw: Any) -> Any:
        """Store a set ("S") or delete ("D") at ``version`` and announce it (commands.write)."""
        return self.call(self.commands.write(encoded, op, version, envelope, **kw))

    def announce_clear(
        self, partition: int, version: int, origin: str, prefix: bytes = b"", sig: str = "-"
    ) -> WriteResult:
        """Publish a clear of the partition (or of ``prefix``); its entries are already gone."""
        return self.call(self.commands.announce_clear(partition, version, origin, prefix, sig))

    def lease(
        self, encoded: bytes, token: bytes, ttl_ms: int, replace: bytes | None = None
    ) -> LeaseResult:
        """Take the fill lease of ``encoded`` (commands.lease)."""
        return self.call(self.commands.lease(encoded, token, ttl_ms, replace))

    def leases(self, encoded: list[bytes], token: bytes, ttl_ms: int) -> list[LeaseResult]:
        """``lease`` for several keys in one round trip."""
        replies = self.call_many([self.commands.lease(e, token, ttl_ms) for e in encoded])
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def fill(self, encoded: bytes, lease: bytes, envelope: bytes, ttl_ms: int) -> bool:
        """Store a loaded value if our lease is still in the key (compare-and-set)."""
        return self.call(self.commands.fill(encoded, lease, envelope, ttl_ms))

    def fills(self, items: list[tuple[bytes, bytes, bytes, int]]) -> list[bool]:
        """``fill`` for several (encoded, lease, envelope, ttl_ms) in one round trip."""
        replies = self.call_many([self.commands.fill(*item) for item in items])
        return [r is True for r in replies]

    def release(self, encoded: bytes, lease: bytes) -> None:
        """Give up our fill lease of ``encoded`` if it is still there."""
        self.call(self.commands.release(encoded, lease))

    def mark_refresh(self, encoded: bytes, token: bytes, ttl_ms: int, expected: int) -> bool:
        """Claim the refresh of ``encoded`` (see Commands.mark_refresh)."""
        return self.call(self.commands.mark_refresh(encoded, token, ttl_ms, expected))

    def refresh(
        self, encoded: bytes, expected: int, envelope: bytes, ttl_ms: int, token: bytes
    ) -> bool:
        """Store a refreshed value if the entry still holds version ``expected``."""
        return self.call(self.commands.refresh(encoded, expected, envelope, ttl_ms, token))

    def has_value(self, encoded: bytes) -> bool:
        """Whether the entry key of ``encoded`` holds a value."""
        return self.call(self.commands.has_value(encoded))

    # -- the invalidation stream ------------------------------------------------------------

    def position(self, partition: int) -> int:
        """The partition's counter (0 if it does not exist)."""
        return self.call(self.commands.position(partition))

    def logged_since(self, partition: int, seq: int, batch: int = 500) -> list[Invalidation]:
        """Logged messages, newest first, back to one numbered ``seq`` or the log's start."""
        out: list[Invalidation] = []
        end = b"+"
        while True:
            entries = self.call(self.commands.log_page(partition, end, batch))
            for _entry_id, fields in entries:
                try:
                    msg = parse_message(_field(fields, b"m"))
                except (KeyError, ValueError):
                    continue
                out.append(msg)
                if msg.seq <= seq:
                    return out
            if len(entries) < batch:
                return out
            end = b"(" + entries[-1][0]

    def heartbeat(self, origin: str, fields: dict[str, Any], ttl_ms: int) -> None:
        """Store a process' heartbeat hash, expiring after ``ttl_ms``."""
        for reply in self.call_many(self.commands.heartbeat(origin, fields, ttl_ms)):
            if isinstance(reply, Exception):
                raise reply

    def heartbeats(self) -> dict[str, dict[bytes, bytes]]:
        """Every live heartbeat of the namespace: origin -> fields."""
        out = {}
        for name in self.client.scan_iter(match=self.keys.heartbeat_pattern(), count=1000):
            fields = self.client.hgetall(name)
            if fields:
                out[name.rsplit(b":", 1)[-1].decode()] = fields
        return out

    def listener_connection(self, client_name: str) -> Any:
        """A new connection for the listener, named ``client_name`` (CLIENT LIST shows it).

        It takes the client's settings (AUTH, TLS, timeouts) from its pool; the listener speaks
        pub/sub on it directly (no PubSub object, which would reconnect behind our back).
        """
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["client_name"] = client_name
        kwargs["protocol"] = 2  # pub/sub messages as plain arrays, whatever the client speaks
        conn = pool.connection_class(**kwargs)
        conn.connect()
        return conn

    def close(self) -> None:
        """Give back the lane's connection (the client belongs to whoever made it)."""
        if self._lane is not None:
            self._lane.close()

    def server_time(self) -> tuple[int, int, int]:
        """(Redis TIME in µs, local ns before, local ns after), to calibrate the version clock."""
        sent = time.time_ns()
        seconds, micros = self.client.time()
        return seconds * 1_000_000 + micros, sent, time.time_ns()

    # -- the namespace ------------------------------------------------------------------------

    def scan_values(self, partition: int, count: int = 1000) -> Iterator[bytes]:
        """Names of the entry keys of a partition that hold a value (not a tombstone or a lease).

        SCAN-based: each key present throughout is named at least once (maybe twice).
        """
        names: list[bytes] = []
        for name in self.client.scan_iter(match=self.keys.value_pattern(partition), count=count):
            names.append(name)
            if len(names) >= count:
                yield from self._holding_values(names)
                names = []
        yield from self._holding_values(names)

    def _holding_values(self, names: list[bytes]) -> list[bytes]:
        if not names:
            return []
        heads = self.call_many([self.commands.head(name) for name in names])
        return [
            n
            for n, h in zip(names, heads, strict=True)
            if isinstance(h, bytes) and is_value_head(h)
        ]

    def scan_values_of(self, partitions: Iterable[int], count: int = 1000) -> Iterator[bytes]:
        """``scan_values`` of several partitions (a cluster driver groups them per node)."""
        for partition in partitions:
            yield from self.scan_values(partition, count)

    def unlink_partitions(
        self, partitions: Iterable[int], prefix: bytes = b"", batch: int = 500
    ) -> int:
        """``unlink_partition`` of several partitions (a cluster driver groups them per node)."""
        return sum(self.unlink_partition(p, prefix, batch) for p in partitions)

    def unlink_partition(self, partition: int, prefix: bytes = b"", batch: int = 500) -> int:
        """Unlink every key of a partition but its counter and log (or only the entries of keys
        whose encoding starts with ``prefix``); returns how many."""
        keep = self.commands.kept_by_clear(partition)
        removed = 0
        names: list[bytes] = []
        pattern = self.commands.unlink_pattern(partition, prefix)
        for name in self.client.scan_iter(match=pattern, count=1000):
            if name in keep:
                continue
            names.append(name)
            if len(names) >= batch:
                removed += self.client.unlink(*names)
                names.clear()
        if names:
            removed += self.client.unlink(*names)
        return removed


def _field(fields: Any, name: bytes) -> bytes:
    """A stream entry's field (RESP2 gives a dict from redis-py, RESP3 too; a list just in case)."""
    if isinstance(fields, dict):
        return fields[name]
    pairs = iter(fields)
    for k, v in zip(pairs, pairs, strict=False):
        if k == name:
            return v
    raise KeyError(name)
