"""HetLoRA in the gossip setting: zero-padded factor averaging weighted by product norms, truncation, self-pruning.

HetLoRA (Cho et al., 2024) is a server method for clients of different ranks (peers.md §12.1, from the Figure 2
caption and third-party reimplementations; no official code): factors are zero-padded to the largest rank, averaged
factor-wise with weights proportional to each client's product norm ``||B_k A_k||_F`` ("sparsity-weighted"), and a
client of rank r_k takes the first r_k columns of B and rows of A. Clients may prune their own rank.

Gossip adaptation (peers.md §12.3, [INFERENCE]; not from the paper): agent i weighs neighbour j by
``w_ij = pi_ij ||s B_j A_j||_F / sum_l pi_il ||s B_l A_l||_F`` over its neighbourhood (itself included), mixes
``A_i = sum_j w_ij A_j`` and ``B_i = sum_j w_ij B_j`` on the zero-padded factors and keeps the first r_i slots.

Choices where the paper is silent (each tagged in peers.md):

* Norms from r x r Grams, never d x k: ``||B A||_F^2 = sum(B^T B * A A^T)`` (both Grams are symmetric). The common
  scale s cancels in the normalised weights. [INFERENCE]
* Zero products (peers.md C8, §12.6): a norm at the rounding level of its Gram is taken as 0; a row whose every
  norm is 0 (B = 0 before training, an absent agent) falls back to pi instead of 0/0. [INFERENCE]
* ``weights``: ``sparsity`` (the default, as the issue asks: pi times the product norm, the paper's weighting in
  gossip form) or ``pi`` (plain mixing rows: then HetLoRA is DLoRA with truncation to each agent's rank). The
  sparsity weights are not doubly stochastic, so the network average is not preserved; the spec recommends ``pi``
  where exact average consensus matters. [INFERENCE]
* Self-pruning (``prune``), the spec's recommended rule (peers.md §12.2; the paper's rule is a [GAP]): after the mix,
  ``c = max(1, floor(gamma r_i))`` and the tail norm ``tau = ||s B[:, c:r_i] A[c:r_i, :]||_F`` (the slots pruning
  would remove). If tau fell below the previous round's value, ``r_i <- c`` and the tail is zeroed. Our reading:
  after a prune the reference becomes the tail norm of the *new* rank's tail, so every comparison is between the same
  slots in consecutive rounds; the first round only records tau. The rank never goes below 1.
* Not implemented: the paper's training-time regulariser ``lambda tau`` on the tail (the interface has no loss hook);
  the FlexLoRA authors' reimplementation of it has no gradient either (peers.md §12.2).

Per-agent state (with ``prune``): ``tail``, the reference tau (-1 before the first measurement), and ``rank``, the
agent's rank as this method last set it. The engine passes ``ranks`` only for runs that start heterogeneous, so a
run whose agents start equal and then prune reads its ranks from this state; when both are known the smaller wins.

Diagnostics: ``self_weight`` (w_ii, the weight the agent gives itself after reweighting, largest over layers),
``rank_after_prune`` (the agent's rank after this round, summed over layers: the row's
``rank`` column is the largest, which hides a prune in one layer) and ``tail_norm`` (tau after the
round, root-sum-square over layers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..config import option
from .base import Algorithm, LayerInfo, MixOutput, check_ranks, prepare
from .dlora import average_factors
from .registry import register

WEIGHTS = ("sparsity", "pi")
#: No previous tail norm yet (a measured tau is >= 0).
NO_TAIL = -1.0


def product_norms(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(n,) ``||B_j A_j||_F`` from the r x r Grams, with norms at the Gram's rounding level set to exactly 0.

    The Gram trace sums products whose size is bounded by ``||B||_F^2 ||A||_F^2``; a squared norm within
    ``16 sqrt(max(d, k)) eps`` of that is indistinguishable from zero (the probabilistic rounding model the Gram
    path of :mod:`decaf_lora.lowrank` uses).
    """
    gram_b, gram_a = B.mT @ B, A @ A.mT
    sq = (gram_b * gram_a).sum((-2, -1))
    size = gram_b.diagonal(dim1=-2, dim2=-1).sum(-1) * gram_a.diagonal(dim1=-2, dim2=-1).sum(-1)
    noise = 16 * math.sqrt(max(B.shape[-2], A.shape[-1])) * torch.finfo(B.dtype).eps * size
    return torch.where(sq > noise, sq.clamp(min=0).sqrt(), torch.zeros((), dtype=sq.dtype))


