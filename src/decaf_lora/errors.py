"""Errors that reach users.

Everything a user can get wrong raises a :class:`DecafError` whose message is one sentence naming the argument,
the bad value and what is allowed. The CLI turns these into a one-line message and exit code 2, never a traceback.
Subclassing ``ValueError`` keeps ``except ValueError`` working for library users.
"""

from __future__ import annotations

from collections.abc import Iterable


class DecafError(ValueError):
    """A problem with user input, described in one sentence."""


class TopologyError(DecafError):
    """A graph, mixing matrix or schedule that cannot be used for gossip."""


class PartitionError(DecafError):
    """A data split that cannot be made as asked."""


class ShapeError(DecafError):
    """Tensors whose shapes or dtypes do not fit together."""


def choice_error(cls: type[DecafError], argument: str, value: object, allowed: Iterable[str]) -> DecafError:
    """Build the standard 'unknown name' error: names the argument, the value and every allowed value."""
    options = ", ".join(sorted(allowed))
    return cls(f"{argument}={value!r} is not known; choose one of: {options}.")
