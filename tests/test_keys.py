"""Key encoding and key names (tiercache.keys): injective, reversible, one hash slot per partition.

Most of this file does no I/O. The last tests run SCAN on a real server to check that the MATCH
patterns of a namespace whose name holds glob characters select exactly that namespace's keys.
"""

from __future__ import annotations

import enum
import math
import struct
from collections import namedtuple
from decimal import Decimal
from typing import Any

import pytest
import redis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from tiercache.keys import (
    KeySpace,
    decode_key,
    encode_key,
    escape_glob,
    local_key,
    local_key_of,
)

SETTINGS = settings(deadline=None, max_examples=100)
LIST_SETTINGS = settings(deadline=None, max_examples=50)

# Text with lone surrogates too (encoded with "surrogatepass"), which st.text() leaves out.
TEXT = st.one_of(
    st.text(max_size=12),
    st.lists(
        st.one_of(
            st.characters(),
            st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
            st.sampled_from(":t s\x00{}*?[]\\"),
        ),
        max_size=8,
    ).map("".join),
)
SCALARS = st.one_of(
    TEXT,
    st.binary(max_size=12),
    st.integers(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan]),
    st.booleans(),
    st.none(),
)
KEYS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)


def canon(key: Any) -> Any:
    """What makes two keys the same key: exact type, value, float bits (all NaNs are one key)."""
    t = type(key)
    if t is tuple:
        return ("tuple", tuple(canon(k) for k in key))
    if t is float:
        return ("float", "nan" if math.isnan(key) else struct.pack(">d", key))
    return (t.__name__, key)


# -- injectivity --------------------------------------------------------------------------------


@LIST_SETTINGS
@given(st.lists(KEYS, max_size=25))
def test_distinct_keys_never_share_an_encoding(keys: list[Any]) -> None:
    by_encoding: dict[bytes, Any] = {}
    for key in keys:
        encoded = encode_key(key)
        assert isinstance(encoded, bytes)
        if encoded in by_encoding:
            assert canon(by_encoding[encoded]) == canon(key), (by_encoding[encoded], key)
        by_encoding[encoded] = key
    assert len(by_encoding) == len({canon(k) for k in keys})


@SETTINGS
@given(KEYS, KEYS)
def test_two_keys_share_an_encoding_only_if_they_are_the_same_key(a: Any, b: Any) -> None:
    assert (encode_key(a) == encode_key(b)) == (canon(a) == canon(b))


def test_equal_in_a_dict_but_distinct_keys() -> None:
    # A dict merges 1, 1.0 and True (and 0.0 / -0.0); the cache keeps them apart.
    keys = [1, 1.0, True, "1", b"1", (1,), ("1",), 0, 0.0, -0.0, False, None, "", b"", ()]
    encodings = [encode_key(k) for k in keys]
    assert len(set(encodings)) == len(keys)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("a:b",), ("a", "b")),
        (("ab",), ("a", "b")),
        ((), ("",)),
        ((), ((),)),
        (((),), ((), ())),
        (("",), (b"",)),
        (("a", ("b", "c")), (("a", "b"), "c")),
        (("a", ("b",)), ("a", "b")),
        (("1:sa",), ("a",)),
        (("2:sa",), ("sa",)),
        ((1, 2), (12,)),
        ((1, 2), ("1", "2")),
        (("t",), ((),)),
        (("s",), ("",)),
        ((None,), ("N",)),
        ((True,), ("T",)),
    ],
)
def test_tuples_that_a_naive_join_would_merge(a: tuple, b: tuple) -> None:
    assert encode_key(a) != encode_key(b)
    assert decode_key(encode_key(a)) == a and decode_key(encode_key(b)) == b


# -- round trip ---------------------------------------------------------------------------------


@SETTINGS
@given(KEYS)
def test_decode_inverts_encode_with_exact_types(key: Any) -> None:
    back = decode_key(encode_key(key))
    assert canon(back) == canon(key)


@pytest.mark.parametrize(
    "key",
    [
        -0.0,
        0.0,
        math.nan,
        math.inf,
        -math.inf,
        5e-324,
        1.7976931348623157e308,
        2**100,
        -(2**100),
        "\ud800x\udfff",
        "\x00\n",
        b"\x00\xff",
        (((("deep",),),),),
        (1, 1.0, True, "1", b"1", None, ()),
    ],
)
def test_round_trip_of_edge_values(key: Any) -> None:
    back = decode_key(encode_key(key))
    assert canon(back) == canon(key)
    if isinstance(key, float) and not math.isnan(key):
        assert math.copysign(1.0, back) == math.copysign(1.0, key)
    if isinstance(key, float) and math.isnan(key):
        assert math.isnan(back)


def test_negative_zero_is_its_own_key() -> None:
    assert encode_key(-0.0) != encode_key(0.0)
    assert math.copysign(1.0, decode_key(encode_key(-0.0))) == -1.0
    assert math.copysign(1.0, decode_key(encode_key(0.0))) == 1.0


