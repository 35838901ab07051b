"""Name -> algorithm class. ``register`` is the one line a new method file needs (like PEFT's tuner registry)."""

from __future__ import annotations

import dataclasses

from ..errors import DecafError, choice_error

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` reachable as ``get(cls.name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise DecafError(f"algorithm name {cls.name!r} is registered twice; give the new class another name.")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise choice_error(DecafError, "algorithm", name, _REGISTRY)
    return key


def get(name: str, **options):
    """An algorithm instance by name, with its options validated (unknown option names are an error)."""
    cls = _REGISTRY[canonical_name(name)]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise DecafError(
            f"algorithm {cls.name!r} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(fields)) or 'none'}."
        )
    return cls(**options)
