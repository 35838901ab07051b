"""FedAvg-LoRA (FedIT): a coordinator averages A and B weighted by local data size and broadcasts the result.

Not decentralized: it is the server-based reference DeCAF should come close to. Its round plan is the one place the
data-size weighting is defined: every present agent's row holds the present agents' normalized data sizes, an
absent agent keeps its own adapter. The combine is then DLoRA's factor averaging with those rows; ``mix`` also
takes the plain vector of data sizes (n_in,) instead of a matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ShapeError
from .base import MixingPlan, MixOutput
from .dlora import DLoRA
from .registry import register


def server_weights(sizes, n_out: int | None = None) -> torch.Tensor:
    """The (n_out, n) matrix whose every row is ``sizes / sum(sizes)``."""
    s = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1)
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or float(s.sum()) <= 0:
        raise ShapeError("fedavg weights must be non-negative data sizes with a positive total.")
    p = s / s.sum()
    return p.expand(n_out if n_out is not None else s.numel(), -1).clone()


@register
@dataclass
class FedAvg(DLoRA):
    """Data-size-weighted mean of A and of B over all present agents, sent to everyone."""

    name = "fedavg"
    summary = "server baseline: data-size-weighted mean of A and B over the present agents, sent to all"
    paper = "FedIT (Zhang et al., 2024)"

    def plan(self, round_: int, network) -> MixingPlan:
        present = ~network.absent(round_)
        W = network.identity()  # the absent keep their own adapter
        if present.any():
            W[present] = server_weights(network.data_sizes * present, int(present.sum())).numpy()
        return MixingPlan(W, server=True)

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        Wt = torch.as_tensor(np.asarray(W) if isinstance(W, np.ndarray) else W)
        if Wt.ndim == 1:
            n_out = A.shape[0] if self_index is None else torch.as_tensor(self_index).numel()
            Wt = server_weights(Wt, n_out)
        return super().mix(A, B, Wt, round_=round_, self_index=self_index, ranks=ranks, context=context)
