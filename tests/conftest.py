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

import pytest  # noqa: E402

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


IMPLS = ("sync", "async")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses the ``impl`` fixture against both drivers.

    ``@pytest.mark.sync_only(reason)`` keeps a test to TieredCache when the behaviour it checks
    has no asyncio counterpart (os.fork, the negative filter, the listener thread).
    """
    if "impl" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sync_only")
        metafunc.parametrize("impl", ["sync"] if only else list(IMPLS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The asyncio runs turn every warning into an error (ResourceWarning, unraisable...)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (callspec is not None and callspec.params.get("impl") == "async") or (
            item.get_closest_marker("aio") is not None
        ):
            item.add_marker(pytest.mark.filterwarnings("error"))
