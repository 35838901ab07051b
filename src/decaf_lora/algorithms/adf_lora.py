"""ADF-LoRA: train one factor per phase of ``T`` rounds, mix both factors every round (gossip-native).

ADF-LoRA (Wang, Li, Zhou, Li, Liu; arXiv 2511.18291) moves RoLoRA's alternation to peer-to-peer: in phase ``B`` the
agents train B only, in phase ``A`` they train A only, and every round each agent mixes *both* factors with the
DLoRA rule ``A_i <- sum_j pi_ij A_j``, ``B_i <- sum_j pi_ij B_j``. The frozen factor keeps being averaged during
its frozen phase, so it approaches consensus and the cross-term error of factor-wise mixing,
``sum_j pi_ij B_j A_j - (sum_j pi_ij B_j)(sum_j pi_ij A_j)``, shrinks as a phase goes on.

What comes from where (peers.md section 2):

* Train one factor, mix both: the paper's abstract. Phases of ``T`` rounds with ``T = 5`` the best value: secondary
  notes. That ``T`` counts rounds per phase is an inference (from TAD-LoRA's "switching interval").
* B first (``first_phase="B"``): **our choice**, not the paper's (its order is unknown). LoRA starts with B = 0, so
  the gradient of A is zero until B has moved; an A-first schedule would waste its first phase.
* Head (``head="frozen"``, the default): secondary notes report that ADF-LoRA freezes the classification head. A
  frozen head is never trained and never sent; every agent starts from the same head, so it stays common and
  nothing needs mixing. ``head="trained"`` trains the head every round and averages it every round (as DLoRA and
  DeCAF do): an ablation that makes comparisons with those methods head-for-head.
* Heterogeneous ranks: zero-padded DLoRA mixing, masked back to each agent's rank (our choice; the paper has none).

Statistic ``cross_term_error``: per output agent, ``s * ||sum_j pi_ij B_j A_j - B_i' A_i'||_F`` (``B_i', A_i'`` the
mixed factors, ``s`` the layer's LoRA scale), reduced over layers in quadrature. It is computed from the r x r Gram
blocks of the neighbourhood's factors, centred on their weighted means (:func:`cross_term_error`), never from a d x k
matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from .base import FACTORS, Algorithm, MixOutput, check_ranks, prepare
from .decaf import neighbourhoods
from .dlora import average_factors
from .registry import register

#: What the alternating methods do with the trained non-LoRA parameters (a classification head).
HEAD_POLICIES = ("frozen", "trained")
#: Elements of one Gram-based error computation held at once (float64), bounding its memory (2^24 x 8 B = 128 MiB).
ERROR_CHUNK_ELEMENTS = 1 << 24


def _centred(G: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram blocks of deviations from a weighted mean, from the raw blocks.

    ``G`` (c, m, m, r, r) holds ``G_jl = X_j^T X_l`` (or ``X_j X_l^T``) for each output agent's m inputs, ``w``
    (c, m) weights summing to 1. Returns the blocks of ``X_j - Xbar`` (same shape), ``X_j^T Xbar`` (c, m, r, r) and
    ``Xbar^T Xbar`` (c, r, r), ``Xbar = sum_j w_j X_j``.
    """
    row = torch.einsum("nl,njlrs->njrs", w, G)
    both = torch.einsum("nj,njrs->nrs", w, row)
    dev = G - row[:, :, None] - row.mT[:, None] + both[:, None, None]
    return dev, row, both


