"""The security scenarios S19-S23 of research/correctness.md, against real servers and real attacks.

The attacker is the test itself with a raw redis-py client: it SETs poisoned, tampered, replayed
and garbage entries under the cache's own Redis keys (S19), PUBLISHes forged, malformed and
flooding invalidations on the cache's own channel (S20), feeds hostile keys (S21), and plants
values built to exhaust memory (S22). S23 runs the whole cache against a TLS-only server whose
only usable account is an ACL user limited to the commands and key/channel patterns the library
needs, and checks that the password never shows. Nothing is mocked: the one patch is
``pickle.loads``, replaced by a recorder to prove it is never reached with attacker bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
import zlib
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.servers import RedisServer, wait_until
from tests.tls import TlsRedisServer, make_certificates, tls_server
from tiercache import tiered_cache
from tiercache.codec import resolve_codec
from tiercache.driver import load_script_source
from tiercache.envelope import (
    COMPRESSION_SHIFT,
    FLAG_TOMBSTONE,
    Envelope,
    unpack,
)
from tiercache.errors import CacheUnavailable
from tiercache.keys import KeySpace, encode_key
from tiercache.protocol import format_message
from tiercache.signing import Signer
from tiercache.tiered import TieredCache

NS = "sec"
SECRET = "the-shared-secret-of-the-fleet-0123"
ATTACKER_SECRET = "an-attacker-secret-not-the-fleet-9"
DELTA = 5.0  # generous propagation bound on a busy 2-core machine (the target is ~2 ms)
FAST: dict[str, Any] = {
    "namespace": NS,
    "health_interval": 0.2,
    "health_timeout": 5.0,
    "socket_timeout": 2.0,
    "startup_timeout": 5.0,
    "heartbeat_interval": 0,  # (no background heartbeat writes: counts of threads stay exact)
}
CONFIGS: dict[str, dict[str, Any]] = {
    "msgpack": {},
    "msgpack+secret": {"secret": SECRET},
    "pickle+secret": {"serializer": "pickle", "secret": SECRET},
}
CODEC_ID = {"msgpack": 1, "pickle+secret": 3, "msgpack+secret": 1}


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def make(redis_client: redis.Redis, shared_redis: RedisServer) -> Iterator[Callable[..., Any]]:
    """``make(**options)``: a ready TieredCache (namespace "sec") on the shared, flushed server."""
    made: list[TieredCache] = []

    def factory(**options: Any) -> TieredCache:
        cache = TieredCache(shared_redis.url, **{**FAST, **options})
        made.append(cache)
        assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            cache.close()


@pytest.fixture
def raw(redis_client: redis.Redis) -> redis.Redis:
    """The attacker: a plain client of the shared server (bytes replies)."""
    return redis_client


@pytest.fixture
def pickle_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every payload ``pickle.loads`` receives in this process (it still loads genuine ones)."""
    calls: list[bytes] = []
    real = pickle.loads

    def recorder(data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(bytes(data))
        if b"CANARY" in bytes(data):
            raise AssertionError("pickle.loads was handed the attacker's payload")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(pickle, "loads", recorder)
    return calls


def name_of(key: Hashable, namespace: str = NS) -> bytes:
    return KeySpace(namespace).value(encode_key(key))


def signed(env: Envelope, encoded: bytes, secret: str) -> bytes:
    """``env`` packed and signed with ``secret`` for ``encoded``, as a cache would."""
    header = env._replace(signature=bytes(32)).header()
    return header + Signer(secret, NS).sign_envelope(encoded, header, env.payload) + env.payload


class Truth:
    """The source of truth behind the caches: a dict and a loader that counts its calls."""

    def __init__(self, **values: Any) -> None:
        self.values: dict[Hashable, Any] = dict(values)
        self.calls = 0

    def __call__(self, key: Hashable) -> Any:
        self.calls += 1
        return self.values[key]


class Canary:
    """Unpickling this creates the file ``path`` (a real code-execution payload)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def canary_payload(path: Path) -> bytes:
    payload = pickle.dumps(Canary(str(path)), protocol=5)
    assert b"CANARY" in payload  # (the path carries the marker the recorder looks for)
    return payload


def counter_seq(raw: redis.Redis, namespace: str = NS) -> int:
    """The partition's current sequence number (what the next genuine message will follow)."""
    return int(raw.get(KeySpace(namespace).counter(0)) or 0)


def publish(raw: redis.Redis, data: bytes, namespace: str = NS) -> int:
    return int(raw.publish(KeySpace(namespace).channel(0), data))


def local_version(cache: TieredCache, key: str) -> int | None:
    e = cache.local.entry(key)
    return None if e is None else int(e.version)


# -- S19: poisoned or tampered payloads -----------------------------------------------------------


def _attacks(config: str, tmp: Path, genuine: Callable[[str], bytes]) -> dict[str, bytes]:
    """The bytes each S19 attack plants under key "k" (``genuine(key)``: a real entry's bytes)."""
    evil = canary_payload(tmp / "CANARY-created")
    attacks = {
        "pickle-raw": evil,
        "pickle-envelope-unsigned": Envelope(9, 3, evil).pack(),
        "pickle-envelope-random-signature": Envelope(9, 3, evil, signature=os.urandom(32)).pack(),
        "pickle-envelope-attacker-secret": signed(
            Envelope(9, 3, evil), encode_key("k"), ATTACKER_SECRET
        ),
        "garbage": os.urandom(200),
        "empty": b"",
        "magic-only": b"TC",
        "truncated-header": genuine("k")[:20],
        "truncated-payload": genuine("k")[:-1],
    }
    if "secret" in config:
        good = genuine("k")
        for name, offset in [("version", 10), ("expiry", 20), ("codec", 4), ("signature", 40)]:
            flipped = bytearray(good)
            flipped[offset] ^= 0x01
            attacks[f"flipped-bit-{name}"] = bytes(flipped)
        flipped = bytearray(good)
        flipped[-1] ^= 0x80
        attacks["flipped-bit-payload"] = bytes(flipped)
        attacks["copied-from-another-key"] = genuine("other")
        attacks["signature-stripped"] = unpack(good)._replace(signature=b"").pack()
        attacks["msgpack-envelope-attacker-secret"] = signed(
            Envelope(9, 1, resolve_codec(None).dumps("forged")), encode_key("k"), ATTACKER_SECRET
        )
    return attacks


UNSIGNED_ATTACKS = [
    "pickle-raw",
    "pickle-envelope-unsigned",
    "pickle-envelope-random-signature",
    "pickle-envelope-attacker-secret",
    "garbage",
    "empty",
    "magic-only",
    "truncated-header",
    "truncated-payload",
]
SIGNATURE_ATTACKS = [
    "msgpack-envelope-attacker-secret",
    "flipped-bit-version",
    "flipped-bit-expiry",
    "flipped-bit-codec",
    "flipped-bit-signature",
    "flipped-bit-payload",
    "copied-from-another-key",
    "signature-stripped",
]
S19_CASES = [
    (config, attack)
    for config in CONFIGS
    for attack in UNSIGNED_ATTACKS + (SIGNATURE_ATTACKS if "secret" in config else [])
]


@pytest.mark.parametrize(("config", "attack"), S19_CASES)
def test_s19_poisoned_entry_is_a_miss_loaded_from_the_truth_and_overwritten(
    config: str,
    attack: str,
    make: Callable[..., TieredCache],
    raw: redis.Redis,
    tmp_path: Path,
    pickle_calls: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S19 (a)(b)(c)(e): no code runs, each poisoned read is a miss served from the truth,
    counted, logged, and the poisoned bytes are replaced by the fill's."""
    options = CONFIGS[config]
    writer = make(**options)

    def genuine(key: str) -> bytes:
        writer[key] = f"genuine {key}"
        data = raw.get(name_of(key))
        assert data is not None
        return data

    attacks = _attacks(config, tmp_path, genuine)
    truth = Truth(k="the truth")
    reader = make(loader=truth, **options)
    planted = attacks[attack]
    raw.set(name_of("k"), planted)
    before = reader.stats()
    caplog.set_level(logging.DEBUG, logger="tiercache")

    assert reader["k"] == "the truth"

    after = reader.stats()
    assert truth.calls == 1, "the poisoned entry was not a miss that loads from the truth"
    assert after["misses"] == before["misses"] + 1
    assert after["rejected_payloads"] == before["rejected_payloads"] + 1, "not counted"
    assert any("rejected the payload" in r.getMessage() for r in caplog.records), "not logged"
    # The fill replaced exactly the poisoned bytes: Redis now holds a genuine, readable entry.
    stored = raw.get(name_of("k"))
    assert stored is not None and stored != planted
    env = unpack(stored)
    assert env.is_value and env.codec == CODEC_ID[config]
    assert ("secret" in config) == (len(env.signature) == 32)
    fresh = make(**options)
    assert fresh["k"] == "the truth"
    assert fresh.stats()["remote_hits"] == 1 and fresh.stats()["rejected_payloads"] == 0
    # And no code of the attacker's ran.
    assert not (tmp_path / "CANARY-created").exists()
    assert not [p for p in pickle_calls if b"CANARY" in p]
    if config != "pickle+secret":
        assert pickle_calls == [], "pickle.loads was called by a cache that does not use pickle"


def test_s19_the_canary_payload_is_armed(tmp_path: Path) -> None:
    """Control for S19: the planted payload really runs code when unpickled (in a subprocess)."""
    target = tmp_path / "CANARY-control"
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=canary_payload(target),
        check=True,
        timeout=60,
    )
    assert target.exists()


def test_s19_rejections_are_logged_once_per_interval(
    make: Callable[..., TieredCache], raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    reader = make(secret=SECRET)
    caplog.set_level(logging.WARNING, logger="tiercache")
    for i in range(20):
        raw.set(name_of(f"k{i}"), os.urandom(64))
        assert reader.get(f"k{i}") is None
    assert reader.stats()["rejected_payloads"] == 20
    warnings = [r for r in caplog.records if "rejected the payload" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, "rejections must be logged at most once per interval"


def test_s19_the_batch_reads_reject_poison_too(
    make: Callable[..., TieredCache], raw: redis.Redis, pickle_calls: list[bytes], tmp_path: Path
) -> None:
    reader = make(secret=SECRET, serializer="pickle")
    raw.set(name_of("a"), Envelope(9, 3, canary_payload(tmp_path / "CANARY-a")).pack())
    raw.set(name_of("b"), os.urandom(50))
    assert reader.get_many(["a", "b"]) == {}
    assert reader.stats()["rejected_payloads"] == 2
    got = reader.get_or_load_many(["a", "b"], lambda keys: {k: k.upper() for k in keys})
    assert got == {"a": "A", "b": "B"}
    assert not (tmp_path / "CANARY-a").exists()
    assert not [p for p in pickle_calls if b"CANARY" in p]


def test_s19_the_batch_fill_overwrites_a_rejected_entry(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    writer = make(secret=SECRET)
    reader = make(secret=SECRET)
    writer["k"] = "genuine"
    tampered = bytearray(raw.get(name_of("k")))
    tampered[-1] ^= 0x01
    raw.set(name_of("k"), bytes(tampered))
    assert reader.get_or_load_many(["k"], lambda keys: {"k": "the truth"}) == {"k": "the truth"}
    assert raw.get(name_of("k")) != bytes(tampered), "the tampered entry was left in place"


def test_s19_an_older_signed_envelope_reinstalled_never_beats_a_newer_version(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """S19 (d): the version is inside the MAC, so a replayed old entry keeps its old version:
    a process holding the newer one keeps it, and the next genuine write wins the CAS."""
    writer = make(secret=SECRET)
    holder = make(secret=SECRET)
    writer["k"] = "v1"
    old = raw.get(name_of("k"))
    writer["k"] = "v2"
    assert holder["k"] == "v2"
    v2 = local_version(holder, "k")
    # The replayed version cannot be relabelled: raising it breaks the signature.
    relabelled = bytearray(old)
    relabelled[6:14] = (unpack(old).version + 10**9).to_bytes(8, "big")
    raw.set(name_of("k"), bytes(relabelled))
    probe = make(secret=SECRET)
    assert probe.get("k") is None and probe.stats()["rejected_payloads"] == 1
    raw.set(name_of("k"), old)  # the replay itself
    # The holder of v2 keeps v2 (its local copy is not replaced by an older version).
    assert holder["k"] == "v2" and local_version(holder, "k") == v2
    # The next genuine write is accepted at once (CAS against the replayed, older version).
    writer["k"] = "v3"
    stored = unpack(raw.get(name_of("k")))
    assert stored.version > v2 and resolve_codec(None).loads(stored.payload) == "v3"
    wait_until(lambda: holder["k"] == "v3", DELTA, message="v3 reaches the holder")
    assert make(secret=SECRET)["k"] == "v3"


def test_s19_a_replayed_entry_older_than_an_applied_invalidation_is_not_served(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    truth = Truth(k="v2")
    applied: list[int] = []  # on_invalidate runs once the invalidation is fully applied
    writer = make(secret=SECRET)
    reader = make(secret=SECRET, loader=truth, on_invalidate=lambda key, v: applied.append(v))
    writer["k"] = "v1"
    old = raw.get(name_of("k"))
    assert reader["k"] == "v1"
    writer["k"] = "v2"  # the reader applies its invalidation (and drops its copy of v1)
    v2 = unpack(raw.get(name_of("k"))).version
    wait_until(lambda: v2 in applied, DELTA, message="the reader applied v2's invalidation")
    assert reader.local.entry("k") is None
    raw.set(name_of("k"), old)  # the attacker replays v1
    assert reader["k"] == "v2", "P3: a version older than an applied invalidation was served"


# -- S20: forged, malformed or flooding invalidations --------------------------------------------


@pytest.mark.parametrize("config", ["msgpack", "msgpack+secret"])
def test_s20_version_poisoning_costs_one_miss_at_most(
    config: str, make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """S20 (a): an invalidation (k, 2**53 - 1) drops k locally (an extra miss) and nothing else;
    a genuine write right after is cached and served everywhere."""
    options = CONFIGS[config]
    writer, reader = make(**options), make(**options)
    writer["k"] = "v1"
    assert reader["k"] == "v1" and reader["k"] == "v1"
    assert reader.stats()["local_hits"] == 1
    forged = format_message(counter_seq(raw) + 1, 2**53 - 1, "evil", "S", encode_key("k"))
    assert publish(raw, forged) == 2
    wait_until(lambda: reader.local.entry("k") is None, DELTA, message="the forged drop applied")
    # A genuine write right afterwards is accepted, published, cached and served; the key stays
    # cacheable (each new version: one miss, then local hits).
    for value in ["v2", "v3"]:
        writer["k"] = value
        wait_until(lambda v=value: reader["k"] == v, DELTA, message=f"{value} is served")
        hits = reader.stats()["local_hits"]
        assert reader["k"] == value and reader.stats()["local_hits"] == hits + 1
        assert writer["k"] == value
    assert unpack(raw.get(name_of("k"))).version < 2**52, "the forged version reached Redis"
    if "secret" in config:
        assert reader.stats()["unsigned_messages"] >= 1


def test_s20_with_a_secret_unsigned_plausible_versions_are_not_believed(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """A forged version 30 minutes ahead is plausible by the clock; unsigned, it must still not
    become the key's high-water mark (which would refuse local fills of genuine versions)."""
    writer, reader = make(secret=SECRET), make(secret=SECRET)
    writer["k"] = "v1"
    assert reader["k"] == "v1"
    ahead = (time.time_ns() // 1000) + 30 * 60 * 1_000_000
    publish(raw, format_message(counter_seq(raw) + 1, ahead, "evil", "S", encode_key("k")))
    wait_until(lambda: reader.stats()["unsigned_messages"] == 1, DELTA)
    for i in range(3):  # genuine writes, each cached locally by the reader after one miss
        writer["k"] = f"w{i}"
        wait_until(lambda i=i: reader["k"] == f"w{i}", DELTA)
        hits = reader.stats()["local_hits"]
        assert reader["k"] == f"w{i}"
        assert reader.stats()["local_hits"] == hits + 1, "the key became uncacheable"
    assert reader._guard.newest("k") < ahead


MALFORMED = [
    b"\xff\xfe\x00garbage",  # not UTF-8
    b"TC1 5 + 77 origin S",  # no key line
    b"TC1 x + 77 origin S -\nsk",  # seq not a number
    b"TC1 5 + 77 origin Z -\nsk",  # unknown op
    b"TC1 5 + -4 origin S -\nsk",  # negative version
    b"TC1 5 + 77 origin S - extra\nsk",  # a field too many
    b"TC1 5 ? 77 origin S -\nsk",  # bad restart flag
    b"TC1 5 + 77 \xff\xfe S -\nsk",  # origin not ASCII
    b"TC1 5 + 77 origin C -\nsk",  # a clear with a key
    b"TC1 5 + 77 origin S -\n",  # a set without a key
    b"TC1 0 + 77 origin S -\nsk",  # seq 0
    b"TC1 5 + 9007199254740992 origin S -\nsk",  # version 2**53
    b"TC2 5 + 77 origin S -\nsk",  # another protocol
    b"",
]


def test_s20_malformed_messages_are_dropped_and_the_listener_survives(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """S20 (c): non-UTF-8, missing-field, out-of-range and oversized messages are counted and
    dropped; the listener lives on, and later genuine invalidations are not lost."""
    writer, reader = make(), make()
    writer["k"] = "v1"
    assert reader["k"] == "v1"
    oversized = b"TC1 1 + 77 origin S -\n" + b"s" * (2 << 20)
    for data in [*MALFORMED, oversized]:
        publish(raw, data)
    wait_until(lambda: reader.stats()["malformed_messages"] == len(MALFORMED) + 1, DELTA)
    assert reader._listener is not None and reader._listener.alive
    assert reader.stats()["disconnects"] == 0
    writer["k"] = "v2"
    wait_until(lambda: reader["k"] == "v2", DELTA, message="a genuine invalidation after garbage")
    assert reader.wait_ready(DELTA)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("config", ["msgpack", "msgpack+secret"])
def test_s20_a_flood_of_forged_invalidations_keeps_resources_bounded(
    config: str, make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """S20 (b): 20 000 hostile messages in one burst (garbage, missing fields, replayed and
    forged well-formed ones with sequence numbers behind and far ahead): memory stays flat, the
    listener survives, and genuine traffic is served right after."""
    options = CONFIGS[config]
    writer, reader = make(**options), make(**options)
    for i in range(50):
        writer[f"k{i}"] = i
        assert reader[f"k{i}"] == i
    genuine = format_message(counter_seq(raw), 1, writer._origin, "S", encode_key("k0"))
    threads = set(threading.enumerate())
    rss = _rss_bytes()
    cpu = time.process_time()
    malformed_before = reader.stats()["malformed_messages"]
    pipe = raw.pipeline(transaction=False)
    channel = KeySpace(NS).channel(0)
    now_us = time.time_ns() // 1000
    n_garbage = 0
    for i in range(20_000):
        kind = i % 5
        if kind == 0:
            data = os.urandom(40)
            n_garbage += 1
        elif kind == 1:
            data = b"TC1 %d + 77 evil S" % i
            n_garbage += 1
        elif kind == 2:  # far ahead: a gap, which makes the listener check the counter
            data = format_message(10**12 + i, now_us, "evil", "S", encode_key(f"k{i % 50}"))
        elif kind == 3:  # behind: stale
            data = format_message(1 + i % 3, 2**53 - 1, "evil", "D", encode_key(f"k{i % 50}"))
        else:  # a genuine message replayed
            data = genuine
        pipe.publish(channel, data)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    wait_until(
        lambda: reader.stats()["malformed_messages"] - malformed_before >= n_garbage,
        60.0,
        interval=0.05,
        message="the listener processed the flood",
    )
    assert reader._listener is not None and reader._listener.alive
    assert set(threading.enumerate()) <= threads, "a thread was started"
    grown = _rss_bytes() - rss
    assert grown < 64 << 20, f"memory grew by {grown} bytes during the flood"
    assert time.process_time() - cpu < 120
    assert len(reader._guard) <= 100, "forged versions were remembered"
    # Genuine traffic right after: a write is cached and served everywhere.
    assert reader.wait_ready(DELTA)
    writer["k1"] = "after"
    wait_until(lambda: reader["k1"] == "after", DELTA)
    hits = reader.stats()["local_hits"]
    assert reader["k1"] == "after" and reader.stats()["local_hits"] == hits + 1
    assert unpack(raw.get(name_of("k1"))).version < 2**52


@pytest.mark.parametrize("config", ["msgpack", "msgpack+secret"])
def test_s20_a_forged_message_cannot_steal_a_genuine_sequence_number(
    config: str, make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    options = CONFIGS[config]
    writer, reader = make(**options), make(**options, local_ttl=60.0)
    writer["k"] = "v1"
    assert reader["k"] == "v1" and reader["k"] == "v1"
    # A well-formed message about another key, numbered as the next genuine one will be.
    seen = reader.stats()["invalidations_received"]
    publish(raw, format_message(counter_seq(raw) + 1, 1, "evil", "D", encode_key("other")))
    wait_until(lambda: reader.stats()["invalidations_received"] > seen, DELTA)
    writer["k"] = "v2"
    wait_until(lambda: reader["k"] == "v2", DELTA, message="the genuine invalidation was lost")


# -- S21: key and pattern injection --------------------------------------------------------------

HOSTILE_KEYS: list[Any] = [
    "*",
    "?",
    "[",
    "]",
    "[a-z]",
    "\\",
    "\\*",
    ":",
    "a:b",
    "sec:{sec:0}:seq",
    "v:*",
    "line\nbreak",
    "nul\x00byte",
    b"\x00\xff*?[]\\",
    ("a:b",),
    ("a", "b"),
    ("a", "b:c"),
    ("a:b", "c"),
    ("1:sa",),
    ("", ""),
    ("",),
    (),
    ("*", "?"),
    (("*",), "["),
    "x" * 1_000_000,
]


def _scan(raw: redis.Redis) -> set[bytes]:
    return set(raw.scan_iter(count=1000))


def _scripts(raw: redis.Redis) -> int:
    return int(raw.info("memory")["number_of_cached_scripts"])


def test_s21_hostile_keys_never_collide_and_round_trip(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    writer, reader = make(), make()
    writer["warm-up"] = 0
    scripts = _scripts(raw)
    for i, key in enumerate(HOSTILE_KEYS):
        writer[key] = i
    names = {n for n in _scan(raw) if b":v:" in n}
    assert len(names) == len(HOSTILE_KEYS) + 1, "two keys share a Redis key"
    for i, key in enumerate(HOSTILE_KEYS):
        assert reader[key] == i
        assert key in reader
    assert sorted(map(repr, reader)) == sorted(map(repr, [*HOSTILE_KEYS, "warm-up"]))
    assert len(reader) == len(HOSTILE_KEYS) + 1
    # Each is invalidated alone, everywhere.
    writer["*"] = "new"
    wait_until(lambda: reader["*"] == "new", DELTA)
    assert reader["?"] == HOSTILE_KEYS.index("?") and reader["[a-z]"] == HOSTILE_KEYS.index("[a-z]")
    del writer["x" * 1_000_000]
    wait_until(lambda: reader.get("x" * 1_000_000) is None, DELTA)
    assert _scripts(raw) == scripts, "a key changed the script cache"
    # Long keys are stored under a bounded name that keeps the namespace.
    longest = max(len(n) for n in _scan(raw))
    assert longest <= len(KeySpace(NS).prefix(0)) + 2 + 1024 + 65


def test_s21_clears_touch_only_the_intended_entries(
    make: Callable[..., TieredCache], raw: redis.Redis, shared_redis: RedisServer
) -> None:
    """``clear_prefix``, ``cache_clear`` and ``clear`` with glob characters everywhere (keys,
    prefixes, function names, namespaces): a SCAN before and after shows exactly the intended
    entries gone, and the script cache does not grow."""
    neighbours = [
        TieredCache(shared_redis.url, **{**FAST, "namespace": ns})
        for ns in ["se", "sec*", "se?", "sec[", "sec\\"]
    ]
    try:
        main = make()
        for n in neighbours:
            n["a*"] = n["*"] = "neighbour"
        theirs = {n for n in _scan(raw) if not n.startswith(KeySpace(NS).prefix(0))}
        keys = [("a*", 1), ("a*", "[x]"), ("ab", 1), ("a", "*"), ("a*b", 1), "a*", "*"]
        for i, key in enumerate(keys):
            main[key] = i
        long_hit = ("a*", "y" * 5000)  # stored under a digest name: still found by its prefix
        main[long_hit] = "long"

        @tiered_cache(main, name="f*[?]\\:")
        def f(x: Any) -> Any:
            return ("f", x)

        @tiered_cache(main, name="f*")
        def g(x: Any) -> Any:
            return ("g", x)

        for x in ["*", "?", "z" * 3000, 1]:
            f(x)
            g(x)
        scripts = _scripts(raw)
        before = _scan(raw)

        prefix = b"t3:sa*"  # the encodings of the tuples ("a*", ...)
        assert encode_key(("a*", 1)).startswith(prefix)
        main.clear_prefix(prefix)
        gone = before - _scan(raw)
        assert gone == {name_of(k) for k in [("a*", 1), ("a*", "[x]"), long_hit]}

        before = _scan(raw)
        f.cache_clear()
        gone = before - _scan(raw)
        assert len(gone) == 4 and all(b"f*[?]\\:" in n for n in gone), gone
        assert g("*") == ("g", "*") and g.cache_info().misses == 4  # g untouched

        before = _scan(raw)
        main.clear()
        gone = before - _scan(raw)
        assert gone and all(n.startswith(KeySpace(NS).prefix(0)) for n in gone)
        assert theirs <= _scan(raw), "a clear reached another namespace"
        for n in neighbours:
            assert n["a*"] == "neighbour" and n["*"] == "neighbour"
        assert _scripts(raw) == scripts
    finally:
        for n in neighbours:
            n.close()


# -- S22: huge values and resource exhaustion ----------------------------------------------------


def test_s22_a_50mb_value_is_refused_and_never_partially_stored(
    make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    writer, reader = make(local_maxbytes=10 << 20), make()
    writer["k"] = "small"
    assert reader["k"] == "small"
    huge = os.urandom(50 << 20)
    with pytest.raises(ValueError, match="max_value_bytes"):
        writer["k"] = huge
    with pytest.raises(ValueError, match="max_value_bytes"):
        writer.get_or_load("k2", lambda k: huge)
    huge = b""  # (free the 50 MB)
    assert writer["k"] == "small" and reader["k"] == "small"
    assert raw.get(name_of("k2")) is None or not unpack(raw.get(name_of("k2"))).is_value
    assert max(raw.strlen(n) for n in _scan(raw) if b":v:" in n) < 1 << 20
    assert writer.local.currbytes <= 10 << 20


def test_s22_a_compressible_huge_value_is_refused_or_readable(
    make: Callable[..., TieredCache],
) -> None:
    writer, reader = make(compress_over=1024), make(compress_over=1024)
    value = b"\x00" * (50 << 20)
    try:
        writer["k"] = value
    except ValueError:
        return  # refused with a clear error: fine
    assert reader.get("k") == value, "stored, yet unreadable by every other process"


@pytest.mark.parametrize("method", ["zlib", "lz4"])
def test_s22_a_decompression_bomb_is_a_miss_with_bounded_memory(
    method: str, make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """A planted payload that inflates about 1000:1 (32 MiB from 32 KiB) is refused: the
    decompressed size is capped at 32 x max_value_bytes and memory stays within it."""
    max_value = 64 << 10
    reader = make(max_value_bytes=max_value, compress_over=1024)
    if method == "zlib":  # zlib reaches ~1000:1
        size = 32 << 20
        bomb, method_id = zlib.compress(b"\x00" * size, 9), 1
    else:  # lz4's format tops out near 255:1
        lz4 = pytest.importorskip("lz4.block")
        size = 8 << 20
        bomb, method_id = lz4.compress(b"\x00" * size, store_size=True), 2
    assert len(bomb) <= max_value and size / len(bomb) > 200
    env = Envelope(5, 1, bomb, flags=method_id << COMPRESSION_SHIFT)
    raw.set(name_of("bomb"), env.pack())
    tracemalloc.start()
    try:
        assert reader.get("bomb") is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.stats()["rejected_payloads"] == 1
    assert peak < 32 * max_value + (4 << 20), f"peak {peak} bytes while refusing the bomb"
    # A lying lz4 size header (1 GiB) is refused before anything is allocated.
    liar = (1 << 30).to_bytes(4, "little") + b"\x00" * 16
    raw.set(name_of("liar"), Envelope(5, 1, liar, flags=2 << COMPRESSION_SHIFT).pack())
    assert reader.get("liar") is None
    assert reader.stats()["rejected_payloads"] == 2


def test_s22_json_nested_100000_deep(make: Callable[..., TieredCache], raw: redis.Redis) -> None:
    cache = make(serializer="json")
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError):
        cache["deep"] = deep
    assert raw.get(name_of("deep")) is None
    payload = b"[" * 100_000 + b"]" * 100_000
    raw.set(name_of("planted"), Envelope(5, 2, payload).pack())
    assert cache.get("planted") is None
    assert cache.stats()["rejected_payloads"] == 1
    # The default codec refuses msgpack nested as deep, too.
    other = make(namespace="sec2")
    raw.set(
        KeySpace("sec2").value(encode_key("m")), Envelope(5, 1, b"\x91" * 100_000 + b"\xc0").pack()
    )
    assert other.get("m") is None and other.stats()["rejected_payloads"] == 1


def test_s22_the_local_tier_stays_within_local_maxbytes(
    make: Callable[..., TieredCache],
) -> None:
    cap = 1 << 20
    writer = make(local_maxbytes=cap, max_value_bytes=4 << 20)
    reader = make(local_maxbytes=cap, max_value_bytes=4 << 20)
    for i in range(100):
        writer[f"k{i}"] = os.urandom(50_000)
        assert reader[f"k{i}"] is not None
        assert writer.local.currbytes <= cap and reader.local.currbytes <= cap
    heavy = os.urandom(2 << 20)  # heavier than the local tier: lives in Redis only
    writer["heavy"] = heavy
    assert reader["heavy"] == heavy and reader["heavy"] == heavy
    assert reader.local.entry("heavy") is None and writer.local.entry("heavy") is None
    assert writer["heavy"] == heavy
    assert writer.local.currbytes <= cap and reader.local.currbytes <= cap


@pytest.mark.parametrize("n", [20_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_s22_churn_over_many_keys_keeps_every_map_bounded(
    n: int, make: Callable[..., TieredCache], raw: redis.Redis
) -> None:
    """``n`` distinct keys read through a batch loader and ``n`` distinct invalidations applied
    (10^5 in the slow variant): the local tier, the fill guard's high-water marks (at most
    65 536) and the in-flight maps stay bounded; no thread or connection is left behind."""
    cache = make(local_maxsize=1000)
    threads = set(threading.enumerate())
    clients = 0
    for start in range(0, n, 2000):
        keys = [f"c{i}" for i in range(start, start + 2000)]
        got = cache.get_or_load_many(keys, lambda ks: {k: k for k in ks})
        assert len(got) == 2000
        clients = clients or len(raw.client_list())  # (after the pool's first use)
    # 10^5 invalidations of distinct keys, as writers of another process would send them.
    sha = raw.script_load(load_script_source("write"))
    ks = KeySpace(NS)
    seen = cache.stats()["invalidations_received"]
    now_us = time.time_ns() // 1000
    tomb = Envelope(now_us, 0, b"", FLAG_TOMBSTONE)
    pipe = raw.pipeline(transaction=False)
    for i in range(n):
        enc = encode_key(f"c{i}")
        version = now_us + 1 + i
        env = tomb._replace(version=version).pack()
        pipe.evalsha(
            sha, 3, *ks.script_keys(enc),
            "D", version, env, 60_000, "other", ks.channel(0), 10_000, enc, "-", version + 10**10,
        )  # fmt: skip
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    wait_until(
        lambda: cache.stats()["invalidations_received"] - seen >= n,
        120.0,
        interval=0.05,
        message="every invalidation applied",
    )
    assert len(cache.local) <= 1000
    assert len(cache._guard) <= 65_536
    assert len(cache._flights) == 0
    assert cache._refresher.pending == 0
    assert set(threading.enumerate()) <= threads, "a thread was started"
    assert len(raw.client_list()) <= clients, "connections piled up"


# -- S23: AUTH, ACL and TLS reach every connection -----------------------------------------------

# Every command the library sends, directly or from its Lua scripts (ACL checks both).
CACHE_COMMANDS = [
    "evalsha",  # every script call
    "script|load",  # after a restart or SCRIPT FLUSH (NOSCRIPT)
    "get", "mget", "set", "getrange",  # reads, the refresh marker, iteration's value check
    "scan", "unlink",  # iteration, len, clear, clear_prefix, cache_clear
    "time",  # the version clock's calibration (and inside write.lua)
    "xrevrange",  # the listener's replay from the log
    "subscribe", "ping", "client|setname",  # the listener's connection
    "hset", "pexpire", "hgetall",  # heartbeats (hgetall: reading them)
    "config|get",  # the start-up checks (tiercache.checks; without it they are skipped)
    # inside the Lua scripts:
    "incr", "xadd", "publish", "del", "pttl",
]  # fmt: skip
APP_PASSWORD = f"app-{secrets.token_hex(6)}/Pass:word@tls"  # made at run time: in no source line


def _acl_user(namespace: str, commands: list[str], channels: bool = True) -> str:
    rule = f"app on >{APP_PASSWORD} resetkeys ~{namespace}:* resetchannels"
    if channels:
        rule += f" &{namespace}:*"
    return rule + " -@all " + " ".join(f"+{c}" for c in commands)


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsRedisServer]:
    with tls_server(users=[_acl_user("app", CACHE_COMMANDS)]) as server:
        yield server


def test_s23_tls_and_acl_reach_every_connection(
    tls: TlsRedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole cache on a TLS-only server as an ACL user with only ``CACHE_COMMANDS``, keys
    ``~app:*`` and channels ``&app:*`` (``default`` is off): L2 reads and writes, invalidation
    delivery, fill leases (with contention and a failing loader), read-through, batches,
    iteration, clears, the decorator and heartbeats all work, with no NOPERM and no plaintext."""
    caplog.set_level(logging.DEBUG)
    admin = tls.client()
    admin.execute_command("ACL", "LOG", "RESET")
    admin.script_flush()  # so the library has to SCRIPT LOAD (NOSCRIPT path)
    url = tls.url("app", APP_PASSWORD)
    opts = {**FAST, "namespace": "app", "heartbeat_interval": 0.2}
    truth = Truth(r="read-through")
    a = TieredCache(url, **opts)
    b = TieredCache(url, loader=truth, **opts)
    try:
        assert a.wait_ready(10) and b.wait_ready(10)
        a["k"] = {"v": 1}
        assert b["k"] == {"v": 1} and b["k"] == {"v": 1}
        assert b.stats()["local_hits"] >= 1
        a["k"] = {"v": 2}  # delivery across the two caches
        wait_until(lambda: b.local.entry("k") is None, DELTA, message="invalidation delivered")
        assert b["k"] == {"v": 2}
        assert b["r"] == "read-through" and truth.calls == 1
        # Lease contention: two caches miss one cold key at once; one load in all.
        gate, calls = threading.Event(), []

        def slow(key: Any) -> Any:
            calls.append(key)
            gate.wait(5)
            return "leased"

        results: list[Any] = []
        t1 = threading.Thread(target=lambda: results.append(a.get_or_load("cold", slow)))
        t1.start()
        wait_until(lambda: calls, DELTA)
        t2 = threading.Thread(target=lambda: results.append(b.get_or_load("cold", slow)))
        t2.start()
        time.sleep(0.1)
        gate.set()
        t1.join(10)
        t2.join(10)
        assert results == ["leased", "leased"] and len(calls) == 1

        def failing(key: Any) -> Any:
            raise RuntimeError("origin down")

        with pytest.raises(RuntimeError):
            a.get_or_load("fails", failing)  # its lease is released (DEL in release.lua)
        assert a.get_many(["k", "r", "cold"]) == {
            "k": {"v": 2},
            "r": "read-through",
            "cold": "leased",
        }
        assert a.get_or_load_many(["m1", "m2"], lambda ks: {k: k for k in ks}) == {
            "m1": "m1",
            "m2": "m2",
        }
        assert set(a) >= {"k", "r", "cold", "m1", "m2"} and len(a) >= 5 and "k" in a
        del a["k"]
        assert a.invalidate("absent") is False

        @tiered_cache(a, ttl=30)
        def double(x: int) -> int:
            return 2 * x

        assert double(21) == 42 and double(21) == 42
        double.cache_clear()
        wait_until(lambda: admin.exists(KeySpace("app").heartbeat(a._origin)), DELTA)
        time.sleep(0.5)  # a few listener PINGs
        a.clear()
        assert b.wait_ready(DELTA) and a.wait_ready(DELTA)
        # No NOPERM anywhere: the server logged no denial, no cache logged one.
        assert admin.execute_command("ACL", "LOG") == []
        assert not [r for r in caplog.records if "NOPERM" in r.getMessage().upper()]
        assert not [r for r in caplog.records if "permission" in r.getMessage().lower()]
        # Every connection is the app user (or the admin), over TLS: the server has no plaintext
        # port at all, and a plaintext client is refused.
        clients = admin.client_list()
        # A connection the pool opens at this moment lists as ``default`` with ``cmd=NULL`` until
        # its TLS handshake and AUTH finish (``default`` is off: it can run nothing as such).
        ran_commands = [c for c in clients if c["cmd"] != "NULL"]
        assert {c["user"] for c in ran_commands} <= {"app", "admin"}
        listeners = [c for c in clients if c["name"].startswith("tiercache:listener:app")]
        assert len(listeners) == 2 and {c["user"] for c in listeners} == {"app"}
        assert {c["laddr"].rsplit(":", 1)[1] for c in clients} == {str(tls.port)}
        assert admin.config_get("port")["port"] == "0"
        plain = redis.Redis(port=tls.port, socket_timeout=1, socket_connect_timeout=1)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        plain.close()
        texts = [repr(a), str(a), repr(b), repr(a.redis), caplog.text]
    finally:
        a.close()
        b.close()
        admin.close()
    assert not [t for t in texts if APP_PASSWORD in t]


def test_s23_a_user_without_channel_rights_gets_a_clear_error_at_start(
    tls: TlsRedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = tls.client()
    try:
        admin.execute_command(
            "ACL",
            "SETUSER",
            *_acl_user("app", CACHE_COMMANDS, channels=False)
            .replace("app on", "nochan on", 1)
            .split(),
        )
        caplog.set_level(logging.WARNING, logger="tiercache")
        cache = TieredCache(
            tls.url("nochan", APP_PASSWORD), **{**FAST, "namespace": "app", "startup_timeout": 1.0}
        )
        try:
            assert not cache.wait_ready(0.5)
            # At start: a warning that names the missing channel permission.
            messages = " ".join(r.getMessage() for r in caplog.records)
            assert "NoPermissionError" in messages and "channels" in messages, messages
            # A write publishes its invalidation: refused, with a clear error.
            with pytest.raises(CacheUnavailable, match="publish to the channel"):
                cache["k"] = 1
        finally:
            cache.close()
        assert APP_PASSWORD not in caplog.text
    finally:
        admin.execute_command("ACL", "DELUSER", "nochan")
        admin.close()


def _exception_text(err: BaseException) -> str:
    """What a traceback of ``err`` prints: its chain's messages and its frames' source lines."""
    return "".join(traceback.format_exception(err))


def test_s23_requirepass_reaches_the_listener_and_the_password_never_shows(
    redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    password = f"rp-{secrets.token_hex(6)}/with:odd@chars"  # (never in this file's source)
    wrong_password = "xx" + password[2:]
    server = redis_factory(password=password)
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    a = TieredCache(server.url, **FAST)
    b = TieredCache(server.url, **FAST)
    try:
        assert a.wait_ready(10) and b.wait_ready(10)
        a["k"] = 1
        assert b["k"] == 1
        a["k"] = 2
        wait_until(lambda: b["k"] == 2, DELTA)
        with contextlib.closing(server.client()) as admin:
            names = [c["name"] for c in admin.client_list()]
        assert len([n for n in names if n.startswith("tiercache:listener")]) == 2
        texts += [repr(a), str(a), repr(a.redis), repr(a.redis.connection_pool)]
        # Errors: the server gone (connection refused), then a wrong password.
        server.stop()
        with pytest.raises(CacheUnavailable) as err:
            a["k"] = 3
        texts += [str(err.value), repr(err.value), _exception_text(err.value)]
    finally:
        a.close()
        b.close()
    server.start()
    wrong_url = server.url.replace("rp-", "xx-")  # (the URL holds the password quoted)
    bad = TieredCache(wrong_url, **{**FAST, "startup_timeout": 0.5})
    try:
        with pytest.raises(CacheUnavailable, match="invalid username-password") as err:
            bad["k"] = 1
        texts += [str(err.value), _exception_text(err.value), repr(bad)]
    finally:
        bad.close()
    texts.append(caplog.text)
    leaks = [t for t in texts if password in t or wrong_password in t]
    assert not leaks, leaks


def test_s23_tls_errors_never_show_the_password(
    tls: TlsRedisServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A client that does not trust the server's CA fails to connect, clearly, and nowhere
    (exception text, chained cause, log records) is the password."""
    caplog.set_level(logging.DEBUG)
    other_ca = make_certificates(tmp_path)["ca"]
    url = tls.url("app", APP_PASSWORD, ca=str(other_ca))
    cache = TieredCache(url, **{**FAST, "namespace": "app", "startup_timeout": 0.5})
    try:
        with pytest.raises(CacheUnavailable, match=r"(?i)certificate") as err:
            cache["k"] = 1
        text = _exception_text(err.value)
    finally:
        cache.close()
    assert APP_PASSWORD not in text and APP_PASSWORD not in caplog.text
