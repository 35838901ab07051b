"""Name -> algorithm class. ``register`` is the one line a new method file needs (like PEFT's tuner registry)."""

from __future__ import annotations

from ..registry import ALGORITHMS


def register(cls: type) -> type:
    """Class decorator: make ``cls`` reachable as ``get(cls.name)``."""
    return ALGORITHMS.register(cls)


def available() -> list[str]:
    return ALGORITHMS.names()


def canonical_name(name: str) -> str:
    return ALGORITHMS.canonical(name)


def get(name: str, **options):
    """An algorithm instance by name, with its options checked against what the method declares."""
    from ..config import ConfigError, algorithm_option_problems

    cls = ALGORITHMS.get(name)
    problems = algorithm_option_problems(cls.name, options, prefix="")
    if problems:
        raise ConfigError(problems)
    return cls(**options)
