"""The in-process tier: the Cython build when present, else its pure-Python twin.

``TIERCACHE_NO_EXTENSIONS=1`` selects the twin; ``TIERCACHE_REQUIRE_EXTENSIONS=1`` makes a missing
build an ImportError instead of a silent fallback (the test suite uses it).
"""

from __future__ import annotations

import os

if os.environ.get("TIERCACHE_NO_EXTENSIONS"):
    from ._local_py import (
        CallFront,
        Entry,
        LFUCache,
        LocalCache,
        LRUCache,
        TieredFront,
        TinyLFUCache,
        install_fast_call,
    )

    EXTENSIONS = False
else:
    try:
        from ._local import (
            CallFront,
            Entry,
            LFUCache,
            LocalCache,
            LRUCache,
            TieredFront,
            TinyLFUCache,
            install_fast_call,
        )

        EXTENSIONS = True
    except ImportError:
        if os.environ.get("TIERCACHE_REQUIRE_EXTENSIONS"):
            raise
        from ._local_py import (
            CallFront,
            Entry,
            LFUCache,
            LocalCache,
            LRUCache,
            TieredFront,
            TinyLFUCache,
            install_fast_call,
        )

        EXTENSIONS = False

__all__ = [
    "EXTENSIONS",
    "CallFront",
    "Entry",
    "LFUCache",
    "LRUCache",
    "LocalCache",
    "TieredFront",
    "TinyLFUCache",
    "install_fast_call",
]