def cross_term_error(p, ranks=None, scale: float = 1.0) -> torch.Tensor:
    """Per output agent, ``|s| * ||sum_j w_ij B_j A_j - B_i' A_i'||_F`` for the DLoRA mix ``B_i' = sum_j w_ij B_j``,
    ``A_i' = sum_j w_ij A_j`` (masked to agent i's rank when ``ranks`` is given), over the agents its row weighs.

    ``p``: the prepared inputs (:func:`~decaf_lora.algorithms.base.prepare`), whose weights are those the mix used.
    With ``Bbar``, ``Abar`` the weighted means (each row's weights normalized to sum to 1, which the mix's rows do up
    to rounding) and ``P_i`` the mask of agent i's rank,

        ``sum_j w_j B_j A_j - Bbar P_i Abar = sum_j w_j (B_j - Bbar)(A_j - Abar) + Bbar (I - P_i) Abar``,

    and ``||X Y||_F^2 = sum((X^T X) * (Y Y^T))`` turns its norm into sums over the r x r Gram blocks ``B_j^T B_l``
    and ``A_j A_l^T`` of the neighbourhood (the d x k matrices never exist), centred on the means. Everything is
    float64. Because the norm is summed in squares, its floor is about ``1e-8 ||B|| ||A||`` (the square root of
    float64's rounding): an error reads accurately above that floor, and an exact zero reads as noise of that size.
    The floor lies below the rounding of float32 factors themselves (6e-8 relative).
    The blocks come from one Gram of all stacked inputs when that is cheaper (``n_in^2 <= n_out m^2``, e.g. dense
    graphs or few agents) or per output agent otherwise; cost ``O((d + k) r^2 min(n_in^2, n_out m^2))``, processed in
    chunks of bounded memory. The result is the rule's exact error, before the mixed factors are rounded to the
    training dtype.
    """
    index, weight = neighbourhoods(p.W, p.self_index)
    n_out, m = index.shape
    n_in, r, k = p.A.shape
    d = p.B.shape[1]
    rk = check_ranks(ranks, n_out, r, p.A.device)
    f64 = torch.float64
    whole = n_in * n_in <= n_out * m * m and n_in * n_in * r * r * 2 <= ERROR_CHUNK_ELEMENTS
    # B transposed, (n_in, r, d): a neighbourhood's B_j^T then stack as rows, like its A_j, without another copy
    Bt = p.B.mT.to(f64, memory_format=torch.contiguous_format)
    A64 = p.A.to(f64)
    if whole:
        flat_B, flat_A = Bt.reshape(n_in * r, d), A64.reshape(n_in * r, k)
        GB_all = (flat_B @ flat_B.T).reshape(n_in, r, n_in, r).transpose(1, 2)  # [i, j] = B_i^T B_j
        GA_all = (flat_A @ flat_A.T).reshape(n_in, r, n_in, r).transpose(1, 2)  # [i, j] = A_i A_j^T
        chunk = max(1, ERROR_CHUNK_ELEMENTS // (4 * m * m * r * r))
    else:
        chunk = max(1, ERROR_CHUNK_ELEMENTS // (m * r * (d + k) + 4 * m * m * r * r))
    out = []
    for lo in range(0, n_out, chunk):
        idx, w = index[lo : lo + chunk], weight[lo : lo + chunk].to(f64)
        w = w / w.sum(1, keepdim=True)
        if whole:
            GB, GA = GB_all[idx[:, :, None], idx[:, None, :]], GA_all[idx[:, :, None], idx[:, None, :]]
        else:
            c = idx.shape[0]
            X, Y = Bt[idx].reshape(c, m * r, d), A64[idx].reshape(c, m * r, k)
            GB = (X @ X.mT).reshape(c, m, r, m, r).transpose(2, 3)
            GA = (Y @ Y.mT).reshape(c, m, r, m, r).transpose(2, 3)
        dB, rowB, bothB = _centred(GB, w)  # (B_j - Bbar)^T (B_l - Bbar), B_j^T Bbar, Bbar^T Bbar
        dA, rowA, bothA = _centred(GA, w)  # (A_j - Abar)(A_l - Abar)^T, A_j Abar^T, Abar Abar^T
        squared = torch.einsum("nj,nl,njlrs,njlrs->n", w, w, dB, dA)
        if rk is not None:  # + Bbar Q Abar, Q = I - P_i the dropped columns: cross terms and its own norm
            q = (torch.arange(r, device=rk.device)[None, :] >= rk[lo : lo + chunk, None]).to(f64)  # (c, r)
            cross = torch.einsum("nj,njrs,ns,njrs->n", w, rowB - bothB[:, None], q, rowA - bothA[:, None])
            own = torch.einsum("nr,nrs,ns,nrs->n", q, bothB, q, bothA)
            squared = squared + 2 * cross + own
        out.append(squared.clamp(min=0).sqrt())
    return abs(float(scale)) * torch.cat(out)


def _positive_int_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "is invalid; use an integer >= 1"
    return None


@dataclass
class Alternating(Algorithm):
    """The phase schedule the alternating family shares (not a method by itself).

    Round ``t`` (0-based) trains :meth:`phase` ``(t)``: ``first_phase`` for rounds ``0 .. L-1``, the other factor
    for ``L .. 2L-1``, and so on, with ``L`` = :attr:`phase_length`.
    """

    first_phase: str = option(
        "B", "factor trained in the first phase (B: A's gradient is zero while B = 0)", choices=FACTORS
    )
    head: str = option(
        "frozen",
        "classification head: frozen (never trained or sent; the papers' setting) or trained (trained and averaged "
        "every round, as dlora/decaf do)",
        choices=HEAD_POLICIES,
    )

    stats: ClassVar[dict[str, str]] = {"cross_term_error": "rss"}
    supports_ranks: ClassVar[bool] = True

    @property
    def phase_length(self) -> int:
        """Rounds per phase."""
        raise NotImplementedError

    def phase(self, round_: int) -> str:
        """The factor trained in ``round_``: "A" or "B"."""
        other = "A" if self.first_phase == "B" else "B"
        return self.first_phase if (int(round_) // self.phase_length) % 2 == 0 else other

    def _with_head(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        return parts + ("head",) if self.head == "trained" else parts

    def trainable(self, round_: int = 0) -> tuple[str, ...]:
        return self._with_head((self.phase(round_),))


@register
@dataclass
class ADFLoRA(Alternating):
    """Alternating factor training with both factors gossiped every round (ADF-LoRA); phases of ``T`` rounds."""

    name = "adf-lora"
    summary = "alternating: train B for T rounds, then A for T rounds, ...; mix both factors every round (DLoRA rule)"
    paper = "ADF-LoRA (Wang et al., 2025, arXiv 2511.18291); the B-first phase order is ours"

    T: int = option(5, "rounds per phase (ADF-LoRA's best reported value is 5)", ge=1, check=_positive_int_problem)

    @property
    def phase_length(self) -> int:
        return self.T

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        return self._with_head(("A", "B"))

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        A_new, B_new = average_factors(p, ranks)
        scale = context.scale if context is not None else 1.0
        return p.cast(A_new, B_new, {"cross_term_error": cross_term_error(p, ranks, scale)})
