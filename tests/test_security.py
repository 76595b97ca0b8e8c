"""Safe by default (SPEC 3.9) at the cache level, on a real Redis: codecs between processes, the
clear error for unsupported types, JSON as other languages see it, signatures and key rotation,
bounded key length (long keys stored under a digest name), and credentials that never show.

The scenarios with an active attacker (S19-S23) are in test_scenarios_security.py.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import os
import subprocess
import sys
import textwrap
import traceback
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.aio_facade import make_cache
from tests.servers import RedisServer, wait_until
from tiercache import tiered_cache
from tiercache.envelope import HEADER_SIZE, Envelope, unpack
from tiercache.keys import KEY_BYTES_LIMIT, MAX_KEY_BYTES, KeySpace, encode_key
from tiercache.tiered import TieredCache

NS = "secu"
OLD = "old-secret-of-the-fleet-0123456789"
NEW = "new-secret-of-the-fleet-9876543210"
DELTA = 5.0
FAST: dict[str, Any] = {
    "namespace": NS,
    "health_interval": 0.2,
    "health_timeout": 5.0,
    "socket_timeout": 2.0,
    "startup_timeout": 5.0,
    "heartbeat_interval": 0,
}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make(
    redis_client: redis.Redis, shared_redis: RedisServer, impl: str
) -> Iterator[Callable[..., Any]]:
    """``make(**options)``: a ready cache on the shared, flushed server (``impl``: a TieredCache,
    or an AsyncTieredCache behind tests.aio_facade.SyncFacade)."""
    made: list[TieredCache] = []

    def factory(**options: Any) -> TieredCache:
        cache = make_cache(impl, shared_redis.url, **{**FAST, **options})
        made.append(cache)
        assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            cache.close()


def raw_name(key: Any, namespace: str = NS, max_key_bytes: int = MAX_KEY_BYTES) -> bytes:
    return KeySpace(namespace, 1, max_key_bytes).value(encode_key(key))


# -- the default codec between two processes ----------------------------------------------------

# Run in this process and in a child: both build the same value and compare exactly.
SAMPLE = textwrap.dedent(
    """
    import datetime as dt, math, uuid
    from decimal import Decimal

    def sample():
        ist = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")
        leaf = [
            "ünïcødé \\u2603", "", b"\\x00\\xffbytes", b"", 0, -1, 2**63, 2**64 + 1, -(2**100),
            1.5, -0.0, float("inf"), float("-inf"), float("nan"), True, False, None,
            dt.datetime(2024, 2, 29, 12, 30, 45, 123456),
            dt.datetime(2024, 2, 29, 12, 30, tzinfo=dt.timezone.utc),
            dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=ist),
            dt.date(1970, 1, 1), Decimal("3.14159265358979323846264338327950288"),
            Decimal("-0E-7"), Decimal("Infinity"), uuid.UUID(int=2**128 - 1),
        ]
        return {
            "leaf": leaf,
            "tuple": tuple(leaf),
            "set": {1, "a", b"b", (1, 2), None, Decimal("1.10")},
            "frozenset": frozenset({1.5, "x", frozenset({2})}),
            1: "an int key", (1, "t"): "a tuple key", None: "a None key",
            b"b": {frozenset({1}): [(), [], {}, set(), frozenset()]},
            "deep": [[[({"x": {(1,): {2}}}, (dt.date(2000, 1, 1),))]]],
        }

    def same(a, b):
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            return (math.isnan(a) and math.isnan(b)) or (
                a == b and math.copysign(1, a) == math.copysign(1, b)
            )
        if isinstance(a, (Decimal, dt.datetime, dt.date)):
            return repr(a) == repr(b) and str(a) == str(b)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return len(a) == len(b) and all(
                same(ka, kb) and same(va, vb)
                for (ka, va), (kb, vb) in zip(a.items(), b.items())
            )
        if isinstance(a, (set, frozenset)):
            return sorted(map(repr, a)) == sorted(map(repr, b))
        return a == b
    """
)
_ns: dict[str, Any] = {}
exec(SAMPLE, _ns)
sample: Callable[[], Any] = _ns["sample"]
same: Callable[[Any, Any], bool] = _ns["same"]

CHILD = SAMPLE + textwrap.dedent(
    """
    import sys
    from tiercache import TieredCache
    with TieredCache(sys.argv[1], namespace=sys.argv[2], heartbeat_interval=0) as cache:
        cache["from-child"] = sample()
        got = cache["from-parent"]
        assert same(got, sample()), got
    print("child ok")
    """
)


def test_the_default_codec_round_trips_every_spec_type_between_two_processes(
    make: Callable[..., TieredCache], shared_redis: RedisServer
) -> None:
    value = sample()
    assert same(value, sample()) and not same(value, {**value, "leaf": value["leaf"][:-1]})
    cache = make()
    cache["from-parent"] = value
    child = subprocess.run(
        [sys.executable, "-c", CHILD, shared_redis.url, NS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0 and "child ok" in child.stdout, child.stderr
    got = cache["from-child"]
    assert same(got, value)
    assert cache.stats()["remote_hits"] == 1 and cache.stats()["rejected_payloads"] == 0


class Opaque:
    pass


class Colour(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Opaque(), "Opaque"),
        ({"a": [1, (2, Opaque())]}, "Opaque"),
        (Colour.RED, "Colour"),
        ([bytearray(b"x")], "bytearray"),
        ({1: {2: {3: complex(1, 2)}}}, "complex"),
    ],
)
def test_an_unsupported_type_is_a_type_error_naming_it_and_nothing_is_written(
    value: Any, type_name: str, make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    writer, reader = make(), make()
    writer["k"] = "old"
    assert reader["k"] == "old"
    before = redis_client.get(raw_name("k"))
    with pytest.raises(TypeError, match=rf"{type_name}.*serializer='pickle'"):
        writer["k"] = value
    with pytest.raises(TypeError, match=type_name):
        writer["new"] = value
    with pytest.raises(TypeError, match=type_name):
        writer.get_or_load("loaded", lambda k: value)
    assert redis_client.get(raw_name("k")) == before
    assert redis_client.get(raw_name("new")) is None
    held = redis_client.get(raw_name("loaded"))
    assert held is None or not unpack(held).is_value
    assert writer["k"] == "old" and reader["k"] == "old"
    assert "new" not in writer and writer.get("new") is None


def test_pickle_needs_a_secret_and_then_round_trips_any_object(
    make: Callable[..., TieredCache], shared_redis: RedisServer
) -> None:
    with pytest.raises(ValueError, match="secret"):
        TieredCache(shared_redis.url, serializer="pickle", **FAST)
    writer = make(serializer="pickle", secret=NEW)
    reader = make(serializer="pickle", secret=NEW)
    writer["k"] = {"colour": Colour.RED, "when": dt.date(2020, 1, 1), "c": complex(1, 2)}
    assert reader["k"] == {"colour": Colour.RED, "when": dt.date(2020, 1, 1), "c": complex(1, 2)}
    assert type(reader["k"]["colour"]) is Colour


@pytest.mark.parametrize("secret", [None, NEW])
def test_json_payloads_are_plain_json_after_the_header(
    secret: str | None, make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    """Another language reads the fixed 34-byte header (envelope.py), skips the signature whose
    length is at byte 5, and finds plain UTF-8 JSON; and it can write one the cache reads."""
    pytest.importorskip("orjson")
    cache = make(serializer="json", secret=secret)
    value = {"a": [1, 2.5, "x", None, True], "n": {"m": "ünï"}, "big": 2**53}
    cache["k"] = value
    data = redis_client.get(raw_name("k"))
    assert data[:2] == b"TC" and data[4] == 2  # magic, codec id 2 = json
    sig_len = data[5]
    assert sig_len == (32 if secret else 0)
    payload = data[HEADER_SIZE + sig_len :]
    assert json.loads(payload.decode("utf-8")) == value
    if secret is None:  # a foreign writer (no secret to sign with) is read
        foreign = json.dumps({"from": "another language", "list": [1, 2]}).encode()
        redis_client.set(raw_name("foreign"), Envelope(42, 2, foreign).pack())
        assert cache["foreign"] == {"from": "another language", "list": [1, 2]}
        assert cache.stats()["rejected_payloads"] == 0


# -- signatures and key rotation ----------------------------------------------------------------


def test_key_rotation_reads_values_signed_with_the_old_secret(
    make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    old_only = make(secret=OLD)
    rotating = make(secret=[NEW, OLD])
    new_only = make(secret=[NEW])
    old_only["k"] = "signed with old"
    assert rotating["k"] == "signed with old"
    assert rotating.stats()["rejected_payloads"] == 0
    assert new_only.get("k") is None
    assert new_only.stats()["rejected_payloads"] == 1
    # The rotating cache signs with the new secret: the old-only cache rejects what it writes.
    rotating["k2"] = "signed with new"
    assert new_only["k2"] == "signed with new"
    assert old_only.get("k2") is None and old_only.stats()["rejected_payloads"] == 1
    env = unpack(redis_client.get(raw_name("k2")))
    assert len(env.signature) == 32
    # Invalidation messages: the rotating cache verifies both; the new-only one counts the old
    # cache's messages as unsigned (and obeys them only as "drop").
    rotating_unsigned = rotating.stats()["unsigned_messages"]
    new_only_unsigned = new_only.stats()["unsigned_messages"]
    assert new_only["k2"] == "signed with new"
    old_only["k2"] = "rewritten by old"
    wait_until(lambda: new_only.stats()["unsigned_messages"] > new_only_unsigned, DELTA)
    wait_until(lambda: new_only.local.entry("k2") is None, DELTA)
    assert rotating.stats()["unsigned_messages"] == rotating_unsigned


def test_a_cache_without_a_secret_does_not_sign_and_one_with_a_secret_rejects_unsigned(
    make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    plain, signed = make(), make(secret=NEW)
    plain["k"] = 1
    assert len(unpack(redis_client.get(raw_name("k"))).signature) == 0
    assert signed.get("k") is None and signed.stats()["rejected_payloads"] == 1
    signed["k"] = 2  # a genuine write replaces it
    assert signed["k"] == 2


def test_secrets_are_validated_and_never_shown(shared_redis: RedisServer) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TieredCache(shared_redis.url, secret="short", **FAST)
    with pytest.raises(ValueError):
        TieredCache(shared_redis.url, secret=[], **FAST)
    with TieredCache(shared_redis.url, secret=[NEW, OLD], **FAST) as cache:
        shown = repr(cache) + str(cache) + repr(cache._signer)
    assert NEW not in shown and OLD not in shown


# -- bounded key length -------------------------------------------------------------------------


def test_long_keys_get_a_bounded_injective_name_that_keeps_the_namespace() -> None:
    ks = KeySpace("app", 1, 64)
    short = encode_key("x" * 63)  # 64 bytes: kept as is
    assert ks.stored(short) == short and not ks.is_digest(short)
    longs = [encode_key(k) for k in ["x" * 64, "x" * 65, "x" * 10_000, ("x" * 100, 1), b"y" * 99]]
    names = [ks.value(e) for e in longs]
    for encoded, name in zip(longs, names, strict=True):
        stored = ks.encoded_of_value_key(name)
        assert ks.is_digest(stored) and len(stored) == 64 + 65
        assert name.startswith(b"app:{app:0}:v:" + encoded[:64])  # namespace and prefix kept
        assert ks.refresh_marker(encoded).endswith(stored)
        assert ks.script_keys(encoded)[2] == name
    assert len(set(names)) == len(names)
    # A short key can never take a long key's name, even one spelling out its digest form.
    spelled = ks.encoded_of_value_key(names[2])
    assert ks.value(spelled) != names[2]
    assert ks.value(encode_key("x" * 63)) not in names
    # The hard limit: keys travel whole in invalidation messages (at most 1 MiB).
    with pytest.raises(ValueError, match="key too long"):
        ks.value(b"s" + b"x" * KEY_BYTES_LIMIT)
    for bad in (0, 15, KEY_BYTES_LIMIT + 1):
        with pytest.raises(ValueError, match="max_key_bytes"):
            KeySpace("app", 1, bad)


@pytest.mark.parametrize("secret", [None, NEW])
def test_long_keys_work_through_the_whole_api(
    secret: str | None, make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    writer = make(secret=secret, max_key_bytes=64)
    reader = make(secret=secret, max_key_bytes=64)
    keys = ["s" * 200, b"b" * 300, ("t" * 100, 1, None), "x" * 63, ("t" * 100, 2)]
    for i, key in enumerate(keys):
        writer[key] = i
    names = {n for n in redis_client.scan_iter(count=1000) if b":v:" in n}
    assert len(names) == len(keys) and max(map(len, names)) <= len(b"secu:{secu:0}:v:") + 129
    for i, key in enumerate(keys):
        assert reader[key] == i and key in reader
    assert reader.stats()["rejected_payloads"] == 0
    assert sorted(map(repr, reader)) == sorted(map(repr, keys))  # iteration gives them back
    assert len(reader) == len(keys)
    assert reader.get_many(keys[:2]) == {keys[0]: 0, keys[1]: 1}
    # Invalidations reach the other process' local copy.
    assert reader["s" * 200] == 0  # a local hit now
    writer["s" * 200] = "new"
    wait_until(lambda: reader["s" * 200] == "new", DELTA)
    del writer[b"b" * 300]
    wait_until(lambda: reader.get(b"b" * 300) is None, DELTA)
    assert reader.get_or_load("l" * 500, lambda k: len(k)) == 500
    assert writer["l" * 500] == 500
    # A prefix clear reaches keys stored under a digest name.
    writer.clear_prefix(encode_key(("t" * 100,))[:-1])
    wait_until(lambda: reader.get(("t" * 100, 1, None)) is None, DELTA)
    assert reader.get(("t" * 100, 2)) is None and reader["x" * 63] == 3
    assert sorted(map(repr, reader)) == sorted(map(repr, ["s" * 200, "x" * 63, "l" * 500]))


def test_a_value_planted_under_a_long_keys_name_for_another_key_is_rejected(
    make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    """The long key travels inside the value (and under the signature when there is one): a
    value moved from one long key's name to another's does not read as the other key's."""
    cache = make(max_key_bytes=64)
    cache["a" * 100] = "value of a"
    cache["b" * 100] = "value of b"
    moved = redis_client.get(raw_name("a" * 100, max_key_bytes=64))
    redis_client.set(raw_name("b" * 100, max_key_bytes=64), moved)
    other = make(max_key_bytes=64)
    assert other.get("b" * 100) is None
    assert other.stats()["rejected_payloads"] == 1
    assert sorted(other) == ["a" * 100]  # iteration skips the mismatched one


