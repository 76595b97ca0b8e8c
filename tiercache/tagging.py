"""Tags, namespace generations, sliding and adaptive TTL: the caches' methods.

The design, the guarantees and their cost are in tiercache.tags (the data and the Redis calls,
no I/O) and docs/invalidation-strategies.md. ``TagCore`` holds every decision (no I/O) and is
part of tiercache.core's ``CacheCore``, shared by both caches; ``TaggingMixin`` adds the round
trips of ``TieredCache`` (tiercache.tiered), and tiercache.aio.tagging the awaited ones of
``AsyncTieredCache``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import redis as redis_lib

from . import tags as tagmod
from ._sentinel import MISSING
from .commands import Call
from .envelope import FLAG_ABSENT, FLAG_EXT, Envelope
from .errors import CacheUnavailable
from .keys import KeySpace, decode_key
from .protocol import OP_NAMESPACE, OP_TAG, FillGuard, VersionClock
from .tags import Ext, Policy, TagsArg, TagState

_SECONDS = (type(None), int, float)  # a plain TTL: no callable, no tags.Policy

# Tagged writes and tag invalidations that overtake each other retry this many more times, each
# proposing further ahead (TAG_STEP_US, 4x, ... up to 1 s): a stream of the other kind cannot
# starve them.
TAG_STEP_US = 2000
TAG_ATTEMPTS = 4


def _user_key(encoded: bytes) -> Any:
    try:
        return decode_key(encoded)
    except ValueError:
        return encoded


class TagCore:
    """Tags, namespace generations and sliding / adaptive TTL: the decisions (no I/O)."""

    # What the cache provides.
    _keys: KeySpace
    _driver: Any
    _clock: VersionClock
    _guard: FillGuard
    _l1: Any
    _counters: Any
    _origin: str
    _lease_ms: int
    _ttl: Any
    _negative_ttl: float
    _refresher: Any
    _local_usable: bool
    _sign_message: Callable[[bytes, int, str], str]
    _forget_local: Callable[..., None]
    _envelope: Callable[..., Envelope]
    _check_generation: Callable[[], Any]

    def _tagging_init(self, tags: TagsArg, sliding: bool, sliding_interval: float | None) -> None:
        """Set up the state of this mixin (from the cache's constructor)."""
        if sliding_interval is not None and not sliding_interval > 0:
            raise ValueError("sliding_interval must be > 0 or None")
        self._default_tags = tags
        self._sliding = sliding
        self._sliding_interval = sliding_interval
        self._tags = TagState()
        self._touched: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._touch_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._gen_check_failed = -1e9  # when a generation check last failed (monotonic)

    def _tagged_envelope(
        self,
        payload: bytes,
        flags: int,
        ttl: Any,
        version: int,
        load_ms: float,
        encoded: bytes,
        value: Any,
    ) -> Envelope:
        """An envelope with the TTL, tags and sliding TTL that ``ttl`` resolves to."""
        plain = not (self._default_tags or self._sliding or flags & FLAG_ABSENT)
        if plain and type(ttl) in _SECONDS:  # what _resolve would give, without the calls
            return self._envelope(payload, ttl, version, load_ms, flags)
        seconds, tags, sliding = self._resolve(ttl, encoded, value)
        if flags & FLAG_ABSENT:
            seconds, sliding = self._negative_ttl, False
        env = self._envelope(payload, None if sliding else seconds, version, load_ms, flags)
        if not tags and not sliding:
            return env
        ext = Ext(tags, int(seconds * 1000) if sliding and seconds else 0)
        return env._replace(payload=tagmod.pack_ext(ext) + env.payload, flags=env.flags | FLAG_EXT)

    def _resolve(
        self, ttl: Any, encoded: bytes, value: Any
    ) -> tuple[float | None, tuple[str, ...], bool]:
        """(TTL in seconds, tags, sliding) of a value, from a per-call setting and the defaults."""
        tags: Any = self._default_tags
        sliding: Any = self._sliding
        if isinstance(ttl, Policy):
            tags = tags if ttl.tags is None else ttl.tags
            sliding = sliding if ttl.sliding is None else ttl.sliding
            ttl = self._ttl if ttl.ttl is None else ttl.ttl
        if callable(ttl) or callable(tags):
            key = _user_key(encoded)
            if callable(ttl):
                ttl = None if value is MISSING else ttl(key, value)
                if ttl is not None and not ttl > 0:
                    raise ValueError(f"the ttl callable returned {ttl!r}: it must be > 0 or None")
            if callable(tags):
                tags = None if value is MISSING else tags(key, value)
        checked = tagmod.check_tags(tags) if tags else ()
        return ttl, checked, bool(sliding and ttl)

    def _ext_of(self, env: Envelope, encoded: bytes) -> Ext | None:
        """The tags / sliding block of an envelope to store, or None."""
        if not env.flags & FLAG_EXT:
            return None
        return tagmod.split_ext(env.payload, self._keys.partition(encoded))[0]

    def _tag_invalidated(self, key: bytes, version: int | None) -> None:
        """A tag was invalidated at ``version`` (None: not believed): drop its local copies."""
        try:
            partition, tag = tagmod.parse_tag_message_key(key)
        except ValueError:
            return
        with self._guard.lock:
            self._tags.bump(partition, tag, version)

    def _tags_verdict(self, version: int, ext: Ext) -> tuple[bool, list[str], int]:
        """(False if a known tag invalidates ``version``, the tags to fetch, the tag state's
        generation to learn them under): the part of ``_tags_valid`` that needs no Redis."""
        trusted = self._local_usable  # tag versions known here are kept current by the channel
        gen = self._tags.gen
        unknown = []
        for tag in ext.tags:
            known = self._tags.known(ext.partition, tag) if trusted else None
            if known is None:
                unknown.append(tag)
            elif known >= version:
                return False, [], gen
        return True, unknown, gen

    def _tag_fetches(self, ext: Ext, unknown: list[str]) -> list[Call]:
        """The calls that read the versions of ``unknown`` tags of ``ext``."""
        cmds = self._driver.commands
        return [tagmod.tag_version(cmds, ext.partition, t) for t in unknown]

    def _tags_fetched(
        self, version: int, ext: Ext, unknown: list[str], replies: list[Any], gen: int
    ) -> bool:
        """Whether ``version`` is valid for the fetched tag versions (learned when trusted)."""
        trusted = self._local_usable
        valid = True
        for tag, inv in zip(unknown, replies, strict=True):
            if inv is None or isinstance(inv, Exception):
                return False  # the tag key is lost: the value cannot be vouched for
            if trusted:
                with self._guard.lock:
                    self._tags.learn(ext.partition, tag, inv, gen)
            if inv >= version:
                valid = False
        return valid

    def _tag_bump_call(self, partition: int, tag: str, floor: int) -> tuple[Call, int, bytes]:
        """(the call, its version, the message key) of one try of a tag's invalidation."""
        version = self._clock.next(after=floor)
        key = tagmod.tag_message_key(partition, tag)
        sig = self._sign_message(key, version, OP_TAG)
        call = tagmod.bump_tag(
            self._driver.commands,
            partition,
            tag,
            version,
            self._origin,
            sig,
            max(self._lease_ms * 2, 60_000),
        )
        return call, version, key

    def _tag_bump_refused(self, result: Any, attempt: int) -> int:
        """A newer version holds the tag: the floor to propose above next."""
        self._clock.observe(result.version)
        return int(result.version) + min(TAG_STEP_US << (2 * attempt), 1_000_000)

    def _tag_bump_failed(self, tag: str, err: Exception) -> CacheUnavailable:
        """The outcome of a tag invalidation is unknown: no local copy with the tag stays."""
        with self._guard.lock:
            for partition in range(self._keys.partitions):
                self._tags.bump(partition, tag, None)
        return CacheUnavailable(f"Redis tag invalidation of {tag!r} failed: {err}")

    def _generation_bump_call(self, floor: int) -> tuple[Call, int]:
        """(the call, its generation) of one try of a namespace bump."""
        generation = self._clock.next(after=floor)
        sig = self._sign_message(b"%d" % generation, generation, OP_NAMESPACE)
        return tagmod.bump_generation(
            self._driver.commands, generation, self._origin, sig
        ), generation

    def _generation_check_due(self) -> bool:
        """Whether to read the generation now (not within a second of a failed read)."""
        return time.monotonic() - self._gen_check_failed >= 1.0

    def _generation_check_failed(self) -> None:
        self._gen_check_failed = time.monotonic()

    def _generation_call(self) -> Call:
        return tagmod.generation(self._driver.commands)

    @property
    def generation(self) -> int:
        """The namespace generation this process uses (0: never bumped)."""
        return self._keys.generation

    def _generation_seen(self, generation: int | None) -> None:
        """An N message: move to ``generation`` (None: not believed, ask Redis)."""
        if generation is not None:
            self._adopt_generation(generation)
            return
        self._forget_local()
        self._refresher.submit(("generation",), self._check_generation)

    def _adopt_generation(self, generation: int, force: bool = False) -> None:
        """Use ``generation`` from now on (only a newer one unless ``force``: after data loss)."""
        with self._gen_lock:
            current = self._keys.generation
            if generation == current or (generation < current and not force):
                return
            keys = self._keys.with_generation(generation)
            self._keys = keys
            self._driver.keys = keys
            self._driver.commands.keys = keys
        self._forget_local()

    def _slide_interval(self, ext: Ext) -> float:
        """How often (seconds) a sliding value's TTL is extended by this process, at most."""
        full = ext.sliding_ms / 1000.0
        interval = self._sliding_interval
        return full / 4.0 if interval is None else min(interval, full)

    def _slid(self, encoded: bytes, ext: Ext | None) -> None:
        """Note that ``encoded``'s TTL was just set in full (a write or fill)."""
        if ext is not None and ext.sliding_ms:
            with self._touch_lock:
                self._touched[encoded] = self._l1.timer()
                self._touched.move_to_end(encoded)

    def _slide_call(self, encoded: bytes, version: int, ext: Ext) -> Call | None:
        """The call extending a sliding value's TTL on a read, or None if done within the
        interval (by this process)."""
        now = self._l1.timer()
        with self._touch_lock:
            last = self._touched.get(encoded)
            if last is not None and now - last < self._slide_interval(ext):
                return None
            self._touched[encoded] = now
            self._touched.move_to_end(encoded)
            if len(self._touched) > 65_536:
                self._touched.popitem(last=False)
        return tagmod.touch(self._driver.commands, self._keys.value(encoded), ext, version)


class TaggingMixin(TagCore):
    """TieredCache's round trips for tags and namespace generations (the decisions: TagCore)."""

    _ensure_listener: Callable[[], None]

    def invalidate_tag(self, tag: str) -> None:
        """Invalidate every value stored with ``tag``, in Redis and in every process' local tier.

        O(partitions) whatever the number of keys: the tag's version is raised above every
        version written with it, and a write that lands afterwards is numbered above it.
        """
        (tag,) = tagmod.check_tags((tag,))
        self._ensure_listener()
        floor = 0
        try:
            for partition in range(self._keys.partitions):
                for attempt in range(TAG_ATTEMPTS + 3):
                    call, version, key = self._tag_bump_call(partition, tag, floor)
                    result = self._driver.call(call)
                    if result.applied:
                        break
                    floor = self._tag_bump_refused(result, attempt)
                else:
                    raise redis_lib.ResponseError("concurrent writers kept overtaking this one")
                self._tag_invalidated(key, version)  # here at once, before the echo arrives
        except redis_lib.RedisError as err:
            raise self._tag_bump_failed(tag, err) from err

    def _tags_valid(self, version: int, ext: Ext) -> bool:
        """Whether a value of ``version`` read from Redis is still valid for all its tags."""
        valid, unknown, gen = self._tags_verdict(version, ext)
        if not valid or not unknown:
            return valid
        try:
            replies = self._driver.call_many(self._tag_fetches(ext, unknown))
        except redis_lib.RedisError:
            return False
        return self._tags_fetched(version, ext, unknown, replies, gen)

    def bump_namespace(self) -> int:
        """Invalidate the whole namespace in O(1): a new generation, in every key's name.

        Every process moves to it (its invalidation message, or a read of the generation on a
        resync); the entries of older generations are never read again and expire by TTL.
        Returns the new generation.
        """
        self._ensure_listener()
        floor = self._keys.generation
        try:
            for _ in range(TAG_ATTEMPTS + 3):
                call, generation = self._generation_bump_call(floor)
                result = self._driver.call(call)
                if result.applied:
                    break
                floor = result.version
                self._clock.observe(floor)
            else:
                raise redis_lib.ResponseError("concurrent bumps kept overtaking this one")
        except redis_lib.RedisError as err:
            self._forget_local()
            raise CacheUnavailable(f"Redis namespace bump failed: {err}") from err
        self._adopt_generation(generation)
        return generation

    def _check_generation(self) -> None:
        """Read the generation from Redis (while the channel is not whole, or when in doubt).

        If Redis fails, the call that follows meets the failure on its own fault path; the
        check is not retried for a second, so a Redis outage does not double every timeout.
        """
        if not self._generation_check_due():
            return
        try:
            self._reload_generation(force=False)
        except redis_lib.RedisError:
            self._generation_check_failed()

    def _reload_generation(self, force: bool) -> None:
        self._adopt_generation(self._driver.call(self._generation_call()), force)

    def _slide(self, encoded: bytes, version: int, ext: Ext) -> None:
        """A read of a sliding value: extend its Redis TTL, unless done within the interval."""
        call = self._slide_call(encoded, version, ext)
        if call is None:
            return
        try:
            if self._driver.call(call):
                self._counters.add("slides")
        except redis_lib.RedisError:
            pass  # the TTL runs on; the next read after the interval tries again
