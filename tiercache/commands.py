"""The Redis commands of the cache, as data: what to send and how to read the reply. No I/O.

Each method returns a ``Call``: a Lua script (by name, sent by SHA) or a plain command, and the
function that turns the reply into a Python value. The sync driver (tiercache.driver) and the
async one (tiercache.aio.driver) only execute calls, so neither builds arguments nor parses
replies of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple

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

SCRIPTS = ("write", "lease", "fill", "release", "refresh", "mark_refresh")


def load_script_source(name: str) -> str:
    """The source of ``tiercache/lua/<name>.lua``."""
    return resources.files("tiercache").joinpath("lua", f"{name}.lua").read_text("utf-8")


def _identity(reply: Any) -> Any:
    return reply


class Call(NamedTuple):
    """One round trip: ``script`` (a name in SCRIPTS) with ``keys`` and ``args``, or the plain
    command ``args`` when ``script`` is None; ``parse`` reads the reply. (Tuples: several are
    built per cache call, and a tuple is built in a fraction of a frozen dataclass' time.)"""

    script: str | None
    args: tuple[Any, ...]
    keys: tuple[bytes, ...] = ()
    parse: Callable[[Any], Any] = _identity


class WriteResult(NamedTuple):
    """The reply of the write script."""

    applied: bool
    version: int  # the version written, or the current one when not applied
    seq: int = 0  # its number in the partition's sequence (-1: a retry found it applied)
    existed: bool = False  # a delete: whether there was a value to delete


class LeaseResult(NamedTuple):
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


def is_value_head(head: bytes) -> bool:
    """Whether an entry's first bytes show a value: not a tombstone, a lease, a cached absence."""
    return len(head) >= 4 and head[:2] == MAGIC and not head[3] & (FLAG_NOT_A_VALUE | FLAG_ABSENT)


def write_result(reply: Any) -> WriteResult:
    """Read the write script's reply."""
    if int(reply[0]) == 1:
        existed = len(reply) > 3 and int(reply[3]) > 0
        return WriteResult(True, int(reply[1]), int(reply[2]), existed)
    return WriteResult(False, int(reply[1]))


def lease_result(token: bytes) -> Callable[[Any], LeaseResult]:
    """A reader of the lease script's reply for a lease made with ``token``."""

    def parse(reply: Any) -> LeaseResult:
        if isinstance(reply, Exception):
            raise reply
        kind = reply[0].decode()
        if kind == "v":
            return LeaseResult("v", envelope=reply[1])
        if kind == "w":
            return LeaseResult("w", wait_ms=max(0, int(reply[1])))
        version = int(reply[1])
        return LeaseResult("l", envelope=lease_envelope(token, version), version=version)

    return parse


def _is_one(reply: Any) -> bool:
    return int(reply) == 1


def _as_int(reply: Any) -> int:
    return int(reply or 0)


class Commands:
    """The calls of one namespace (``keys``); ``log_maxlen`` bounds each invalidation log."""

    sharded = False  # a cluster: the write script publishes with SPUBLISH (tiercache.cluster)

    def __init__(self, keys: KeySpace, log_maxlen: int = 10_000) -> None:
        self.keys = keys
        self.log_maxlen = log_maxlen
        self.sources = {name: load_script_source(name) for name in SCRIPTS}
        self.shas = {
            name: hashlib.sha1(src.encode("utf-8")).hexdigest()
            for name, src in self.sources.items()
        }

    def get(self, encoded: bytes) -> Call:
        """The raw entry of ``encoded``."""
        return Call(None, ("GET", self.keys.value(encoded)))

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
    ) -> Call:
        """Store the envelope of a set ("S") or delete ("D") at ``version`` and announce it.

        ``sig`` signs the message; a stored version above ``ceiling`` is taken as planted.
        """
        keys = self.keys
        counter, log, channel, values = keys.write_names(encoded)
        args = (
            op,
            version,
            envelope,
            ttl_ms,
            origin,
            channel,
            self.log_maxlen,
            encoded,
            sig,
            ceiling,
            "S" if self.sharded else "P",  # see _publish_arg
        )
        # (keys.stored() inlined for the common short key: every write runs here)
        entry = values + (encoded if len(encoded) <= keys.max_key_bytes else keys.stored(encoded))
        return Call("write", args, (counter, log, entry), write_result)

    def announce_clear(
        self, partition: int, version: int, origin: str, prefix: bytes = b"", sig: str = "-"
    ) -> Call:
        """Publish a clear of the partition, or of its keys starting with ``prefix`` (encoded)."""
        op = "P" if prefix else "C"
        channel = self.keys.channel(partition)
        args = (
            op,
            version,
            b"",
            0,
            origin,
            channel,
            self.log_maxlen,
            prefix,
            sig,
            VERSION_LIMIT - 1,
            *self._publish_arg(),
        )
        keys = (self.keys.counter(partition), self.keys.log(partition))
        return Call("write", args, keys, write_result)

    def _publish_arg(self) -> tuple[str, ...]:
        """The write script's ARGV[11]: "S" to publish with SPUBLISH (sharded pub/sub), else "P".

        Always given, so scripts that extend the write (tiercache.tags) find theirs at ARGV[12].
        """
        return ("S",) if self.sharded else ("P",)

    def lease(
        self, encoded: bytes, token: bytes, ttl_ms: int, replace: bytes | None = None
    ) -> Call:
        """Take the fill lease of ``encoded`` unless a value is there or another fill holds it.

        ``replace``: bytes read there and rejected; if still there, the lease replaces them.
        """
        args: tuple[Any, ...] = (lease_envelope(token, 0), ttl_ms)
        if replace is not None:
            args += (replace,)
        return Call("lease", args, (self.keys.value(encoded),), lease_result(token))

    def fill(self, encoded: bytes, lease: bytes, envelope: bytes, ttl_ms: int) -> Call:
        """Store a loaded value if our lease is still in the key (compare-and-set)."""
        return Call("fill", (lease, envelope, ttl_ms), (self.keys.value(encoded),), _is_one)

    def release(self, encoded: bytes, lease: bytes) -> Call:
        """Give up our fill lease of ``encoded`` if it is still there."""
        return Call("release", (lease,), (self.keys.value(encoded),))

    def mark_refresh(self, encoded: bytes, token: bytes, ttl_ms: int, expected: int) -> Call:
        """Claim the refresh of ``encoded`` for ``ttl_ms``, only while the entry still holds
        version ``expected`` (False: another process has the claim, or refreshed it already)."""
        keys = (self.keys.value(encoded), self.keys.refresh_marker(encoded))
        return Call("mark_refresh", (expected, token, max(1, ttl_ms)), keys, _is_one)

    def refresh(
        self, encoded: bytes, expected: int, envelope: bytes, ttl_ms: int, token: bytes
    ) -> Call:
        """Store a refreshed value if the entry still holds version ``expected``."""
        keys = (self.keys.value(encoded), self.keys.refresh_marker(encoded))
        return Call("refresh", (expected, envelope, ttl_ms, token), keys, _is_one)

    def position(self, partition: int) -> Call:
        """The partition's counter (0 if it does not exist)."""
        return Call(None, ("GET", self.keys.counter(partition)), parse=_as_int)

    def log_page(self, partition: int, end: bytes, count: int) -> Call:
        """Up to ``count`` logged messages, newest first, from stream id ``end`` back."""
        return Call(None, ("XREVRANGE", self.keys.log(partition), end, b"-", "COUNT", count))

    def heartbeat(self, origin: str, fields: dict[str, Any], ttl_ms: int) -> list[Call]:
        """Store a process' heartbeat hash, expiring after ``ttl_ms``."""
        name = self.keys.heartbeat(origin)
        flat = [part for item in fields.items() for part in item]
        return [Call(None, ("HSET", name, *flat)), Call(None, ("PEXPIRE", name, ttl_ms))]

    def has_value(self, encoded: bytes) -> Call:
        """Whether the entry of ``encoded`` holds a value."""
        return Call(None, ("GETRANGE", self.keys.value(encoded), 0, 5), parse=is_value_head)

    def head(self, name: bytes) -> Call:
        """The first bytes of the entry ``name`` (see ``is_value_head``)."""
        return Call(None, ("GETRANGE", name, 0, 5))

    def unlink_pattern(self, partition: int, prefix: bytes = b"") -> bytes:
        """SCAN pattern of what a clear (of ``prefix``) unlinks in a partition."""
        if prefix:
            return escape_glob(self.keys.value_prefix(partition) + prefix) + b"*"
        return self.keys.all_pattern(partition)

    def kept_by_clear(self, partition: int) -> frozenset[bytes]:
        """Keys a clear leaves: the partition's counter and log, the namespace generation."""
        kept = (self.keys.counter(partition), self.keys.log(partition), self.keys.generation_key())
        return frozenset(kept)
