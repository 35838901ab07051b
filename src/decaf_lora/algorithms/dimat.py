"""DIMAT for LoRA adapters: match each neighbour's rank directions to one's own by their activations, then average.

DIMAT (Saadati et al., CVPR 2024, arXiv 2404.08079) merges an agent with its neighbours after *activation
matching*: it runs all models on the same inputs, correlates their units (covariance over samples turned into a
correlation with ``std_a std_b`` clamped at ``eps = 1e-7``), solves the Hungarian assignment on the cross-correlation
(``scipy.optimize.linear_sum_assignment``, maximize), permutes each neighbour into the agent's unit order and takes the
``pi``-weighted average. The original matches whole CNNs; this is the LoRA mapping of peers.md section 9.2, a
**gossip adaptation, not from the paper** ([INFERENCE] there):

* W0 is frozen and shared, so the only symmetry left is the rank dimension: ``(B P)(P^T A) = B A`` for any signed
  permutation P (a linear bottleneck has no ReLU to break the sign symmetry).
* Agent i takes ``X_i``, this layer's inputs on a sample of **its own** data (``context.activations``; DIMAT's
  public code uses the global training set, which a decentralized agent does not have), and forms the bottleneck
  activations ``Z_j = X_i A_j^T`` of every input j it mixes. No neighbour model or data is needed: i holds A_j.
* ``C_ij`` is the centred cross-correlation of ``Z_i`` and ``Z_j`` (r x r); the Hungarian assignment maximizes
  ``sum_a |C_ij[a, sigma(a)]|`` and each matched pair takes the sign of its correlation, giving
  ``P[sigma(a), a] = sign(C_ij[a, sigma(a)])``. Inputs are aligned as ``B_j P``, ``P^T A_j``; agent i's own
  factors keep ``P = I`` (DIMAT's "model 0"). Then ``A_i' = sum_j pi_ij P^T A_j``, ``B_i' = sum_j pi_ij B_j P``.
  ``signed=False`` is DIMAT's own rule (plain correlation, permutations only) for comparison.

Choices where the spec is open (our reading):

* all-zero rows of ``context.activations`` (the engine pads with them) are left out of the statistics; fewer than
  two valid rows leave every P the identity;
* dead directions (zero variance, e.g. padded ranks or a zero row of A) get correlation 0 through DIMAT's clamp, and
  ties are broken toward the identity (a bonus of ``1e-6`` on the diagonal of the assignment), so a dead direction
  stays in its slot unless a live one must move there;
* heterogeneous ranks: the assignment covers the receiver's live slots only (the first ``ranks[i]``), padded slots
  stay fixed (peers.md 9.4), and the mix is masked to the receiver's rank;
* the cheap variant: every ``Z_j`` uses agent i's layer inputs, not the inputs j's own model would see there (that
  would need a forward pass of each neighbour's model per merge).

Where every P of an output agent is the identity (e.g. a common, untrained A), its result is DLoRA's bit for bit.

Statistics:

* ``matching_cost``: the mean over neighbours of ``1 - mean |C[a, sigma(a)]|`` over the matched live pairs (0 =
  perfectly matched, floored at 0 against rounding; plain ``C`` with ``signed=False``); max over layers;
* ``neighbours_permuted``: per layer, the number of neighbours whose P is not the identity (sign flips count);
  summed over layers;
* ``cross_term_error``: ``|s| ||sum_j pi_ij B_j A_j - B_i' A_i'||_F`` from r x r Grams; rss over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..config import option
from ..errors import ShapeError
from .base import Algorithm, MixOutput, check_ranks, mask_ranks, prepare
from .decaf import neighbourhoods
from .dlora import average_factors
from .fedrot_lora import cross_term_error
from .registry import register

#: Added to the diagonal of the assignment scores: among (near-)equal assignments the one with most fixed points wins.
IDENTITY_BONUS = 1e-6


def correlations(X: torch.Tensor, A_own: torch.Tensor, A_nb: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Centred cross-correlations of the bottleneck activations, DIMAT style.

    ``X`` (n, s, k): each output agent's layer inputs (all-zero rows are padding and are left out); ``A_own``
    (n, r, k); ``A_nb`` (n, m, r, k). Returns ``C`` (n, m, r, r) with ``C[i, j, a, b] = corr(Z_i[:, a], Z_j[:, b])``,
    ``Z_j = X_i A_j^T``, the covariance divided by ``std_a std_b`` clamped at ``eps``; ``live`` (n, m, r, r): pairs
    whose ``std_a std_b`` exceeds ``eps``; and ``enough`` (n,): at least two valid rows (else nothing is correlated).
    """
    valid = (X != 0).any(-1).to(X.dtype)  # (n, s)
    count = valid.sum(-1)  # (n,)
    denom = count.clamp_min(1)[:, None, None]
    Z_own = X @ A_own.mT  # (n, s, r)
    Z_nb = torch.einsum("isk,imrk->imsr", X, A_nb)  # (n, m, s, r)
    Z_own = (Z_own - (Z_own * valid[..., None]).sum(-2, keepdim=True) / denom) * valid[..., None]
    Z_nb = (Z_nb - (Z_nb * valid[:, None, :, None]).sum(-2, keepdim=True) / denom[:, None]) * valid[:, None, :, None]
    cov = torch.einsum("isa,imsb->imab", Z_own, Z_nb) / denom[:, None]
    std_own = (Z_own.pow(2).sum(-2) / denom[:, 0]).sqrt()  # (n, r)
    std_nb = (Z_nb.pow(2).sum(-2) / denom[:, None, 0]).sqrt()  # (n, m, r)
    outer = std_own[:, None, :, None] * std_nb[:, :, None, :]
    return cov / outer.clamp_min(eps), outer > eps, count >= 2


