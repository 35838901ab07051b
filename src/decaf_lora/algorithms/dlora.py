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


@register
@dataclass
class DLoRA(Algorithm):
    """Factor-wise gossip averaging of A and B."""

    name = "dlora"

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        A_new = torch.einsum("ij,jrk->irk", p.W, p.A)
        B_new = torch.einsum("ij,jdr->idr", p.W, p.B)
        B_new, A_new = mask_ranks(B_new, A_new, check_ranks(ranks, p.W.shape[0], A.shape[1], A.device))
        return p.cast(A_new, B_new)
