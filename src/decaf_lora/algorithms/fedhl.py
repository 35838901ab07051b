"""Our reading of FedHL (no public code; rule not from the paper): FlexLoRA's full-rank basis, drift-reducing weights.

What is known of FedHL (Peng et al., 2025; peers.md §8.1, from the abstract only): it keeps a *full-rank* aggregate
as the basis from which each client's rank-r_k model is taken (instead of truncating the global factors first), and
picks round-specific aggregation weights that minimise a "gradient drift" term of its convergence bound. The weight
formula, the basis and the exchanged quantities are a [GAP] (peers.md §8.2): no public code, the body of the paper
was not consulted, and peers.md §8.5 advises not to present any implementation as the paper's. This is our reading.

Our reading (peers.md §8.3 reading R2, gossip form §8.4, [INFERENCE]):

* Basis: agent i's neighbourhood product ``M_i = sum_j w_ij s B_j A_j`` is formed at the full rank it has (up to
  ``m r``), and only then truncated to the agent's own rank, ``TSVD_{r_i}(M_i)`` with all singular values in B.
  That is exactly FlexLoRA (:class:`~decaf_lora.algorithms.flexlora.FlexLoRA`) with weights w instead of pi, and
  runs its code (DeCAF's factored TSVD).
* Weights: the drift of neighbour j is ``delta_ij = ||s B_j A_j - Mbar_i||_F^2``, its distance to the pi-weighted
  neighbourhood product ``Mbar_i = sum_l pi_il s B_l A_l`` (the consensus target of the mixing row). By smoothness,
  ``L^2 sum_j w_ij delta_ij`` bounds the weighted gradient drift ``sum_j w_ij ||grad f(P_j) - grad f(Mbar_i)||^2``.
  Row i's weights minimise that drift, measured relative to its pi-average ``dbar_i = sum_j pi_ij delta_ij``, plus a
  KL divergence that keeps them near the mixing row:

      w_i = argmin over the simplex on N(i) of  sum_j w_ij delta_ij / dbar_i + KL(w_i || pi_i) / beta,

  whose exact solution (Gibbs) is ``w_ij = pi_ij exp(-beta delta_ij / dbar_i) / Z_i``. Rows are stochastic by
  construction, positive exactly where pi is, and their weighted drift never exceeds pi's (``drift_ratio <= 1``).
  The normalisation by ``dbar_i`` makes beta scale-free (the LoRA scale cancels).
* Degenerate cases fall back to pi, and FedHL then *is* FlexLoRA: ``beta = 0``; a neighbourhood whose products all
  coincide (``dbar_i`` at the rounding level of the Grams, e.g. B = 0 before training, or an agent alone); equal
  drifts for every neighbour.
* Cost: the drifts come from the r x r cross-Grams ``B_j^T B_l`` and ``A_j A_l^T`` of each neighbourhood
  (``<B_j A_j, B_l A_l> = sum(B_j^T B_l * A_j A_l^T)``), never a d x k matrix; O(m^2 (d + k) r^2) per agent, the order
  of the TSVD's own QRs. Bytes: what FlexLoRA sends, (d + k) r_j per neighbour (1x DLoRA at equal ranks).
* Not preserved: the reweighted rows are not doubly stochastic, so the network average moves (peers.md §8.4 notes
  push-sum would be needed); a known property of this reading, not a bug.

Diagnostics beyond FlexLoRA's: ``self_weight`` (w_ii), ``weight_shift`` (total variation ``1/2 sum_j |w_ij - pi_ij|``),
``drift`` (``sum_j w_ij delta_ij``, the minimised term, summed over layers) and ``drift_ratio`` (that over dbar_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option
from ..lowrank import compute_dtype_for
from .base import MixOutput, prepare
from .decaf import neighbourhoods
from .flexlora import FlexLoRA
from .registry import register


def neighbourhood_inner_products(B_nb: torch.Tensor, A_nb: torch.Tensor) -> torch.Tensor:
    """(n, m, m) ``<B_j A_j, B_l A_l>_F`` for each row's stacked neighbourhood, from r x r cross-Grams only."""
    gram_b = torch.einsum("ojdr,oldq->ojlrq", B_nb, B_nb)
    gram_a = torch.einsum("ojrk,olqk->ojlrq", A_nb, A_nb)
    return (gram_b * gram_a).sum((-2, -1))


