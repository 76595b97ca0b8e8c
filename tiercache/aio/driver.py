"""The asyncio Redis driver: runs the cache's calls (tiercache.commands) on a redis.asyncio client.

The twin of tiercache.driver: the same calls, awaited.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ..commands import Call, Commands, LeaseResult, WriteResult, is_value_head, load_script_source
from ..driver import _field
from ..keys import KeySpace
from ..protocol import Invalidation, parse_message

P = ParamSpec("P")
R = TypeVar("R")


def _cancelling() -> int:
    """How many cancellation requests the current task has pending (Python >= 3.11; else 0)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0


def cancellable(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Raise CancelledError after ``fn`` if the task was cancelled while it ran.

    redis.asyncio may finish a command that a cancellation interrupted and return its reply
    (keeping the connection's protocol state whole), dropping the cancellation: the caller's
    ``await cache.get(k)`` would then not end in CancelledError. The request is still counted
    by ``Task.cancelling()``, so it is delivered here.
    """

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        before = _cancelling()
        result = await fn(*args, **kwargs)
        if _cancelling() > before:
            raise asyncio.CancelledError
        return result

    return run


def make_async_client(
    url: str, *, socket_timeout: float, connect_timeout: float, retries: int
) -> aioredis.Redis:
    """An asyncio client for ``url`` with bounded timeouts and retries."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries),
        health_check_interval=0,
        decode_responses=False,
    )


class AsyncDriver:
    """Runs the cache's commands and Lua scripts on one redis.asyncio client."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace, *, log_maxlen: int = 10_000) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must not decode responses (decode_responses=False)")
        self.client = client
        self.keys = keys
        self.commands = Commands(keys, log_maxlen)

    @cancellable
    async def call(self, call: Call) -> Any:
        """One round trip."""
        if call.script is None:
            return call.parse(await self.client.execute_command(*call.args))
        return call.parse(await self._run(call.script, list(call.keys), list(call.args)))

    @cancellable
    async def call_many(self, calls: list[Call]) -> list[Any]:
        """Several calls in one round trip; an error reply comes back as a value."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for c in calls:
                if c.script is None:
                    pipe.execute_command(*c.args)
                else:
                    sha = self._sha(c.script)
                    pipe.execute_command("EVALSHA", sha, len(c.keys), *c.keys, *c.args)
            replies = await pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
            for name in {c.script for c in calls if c.script is not None}:
                await self.client.script_load(self._source(name))
        return [
            r if isinstance(r, Exception) else c.parse(r)
            for c, r in zip(calls, replies, strict=True)
        ]

    async def _run(self, name: str, keys: list[bytes], args: list[Any]) -> Any:
        sha = self._sha(name)
        try:
            return await self.client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(self._source(name))
            return await self.client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

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

    @cancellable
    async def get(self, name: bytes) -> bytes | None:
        """The raw value stored under the key ``name``."""
        return await self.client.get(name)

    async def get_and(self, name: bytes, command: tuple[Any, ...]) -> tuple[bytes | None, Any]:
        """GET ``name`` and run ``command`` in the same round trip; (value, command's reply)."""
        raw, reply = await self.call_many([Call(None, ("GET", name)), Call(None, tuple(command))])
        if isinstance(raw, Exception):
            raise raw
        return raw, reply

    @cancellable
    async def mget(self, names: list[bytes]) -> list[bytes | None]:
        """The raw values of several keys in one round trip."""
        return await self.client.mget(names) if names else []

    async def write(
        self, encoded: bytes, op: str, version: int, envelope: bytes, **kw: Any
    ) -> WriteResult:
        """Store a set ("S") or delete ("D") at ``version`` and announce it."""
        return await self.call(self.commands.write(encoded, op, version, envelope, **kw))

    async def announce_clear(
        self, partition: int, version: int, origin: str, prefix: bytes = b"", sig: str = "-"
    ) -> WriteResult:
        """Publish a clear of the partition (or of ``prefix``); its entries are already gone."""
        return await self.call(
            self.commands.announce_clear(partition, version, origin, prefix, sig)
        )

    async def lease(
        self, encoded: bytes, token: bytes, ttl_ms: int, replace: bytes | None = None
    ) -> LeaseResult:
        """Take the fill lease of ``encoded``."""
        return await self.call(self.commands.lease(encoded, token, ttl_ms, replace))

    async def leases(self, encoded: list[bytes], token: bytes, ttl_ms: int) -> list[LeaseResult]:
        """``lease`` for several keys in one round trip."""
        replies = await self.call_many([self.commands.lease(e, token, ttl_ms) for e in encoded])
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    async def fill(self, encoded: bytes, lease: bytes, envelope: bytes, ttl_ms: int) -> bool:
        """Store a loaded value if our lease is still in the key (compare-and-set)."""
        return await self.call(self.commands.fill(encoded, lease, envelope, ttl_ms))

    async def fills(self, items: list[tuple[bytes, bytes, bytes, int]]) -> list[bool]:
        """``fill`` for several (encoded, lease, envelope, ttl_ms) in one round trip."""
        return [r is True for r in await self.call_many([self.commands.fill(*i) for i in items])]

    async def release(self, encoded: bytes, lease: bytes) -> None:
        """Give up our fill lease of ``encoded`` if it is still there."""
        await self.call(self.commands.release(encoded, lease))

    async def mark_refresh(self, encoded: bytes, token: bytes, ttl_ms: int, expected: int) -> bool:
        """Claim the refresh of ``encoded`` (see Commands.mark_refresh)."""
        return await self.call(self.commands.mark_refresh(encoded, token, ttl_ms, expected))

    async def refresh(
        self, encoded: bytes, expected: int, envelope: bytes, ttl_ms: int, token: bytes
    ) -> bool:
        """Store a refreshed value if the entry still holds version ``expected``."""
        return await self.call(self.commands.refresh(encoded, expected, envelope, ttl_ms, token))

    async def has_value(self, encoded: bytes) -> bool:
        """Whether the entry key of ``encoded`` holds a value."""
        return await self.call(self.commands.has_value(encoded))

    # -- the invalidation stream ------------------------------------------------------------

    async def position(self, partition: int) -> int:
        """The partition's counter (0 if it does not exist)."""
        return await self.call(self.commands.position(partition))

    async def logged_since(self, partition: int, seq: int, batch: int = 500) -> list[Invalidation]:
        """Logged messages, newest first, back to one numbered ``seq`` or the log's start."""
        out: list[Invalidation] = []
        end = b"+"
        while True:
            entries = await self.call(self.commands.log_page(partition, end, batch))
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

    async def heartbeat(self, origin: str, fields: dict[str, Any], ttl_ms: int) -> None:
        """Store a process' heartbeat hash, expiring after ``ttl_ms``."""
        for reply in await self.call_many(self.commands.heartbeat(origin, fields, ttl_ms)):
            if isinstance(reply, Exception):
                raise reply

    async def listener_connection(self, client_name: str) -> Any:
        """A new connection for the listener (the client's pool settings, RESP2, named)."""
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["client_name"] = client_name
        kwargs["protocol"] = 2
        conn = pool.connection_class(**kwargs)
        await conn.connect()
        return conn

    @cancellable
    async def server_time(self) -> tuple[int, int, int]:
        """(Redis TIME in µs, local ns before, local ns after)."""
        sent = time.time_ns()
        seconds, micros = await self.client.time()
        return seconds * 1_000_000 + micros, sent, time.time_ns()

    # -- the namespace ------------------------------------------------------------------------

    async def scan_values(self, partition: int, count: int = 1000) -> AsyncIterator[bytes]:
        """Names of the entry keys of a partition that hold a value (SCAN-based)."""
        names: list[bytes] = []
        async for name in self.client.scan_iter(
            match=self.keys.value_pattern(partition), count=count
        ):
            names.append(name)
            if len(names) >= count:
                for n in await self._holding_values(names):
                    yield n
                names = []
        for n in await self._holding_values(names):
            yield n

    async def _holding_values(self, names: list[bytes]) -> list[bytes]:
        if not names:
            return []
        heads = await self.call_many([self.commands.head(name) for name in names])
        return [
            n
            for n, h in zip(names, heads, strict=True)
            if isinstance(h, bytes) and is_value_head(h)
        ]

    async def scan_values_of(
        self, partitions: Iterable[int], count: int = 1000
    ) -> AsyncIterator[bytes]:
        """``scan_values`` of several partitions."""
        for partition in partitions:
            async for name in self.scan_values(partition, count):
                yield name

    async def unlink_partitions(
        self, partitions: Iterable[int], prefix: bytes = b"", batch: int = 500
    ) -> int:
        """``unlink_partition`` of several partitions."""
        return sum([await self.unlink_partition(p, prefix, batch) for p in partitions])

    @cancellable
    async def unlink_partition(self, partition: int, prefix: bytes = b"", batch: int = 500) -> int:
        """Unlink the partition's entries (all, or those of keys starting with ``prefix``)."""
        keep = self.commands.kept_by_clear(partition)
        removed = 0
        names: list[bytes] = []
        async for name in self.client.scan_iter(
            match=self.commands.unlink_pattern(partition, prefix), count=1000
        ):
            if name in keep:
                continue
            names.append(name)
            if len(names) >= batch:
                removed += await self.client.unlink(*names)
                names.clear()
        if names:
            removed += await self.client.unlink(*names)
        return removed
