"""Registries in the Keras ``get(identifier)`` style, open to other packages.

A registry maps names to factories. Its built-in entries come from one table
given when it is created (read on first use, so nothing registers itself as
a side effect of an import), and other packages add entries through the
entry-point group ``finetune.<kind>`` (loaded on the first lookup of a name
the registry does not know).

Every identifier in a recipe is resolved here, by :meth:`Registry.split`:
a name (``"adam"``), a mapping ``{"name": ..., **settings}``, or an object
that is already built.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

from finetune.errors import RecipeError, first_line

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one kind (optimizers, backbones, ...)."""

    def __init__(
        self,
        kind: str,
        instance_type: type | tuple[type, ...] | None = None,
        builtins: Mapping[str, T] | Callable[[], Mapping[str, T]] | None = None,
    ):
        self.kind = kind
        self.entry_point_group = f"finetune.{kind}"
        self._instance_type = instance_type
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False

    @property
    def singular(self) -> str:
        return self.kind[:-1] if self.kind.endswith("s") else self.kind

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (a plugin's own code may call this too)."""
        self._load_builtins()
        key = _normalize(name)
        if key in self._entries:
            raise ValueError(f"{self.kind}: {name!r} is already registered")
        self._entries[key] = entry
        return entry

    def names(self) -> list[str]:
        self._load_builtins()
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name, missing_ok=True) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def lookup(self, name: str, missing_ok: bool = False) -> T | None:
        """The registered entry for ``name``; unknown names raise RecipeError (or give None)."""
        self._load_builtins()
        key = _normalize(name)
        if key not in self._entries:
            self._load_entry_points()
        if key in self._entries:
            return self._entries[key]
        if missing_ok:
            return None
        raise RecipeError(self.unknown_message(name))

    def entry(self, name: str) -> T:
        """The registered entry for ``name``, which must exist (RecipeError otherwise)."""
        found = self.lookup(name)
        assert found is not None
        return found

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(_normalize(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.singular} {name!r}{hint}; known: {', '.join(known)}"

    def split(self, identifier: Any) -> tuple[str, dict[str, Any]]:
        """``"adam"`` or ``{"name": "adam", **settings}`` as ``(name, settings)``."""
        if isinstance(identifier, str):
            return identifier, {}
        if isinstance(identifier, Mapping):
            settings = dict(identifier)
            name = settings.pop("name", None)
            if not isinstance(name, str):
                raise RecipeError(f"a {self.singular} entry needs a 'name' key, got {dict(identifier)!r}")
            return name, settings
        raise RecipeError(f"cannot interpret {identifier!r} as one of the {self.kind}")

    def get(self, identifier: Any, **defaults: Any) -> Any:
        """Build an object from a name, a ``{name: ..., **settings}`` mapping or an object.

        ``defaults`` are passed to the factory unless the identifier sets them.
        A factory that rejects its arguments (TypeError, ValueError) is a
        one-line RecipeError naming the entry.
        """
        if self._instance_type is not None and isinstance(identifier, self._instance_type):
            return identifier
        if callable(identifier) and not isinstance(identifier, str) and self._instance_type is None:
            return identifier
        name, settings = self.split(identifier)
        factory: Any = self.entry(name)
        try:
            return factory(**{**defaults, **settings})
        except (TypeError, ValueError) as error:
            raise RecipeError(f"{self.singular} {name!r}: {first_line(error)}") from None

    def _load_builtins(self) -> None:
        if self._builtins is None:
            return
        table = self._builtins() if callable(self._builtins) else self._builtins
        self._builtins = None
        for name, entry in table.items():
            self._entries[_normalize(name)] = entry

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in metadata.entry_points(group=self.entry_point_group):
            key = _normalize(entry_point.name)
            if key not in self._entries:
                self._entries[key] = _LazyEntryPoint(entry_point)  # type: ignore[assignment]


class _LazyEntryPoint:
    """Imports an entry point's target only when it is first used."""

    def __init__(self, entry_point: metadata.EntryPoint):
        self.entry_point = entry_point
        self._target: Any = None

    def _load(self) -> Any:
        if self._target is None:
            self._target = self.entry_point.load()
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._load(), attribute)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")
