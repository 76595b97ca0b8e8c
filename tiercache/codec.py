"""Value codecs and compression for the Redis tier (SPEC 3.9).

A codec turns a value into bytes and back; its one-byte ``id`` is stored in the Redis envelope so a
reader knows how a payload was written. This module is a leaf: stdlib, ``msgpack`` and optionally
``orjson`` / ``lz4``; no I/O (except that decoding a ``zoneinfo`` key lets the stdlib read tzdata).

Codecs
======
========  ==  ==============================================================================
name      id  what it does
========  ==  ==============================================================================
msgpack    1  default; cannot execute code; exact round trips of the types listed below
json       2  interoperability: JSON-native types only (tuples come back as lists)
pickle     3  anything picklable; **only behind HMAC verification** (``secret=`` is mandatory)
(user)   128..255  any object with ``id``, ``name``, ``dumps``, ``loads``
========  ==  ==============================================================================

Msgpack wire format (this is a wire format: never renumber)
===========================================================
Native msgpack: ``None``, ``bool``, ``int`` in [-2**63, 2**64), ``float`` (always float64, so nan,
±inf and -0.0 survive), ``str`` (UTF-8; lone surrogates via "surrogatepass"), ``bytes`` (bin),
``list`` (array) and ``dict`` whose keys are all ``str``/``bytes`` (map, order preserved).
Everything else uses application extension types:

====  ==========  =============================================================================
code  type        ext payload
====  ==========  =============================================================================
1     tuple       empty; marker as **first element of an array**: ``[<1>, item, ...]``
2     set         empty; marker: ``[<2>, item, ...]``
3     frozenset   empty; marker: ``[<3>, item, ...]``
4     dict        empty; marker for dicts with any key that is not str/bytes:
                  ``[<4>, k1, v1, k2, v2, ...]`` (order preserved)
5     int         ints outside [-2**63, 2**64): two's-complement, big-endian, minimal length
6     datetime    struct ``>HBBBBBIB`` (year, month, day, hour, minute, second, microsecond,
                  fold) followed by a tz suffix
7     date        struct ``>HBB`` (year, month, day)
8     time        struct ``>BBBIB`` (hour, minute, second, microsecond, fold) + tz suffix
9     timedelta   struct ``>iII`` (days, seconds, microseconds)
10    Decimal     ASCII ``str(d)`` (exact: sign, exponent, NaN/sNaN/Infinity)
11    UUID        the 16 bytes, big-endian
====  ==========  =============================================================================

tz suffix: empty = naive; ``0x01`` + ``>q`` UTC offset in microseconds = ``datetime.timezone``;
``0x02`` + ``>q`` offset + UTF-8 name = ``datetime.timezone`` with an explicit name;
``0x03`` + UTF-8 key = ``zoneinfo.ZoneInfo(key)``.

Containers are markers rather than nested ext payloads so that decoding never copies a payload
once per nesting level and never recurses in Python. Ext type -1 is msgpack's own timestamp,
decoded by msgpack itself (to ``msgpack.Timestamp``); ``dumps`` never writes it.

Decisions
=========
* Exact types only: subclasses (``IntEnum``, ``StrEnum``, ``OrderedDict``, ``defaultdict``,
  ``Counter``, namedtuples, datetime subclasses, ...) and ``bytearray``/``memoryview`` raise
  ``TypeError``: they would otherwise come back as their base type, and rebuilding a user class
  from cache bytes is what pickle (signed) is for.
* Time zones: ``datetime.timezone`` round-trips exactly (offset and name); ``zoneinfo.ZoneInfo``
  round-trips by key (a reader that cannot load that key raises ``ValueError``, i.e. a cache
  miss, rather than silently changing the tzinfo); any other tzinfo (pytz, dateutil, a ZoneInfo
  without key) is stored as its fixed UTC offset for that value and comes back as a
  ``datetime.timezone`` — same instant, same offset, different tzinfo class. ``fold`` is kept.
  ``UUID.is_safe`` is not kept.
* Errors: unsupported *type* → ``TypeError`` naming it; supported type with an unsupported *value*
  (too deep, non-finite float or too large int for JSON) → ``ValueError``; ``loads`` of anything
  malformed or hostile → ``ValueError`` only.

Hostile payloads
================
Every declared length is capped by the payload length (a 5-byte payload cannot ask for a
4-billion-element list); msgpack's fixed parser stack caps nesting at 1024 levels; dicts with
non-str keys and sets reject more than :data:`MAX_HASH_COLLISIONS` keys sharing one hash (int,
tuple, UUID and Decimal hashes are predictable, so such a payload would make building the dict
quadratic: 50 000 colliding keys cost minutes); native maps accept only str/bytes keys, whose
hashes are randomized. Decoded memory is linear in the payload size.
"""

from __future__ import annotations

import gc
import json
import math
import pickle
import struct
import threading
import zlib
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from functools import partial
from itertools import chain
from itertools import compress as _select
from operator import is_, is_not
from typing import Any, Final, Protocol
from uuid import UUID
from zoneinfo import ZoneInfo

import msgpack

try:  # optional extra "json"
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
    _orjson = None  # type: ignore[assignment]

try:  # optional extra "lz4"
    import lz4.block as _lz4_block
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
    _lz4_block = None  # type: ignore[assignment]

