"""Test configuration: the real-server fixtures of tests/servers.py and tests/proxy.py.

Helpers are imported as ``tests.servers`` / ``tests.proxy`` whether or not ``tests`` has an
``__init__.py``: the repository root is put on ``sys.path`` here.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.cluster import cluster_with_replicas, sentinel_set, shared_cluster  # noqa: E402
from tests.proxy import proxy  # noqa: E402
from tests.servers import (  # noqa: E402
    redis_bloom_server,
    redis_client,
    redis_factory,
    redis_server,
    shared_redis,
)

__all__ = [
    "cluster_with_replicas",
    "proxy",
    "redis_bloom_server",
    "redis_client",
    "redis_factory",
    "redis_server",
    "sentinel_set",
    "shared_cluster",
    "shared_redis",
]
