"""Tags, namespace generations and sliding TTL: the data and the Redis calls, with no I/O.

Tags (group invalidation) are lazy tag versions, checked on read, as FusionCache does. Each tag
has, per partition, a Redis hash ``ns:{ns:p}:t:<tag>`` with ``i``, the version of its last
invalidation, ``t``, Redis' time of it, and ``w``, the highest version written with the tag. A
value stored with tags carries their names in its envelope (the EXT block below, covered by the
signature), and is valid while its version is above the ``i`` of every one of its tags (a tag
key that is missing although the value names it was lost, so the value is not trusted either).
Hence:

* ``invalidate_tag(t)`` is O(partitions), whatever the number of keys: one Lua script per
  partition sets ``i`` above both ``i`` and ``w`` (above every value written with the tag) and
  publishes a ``G`` message in the partition's numbered invalidation stream, in one atomic step.
  Old values stay in Redis until their TTL or the next write of their key, unread.
* A write with tags is refused by its Lua script when its version is not above every ``i``, and
  proposed again above it: a write that lands after an invalidation survives it, whatever the
  writer's clock. A fill (or background refresh) whose load began before an invalidation of one
  of its tags is refused, so a value read from the origin before the change is not stored; both
  moments are on Redis' clock (``t``, and the lease's or refresh marker's remaining TTL).
* A read from Redis compares the value's version with its tags' versions. Each process keeps the
  versions of the tags it has met (kept current by the ``G`` messages, trusted only while its
  invalidation channel is whole, forgotten with the local tier); the first read of a tag, or any
  read while the channel is not whole, fetches the tag versions in a second round trip.
* Local copies of tagged values are indexed by tag: a ``G`` message drops those older than the
  new tag version, under the same lock as local installs, which check the tag versions too.

Cost: per tagged write, one hash update per tag in the write's own script; per Redis read of a
tagged value, nothing more once its tags are known (else one pipelined round trip); per tag,
one small hash per partition, which lives as long as the longest-lived value with the tag; the
dead values of an invalidated tag keep their memory until their TTL. The alternative (a set of
keys per tag, unlinked in batches) costs O(keys) per invalidation and a set member per value.

Namespace generations. ``bump_namespace()`` raises ``ns:{ns:0}:gen`` and announces it (an ``N``
message) in one script: O(1). The generation is part of every value key's name (``v<gen>:``), so
the old entries are never read again and expire by their TTL. A process learns the generation
from the message, or by reading the key when its channel reports a gap or resync (and on every
read or write while the channel is not whole), and flushes its local tier when it changes.

Sliding TTL. A value stored with ``sliding=True`` has no expiry time in its envelope; its Redis
TTL is pushed back to the full TTL by a read from Redis (``touch.lua``, only if the entry still
holds the version read), at most once per interval per key per process. Local copies of sliding
values are served for at most that interval, so hot keys reach Redis (and extend) once per
interval per process, never on every read.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple

from .commands import Call, Commands, load_script_source

EXT = struct.Struct(">IIH")  # block length (after these 4 bytes), sliding TTL in ms, tag count
TAG_LEN = struct.Struct(">H")
MAX_TAG_BYTES = 1024
MAX_TAGS = 64

TagsArg = Iterable[str] | Callable[[Any, Any], Iterable[str] | None] | None
TtlArg = float | int | Callable[[Any, Any], float | None] | None


class Ext(NamedTuple):
    """A value's tags and sliding TTL, as its envelope carries them."""

    tags: tuple[str, ...] = ()
    sliding_ms: int = 0
    partition: int = 0  # the partition of the key (not stored: known from the key)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """How a value is stored (per call): its TTL, tags and sliding; None: the cache's default."""

    ttl: TtlArg = None
    tags: TagsArg = None
    sliding: bool | None = None


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """The tags as a sorted tuple without duplicates; ``TypeError``/``ValueError`` if unfit."""
    if isinstance(tags, str | bytes):
        raise TypeError("tags must be an iterable of str, not a single str")
    out = set()
    for tag in tags:
        if type(tag) is not str or not tag:
            raise TypeError(f"a tag must be a non-empty str, not {tag!r}")
        if len(tag.encode("utf-8", "surrogatepass")) > MAX_TAG_BYTES:
            raise ValueError(f"tag longer than {MAX_TAG_BYTES} bytes")
        out.add(tag)
    if len(out) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags per value")
    return tuple(sorted(out))


def pack_ext(ext: Ext) -> bytes:
    """The EXT block that starts the payload of a value with tags or a sliding TTL."""
    parts = []
    for tag in ext.tags:
        raw = tag.encode("utf-8", "surrogatepass")
        parts.append(TAG_LEN.pack(len(raw)) + raw)
    body = b"".join(parts)
    return EXT.pack(EXT.size - 4 + len(body), ext.sliding_ms, len(ext.tags)) + body