__all__ = [
    "COMPRESS_LZ4",
    "COMPRESS_NONE",
    "COMPRESS_ZLIB",
    "DEFAULT_COMPRESS_THRESHOLD",
    "HAVE_LZ4",
    "HAVE_ORJSON",
    "JSON",
    "MAX_DEPTH",
    "MAX_HASH_COLLISIONS",
    "MSGPACK",
    "PICKLE",
    "Codec",
    "JsonCodec",
    "MsgpackCodec",
    "PickleCodec",
    "codec_by_id",
    "compress",
    "decompress",
    "resolve_codec",
]

HAVE_ORJSON: Final[bool] = _orjson is not None
"""Whether orjson is installed (the json codec falls back to the stdlib otherwise)."""

HAVE_LZ4: Final[bool] = _lz4_block is not None
"""Whether lz4 is installed (compression falls back to zlib otherwise)."""

MAX_DEPTH: Final[int] = 128
"""Deepest container nesting ``dumps`` accepts (``ValueError`` beyond, which also catches cycles).

Kept well below the recursion limit and orjson's own limit (254); ``loads`` is bounded by the
msgpack parser stack (1024 levels) instead, which a hostile payload may reach but not exceed.
"""

MAX_HASH_COLLISIONS: Final[int] = 32
"""Most keys of one decoded dict/set that may share a hash with another key (hash-flood guard)."""

MAX_ZONE_KEY_LEN: Final[int] = 255
"""Longest zoneinfo key ``loads`` will look up."""

JSON_INT_MIN: Final[int] = -(2**63)
"""Smallest int the json codec writes (other JSON readers, orjson included, lose bigger ones)."""

JSON_INT_MAX: Final[int] = 2**64 - 1
"""Largest int the json codec writes."""

DEFAULT_COMPRESS_THRESHOLD: Final[int] = 4096
"""Encoded values shorter than this are stored uncompressed."""

COMPRESS_NONE: Final[int] = 0
"""Compression id: stored as is."""

COMPRESS_ZLIB: Final[int] = 1
"""Compression id: zlib format (RFC 1950), level 1."""

COMPRESS_LZ4: Final[int] = 2
"""Compression id: lz4 block with a 4-byte little-endian uncompressed-size prefix."""


class Codec(Protocol):
    """What ``serializer=`` accepts: a one-byte id, a name and a bytes round trip."""

    id: int
    name: str

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; ``TypeError`` for unsupported types."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; ``ValueError`` for anything malformed."""
        ...


def _type_name(obj: object) -> str:
    """``'int'`` for builtins, ``'module.Qual.Name'`` otherwise."""
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _unsupported(obj: object, codec: str, base: type | None = None) -> TypeError:
    """The TypeError for a value the codec will not write."""
    why = f" (a subclass of {base.__name__}; only exact types round-trip)" if base else ""
    return TypeError(
        f"cannot serialize value of type {_type_name(obj)!r} with the {codec} codec{why}; "
        f"use {_ALTERNATIVES[codec]} or convert it"
    )


_ALTERNATIVES: Final = {
    "msgpack": "serializer='pickle' (with secret=...)",
    "json": "serializer='msgpack' (the default) or 'pickle' (with secret=...)",
}


def _subclass_base(obj: object) -> type | None:
    """The supported type ``obj`` subclasses, if any (None for exact or unrelated types)."""
    return next((b for b in _BASES if isinstance(obj, b) and type(obj) is not b), None)


def _too_deep(codec: str) -> ValueError:
    """The ValueError for a value nested deeper than MAX_DEPTH."""
    return ValueError(
        f"value nests deeper than {MAX_DEPTH} levels (or contains a reference cycle); "
        f"the {codec} codec refuses it"
    )


# ---------------------------------------------------------------------------------------------
# msgpack codec
# ---------------------------------------------------------------------------------------------

_EXT_TUPLE: Final = 1
_EXT_SET: Final = 2
_EXT_FROZENSET: Final = 3
_EXT_DICT: Final = 4
_EXT_BIGINT: Final = 5
_EXT_DATETIME: Final = 6
_EXT_DATE: Final = 7
_EXT_TIME: Final = 8
_EXT_TIMEDELTA: Final = 9
_EXT_DECIMAL: Final = 10
_EXT_UUID: Final = 11

_M_TUPLE: Final = msgpack.ExtType(_EXT_TUPLE, b"")
_M_SET: Final = msgpack.ExtType(_EXT_SET, b"")
_M_FROZENSET: Final = msgpack.ExtType(_EXT_FROZENSET, b"")
_M_DICT: Final = msgpack.ExtType(_EXT_DICT, b"")

_NATIVE: Final = frozenset({str, bytes, int, float, bool, type(None)})
_SCALARS: Final = _NATIVE | {datetime, date, time, timedelta, Decimal, UUID}
_MAP_KEYS: Final = frozenset({str, bytes})  # the only keys written as (and read from) msgpack maps
_BASES: Final = (
    bool,
    int,
    float,
    str,
    bytes,
    list,
    tuple,
    dict,
    set,
    frozenset,
    datetime,
    date,
    time,
    timedelta,
    Decimal,
    UUID,
)

_DT: Final = struct.Struct(">HBBBBBIB")
_DATE: Final = struct.Struct(">HBB")
_TIME: Final = struct.Struct(">BBBIB")
_TD: Final = struct.Struct(">iII")
_OFFSET: Final = struct.Struct(">q")
_TZ_FIXED: Final = 1
_TZ_NAMED: Final = 2
_TZ_ZONE: Final = 3