@pytest.mark.sync_only("a plain function is memoized by TieredCache (tests/test_aio.py: async)")
def test_a_decorated_function_with_long_arguments_is_cleared(
    make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    cache = make(max_key_bytes=64)
    calls: list[str] = []

    @tiered_cache(cache, name="long-args")
    def f(text: str) -> int:
        calls.append(text)
        return len(text)

    assert f("z" * 1000) == 1000 and f("z" * 1000) == 1000 and len(calls) == 1
    assert len([n for n in redis_client.scan_iter() if b":v:" in n]) == 1
    f.cache_clear()
    assert [n for n in redis_client.scan_iter() if b":v:" in n] == []
    assert f("z" * 1000) == 1000 and len(calls) == 2


def test_a_key_beyond_the_hard_limit_is_refused_and_nothing_is_written(
    make: Callable[..., TieredCache], redis_client: redis.Redis
) -> None:
    cache = make()
    key = "k" * KEY_BYTES_LIMIT
    with pytest.raises(ValueError, match="key too long"):
        cache[key] = 1
    with pytest.raises(ValueError, match="key too long"):
        cache.get(key)
    with pytest.raises(ValueError, match="key too long"):
        cache.get_or_load(key, lambda k: 1)
    assert list(redis_client.scan_iter(match=b"*:v:*")) == []
    cache["k" * 1000] = "fine"
    assert cache["k" * 1000] == "fine"


# -- credentials in URLs never show ---------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    ["plain-Secret1", "with/slash-Secret2", "with?query-Secret3", "with#frag-Secret4", "br[1]ack"],
)
def test_a_malformed_url_error_never_quotes_the_password(password: str) -> None:
    for url in (
        f"redis://:{password}@127.0.0.1:notaport/0",
        f"redis://user:{password}@127.0.0.1:1/0",
        f"rediss://:{password}@[::1:1/0",
    ):
        try:
            cache = TieredCache(url, **{**FAST, "startup_timeout": 0.2})
        except ValueError as err:
            text = "".join(traceback.format_exception(err)) + repr(err)
            pieces = [p for p in password.replace("/", " ").replace("?", " ").split() if len(p) > 2]
            pieces += [password.split("/")[0], password.split("#")[0], password.split("?")[0]]
            leaked = [p for p in pieces if len(p) > 2 and p in text]
            assert not leaked, (url, text)
            assert "invalid Redis URL" in str(err)
        except Exception as err:  # pragma: no cover - reported with its text
            pytest.fail(f"{url}: {type(err).__name__} instead of ValueError")
        else:  # a URL redis-py accepts as it is (it fails later, at connect)
            cache.close()