def split_ext(payload: bytes, partition: int = 0) -> tuple[Ext, bytes]:
    """(the EXT block, the rest of the payload); ``ValueError`` if the block is malformed."""
    if len(payload) < EXT.size:
        raise ValueError("truncated tags block")
    size, sliding_ms, count = EXT.unpack_from(payload)
    end = 4 + size
    if end > len(payload) or count > MAX_TAGS:
        raise ValueError("malformed tags block")
    tags = []
    pos = EXT.size
    for _ in range(count):
        if pos + 2 > end:
            raise ValueError("malformed tags block")
        (n,) = TAG_LEN.unpack_from(payload, pos)
        if pos + 2 + n > end:
            raise ValueError("malformed tags block")
        tags.append(payload[pos + 2 : pos + 2 + n].decode("utf-8", "surrogatepass"))
        pos += 2 + n
    if pos != end:
        raise ValueError("malformed tags block")
    return Ext(tuple(tags), sliding_ms, partition), payload[end:]


def tag_message_key(partition: int, tag: str) -> bytes:
    """The key field of a tag invalidation message: ``<partition>:<tag>``."""
    return b"%d:%s" % (partition, tag.encode("utf-8", "surrogatepass"))


def parse_tag_message_key(key: bytes) -> tuple[int, str]:
    """(partition, tag) of a tag invalidation message; ``ValueError`` if malformed."""
    head, sep, tag = key.partition(b":")
    if not sep or not head.isdigit() or not tag:
        raise ValueError("malformed tag message")
    return int(head), tag.decode("utf-8", "surrogatepass")


# -- Redis calls -------------------------------------------------------------------------------

TAG_SCRIPTS = {
    "write_tagged": ("tag_write", "write"),
    "fill_tagged": ("tag_fill", "fill"),
    "refresh_tagged": ("tag_fill", "refresh"),
    "touch": ("touch",),
}


def install_scripts(commands: Commands) -> None:
    """Add this module's scripts (preludes joined to the scripts they guard) to ``commands``."""
    import hashlib

    for name, parts in TAG_SCRIPTS.items():
        if name in commands.sources:
            continue
        source = "\n".join(load_script_source(part) for part in parts)
        commands.sources[name] = source
        commands.shas[name] = hashlib.sha1(source.encode("utf-8")).hexdigest()


def tag_keys(commands: Commands, ext: Ext) -> tuple[bytes, ...]:
    """The tag keys of a value's tags, in its partition."""
    keys = commands.keys
    return tuple(keys.tag(ext.partition, t.encode("utf-8", "surrogatepass")) for t in ext.tags)


def tagged_write(call: Call, tkeys: tuple[bytes, ...]) -> Call:
    """``commands.write`` of a set with tags: refused below the tags' invalidation versions."""
    return call._replace(script="write_tagged", keys=call.keys + tkeys)


def tagged_fill(
    call: Call, tkeys: tuple[bytes, ...], ttl_ms: int, version: int, lease_ms: int
) -> Call:
    """``commands.fill`` or ``commands.refresh`` of a value with tags (see tag_fill.lua).

    The load began when its lease (a fill) or refresh marker (a refresh), set for ``lease_ms``,
    was taken: the script reads that moment off the key's remaining TTL, on Redis' clock.
    """
    fill = call.script == "fill"
    script = "fill_tagged" if fill else "refresh_tagged"
    args = (*call.args, ttl_ms, version, lease_ms, 1 if fill else 2, len(tkeys))
    return call._replace(script=script, args=args, keys=call.keys + tkeys)


def _announce(
    commands: Commands,
    op: str,
    partition: int,
    target: bytes,
    version: int,
    origin: str,
    key: bytes,
    sig: str,
    min_ttl_ms: int,
) -> Call:
    call = commands.announce_clear(partition, version, origin, b"", sig)
    args = list(call.args)
    args[0], args[7] = op, key
    args.append(min_ttl_ms)
    return call._replace(script="write_tagged", args=tuple(args), keys=(*call.keys, target))


def bump_tag(
    commands: Commands,
    partition: int,
    tag: str,
    version: int,
    origin: str,
    sig: str,
    min_ttl_ms: int,
) -> Call:
    """Invalidate ``tag`` in a partition at ``version`` (or learn the floor to propose above)."""
    tkey = commands.keys.tag(partition, tag.encode("utf-8", "surrogatepass"))
    key = tag_message_key(partition, tag)
    return _announce(commands, "G", partition, tkey, version, origin, key, sig, min_ttl_ms)


def bump_generation(commands: Commands, generation: int, origin: str, sig: str) -> Call:
    """Make ``generation`` the namespace's (or learn the current one to propose above)."""
    gkey = commands.keys.generation_key()
    return _announce(commands, "N", 0, gkey, generation, origin, b"%d" % generation, sig, 0)


def _int_or_none(reply: Any) -> int | None:
    return None if reply is None else int(reply)