_CONTAINERS: Final = frozenset({list, dict, tuple, set, frozenset})
_SUPPORTED: Final = _SCALARS | _CONTAINERS
_LEAVES: Final = frozenset(t for t in _SCALARS if not t.__flags__ & (1 << 14))
"""Supported scalars that are not GC objects (no ``Py_TPFLAGS_HAVE_GC``): hold no references."""

# C-speed predicates, used with map(type, ...): issuperset stops at the first miss.
_all_scalars: Final = _SCALARS.issuperset
_all_map_keys: Final = _MAP_KEYS.issuperset
_all_supported: Final = _SUPPORTED.issuperset
_all_leaves: Final = _LEAVES.issuperset
_is_container: Final = _CONTAINERS.__contains__
_is_dict: Final = partial(is_, dict)
_is_not_dict: Final = partial(is_not, dict)
_flatten: Final = chain.from_iterable
_dict_values: Final = dict.values


def _items_checked(level: list[Any]) -> list[Any] | None:
    """The items (dict values) of the containers in ``level``; None if a dict has a key that is
    not str/bytes."""
    kinds = set(map(type, level))
    if dict not in kinds:
        return list(_flatten(level))
    dicts = level if len(kinds) == 1 else list(_select(level, map(_is_dict, map(type, level))))
    if not _all_map_keys(map(type, _flatten(dicts))):
        return None
    items = list(_flatten(map(_dict_values, dicts)))
    if len(kinds) > 1:
        items += _flatten(_select(level, map(_is_not_dict, map(type, level))))
    return items


def _referents_work() -> bool:
    """Whether gc.get_referents of a list, tuple, set, frozenset or str-keyed dict is exactly its
    items (dict: values), and of a dict with another key more than its values (CPython)."""
    try:
        items: list[Any] = [
            0, 1, 2**70, -1.5, "s", b"b", None, True, (1,), frozenset({2}), date(2000, 1, 1),
            datetime(2000, 1, 1), time(), timedelta(1), Decimal(1), UUID(int=1),
            msgpack.ExtType(1, b""), msgpack.Timestamp(1),
        ]  # fmt: skip
        unhashable = [bytearray(b"x"), memoryview(b"m"), [3], {"k": 4}, {5}]
        for sample in (
            items + unhashable,
            tuple(items + unhashable),
            set(items),
            frozenset(items),
            {str(i): x for i, x in enumerate(items + unhashable)},
        ):
            got = gc.get_referents(sample)
            want = list(sample.values()) if type(sample) is dict else list(sample)
            if len(got) != len(want) or set(map(id, got)) != set(map(id, want)):
                return False
        return all(len(gc.get_referents(d)) > len(d) for d in ({1: 0}, {b"k": 0}, {"a": 0, 1: 0}))
    except Exception:  # pragma: no cover - another implementation: use the explicit walk
        return False


_REFERENTS: Final = _referents_work()
_SMALL: Final = 16
"""Use gc.get_referents to list the items of a whole level at once (CPython)."""


def _plain(obj: Any) -> bool:
    """Whether the packer can write the container ``obj`` as it is (no :func:`_prepare` copy).

    True when every object inside is of a supported exact type, every dict has only str/bytes
    keys and no container nests deeper than MAX_DEPTH. The packer then writes lists, dicts and
    scalars itself and hands tuples, sets and the extension scalars to :func:`_default`. False
    sends the value through :func:`_prepare`, which converts dicts with other keys and raises the
    precise error for anything unsupported (bytearray, memoryview, ExtType and Timestamp too,
    which the packer would otherwise write natively).

    Breadth first, one level of containers at a time, iterating in C only: a Python-level step
    per container was most of the cost of encoding nested records. ``gc.get_referents`` lists
    the items of every container of a level in one call; a dict whose keys are all str does not
    report them (its keys table holds str only), any other dict does, so a level whose item
    count exceeds the sum of its lengths has a dict to check key by key.
    """
    level: list[Any] = [obj]  # the containers at the current depth
    for _ in range(MAX_DEPTH):
        if len(level) == 1 and len(level[0]) <= _SMALL:
            # One small container (records, and the top of most values): a Python loop over its
            # items costs less than the fixed cost of the C passes below.
            c = level[0]
            if type(c) is dict:
                if not _all_map_keys(map(type, c)):
                    return False
                c = c.values()
            level = []
            for x in c:
                t = type(x)
                if t not in _LEAVES:
                    if t in _CONTAINERS:
                        level.append(x)
                    elif t not in _SUPPORTED:
                        return False
            if not level:
                return True
            continue
        items: list[Any] | None = None
        if _REFERENTS:
            items = gc.get_referents(*level)
            if len(items) != sum(map(len, level)):
                items = None
        if items is None:
            items = _items_checked(level)
            if items is None:
                return False
        types = list(map(type, items))
        kinds = set(types)
        if _all_leaves(kinds):
            return True
        if not _all_supported(kinds):
            return False
        level = list(_select(items, map(_is_container, types)))
        if not level:
            return True
    return False  # containers at depth MAX_DEPTH (or a cycle): _prepare raises


