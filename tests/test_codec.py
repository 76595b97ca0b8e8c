"""Codecs and compression (SPEC 3.9): exact round trips, clear refusals, hostile input, bombs."""

from __future__ import annotations

import collections
import enum
import math
import os
import pickle
import string
import threading
import tracemalloc
import zlib
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID
from zoneinfo import ZoneInfo

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache import codec as codec_mod
from tiercache.codec import (
    COMPRESS_LZ4,
    COMPRESS_NONE,
    COMPRESS_ZLIB,
    JSON,
    MAX_DEPTH,
    MAX_HASH_COLLISIONS,
    MSGPACK,
    PICKLE,
    JsonCodec,
    MsgpackCodec,
    PickleCodec,
    codec_by_id,
    compress,
    decompress,
    resolve_codec,
)

ExtType = msgpack.ExtType
P61 = 2**61 - 1  # the modulus of Python's numeric hash
MiB = 2**20

# ---------------------------------------------------------------------------------------------
# exact comparison
# ---------------------------------------------------------------------------------------------


def same_tz(a: tzinfo | None, b: tzinfo | None) -> bool:
    """Same tzinfo class and the same observable identity (offset/name or zone key)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, timezone):
        return a.utcoffset(None) == b.utcoffset(None) and a.tzname(None) == b.tzname(None)
    if isinstance(a, ZoneInfo):
        return a.key == b.key
    return a is b


def same(a: Any, b: Any) -> bool:
    """Equal with exact types all the way down; nan equals nan; -0.0 differs from 0.0."""
    t = type(a)
    if t is not type(b):
        return False
    if t is float:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if t is Decimal:
        return str(a) == str(b)  # exponent, sign of zero and NaN kinds included
    if t in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if t is dict:
        return len(a) == len(b) and all(
            same(k1, k2) and same(v1, v2)
            for (k1, v1), (k2, v2) in zip(a.items(), b.items(), strict=True)
        )
    if t in (set, frozenset):
        if len(a) != len(b):
            return False
        # Equality lookup finds the partner (a set holds at most one of 1/1.0/True, 0.0/-0.0).
        partner = {y: y for y in b}
        return all(same(x, partner[x]) if x in partner else any(same(x, y) for y in b) for x in a)
    if t in (datetime, time):
        return (
            a.replace(tzinfo=None) == b.replace(tzinfo=None)
            and a.fold == b.fold
            and same_tz(a.tzinfo, b.tzinfo)
        )
    return a == b


def roundtrip(value: Any, codec: Any = MSGPACK) -> Any:
    data = codec.dumps(value)
    assert type(data) is bytes
    return codec.loads(data)


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

_offsets = st.timedeltas(
    min_value=timedelta(hours=-23, minutes=-59, seconds=-59, microseconds=-999_999),
    max_value=timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999),
)
tzs = st.one_of(
    st.none(),
    st.just(timezone.utc),
    st.builds(timezone, _offsets),
    st.builds(timezone, _offsets, st.text(max_size=8)),
    st.timezones(),
)
datetimes = st.builds(
    lambda dt, fold: dt.replace(fold=fold), st.datetimes(timezones=tzs), st.integers(0, 1)
)
times = st.builds(lambda t, fold: t.replace(fold=fold), st.times(timezones=tzs), st.integers(0, 1))
big_ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, -(2**64)]),
)
hashable_scalars = st.one_of(
    st.none(),
    st.booleans(),
    big_ints,
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    datetimes,
    st.dates(),
    times,
    st.timedeltas(),
    st.decimals(allow_nan=False),
    st.uuids(),
)
hashables = st.recursive(
    hashable_scalars,
    lambda c: st.one_of(st.lists(c, max_size=4).map(tuple), st.frozensets(c, max_size=4)),
    max_leaves=8,
)
scalars = st.one_of(
    hashable_scalars,
    st.floats(),  # nan and ±inf
    st.sampled_from([float("nan"), -0.0, float("inf"), float("-inf")]),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from([Decimal("NaN"), Decimal("-sNaN"), Decimal("-Infinity"), Decimal("1E+3")]),
    st.text(alphabet=st.characters(codec=None, categories=["Cs"]), max_size=3),  # surrogates
)
values = st.recursive(
    scalars,
    lambda c: st.one_of(
        st.lists(c, max_size=5),
        st.lists(c, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=5), c, max_size=5),
        st.dictionaries(hashables, c, max_size=5),
        st.sets(hashables, max_size=5),
        st.frozensets(hashables, max_size=5),
    ),
    max_leaves=25,
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    ),
    lambda c: st.one_of(
        st.lists(c, max_size=5),
        st.lists(c, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=5), c, max_size=5),
    ),
    max_leaves=25,
)


def tuples_to_lists(v: Any) -> Any:
    if type(v) in (list, tuple):
        return [tuples_to_lists(x) for x in v]
    if type(v) is dict:
        return {k: tuples_to_lists(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------------
# msgpack: round trips
# ---------------------------------------------------------------------------------------------


def _stable_id(value: object) -> str:
    """A test id that is the same in every process (no object addresses: pytest-xdist)."""
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_msgpack_roundtrip_property(value: Any) -> None:
    assert same(roundtrip(value), value)


@pytest.mark.parametrize(
    "value",
    [
        True,
        1,
        1.0,
        [True, 1, 1.0, Decimal(1)],
        {1: "int", 1.5: "float", None: "none", b"1": "bytes", "1": "str"},
        {True: "bool", 0.0: "float"},
        {(1, 2): "t", frozenset({1}): "f", (): "empty"},
        (),
        ((),),
        [(), [], {}, set(), frozenset()],
        {"b": 1, "a": 2, "c": 3},  # order
        {b"k": b"v", "k": "v"},  # bytes and str keys in one native map
        "\ud800x\udfff",
        -0.0,
        2**64,
        -(2**63) - 1,
        10**400,
        Decimal("-0"),
        Decimal("1.500E-7"),
        Decimal("sNaN"),
        datetime(2024, 3, 1, 2, 3, 4, 5),
        datetime(2024, 3, 1, tzinfo=timezone(timedelta(hours=-3, microseconds=7), "weird")),
        datetime(2024, 3, 1, tzinfo=timezone.utc),
        datetime.min,
        datetime.max,
        date(1, 1, 1),
        time(23, 59, 59, 999999, fold=1),
        timedelta(days=-999999999),
        timedelta.max,
        UUID(int=0),
        UUID(int=2**128 - 1),
    ],
    ids=_stable_id,
)
def test_msgpack_roundtrip_examples(value: Any) -> None:
    out = roundtrip(value)
    assert same(out, value), out


def test_msgpack_distinguishes_lookalikes() -> None:
    out = roundtrip([1, 1.0, True, "1", b"1", (1,), [1], {1}, frozenset({1})])
    assert [type(x) for x in out] == [int, float, bool, str, bytes, tuple, list, set, frozenset]
    assert type(roundtrip({True: 0})) is dict and type(next(iter(roundtrip({True: 0})))) is bool


def test_msgpack_zoneinfo_keeps_key_and_fold() -> None:
    paris = ZoneInfo("Europe/Paris")
    for fold in (0, 1):  # 02:30 happens twice on 2023-10-29 in Paris
        dt = datetime(2023, 10, 29, 2, 30, tzinfo=paris, fold=fold)
        out = roundtrip(dt)
        assert out.tzinfo is paris and out.fold == fold and out.utcoffset() == dt.utcoffset()
    t = roundtrip(time(1, 2, tzinfo=paris))
    assert t.tzinfo is paris


def test_msgpack_foreign_tzinfo_becomes_fixed_offset() -> None:
    class Plus90(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta:
            return timedelta(minutes=90)

        def dst(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

    dt = datetime(2024, 1, 1, 12, tzinfo=Plus90())
    out = roundtrip(dt)
    assert type(out.tzinfo) is timezone and out == dt and out.utcoffset() == dt.utcoffset()

    class NoOffset(tzinfo):
        def utcoffset(self, dt: datetime | None) -> None:
            return None

    with pytest.raises(TypeError, match="NoOffset"):
        MSGPACK.dumps(datetime(2024, 1, 1, tzinfo=NoOffset()))


def test_msgpack_reentrant_dumps() -> None:
    """A tzinfo whose utcoffset() itself encodes must not corrupt the outer encoding."""

    class Chatty(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta:
            assert MSGPACK.loads(MSGPACK.dumps({"inner": [1, 2, 3]})) == {"inner": [1, 2, 3]}
            return timedelta(hours=2)

    value = {"a": [1, "x" * 100], "when": datetime(2024, 1, 1, tzinfo=Chatty()), "z": (1, 2)}
    out = roundtrip(value)
    assert out["a"] == value["a"] and out["z"] == (1, 2)
    assert out["when"] == value["when"] and out["when"].utcoffset() == timedelta(hours=2)
    assert roundtrip({"after": 1}) == {"after": 1}


def test_msgpack_depth_limit() -> None:
    def nest(n: int, make: Any = list) -> Any:
        v: Any = 0
        for _ in range(n):
            v = make([v])
        return v

    for make in (list, tuple, lambda x: {"k": x[0]}):
        assert same(roundtrip(nest(MAX_DEPTH, make)), nest(MAX_DEPTH, make))
        with pytest.raises(ValueError, match="deeper"):
            MSGPACK.dumps(nest(MAX_DEPTH + 1, make))
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="cycle"):
        MSGPACK.dumps(cyclic)


def test_msgpack_large_flat_values() -> None:
    big = {
        "ints": list(range(100_000)),
        "set": set(range(50_000)),
        "map": dict.fromkeys(range(1000)),
    }
    assert same(roundtrip(big), big)


# ---------------------------------------------------------------------------------------------
# msgpack: refusals
# ---------------------------------------------------------------------------------------------


class Foo:
    pass


class Color(enum.IntEnum):
    RED = 1


class Name(str, enum.Enum):  # what enum.StrEnum (3.11+) is
    A = "a"


class Point(NamedTuple):
    x: int
    y: int


class MyDatetime(datetime):
    pass


def _gen() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Foo(), "test_codec.Foo"),
        (object(), "object"),
        (lambda: 1, "function"),
        (_gen(), "generator"),
        (bytearray(b"x"), "bytearray"),
        (memoryview(b"x"), "memoryview"),
        (1j, "complex"),
        (range(3), "range"),
        (int, "type"),
        (ExtType(1, b""), "msgpack.ext.ExtType"),
        (msgpack.Timestamp(1), "msgpack.ext.Timestamp"),
    ],
)
def test_msgpack_unsupported_types(value: Any, type_name: str) -> None:
    for wrapped in (value, [1, value], {"k": value}, (value,), {"k": [{"j": (1, value)}]}):
        with pytest.raises(TypeError, match=rf"'{type_name}'.*serializer='pickle'"):
            MSGPACK.dumps(wrapped)
    try:
        hash(value)
    except TypeError:
        return
    with pytest.raises(TypeError, match=type_name):
        MSGPACK.dumps({value: 1})
    with pytest.raises(TypeError, match=type_name):
        MSGPACK.dumps({value})


@pytest.mark.parametrize(
    "value",
    [
        Color.RED,
        Name.A,
        collections.OrderedDict(a=1),
        collections.defaultdict(int),
        collections.Counter("ab"),
        Point(1, 2),
        MyDatetime(2024, 1, 1),
        type("MyStr", (str,), {})("x"),
        type("MyFloat", (float,), {})(1.0),
        type("MySet", (set,), {})(),
        type("MyList", (list,), {})(),
        type("MyDecimal", (Decimal,), {})(1),
        type("MyUUID", (UUID,), {})(int=1),
    ],
    ids=lambda v: type(v).__name__,
)
def test_msgpack_subclasses_refused(value: Any) -> None:
    """Policy: only exact types; a subclass would silently come back as its base type."""
    with pytest.raises(TypeError, match=r"subclass of \w+; only exact types round-trip"):
        MSGPACK.dumps([value])


# ---------------------------------------------------------------------------------------------
# msgpack: hostile input
# ---------------------------------------------------------------------------------------------


def loads_or_valueerror(data: bytes) -> None:
    try:
        MSGPACK.loads(data)
    except ValueError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_msgpack_random_bytes_only_valueerror(data: bytes) -> None:
    loads_or_valueerror(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_msgpack_truncated_and_mutated_only_valueerror(value: Any, data: st.DataObject) -> None:
    payload = MSGPACK.dumps(value)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(ValueError):
        MSGPACK.loads(payload[:cut])
    with pytest.raises(ValueError):
        MSGPACK.loads(payload + b"\x00")
    i = data.draw(st.integers(0, len(payload) - 1))
    loads_or_valueerror(payload[:i] + bytes([data.draw(st.integers(0, 255))]) + payload[i + 1 :])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used type byte
        b"\x91" * 100_000 + b"\x00",  # deep arrays
        b"\x81\xa1k" * 100_000 + b"\x00",  # deep maps
        b"\x92\xc7\x00\x01" * 100_000 + b"\x00",  # deep tuples
        b"\xdd\xff\xff\xff\xff",  # array of 4G elements
        b"\xdf\xff\xff\xff\xff",  # map of 4G pairs
        b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # 4 GB str
        b"\xc6\xff\xff\xff\xff" + b"x" * 10,  # 4 GB bin
        b"\xc9\xff\xff\xff\xff\x05" + b"x" * 10,  # 4 GB ext
        b"\xdc\xff\xff" + b"\x90" * 100,  # 65535 declared, 100 given
        b"\x81\x01\x01",  # int key in a native map
        b"\x81\x91\x01\x01",  # list key
        b"\x81\xc0\x01",  # nil key
    ],
    ids=lambda p: p[:8].hex() or "empty",
)
def test_msgpack_hostile_payloads(payload: bytes) -> None:
    with pytest.raises(ValueError):
        MSGPACK.loads(payload)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "payload",
    [
        pack(ExtType(42, b"")),  # unknown ext
        b"\xd4\xfbx",  # unknown negative ext (-5)
        pack([1, ExtType(1, b"")]),  # marker not first
        pack(ExtType(1, b"")),  # bare marker
        pack({"k": ExtType(2, b"")}),  # marker as a map value
        pack([ExtType(1, b"x")]),  # marker with data
        pack([ExtType(4, b""), 1]),  # dict marker with a key but no value
        pack([ExtType(2, b""), [1]]),  # unhashable set element
        pack([ExtType(4, b""), [1], 2]),  # unhashable dict key
        pack(ExtType(6, b"\x00" * 5)),  # short datetime
        pack(ExtType(6, b"\x07\xe8\x0d\x01" + b"\x00" * 8)),  # month 13
        pack(ExtType(6, b"\x07\xe8\x01\x01" + b"\x00" * 8 + b"\x09")),  # unknown tz tag
        pack(ExtType(6, b"\x07\xe8\x01\x01" + b"\x00" * 8 + b"\x01" + b"\x7f" * 8)),  # offset
        pack(ExtType(6, b"\x07\xe8\x01\x01" + b"\x00" * 8 + b"\x03../../../etc/passwd")),
        pack(ExtType(6, b"\x07\xe8\x01\x01" + b"\x00" * 8 + b"\x03No/Such_Zone")),
        pack(ExtType(6, b"\x07\xe8\x01\x01" + b"\x00" * 8 + b"\x03" + b"a" * 300)),
        pack(ExtType(7, b"\x00\x00\x01\x01")),  # year 0
        pack(ExtType(9, b"\x7f\xff\xff\xff" + b"\x00" * 8)),  # days out of range
        pack(ExtType(10, b"not a number")),
        pack(ExtType(10, b"\xff")),
        pack(ExtType(11, b"\x00" * 15)),  # short uuid
    ],
)
def test_msgpack_malformed_extensions(payload: bytes) -> None:
    with pytest.raises(ValueError):
        MSGPACK.loads(payload)
    assert MSGPACK.loads(pack([ExtType(1, b""), 1])) == (1,)  # state reset after the error


def _colliding_ints(n: int) -> list[int]:
    return [1 + k * P61 for k in range(1, n + 1)]  # all hash to 1


@pytest.mark.timeout(30)
def test_msgpack_hash_flood_refused() -> None:
    """Predictable hashes would make building the dict/set quadratic (minutes for 1 MiB)."""
    keys = [ExtType(5, n.to_bytes(16, "big", signed=True)) for n in _colliding_ints(50_000)]
    flat: list[Any] = [ExtType(4, b"")]
    for k in keys:
        flat += [k, 0]
    with pytest.raises(ValueError, match="colliding"):
        MSGPACK.loads(pack(flat))
    uuids = [ExtType(11, n.to_bytes(16, "big")) for n in _colliding_ints(50_000)]
    with pytest.raises(ValueError, match="colliding"):
        MSGPACK.loads(pack([ExtType(2, b""), *uuids]))
    # A few collisions are legitimate (hash(-1) == hash(-2)).
    ok = {n: 0 for n in _colliding_ints(MAX_HASH_COLLISIONS)} | {-1: 0, -2: 0}
    assert same(roundtrip(ok), ok)


def test_msgpack_loads_never_runs_code(tmp_path: Any) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(canary), "w"))

    for payload in (pickle.dumps(Evil()), pack(ExtType(3, pickle.dumps(Evil())))):
        loads_or_valueerror(payload)
    assert not canary.exists()


@pytest.mark.timeout(60)
def test_msgpack_concurrent_decoding() -> None:
    """The marker bookkeeping is per thread: valid and invalid payloads decoded side by side."""
    value = {"t": [(i, (i, frozenset({i}))) for i in range(50)], 1: {(1, 2)}}
    good = MSGPACK.dumps(value)
    bad = pack([(ExtType(1, b"")), ExtType(1, b"")])
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                if (i + n) % 3:
                    assert same(MSGPACK.loads(good), value)
                else:
                    with pytest.raises(ValueError):
                        MSGPACK.loads(bad)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_msgpack_timestamp_ext_is_inert() -> None:
    """Ext -1 is decoded by msgpack itself; dumps never writes it, and it is just data."""
    assert isinstance(MSGPACK.loads(pack(msgpack.Timestamp(1))), msgpack.Timestamp)


# ---------------------------------------------------------------------------------------------
# msgpack: the fast paths write and read the same wire format
# ---------------------------------------------------------------------------------------------

WIRE_VALUE: dict[str, Any] = {
    "t": (1, "a"),
    "s": {2},
    "f": frozenset({3}),
    "d": {1: "x"},
    "b": {b"k": b"v"},
    "big": 2**70,
    "dt": datetime(2024, 3, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    "named": datetime(2024, 3, 1, tzinfo=timezone(timedelta(hours=2), "X")),
    "zone": datetime(2023, 10, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris"), fold=1),
    "naive": datetime(2024, 1, 1),
    "date": date(2024, 2, 29),
    "time": time(1, 2, 3, 4, tzinfo=timezone(timedelta(hours=-5))),
    "td": timedelta(days=-1, seconds=5),
    "dec": Decimal("-1.50"),
    "uuid": UUID(int=1),
    "l": [[1, (2, [3])], None, True, 1.5],
}
# Written by the codec before its encoder and decoder were rewritten for speed.
WIRE_BYTES = bytes.fromhex(
    "de0010a17493c7000101a161a17392c7000202a16692c7000303a16493c7000401a178a16281c4016bc40176"
    "a3626967c70905400000000000000000a26474c7150607e803010203040000000500010000000000000000a5"
    "6e616d6564c7160607e8030100000000000000000200000001ad27480058a47a6f6e65c7190607e70a1d021e"
    "000000000001034575726f70652f5061726973a56e61697665c70c0607e801010000000000000000a4646174"
    "65d60707e8021da474696d65c71108010203000000040001fffffffbcf1dcc00a27464c70c09ffffffff0000"
    "000500000000a3646563c7050a2d312e3530a475756964d80b00000000000000000000000000000001a16c94"
    "920193c70001029103c0c3cb3ff8000000000000"
)


def test_msgpack_wire_format_is_stable() -> None:
    assert MSGPACK.dumps(WIRE_VALUE) == WIRE_BYTES
    assert same(MSGPACK.loads(WIRE_BYTES), WIRE_VALUE)
    for key, value in WIRE_VALUE.items():  # each alone: the scalar and container paths
        assert same(roundtrip(value), value), key
        assert same(roundtrip([value]), [value]), key


def test_msgpack_markers_in_any_ext_encoding() -> None:
    """A marker written as ext 16/32 (not by our packer) is still a marker; marker-like bytes
    inside data do not confuse the marker-free fast path."""
    ext16 = b"\x92\xc8\x00\x00\x01\x05"  # [<tuple marker as ext 16>, 5]
    ext32 = b"\x92\xc9\x00\x00\x00\x00\x01\x05"
    assert same(MSGPACK.loads(ext16), (5,))
    assert same(MSGPACK.loads(ext32), (5,))
    with pytest.raises(ValueError):
        MSGPACK.loads(b"\x92\x05\xc8\x00\x00\x01")  # marker not first, ext 16
    for value in ("\u01c0\x00", b"\xc7\x00\x01", [b"\xc7\x00", (1,)], {"k": "\xc7\x00"}):
        assert same(roundtrip(value), value)


def test_msgpack_many_time_zones() -> None:
    """The tz caches are bounded and keyed so that equal offsets with other names stay apart."""
    zones = [timezone(timedelta(minutes=m)) for m in range(-600, 600, 3)]
    zones += [timezone(timedelta(minutes=m), f"n{m}") for m in range(-600, 600, 3)]
    values = [datetime(2024, 1, 1, tzinfo=tz) for tz in zones]
    assert same(roundtrip(values), values)
    assert same(roundtrip(values[::-1]), values[::-1])
    unnamed = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    named = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1), "CET"))
    for _ in range(2):
        assert same(roundtrip([unnamed, named, unnamed]), [unnamed, named, unnamed])


def test_msgpack_wide_values_fall_back_exactly() -> None:
    """Values the fast validation refuses deep inside wide levels are converted or refused just as
    at the top: non-str keys, bytes keys, unsupported types, subclasses, depth."""
    rows = [{"id": i, "tags": ["a", "b"], "m": {"k": [i, 1.5]}} for i in range(40)]
    for bad, error in (
        (bytearray(b"x"), TypeError),
        (memoryview(b"x"), TypeError),
        (ExtType(1, b""), TypeError),
        (Color.RED, TypeError),
        (Foo(), TypeError),
    ):
        wide = [dict(r) for r in rows]
        wide[17]["m"] = {"k": [1, {"deep": bad}]}
        with pytest.raises(error):
            MSGPACK.dumps(wide)
    for odd in ({1: "int key"}, {b"b": 1, "s": 2}, {(1, 2): {3}}, {UUID(int=5): Decimal(1)}):
        wide = [dict(r) for r in rows]
        wide[31]["m"] = {"k": [1, odd]}
        assert same(roundtrip(wide), wide)
    deep: Any = 0
    for _ in range(MAX_DEPTH - 2):
        deep = [deep]
    assert same(roundtrip([dict(r) for r in rows] + [deep]), [dict(r) for r in rows] + [deep])
    with pytest.raises(ValueError, match="deeper"):
        MSGPACK.dumps([dict(r) for r in rows] + [[[deep]]])


# ---------------------------------------------------------------------------------------------
# json
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["orjson", "stdlib"])
def json_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "orjson":
        if not codec_mod.HAVE_ORJSON:
            pytest.skip("orjson not installed")
    else:
        monkeypatch.setattr(codec_mod, "_orjson", None)
    return request.param


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_json_roundtrip_property(value: Any) -> None:
    for backend in ([codec_mod._orjson] if codec_mod.HAVE_ORJSON else []) + [None]:
        saved, codec_mod._orjson = codec_mod._orjson, backend
        try:
            assert same(roundtrip(value, JSON), tuples_to_lists(value))
        finally:
            codec_mod._orjson = saved


def test_json_cross_backend(json_backend: str) -> None:
    value = {"a": [1, 2.5, -0.0, None, True, "é\u2028"], "b": {"c": 2**64 - 1, "d": -(2**63)}}
    data = JSON.dumps(value)
    assert same(JSON.loads(data), value)
    assert same(JsonCodec().loads(data), value)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ({1: 2}, TypeError, "str dict keys, not 'int'"),
        ({(1,): 2}, TypeError, "tuple"),
        ({1, 2}, TypeError, "'set'.*msgpack"),
        (b"x", TypeError, "bytes"),
        (datetime(2024, 1, 1), TypeError, "datetime"),
        (Decimal(1), TypeError, "Decimal"),
        (UUID(int=1), TypeError, "UUID"),
        (Color.RED, TypeError, "subclass of int"),
        (collections.OrderedDict(), TypeError, "subclass of dict"),
        (Foo(), TypeError, "test_codec.Foo"),
        (float("nan"), ValueError, "nan"),
        ([float("inf")], ValueError, "inf"),
        (2**64, ValueError, "64 bits"),
        (-(2**63) - 1, ValueError, "64 bits"),
        ("\ud800", ValueError, "surrogates"),
    ],
    ids=_stable_id,
)
def test_json_refusals(json_backend: str, value: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        JSON.dumps({"k": [value]})


def test_json_depth_limit(json_backend: str) -> None:
    v: Any = 0
    for _ in range(MAX_DEPTH):
        v = [v]
    assert same(roundtrip(v, JSON), v)
    with pytest.raises(ValueError, match="deeper"):
        JSON.dumps([v])


@pytest.mark.parametrize(
    "payload", [b"", b"{", b"NaN", b"[Infinity]", b"\xff", b"[" * 100_000, b'{"a":1}x', b"1e999"]
)
def test_json_hostile_payloads(json_backend: str, payload: bytes) -> None:
    with pytest.raises(ValueError):
        JSON.loads(payload)


# ---------------------------------------------------------------------------------------------
# pickle
# ---------------------------------------------------------------------------------------------


def test_pickle_roundtrip_and_errors() -> None:
    value = {"foo": Foo.__name__, "point": Point(1, 2), "color": Color.RED, "od": {1: [2]}}
    assert roundtrip(value, PICKLE) == value
    assert type(roundtrip(Point(1, 2), PICKLE)) is Point
    with pytest.raises(ValueError):
        PICKLE.loads(b"garbage")
    assert "signature" in (PickleCodec.__doc__ or "")


# ---------------------------------------------------------------------------------------------
# resolve_codec / codec_by_id
# ---------------------------------------------------------------------------------------------


class UserCodec:
    def __init__(self, cid: Any = 200, name: Any = "mine") -> None:
        self.id = cid
        self.name = name

    def dumps(self, value: Any) -> bytes:
        return repr(value).encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()


def test_resolve_codec() -> None:
    assert resolve_codec(None) is MSGPACK
    assert resolve_codec("msgpack") is MSGPACK
    assert resolve_codec("json") is JSON
    assert resolve_codec("pickle") is PICKLE
    own = MsgpackCodec()
    assert resolve_codec(own) is own
    user = UserCodec()
    assert resolve_codec(user) is user
    assert (MSGPACK.id, JSON.id, PICKLE.id) == (1, 2, 3)
    assert (MSGPACK.name, JSON.name, PICKLE.name) == ("msgpack", "json", "pickle")


@pytest.mark.parametrize(
    "bad",
    [
        "yaml",
        "Pickle",
        "",
        UserCodec(cid=1),
        UserCodec(cid=127),
        UserCodec(cid=256),
        UserCodec(cid=True),
        UserCodec(cid="200"),
        UserCodec(name=""),
        UserCodec(name=3),
        object(),
        42,
        type("Sub", (MsgpackCodec,), {})(),  # a subclass keeping id 1 would alias the built-in
    ],
    ids=_stable_id,
)
def test_resolve_codec_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        resolve_codec(bad)


def test_resolve_codec_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"'msgpack'.*'json'.*'pickle'"):
        resolve_codec("yaml")


def test_codec_by_id() -> None:
    assert codec_by_id(1) is MSGPACK and codec_by_id(2) is JSON and codec_by_id(3) is PICKLE
    for bad in (0, 4, 127, 200, -1):
        with pytest.raises(ValueError):
            codec_by_id(bad)


# ---------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------

METHODS = [COMPRESS_ZLIB] + ([COMPRESS_LZ4] if codec_mod.HAVE_LZ4 else [])
TEXT = (string.ascii_letters * 400).encode()  # 20 KB, compressible


@pytest.mark.parametrize("method", METHODS)
def test_compress_roundtrip(method: int) -> None:
    payload, used = compress(TEXT, method=method)
    assert used == method and len(payload) < len(TEXT)
    assert decompress(payload, used, max_size=len(TEXT)) == TEXT
    with pytest.raises(ValueError, match="exceeds"):
        decompress(payload, used, max_size=len(TEXT) - 1)


def test_compress_default_method(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compress(TEXT)[1] == (COMPRESS_LZ4 if codec_mod.HAVE_LZ4 else COMPRESS_ZLIB)
    monkeypatch.setattr(codec_mod, "_lz4_block", None)
    payload, used = compress(TEXT)
    assert used == COMPRESS_ZLIB and decompress(payload, used, len(TEXT)) == TEXT
    with pytest.raises(ValueError, match="lz4"):
        decompress(b"\x00\x00\x00\x00", COMPRESS_LZ4, 10)
    with pytest.raises(ValueError, match="lz4"):
        compress(TEXT, method=COMPRESS_LZ4)


def test_compress_only_when_worth_it() -> None:
    small = TEXT[:4095]
    assert compress(small) == (small, COMPRESS_NONE)
    assert compress(TEXT[:4096])[1] != COMPRESS_NONE
    noise = os.urandom(50_000)
    for method in (None, *METHODS):
        assert compress(noise, method=method) == (noise, COMPRESS_NONE)
    assert compress(TEXT, threshold=len(TEXT) + 1) == (TEXT, COMPRESS_NONE)


def test_decompress_none_is_bounded() -> None:
    assert decompress(b"abc", COMPRESS_NONE, 3) == b"abc"
    with pytest.raises(ValueError, match="exceeds"):
        decompress(b"abcd", COMPRESS_NONE, 3)
    for method in (COMPRESS_NONE, *METHODS):
        with pytest.raises(ValueError, match="max_size"):
            decompress(compress(TEXT, method=method)[0], method, -1)


@pytest.mark.parametrize("method", METHODS)
def test_decompress_corrupt(method: int) -> None:
    payload, _ = compress(TEXT, method=method)
    for bad in (payload[: len(payload) // 2], payload[:3], b"", bytes(len(payload))):
        with pytest.raises(ValueError):
            decompress(bad, method, max_size=MiB)
    with pytest.raises(ValueError, match="unknown"):
        decompress(payload, 9, max_size=MiB)


def test_decompress_zlib_trailing_data() -> None:
    payload, _ = compress(TEXT, method=COMPRESS_ZLIB)
    with pytest.raises(ValueError, match="trailing"):
        decompress(payload + b"junk", COMPRESS_ZLIB, max_size=MiB)


def _peak_during(fn: Any) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _zlib_bomb(size: int) -> bytes:
    c = zlib.compressobj(9)
    chunk = bytes(MiB)
    return b"".join(c.compress(chunk) for _ in range(size // MiB)) + c.flush()


@pytest.mark.timeout(60)
def test_zlib_bomb_is_capped() -> None:
    bomb = _zlib_bomb(100 * MiB)
    assert len(bomb) < 110 * 1024  # a 1000:1 bomb

    def attempt() -> None:
        with pytest.raises(ValueError, match="exceeds"):
            decompress(bomb, COMPRESS_ZLIB, max_size=MiB)

    assert _peak_during(attempt) < 4 * MiB


@pytest.mark.timeout(60)
def test_lz4_bomb_is_capped() -> None:
    if not codec_mod.HAVE_LZ4:
        pytest.skip("lz4 not installed")
    import lz4.block

    bomb = lz4.block.compress(bytes(100 * MiB), store_size=True)  # honest 100 MB header
    lying = (MiB).to_bytes(4, "little") + bomb[4:]  # claims 1 MiB, expands to 100 MB

    def attempt() -> None:
        for payload in (bomb, lying):
            with pytest.raises(ValueError):
                decompress(payload, COMPRESS_LZ4, max_size=MiB)

    assert _peak_during(attempt) < 4 * MiB


def test_value_pipeline_with_compression() -> None:
    """What the envelope does: encode, compress, decompress with a cap, decode."""
    value = {"rows": [{"id": i, "name": f"user{i}", "tags": ("a", "b")} for i in range(500)]}
    payload, method = compress(MSGPACK.dumps(value))
    assert method != COMPRESS_NONE
    assert same(MSGPACK.loads(decompress(payload, method, max_size=MiB)), value)
