"""FlexLoRA in the gossip setting: DeCAF with all singular values in B, each agent truncating to its own rank.

FlexLoRA (Bai et al., 2024) is a server method: the server sums the clients' products at full size, takes one SVD and
hands each client the top ``r_k`` triplets as ``B = U_r S_r``, ``A = V_r^T`` (peers.md §7.1, from the official code).
Its gossip adaptation (peers.md §7.2, [INFERENCE]) is agent i doing the same on its neighbourhood,
``TSVD_{r_i}(sum_j pi_ij s B_j A_j)``, which *is* DeCAF with ``split="all-into-b"``, no gauge and per-agent ranks.
So this class is a preset of :class:`~decaf_lora.algorithms.decaf.DeCAF`, not a second code path: the two presets
are fixed options (their only allowed value), and ``skip_zero`` / ``method`` stay DeCAF's.

Choices where the paper is silent or the setting differs (all peers.md §7, tags there):

* Weights: FlexLoRA weighs clients by data size; gossip uses the mixing row pi (a data-size reweighting would break
  double stochasticity and the preserved average). [INFERENCE]
* Scales: FlexLoRA divides by each client's own ``alpha / r_k``; the library keeps one scale per layer (C6), under
  which those factors cancel. [INFERENCE]
* The factored TSVD replaces the official dense SVD of the d x k sum (same result, never d x k). [INFERENCE]

Diagnostic beyond DeCAF's (peers.md §7.5, "rank collapse"): with rank-agnostic weights, the energy of the directions
beyond the smallest rank in a neighbourhood is diluted round after round, because low-rank agents contribute nothing
there. ``beyond_min_rank_energy`` is the fraction of the agent's kept singular-value energy that lies beyond
``r_min(i)``, the smallest rank in its neighbourhood (itself included), and ``beyond_min_rank_norm`` its square root
in absolute terms, ``sqrt(sum_{r_min < l <= r_i} sigma_l^2)``. A sender's rank is read off its factors: the width its
slots occupy (slots beyond an agent's rank are zero on the wire), so no extra bytes or facts are needed. Both are 0
when all ranks are equal; a value falling toward 0 over rounds for a high-rank agent is the collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..lowrank import compute_dtype_for
from .base import MixOutput, check_ranks
from .decaf import DeCAF, neighbourhoods
from .registry import register


def occupied_width(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(n,) the number of leading rank slots up to the last one where B's column or A's row is non-zero.

    For zero-padded factors this is the sender's rank (A's rows start non-zero and stay so under an all-into-b split,
    which keeps them orthonormal), read from what crossed the wire.
    """
    live = (B.abs().amax(-2) > 0) | (A.abs().amax(-1) > 0)  # (n, r)
    slots = torch.arange(1, A.shape[1] + 1, device=A.device)
    return (live * slots).amax(-1)


def beyond_min_rank(
    B_new: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W, self_index, ranks, skipped=None
) -> dict[str, torch.Tensor]:
    """The rank-collapse diagnostic of a FlexLoRA-style output (all singular values in B, no gauge).

    ``B_new`` = U diag(S), so its column norms are the kept singular values of the mixed product. ``A``, ``B``, ``W``,
    ``self_index`` are the mix's inputs (for the neighbourhoods and the senders' ranks); ``ranks`` the output agents'
    ranks (None: all equal to the padded width); ``skipped`` (n_out,) marks agents that kept their own factors because
    their mixed product was numerically zero (no singular values to report: 0).
    """
    dtype = compute_dtype_for(A, B)
    Wt = torch.as_tensor(W, device=A.device).to(dtype)
    n_out, r = Wt.shape[0], A.shape[1]
    idx = torch.arange(n_out, device=A.device) if self_index is None else torch.as_tensor(self_index, device=A.device)
    idx = idx.to(torch.long).reshape(-1)
    rk = check_ranks(ranks, n_out, r, A.device)
    own = torch.full((n_out,), r, device=A.device, dtype=torch.long) if rk is None else rk
    index, _ = neighbourhoods(Wt, idx)  # padding points at the agent itself, harmless for a minimum
    width = occupied_width(A.to(dtype), B.to(dtype))
    r_min = torch.minimum(width[index].amin(-1).clamp(min=1), own)
    sigma2 = B_new.to(dtype).pow(2).sum(-2)  # (n_out, r)
    slot = torch.arange(r, device=A.device)[None, :]
    kept = (sigma2 * (slot < own[:, None])).sum(-1)
    beyond = (sigma2 * ((slot >= r_min[:, None]) & (slot < own[:, None]))).sum(-1)
    if skipped is not None:
        beyond = torch.where(skipped.bool(), torch.zeros((), dtype=dtype), beyond)
    fraction = torch.where(kept > 0, beyond / kept.clamp(min=torch.finfo(dtype).tiny), torch.zeros((), dtype=dtype))
    return {"beyond_min_rank_norm": beyond.sqrt(), "beyond_min_rank_energy": fraction}


@register
@dataclass
class FlexLoRA(DeCAF):
    """FlexLoRA, gossip adaptation, not from the paper (peers.md §7.2): agent i keeps the top ``r_i`` singular
    triplets of its neighbourhood's mixed product with all singular values in B. A preset of DeCAF (``split`` and
    ``gauge`` are fixed), so it runs DeCAF's code; it adds the rank-collapse diagnostic."""

    name = "flexlora"
    summary = "DeCAF preset with per-agent ranks: TSVD_{r_i}(sum_j pi_ij B_j A_j), B = U S, A = V^T"
    paper = "FlexLoRA (Bai et al., 2024), gossip adaptation, not from the paper"
    supports_ranks = True
    stats = {**DeCAF.stats, "beyond_min_rank_norm": "rss", "beyond_min_rank_energy": "max"}
    split: str = option(
        "all-into-b", "fixed by FlexLoRA: all singular values go into B (B = U S, A = V^T)", choices=("all-into-b",)
    )
    gauge: str = option(
        "none", "fixed by FlexLoRA: factors come straight from the SVD, no re-gauging", choices=("none",)
    )

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        out = super().mix(A, B, W, round_=round_, self_index=self_index, ranks=ranks, context=context)
        out.stats.update(beyond_min_rank(out.B, A, B, W, self_index, ranks, out.stats.get("skipped_zero")))
        return out
