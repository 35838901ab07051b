"""DLoRA (Dec-LoRA): gossip each factor separately.

``A_i <- sum_j pi_ij A_j`` and ``B_i <- sum_j pi_ij B_j``. Cheap and simple, but the product of the averages is not
the average of the products: the cross terms ``pi_j pi_l B_j A_l`` are the consensus interference DeCAF removes.
Agents with different ranks are handled by zero-padding (HetLoRA's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, MixOutput, check_ranks, mask_ranks, prepare
from .registry import register


def average_factors(p, ranks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W A, W B)`` of prepared inputs, zero-padded ranks masked: the factor-wise gossip step many methods share."""
    A_new = torch.einsum("ij,jrk->irk", p.W, p.A)
    B_new = torch.einsum("ij,jdr->idr", p.W, p.B)
    B_new, A_new = mask_ranks(B_new, A_new, check_ranks(ranks, p.W.shape[0], p.A.shape[1], p.A.device))
    return A_new, B_new


@register
@dataclass
class DLoRA(Algorithm):
    """Factor-wise gossip averaging of A and B."""

    name = "dlora"
    summary = "factor-wise gossip: average A and B separately (cross terms remain)"
    paper = "Dec-LoRA (Ghiasvand et al., 2025)"
    supports_ranks = True

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        A_new, B_new = average_factors(p, ranks)
        return p.cast(A_new, B_new)
