"""Faults a long decentralized run must survive: dropped links, absent agents, and neighbours that send garbage.

Everything random here is a pure function of (seed, round), like the mixing schedules, so every process of a
distributed run and every resumed run sees the same faults. Received payloads are checked before they are mixed:
shape, dtype, finiteness and a norm bound; a payload that fails is rejected, logged, and the receiver mixes with
the neighbours that passed, its weights renormalized over them (and itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

POISONS = ("nan", "shape", "scale")


def _rng(seed: int, round_: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_), 7919, salt])


def drop_links(w: np.ndarray, p: float, seed: int, round_: int) -> np.ndarray:
    """Each link down with probability ``p`` this round; its weight moves to both ends' self weights.

    The result stays symmetric and doubly stochastic (this is the per-round fault of ``faults.link_drop``,
    applied on top of whatever schedule the topology uses).
    """
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


def check_payload(t: torch.Tensor, shape: tuple, dtype: torch.dtype, max_norm: float) -> str | None:
    """Why a received tensor must be rejected, or None if it is acceptable."""
    if not isinstance(t, torch.Tensor):
        return f"not a tensor ({type(t).__name__})"
    if tuple(t.shape) != tuple(shape):
        return f"shape {tuple(t.shape)} instead of {tuple(shape)}"
    if t.dtype != dtype:
        return f"dtype {t.dtype} instead of {dtype}"
    if not bool(torch.isfinite(t).all()):
        return "NaN or infinite values"
    norm = float(torch.linalg.vector_norm(t.float()))
    if max_norm and norm > max_norm:
        return f"norm {norm:.3g} above faults.max_norm={max_norm:g}"
    return None


def check_parts(parts: list[torch.Tensor], expected: list[tuple], max_norm: float) -> str | None:
    """Screen one sender's whole payload (a list of tensors) against the expected (shape, dtype) of each.

    Sizes are compared by element count, as on the wire, so both engines word a rejection the same way.
    """
    if len(parts) != len(expected):
        return f"{len(parts)} tensors instead of {len(expected)}"
    for t, (shape, dtype) in zip(parts, expected):
        want = int(np.prod(tuple(shape)))
        if t.numel() != want:
            return f"a tensor of {t.numel()} values instead of shape {tuple(shape)}"
        reason = check_payload(t.reshape(shape), shape, dtype, max_norm)
        if reason:
            return reason
    return None


def poison(t: torch.Tensor, kind: str) -> torch.Tensor:
    """What a broken or hostile agent sends instead of ``t`` (for testing the defences)."""
    if kind == "nan":
        return torch.full_like(t, float("nan"))
    if kind == "scale":
        return t * 1e8 + 1e4
    if kind == "shape":
        return t[..., :-1].clone() if t.shape[-1] > 1 else torch.cat([t, t], -1)
    raise ValueError(kind)


def renormalize_without(w: np.ndarray, rejected: dict[int, list[int]]) -> np.ndarray:
    """Zero each receiver's weight on the senders it rejected and rescale the rest of its row to sum to 1."""
    if not rejected:
        return w
    w = w.copy()
    for i, senders in rejected.items():
        w[i, senders] = 0.0
        w[i] /= w[i].sum()
    return w


@dataclass
class RoundFaults:
    """What went wrong in one round, as logged in the metrics."""

    rejected: dict[int, list[int]] = field(default_factory=dict)  # receiver -> senders rejected
    reasons: dict[int, str] = field(default_factory=dict)  # sender -> why its payload was rejected
    timed_out: dict[int, list[int]] = field(default_factory=dict)  # receiver -> neighbours whose process was too late

    def left_out(self) -> dict[int, list[int]]:
        """Receiver -> every neighbour missing from its mix this round, rejected or late."""
        out = {i: list(js) for i, js in self.rejected.items()}
        for i, js in self.timed_out.items():
            out[i] = sorted(set(out.get(i, [])) | set(js))
        return out
