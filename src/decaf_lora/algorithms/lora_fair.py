"""LoRA-FAIR in the gossip setting: DLoRA's factor mix, then a correction of B toward the mixed product.

Agent i forms the DLoRA mix ``A_bar = sum_j pi_ij A_j``, ``B_bar = sum_j pi_ij B_j`` and the product it would get
by mixing products, ``dW = sum_j pi_ij B_j A_j``. Averaging misaligned factors leaves cross terms, so
``B_bar A_bar != dW``; LoRA-FAIR keeps ``A_bar`` and replaces B by ``B_bar + dB`` with

* ``objective='cosine'`` (the paper's, as secondary sources state it):
  ``dB = argmin 1 - cos(dW, (B_bar + dB) A_bar) + lam ||dB||_F`` with ``lam = 0.01``;
* ``objective='ls'`` (ours, a closed form named in the specification, not the paper's method):
  ``dB = argmin ||(B_bar + dB) A_bar - dW||_F^2 + mu ||dB||_F^2``, i.e. ``dB = (C - B_bar G)(G + mu I)^+``
  with the ridge ``mu = lam tr(G) / r`` relative to A_bar's mean squared singular value, so lam is scale free.

Everything is evaluated in the factored form of the specification (§6.2), so the d x k product never exists:
with ``G = A_bar A_bar^T`` (r x r) and ``C = sum_j pi_ij B_j (A_j A_bar^T)`` (d x r),
``<dW, B A_bar> = <C, B>``, ``||B A_bar||^2 = <B G, B>`` and
``||dW||^2 = sum_jl pi_ij pi_il <B_j^T B_l, A_j A_l^T>``. Setting these up costs O(m^2 r^2 (d + k)) per agent
(m = neighbourhood size), about DeCAF's price; each cosine iteration then costs O(r^3).

Choices the paper leaves open (the specification's [GAP] and [INFERENCE] items; our reading, not the paper's):

* Gossip adaptation, not from the paper: the server rule applied to each agent's neighbourhood with p_j -> pi_ij
  (on the complete graph it is the server rule with uniform weights).
* The "S" of the paper is read as the dissimilarity ``1 - cos`` (an argmin of a similarity would be meaningless),
  and ``||dB||`` as the plain (not squared) Frobenius norm, the literal form. Because the cosine is scale free and
  ``||dB||`` is not, lam is in units of 1 / B: the paper's 0.01 was tuned on ViT-B/16 factors of rank 16, and on
  factors of a very different size the same lam corrects more or less (a gradient of the cosine smaller than lam
  leaves dB = 0 exactly: the norm acts as a threshold).
* Solver: the paper uses SGD on the server with unstated steps and iterations. We run ``iters`` deterministic
  proximal-gradient steps from ``dB = 0``: a gradient step on the cosine, the exact proximal map of
  ``lam ||dB||_F`` (group soft-thresholding, which handles the kink at dB = 0 that plain (S)GD only circles), and
  an exact minimization along the ray ``c (B_bar + dB)``, on which the cosine is constant (only the penalty decides
  the magnitude there, and gradient steps alone creep along that flat valley: about 1e-3 short of the optimum
  after 1000 steps on small random factors, against 1e-10 in 100 with the ray step). The step is
  ``inner_lr h^2 / lambda_max(G)`` with ``h = ||B A_bar||_F`` recomputed each step: the cosine is homogeneous of
  degree 0 in B and its curvature scales like ``lambda_max(G) / h^2``, so the step follows the scale of the factors
  instead of needing a tuned absolute learning rate. All iterates stay in the span of ``[B_bar, C]``, so the steps
  run on 2r x r coefficients at O(r^3) each, independent of d. The map is continuous in its inputs (no
  accept/reject branches), so rounding differences (another stacking order under torchrun) cannot flip a decision
  mid-way. A final safeguard keeps the DLoRA factors if the iterate ended above the starting objective: the result
  is never worse than DLoRA in its own objective.
* Zero guards (C8): an agent whose mixed product is numerically zero (round 0, B = 0 everywhere), or, for the
  cosine, whose ``B_bar A_bar`` is numerically zero (the cosine's start is undefined), keeps the DLoRA mix; counted
  in ``fair_skipped``.
* Heterogeneous ranks (the paper treats equal ranks only): agent i keeps its own rank, so ``A_bar`` and ``B_bar``
  are masked to ``ranks[i]`` and so is dB; the target ``dW`` keeps every neighbour's full product. Padded rows of
  ``A_bar`` make G singular, which the pseudo-inverse (ls) and the rank mask (cosine) handle.
* Computation in float64 whatever the training dtype: the r x r Grams and the ``||dW||^2`` sum cancel badly in
  float32, and they are small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from .base import Algorithm, MixOutput, check_ranks, prepare
from .decaf import neighbourhoods
from .dlora import average_factors
from .registry import register

OBJECTIVES = ("cosine", "ls")


@dataclass
class FactoredTarget:
    """The mixed product ``dW_i = sum_j pi_ij B_j A_j`` of every output agent, seen through ``A_bar_i``.

    ``C`` (n, d, r) ``= dW A_bar^T``; ``G`` (n, r, r) ``= A_bar A_bar^T``; ``norm`` (n,) ``= ||dW||_F``;
    ``zero`` (n,) marks agents whose mixed product is below the rounding noise of its Gram sum.
    """

    C: torch.Tensor
    G: torch.Tensor
    norm: torch.Tensor
    zero: torch.Tensor


def factored_target(
    A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, self_index, A_bar: torch.Tensor
) -> FactoredTarget:
    """Everything the correction needs about ``dW_i``, from the neighbourhood's factors only (float64 in and out)."""
    index, weight = neighbourhoods(W, self_index)  # only inputs with non-zero weight: unsent/rejected rows stay out
    A_nb, B_nb = A[index], B[index]  # (n, m, r, k), (n, m, d, r)
    C = torch.einsum("im,imdr,imrs->ids", weight, B_nb, torch.einsum("imrk,isk->imrs", A_nb, A_bar))
    G = A_bar @ A_bar.mT
    gram_b = torch.einsum("iadr,ibds->iabrs", B_nb, B_nb)
    gram_a = torch.einsum("iark,ibsk->iabrs", A_nb, A_nb)
    norm2 = torch.einsum("ia,ib,iabrs,iabrs->i", weight, weight, gram_b, gram_a)
    bound = (weight * torch.linalg.matrix_norm(B_nb) * torch.linalg.matrix_norm(A_nb)).sum(1)
    m, r = index.shape[1], A.shape[1]
    zero = norm2 <= noise_floor(m * r) * bound**2
    return FactoredTarget(C, G, norm2.clamp(min=0).sqrt(), zero)