def test_a_malformed_url_without_credentials_keeps_redis_pys_explanation() -> None:
    with pytest.raises(ValueError, match="invalid Redis URL: Port could not be cast"):
        TieredCache("redis://127.0.0.1:notaport/0", **FAST)


def test_connection_errors_never_quote_the_password(caplog: pytest.LogCaptureFixture) -> None:
    password = "pw-" + os.urandom(6).hex()
    caplog.set_level("DEBUG")
    cache = TieredCache(f"redis://:{password}@127.0.0.1:1/0", **{**FAST, "startup_timeout": 0.3})
    try:
        with pytest.raises(Exception) as err:
            cache["k"] = 1
        text = "".join(traceback.format_exception(err.value))
        assert "Connection refused" in text or "connecting" in text
    finally:
        cache.close()
    assert password not in text + repr(cache) + caplog.text


def test_sample_values_are_exotic_enough() -> None:
    """Guards the round-trip test's value: every SPEC 3.9 type is inside it."""
    found: set[type] = set()

    def walk(v: Any) -> None:
        found.add(type(v))
        if isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, (list, tuple, set, frozenset)):
            for x in v:
                walk(x)

    walk(sample())
    wanted = {str, bytes, int, float, bool, type(None), list, tuple, dict, set, frozenset}
    wanted |= {dt.datetime, dt.date, Decimal, uuid.UUID}
    assert wanted <= found
    assert any(isinstance(x, float) and math.isnan(x) for x in sample()["leaf"])
