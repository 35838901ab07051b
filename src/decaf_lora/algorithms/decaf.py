"""DeCAF: consensus on the LoRA *product*, factored back to rank r by an exact truncated SVD.

Agent i forms ``M_i = sum_j pi_ij B_j A_j`` over itself and its neighbours and sets ``B_i, A_i`` from
``TSVD_r(M_i)``. That removes DLoRA's cross-term interference at the price of the truncation error bounded by
Proposition 1. The SVD is the factored one of :mod:`decaf_lora.lowrank`, so the d x k matrix never exists and the
cost is close to two thin QR factorizations of the stacked factors.

Deliberate choices (pitfalls of the paper notes):

* Pitfall 1, dead adapter: LoRA starts with B = 0, so ``M_i = 0`` before any training. An agent whose mixed
  product is numerically zero keeps its own factors (``skip_zero=True``): its product is zero either way, and A
  keeps the common initialization instead of collapsing. Independently, the default ``all-into-b`` split keeps A's
  rows orthonormal even for zero singular values, so no direction can die later either.
* An agent with nothing to mix (absent, isolated, or every neighbour's payload rejected) keeps its own factors: a
  TSVD of its own product would return the same product in a fresh basis, so it changes nothing but the gauge, and
  it would leave kept optimizer moments (``optim.state_after_mix=keep``) pointing the wrong way.
* Heterogeneous ranks: agent i truncates ``M_i`` to its own rank ``ranks[i]``; factors are zero-padded to the
  largest rank, and the discarded singular values count in ``tsvd_tail``.
* Gauge: the SVD returns factors in a fresh basis; ``gauge='procrustes'`` or ``'lstsq'`` rotates them toward the
  agent's previous factors (product unchanged) so optimizer state keeps meaning something.
* Precision: the factorization runs in float32 (float64 for float64 input) whatever the training dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..lowrank import GAUGES, METHODS, SPLITS, regauge, split_factors, truncated_svd_of_sum
from .base import Algorithm, MixOutput, check_ranks, mask_ranks, prepare
from .registry import register


def neighbourhoods(W: torch.Tensor, self_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output row, the stacked inputs with non-zero weight, padded to equal length.

    Returns ``index`` (n_out, m) and ``weight`` (n_out, m), m = the largest neighbourhood; padding points at the
    agent itself with weight 0, so it adds nothing to the sum. This keeps the SVD core at ``m r``, not ``n r``.
    """
    nz = W != 0
    nz[torch.arange(W.shape[0]), self_index] = True  # an agent's own factors are always in its stack
    m = int(nz.sum(1).max())
    # stable sort puts non-zero positions first, in increasing input order
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.gather(nz, 1, order)
    index = torch.where(valid, order, self_index[:, None].expand(-1, m))
    weight = torch.where(valid, torch.gather(W, 1, order), torch.zeros((), dtype=W.dtype))
    return index, weight


def proposition1_bound(B_nb: torch.Tensor, A_nb: torch.Tensor, weight: torch.Tensor, rank) -> dict[str, torch.Tensor]:
    """Proposition 1's bound on the TSVD tail, with ``c`` measured on the factors actually mixed.

    ``||M_i - TSVD_r(M_i)||_F <= sqrt(rank(M_i) - r_i) sigma_{r_i+1}(M_i) <= sqrt(|N_b(i)| r - r_i) sum_j |pi_ij| c^2``
    with ``c = max_j max(sigma_1(A_j), sigma_1(B_j))`` over the neighbourhood; for equal ranks and stochastic rows
    this is the paper's ``sqrt((|N_b(i)| - 1) r) c^2``. Logged every round so users (and the reproduction study) can
    see how tight it is. ``sigma_1`` comes from the r x r Gram matrices, a small cost next to the QRs.
    """
    gram_b = B_nb.mT @ B_nb  # (n, m, r, r)
    gram_a = A_nb @ A_nb.mT
    top = (
        torch.maximum(torch.linalg.eigvalsh(gram_b)[..., -1], torch.linalg.eigvalsh(gram_a)[..., -1])
        .clamp(min=0)
        .sqrt()
    )
    present = weight != 0
    c = torch.where(present, top, torch.zeros((), dtype=top.dtype)).amax(1)
    r_full = B_nb.shape[-1]
    excess = (present.sum(1) * r_full - torch.as_tensor(rank, device=c.device)).clamp(min=0).to(c.dtype)
    return {"tsvd_tail_bound": excess.sqrt() * weight.abs().sum(1).to(c.dtype) * c**2, "factor_norm_c": c}


