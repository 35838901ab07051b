"""Names -> things: one helper for every named choice a run makes (algorithms, graphs, mixing rules, schedules,
partition schemes, tasks, engines).

One spelling convention everywhere: lower-case words joined by hyphens (``dlora-fa``, ``round-robin``,
``erdos-renyi``, ``one-peer-exponential``). The other spelling (underscores, any case) and a few aliases are still
accepted, so ``round_robin`` in an old config keeps working; what a run writes down is always the canonical name.

The registries live here, at the bottom of the package, so that :mod:`decaf_lora.config` can declare a field's
allowed values (``choices=ALGORITHMS``) without importing the layers that fill them. Each registry knows which
module registers its entries (``populate``) and imports it by name the first time it is asked for its names: the
plugin pattern of entry points. That is the one place where a lower layer reaches a higher one, and it does so
only through this narrow door.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from .errors import DecafError, PartitionError, TopologyError


def canonical_spelling(name: object) -> str:
    """``'Round_Robin '`` -> ``'round-robin'``: the one convention for every registered name."""
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


class Registry:
    """Named entries of one kind, with aliases, canonical spelling and the standard 'choose one of' error."""

    def __init__(self, field: str, *, populate: str | None = None, error: type[DecafError] = DecafError):
        self.field = field  # the argument or config field that names one of these, used in errors
        self._populate = populate
        self._error = error
        self._items: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        self._populated = populate is None

    def register(self, obj: Any = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
        """Add ``obj`` under ``name`` (default: ``obj.name``); usable as a decorator, with or without arguments."""
        if obj is None:
            return lambda o: self.register(o, name=name, aliases=aliases)
        key = canonical_spelling(name if name is not None else obj.name)
        if key in self._items and self._items[key] is not obj:
            raise DecafError(f"{self.field} name {key!r} is registered twice; give the new entry another name.")
        self._items[key] = obj
        for alias in aliases:
            self._aliases[canonical_spelling(alias)] = key
        return obj

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register throw-away algorithms clean up with this)."""
        key = canonical_spelling(name)
        self._items.pop(key, None)
        self._aliases = {a: k for a, k in self._aliases.items() if k != key}

    def _ensure(self) -> None:
        if not self._populated:
            self._populated = True
            importlib.import_module(self._populate)

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._items)

    def canonical(self, name: object, field: str | None = None) -> str:
        """The canonical name for ``name`` (any accepted spelling or alias), or the 'choose one of' error."""
        self._ensure()
        key = canonical_spelling(name)
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise self.error(name, field)
        return key

    def get(self, name: object, field: str | None = None) -> Any:
        return self._items[self.canonical(name, field)]

    def __contains__(self, name: object) -> bool:
        self._ensure()
        key = canonical_spelling(name)
        return self._aliases.get(key, key) in self._items

    def items(self) -> list[tuple[str, Any]]:
        self._ensure()
        return sorted(self._items.items())

    def error(self, value: object, field: str | None = None) -> DecafError:
        """``field='value' is not known; choose one of: a, b, c.``"""
        return self._error(f"{field or self.field}={value!r} is not known; choose one of: {', '.join(self.names())}.")


ALGORITHMS = Registry("algorithm", populate="decaf_lora.algorithms")
GRAPHS = Registry("topology", populate="decaf_lora.topology.graphs", error=TopologyError)
MIXING_RULES = Registry("mixing", populate="decaf_lora.topology.mixing", error=TopologyError)
SCHEDULES = Registry("schedule", populate="decaf_lora.topology.schedules", error=TopologyError)
PARTITIONS = Registry("partition", populate="decaf_lora.partition", error=PartitionError)
TASKS = Registry("task.kind", populate="decaf_lora.tasks")
ENGINES = Registry("engine", populate="decaf_lora.engine")

#: Every registry by what it holds, for ``decaf methods``-style listings and for tests that iterate over all of them.
ALL: dict[str, Registry] = {
    "algorithms": ALGORITHMS,
    "graphs": GRAPHS,
    "mixing rules": MIXING_RULES,
    "schedules": SCHEDULES,
    "partition schemes": PARTITIONS,
    "tasks": TASKS,
    "engines": ENGINES,
}


def choices_of(spec: Registry | Iterable[str] | Callable[[], Iterable[str]]) -> list[str]:
    """The allowed names of a field's ``choices``: a registry, a fixed sequence, or a function returning one."""
    if isinstance(spec, Registry):
        return spec.names()
    return list(spec() if callable(spec) else spec)