@dataclass(frozen=True)
class DriftWeights:
    """One round's weights of every output row, scattered back to (n_out, n_in), and the quantities behind them."""

    W: torch.Tensor  # (n_out, n_in) float64, rows stochastic
    drift: torch.Tensor  # (n_out,) sum_j w_ij delta_ij (unscaled products)
    drift_pi: torch.Tensor  # (n_out,) dbar_i = sum_j pi_ij delta_ij
    degenerate: torch.Tensor  # (n_out,) bool: the row fell back to pi


def drift_weights(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, self_index: torch.Tensor, beta: float):
    """The Gibbs weights ``pi_ij exp(-beta delta_ij / dbar_i) / Z_i`` of every row (see the module docstring).

    ``A``, ``B``: prepared stacks; ``W`` (n_out, n_in) the mixing rows. Everything runs in float64: the drifts are
    differences of squared norms that cancel as the products approach consensus, and the Grams are small next to the
    TSVD that follows (O(m^2 (d + k) r^2) per agent). The rows then sum to 1 to float64 rounding.
    """
    index, pi = neighbourhoods(W.to(torch.float64), self_index)
    C = neighbourhood_inner_products(B.to(torch.float64)[index], A.to(torch.float64)[index])  # (n_out, m, m)
    own_sq = C.diagonal(dim1=-2, dim2=-1)  # ||P_j||^2
    cross = (C * pi[:, None, :]).sum(-1)  # <P_j, Mbar>
    mbar_sq = (pi[:, :, None] * C * pi[:, None, :]).sum((-2, -1))  # ||Mbar||^2
    delta = (own_sq - 2 * cross + mbar_sq[:, None]).clamp(min=0)
    dbar = (pi * delta).sum(-1)
    # Below the Gram's rounding (relative to the mean squared norm) the products coincide: no drift to weigh.
    d, k = B.shape[-2], A.shape[-1]
    noise = 64 * math.sqrt(max(d, k)) * torch.finfo(torch.float64).eps * (pi * own_sq).sum(-1)
    degenerate = (dbar <= noise) | (beta == 0)
    z = torch.where(degenerate[:, None], torch.zeros_like(delta), -beta * delta / dbar.clamp(min=1e-300)[:, None])
    z = z - torch.where(pi > 0, z, torch.full_like(z, -math.inf)).amax(-1, keepdim=True)  # stable exponent
    w = pi * torch.exp(z)
    w = w / w.sum(-1, keepdim=True)
    w = torch.where(degenerate[:, None], pi, w)
    dense = torch.zeros(W.shape, dtype=torch.float64, device=W.device).scatter_add(1, index, w)
    return DriftWeights(dense, (w * delta).sum(-1), dbar, degenerate)


@register
@dataclass
class FedHL(FlexLoRA):
    """Our reading of FedHL (no public code; rule not from the paper): FlexLoRA's full-rank neighbourhood product,
    truncated to each agent's rank, with per-round weights ``pi_ij exp(-beta delta_ij / dbar_i)`` that minimise the
    relative product drift plus a KL pull toward pi (the module docstring states the objective); pi when
    degenerate, where it equals FlexLoRA."""

    name = "fedhl"
    summary = "our reading of FedHL: FlexLoRA's full-rank basis with Gibbs weights that minimise product drift"
    paper = "FedHL (Peng et al., 2025): our reading of FedHL (no public code; rule not from the paper)"
    stats = {
        **FlexLoRA.stats,
        "self_weight": "max",
        "weight_shift": "max",
        "drift": "sum",
        "drift_ratio": "max",
    }
    beta: float = option(
        1.0,
        "how strongly drift lowers a neighbour's weight: w_ij ~ pi_ij exp(-beta delta_ij / dbar_i); 0 gives FlexLoRA",
        ge=0,
    )

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        dw = drift_weights(p.A, p.B, p.W, p.self_index, self.beta)
        out = super().mix(A, B, dw.W, round_=round_, self_index=self_index, ranks=ranks, context=context)
        n_out = p.W.shape[0]
        scale = float(context.scale) if context is not None else 1.0
        pi64 = p.W.to(torch.float64)
        dtype = compute_dtype_for(A, B)
        tiny = torch.finfo(torch.float64).tiny
        out.stats.update(
            self_weight=dw.W[torch.arange(n_out, device=A.device), p.self_index].to(dtype),
            weight_shift=(0.5 * (dw.W - pi64).abs().sum(-1)).to(dtype),
            drift=(scale**2 * dw.drift).to(dtype),
            drift_ratio=torch.where(dw.degenerate, 1.0, dw.drift / dw.drift_pi.clamp(min=tiny)).to(dtype),
        )
        return out
