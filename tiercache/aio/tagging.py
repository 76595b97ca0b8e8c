"""AsyncTieredCache's round trips for tags, namespace generations and sliding TTL.

The twin of tiercache.tagging.TaggingMixin: every decision is ``TagCore``'s (shared with
TieredCache, through tiercache.core); this module only awaits the Redis calls around them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis as redis_lib

from .. import tags as tagmod
from ..core import _REJECTED, _Hit
from ..errors import CacheUnavailable
from ..tagging import TAG_ATTEMPTS, TagCore
from ..tags import Ext


class AsyncTaggingMixin(TagCore):
    """``invalidate_tag``, ``bump_namespace`` and the tag / generation checks, awaited."""

    _ensure_listener: Callable[[], None]

    async def invalidate_tag(self, tag: str) -> None:
        """Invalidate every value stored with ``tag``, in Redis and in every process' local tier.

        As TieredCache.invalidate_tag: O(partitions) whatever the number of keys.
        """
        (tag,) = tagmod.check_tags((tag,))
        self._ensure_listener()
        floor = 0
        try:
            for partition in range(self._keys.partitions):
                for attempt in range(TAG_ATTEMPTS + 3):
                    call, version, key = self._tag_bump_call(partition, tag, floor)
                    result = await self._driver.call(call)
                    if result.applied:
                        break
                    floor = self._tag_bump_refused(result, attempt)
                else:
                    raise redis_lib.ResponseError("concurrent writers kept overtaking this one")
                self._tag_invalidated(key, version)  # here at once, before the echo arrives
        except redis_lib.RedisError as err:
            raise self._tag_bump_failed(tag, err) from err

    async def _tags_valid(self, version: int, ext: Ext) -> bool:
        """Whether a value of ``version`` read from Redis is still valid for all its tags."""
        valid, unknown, gen = self._tags_verdict(version, ext)
        if not valid or not unknown:
            return valid
        try:
            replies = await self._driver.call_many(self._tag_fetches(ext, unknown))
        except redis_lib.RedisError:
            return False
        return self._tags_fetched(version, ext, unknown, replies, gen)

    async def _vet(self, hit: Any, encoded: bytes) -> Any:
        """A hit of ``CacheCore._decode`` checked against its tags' versions in Redis when they
        are not all known here (None: invalidated), a sliding value's TTL extended."""
        if hit is None or hit is _REJECTED or hit[6] is None:
            return hit
        found: _Hit = hit
        version, ext = found[0], found[6]
        assert ext is not None
        if ext.tags and not await self._tags_valid(version, ext):
            return None  # invalidated by one of its tags
        if ext.sliding_ms:
            await self._slide(encoded, version, ext)
        return found

    async def bump_namespace(self) -> int:
        """Invalidate the whole namespace in O(1): a new generation, in every key's name.

        As TieredCache.bump_namespace; returns the new generation.
        """
        self._ensure_listener()
        floor = self._keys.generation
        try:
            for _ in range(TAG_ATTEMPTS + 3):
                call, generation = self._generation_bump_call(floor)
                result = await self._driver.call(call)
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

    async def _check_generation(self) -> None:
        """Read the generation from Redis (while the channel is not whole, or when in doubt)."""
        if not self._generation_check_due():
            return
        try:
            await self._reload_generation(force=False)
        except redis_lib.RedisError:
            self._generation_check_failed()

    async def _reload_generation(self, force: bool) -> None:
        self._adopt_generation(await self._driver.call(self._generation_call()), force)

    async def _slide(self, encoded: bytes, version: int, ext: Ext) -> None:
        """A read of a sliding value: extend its Redis TTL, unless done within the interval."""
        call = self._slide_call(encoded, version, ext)
        if call is None:
            return
        try:
            if await self._driver.call(call):
                self._counters.add("slides")
        except redis_lib.RedisError:
            pass  # the TTL runs on; the next read after the interval tries again