@register
@dataclass
class DeCAF(Algorithm):
    """Mix LoRA products with the mixing weights, then truncate back to rank r with an exact factored TSVD."""

    name = "decaf"
    summary = "product consensus: TSVD_r(sum_j pi_ij B_j A_j), exact and factored (never d x k)"
    paper = "DeCAF (Saadati et al., 2025)"
    supports_ranks = True
    stats = {
        "tsvd_tail": "sum",
        "tsvd_tail_bound": "sum",
        "tsvd_tail_ratio": "max",
        "factor_norm_c": "max",
        "top_singular_value": "max",
        "skipped_zero": "sum",
    }
    split: str = option("all-into-b", "how singular values go into the factors", choices=SPLITS)
    gauge: str = option("none", "re-express new factors close to the previous ones (product unchanged)", choices=GAUGES)
    skip_zero: bool = option(True, "keep an agent's own factors when its mixed product is numerically zero")
    method: str = option("auto", "algorithm of the factored SVD", choices=METHODS)

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        r = A.shape[1]
        rk = check_ranks(ranks, p.W.shape[0], r, A.device)
        index, weight = neighbourhoods(p.W, p.self_index)
        B_nb, A_nb = p.B[index], p.A[index]  # (n_out, m, d, r), (n_out, m, r, k)
        t = truncated_svd_of_sum(B_nb, A_nb, weight, r, method=self.method)
        S, tail = t.S, t.tail
        if rk is not None:  # agent i keeps its top ranks[i] triplets; the rest joins the tail
            keep = torch.arange(r, device=S.device)[None, :] < rk[:, None]
            tail = torch.sqrt(tail**2 + (S * ~keep).pow(2).sum(-1))
            S = S * keep
        B_new, A_new = split_factors(t.U, S, t.Vh, self.split)
        B_new, A_new = mask_ranks(B_new, A_new, rk)
        own_B, own_A = p.own_B, p.own_A
        B_new, A_new = regauge(B_new, A_new, own_B, own_A, self.gauge)
        bound = proposition1_bound(B_nb, A_nb, weight, r if rk is None else rk)
        tiny = torch.finfo(tail.dtype).tiny
        ratio = torch.where(bound["tsvd_tail_bound"] > 0, tail / bound["tsvd_tail_bound"].clamp(min=tiny), 0.0)
        stats = {"tsvd_tail": tail, "top_singular_value": t.S[:, 0], "tsvd_tail_ratio": ratio, **bound}
        if self.skip_zero:
            # A cheap upper bound on ||M_i||_2; a top singular value below eps times it is rounding noise.
            norm_bound = (weight * torch.linalg.matrix_norm(B_nb) * torch.linalg.matrix_norm(A_nb)).sum(1)
            zero = t.S[:, 0] <= 16 * torch.finfo(S.dtype).eps * norm_bound
            B_new = torch.where(zero[:, None, None], own_B, B_new)
            A_new = torch.where(zero[:, None, None], own_A, A_new)
            stats["skipped_zero"] = zero.to(S.dtype)
        # absent, isolated, or every neighbour rejected: no weight on anyone else, so nothing to mix (an agent that
        # gives itself weight 0 and a neighbour weight 1 is not alone: it takes the neighbour's product)
        alone = ((weight != 0) & (index != p.self_index[:, None])).sum(1) == 0
        B_new = torch.where(alone[:, None, None], own_B, B_new)
        A_new = torch.where(alone[:, None, None], own_A, A_new)
        return p.cast(A_new, B_new, stats)
