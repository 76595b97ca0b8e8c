"""tiercache: a two-tier cache (in-process LRU/LFU/W-TinyLFU in front of Redis)."""

from .errors import CacheUnavailable, TiercacheError
from .local import EXTENSIONS, LFUCache, LocalCache, LRUCache, TinyLFUCache
from .tiered import TieredCache

__all__ = [
    "EXTENSIONS",
    "CacheUnavailable",
    "LFUCache",
    "LRUCache",
    "LocalCache",
    "TiercacheError",
    "TieredCache",
    "TinyLFUCache",
]
__version__ = "0.1.0.dev0"
