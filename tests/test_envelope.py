"""The Redis value envelope (tiercache.envelope): round trip, malformed input, the version field.

The version's place (bytes 7..14, 1-based, big-endian) is a contract with the Lua scripts, which
read it from the stored bytes without unpacking: the last tests run the real write and fill
scripts on a real server against stored envelopes and check the version they read.
"""

from __future__ import annotations

import secrets
import struct

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.driver import SyncDriver, WriteResult, lease_envelope
from tiercache.envelope import (
    FLAG_ABSENT,
    FLAG_LEASE,
    FLAG_TOMBSTONE,
    FORMAT,
    HEADER_SIZE,
    MAGIC,
    VERSION_LIMIT,
    Envelope,
    EnvelopeError,
    check_version,
    unpack,
)
from tiercache.keys import KeySpace, encode_key

SETTINGS = settings(deadline=None, max_examples=200)

VERSIONS = st.one_of(st.integers(1, VERSION_LIMIT - 1), st.sampled_from([1, 255, 256, 2**32]))
TIMES = st.floats(allow_nan=False)
ENVELOPES = st.builds(
    Envelope,
    version=VERSIONS,
    codec=st.integers(0, 255),
    payload=st.binary(max_size=64),
    flags=st.integers(0, 255),
    expires_at=TIMES,
    fresh_until=TIMES,
    load_ms=st.floats(width=32, allow_nan=False),  # a 4-byte float on the wire
    signature=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32), st.binary(max_size=255)),
)


@SETTINGS
@given(ENVELOPES)
def test_pack_unpack_round_trip(env: Envelope) -> None:
    data = env.pack()
    assert len(data) == HEADER_SIZE + len(env.signature) + len(env.payload)
    back = unpack(data)
    assert back == env
    assert unpack(bytearray(data)) == env
    assert back.header() == data[:HEADER_SIZE]
    assert data[HEADER_SIZE : HEADER_SIZE + len(env.signature)] == env.signature
    assert data[HEADER_SIZE + len(env.signature) :] == env.payload


@SETTINGS
@given(ENVELOPES)
def test_version_sits_at_bytes_7_to_14_big_endian(env: Envelope) -> None:
    data = env.pack()
    assert data[:2] == MAGIC == b"TC"
    assert data[2] == FORMAT
    # What the Lua scripts compute: for i = 7, 14 do v = v * 256 + byte(i) end (1-based).
    lua_version = 0
    for i in range(7, 15):
        lua_version = lua_version * 256 + data[i - 1]
    assert lua_version == env.version
    assert data[6:14] == env.version.to_bytes(8, "big")


def test_header_layout() -> None:
    env = Envelope(0x0102030405060708, 9, b"pay", flags=FLAG_ABSENT | (2 << 1), signature=b"s" * 32)
    data = env.pack()
    assert HEADER_SIZE == 34
    assert data[3] == FLAG_ABSENT | 4 and data[4] == 9 and data[5] == 32
    assert data[6:14] == bytes(range(1, 9))
    assert env.absent and env.compression == 2
    assert not Envelope(1, 1, b"").absent and Envelope(1, 1, b"").compression == 0
    assert struct.unpack(">ddf", data[14:34]) == (0.0, 0.0, 0.0)


@SETTINGS
@given(ENVELOPES, st.data())
def test_truncated_header_or_signature_is_refused(env: Envelope, data: st.DataObject) -> None:
    packed = env.pack()
    cut = data.draw(st.integers(0, HEADER_SIZE + len(env.signature) - 1))
    with pytest.raises(EnvelopeError):
        unpack(packed[:cut])


@SETTINGS
@given(st.binary(max_size=80))
def test_garbage_raises_only_envelope_error(data: bytes) -> None:
    try:
        env = unpack(data)
    except EnvelopeError as err:
        assert isinstance(err, ValueError)
        return
    assert data[:3] == MAGIC + bytes([FORMAT]) and 0 <= env.version < VERSION_LIMIT


