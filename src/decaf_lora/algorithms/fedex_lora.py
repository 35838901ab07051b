"""FedEx-LoRA in the gossip setting: DLoRA's factor mix plus the exact residual folded into a dense base correction.

Every agent's effective weight is ``W0 + E_i + s B_i A_i`` (``E_i`` the agent's dense correction of the frozen weight,
kept by the engine in weight units and added in the forward pass; ``s`` the LoRA scale). Agent i sets

``A_i+ = sum_j pi_ij A_j``, ``B_i+ = sum_j pi_ij B_j`` (the DLoRA mix) and
``E_i+ = sum_j pi_ij E_j + s (sum_j pi_ij B_j A_j - B_i+ A_i+)``,

so ``E_i+ + s B_i+ A_i+ = sum_j pi_ij (E_j + s B_j A_j)``: each round is exact gossip on the full effective weight
(DSGD/CTA with a LoRA parameterisation), with none of DLoRA's cross-term error. The price is that E is dense and goes
on the wire: ``(d + k) r + d k`` elements per layer and neighbour, ``1 + d k / ((d + k) r)`` times DLoRA's bytes.

Choices (the specification's [INFERENCE] items; gossip adaptation, not from the paper):

* The paper's server adds ``s (mean_k B_k A_k - B_bar A_bar)`` to one global W0. In gossip there is no global W0,
  so each agent keeps its own E and mixes it with the neighbours' (hence ``E`` in :meth:`sends`); adding only the
  local residual (``E_i + s R_i``, unsent) would let the E_i drift apart and is not offered.
* Weights are the round's gossip rows ``pi_ij``; the official code averages uniformly over clients, which is the
  complete graph with uniform weights.
* The residual is added in the layout of the frozen weight (d x k, nn.Linear's out x in), not transposed as in the
  official code (which only works there because the adapted layers were square).
* Heads are averaged with the same rows by the engine (the official code averages and copies them back).
* Heterogeneous ranks: the DLoRA mix is zero-padded and cut to each agent's rank; whatever that cut removes lands
  in the residual too, so the effective weight stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeError
from ..lowrank import compute_dtype_for
from .base import Algorithm, MixOutput, prepare
from .decaf import neighbourhoods
from .dlora import average_factors
from .registry import register


@register
@dataclass
class FedExLoRA(Algorithm):
    """DLoRA mix plus ``E_i <- sum_j pi_ij E_j + s (sum_j pi_ij B_j A_j - B_i A_i)``: exact gossip on the effective
    weight (gossip adaptation, not from the paper: per-agent E, mixed and sent)."""

    name = "fedex-lora"
    summary = "DLoRA mix plus the dense residual in a per-agent base correction E (exact; sends E: dense bytes)"
    paper = "FedEx-LoRA (Singhal et al., 2025)"
    supports_ranks = True
    corrects_base = True
    stats = {"fedex_residual_norm": "rss", "fedex_correction_norm": "rss"}

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        return ("A", "B", "E", "head")

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        n_in, (d, k) = A.shape[0], (B.shape[1], A.shape[2])
        E = None if context is None else context.E
        if E is None:
            raise ShapeError(
                "fedex-lora needs the stacked base corrections: pass context=LayerContext(E=..., scale=s) with E of "
                f"shape ({n_in}, {d}, {k}) (zeros before the first round)."
            )
        if tuple(E.shape) != (n_in, d, k):
            raise ShapeError(
                f"context.E has shape {tuple(E.shape)}; fedex-lora needs ({n_in}, {d}, {k}): one d x k correction per "
                "stacked input."
            )
        A_mix, B_mix = average_factors(p, ranks)
        # the residual must be taken against the factors as they will be stored (bf16 rounding included), or the
        # "exact" average of the effective weights would be off by that rounding every round
        A_mix, B_mix = A_mix.to(p.dtype_A).to(A_mix.dtype), B_mix.to(p.dtype_B).to(B_mix.dtype)
        dtype = compute_dtype_for(p.A, E)
        s = float(context.scale)
        # Only inputs with non-zero weight are read (one neighbourhood slot at a time, so no (n, m, d, k) copy).
        index, weight = neighbourhoods(p.W, p.self_index)
        weight = weight.to(dtype)
        mixed_E = torch.zeros(index.shape[0], d, k, dtype=dtype, device=A.device)
        mixed_product = torch.zeros_like(mixed_E)
        for slot in range(index.shape[1]):
            j, w = index[:, slot], weight[:, slot, None, None]
            mixed_E += w * E[j].to(dtype)
            mixed_product += w * (p.B[j].to(dtype) @ p.A[j].to(dtype))
        residual = s * (mixed_product - B_mix.to(dtype) @ A_mix.to(dtype))
        E_new = mixed_E + residual
        stats = {
            "fedex_residual_norm": torch.linalg.matrix_norm(residual),
            "fedex_correction_norm": torch.linalg.matrix_norm(E_new),
        }
        return p.cast(A_mix, B_mix, stats, E=E_new.to(E.dtype))
