"""A simulation that also computes, every round, what the other consensus rule would make of the same factors (C5).

DeCAF's and DLoRA's consensus steps differ only in how they aggregate; comparing two separately trained runs would
mix that difference with everything their trajectories do differently. So on the very inputs of each mixing step
of a DeCAF or a DLoRA run this computes both rules' outputs and logs per agent, summed over layers in quadrature:

* ``shadow_dlora_gap``: ``||s (B_decaf A_decaf - B_dlora A_dlora)||_F``, the product-space difference of the two
  consensus steps (the paper: about ``eta c^2 sqrt((|N_b(i)| - 1) / r)``, shrinking as r grows);
* ``shadow_dlora_gap_relative``: the same over ``||s B_decaf A_decaf||_F``;
* ``shadow_dlora_interference`` / ``shadow_decaf_truncation``: each rule's distance to the exact mixed product
  ``s sum_j pi_ij B_j A_j`` (DLoRA's cross terms vs DeCAF's TSVD tail).

Which trajectory matters: DeCAF re-expresses every agent's factors in a fresh SVD basis each round, so on DeCAF's
trajectory the agents' factors are in different gauges and a factor average of them is not what DLoRA would ever
see; on DLoRA's trajectory the factors stay close to each other. Both are measured. The run itself is the plain
Simulation: this overrides one engine hook and changes no factor.
"""

from __future__ import annotations

import numpy as np
import torch

from decaf_lora import algorithms
from decaf_lora.engine import Simulation
from decaf_lora.engine.simulation import mixing_inputs


def fro_of_product(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``||X Y||_F`` for batched ``X`` (.., d, K) and ``Y`` (.., K, k) from K x K Gram matrices, never forming X Y."""
    return ((X.mT @ X) * (Y @ Y.mT)).sum((-2, -1)).clamp(min=0).sqrt()


class ShadowConsensusSimulation(Simulation):
    @torch.no_grad()
    def apply_mixing(self, round_: int, W: np.ndarray, own: list[int]) -> dict[str, dict[int, float]]:
        if self.algorithm.name not in ("decaf", "dlora"):
            return super().apply_mixing(round_, W, own)
        st = self.states
        inputs, rows, self_index = mixing_inputs(W, own)
        rows = rows.double()
        decaf = self.algorithm if self.algorithm.name == "decaf" else algorithms.get("decaf")
        dlora = self.algorithm if self.algorithm.name == "dlora" else algorithms.get("dlora")
        outputs = []
        for l in range(len(st.layers)):
            A, B = st.A[l][inputs].double().cpu(), st.B[l][inputs].double().cpu()
            dc = decaf.mix(A, B, rows, round_=round_, self_index=self_index)
            dl = dlora.mix(A, B, rows, round_=round_, self_index=self_index)
            # the exact mixed product sum_j w_ij B_j A_j as stacked factors (n_out, d, n_in r) x (n_out, n_in r, k)
            n_out, (n_in, d, r), k = len(own), B.shape, A.shape[-1]
            wB = (rows[:, :, None, None] * B[None]).permute(0, 2, 1, 3).reshape(n_out, d, n_in * r)
            A_all = A.reshape(1, n_in * r, k).expand(n_out, -1, -1)
            outputs.append((dc.B, dc.A, dl.B, dl.A, wB, A_all))
        diagnostics = super().apply_mixing(round_, W, own)
        gap2, norm2, interf2, trunc2 = (torch.zeros(len(own), dtype=torch.float64) for _ in range(4))
        for l, (Bd, Ad, Bl, Al, wB, A_all) in enumerate(outputs):
            s2 = st.layers[l].scale ** 2
            gap2 += s2 * fro_of_product(torch.cat([Bd, -Bl], -1), torch.cat([Ad, Al], -2)) ** 2
            norm2 += s2 * fro_of_product(Bd, Ad) ** 2
            interf2 += s2 * fro_of_product(torch.cat([Bl, -wB], -1), torch.cat([Al, A_all], -2)) ** 2
            trunc2 += s2 * fro_of_product(torch.cat([Bd, -wB], -1), torch.cat([Ad, A_all], -2)) ** 2
        rel = torch.where(norm2 > 0, gap2.sqrt() / norm2.sqrt().clamp(min=1e-300), torch.zeros_like(gap2))
        for name, v in (
            ("shadow_dlora_gap", gap2.sqrt()),
            ("shadow_dlora_gap_relative", rel),
            ("shadow_dlora_interference", interf2.sqrt()),
            ("shadow_decaf_truncation", trunc2.sqrt()),
        ):
            diagnostics[name] = dict(zip(own, v.tolist()))
        return diagnostics
