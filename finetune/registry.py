"""Registries in the Keras ``get(identifier)`` style, open to other packages.

A registry maps names to factories. ``get`` accepts a name, a mapping
``{"name": ..., **kwargs}`` or an already built object. Other packages add
entries through the entry-point group ``finetune.<kind>`` (loaded lazily, on
the first lookup of a name the registry does not know).
"""

from __future__ import annotations

import difflib
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from finetune.errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one kind (optimizers, backbones, ...)."""

    def __init__(self, kind: str, instance_type: type | tuple[type, ...] | None = None):
        self.kind = kind
        self.entry_point_group = f"finetune.{kind}"
        self._instance_type = instance_type
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str, entry: T | None = None):
        """Register ``entry`` under ``name``; usable as a decorator."""

        def add(item: T) -> T:
            key = _normalize(name)
            if key in self._entries:
                raise ValueError(f"{self.kind}: {name!r} is already registered")
            self._entries[key] = item
            return item

        return add(entry) if entry is not None else add

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return self.lookup(name, missing_ok=True) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def lookup(self, name: str, missing_ok: bool = False) -> T | None:
        """The registered entry for ``name``; unknown names raise RecipeError."""
        key = _normalize(name)
        if key not in self._entries:
            self._load_entry_points()
        if key in self._entries:
            return self._entries[key]
        if missing_ok:
            return None
        raise RecipeError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(_normalize(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind[:-1] if self.kind.endswith('s') else self.kind} {name!r}{hint}; known: {', '.join(known)}"

    def get(self, identifier: Any, **defaults: Any) -> Any:
        """Build an object from a name, a ``{name: ..., **kwargs}`` mapping or an object."""
        if self._instance_type is not None and isinstance(identifier, self._instance_type):
            return identifier
        if isinstance(identifier, str):
            name, kwargs = identifier, {}
        elif isinstance(identifier, Mapping):
            kwargs = dict(identifier)
            name = kwargs.pop("name", None)
            if not isinstance(name, str):
                raise RecipeError(f"a {self.kind} entry needs a 'name' key, got {dict(identifier)!r}")
        elif callable(identifier) and self._instance_type is None:
            return identifier
        else:
            raise RecipeError(f"cannot interpret {identifier!r} as one of the {self.kind}")
        factory = self.lookup(name)
        try:
            return factory(**{**defaults, **kwargs})
        except TypeError as error:
            raise RecipeError(f"{self.kind} {name!r}: {error}") from None

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in metadata.entry_points(group=self.entry_point_group):
            key = _normalize(entry_point.name)
            if key not in self._entries:
                self._entries[key] = _LazyEntryPoint(entry_point)  # type: ignore[assignment]


class _LazyEntryPoint:
    """Imports an entry point's target only when it is first called."""

    def __init__(self, entry_point: metadata.EntryPoint):
        self.entry_point = entry_point
        self._target: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._target is None:
            self._target = self.entry_point.load()
        return self._target(*args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:
        if self._target is None:
            self._target = self.entry_point.load()
        return getattr(self._target, attribute)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")