def _prepare(obj: Any, depth: int) -> Any:
    """Validate ``obj`` and return it in packable form, copying only containers that change.

    The slow path, for values :func:`_plain` refuses: dicts with keys other than str/bytes become
    marker arrays here, and unsupported types or too deep nesting raise.
    """
    t = type(obj)
    if t in _SCALARS:
        return obj
    if depth >= MAX_DEPTH:
        raise _too_deep("msgpack")
    d = depth + 1
    if t is dict:
        if _all_map_keys(map(type, obj)):
            if _all_scalars(map(type, obj.values())):
                return obj
            new = None
            for k, v in obj.items():
                if type(v) not in _SCALARS:
                    w = _prepare(v, d)
                    if w is not v:
                        if new is None:
                            new = obj.copy()
                        new[k] = w
            return obj if new is None else new
        out = [_M_DICT]
        for k, v in obj.items():
            out.append(k if type(k) in _SCALARS else _prepare(k, d))
            out.append(v if type(v) in _SCALARS else _prepare(v, d))
        return out
    if t is list:
        if _all_scalars(map(type, obj)):
            return obj
        new = None
        for i, x in enumerate(obj):
            if type(x) not in _SCALARS:
                w = _prepare(x, d)
                if w is not x:
                    if new is None:
                        new = obj.copy()
                    new[i] = w
        return obj if new is None else new
    if t is tuple:
        marker = _M_TUPLE
    elif t is set:
        marker = _M_SET
    elif t is frozenset:
        marker = _M_FROZENSET
    else:
        raise _unsupported(obj, "msgpack", _subclass_base(obj))
    if _all_scalars(map(type, obj)):
        return [marker, *obj]
    return [marker, *[x if type(x) in _SCALARS else _prepare(x, d) for x in obj]]


def _offset_us(off: timedelta) -> int:
    """A UTC offset in microseconds."""
    return (off.days * 86_400 + off.seconds) * 1_000_000 + off.microseconds


def _tz_bytes(tz: tzinfo | None, dt: datetime | None) -> bytes:
    """The tz suffix of a datetime/time (see the module docstring)."""
    if tz is None:
        return b""
    if type(tz) is timezone:
        off = tz.utcoffset(None)
        name = tz.tzname(None)
        if name == timezone(off).tzname(None):
            return bytes((_TZ_FIXED,)) + _OFFSET.pack(_offset_us(off))
        return (
            bytes((_TZ_NAMED,))
            + _OFFSET.pack(_offset_us(off))
            + name.encode("utf-8", "surrogatepass")
        )
    if type(tz) is ZoneInfo and tz.key is not None:
        return bytes((_TZ_ZONE,)) + tz.key.encode("utf-8", "surrogatepass")
    off = tz.utcoffset(dt)  # pytz, dateutil, ...: keep the offset in force for this value
    if off is None:
        raise TypeError(
            f"cannot serialize a datetime/time whose tzinfo {_type_name(tz)!r} gives no UTC offset "
            f"with the msgpack codec; use serializer='pickle' (with secret=...) or convert it"
        )
    return bytes((_TZ_FIXED,)) + _OFFSET.pack(_offset_us(off))


def _tz_from(data: bytes, pos: int) -> tzinfo | None:
    """Decode the tz suffix of ``data`` starting at ``pos``."""
    if len(data) == pos:
        return None
    tag = data[pos]
    if tag in (_TZ_FIXED, _TZ_NAMED):
        (us,) = _OFFSET.unpack_from(data, pos + 1)
        off = timedelta(microseconds=us)
        if tag == _TZ_FIXED:
            if len(data) != pos + 9:
                raise ValueError("trailing bytes after a fixed UTC offset")
            return timezone(off)
        return timezone(off, data[pos + 9 :].decode("utf-8", "surrogatepass"))
    if tag == _TZ_ZONE:
        key = data[pos + 1 :].decode("utf-8", "surrogatepass")
        if len(key) > MAX_ZONE_KEY_LEN:
            raise ValueError("zoneinfo key too long")
        return ZoneInfo(key)
    raise ValueError(f"unknown tz tag {tag}")


_DT_SIZE: Final = _DT.size
_TIME_SIZE: Final = _TIME.size
_UTC: Final = timezone.utc
_UTC_SUFFIX: Final = _tz_bytes(_UTC, None)
_TZ_CACHE_SIZE: Final = 256
"""Most tzinfo suffixes remembered by each of the two tz caches (cleared when full)."""

# Encoding: id(tzinfo) -> (that tzinfo, its suffix), for tzinfos whose suffix does not depend on
# the value (timezone, keyed ZoneInfo). Keyed by identity, not equality: timezone(x) equals
# timezone(x, "name"); holding the tzinfo keeps its id from being reused.
_tz_suffixes: Final[dict[int, tuple[tzinfo, bytes]]] = {}

# Decoding: suffix bytes -> timezone (immutable, so values may share one). ZoneInfo suffixes are
# not cached here: ZoneInfo(key) has its own cache and stays the authority on loadable keys.
_TZ_KNOWN: Final[dict[bytes, tzinfo | None]] = {b"": None, _UTC_SUFFIX: _UTC}
_tz_decoded: Final[dict[bytes, tzinfo | None]] = dict(_TZ_KNOWN)
_MISSING: Final = object()