def tag_version(commands: Commands, partition: int, tag: str) -> Call:
    """The invalidation version of a tag in a partition (None: the tag key does not exist)."""
    tkey = commands.keys.tag(partition, tag.encode("utf-8", "surrogatepass"))
    return Call(None, ("HGET", tkey, "i"), parse=_int_or_none)


def generation(commands: Commands) -> Call:
    """The namespace generation (0 if never bumped)."""
    return Call(None, ("GET", commands.keys.generation_key()), parse=lambda r: int(r or 0))


def touch(commands: Commands, entry: bytes, ext: Ext, version: int) -> Call:
    """Extend an entry's TTL to its sliding TTL if it still holds ``version``."""
    keys = (entry, *tag_keys(commands, ext))
    return Call("touch", (version, ext.sliding_ms), keys, lambda r: int(r) == 1)


# -- per-process state ---------------------------------------------------------------------------


class TagState:
    """The tag versions this process knows, and which local copies carry which tag.

    Not thread-safe: callers hold the cache's FillGuard lock.
    """

    def __init__(self, max_tags: int = 65_536, max_entries: int = 100_000) -> None:
        self.gen = 0  # bumped when everything is forgotten: a fetch begun before may not teach
        self._max_tags = max_tags
        self._max_entries = max_entries
        self._known: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._by_tag: dict[tuple[int, str], set[Hashable]] = {}
        self._entries: dict[Hashable, tuple[Any, Hashable, int, tuple[tuple[int, str], ...]]] = {}

    def known(self, partition: int, tag: str) -> int | None:
        """The tag's invalidation version as known here, or None."""
        return self._known.get((partition, tag))

    def learn(self, partition: int, tag: str, version: int, gen: int) -> None:
        """Note a version fetched from Redis by a read that began at generation ``gen``."""
        if gen != self.gen:
            return
        key = (partition, tag)
        if version > self._known.get(key, -1):
            self._known[key] = version
        self._known.move_to_end(key)
        if len(self._known) > self._max_tags:
            self._known.popitem(last=False)

    def forget(self, partition: int, tag: str) -> None:
        """Stop trusting what is known of a tag (the next read fetches it)."""
        self._known.pop((partition, tag), None)

    def bump(self, partition: int, tag: str, version: int | None) -> int:
        """A tag was invalidated at ``version`` (None: unknown): drop its local copies, then note
        the version, so that whoever sees the version known finds the copies gone. Returns how
        many were dropped. The caller holds the lock that local installs take."""
        key = (partition, tag)
        drop = []
        keep = set()
        for guard in self._by_tag.pop(key, ()):
            record = self._entries.get(guard)
            if record is None:
                continue
            l1, lkey, entry_version, _ = record
            if version is None or entry_version <= version:
                self._entries.pop(guard, None)
                drop.append((l1, lkey))
            else:
                keep.add(guard)
        if keep:
            self._by_tag[key] = keep
        for l1, lkey in drop:
            l1.pop(lkey, None)
        if version is None:
            self._known.pop(key, None)
        else:
            self._known[key] = max(version, self._known.get(key, -1))
            self._known.move_to_end(key)
            if len(self._known) > self._max_tags:
                self._known.popitem(last=False)
        return len(drop)

    def admit(self, partition: int, tags: tuple[str, ...], version: int) -> bool:
        """Whether a value of ``version`` with ``tags`` may enter the local tier."""
        for tag in tags:
            known = self._known.get((partition, tag))
            if known is None or known >= version:
                return False
        return True

    def index(
        self,
        guard: Hashable,
        l1: Any,
        lkey: Hashable,
        version: int,
        partition: int,
        tags: tuple[str, ...],
    ) -> None:
        """Remember that the local copy ``l1[lkey]`` (``version``) carries ``tags``."""
        self.unindex(guard)
        keys = tuple((partition, t) for t in tags)
        self._entries[guard] = (l1, lkey, version, keys)
        for key in keys:
            self._by_tag.setdefault(key, set()).add(guard)
        if len(self._entries) > self._max_entries:
            self._prune()

    def unindex(self, guard: Hashable) -> None:
        """Forget the tags of a local copy (replaced or dropped)."""
        record = self._entries.pop(guard, None)
        if record is None:
            return
        for key in record[3]:
            members = self._by_tag.get(key)
            if members is not None:
                members.discard(guard)
                if not members:
                    del self._by_tag[key]

    def _prune(self) -> None:
        """Drop the records of local copies that are gone (evicted, replaced)."""
        for guard, (l1, lkey, version, _) in list(self._entries.items()):
            entry = l1.entry(lkey)
            if entry is None or entry.version != version:
                self.unindex(guard)

    def forget_all(self) -> None:
        """The local tier was flushed: forget every tag version and every record."""
        self.gen += 1
        self._known.clear()
        self._by_tag.clear()
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
