"""Write-around as a decorator: the decorated function writes the origin, the cache invalidates.

``@write_around(cache, key=lambda user_id, data: ("user", user_id))`` on a function that updates
the origin drops that key everywhere (``TieredCache.write_around``: a versioned tombstone, published
to every process) once the function returns, and also when it raises, since the origin may then
hold either value. Given a ``@tiered_cache`` function instead of a cache, ``key`` returns the
arguments of that function's call to drop (a tuple of positional arguments, or an
``(args, kwargs)`` pair); by default the decorated function's own positional arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _drop(target: Any, key: Callable[..., Any] | None, args: Any, kwargs: Any) -> Any:
    """Invalidate what the call wrote; an awaitable when the target is asynchronous."""
    if hasattr(target, "write_around"):  # a TieredCache or an AsyncTieredCache
        return target.write_around(key(*args, **kwargs) if key is not None else args[0])
    call = key(*args, **kwargs) if key is not None else args  # a cached function
    if (
        isinstance(call, tuple)
        and len(call) == 2
        and isinstance(call[0], tuple)
        and isinstance(call[1], dict)
    ):
        return target.invalidate(*call[0], **call[1])
    return target.invalidate(*(call if isinstance(call, tuple) else (call,)))


def write_around(target: Any, *, key: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Decorate an origin writer so that what it wrote is invalidated in every process."""

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                finally:
                    dropped = _drop(target, key, args, kwargs)
                    if inspect.isawaitable(dropped):  # an AsyncTieredCache (or its function)
                        await dropped

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                dropped = _drop(target, key, args, kwargs)
                if inspect.iscoroutine(dropped):
                    dropped.close()
                    raise TypeError(
                        "write_around on an AsyncTieredCache (or a function it caches) needs an "
                        "async def writer"
                    )

        return wrapper  # type: ignore[return-value]

    return decorate
