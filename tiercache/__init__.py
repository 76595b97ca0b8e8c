"""tiercache: a two-tier cache (in-process LRU/LFU/W-TinyLFU in front of Redis)."""

from ._sentinel import MISSING
from .aio import AsyncTieredCache
from .bloom import BloomConfig
from .decorator import CacheInfo, tiered_cache
from .errors import CacheUnavailable, TiercacheError
from .local import EXTENSIONS, LFUCache, LocalCache, LRUCache, TinyLFUCache
from .tiered import TieredCache
from .warm import WarmResult
from .writearound import write_around
from .writebehind import WriteBehind, WriteBehindItem

__all__ = [
    "EXTENSIONS",
    "MISSING",
    "AsyncTieredCache",
    "BloomConfig",
    "CacheInfo",
    "CacheUnavailable",
    "LFUCache",
    "LRUCache",
    "LocalCache",
    "TiercacheError",
    "TieredCache",
    "TinyLFUCache",
    "WarmResult",
    "WriteBehind",
    "WriteBehindItem",
    "tiered_cache",
    "write_around",
]
__version__ = "0.1.0.dev0"