def signed_assignment(C: np.ndarray, live: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The signed permutation matching one neighbour to the receiver: ``sigma`` and the signs, length r.

    Slot a of the receiver takes the neighbour's direction ``sigma[a]`` times ``sign[a]``. Only the first ``live``
    slots (the receiver's rank) take part; the rest keep ``sigma[a] = a``.
    """
    r = C.shape[0]
    sigma, sign = np.arange(r), np.ones(r)
    block = C[:live, :live]
    score = (np.abs(block) if signed else block) + IDENTITY_BONUS * np.eye(live)
    rows, cols = linear_sum_assignment(score, maximize=True)
    sigma[rows] = cols
    if signed:
        sign[rows] = np.where(block[rows, cols] < 0, -1.0, 1.0)
    return sigma, sign


@register
@dataclass
class DIMAT(Algorithm):
    """Signed-permutation matching of the rank directions by their activations on one's own data, then averaging.

    Gossip adaptation, not from the paper: DIMAT matches whole networks' units; matching LoRA's rank directions with
    |corr| and signs, on the agent's own layer inputs, is peers.md section 9.2's mapping (our reading).
    """

    name = "dimat"
    summary = (
        "match neighbours' rank directions to one's own by activation correlation (Hungarian, signed), then average"
    )
    paper = "DIMAT (Saadati et al., CVPR 2024), LoRA gossip adaptation"
    supports_ranks = True
    needs = frozenset({"activations"})
    stats = {"matching_cost": "max", "neighbours_permuted": "sum", "cross_term_error": "rss"}
    signed: bool = option(
        True, "match |corr| and take signs from the matched correlations; False = DIMAT's plain correlation, no signs"
    )
    eps: float = option(1e-7, "lower clamp of std_a * std_b in the correlation (DIMAT's value)", gt=0)

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        n_out, r, k = p.W.shape[0], p.A.shape[1], p.A.shape[2]
        rk = check_ranks(ranks, n_out, r, p.A.device)
        X = None if context is None else context.activations
        if X is None:
            raise ShapeError(
                "dimat needs context.activations, each output agent's layer inputs (agents, samples, k) on its own "
                "data; pass a LayerContext with them (the engine does)."
            )
        if X.ndim != 3 or X.shape[0] != n_out or X.shape[-1] != k:
            raise ShapeError(
                f"context.activations has shape {tuple(X.shape)}; it must be ({n_out}, samples, {k}): one sample of "
                "this layer's inputs per output agent."
            )
        X = X.to(device=p.A.device, dtype=p.A.dtype)
        index, weight = neighbourhoods(p.W, p.self_index)
        m = index.shape[1]
        A_nb, B_nb = p.A[index], p.B[index]
        C, live, enough = correlations(X, p.own_A, A_nb, self.eps)
        C_np, live_np = C.cpu().numpy(), live.cpu().numpy()
        ranks_np = rk.cpu().numpy() if rk is not None else np.full(n_out, r)
        align = ((weight != 0) & (index != p.self_index[:, None]) & enough[:, None]).cpu().numpy()
        sigma = np.tile(np.arange(r), (n_out, m, 1))
        sign = np.ones((n_out, m, r))
        cost = np.zeros(n_out)
        permuted = np.zeros(n_out)
        for i in range(n_out):
            costs = []
            for j in np.nonzero(align[i])[0]:
                s, g = signed_assignment(C_np[i, j], int(ranks_np[i]), self.signed)
                sigma[i, j], sign[i, j] = s, g
                slots = np.arange(int(ranks_np[i]))
                matched = live_np[i, j, slots, s[slots]]
                if matched.any():
                    value = C_np[i, j, slots, s[slots]][matched]
                    costs.append(max(0.0, 1.0 - (np.abs(value) if self.signed else value).mean()))
                permuted[i] += bool((s != np.arange(r)).any() or (g < 0).any())
            cost[i] = np.mean(costs) if costs else 0.0
        sigma_t = torch.as_tensor(sigma, device=p.A.device)
        sign_t = torch.as_tensor(sign, device=p.A.device, dtype=p.A.dtype)
        A_al = torch.gather(A_nb, 2, sigma_t[..., None].expand(-1, -1, -1, k)) * sign_t[..., None]
        B_al = torch.gather(B_nb, 3, sigma_t[:, :, None, :].expand(-1, -1, B_nb.shape[2], -1)) * sign_t[:, :, None, :]
        A_new = torch.einsum("im,imrk->irk", weight, A_al)
        B_new = torch.einsum("im,imdr->idr", weight, B_al)
        B_new, A_new = mask_ranks(B_new, A_new, rk)
        # Where nothing was permuted, the DLoRA result itself, bit for bit.
        unchanged = torch.as_tensor(permuted == 0, device=p.A.device)[:, None, None]
        A_dl, B_dl = average_factors(p, ranks)
        A_new, B_new = torch.where(unchanged, A_dl, A_new), torch.where(unchanged, B_dl, B_new)
        scale = abs(float(context.scale))
        stats = {
            "matching_cost": torch.as_tensor(cost, dtype=torch.float64),
            "neighbours_permuted": torch.as_tensor(permuted, dtype=torch.float64),
            "cross_term_error": scale * cross_term_error(weight, B_al, A_al, B_new, A_new),
        }
        return p.cast(A_new, B_new, stats)