def _tz_suffix(tz: tzinfo, dt: datetime | None) -> bytes:
    """:func:`_tz_bytes` of a non-None tzinfo, cached when it cannot depend on ``dt``."""
    if tz is _UTC:
        return _UTC_SUFFIX
    hit = _tz_suffixes.get(id(tz))
    if hit is not None and hit[0] is tz:
        return hit[1]
    suffix = _tz_bytes(tz, dt)
    if type(tz) is timezone or (type(tz) is ZoneInfo and tz.key is not None):
        if len(_tz_suffixes) >= _TZ_CACHE_SIZE:
            _tz_suffixes.clear()
        _tz_suffixes[id(tz)] = (tz, suffix)
    return suffix


def _tz_decode(suffix: bytes) -> tzinfo | None:
    """The tzinfo of a tz suffix (cached unless it names a zone); ``ValueError`` if malformed."""
    tz = _tz_decoded.get(suffix, _MISSING)
    if tz is _MISSING:
        tz = _tz_from(suffix, 0)
        if suffix and suffix[0] != _TZ_ZONE:
            if len(_tz_decoded) >= _TZ_CACHE_SIZE:
                _tz_decoded.clear()
                _tz_decoded.update(_TZ_KNOWN)
            _tz_decoded[suffix] = tz
    return tz  # type: ignore[return-value]


_new_ext: Final = partial(tuple.__new__, msgpack.ExtType)
"""``_new_ext((code, data))``: an ExtType without the argument checks of its Python ``__new__``."""


def _default(obj: Any) -> Any:
    """msgpack ``default=``: what the packer does not write itself (exact types only).

    Tuples, sets and frozensets become marker arrays (the packer then writes their items);
    datetime & co. and ints beyond 64 bits become extension types. Most frequent first.
    """
    t = type(obj)
    if t is datetime:
        tz = obj.tzinfo
        fields = _DT.pack(
            obj.year,
            obj.month,
            obj.day,
            obj.hour,
            obj.minute,
            obj.second,
            obj.microsecond,
            obj.fold,
        )
        return _new_ext((_EXT_DATETIME, fields if tz is None else fields + _tz_suffix(tz, obj)))
    if t is tuple:
        return [_M_TUPLE, *obj]
    if t is date:
        return _new_ext((_EXT_DATE, _DATE.pack(obj.year, obj.month, obj.day)))
    if t is Decimal:
        return _new_ext((_EXT_DECIMAL, str(obj).encode("ascii")))
    if t is UUID:
        return _new_ext((_EXT_UUID, obj.bytes))
    if t is set:
        return [_M_SET, *obj]
    if t is frozenset:
        return [_M_FROZENSET, *obj]
    if t is int:  # msgpack calls us only on overflow of its 64-bit range
        return _new_ext(
            (_EXT_BIGINT, obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True))
        )
    if t is time:
        tz = obj.tzinfo
        fields = _TIME.pack(obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold)
        return _new_ext((_EXT_TIME, fields if tz is None else fields + _tz_suffix(tz, None)))
    if t is timedelta:
        return _new_ext((_EXT_TIMEDELTA, _TD.pack(obj.days, obj.seconds, obj.microseconds)))
    raise _unsupported(obj, "msgpack", _subclass_base(obj))  # unreachable after validation


def _check_hashes(keys: list[Any]) -> None:
    """Refuse a hash flood: too many keys of one container sharing hashes (also unhashables)."""
    n = len(keys)
    # A set of hash values cannot itself be flooded: distinct ints hash to distinct values.
    if n > MAX_HASH_COLLISIONS and n - len(set(map(hash, keys))) > MAX_HASH_COLLISIONS:
        raise ValueError(f"more than {MAX_HASH_COLLISIONS} colliding keys in one dict/set")


