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


def _drop(target: Any, key: Callable[..., Any] | None, args: Any, kwargs: Any) -> None:
    if hasattr(target, "write_around"):  # a TieredCache
        target.write_around(key(*args, **kwargs) if key is not None else args[0])
        return
    call = key(*args, **kwargs) if key is not None else args  # a cached function
    if (
        isinstance(call, tuple)
        and len(call) == 2
        and isinstance(call[0], tuple)
        and isinstance(call[1], dict)
    ):
        target.invalidate(*call[0], **call[1])
    else:
        target.invalidate(*(call if isinstance(call, tuple) else (call,)))


def write_around(target: Any, *, key: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Decorate an origin writer so that what it wrote is invalidated in every process."""

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                finally:
                    _drop(target, key, args, kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                _drop(target, key, args, kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
