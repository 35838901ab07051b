"""DLoRA-FA: A is one shared random matrix frozen at every agent; only B trains and is gossiped.

Because A is common, ``sum_j pi_ij B_j A = (sum_j pi_ij B_j) A``: averaging B is exact consensus on the product.
The price is expressiveness (half the adapter never trains). All agents must start from the same A (same seed,
pitfall 2); this method keeps each agent's own A untouched, so a mismatch would persist, never be averaged away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, MixOutput, prepare
from .registry import register


@register
@dataclass
class DLoRAFA(Algorithm):
    """Frozen shared A, gossip on B only (the gossip form of FFA-LoRA; ConLoRA with Metropolis weights)."""

    name = "dlora-fa"
    summary = "A frozen and shared, gossip on B only (exact consensus, half the adapter)"
    paper = "FFA-LoRA (Sun et al., 2024), gossip form"

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        return ("B", "head")

    def trainable(self, round_: int = 0) -> tuple[str, ...]:
        return ("B", "head")

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        B_new = torch.einsum("ij,jdr->idr", p.W, p.B)
        return p.cast(p.own_A, B_new)