def noise_floor(terms: int) -> float:
    """Relative size below which a squared norm summed from ``terms`` float64 Gram entries is rounding noise."""
    return 64 * terms * torch.finfo(torch.float64).eps


def inner(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Batched Frobenius inner product of (n, d, r) tensors."""
    return (X * Y).sum((-2, -1))


def cosine(B: torch.Tensor, t: FactoredTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(dW, B A_bar)`` per agent (0 where either side is zero) and ``h = ||B A_bar||_F``."""
    h = inner(B @ t.G, B).clamp(min=0).sqrt()
    den = t.norm * h
    return torch.where(den > 0, inner(t.C, B) / den.clamp(min=torch.finfo(h.dtype).tiny), 0.0), h


def relative_error(B: torch.Tensor, t: FactoredTarget) -> torch.Tensor:
    """``||B A_bar - dW||_F / ||dW||_F`` per agent, from the factored terms."""
    sq = inner(B @ t.G, B) - 2 * inner(t.C, B) + t.norm**2
    return sq.clamp(min=0).sqrt() / t.norm.clamp(min=torch.finfo(sq.dtype).tiny)


def cosine_correction(
    B_bar: torch.Tensor,
    t: FactoredTarget,
    skip: torch.Tensor,
    lam: float,
    iters: int,
    inner_lr: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """dB minimizing ``1 - cos(dW, (B_bar + dB) A_bar) + lam ||dB||_F`` by proximal gradient from dB = 0 (see the
    module docstring); agents in ``skip`` get dB = 0, and ``keep`` (n, 1, r) masks padded rank columns.

    Every iterate is ``B = P Z`` with ``P = [B_bar, C]`` (d x 2r) and ``Z`` (2r x r): the start is ``Z = [I; 0]``,
    and the gradient (a combination of C and ``B G``), the shrinkage and the ray scaling all stay in that span. So
    the iterations run on Z alone, with every inner product read from the 2r x 2r Gram ``Q = P^T P``: O(r^3) per
    step, independent of d, and the d x r matrices are touched twice (Q, and the final ``P Z``).
    """
    n, r = B_bar.shape[0], B_bar.shape[-1]
    tiny = torch.finfo(B_bar.dtype).tiny
    P = torch.cat([B_bar, t.C], dim=-1)
    Q = P.mT @ P
    eye, zero = torch.eye(r, dtype=P.dtype, device=P.device), torch.zeros(r, r, dtype=P.dtype, device=P.device)
    at_bar, at_C = torch.cat([eye, zero]), torch.cat([zero, eye])  # B_bar = P at_bar, C = P at_C

    def gram(X, Y):  # <P X, P Y>_F per agent
        return (X * (Q @ Y)).sum((-2, -1))

    def col(x):
        return x[:, None, None]

    lam_max = torch.linalg.eigvalsh(t.G)[:, -1].clamp(min=tiny)
    Z = at_bar.expand(n, 2 * r, r).clone()
    for _ in range(iters):
        QZ = Q @ Z
        h2 = ((Z.mT @ QZ) * t.G).sum((-2, -1)).clamp(min=tiny)  # ||B A_bar||^2 = <B G, B>
        c = (at_C * QZ).sum((-2, -1))  # <C, B>
        grad = -(at_C - col(c / h2) * (Z @ t.G)) / col((t.norm * h2.sqrt()).clamp(min=tiny))
        step = col(inner_lr * h2 / lam_max)
        half = Z - at_bar - step * grad
        size = col(gram(half, half).clamp(min=0).sqrt())
        Z = at_bar + half * (1 - step * lam / size.clamp(min=tiny)).clamp(min=0)
        # The cosine is flat along the ray c B; the point of the ray closest to B_bar (exact, cosine unchanged)
        # settles the magnitude that plain gradient steps only creep toward.
        ray = gram(at_bar, Z) / gram(Z, Z).clamp(min=tiny)
        Z = torch.where(col(ray) > 0, col(ray) * Z, Z)
        if keep is not None:
            Z = at_bar + (Z - at_bar) * keep
        Z = torch.where(col(skip), at_bar, Z)
    dB = P @ (Z - at_bar)
    if keep is not None:
        dB = dB * keep
    dB = torch.where(col(skip), 0.0, dB)
    start = 1 - cosine(B_bar, t)[0]
    end = 1 - cosine(B_bar + dB, t)[0] + lam * torch.linalg.matrix_norm(dB)
    return torch.where(col(end > start), 0.0, dB)


def ls_correction(
    B_bar: torch.Tensor,
    t: FactoredTarget,
    skip: torch.Tensor,
    lam: float,
    ranks: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ridge least-squares dB ``(C - B_bar G)(G + mu I)^+`` with ``mu = lam tr(G) / rank``; the pseudo-inverse
    covers a singular G (padded ranks, or lam = 0 with a rank-deficient A_bar)."""
    r = t.G.shape[-1]
    rank = torch.full_like(t.norm, r) if ranks is None else ranks.to(t.norm.dtype)
    mu = lam * t.G.diagonal(dim1=-2, dim2=-1).sum(-1) / rank
    eye = torch.eye(r, dtype=t.G.dtype, device=t.G.device)
    dB = (t.C - B_bar @ t.G) @ torch.linalg.pinv(t.G + mu[:, None, None] * eye, hermitian=True)
    if keep is not None:
        dB = dB * keep
    return torch.where(skip[:, None, None], 0.0, dB)


@register
@dataclass
class LoRAFAIR(Algorithm):
    """DLoRA mix, then ``B <- B_bar + dB`` so that ``B A_bar`` is closest to the mixed product (gossip adaptation,
    not from the paper: the server rule applied per neighbourhood; the solver and ``objective='ls'`` are ours)."""

    name = "lora-fair"
    summary = "DLoRA mix, then correct B so B A_bar matches sum_j pi_ij B_j A_j (cosine + lam ||dB||; factored)"
    paper = "LoRA-FAIR (Bian et al., 2025)"
    supports_ranks = True
    stats = {
        "fair_dB_norm": "rss",
        "fair_cosine_gap_before": "max",
        "fair_cosine_gap_after": "max",
        "fair_rel_error_before": "max",
        "fair_rel_error_after": "max",
        "fair_skipped": "sum",
    }
    objective: str = option(
        "cosine",
        "cosine: the paper's 1 - cos + lam ||dB|| by proximal gradient; ls: ours, closed-form ridge least squares",
        choices=OBJECTIVES,
    )
    lam: float = option(
        0.01,
        "pull of dB toward 0: weight of ||dB||_F (cosine; units of 1/B) or ridge relative to tr(A_bar A_bar^T)/r (ls)",
        ge=0,
    )
    iters: int = option(100, "proximal-gradient iterations of the cosine objective (objective=cosine)", ge=1)
    inner_lr: float = option(
        1.0,
        "step of those iterations, in units of ||B A_bar||^2 / lambda_max(A_bar A_bar^T) (objective=cosine)",
        gt=0,
        le=2,
    )

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        rk = check_ranks(ranks, p.W.shape[0], A.shape[1], A.device)
        A_mix, B_mix = average_factors(p, ranks)  # exactly DLoRA's mix, in DLoRA's compute dtype
        f64 = torch.float64
        A_bar, B_bar = A_mix.to(f64), B_mix.to(f64)
        t = factored_target(p.A.to(f64), p.B.to(f64), p.W.to(f64), p.self_index, A_bar)
        keep = None if rk is None else (torch.arange(A.shape[1], device=A.device)[None, :] < rk[:, None])[:, None, :]
        if self.objective == "cosine":
            # the cosine's start is undefined where B_bar A_bar is (numerically) zero: keep the DLoRA mix there
            h = cosine(B_bar, t)[1]
            scale = torch.linalg.matrix_norm(B_bar) * torch.linalg.matrix_norm(A_bar)
            skip = t.zero | (h**2 <= noise_floor(A.shape[1]) * scale**2)
            dB = cosine_correction(B_bar, t, skip, self.lam, self.iters, self.inner_lr, keep)
        else:
            skip = t.zero
            dB = ls_correction(B_bar, t, skip, self.lam, rk, keep)
        B_new = B_bar + dB  # exactly B_bar (DLoRA's B) wherever dB = 0
        live = ~t.zero  # agents with a mixed product to match; the others report zeros
        stats = {
            "fair_dB_norm": torch.linalg.matrix_norm(dB),
            "fair_cosine_gap_before": torch.where(live, 1 - cosine(B_bar, t)[0], 0.0),
            "fair_cosine_gap_after": torch.where(live, 1 - cosine(B_new, t)[0], 0.0),
            "fair_rel_error_before": torch.where(live, relative_error(B_bar, t), 0.0),
            "fair_rel_error_after": torch.where(live, relative_error(B_new, t), 0.0),
            "fair_skipped": skip.to(f64),
        }
        return p.cast(A_mix, B_new, stats)