def test_bools_do_not_decode_as_ints() -> None:
    assert decode_key(encode_key(True)) is True
    assert decode_key(encode_key(False)) is False
    assert type(decode_key(encode_key(1))) is int
    assert decode_key(encode_key(None)) is None


# -- subclasses ---------------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1
    BLUE = 7


class Label(str):
    pass


class Shouty(str):
    def __str__(self) -> str:
        return self.upper()


class Blob(bytes):
    pass


class Ratio(float):
    pass


class Count(int):
    pass


Point = namedtuple("Point", "x y")


class Mode(str, enum.Enum):
    FAST = "fast"


@pytest.mark.parametrize(
    ("sub", "base"),
    [
        (Color.RED, 1),
        (Color.BLUE, 7),
        (Label("abc"), "abc"),
        (Shouty("abc"), "abc"),
        (Mode.FAST, "fast"),
        (Blob(b"xy"), b"xy"),
        (Ratio(0.5), 0.5),
        (Count(-4), -4),
        (Point(1, "a"), (1, "a")),
        ((Color.RED, Label("z"), Point(2, 3)), (1, "z", (2, 3))),
    ],
)
def test_subclasses_encode_as_their_base_value(sub: Any, base: Any) -> None:
    assert encode_key(sub) == encode_key(base)
    back = decode_key(encode_key(sub))
    assert canon(back) == canon(base)
    # ... and so land on the same local key, whichever way the local key is derived.
    assert local_key(sub, encode_key(sub)) == local_key(base, encode_key(base))
    assert type(local_key(sub, encode_key(sub))) is type(local_key(base, encode_key(base)))


# -- unsupported types --------------------------------------------------------------------------


class Custom:
    pass


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ([1], "list"),
        ({"a": 1}, "dict"),
        ({1}, "set"),
        (frozenset({1}), "frozenset"),
        (bytearray(b"x"), "bytearray"),
        (Decimal("1.5"), "Decimal"),
        (1j, "complex"),
        (Custom(), "Custom"),
        (object(), "object"),
        ((1, frozenset()), "frozenset"),
        ((("a", (Decimal(1),)),), "Decimal"),
    ],
)
def test_unsupported_types_raise_type_error_naming_the_type(key: Any, name: str) -> None:
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        encode_key(key)


# -- local keys ----------------------------------------------------------------------------------


@SETTINGS
@given(KEYS)
def test_local_key_from_the_key_equals_the_one_from_its_encoding(key: Any) -> None:
    # An invalidation carries only the encoding: the local entry it must hit is the one the
    # reader stored under local_key(key, encoding).
    encoded = encode_key(key)
    mine = local_key(key, encoded)
    theirs = local_key_of(encoded)
    assert mine == theirs
    assert type(mine) is type(theirs)
    assert hash(mine) == hash(theirs)
    if type(key) is str:
        assert mine is key  # the fast path looks a str key up as itself
    else:
        assert type(mine) is bytes


@LIST_SETTINGS
@given(st.lists(KEYS, max_size=25))
def test_local_keys_are_injective_too(keys: list[Any]) -> None:
    # In a dict, 1 == 1.0 == True and "x" is never b"x"; local keys must keep every key apart.
    local = {local_key(k, encode_key(k)) for k in keys}
    assert len(local) == len({canon(k) for k in keys})


# -- malformed encodings ------------------------------------------------------------------------


def _deep(levels: int) -> bytes:
    encoded = b"N"
    for _ in range(levels):
        encoded = b"t%d:%s" % (len(encoded), encoded)
    return encoded


_DEEP = _deep(3000)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"x",
        b"T1",
        b"Nx",
        b"FF",
        b"t1:",
        b"t3:sa",
        b"t2:sa1:",
        b"i",
        b"ix",
        b"f",
        b"fzz",
        b"s\xff",
        b"t:",
        b"tx:sa",
        b"t-1:sa",
        b"f0x1p99999",  # a float beyond the double range
        b"f" + b"9" * 400,
        _DEEP,  # nested 3000 deep: well formed, but too deep to decode
    ],
)
def test_malformed_encodings_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_key(data)


def _mutated(encoded: bytes) -> st.SearchStrategy[bytes]:
    """``encoded`` with a slice replaced by a few random bytes."""
    n = len(encoded)
    return st.tuples(st.integers(0, n), st.integers(0, n), st.binary(max_size=4)).map(
        lambda t: encoded[: t[0]] + t[2] + encoded[t[1] :]
    )


@SETTINGS
@given(st.one_of(st.binary(max_size=40), KEYS.map(encode_key).flatmap(_mutated)))
@example(b"f0x1p5000")
def test_decoding_garbage_raises_only_value_error(data: bytes) -> None:
    try:
        key = decode_key(data)
    except ValueError:
        return
    encode_key(key)  # whatever decodes is a supported key


# -- key space ----------------------------------------------------------------------------------


ENCODED = st.one_of(KEYS.map(encode_key), st.binary(max_size=30).map(lambda b: b"s" + b))


