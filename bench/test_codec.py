"""Codecs (tiercache.codec, SPEC 3.9): encode+decode cost per codec, and what signing adds.

Two value sizes, a realistic nested mix every codec round-trips (dicts, lists, str, int, float,
bool, None and timezone-aware datetimes): small, ~100 B (msgpack-encoded: a user record), and
medium, ~10 KB (an order of 54 line items, each with a nested dict). JSON cannot carry a
datetime, so the two json rows (stdlib ``json`` and our orjson-based ``"json"`` codec, which
refuses datetimes like the stdlib) encode a json-compatible variant of the same values: every
datetime replaced by its ISO 8601 string. Every round trip is checked for equality first.

1. Per value: ``loads(dumps(v))`` with stdlib ``pickle`` (protocol 5), stdlib ``json`` (str
   in and out, default settings), and our three codecs: the default ``"msgpack"``, ``"json"``
   (orjson) and ``"pickle"`` (protocol 5 behind the codec interface).
2. Signing (``secret=``): the envelope round trip the cache does around the codec, without a
   secret and with one: ``TieredCache._pack`` (header, then with a secret: a placeholder header,
   ``Signer.sign_envelope`` over namespace, key, header and payload) and the check of
   ``TieredCache._decode`` before the codec runs (header parse, then with a secret:
   ``Signer.verify_envelope``, HMAC-SHA256 compared in constant time), on the msgpack payload
   of each size. The difference of the two rows is the overhead of signing: absolute ns, and as
   a ratio to each codec's round trip (report footer).

Timing: the harness loop (``bench/harness.py``) over distinct values of one shape, the statement
``c[1](c[0](c[2][k]))`` (``c`` = (dumps, loads, values)); the loop-overhead row runs the same
statement with identity functions, so net ns = the codec alone. No Redis here, no timing
assertions: the report shows the figures.
"""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import harness
import pytest
import report
from harness import Variant

BENCH_ORDER = 25
QUICK = harness.QUICK
GROUPS = {"small": "codec-small", "medium": "codec-medium"}
N_VALUES = {"small": 200, "medium": 5}  # distinct values per size: a pass is a few ms
N_ITEMS = 54  # line items of a medium value: ~10 KB with the default codec
SECRET = b"bench-secret-0123456789abcdef"
NAMESPACE = "bench-codec"

STMT = "c[1](c[0](c[2][k]))"
LOOP = "loop overhead (identity dumps/loads, same statement)"
STD_PICKLE = "stdlib pickle.dumps(v, protocol=5) + pickle.loads"
STD_JSON = "stdlib json.dumps + json.loads (json variant, str)"
MSGPACK = 'tiercache "msgpack" codec (default) dumps+loads'
OJSON = 'tiercache "json" codec (orjson) dumps+loads (json variant)'
OPICKLE = 'tiercache "pickle" codec dumps+loads'
ENV_PLAIN = "envelope pack + parse, no secret (msgpack payload)"
ENV_SIGNED = "envelope pack + sign + verify + parse, secret= (msgpack payload)"
CODEC_ROWS = (STD_PICKLE, STD_JSON, MSGPACK, OJSON, OPICKLE)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot",
    "golf", "hotel", "india", "juliet", "kilo", "lima",
]  # fmt: skip


# -- the values -----------------------------------------------------------------------------------


def small_value(i: int) -> dict[str, Any]:
    """A user record: ~100 B with the default codec."""
    return {
        "id": 1_000_000 + i,
        "name": f"user-{i:05d}",
        "score": 0.5 + i / 7,
        "active": i % 2 == 0,
        "tags": ["admin", "beta"],
        "seen": T0 + timedelta(seconds=i),
    }


def medium_value(i: int) -> dict[str, Any]:
    """An order of N_ITEMS line items: ~10 KB with the default codec."""
    items = [
        {
            "sku": f"SKU-{i:03d}-{j:04d}",
            "qty": j % 7 + 1,
            "price": 9.99 + j * 0.25,
            "title": " ".join(WORDS[(j + w) % len(WORDS)] for w in range(8)),
            "added": T0 + timedelta(minutes=j),
            "gift": j % 5 == 0,
            "discount": None if j % 3 else 0.1,
            "attrs": {"color": WORDS[j % 12], "size": j % 4, "tags": [WORDS[j % 12], "x"]},
        }
        for j in range(N_ITEMS)
    ]
    return {"id": 2_000_000 + i, "owner": small_value(i), "total": 1234.5 + i, "items": items}


