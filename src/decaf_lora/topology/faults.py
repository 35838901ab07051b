"""Faults of the graph itself: links that fail in a round and agents that sit a round out.

Both are pure functions of (seed, round), like the mixing schedules, so every process of a distributed run and every
resumed run sees the same faults. They act on a mixing matrix and keep it symmetric and doubly stochastic: a lost
link's weight moves to both ends' self weights. Faults of what is sent (broken payloads) are screened by the engine.
"""

from __future__ import annotations

import numpy as np


def _rng(seed: int, round_: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_), 7919, salt])


def drop_links(w: np.ndarray, p: float, seed: int, round_: int) -> np.ndarray:
    """Each link down with probability ``p`` this round; its weight moves to both ends' self weights."""
    if p <= 0:
        return w
    w = w.copy()
    n = w.shape[0]
    iu = np.triu_indices(n, 1)
    linked = w[iu] != 0
    down = _rng(seed, round_, 1).random(len(linked)) < p
    for a, b in zip(iu[0][linked & down], iu[1][linked & down]):
        w[a, a] += w[a, b]
        w[b, b] += w[a, b]
        w[a, b] = w[b, a] = 0.0
    return w


def absent_agents(n: int, p: float, seed: int, round_: int) -> np.ndarray:
    """Boolean mask of agents that sit this round out (no training, no exchange), each with probability ``p``."""
    if p <= 0:
        return np.zeros(n, dtype=bool)
    return _rng(seed, round_, 2).random(n) < p


def isolate(w: np.ndarray, absent: np.ndarray) -> np.ndarray:
    """Cut absent agents off: their links' weights move to both ends' self weights (symmetric, doubly stochastic)."""
    if not absent.any():
        return w
    w = w.copy()
    for j in np.nonzero(absent)[0]:
        for i in np.nonzero(w[:, j])[0]:
            if i != j:
                w[i, i] += w[i, j]
                w[j, j] += w[j, i]
                w[i, j] = w[j, i] = 0.0
    return w
