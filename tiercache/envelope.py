"""The Redis value envelope: a fixed binary header, an optional signature, then the payload.

Layout (big-endian), version 1::

    offset size  field
    0      2     magic b"TC"
    2      1     format version (1)
    3      1     flags: bit 0 ABSENT (a cached "the origin has no such key"), bits 1-2 the
                 compression method (0 none, 1 zlib, 2 lz4), bit 3 TOMBSTONE (the key was
                 deleted at this version), bit 4 LEASE (a fill is in progress: the payload is
                 the lease token; the version is the one the key had before), bit 5 EXT
                 (the payload starts with the tags / sliding TTL block of tiercache.tags;
                 the Lua scripts read the flags modulo 32 and ignore it)
    4      1     codec id (tiercache.codec)
    5      1     signature length (0, or 32 for HMAC-SHA256)
    6      8     version: unsigned, < 2**53 so that Lua (doubles) reads it exactly
    14     8     expires_at: unix time (float seconds) when Redis drops it; 0 = never
    22     8     fresh_until: unix time after which the value is stale (may still be served
                 while refreshing); 0 = same as expires_at
    30     4     load_ms: how long the loader took (float), for early refresh; 0 = unknown
    34     n     signature (n = signature length)
    34+n   ...   payload

One Redis key holds a key's value, or its tombstone, or the lease of a fill in progress: a write
overwrites whichever is there, which is what invalidates a pending fill. The Lua scripts read the
flags at byte 4 and the version at bytes 7..14 (1-based): keep them in step with this module.
No I/O here.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

MAGIC = b"TC"
FORMAT = 1
HEADER = struct.Struct(">2sBBBBQddf")
HEADER_SIZE = HEADER.size  # 34
VERSION_LIMIT = 1 << 53

FLAG_ABSENT = 0x01
COMPRESSION_SHIFT = 1
COMPRESSION_MASK = 0x06
FLAG_TOMBSTONE = 0x08
FLAG_LEASE = 0x10
FLAG_EXT = 0x20  # the payload starts with a tags / sliding TTL block (tiercache.tags)
FLAG_NOT_A_VALUE = FLAG_TOMBSTONE | FLAG_LEASE


class EnvelopeError(ValueError):
    """Bytes that are not a well-formed envelope of this format."""


class Envelope(NamedTuple):
    """A decoded envelope: header fields, the raw signature and the (still encoded) payload.

    A tuple: one is built per write and per read from Redis (a frozen dataclass costs twice)."""

    version: int
    codec: int
    payload: bytes
    flags: int = 0
    expires_at: float = 0.0
    fresh_until: float = 0.0
    load_ms: float = 0.0
    signature: bytes = b""

    @property
    def absent(self) -> bool:
        """Whether this caches the absence of the key in the origin."""
        return bool(self.flags & FLAG_ABSENT)

    @property
    def is_value(self) -> bool:
        """Whether this holds a value (or a cached absence), not a tombstone or a fill lease."""
        return not self.flags & FLAG_NOT_A_VALUE

    @property
    def compression(self) -> int:
        """The compression method id of the payload."""
        return (self.flags & COMPRESSION_MASK) >> COMPRESSION_SHIFT

    def header(self) -> bytes:
        """The header bytes (what a signature covers, with the namespace and key)."""
        return HEADER.pack(
            MAGIC,
            FORMAT,
            self.flags,
            self.codec,
            len(self.signature),
            self.version,
            self.expires_at,
            self.fresh_until,
            self.load_ms,
        )

    def pack(self) -> bytes:
        """The bytes stored in Redis."""
        return self.header() + self.signature + self.payload

    def with_version(self, version: int) -> Envelope:
        """The same envelope carrying another version (the signature must be redone)."""
        check_version(version)
        return Envelope(
            version,
            self.codec,
            self.payload,
            self.flags,
            self.expires_at,
            self.fresh_until,
            self.load_ms,
            b"",
        )


def check_version(version: int) -> int:
    """``version`` if it fits the envelope (0 < v < 2**53), else ``ValueError``."""
    if not 0 < version < VERSION_LIMIT:
        raise ValueError(f"version out of range: {version}")
    return version


def unpack(data: bytes) -> Envelope:
    """The envelope in ``data``; ``EnvelopeError`` if the bytes are not one."""
    if len(data) < HEADER_SIZE:
        raise EnvelopeError("truncated envelope header")
    magic, fmt, flags, codec, sig_len, version, expires_at, fresh_until, load_ms = (
        HEADER.unpack_from(data)
    )
    if magic != MAGIC or fmt != FORMAT:
        raise EnvelopeError("not a tiercache envelope (bad magic or format)")
    if len(data) < HEADER_SIZE + sig_len:
        raise EnvelopeError("truncated envelope signature")
    if version >= VERSION_LIMIT:
        raise EnvelopeError("envelope version out of range")
    return Envelope(
        version,
        codec,
        bytes(data[HEADER_SIZE + sig_len :]),
        flags,
        expires_at,
        fresh_until,
        load_ms,
        bytes(data[HEADER_SIZE : HEADER_SIZE + sig_len]),
    )
