"""Splitting a labelled data set across agents.

Each scheme returns a :class:`Partition`: one index array per agent (every example used exactly once) and a label
histogram per agent, so a user can see that a non-IID split really is skewed. The split has its own ``seed``,
separate from the training seed, so one can vary training randomness over a fixed split and vice versa.
Examples are shuffled before any split (sorted data split into contiguous blocks is a classic silent bug).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import PartitionError
from .registry import PARTITIONS


@dataclass(frozen=True)
class Partition:
    """``indices[i]``: the examples of agent i; ``histograms[i, c]``: how many of them have label c."""

    scheme: str
    indices: tuple[np.ndarray, ...]
    histograms: np.ndarray

    @property
    def n_agents(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.indices], dtype=np.int64)

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "sizes": self.sizes.tolist(),
            "histograms": self.histograms.tolist(),
            "indices": [ix.tolist() for ix in self.indices],
        }


def _labels(labels: Sequence[int] | np.ndarray, n_agents: int) -> tuple[np.ndarray, int]:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise PartitionError(f"labels has shape {y.shape}; give a non-empty 1-D array of integer class ids.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise PartitionError("labels must be non-negative integer class ids; map your classes to 0..C-1 first.")
    if isinstance(n_agents, bool) or not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
        raise PartitionError(f"agents={n_agents!r} is invalid; use an integer >= 1.")
    if n_agents > y.size:
        raise PartitionError(
            f"agents={n_agents} is more than the {y.size} examples; use at most {y.size} agents or more data."
        )
    return y.astype(np.int64), int(y.max()) + 1


def _finish(scheme: str, parts: list[np.ndarray], y: np.ndarray, n_classes: int, rng: np.random.Generator) -> Partition:
    parts = [np.sort(rng.permutation(p)).astype(np.int64) if len(p) else np.zeros(0, np.int64) for p in parts]
    hist = np.stack([np.bincount(y[p], minlength=n_classes) for p in parts])
    return Partition(scheme, tuple(parts), hist)


def iid(labels, n_agents: int, seed: int = 0) -> Partition:
    """Shuffle, then cut into ``n_agents`` near-equal blocks (sizes differ by at most one)."""
    y, c = _labels(labels, n_agents)
    rng = np.random.default_rng([seed, 0])
    return _finish("iid", np.array_split(rng.permutation(y.size), n_agents), y, c, rng)


def dirichlet(
    labels, n_agents: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> Partition:
    """Label skew: each class is spread over agents by proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives each agent a few dominant classes; large ``alpha`` (100) approaches IID. Draws are
    repeated until every agent has at least ``min_size`` examples (the usual Hsu et al. 2019 recipe).
    """
    y, c = _labels(labels, n_agents)
    if not isinstance(alpha, (int, float)) or not alpha > 0 or not np.isfinite(alpha):
        raise PartitionError(
            f"alpha={alpha!r} is invalid; use a positive number (0.1 = strongly skewed, 100 = nearly IID)."
        )
    if (
        isinstance(min_size, bool)
        or not isinstance(min_size, (int, np.integer))
        or min_size < 0
        or min_size * n_agents > y.size
    ):
        raise PartitionError(
            f"min_size={min_size!r} is invalid for {y.size} examples over {n_agents} agents; use "
            f"0..{y.size // n_agents}."
        )
    rng = np.random.default_rng([seed, 1])
    by_class = [rng.permutation(np.nonzero(y == k)[0]) for k in range(c)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
        for idx in by_class:
            if not len(idx):
                continue
            props = rng.dirichlet(np.full(n_agents, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for a, chunk in enumerate(np.split(idx, cuts)):
                parts[a].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return _finish("dirichlet", merged, y, c, rng)
    raise PartitionError(
        f"dirichlet with alpha={alpha} gave some agent fewer than min_size={min_size} examples in {max_tries} draws; "
        "raise alpha or lower min_size."
    )


def round_robin(labels, n_agents: int, seed: int = 0) -> Partition:
    """Whole classes: class c goes to agent ``c mod n`` (the DeCAF group's non-IID split).

    With more agents than classes, class c is shared evenly by the agents ``a`` with ``a mod C == c``, so no agent
    is left empty.
    """
    y, c = _labels(labels, n_agents)
    present = [k for k in range(c) if np.any(y == k)]
    rng = np.random.default_rng([seed, 2])
    parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    n_present = len(present)
    for pos, k in enumerate(present):
        owners = [a for a in range(n_agents) if a % n_present == pos] if n_agents > n_present else [pos % n_agents]
        for a, chunk in zip(owners, np.array_split(rng.permutation(np.nonzero(y == k)[0]), len(owners))):
            parts[a].append(chunk)
    merged = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    return _finish("round-robin", merged, y, c, rng)


def shards(labels, n_agents: int, shards_per_agent: int = 2, seed: int = 0) -> Partition:
    """Pathological non-IID (McMahan et al. 2017): sort by label, cut into ``n * k`` shards, deal k to each agent.

    Each agent sees at most ``k`` classes (fewer when two of its shards share a class).
    """
    y, c = _labels(labels, n_agents)
    k = shards_per_agent
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or n_agents * k > y.size:
        raise PartitionError(
            f"shards_per_agent={k!r} is invalid for {y.size} examples over {n_agents} agents; use "
            f"1..{y.size // n_agents}."
        )
    rng = np.random.default_rng([seed, 3])
    shuffled = rng.permutation(y.size)
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    pieces = np.array_split(order, n_agents * k)
    deal = rng.permutation(n_agents * k)
    merged = [np.concatenate([pieces[s] for s in deal[a * k : (a + 1) * k]]) for a in range(n_agents)]
    return _finish("shards", merged, y, c, rng)


def natural(labels, n_agents: int, keys, seed: int = 0) -> Partition:
    """Group by a natural key (user, author, site): every key's examples stay on one agent.

    Keys are dealt largest first to the agent with the fewest examples so far (ties by a seeded shuffle), which
    keeps agents' sizes close when there are more keys than agents.
    """
    y, c = _labels(labels, n_agents)
    keys = np.asarray(keys)
    if keys.shape != y.shape:
        raise PartitionError(
            f"keys has {keys.shape[0] if keys.ndim else 0} entries but labels has {y.size}; give one key per example."
        )
    uniq, inverse = np.unique(keys, return_inverse=True)
    if len(uniq) < n_agents:
        raise PartitionError(
            f"the key column has {len(uniq)} distinct values but agents={n_agents}; use at most {len(uniq)} agents or "
            "another scheme."
        )
    rng = np.random.default_rng([seed, 4])
    counts = np.bincount(inverse)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(n_agents, dtype=np.int64)
    owner = np.empty(len(uniq), dtype=np.int64)
    for kid in order:
        a = int(np.argmin(load))
        owner[kid] = a
        load[a] += counts[kid]
    merged = [np.nonzero(owner[inverse] == a)[0] for a in range(n_agents)]
    return _finish("natural", merged, y, c, rng)


for _fn, _name in (
    (iid, "iid"),
    (dirichlet, "dirichlet"),
    (round_robin, "round-robin"),
    (shards, "shards"),
    (natural, "natural"),
):
    PARTITIONS.register(_fn, name=_name)
SCHEMES = PARTITIONS


def make_partition(scheme: str, labels, n_agents: int, seed: int = 0, **params) -> Partition:
    """Split by a named scheme (see ``SCHEMES``); extra keywords go to the scheme (``alpha``, ``keys``, ...)."""
    import inspect

    key = PARTITIONS.canonical(scheme)
    fn = PARTITIONS.get(key)
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("labels", "n_agents")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise PartitionError(
            f"partition {key!r} does not take {', '.join(unknown)}; its parameters are: {', '.join(accepted)}."
        )
    return fn(labels, n_agents, seed=seed, **params)
