"""The MISSING sentinel: "the origin has no such key" (a loader may return it)."""

from __future__ import annotations

from typing import Final


class _Missing:
    """The type of MISSING; its one instance is falsy and prints as ``tiercache.MISSING``."""

    __slots__ = ()
    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "tiercache.MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
