"""RoLoRA (gossip port): alternate the trained factor every round and send, mix, train only that factor.

RoLoRA (Chen, Guo, Ju, Dalal, Khisti; NeurIPS 2025, arXiv 2502.01755) is a server method: in a B-round A is frozen
and identical at every client, the clients train and upload B, and the server's average is exact on the product,
``(sum_k p_k B_k) A = sum_k p_k B_k A``; the next round swaps the roles. The gossip port here is the "RoLoRA"
baseline of the ADF/TAD papers (peers.md section 4.3), **not the paper's own setting**:

* round ``t`` (0-based) trains the phase factor: ``first_phase`` (B by default) in even rounds, the other in odd ones;
* an agent sends only that factor, and mixes it as ``X_i <- sum_j pi_ij X_j``;
* it keeps **its own** frozen factor. The neighbours' copies of the frozen factor were never sent (the engine hands
  them over as NaN); mixing reads only the agent's own (C2 of the peer specification).

Without a server the frozen factor is not common across agents, so the product is no longer exact: the disagreement
of a factor shrinks only in the rounds where it is active (ADF-LoRA's "phase-state mismatch"). On the complete graph
with ``pi = 1/N`` and a common start it equals server RoLoRA exactly. Bytes: ``d r`` in B-rounds, ``k r`` in A-rounds,
half of DLoRA's for square layers. Head: frozen by default, as in the FedRot repository's RoLoRA configuration (only
the active LoRA factor has gradients); ``head="trained"`` trains and averages it every round. Heterogeneous ranks:
zero-padded mixing of the active factor, masked to each agent's rank (our choice; the paper has none).

Statistic ``cross_term_error``: ADF-LoRA's ``s * ||sum_j pi_ij B_j A_j - B_i' A_i'||_F`` computed from what agent i
holds, that is with its own frozen factor standing in for each neighbour's (server RoLoRA's premise that the frozen
factor is common). That is **zero by construction**, ``sum_j pi_ij B_j A_i = (sum_j pi_ij B_j) A_i`` (likewise in
A-rounds, also with rank masks, since an agent's own factors are already zero beyond its rank), so RoLoRA reports 0
without computing it. It does **not** say that RoLoRA mixes exactly: the true error ``sum_j pi_ij B_j (A_j - A_i)``
(B-round) involves the neighbours' frozen factors, which are never sent and so cannot be measured under C2. How far
the agents' frozen factors have drifted apart shows in the engine's ``consensus_distance``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adf_lora import Alternating
from .base import MixOutput, check_ranks, mask_ranks, prepare
from .registry import register


@register
@dataclass
class RoLoRA(Alternating):
    """Per-round alternation (B, A, B, ...): train, send and gossip only the active factor; keep your own frozen one."""

    name = "rolora"
    summary = "alternate every round (B first); train, send and gossip only the active factor (half of DLoRA's bytes)"
    paper = "RoLoRA (Chen et al., NeurIPS 2025), gossip port of the ADF/TAD papers' baseline"

    @property
    def phase_length(self) -> int:
        return 1

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        return self._with_head((self.phase(round_),))

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        rk = check_ranks(ranks, p.W.shape[0], p.A.shape[1], p.A.device)
        active = self.phase(round_)
        if active == "B":
            B_new, A_new = torch.einsum("ij,jdr->idr", p.W, p.B), p.own_A
        else:
            B_new, A_new = p.own_B, torch.einsum("ij,jrk->irk", p.W, p.A)
        B_new, A_new = mask_ranks(B_new, A_new, rk)
        # sum_j w_ij B_j A_i = (sum_j w_ij B_j) A_i: from what the agent holds, the mix is exact (module docstring)
        zero = torch.zeros(p.W.shape[0], dtype=torch.float64, device=p.A.device)
        return p.cast(A_new, B_new, {"cross_term_error": zero})
