"""User keys to Redis keys: an injective, reversible encoding and the names of a namespace's keys.

Key types: str, bytes, int, float, bool, None and tuples of these (subclasses of str, bytes, int,
float and tuple count as their base type, as a dict would treat them). The encoding starts with a
one-byte type tag, so no two different keys share a Redis key: ``1``, ``1.0``, ``True``, ``"1"``
and ``b"1"`` are five keys. Tuples are length-prefixed, so ``("a:b",)`` and ``("a", "b")`` differ.

Redis layout of namespace ``ns``, partition ``p`` (one partition unless the store is a cluster,
where each partition is one hash slot: a key's entry shares the slot of its partition's sequence
counter and invalidation log, so one Lua script can touch them all)::

    ns:{ns:p}:v:<encoded key>   the entry: a value, a tombstone or a fill lease (envelope.py);
                                after ``bump_namespace`` ``v<generation>:`` (tiercache.tags)
    ns:{ns:p}:r:<encoded key>   the marker of a background refresh in progress
    ns:{ns:p}:seq               the partition's invalidation counter
    ns:{ns:p}:log               stream: the recent invalidation messages, for replay after a gap
    ns:{ns:p}:inv               the pub/sub channel of invalidations
    ns:{ns:0}:hb:<origin>       a process' heartbeat (its stats), expiring
    ns:{ns:0}:gen               the namespace generation (tiercache.tags), absent = 0
    ns:{ns:p}:t:<tag>           a tag's invalidation version and highest written version

Long keys. ``<encoded key>`` above is the encoding itself when it is at most ``max_key_bytes``
(default 1024) long; a longer one is stored under its first ``max_key_bytes`` bytes, ``#`` and the
hex SHA-256 of the whole encoding (``KeySpace.stored``), so Redis key names stay bounded. That name
is longer than ``max_key_bytes``, so it never equals the name of a short key (injective), and it
keeps the namespace and the encoding's start, so SCAN patterns of a prefix (``clear_prefix``, a
decorated function's ``cache_clear``) still find it. Every cache of a namespace must use the same
``max_key_bytes``. An encoding longer than ``KEY_BYTES_LIMIT`` is refused (``ValueError``): keys
travel whole in invalidation messages, which are at most 1 MiB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections.abc import Hashable
from dataclasses import dataclass

KeyType = str | bytes | int | float | bool | None | tuple
SUPPORTED = "str, bytes, int, float, bool, None or tuples of these"
MAX_KEY_BYTES = 1024  # default: a longer encoded key is stored under a digest
KEY_BYTES_LIMIT = (1 << 20) - 4096  # the longest encoded key (protocol.MAX_MESSAGE_BYTES - header)


def encode_key(key: object) -> bytes:
    """The injective encoding of ``key``; ``TypeError`` naming the type if it is not supported."""
    t = type(key)
    if t is str:
        return b"s" + key.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
    if t is bool:
        return b"T" if key else b"F"
    if t is int:
        return b"i%d" % key  # type: ignore[str-format]
    if t is bytes:
        return b"b" + key  # type: ignore[operator]
    if key is None:
        return b"N"
    if t is float:
        return b"f" + float.hex(key).encode()  # type: ignore[arg-type]
    if t is tuple:
        return _encode_tuple(key)  # type: ignore[arg-type]
    return _encode_subclass(key)


def _encode_tuple(key: tuple) -> bytes:
    parts = [encode_key(k) for k in key]
    return b"t" + b"".join(b"%d:%s" % (len(p), p) for p in parts)


def _encode_subclass(key: object) -> bytes:
    if isinstance(key, str):
        return encode_key(str.__str__(key))
    if isinstance(key, bool):  # pragma: no cover - bool cannot be subclassed
        return encode_key(bool(key))
    if isinstance(key, int):
        return encode_key(int(key))
    if isinstance(key, bytes):
        return encode_key(bytes(key))
    if isinstance(key, float):
        return encode_key(float(key))
    if isinstance(key, tuple):
        return _encode_tuple(tuple(key))
    raise TypeError(f"unsupported key type {type(key).__name__!r}: keys must be {SUPPORTED}")


def decode_key(data: bytes) -> KeyType:
    """The key whose encoding is ``data`` (the inverse of ``encode_key``); ``ValueError`` if bad."""
    try:
        key, end = _decode(data, 0, len(data))
    except (OverflowError, RecursionError) as err:  # a float beyond range, absurd nesting
        raise ValueError(f"undecodable encoded key {data[:40]!r}: {err}") from err
    if end != len(data):
        raise ValueError(f"trailing bytes in encoded key {data[:40]!r}")
    return key


def _decode(data: bytes, start: int, end: int) -> tuple[KeyType, int]:
    tag, body = data[start : start + 1], start + 1
    if tag == b"s":
        return data[body:end].decode("utf-8", "surrogatepass"), end
    if tag == b"b":
        return data[body:end], end
    if tag == b"i":
        return int(data[body:end]), end
    if tag == b"f":
        return float.fromhex(data[body:end].decode()), end
    if tag in (b"T", b"F", b"N") and body == end:
        return {b"T": True, b"F": False, b"N": None}[tag], end
    if tag == b"t":
        items: list[KeyType] = []
        pos = body
        while pos < end:
            colon = data.index(b":", pos, end)
            size = int(data[pos:colon])
            item, _ = _decode(data, colon + 1, colon + 1 + size)
            items.append(item)
            pos = colon + 1 + size
        if pos != end:
            raise ValueError("malformed tuple key")
        return tuple(items), end
    raise ValueError(f"malformed encoded key {data[start:end][:40]!r}")


def local_key(key: object, encoded: bytes) -> Hashable:
    """The key of ``key`` in the local tier: a str stands for itself, anything else by encoding.

    Keeping str keys as they are lets a local hit skip the encoding; other keys go by their
    encoding so that ``1``, ``1.0`` and ``True`` (equal in a dict) stay distinct there too.
    """
    return key if type(key) is str else local_key_of(encoded)


def local_key_of(encoded: bytes) -> Hashable:
    """The local-tier key of an encoded key (invalidations carry the encoding)."""
    if encoded[:1] == b"s":
        return encoded[1:].decode("utf-8", "surrogatepass")
    return encoded


def _check_namespace(namespace: str) -> str:
    if not namespace or not isinstance(namespace, str):
        raise ValueError("namespace must be a non-empty str")
    if any(c in namespace for c in "{}") or any(ord(c) < 32 for c in namespace):
        raise ValueError(f"namespace must not contain braces or control characters: {namespace!r}")
    return namespace


_GLOB_SPECIALS = frozenset(b"*?[]\\")


def escape_glob(raw: bytes) -> bytes:
    """``raw`` with Redis glob characters escaped, for SCAN MATCH patterns."""
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIALS else bytes([c]) for c in raw)


@dataclass(frozen=True)
class KeySpace:
    """The Redis key names of one namespace split into ``partitions`` hash slots."""

    namespace: str = "tc"
    partitions: int = 1
    max_key_bytes: int = MAX_KEY_BYTES
    generation: int = 0  # the namespace generation: part of every value key's name

    def __post_init__(self) -> None:
        _check_namespace(self.namespace)
        if self.partitions < 1:
            raise ValueError("partitions must be >= 1")
        if not 16 <= self.max_key_bytes <= KEY_BYTES_LIMIT:
            raise ValueError(f"max_key_bytes must be between 16 and {KEY_BYTES_LIMIT}")
        ns = self.namespace
        prefixes = tuple(f"{ns}:{{{ns}:{p}}}:".encode() for p in range(self.partitions))
        object.__setattr__(self, "_prefixes", prefixes)
        vtag = b"v%d:" % self.generation if self.generation else b"v:"
        object.__setattr__(self, "_values", tuple(p + vtag for p in prefixes))
        # (counter, log, channel, value prefix) of each partition: what every write names
        writes = tuple((p + b"seq", p + b"log", p + b"inv", p + vtag) for p in prefixes)
        object.__setattr__(self, "_writes", writes)

    def partition(self, encoded: bytes) -> int:
        """The partition of an encoded key."""
        return 0 if self.partitions == 1 else zlib.crc32(encoded) % self.partitions

    def prefix(self, partition: int) -> bytes:
        """``ns:{ns:p}:``, the prefix of every key of a partition."""
        return self._prefixes[partition]  # type: ignore[attr-defined,no-any-return]

    def stored(self, encoded: bytes) -> bytes:
        """What stands for ``encoded`` in Redis key names: itself, or its digest form if long."""
        if len(encoded) <= self.max_key_bytes:
            return encoded
        if len(encoded) > KEY_BYTES_LIMIT:
            raise ValueError(
                f"key too long: {len(encoded)} bytes encoded, at most {KEY_BYTES_LIMIT}"
            )
        digest = hashlib.sha256(encoded).hexdigest().encode()
        return encoded[: self.max_key_bytes] + b"#" + digest

    def is_digest(self, stored: bytes) -> bool:
        """Whether a name's key part (``encoded_of_value_key``) is the digest form of a long key."""
        return len(stored) > self.max_key_bytes

    def clip(self, prefix: bytes) -> bytes:
        """A prefix of encodings as far as stored names keep it (their first max_key_bytes)."""
        return prefix[: self.max_key_bytes]

    def value_prefix(self, partition: int) -> bytes:
        """``ns:{ns:p}:v:`` (``v<generation>:`` after a namespace bump): the entries' prefix."""
        return self._values[partition]  # type: ignore[attr-defined,no-any-return]

    def with_generation(self, generation: int) -> KeySpace:
        """The same key space at another namespace generation."""
        return dataclasses.replace(self, generation=generation)

    def generation_key(self) -> bytes:
        """The key holding the namespace generation (in partition 0's slot)."""
        return self.prefix(0) + b"gen"

    def tag(self, partition: int, tag: bytes) -> bytes:
        """The key of a tag's versions in a partition (tiercache.tags)."""
        return self.prefix(partition) + b"t:" + tag

    def value(self, encoded: bytes) -> bytes:
        """The value key of an encoded key."""
        return self.value_prefix(self.partition(encoded)) + self.stored(encoded)

    def script_keys(self, encoded: bytes) -> tuple[bytes, bytes, bytes]:
        """(counter, log, entry) keys of an encoded key, all in one slot."""
        counter, log, _, values = self.write_names(encoded)
        return counter, log, values + self.stored(encoded)

    def write_names(self, encoded: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        """(counter, log, channel, value prefix) of an encoded key's partition."""
        p = 0 if self.partitions == 1 else zlib.crc32(encoded) % self.partitions
        return self._writes[p]  # type: ignore[attr-defined,no-any-return]

    def refresh_marker(self, encoded: bytes) -> bytes:
        """The key marking a refresh of ``encoded`` in progress (same slot as its entry)."""
        return self.prefix(self.partition(encoded)) + b"r:" + self.stored(encoded)

    def heartbeat(self, origin: str) -> bytes:
        """The heartbeat hash of one process (in partition 0's slot)."""
        return self.prefix(0) + b"hb:" + origin.encode()

    def heartbeat_pattern(self) -> bytes:
        """SCAN MATCH pattern of the heartbeats."""
        return escape_glob(self.prefix(0) + b"hb:") + b"*"

    def counter(self, partition: int) -> bytes:
        """The invalidation counter of a partition."""
        return self.prefix(partition) + b"seq"

    def log(self, partition: int) -> bytes:
        """The invalidation log (a capped stream) of a partition."""
        return self.prefix(partition) + b"log"

    def channel(self, partition: int) -> bytes:
        """The invalidation channel of a partition."""
        return self.prefix(partition) + b"inv"

    def value_pattern(self, partition: int) -> bytes:
        """SCAN MATCH pattern of the value keys of a partition."""
        return escape_glob(self.value_prefix(partition)) + b"*"

    def all_pattern(self, partition: int) -> bytes:
        """SCAN MATCH pattern of every key of a partition."""
        return escape_glob(self.prefix(partition)) + b"*"

    def encoded_of_value_key(self, name: bytes) -> bytes:
        """The encoded user key inside a value key name (its digest form if ``is_digest``)."""
        start = name.index(b"}:v") + 3
        return name[name.index(b":", start) + 1 :]
