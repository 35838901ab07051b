"""TAD-LoRA: ADF-LoRA with the phase length chosen from how fast the topology mixes.

TAD-LoRA (same authors as ADF-LoRA; arXiv 2602.00451) keeps ADF-LoRA's rule (train one factor per phase, mix both
factors every round) and picks the switching interval from the topology: its analysis trades the cross-term error
left by slow mixing against the staleness of the frozen factor, and secondary notes state the optimum as
``T* ~ 1 / sqrt(1 - rho)``. The constant and the exact definition of rho are not known (peers.md section 3.2), so
the rule here is **our reconstruction** (peers.md's recommendation, not the paper's formula):

    T = clip(round(c / sqrt(1 - rho)), 1, T_max),   c = 3, T_max = 15, rounded half up,

with ``rho = lambda_max(E[W^T W] - 1 1^T / N)``, Koloskova et al.'s contraction factor of random gossip, measured by
:meth:`decaf_lora.topology.Network.mixing_rate` on the rounds this run will see (its schedule, link failures and
absences included); for a static graph without faults it is ``lambda_2(W)^2``. ``c = 3`` reproduces ADF-LoRA's best
``T = 5`` at the papers' pairwise-encounter probability 0.1 with 10 agents; ``T_max = 15`` is the largest value of
the paper's grid. The phase length is chosen once, at set-up (again identically on resume), never mid-run.

Option ``T``: ``"auto"`` (the rule above) or an integer (a fixed phase length; then ``c`` and ``T_max`` are not
used). The chosen phase length is reported every round as the statistic ``phase_length`` and, with ``T="auto"``,
rho as ``mixing_rate`` (both the same for every agent and layer, reduced by "max"); they are also the attributes
:attr:`TADLoRA.phase_length` and :attr:`TADLoRA.rho` after set-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..errors import DecafError
from .adf_lora import ADFLoRA, _positive_int_problem
from .base import MixOutput, RunFacts
from .registry import register

AUTO = "auto"


def tad_phase_length(rho: float, c: float = 3.0, T_max: int = 15) -> int:
    """``clip(round(c / sqrt(1 - rho)), 1, T_max)``, rounded half up; ``rho >= 1`` (no mixing) gives ``T_max``."""
    gap = 1.0 - float(rho)
    if gap <= 0:
        return int(T_max)
    return int(min(max(math.floor(c / math.sqrt(gap) + 0.5), 1), T_max))


def _phase_length_problem(value) -> str | None:
    if value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "is invalid; use 'auto' (chosen from the topology's mixing rate) or an integer >= 1"
    return None


@register
@dataclass
class TADLoRA(ADFLoRA):
    """ADF-LoRA whose phase length follows the topology: ``T = clip(round(c / sqrt(1 - rho)), 1, T_max)``."""

    name = "tad-lora"
    summary = "ADF-LoRA with T chosen from the topology's mixing rate: T = clip(round(c / sqrt(1 - rho)), 1, T_max)"
    paper = "TAD-LoRA (Wang et al., 2026, arXiv 2602.00451); the T formula's constant and rho are our reconstruction"
    stats: ClassVar[dict[str, str]] = {"cross_term_error": "rss", "phase_length": "max", "mixing_rate": "max"}

    T: int | str = option(
        AUTO,
        "rounds per phase: 'auto' = clip(round(c / sqrt(1 - rho)), 1, T_max) from the run's mixing rate rho, or an "
        "integer >= 1",
        check=_phase_length_problem,
    )
    c: float = option(3.0, "constant of the auto rule (3 gives T = 5 for random pairwise encounters, p = 0.1)", gt=0)
    T_max: int = option(15, "largest phase length the auto rule may choose", ge=1, check=_positive_int_problem)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rho: float | None = None  # measured at set-up, with T='auto'
        self._chosen: int | None = None  # the auto rule's T

    def setup(self, facts: RunFacts) -> None:
        super().setup(facts)
        if self.T != AUTO:
            return
        if facts.network is None:
            raise DecafError(
                "tad-lora with T='auto' chooses T from the network's mixing rate, but the run facts hold no network; "
                "give T as an integer, or pass RunFacts(network=...)."
            )
        self.rho = float(facts.network.mixing_rate())
        self._chosen = tad_phase_length(self.rho, self.c, self.T_max)

    @property
    def phase_length(self) -> int:
        if self.T != AUTO:
            return int(self.T)
        if self._chosen is None:
            raise DecafError("tad-lora with T='auto' has no phase length before setup(facts) has measured the network.")
        return self._chosen

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        out = super().mix(A, B, W, round_=round_, self_index=self_index, ranks=ranks, context=context)
        n_out = out.A.shape[0]
        out.stats["phase_length"] = torch.full((n_out,), float(self.phase_length), dtype=torch.float64)
        if self.rho is not None:
            out.stats["mixing_rate"] = torch.full((n_out,), self.rho, dtype=torch.float64)
        return out
