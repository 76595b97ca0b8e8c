"""tiercache: a two-tier cache (in-process LRU/LFU/W-TinyLFU in front of Redis)."""

from .local import EXTENSIONS, LFUCache, LocalCache, LRUCache, TinyLFUCache

__all__ = ["EXTENSIONS", "LFUCache", "LRUCache", "LocalCache", "TinyLFUCache"]
__version__ = "0.1.0.dev0"
