"""An algorithm wrapper that also computes, every round, what the other consensus rule would make of the same
factors (claim C5 of the reproduction study).

DeCAF's and DLoRA's consensus steps differ only in how they aggregate; comparing two separately trained runs would
mix that difference with everything their trajectories do differently. So on the very inputs of each mixing step
of a DeCAF or a DLoRA run, :class:`ShadowConsensus` returns the wrapped method's own result (the run is unchanged:
the same factors, the same numbers) and reports, per agent and reduced over layers in quadrature:

* ``shadow_dlora_gap``: ``||s (B_decaf A_decaf - B_dlora A_dlora)||_F``, the product-space difference of the two
  consensus steps (the paper: about ``eta c^2 sqrt((|N_b(i)| - 1) / r)``, shrinking as r grows);
* ``shadow_decaf_norm``: ``||s B_decaf A_decaf||_F``; the study's records divide the two for
  ``shadow_dlora_gap_relative``;
* ``shadow_dlora_interference`` / ``shadow_decaf_truncation``: each rule's distance to the exact mixed product
  ``s sum_j pi_ij B_j A_j`` (DLoRA's cross terms vs DeCAF's TSVD tail).

Which trajectory matters: DeCAF re-expresses every agent's factors in a fresh SVD basis each round, so on DeCAF's
trajectory the agents' factors are in different gauges and a factor average of them is not what DLoRA would ever
see; on DLoRA's trajectory the factors stay close to each other. Both are measured.
"""

from __future__ import annotations

import torch

from decaf_lora import algorithms
from decaf_lora.algorithms import Algorithm, LayerContext, MixOutput

SHADOW_STATS = {
    "shadow_dlora_gap": "rss",
    "shadow_decaf_norm": "rss",
    "shadow_dlora_interference": "rss",
    "shadow_decaf_truncation": "rss",
}


def fro_of_product(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``||X Y||_F`` for batched ``X`` (.., d, K) and ``Y`` (.., K, k) from K x K Gram matrices, never forming X Y."""
    return ((X.mT @ X) * (Y @ Y.mT)).sum((-2, -1)).clamp(min=0).sqrt()


class ShadowConsensus(Algorithm):
    """``decaf`` or ``dlora`` exactly as they are, plus the other rule's result on the same inputs as statistics."""

    def __init__(self, inner: Algorithm):
        if inner.name not in ("decaf", "dlora"):
            raise ValueError(f"the shadow diagnostic compares decaf and dlora, not {inner.name!r}")
        self.inner = inner
        self.name = inner.name  # the run is the wrapped method's; only its statistics grow
        self.summary, self.paper = inner.summary, inner.paper
        self.stats = {**inner.stats, **SHADOW_STATS}
        self.decaf = inner if inner.name == "decaf" else algorithms.get("decaf")
        self.dlora = inner if inner.name == "dlora" else algorithms.get("dlora")

    def setup(self, facts) -> None:
        super().setup(facts)
        self.inner.setup(facts)

    def plan(self, round_, network):
        return self.inner.plan(round_, network)

    def options(self) -> dict:
        return self.inner.options()

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        out = self.inner.mix(A, B, W, round_=round_, self_index=self_index, ranks=ranks, context=context)
        A64, B64, rows = A.double().cpu(), B.double().cpu(), torch.as_tensor(W).double().cpu()
        dc = self.decaf.mix(A64, B64, rows, round_=round_, self_index=self_index)
        dl = self.dlora.mix(A64, B64, rows, round_=round_, self_index=self_index)
        # the exact mixed product sum_j w_ij B_j A_j as stacked factors (n_out, d, n_in r) x (n_out, n_in r, k)
        n_out, (n_in, d, r), k = rows.shape[0], B64.shape, A64.shape[-1]
        wB = (rows[:, :, None, None] * B64[None]).permute(0, 2, 1, 3).reshape(n_out, d, n_in * r)
        A_all = A64.reshape(1, n_in * r, k).expand(n_out, -1, -1)
        s = (context or LayerContext()).scale
        out.stats = {
            **out.stats,
            "shadow_dlora_gap": s * fro_of_product(torch.cat([dc.B, -dl.B], -1), torch.cat([dc.A, dl.A], -2)),
            "shadow_decaf_norm": s * fro_of_product(dc.B, dc.A),
            "shadow_dlora_interference": s * fro_of_product(torch.cat([dl.B, -wB], -1), torch.cat([dl.A, A_all], -2)),
            "shadow_decaf_truncation": s * fro_of_product(torch.cat([dc.B, -wB], -1), torch.cat([dc.A, A_all], -2)),
        }
        return out


def with_relative_gap(rows: list[dict]) -> list[dict]:
    """Metrics rows with ``shadow_dlora_gap_relative`` = gap / norm (both reduced over layers in quadrature)."""
    for m in rows:
        gap, norm = m.get("shadow_dlora_gap"), m.get("shadow_decaf_norm")
        if gap is not None and norm is not None:
            m["shadow_dlora_gap_relative"] = gap / norm if norm > 0 else 0.0
    return rows