def jsonable(v: Any) -> Any:
    """The json-compatible variant: every datetime as its ISO 8601 string."""
    if type(v) is dict:
        return {k: jsonable(x) for k, x in v.items()}
    if type(v) is list:
        return [jsonable(x) for x in v]
    if type(v) is datetime:
        return v.isoformat()
    return v


VALUES = {
    "small": [small_value(i) for i in range(N_VALUES["small"])],
    "medium": [medium_value(i) for i in range(N_VALUES["medium"])],
}
JSON_VALUES = {size: [jsonable(v) for v in vs] for size, vs in VALUES.items()}
KEYS = {size: list(range(len(vs))) for size, vs in VALUES.items()}  # indexes into the values
SIZES: dict[str, dict[str, int]] = {}  # size -> row name -> encoded bytes of value 0


def _same(x: Any) -> Any:
    return x


# -- the envelope round trip of TieredCache, with and without a secret ----------------------------


def _envelopes(size: str) -> list[tuple[Any, bytes]]:
    """(Envelope of the msgpack payload, encoded key) per value, as TieredCache builds them."""
    from tiercache.codec import MSGPACK as codec
    from tiercache.envelope import Envelope
    from tiercache.keys import encode_key

    return [
        (Envelope(1_700_000_000_000_000 + i, codec.id, codec.dumps(v)), encode_key(f"key:{i}"))
        for i, v in enumerate(VALUES[size])
    ]


def _envelope_codec(signed: bool) -> tuple[Callable[[Any], Any], Callable[[Any], bytes]]:
    """(pack, open): ``TieredCache._pack`` and the checks of ``TieredCache._decode`` that run
    before the codec (short keys, no compression), mirrored line for line."""
    from tiercache.envelope import FORMAT, HEADER, HEADER_SIZE, MAGIC
    from tiercache.signing import SIGNATURE_SIZE, Signer

    signer = Signer(SECRET, NAMESPACE) if signed else None

    def pack(item: tuple[Any, bytes]) -> tuple[bytes, bytes]:
        env, encoded = item
        if signer is None:
            return encoded, env.pack()
        placeholder = env._replace(signature=bytes(SIGNATURE_SIZE))
        header = placeholder.header()
        return encoded, header + signer.sign_envelope(encoded, header, env.payload) + env.payload

    def open_(stored: tuple[bytes, bytes]) -> bytes:
        encoded, raw = stored
        magic, fmt, _flags, _codec, sig, _version, _exp, _fresh, _load = HEADER.unpack_from(raw)
        if magic != MAGIC or fmt != FORMAT:
            raise ValueError("not a tiercache envelope")
        payload = raw[HEADER_SIZE + sig :]
        if signer is not None and (
            sig != SIGNATURE_SIZE
            or not signer.verify_envelope(
                encoded, raw[:HEADER_SIZE], payload, raw[HEADER_SIZE : HEADER_SIZE + sig]
            )
        ):
            raise ValueError("signature missing or wrong")
        return payload

    return pack, open_


# -- the rows -------------------------------------------------------------------------------------


def _codec_row(size: str, name: str, dumps: Any, loads: Any, values: list[Any]) -> Any:
    """``make`` of a codec row: checks every round trip, notes the encoded size."""

    def make(_: Any) -> tuple[Any, Any, list[Any]]:
        for v in values:
            assert loads(dumps(v)) == v, f"{name}: round trip changed the value"
        SIZES.setdefault(size, {})[name] = len(dumps(values[0]))
        return dumps, loads, values

    return make


def _ours_row(size: str, name: str, codec_name: str, values: list[Any]) -> Any:
    def make(tc: Any) -> tuple[Any, Any, list[Any]]:
        from tiercache.codec import resolve_codec

        codec = resolve_codec(codec_name)
        if codec_name == "json":
            from tiercache.codec import HAVE_ORJSON

            if not HAVE_ORJSON:
                raise ImportError("orjson is not installed (the json codec would use the stdlib)")
        return _codec_row(size, name, codec.dumps, codec.loads, values)(tc)

    return make


def _envelope_row(size: str, signed: bool) -> Any:
    def make(tc: Any) -> tuple[Any, Any, list[Any]]:
        pack, open_ = _envelope_codec(signed)
        items = _envelopes(size)
        for env, encoded in items:
            stored = pack((env, encoded))
            assert open_(stored) == env.payload
        if signed:  # a flipped payload bit, or the entry copied to another key, is refused
            enc, raw = pack(items[0])
            for bad in ((enc, raw[:-1] + bytes([raw[-1] ^ 1])), (items[1][1], raw)):
                with pytest.raises(ValueError):
                    open_(bad)
        return pack, open_, items

    return make


