"""FedSA-LoRA in the gossip setting: share A, keep B and the head personal.

Agent i trains A, B and its head, sends only A, and sets ``A_i+ = sum_j pi_ij A_j`` while keeping its own B and
head. The idea of the paper: A learns what is common to the agents, B what is specific to each. Bytes per layer and
neighbour: ``k r``, i.e. ``k / (d + k)`` of DLoRA's (half for square layers), and no head bytes.

Choices (gossip adaptation, not from the paper; the specification's [INFERENCE] items):

* The server's data-size-weighted mean of A becomes the round's gossip rows ``pi_ij``.
* B is never sent, so the neighbours' copies of B hold NaN in the engine's stack: B is read from the agent itself
  only (C2 of the specification), and heads stay local because ``head`` is not in :meth:`sends`.
* Heterogeneous ranks: A is averaged zero-padded and cut to each agent's rank (HetLoRA's convention, as in DLoRA).
* Consensus on the product ``B_i A_i`` is not the goal and never reaches 0; ``fedsa_a_disagreement``
  ``||A_i - sum_j pi_ij A_j||_F`` (the agent's A against its neighbourhood mean, before the mix) tracks how far the
  shared factor is from agreement. A network-wide A consensus needs every agent's A, which one rank under torchrun
  does not have, so it is not computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, MixOutput, check_ranks, mask_ranks, prepare
from .registry import register


@register
@dataclass
class FedSALoRA(Algorithm):
    """Gossip on A only; B and the head are personal (gossip adaptation, not from the paper: pi_ij replaces the
    server's data-size weights)."""

    name = "fedsa-lora"
    summary = "share A only (gossip on A); B and the head stay personal: k/(d+k) of DLoRA's bytes"
    paper = "FedSA-LoRA (Guo et al., 2025)"
    supports_ranks = True
    stats = {"fedsa_a_disagreement": "rss"}

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        return ("A",)

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        A_new = torch.einsum("ij,jrk->irk", p.W, p.A)
        # B is personal: only the agent's own rows are read (the neighbours' copies were never sent).
        B_own, A_new = mask_ranks(p.own_B, A_new, check_ranks(ranks, p.W.shape[0], A.shape[1], A.device))
        stats = {"fedsa_a_disagreement": torch.linalg.matrix_norm(p.own_A - A_new)}
        return p.cast(A_new, B_own, stats)