class _Marker:
    """A decoded container marker; turns the array it heads into the container."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[Any]], Any]) -> None:
        self.build = build


def _build_tuple(lst: list[Any]) -> tuple[Any, ...]:
    """``[<tuple>, a, b]`` → ``(a, b)``."""
    del lst[0]
    return tuple(lst)


def _build_set(lst: list[Any]) -> set[Any]:
    """``[<set>, a, b]`` → ``{a, b}``."""
    del lst[0]
    _check_hashes(lst)
    return set(lst)


def _build_frozenset(lst: list[Any]) -> frozenset[Any]:
    """``[<frozenset>, a, b]`` → ``frozenset({a, b})``."""
    del lst[0]
    _check_hashes(lst)
    return frozenset(lst)


def _build_dict(lst: list[Any]) -> dict[Any, Any]:
    """``[<dict>, k1, v1, k2, v2]`` → ``{k1: v1, k2: v2}``."""
    if len(lst) % 2 != 1:
        raise ValueError("dict marker array has an odd number of keys and values")
    keys = lst[1::2]
    _check_hashes(keys)
    return dict(zip(keys, lst[2::2], strict=True))


_MARKERS: Final = {
    _EXT_TUPLE: _Marker(_build_tuple),
    _EXT_SET: _Marker(_build_set),
    _EXT_FROZENSET: _Marker(_build_frozenset),
    _EXT_DICT: _Marker(_build_dict),
}

_MARKER_PREFIX: Final = b"\xc7\x00"
"""How the packer writes every marker (ext 8, length 0): a payload without these two bytes has
no marker unless it was written by something else, which :func:`_ext_scalar` catches."""


def _ext_bigint(data: bytes) -> int:
    """Decode ext 5."""
    return int.from_bytes(data, "big", signed=True)


def _ext_datetime(data: bytes) -> datetime:
    """Decode ext 6."""
    y, mo, d, h, mi, s, us, fold = _DT.unpack_from(data)
    suffix = data[_DT_SIZE:]
    tz = _tz_decoded.get(suffix, _MISSING)
    if tz is _MISSING:
        tz = _tz_decode(suffix)
    if fold:
        return datetime(y, mo, d, h, mi, s, us, tz, fold=fold)  # type: ignore[arg-type]
    return datetime(y, mo, d, h, mi, s, us, tz)  # type: ignore[arg-type]


def _ext_date(data: bytes) -> date:
    """Decode ext 7."""
    return date(*_DATE.unpack(data))


def _ext_time(data: bytes) -> time:
    """Decode ext 8."""
    h, mi, s, us, fold = _TIME.unpack_from(data)
    return time(h, mi, s, us, _tz_decode(data[_TIME_SIZE:]), fold=fold)


def _ext_timedelta(data: bytes) -> timedelta:
    """Decode ext 9."""
    days, seconds, us = _TD.unpack(data)
    return timedelta(days, seconds, us)


def _ext_decimal(data: bytes) -> Decimal:
    """Decode ext 10."""
    return Decimal(data.decode("ascii"))


def _ext_uuid(data: bytes) -> UUID:
    """Decode ext 11."""
    return UUID(bytes=data)


_SCALAR_EXT: Final[dict[int, Callable[[bytes], Any]]] = {
    _EXT_BIGINT: _ext_bigint,
    _EXT_DATETIME: _ext_datetime,
    _EXT_DATE: _ext_date,
    _EXT_TIME: _ext_time,
    _EXT_TIMEDELTA: _ext_timedelta,
    _EXT_DECIMAL: _ext_decimal,
    _EXT_UUID: _ext_uuid,
}


class _HasMarkers(Exception):
    """Raised by :func:`_ext_scalar` on a container marker: decode again with the list hook."""


def _ext_scalar(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook=`` of the fast path (payloads without markers): scalars only."""
    decode = _SCALAR_EXT.get(code)
    if decode is None:
        if code in _MARKERS:
            raise _HasMarkers
        raise ValueError(f"unknown msgpack extension type {code}")
    return decode(data)


class _DecodeState(threading.local):
    """Per-thread count of markers decoded but not yet consumed by the array they head."""

    pending: int = 0


_state: Final = _DecodeState()


def _ext_hook(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook=``: scalars are built here, container markers counted."""
    marker = _MARKERS.get(code)
    if marker is not None:
        if data:
            raise ValueError(f"msgpack extension type {code} must be empty")
        _state.pending += 1
        return marker
    decode = _SCALAR_EXT.get(code)
    if decode is None:
        raise ValueError(f"unknown msgpack extension type {code}")
    return decode(data)


def _list_hook(lst: list[Any]) -> Any:
    """msgpack ``list_hook=``: an array headed by a marker becomes that container."""
    if lst and type(lst[0]) is _Marker:
        _state.pending -= 1
        return lst[0].build(lst)
    return lst


def _new_packer() -> msgpack.Packer:
    """A packer for validated values (autoreset: each ``pack`` returns its bytes)."""
    return msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)


class _PackState(threading.local):
    """A reusable packer per thread: building one per call costs as much as packing a record."""

    def __init__(self) -> None:
        self.packer: msgpack.Packer | None = _new_packer()


_packing: Final = _PackState()


class MsgpackCodec:
    """The default codec: msgpack plus extension types; cannot execute code (see module doc)."""

    id: int = 1
    name: str = "msgpack"

    def dumps(self, value: Any) -> bytes:
        """Encode ``value`` (TypeError for unsupported types, ValueError if nested too deep)."""
        t = type(value)
        # Usually the packer and _default write the value as it is; _prepare raises, or converts
        # dicts with keys other than str/bytes.
        plain = t in _SCALARS or (t in _CONTAINERS and _plain(value))
        obj = value if plain else _prepare(value, 0)
        # Take the packer while in use: a foreign tzinfo's utcoffset() runs user code mid-pack,
        # and a nested dumps must not write into the same buffer.
        packer, _packing.packer = _packing.packer, None
        try:
            return (packer if packer is not None else _new_packer()).pack(obj)
        except UnicodeEncodeError:
            # Lone surrogates: rare, so only they pay for the slower error-handler path.
            return msgpack.packb(
                obj,
                default=_default,
                use_bin_type=True,
                strict_types=True,
                unicode_errors="surrogatepass",
            )
        finally:
            if packer is not None:
                _packing.packer = packer

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; anything malformed or hostile raises ``ValueError``."""
        n = len(data)
        if type(data) is bytes and _MARKER_PREFIX not in data:
            # No container marker: no list hook (a Python call per array) and no bookkeeping.
            try:
                return msgpack.unpackb(
                    data,
                    raw=False,
                    use_list=True,
                    strict_map_key=True,  # native maps: str/bytes keys only (randomized hashes)
                    ext_hook=_ext_scalar,
                    unicode_errors="surrogatepass",
                    # Each element takes at least one byte: nothing may declare more than the
                    # payload.
                    max_str_len=n,
                    max_bin_len=n,
                    max_array_len=n,
                    max_map_len=n // 2,
                    max_ext_len=n,
                )
            except _HasMarkers:
                pass  # a marker not written by the packer (ext 16/32): the general path below
            except Exception as exc:
                raise ValueError(f"invalid msgpack payload: {exc}") from exc
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                ext_hook=_ext_hook,
                list_hook=_list_hook,
                unicode_errors="surrogatepass",
                max_str_len=n,
                max_bin_len=n,
                max_array_len=n,
                max_map_len=n // 2,
                max_ext_len=n,
            )
        except Exception as exc:
            _state.pending = 0
            raise ValueError(f"invalid msgpack payload: {exc}") from exc
        if _state.pending:
            _state.pending = 0
            raise ValueError("invalid msgpack payload: misplaced container marker")
        return obj

    def __repr__(self) -> str:
        return "MsgpackCodec()"


