"""Values and items views of a LocalCache that read entries without counting uses or hits."""

from __future__ import annotations

from collections.abc import Hashable, ItemsView, Iterator, ValuesView
from typing import Any


class LocalValuesView(ValuesView):
    """Values of the live entries."""

    def __iter__(self) -> Iterator[Any]:
        for e in self._mapping._live_entries():  # type: ignore[attr-defined]
            yield e.value

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self)


class LocalItemsView(ItemsView):
    """``(key, value)`` pairs of the live entries."""

    def __iter__(self) -> Iterator[tuple[Hashable, Any]]:
        for e in self._mapping._live_entries():  # type: ignore[attr-defined]
            yield e.key, e.value

    def __contains__(self, item: object) -> bool:
        key, value = item  # type: ignore[misc]
        e = self._mapping.entry(key)  # type: ignore[attr-defined]
        return e is not None and (e.value is value or e.value == value)
