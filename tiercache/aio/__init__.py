"""tiercache for asyncio: AsyncTieredCache over redis.asyncio (see tiercache.aio.tiered)."""

from .tiered import AsyncTieredCache

__all__ = ["AsyncTieredCache"]