@SETTINGS
@given(ENVELOPES, st.integers(0, 2), st.integers(0, 255))
def test_bad_magic_or_format_is_refused(env: Envelope, pos: int, byte: int) -> None:
    packed = bytearray(env.pack())
    if packed[pos] == byte:
        return
    packed[pos] = byte
    with pytest.raises(EnvelopeError):
        unpack(bytes(packed))


@pytest.mark.parametrize("version", [VERSION_LIMIT, VERSION_LIMIT + 1, 2**64 - 1])
def test_stored_version_beyond_2_53_is_refused(version: int) -> None:
    data = bytearray(Envelope(1, 1, b"x").pack())
    data[6:14] = version.to_bytes(8, "big")
    with pytest.raises(EnvelopeError):
        unpack(bytes(data))


@pytest.mark.parametrize("version", [0, -1, VERSION_LIMIT, VERSION_LIMIT + 5])
def test_version_bounds(version: int) -> None:
    with pytest.raises(ValueError):
        check_version(version)
    with pytest.raises(ValueError):
        Envelope(5, 1, b"x").with_version(version)


@pytest.mark.parametrize("version", [1, 2, VERSION_LIMIT - 1])
def test_versions_in_bounds(version: int) -> None:
    assert check_version(version) == version
    env = Envelope(
        5, 3, b"pay", flags=1, expires_at=9.5, fresh_until=8.5, load_ms=2.0, signature=b"s" * 32
    )
    moved = env.with_version(version)
    assert moved.version == version
    # Everything else is kept, except the signature, which covered the old version.
    assert (moved.codec, moved.payload, moved.flags) == (3, b"pay", 1)
    assert (moved.expires_at, moved.fresh_until, moved.load_ms) == (9.5, 8.5, 2.0)
    assert moved.signature == b""
    assert unpack(moved.pack()) == moved


# -- what the Lua scripts read, on a real server ------------------------------------------------

KS = KeySpace("envtest")
ENCODED = encode_key("k")


def _write(driver: SyncDriver, op: str, version: int, payload: bytes = b"v") -> WriteResult:
    flags = FLAG_TOMBSTONE if op == "D" else 0
    env = Envelope(version, 1, payload, flags=flags).pack()
    return driver.write(ENCODED, op, version, env, ttl_ms=0, origin="t")


@pytest.fixture
def driver(redis_client: redis.Redis) -> SyncDriver:
    return SyncDriver(redis_client, KS)


@pytest.mark.parametrize(
    "version", [1, 255, 256, 65_537, 2**32 + 1, 1_700_000_000_000_001, VERSION_LIMIT - 2]
)
@pytest.mark.parametrize("stored_flags", [0, FLAG_ABSENT | (2 << 1), FLAG_TOMBSTONE])
def test_write_script_reads_the_stored_version(
    redis_client: redis.Redis, driver: SyncDriver, version: int, stored_flags: int
) -> None:
    stored = Envelope(version, 1, b"old", flags=stored_flags).pack()
    redis_client.set(KS.value(ENCODED), stored)
    # Not above the stored version: refused, and the script reports the stored version exactly.
    below = version - 1 if version > 1 else version
    result = _write(driver, "S", below, b"older")
    assert (result.applied, result.version) == (False, version)
    result = _write(driver, "S", version, b"same-version-other-bytes")
    assert (result.applied, result.version) == (False, version)
    assert redis_client.get(KS.value(ENCODED)) == stored
    # Above it: applied; "existed" tells a value from a tombstone.
    result = _write(driver, "D", version + 1)
    assert (result.applied, result.version) == (True, version + 1)
    assert result.existed == (not stored_flags & FLAG_TOMBSTONE)
    assert unpack(redis_client.get(KS.value(ENCODED))).version == version + 1


