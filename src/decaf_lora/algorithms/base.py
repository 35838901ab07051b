"""The narrow interface every aggregation method implements.

An algorithm answers three questions for one adapted layer, in the style of Flower's strategies: what an agent
sends (:meth:`Algorithm.sends`, so bytes can be counted), which factors train this round
(:meth:`Algorithm.trainable`), and how an agent combines what it received with its mixing weights
(:meth:`Algorithm.mix`). ``mix`` works on stacked factors, ``A`` as (n_in, r, k) and ``B`` as (n_in, d, r), and a
mixing matrix ``W`` of shape (n_out, n_in) whose row i holds the weights output agent i gives to each stacked
input. The simulator passes all agents and the square matrix; a distributed rank passes its own agents plus the
neighbours it received, the matching rows of W and ``self_index`` (where each output agent's own factors sit in
the stack). Methods to come plug in without touching these: phase-alternating ones (ADF-LoRA, TAD-LoRA) override
``trainable``; ones that transform received factors (FedRot-LoRA's rotations, DIMAT's alignment) or correct the
result (LoRA-FAIR) override ``mix``; agents with different ranks pass zero-padded factors and ``ranks``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ShapeError
from ..lowrank import compute_dtype_for

FACTORS = ("A", "B")


@dataclass
class MixOutput:
    """New factors for the output agents, plus per-agent diagnostics (e.g. ``tsvd_tail``). Unpacks as ``A, B``."""

    A: torch.Tensor
    B: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.A, self.B))


@dataclass
class Algorithm(abc.ABC):
    """Base class; subclasses are dataclasses whose fields are the method's options (with ``help`` metadata)."""

    name: ClassVar[str]
    #: "gossip" (neighbours on the graph), "server" (everyone to a coordinator and back) or "none".
    communication: ClassVar[str] = "gossip"

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        """Factors an agent transmits this round, a subset of ("A", "B")."""
        return FACTORS

    def trainable(self, round_: int = 0) -> tuple[str, ...]:
        """Factors that receive gradients this round."""
        return FACTORS

    def payload_numel(self, A_shape: torch.Size | tuple, B_shape: torch.Size | tuple, round_: int = 0) -> int:
        """Number of elements one agent sends to one receiver for one layer (times element size = bytes)."""
        sizes = {"A": _prod(A_shape[-2:]), "B": _prod(B_shape[-2:])}
        return sum(sizes[f] for f in self.sends(round_))

    @abc.abstractmethod
    def mix(self, A: torch.Tensor, B: torch.Tensor, W, *, round_: int = 0, self_index=None, ranks=None) -> MixOutput:
        """Combine stacked factors with mixing weights; see the module docstring for shapes."""

    def options(self) -> dict:
        return dataclasses.asdict(self)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


@dataclass
class Prepared:
    A: torch.Tensor  # (n_in, r, k) in compute dtype
    B: torch.Tensor  # (n_in, d, r) in compute dtype
    W: torch.Tensor  # (n_out, n_in) in compute dtype
    self_index: torch.Tensor  # (n_out,) long
    dtype_A: torch.dtype
    dtype_B: torch.dtype

    @property
    def own_A(self) -> torch.Tensor:
        return self.A[self.self_index]

    @property
    def own_B(self) -> torch.Tensor:
        return self.B[self.self_index]

    def cast(self, A: torch.Tensor, B: torch.Tensor, stats: dict | None = None) -> MixOutput:
        return MixOutput(A.to(self.dtype_A), B.to(self.dtype_B), stats or {})


def prepare(A: torch.Tensor, B: torch.Tensor, W, self_index=None, *, row_sums_to_one: bool = True) -> Prepared:
    """Validate one layer's stacked factors and mixing rows; move everything to a float32/float64 compute dtype."""
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor) or A.ndim != 3 or B.ndim != 3:
        raise ShapeError("A and B must be 3-D tensors: A (agents, r, k) and B (agents, d, r).")
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ShapeError(
            f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit: need A (agents, r, k) and B (agents, d, r) with equal agents and r."
        )
    dtype = compute_dtype_for(A, B)
    Wt = torch.as_tensor(W, device=A.device).to(dtype)
    n_in = A.shape[0]
    if Wt.ndim != 2 or Wt.shape[1] != n_in:
        raise ShapeError(
            f"W has shape {tuple(Wt.shape)}; it must be (output agents, {n_in}) to match the {n_in} stacked agents."
        )
    if not bool(torch.isfinite(Wt).all()) or bool((Wt < 0).any()):
        raise ShapeError("W must hold finite, non-negative mixing weights.")
    if row_sums_to_one:
        sums = Wt.sum(1)
        bad = (sums - 1).abs() > 1e-6
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ShapeError(f"W row {i} sums to {float(sums[i]):.6g}; each agent's mixing weights must sum to 1.")
    if self_index is None:
        if Wt.shape[0] != n_in:
            raise ShapeError(
                f"W is {tuple(Wt.shape)}, not square; pass self_index to say where each output agent's own factors are."
            )
        idx = torch.arange(n_in, device=A.device)
    else:
        idx = torch.as_tensor(self_index, device=A.device, dtype=torch.long).reshape(-1)
        if idx.numel() != Wt.shape[0] or bool(((idx < 0) | (idx >= n_in)).any()):
            raise ShapeError(
                f"self_index must give, for each of the {Wt.shape[0]} output agents, a position in 0..{n_in - 1}."
            )
    return Prepared(A.to(dtype), B.to(dtype), Wt, idx, A.dtype, B.dtype)


def check_ranks(ranks, n_out: int, r: int, device) -> torch.Tensor | None:
    """Per-output-agent ranks for heterogeneous adapters (factors zero-padded to the largest rank ``r``)."""
    if ranks is None:
        return None
    rk = torch.as_tensor(ranks, device=device, dtype=torch.long).reshape(-1)
    if rk.numel() != n_out or bool(((rk < 1) | (rk > r)).any()):
        raise ShapeError(f"ranks must give each of the {n_out} output agents a rank in 1..{r} (the padded rank).")
    return rk


def mask_ranks(B: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the padded columns of B and rows of A beyond each agent's rank."""
    if ranks is None:
        return B, A
    keep = torch.arange(B.shape[-1], device=B.device)[None, :] < ranks[:, None]  # (n, r)
    return B * keep[:, None, :], A * keep[:, :, None]
