"""Name -> object registries (models, datasets, methods, losses).

A registry is a plain dict with a helpful lookup error, so every "unknown
name" message in the project lists what *is* available.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import SparseforgeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        key = name.lower()

        def _add(o: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = o
            return o

        return _add(obj) if obj is not None else _add

    def unregister(self, name: str) -> T:
        """Remove and return ``name`` (a test that registers a toy entry takes it out again)."""
        return self._items.pop(str(name).lower())

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SparseforgeError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        return sorted(self._items.items())


Factory = Callable[..., object]
