"""Test configuration: the real-server fixtures of tests/servers.py and tests/proxy.py.

Helpers are imported as ``tests.servers`` / ``tests.proxy`` whether or not ``tests`` has an
``__init__.py``: the repository root is put on ``sys.path`` here.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Generator
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


# A last resort against a hang in C that no signal reaches (a deadlock holding the GIL, such as
# CPython gh-106883): a minute past the test's pytest-timeout limit, faulthandler's own thread,
# which needs no GIL, prints every thread's stack (to stderr: seen with -s) and ends the process;
# pytest-xdist reports the worker's crash and goes on, so the suite fails instead of hanging.
_LAST_RESORT_GRACE_S = float(os.environ.get("TIERCACHE_TEST_HANG_GRACE", "60"))


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:  # (ValueError: pytest-timeout is not loaded, so its option and ini key are unknown)
        value = item.config.getoption("timeout", None) or item.config.getini("timeout")
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    limit = _timeout_of(item)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + _LAST_RESORT_GRACE_S, exit=True)
    try:
        return (yield)
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()
