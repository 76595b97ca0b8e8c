"""The synchronous Redis driver: every command the tiered cache sends, on a redis-py client.

Thin by design: it turns the protocol's requests into commands and replies into Python values,
and leaves every decision to tiercache.protocol and tiercache.tiered. Redis errors propagate as
redis-py raises them; the cache maps them to CacheUnavailable.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from .envelope import (
    FLAG_ABSENT,
    FLAG_LEASE,
    FLAG_NOT_A_VALUE,
    FORMAT,
    HEADER,
    MAGIC,
    VERSION_LIMIT,
)
from .keys import KeySpace, escape_glob
from .protocol import Invalidation, parse_message

SCRIPTS = ("write", "lease", "fill", "release", "refresh")


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

    kind: str  # "v" value present, "l" lease taken, "w" another fill holds it
    envelope: bytes | None = None  # "v": the value; "l": our lease as stored
    wait_ms: int = 0  # "w": how long the other lease has left
    version: int = 0  # "l": the version the key had (0 if nothing, else a tombstone's)


def lease_envelope(token: bytes, version: int) -> bytes:
    """A fill lease as stored in the entry key: LEASE flag, ``version``, the token as payload."""
    header = bytearray(HEADER.pack(MAGIC, FORMAT, FLAG_LEASE, 0, 0, 0, 0.0, 0.0, 0.0))
    header[6:14] = version.to_bytes(8, "big")
    return bytes(header) + token


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
        self._sources = {name: load_script_source(name) for name in SCRIPTS}
        self._shas = {name: _sha1(src) for name, src in self._sources.items()}

    # -- scripts --------------------------------------------------------------------------

    def _run(self, name: str, keys: list[bytes], args: list[Any]) -> Any:
        """EVALSHA a script, loading it first if Redis does not know it (after a restart)."""
        sha = self._shas[name]
        try:
            return self.client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            self.client.script_load(self._sources[name])
            return self.client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    def _run_many(self, name: str, calls: list[tuple[list[bytes], list[Any]]]) -> list[Any]:
        """Several calls of one script in one round trip (a pipeline); errors are returned."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.execute_command("EVALSHA", self._shas[name], len(keys), *keys, *args)
            replies = pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                return replies
            self.client.script_load(self._sources[name])
        return replies  # pragma: no cover - the loop always returns

    # -- values ---------------------------------------------------------------------------

    def get_and(self, name: bytes, command: tuple[Any, ...]) -> tuple[bytes | None, Any]:
        """GET ``name`` and run ``command`` in the same round trip; (value, command's reply).

        The command's error (say, an unknown command) comes back as its reply, not raised.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.get(name)
        pipe.execute_command(*command)
        raw, reply = pipe.execute(raise_on_error=False)
        if isinstance(raw, Exception):
            raise raw
        return raw, reply

    def mget(self, names: list[bytes]) -> list[bytes | None]:
        """The raw values of several keys in one round trip."""
        return self.client.mget(names) if names else []

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
        origin: str,
        sig: str = "-",
        ceiling: int = VERSION_LIMIT - 1,
    ) -> WriteResult:
        """Store the envelope of a set ("S") or delete ("D") at ``version`` and announce it.

        ``sig`` signs the message; a stored version above ``ceiling`` is taken as planted.
        """
        counter, log, entry = self.keys.script_keys(encoded)
        return _write_result(
            self._run(
                "write",
                [counter, log, entry],
                [
                    op,
                    version,
                    envelope,
                    ttl_ms,
                    origin,
                    self.keys.channel(self.keys.partition(encoded)),
                    self.log_maxlen,
                    encoded,
                    sig,
                    ceiling,
                ],
            )
        )

    def announce_clear(
        self, partition: int, version: int, origin: str, prefix: bytes = b"", sig: str = "-"
    ) -> WriteResult:
        """Publish a clear of the partition, or of its keys starting with ``prefix`` (encoded).

        The entries were already unlinked by the caller.
        """
        return _write_result(
            self._run(
                "write",
                [self.keys.counter(partition), self.keys.log(partition)],
                [
                    "P" if prefix else "C",
                    version,
                    b"",
                    0,
                    origin,
                    self.keys.channel(partition),
                    self.log_maxlen,
                    prefix,
                    sig,
                    VERSION_LIMIT - 1,
                ],
            )
        )

    def lease(
        self, encoded: bytes, token: bytes, ttl_ms: int, replace: bytes | None = None
    ) -> LeaseResult:
        """Take the fill lease of ``encoded`` unless a value is there or another fill holds it.

        ``replace``: bytes read there and rejected; if still there, the lease replaces them.
        """
        args: list[Any] = [lease_envelope(token, 0), ttl_ms]
        if replace is not None:
            args.append(replace)
        return _lease_result(self._run("lease", [self.keys.value(encoded)], args), token)

    def leases(self, encoded: list[bytes], token: bytes, ttl_ms: int) -> list[LeaseResult]:
        """``lease`` for several keys in one round trip."""
        template = lease_envelope(token, 0)
        calls = [([self.keys.value(e)], [template, ttl_ms]) for e in encoded]
        return [_lease_result(r, token) for r in self._run_many("lease", calls)]

    def fill(self, encoded: bytes, lease: bytes, envelope: bytes, ttl_ms: int) -> bool:
        """Store a loaded value if our lease is still in the key (compare-and-set)."""
        return int(self._run("fill", [self.keys.value(encoded)], [lease, envelope, ttl_ms])) == 1

    def fills(self, items: list[tuple[bytes, bytes, bytes, int]]) -> list[bool]:
        """``fill`` for several (encoded, lease, envelope, ttl_ms) in one round trip."""
        calls = [([self.keys.value(e)], [lease, env, ttl]) for e, lease, env, ttl in items]
        return [r == 1 for r in self._run_many("fill", calls)]

    def release(self, encoded: bytes, lease: bytes) -> None:
        """Give up our fill lease of ``encoded`` if it is still there."""
        self._run("release", [self.keys.value(encoded)], [lease])

    def mark_refresh(self, encoded: bytes, token: bytes, ttl_ms: int) -> bool:
        """Claim the refresh of ``encoded`` for ``ttl_ms`` (False: another process has it)."""
        marker = self.keys.refresh_marker(encoded)
        return bool(self.client.set(marker, token, nx=True, px=max(1, ttl_ms)))

    def refresh(
        self, encoded: bytes, expected: int, envelope: bytes, ttl_ms: int, token: bytes
    ) -> bool:
        """Store a refreshed value if the entry still holds version ``expected``."""
        keys = [self.keys.value(encoded), self.keys.refresh_marker(encoded)]
        return int(self._run("refresh", keys, [expected, envelope, ttl_ms, token])) == 1

    # -- the invalidation stream ------------------------------------------------------------

    def position(self, partition: int) -> int:
        """The partition's counter (0 if it does not exist)."""
        return int(self.client.get(self.keys.counter(partition)) or 0)

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

    def heartbeat(self, origin: str, fields: dict[str, Any], ttl_ms: int) -> None:
        """Store a process' heartbeat hash, expiring after ``ttl_ms``."""
        name = self.keys.heartbeat(origin)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(name, mapping=fields)
        pipe.pexpire(name, ttl_ms)
        pipe.execute()

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
        pub/sub on it directly (no PubSub object: less work per message, see listener.py).
        """
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["client_name"] = client_name
        kwargs["protocol"] = 2  # pub/sub messages as plain arrays, whatever the client speaks
        conn = pool.connection_class(**kwargs)
        conn.connect()
        return conn

    def close(self) -> None:
        """Nothing of its own to close (the client belongs to whoever made it)."""

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
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.getrange(name, 0, 5)
        heads = pipe.execute()
        return [name for name, head in zip(names, heads, strict=True) if is_value_head(head)]

    def has_value(self, encoded: bytes) -> bool:
        """Whether the entry key of ``encoded`` holds a value."""
        return is_value_head(self.client.getrange(self.keys.value(encoded), 0, 5))

    def unlink_partition(self, partition: int, prefix: bytes = b"", batch: int = 500) -> int:
        """Unlink every key of a partition but its counter and log (or only the entries of keys
        whose encoding starts with ``prefix``); returns how many."""
        keep = {self.keys.counter(partition), self.keys.log(partition)}
        pattern = self.keys.all_pattern(partition)
        if prefix:
            pattern = escape_glob(self.keys.prefix(partition) + b"v:" + prefix) + b"*"
        removed = 0
        names: list[bytes] = []
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


def is_value_head(head: bytes) -> bool:
    """Whether an entry's first bytes show a value: not a tombstone, a lease, a cached absence."""
    return len(head) >= 4 and head[:2] == MAGIC and not head[3] & (FLAG_NOT_A_VALUE | FLAG_ABSENT)


def _lease_result(reply: Any, token: bytes) -> LeaseResult:
    if isinstance(reply, Exception):
        raise reply
    kind = reply[0].decode()
    if kind == "v":
        return LeaseResult("v", envelope=reply[1])
    if kind == "w":
        return LeaseResult("w", wait_ms=max(0, int(reply[1])))
    version = int(reply[1])
    return LeaseResult("l", envelope=lease_envelope(token, version), version=version)


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()


def _write_result(reply: list[Any]) -> WriteResult:
    if int(reply[0]) == 1:
        existed = len(reply) > 3 and int(reply[3]) > 0
        return WriteResult(True, int(reply[1]), int(reply[2]), existed)
    return WriteResult(False, int(reply[1]))