def sparsity_weights(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Rows ``W_ij n_j / sum_l W_il n_l``; a row whose weighted norms are all 0 keeps its W row (peers.md §12.6)."""
    raw = W * norms[None, :]
    total = raw.sum(1, keepdim=True)
    return torch.where(total > 0, raw / total.clamp(min=torch.finfo(W.dtype).tiny), W)


def tail_norms(B: torch.Tensor, A: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """(n,) ``||B[:, start:stop] A[start:stop, :]||_F`` per agent from masked r x r Grams (0 for an empty slice)."""
    slot = torch.arange(A.shape[1], device=A.device)[None, :]
    keep = ((slot >= start[:, None]) & (slot < stop[:, None])).to(A.dtype)  # (n, r)
    mask = keep[:, :, None] * keep[:, None, :]
    sq = ((B.mT @ B) * (A @ A.mT) * mask).sum((-2, -1))
    return sq.clamp(min=0).sqrt()


def prune_cut(ranks: torch.Tensor, gamma: float) -> torch.Tensor:
    """``max(1, floor(gamma r))``: the rank after one pruning step, and where the measured tail starts."""
    return torch.floor(ranks.to(torch.float64) * gamma).to(torch.long).clamp(min=1)


@register
@dataclass
class HetLoRA(Algorithm):
    """HetLoRA, gossip adaptation, not from the paper (peers.md §12.3): zero-padded factor-wise mixing with weights
    pi_ij times the neighbour's product norm, truncation to the agent's own rank, optional rank self-pruning (the
    spec's recommended rule; the paper's rule is unknown)."""

    name = "hetlora"
    summary = "zero-padded factor mix weighted by pi_ij ||B_j A_j||_F, truncate to own rank, optional self-pruning"
    paper = "HetLoRA (Cho et al., 2024), gossip adaptation, not from the paper; pruning rule our reading"
    supports_ranks = True
    stats = {"self_weight": "max", "rank_after_prune": "sum", "tail_norm": "rss"}
    weights: str = option(
        "sparsity",
        "neighbour weights: 'sparsity' = pi_ij times the product norm ||s B_j A_j||_F, renormalised per row (the "
        "paper's); 'pi' = the plain mixing row (preserves the network average)",
        choices=WEIGHTS,
    )
    prune: bool = option(False, "self-prune the rank: r <- max(1, floor(gamma r)) when the tail norm fell")
    gamma: float = option(
        0.9, "pruning keeps the first floor(gamma r) slots; the rest is the measured tail", gt=0, lt=1
    )

    @property
    def changes_ranks(self) -> bool:
        return self.prune

    def init_state(self, layer: LayerInfo, n_agents: int) -> dict[str, torch.Tensor]:
        """With ``prune``: each agent's reference tail norm (none yet) and its rank at the start of the run."""
        if not self.prune:
            return {}
        ranks = getattr(getattr(self, "facts", None), "ranks", None)
        start = [int(x) for x in ranks] if ranks is not None else [layer.r] * n_agents
        return {
            "tail": torch.full((n_agents,), NO_TAIL, dtype=torch.float64),
            "rank": torch.tensor(start[:n_agents] + [layer.r] * (n_agents - len(start)), dtype=torch.long),
        }

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        n_out, r = p.W.shape[0], A.shape[1]
        rk = check_ranks(ranks, n_out, r, A.device)
        own = torch.full((n_out,), r, device=A.device, dtype=torch.long) if rk is None else rk
        state = {k: v.to(A.device) for k, v in (context.state if context is not None else {}).items()}
        if self.prune and "rank" in state:
            own = torch.minimum(own, state["rank"].to(torch.long).clamp(1, r))
        if self.weights == "sparsity":
            mixing = sparsity_weights(p.W, product_norms(p.B, p.A))
        else:
            mixing = p.W
        A_new, B_new = average_factors(dataclasses.replace(p, W=mixing), own)  # truncation to the first r_i slots
        scale = float(context.scale) if context is not None else 1.0
        cut = prune_cut(own, self.gamma).to(A.device)
        tau = scale * tail_norms(B_new, A_new, cut, own)
        stats = {"self_weight": mixing[torch.arange(n_out, device=A.device), p.self_index]}
        extra = {}
        if self.prune:
            previous = state.get("tail", torch.full((n_out,), NO_TAIL, dtype=torch.float64, device=A.device))
            fell = (previous >= 0) & (tau.to(torch.float64) < previous) & (cut < own)
            own = torch.where(fell, cut, own)
            keep = torch.arange(r, device=A.device)[None, :] < own[:, None]
            B_new, A_new = B_new * keep[:, None, :], A_new * keep[:, :, None]
            # after a prune the reference is the new rank's own tail, so the next comparison is like with like
            tau = torch.where(fell, scale * tail_norms(B_new, A_new, prune_cut(own, self.gamma), own), tau)
            extra = {"ranks": own, "state": {"tail": tau.to(torch.float64), "rank": own}}
        stats.update(rank_after_prune=own.to(tau.dtype), tail_norm=tau)
        return p.cast(A_new, B_new, stats, **extra)
