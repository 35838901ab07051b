"""Local training: no communication; the lower bound every collaborative method must beat."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm, MixingPlan, MixOutput, prepare
from .registry import register


@register
@dataclass
class Local(Algorithm):
    """Each agent keeps its own factors (identity mixing) and sends nothing."""

    name = "local"
    summary = "no communication: each agent trains on its own data (the lower bound)"
    paper = "baseline"
    supports_ranks = True

    def plan(self, round_: int, network) -> MixingPlan:
        return MixingPlan(network.identity())

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        return ()

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index, row_sums_to_one=False)
        return MixOutput(A[p.self_index].clone(), B[p.self_index].clone())