@pytest.mark.parametrize("version", [0, 1, 256, 2**40 + 3, VERSION_LIMIT - 2])
def test_lease_script_reads_a_tombstones_version(
    redis_client: redis.Redis, driver: SyncDriver, version: int
) -> None:
    if version:
        tomb = Envelope(version, 1, b"", flags=FLAG_TOMBSTONE).pack()
        redis_client.set(KS.value(ENCODED), tomb)
    token = secrets.token_bytes(16)
    lease = driver.lease(ENCODED, token, 10_000)
    assert (lease.kind, lease.version) == ("l", version)
    stored = redis_client.get(KS.value(ENCODED))
    assert stored == lease.envelope == lease_envelope(token, version)
    held = unpack(stored)
    assert (held.flags, held.version, held.payload) == (FLAG_LEASE, version, token)
    assert not held.is_value
    assert 0 < redis_client.pttl(KS.value(ENCODED)) <= 10_000
    # A second fill sees the lease. A write at the lease's version is refused (the lease carries
    # the tombstone's version); above it, the write replaces the lease and the fill fails.
    assert driver.lease(ENCODED, secrets.token_bytes(16), 10_000).kind == "w"
    if version:
        assert _write(driver, "S", version, b"x").applied is False
    assert _write(driver, "S", version + 1, b"x").applied
    assert not driver.fill(ENCODED, lease.envelope, Envelope(9, 1, b"late").pack(), 0)
    assert unpack(redis_client.get(KS.value(ENCODED))).payload == b"x"


def test_fill_script_stores_only_under_its_own_lease(
    redis_client: redis.Redis, driver: SyncDriver
) -> None:
    lease = driver.lease(ENCODED, secrets.token_bytes(16), 10_000)
    assert lease.kind == "l" and lease.envelope is not None
    other = lease_envelope(secrets.token_bytes(16), lease.version)
    assert not driver.fill(ENCODED, other, Envelope(5, 1, b"not mine").pack(), 0)
    assert driver.fill(ENCODED, lease.envelope, Envelope(5, 1, b"mine").pack(), 0)
    assert unpack(redis_client.get(KS.value(ENCODED))).payload == b"mine"
    assert not driver.fill(ENCODED, lease.envelope, Envelope(6, 1, b"again").pack(), 0)
    assert driver.lease(ENCODED, secrets.token_bytes(16), 10_000).kind == "v"


def test_a_write_during_a_fill_makes_the_fill_fail(
    redis_client: redis.Redis, driver: SyncDriver
) -> None:
    lease = driver.lease(ENCODED, secrets.token_bytes(16), 10_000)
    assert lease.envelope is not None
    assert _write(driver, "S", 100, b"written").applied
    assert not driver.fill(ENCODED, lease.envelope, Envelope(99, 1, b"loaded").pack(), 0)
    assert unpack(redis_client.get(KS.value(ENCODED))).payload == b"written"
    driver.release(ENCODED, lease.envelope)  # not ours any more: left alone
    assert unpack(redis_client.get(KS.value(ENCODED))).payload == b"written"


def test_lua_and_python_agree_on_every_flags_byte(
    redis_client: redis.Redis, driver: SyncDriver
) -> None:
    # Byte 4 as the scripts read it (flags % 32: < 8 a value, 8..15 a tombstone, >= 16 a lease)
    # against Envelope.is_value, for all 256 values.
    name = KS.value(ENCODED)
    for flags in range(256):
        env = Envelope(1000, 1, b"payload", flags=flags)
        packed = env.pack()
        redis_client.set(name, packed)
        lease = driver.lease(ENCODED, b"t" * 16, 10_000)
        if env.is_value:
            assert lease.kind == "v" and lease.envelope == packed, flags
        elif flags & FLAG_LEASE:
            assert lease.kind == "w", flags
        else:
            assert (lease.kind, lease.version) == ("l", 1000), flags
        redis_client.set(name, packed)
        result = _write(driver, "S", 1001)
        assert result.applied and result.existed == env.is_value, flags
        assert driver.has_value(ENCODED)


def test_scripts_treat_a_foreign_value_as_version_zero(
    redis_client: redis.Redis, driver: SyncDriver
) -> None:
    redis_client.set(KS.value(ENCODED), b"not an envelope at all, but long enough to be one")
    assert not driver.has_value(ENCODED)
    result = _write(driver, "S", 1)
    assert result.applied and result.version == 1 and not result.existed
