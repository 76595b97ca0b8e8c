"""The synchronous Redis driver: every command the tiered cache sends, on a redis-py client.

Thin by design: it turns the protocol's requests into commands and replies into Python values,
and leaves every decision to tiercache.protocol and tiercache.tiered. Redis errors propagate as
redis-py raises them; the cache maps them to CacheUnavailable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .keys import KeySpace
from .protocol import Invalidation, parse_message

SCRIPTS = ("write", "lease", "fill", "release")


def load_script_source(name: str) -> str:
    """The source of ``tiercache/lua/<name>.lua``."""
    return resources.files("tiercache").joinpath("lua", f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The reply of the write script."""

    applied: bool
    version: int  # the version written, or the current one when not applied
    seq: int = 0  # its number in the partition's sequence (-1: a retry found it applied)
    existed: bool = False  # a delete: whether there was a value to delete


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """The reply of the lease script: a value that arrived, our lease, or someone else's."""

    kind: str  # "v" value present, "l" lease taken, "w" another holder
    envelope: bytes | None = None
    wait_ms: int = 0


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
        self.log_maxlen = log_maxlen
        self._scripts = {name: client.register_script(load_script_source(name)) for name in SCRIPTS}
        self._listener_pool: redis.ConnectionPool | None = None

    # -- values ---------------------------------------------------------------------------

    def get(self, name: bytes) -> bytes | None:
        """The raw value stored under the key ``name``."""
        return self.client.get(name)

    def write(
        self,
        encoded: bytes,
        op: str,
        version: int,
        envelope: bytes,
        *,
        ttl_ms: int,
        tombstone_ttl_ms: int,
        origin: str,
    ) -> WriteResult:
        """Apply a set ("S") or delete ("D") of ``encoded`` at ``version`` and announce it."""
        value, tomb, lease, meta, log = self.keys.entry_keys(encoded)
        partition = self.keys.partition(encoded)
        reply = self._scripts["write"](
            keys=[meta, log, value, tomb, lease],
            args=[
                op,
                str(version),
                envelope,
                ttl_ms,
                tombstone_ttl_ms,
                origin,
                self.keys.channel(partition),
                self.log_maxlen,
                encoded,
            ],
        )
        return _write_result(reply)

    def announce_clear(self, partition: int, version: int, origin: str) -> WriteResult:
        """Publish a clear of the whole partition (its keys were already unlinked)."""
        reply = self._scripts["write"](
            keys=[self.keys.meta(partition), self.keys.log(partition)],
            args=[
                "C",
                str(version),
                b"",
                0,
                0,
                origin,
                self.keys.channel(partition),
                self.log_maxlen,
                b"",
            ],
        )
        return _write_result(reply)

    def lease(self, encoded: bytes, token: str, ttl_ms: int) -> LeaseResult:
        """Take the fill lease of ``encoded`` unless a value is there or someone holds it."""
        value, _, lease, _, _ = self.keys.entry_keys(encoded)
        reply = self._scripts["lease"](keys=[value, lease], args=[token, ttl_ms])
        kind = reply[0].decode()
        if kind == "v":
            return LeaseResult("v", envelope=reply[1])
        if kind == "w":
            return LeaseResult("w", wait_ms=max(0, int(reply[1])))
        return LeaseResult("l")

    def fill(
        self, encoded: bytes, token: str, version: int, envelope: bytes, ttl_ms: int
    ) -> WriteResult:
        """Store a loaded value if the lease ``token`` still holds (compare-and-set)."""
        value, tomb, lease, _, _ = self.keys.entry_keys(encoded)
        reply = self._scripts["fill"](
            keys=[value, tomb, lease], args=[token, str(version), envelope, ttl_ms]
        )
        if int(reply[0]) == 1:
            return WriteResult(True, int(reply[1]))
        current = reply[1]
        return WriteResult(False, 0 if current == b"lease" else int(current))

    def release(self, encoded: bytes, token: str) -> None:
        """Give up the fill lease of ``encoded`` if it is still ours."""
        _, _, lease, _, _ = self.keys.entry_keys(encoded)
        self._scripts["release"](keys=[lease], args=[token])

    # -- the invalidation stream ------------------------------------------------------------

    def position(self, partition: int) -> tuple[int | None, int]:
        """The partition's counter: (epoch or None if it does not exist, seq)."""
        epoch, seq = self.client.hmget(self.keys.meta(partition), "epoch", "seq")
        return (int(epoch) if epoch else None), (int(seq) if seq else 0)

    def logged_since(self, partition: int, seq: int, batch: int = 500) -> list[Invalidation]:
        """Logged messages, newest first, back to one numbered ``seq`` or the log's start."""
        out: list[Invalidation] = []
        end = b"+"
        while True:
            entries = self.client.xrevrange(self.keys.log(partition), end, b"-", count=batch)
            for _entry_id, fields in entries:
                try:
                    msg = parse_message(fields[b"m"])
                except (KeyError, ValueError):
                    continue
                out.append(msg)
                if msg.seq <= seq:
                    return out
            if len(entries) < batch:
                return out
            end = b"(" + entries[-1][0]

    def pubsub(self, client_name: str | None = None) -> Any:
        """A pub/sub object on its own connection, named ``client_name`` (CLIENT LIST shows it).

        The connection takes the client's settings (AUTH, TLS, timeouts) from its pool.
        """
        if self._listener_pool is None:
            pool = self.client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            if client_name:
                kwargs["client_name"] = client_name
            self._listener_pool = redis.ConnectionPool(
                connection_class=pool.connection_class, max_connections=2, **kwargs
            )
        return redis.Redis(connection_pool=self._listener_pool).pubsub(
            ignore_subscribe_messages=False
        )

    def close(self) -> None:
        """Close the listener's pool (the client belongs to whoever made it)."""
        pool, self._listener_pool = self._listener_pool, None
        if pool is not None:
            pool.disconnect()

    def server_time(self) -> tuple[int, int, int]:
        """(Redis TIME in µs, local ns before, local ns after), to calibrate the version clock."""
        sent = time.time_ns()
        seconds, micros = self.client.time()
        return seconds * 1_000_000 + micros, sent, time.time_ns()

    # -- the namespace ------------------------------------------------------------------------

    def scan_values(self, partition: int, count: int = 1000) -> Iterator[bytes]:
        """Names of the value keys of a partition (SCAN: each present key at least once)."""
        yield from self.client.scan_iter(match=self.keys.value_pattern(partition), count=count)

    def unlink_partition(self, partition: int, batch: int = 500) -> int:
        """Unlink every key of a partition except its counter and log; returns how many."""
        keep = {self.keys.meta(partition), self.keys.log(partition)}
        removed = 0
        names: list[bytes] = []
        for name in self.client.scan_iter(match=self.keys.all_pattern(partition), count=1000):
            if name in keep:
                continue
            names.append(name)
            if len(names) >= batch:
                removed += self.client.unlink(*names)
                names.clear()
        if names:
            removed += self.client.unlink(*names)
        return removed


def _write_result(reply: list[Any]) -> WriteResult:
    if int(reply[0]) == 1:
        existed = len(reply) > 3 and int(reply[3]) > 0
        return WriteResult(True, int(reply[1]), int(reply[2]), existed)
    return WriteResult(False, int(reply[1]))