@SETTINGS
@given(ENCODED, st.sampled_from([1, 2, 3, 16]), st.sampled_from(["tc", "app:v2", "a*b", "x y"]))
def test_a_keys_names_share_the_hash_slot_of_its_partition(
    encoded: bytes, partitions: int, namespace: str
) -> None:
    ks = KeySpace(namespace, partitions)
    p = ks.partition(encoded)
    assert 0 <= p < partitions
    assert ks.partition(encoded) == p  # deterministic
    names = [*ks.script_keys(encoded), ks.counter(p), ks.log(p), ks.channel(p), ks.value(encoded)]
    tag = f"{{{namespace}:{p}}}".encode()
    for name in names:
        assert name.startswith(ks.prefix(p))
        # The hash tag is the first {...}; the encoded key (braces and all) comes after it.
        first = name.index(b"{")
        assert name[first : name.index(b"}", first) + 1] == tag
    assert len({key_slot(n) for n in names}) == 1
    assert ks.script_keys(encoded) == (ks.counter(p), ks.log(p), ks.value(encoded))
    assert len({ks.counter(p), ks.log(p), ks.channel(p), ks.value(encoded)}) == 4


@SETTINGS
@given(ENCODED, st.sampled_from([1, 3, 16]), st.sampled_from([0, 1, 7]))
def test_the_names_a_write_uses_are_those_of_its_partition_and_generation(
    encoded: bytes, partitions: int, generation: int
) -> None:
    ks = KeySpace("ns", partitions).with_generation(generation)
    p = ks.partition(encoded)
    counter, log, channel, values = ks.write_names(encoded)
    assert (counter, log, channel, values) == (
        ks.counter(p),
        ks.log(p),
        ks.channel(p),
        ks.value_prefix(p),
    )
    assert values + ks.stored(encoded) == ks.value(encoded)
    assert (values == ks.prefix(p) + b"v:") == (generation == 0)  # older generations' names differ


@SETTINGS
@given(ENCODED, st.sampled_from([1, 4]))
def test_the_encoded_key_is_recovered_from_its_value_key_name(
    encoded: bytes, partitions: int
) -> None:
    ks = KeySpace("ns", partitions)
    assert ks.encoded_of_value_key(ks.value(encoded)) == encoded


def test_single_partition_names() -> None:
    ks = KeySpace()
    assert ks.prefix(0) == b"tc:{tc:0}:"
    assert ks.value(b"sk") == b"tc:{tc:0}:v:sk"
    assert ks.channel(0) == b"tc:{tc:0}:inv"
    assert ks.counter(0) == b"tc:{tc:0}:seq" and ks.log(0) == b"tc:{tc:0}:log"
    assert {ks.partition(encode_key(k)) for k in range(200)} == {0}


def test_keys_spread_over_partitions() -> None:
    ks = KeySpace("ns", 4)
    assert {ks.partition(encode_key(k)) for k in range(200)} == {0, 1, 2, 3}


@pytest.mark.parametrize("namespace", ["", "a{b", "a}b", "tab\there", "nl\n", None, 5])
def test_bad_namespaces_are_refused(namespace: Any) -> None:
    with pytest.raises(ValueError):
        KeySpace(namespace)


@pytest.mark.parametrize("partitions", [0, -1])
def test_bad_partition_counts_are_refused(partitions: int) -> None:
    with pytest.raises(ValueError):
        KeySpace("ns", partitions)


@SETTINGS
@given(st.binary(max_size=30))
def test_escape_glob_escapes_exactly_the_specials(raw: bytes) -> None:
    escaped = escape_glob(raw)
    out, i = bytearray(), 0
    while i < len(escaped):
        c = escaped[i]
        if c == ord("\\"):
            assert escaped[i + 1] in b"*?[]\\"
            out.append(escaped[i + 1])
            i += 2
        else:
            assert c not in b"*?[]\\"
            out.append(c)
            i += 1
    assert bytes(out) == raw


# -- SCAN patterns on a real server -------------------------------------------------------------

NAMESPACES = ["a", "ab", "a*", "a?", "a[b]", "a[b", "ab]", "a\\", "a\\b", "a\\*", "b", "a:b"]


def _populate(client: redis.Redis) -> dict[str, set[bytes]]:
    """Every namespace's keys (entries, counter, log) in one database."""
    names: dict[str, set[bytes]] = {}
    for ns in NAMESPACES:
        ks = KeySpace(ns)
        mine: set[bytes] = set()
        for key in ["k", "*", "\\", ("x", "[y]"), 1, b"?"]:
            mine |= set(ks.script_keys(encode_key(key)))
        for name in mine:
            client.set(name, b"1")
        names[ns] = mine
    return names


def _scan(client: redis.Redis, pattern: bytes) -> set[bytes]:
    return set(client.scan_iter(match=pattern, count=1000))


def test_scan_patterns_select_exactly_their_namespace(redis_client: redis.Redis) -> None:
    names = _populate(redis_client)
    for ns, mine in names.items():
        ks = KeySpace(ns)
        values = {n for n in mine if n.startswith(ks.prefix(0) + b"v:")}
        assert len(values) == 6
        assert _scan(redis_client, ks.value_pattern(0)) == values, ns
        assert _scan(redis_client, ks.all_pattern(0)) == mine, ns