# ---------------------------------------------------------------------------------------------
# json codec
# ---------------------------------------------------------------------------------------------

_JSON_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_JSON_PLAIN: Final = frozenset({str, bool, type(None)})  # need no value check
_JSON_BASES: Final = (bool, int, float, str, list, tuple, dict)
_all_str: Final = frozenset({str}).issuperset


def _json_number(x: Any) -> None:
    """Reject numbers other JSON readers would not read back exactly."""
    if type(x) is float:
        if not math.isfinite(x):
            raise ValueError(f"the json codec cannot write the float {x!r}")
    elif type(x) is int and not JSON_INT_MIN <= x <= JSON_INT_MAX:
        raise ValueError(f"the json codec cannot write ints outside 64 bits: {x!r}")


_all_json_plain: Final = _JSON_PLAIN.issuperset


def _json_check(obj: Any, depth: int) -> None:
    """Validate ``obj`` as JSON-native (exact types, str keys, finite floats, 64-bit ints)."""
    t = type(obj)
    if t in _JSON_SCALARS:
        _json_number(obj)
        return
    if depth >= MAX_DEPTH:
        raise _too_deep("json")
    if t is dict:
        if not _all_str(map(type, obj)):
            bad = next(k for k in obj if type(k) is not str)
            raise TypeError(
                f"the json codec needs str dict keys, not {_type_name(bad)!r}; "
                f"use serializer='msgpack' or convert the keys"
            )
        items = obj.values()
    elif t is list or t is tuple:
        items = obj
    else:
        base = _subclass_base(obj)
        raise _unsupported(obj, "json", base if base in _JSON_BASES else None)
    if _all_json_plain(map(type, items)):
        return
    d = depth + 1
    for x in items:
        tx = type(x)
        if tx is int:  # inlined _json_number: numbers are most of what reaches this loop
            if not JSON_INT_MIN <= x <= JSON_INT_MAX:
                _json_number(x)
        elif tx is float:
            if not math.isfinite(x):
                _json_number(x)
        elif tx not in _JSON_PLAIN:
            _json_check(x, d)


def _reject_constant(name: str) -> Any:
    """stdlib json ``parse_constant=``: NaN/Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """stdlib json ``parse_float=``: refuse overflow to ±inf (as orjson does)."""
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text} is out of float range")
    return x


class JsonCodec:
    """JSON for interoperability: str, int (64-bit), finite float, bool, None, list, dict[str, ...].

    Tuples are written as arrays and come back as lists. orjson is used when installed, else the
    stdlib; both accept and produce the same values.
    """

    id: int = 2
    name: str = "json"

    def dumps(self, value: Any) -> bytes:
        """Encode ``value`` (TypeError for non-JSON types, ValueError for non-JSON values)."""
        _json_check(value, 0)
        if _orjson is not None:
            try:
                return _orjson.dumps(value)
            except _orjson.JSONEncodeError as exc:  # after the check: only lone surrogates
                raise ValueError(f"the json codec cannot write this value: {exc}") from exc
        text = json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
        )
        return text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on lone surrogates

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; anything malformed raises ``ValueError``."""
        try:
            if _orjson is not None:
                return _orjson.loads(data)
            return json.loads(
                bytes(data).decode("utf-8"),
                parse_constant=_reject_constant,
                parse_float=_finite_float,
            )
        except Exception as exc:  # incl. RecursionError from the stdlib parser
            raise ValueError(f"invalid json payload: {exc}") from exc

    def __repr__(self) -> str:
        return "JsonCodec()"


# ---------------------------------------------------------------------------------------------
# pickle codec
# ---------------------------------------------------------------------------------------------


class PickleCodec:
    """Pickle protocol 5. **Executes code on load**: use only behind signature verification.

    TieredCache refuses ``serializer="pickle"`` without ``secret=``, and the envelope checks the
    HMAC (bound to namespace, key and version) before it ever calls ``loads``. Never call
    ``loads`` on bytes read from Redis that were not verified.
    """

    id: int = 3
    name: str = "pickle"

    def dumps(self, value: Any) -> bytes:
        """``pickle.dumps(value, protocol=5)``."""
        return pickle.dumps(value, protocol=5)

    def loads(self, data: bytes) -> Any:
        """``pickle.loads(data)`` — verified data only; failures become ``ValueError``."""
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise ValueError(f"invalid pickle payload: {exc}") from exc

    def __repr__(self) -> str:
        return "PickleCodec()"


MSGPACK: Final = MsgpackCodec()
"""The default codec instance."""

JSON: Final = JsonCodec()
"""The json codec instance."""

PICKLE: Final = PickleCodec()
"""The pickle codec instance (signed payloads only)."""