def _variants(size: str) -> list[Variant]:
    values, jvalues = VALUES[size], JSON_VALUES[size]
    std_pickle = functools.partial(pickle.dumps, protocol=5)
    return [
        Variant(LOOP, STMT, lambda _: (_same, _same, values)),
        Variant(STD_PICKLE, STMT, _codec_row(size, STD_PICKLE, std_pickle, pickle.loads, values)),
        Variant(STD_JSON, STMT, _codec_row(size, STD_JSON, json.dumps, json.loads, jvalues)),
        Variant(MSGPACK, STMT, _ours_row(size, MSGPACK, "msgpack", values), ours=True),
        Variant(OJSON, STMT, _ours_row(size, OJSON, "json", jvalues), ours=True),
        Variant(OPICKLE, STMT, _ours_row(size, OPICKLE, "pickle", values), ours=True),
        Variant(ENV_PLAIN, STMT, _envelope_row(size, signed=False), ours=True),
        Variant(ENV_SIGNED, STMT, _envelope_row(size, signed=True), ours=True),
    ]


VARIANTS = [(GROUPS[size], size, v) for size in GROUPS for v in _variants(size)]


# -- report ---------------------------------------------------------------------------------------


SHORT = {
    STD_PICKLE: "stdlib pickle",
    STD_JSON: "stdlib json",
    MSGPACK: "msgpack",
    OJSON: "json (orjson)",
    OPICKLE: "pickle",
}


def _footer(size: str) -> Callable[[dict[str, report.TimingRow], report.Group], list[str]]:
    """The encoded sizes and the signing overhead, under the group's table."""

    def footer(rows: dict[str, report.TimingRow], group: report.Group) -> list[str]:
        out = []
        sizes = SIZES.get(size, {})
        if sizes:
            out.append(
                "Encoded size of the first value: "
                + "; ".join(f"{SHORT[name]} {n:,} B" for name, n in sizes.items())
                + "."
            )
        plain, signed = rows.get(ENV_PLAIN), rows.get(ENV_SIGNED)
        if plain is None or signed is None:
            return out
        extra = signed.median_ns - plain.median_ns
        extra_min = signed.min_ns - plain.min_ns
        parts = []
        for name in CODEC_ROWS:
            net = report.net_ns(rows, group, name)
            row = rows.get(name)
            over = rows.get(LOOP)
            if net and row is not None and over is not None:
                net_min = row.min_ns - over.min_ns
                parts.append(f"{SHORT[name]} {extra / net:.2f} ({extra_min / net_min:.2f})")
        out.append(
            f"Signing overhead (`secret=`: HMAC-SHA256 sign on write, verify on read): "
            f"{extra:,.0f} ns per write+read ({extra_min:,.0f} ns from the mins): the signed "
            "envelope row minus the unsigned one. As a ratio to each codec's round trip (net ns; "
            "from the mins in brackets): " + "; ".join(parts) + "."
        )
        return out

    return footer


_TITLES = {
    "small": "Codec round trip `loads(dumps(v))`, small values (~100 B), ns/op",
    "medium": f"Codec round trip `loads(dumps(v))`, medium values (~10 KB, {N_ITEMS} items), ns/op",
}
_NOTE = (
    "Values: nested dict/list/str/int/float/bool/None with aware datetimes; the json rows "
    "encode the same values with ISO strings in place of datetimes (JSON has no datetime). "
    "Net ns = median minus the identity loop (the codec alone). Envelope rows: what "
    "TieredCache adds around the default codec without and with `secret=`; their difference "
    "is the signing overhead (footer)"
)

for _i, (_size, _key) in enumerate(GROUPS.items()):
    report.register_group(
        report.Group(
            key=_key,
            title=_TITLES[_size],
            order=25 + _i,
            note=_NOTE,
            overhead=LOOP,
            baselines=[("pickle", STD_PICKLE), ("json", STD_JSON)],
            footer=_footer(_size),
        )
    )


@pytest.mark.parametrize(
    ("group", "size", "v"), VARIANTS, ids=[f"{s}-{v.name}" for _, s, v in VARIANTS]
)
def test_codec(benchmark: Any, group: str, size: str, v: Variant) -> None:
    harness.run_variant(benchmark, group, v, KEYS[size])