_BY_NAME: Final[dict[str, Codec]] = {"msgpack": MSGPACK, "json": JSON, "pickle": PICKLE}
_BY_ID: Final[dict[int, Codec]] = {c.id: c for c in _BY_NAME.values()}
_BUILTIN_TYPES: Final = (MsgpackCodec, JsonCodec, PickleCodec)


def resolve_codec(serializer: str | Codec | None) -> Codec:
    """The codec for ``serializer=``: None/"msgpack", "json", "pickle" or a codec object.

    A user codec needs an int ``id`` in 128..255 (so it never collides with a built-in), a str
    ``name`` and callable ``dumps``/``loads``; ``ValueError`` otherwise.
    """
    if serializer is None:
        return MSGPACK
    if isinstance(serializer, str):
        codec = _BY_NAME.get(serializer)
        if codec is None:
            raise ValueError(
                f"unknown serializer {serializer!r}; choose 'msgpack' (default), 'json', "
                f"'pickle' (needs secret=) or pass a codec object with id, name, dumps and loads"
            )
        return codec
    if type(serializer) in _BUILTIN_TYPES:
        return serializer
    missing = [a for a in ("id", "name", "dumps", "loads") if not hasattr(serializer, a)]
    if missing:
        raise ValueError(
            f"serializer {serializer!r} is neither a codec name nor a codec object "
            f"(missing {', '.join(missing)}); choose 'msgpack', 'json' or 'pickle'"
        )
    cid = serializer.id
    if type(cid) is not int or not 128 <= cid <= 255:
        raise ValueError(
            f"a user codec id must be an int in 128..255 (0..127 are reserved for built-ins), "
            f"got {cid!r}"
        )
    if not isinstance(serializer.name, str) or not serializer.name:
        raise ValueError(f"a codec name must be a non-empty str, got {serializer.name!r}")
    if not callable(serializer.dumps) or not callable(serializer.loads):
        raise ValueError("a codec's dumps and loads must be callable")
    return serializer


def codec_by_id(codec_id: int) -> Codec:
    """The built-in codec with this id (``ValueError`` for others).

    Callers must not dispatch on an id read from an unverified payload without checking it is
    the configured codec: that would hand attacker bytes to pickle.
    """
    codec = _BY_ID.get(codec_id)
    if codec is None:
        raise ValueError(f"unknown codec id {codec_id!r}")
    return codec


# ---------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------

_LZ4_SIZE: Final = struct.Struct("<I")


def compress(
    data: bytes, threshold: int = DEFAULT_COMPRESS_THRESHOLD, *, method: int | None = None
) -> tuple[bytes, int]:
    """``(payload, compression id)``: compressed only if ``len(data) >= threshold`` and it shrinks.

    ``method`` pins an algorithm (e.g. ``COMPRESS_ZLIB`` for fleets where some readers lack
    lz4); by default lz4 when installed, else zlib.
    """
    if len(data) < threshold:
        return data, COMPRESS_NONE
    if method is None:
        method = COMPRESS_LZ4 if _lz4_block is not None else COMPRESS_ZLIB
    if method == COMPRESS_LZ4:
        if _lz4_block is None:
            raise ValueError("lz4 compression requested but lz4 is not installed")
        out = _lz4_block.compress(data, store_size=True)
    elif method == COMPRESS_ZLIB:
        out = zlib.compress(data, 1)  # level 1: a cache favours speed over ratio
    elif method == COMPRESS_NONE:
        return data, COMPRESS_NONE
    else:
        raise ValueError(f"unknown compression method {method!r}")
    if len(out) >= len(data):
        return data, COMPRESS_NONE
    return out, method


def _exceeds(max_size: int) -> ValueError:
    """The error for a payload that would decompress beyond ``max_size``."""
    return ValueError(f"decompressed size exceeds the limit of {max_size} bytes")


def decompress(payload: bytes, method: int, max_size: int) -> bytes:
    """Undo :func:`compress`, never producing (or allocating for) more than ``max_size`` bytes."""
    if max_size < 0:  # zlib would read max_length=0 as "unlimited"
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    if method == COMPRESS_NONE:
        if len(payload) > max_size:
            raise _exceeds(max_size)
        return bytes(payload)
    if method == COMPRESS_ZLIB:
        d = zlib.decompressobj()
        try:
            # max_length caps the output buffer; one byte more tells "exactly max" from "more".
            out = d.decompress(payload, max_size + 1)
        except zlib.error as exc:
            raise ValueError(f"invalid zlib payload: {exc}") from exc
        if len(out) > max_size:
            raise _exceeds(max_size)
        if not d.eof or d.unused_data:
            raise ValueError("invalid zlib payload: truncated or trailing data")
        return out
    if method == COMPRESS_LZ4:
        if _lz4_block is None:
            raise ValueError("payload is lz4-compressed but lz4 is not installed")
        if len(payload) < _LZ4_SIZE.size:
            raise ValueError("invalid lz4 payload: truncated")
        (size,) = _LZ4_SIZE.unpack_from(payload)
        if size > max_size:  # checked before lz4 allocates the declared size
            raise _exceeds(max_size)
        try:
            # lz4 decodes into a buffer of exactly the declared size and fails if it would overrun.
            return _lz4_block.decompress(payload)
        except Exception as exc:
            raise ValueError(f"invalid lz4 payload: {exc}") from exc
    raise ValueError(f"unknown compression method {method!r}")
