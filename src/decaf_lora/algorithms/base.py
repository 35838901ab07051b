"""The narrow interface every aggregation method implements.

An algorithm answers, for each round and in the style of Flower's strategies:

* :meth:`Algorithm.plan`: the round's mixing, from the :class:`~decaf_lora.topology.Network` (graph rows with this
  round's faults for gossip methods, data-size rows over the present agents for a server method, the identity for
  local training). The engine never asks *which* method it runs; it executes the plan.
* :meth:`Algorithm.sends`: which parts of an agent's adapter go on the wire (``A``, ``B``, ``E`` the dense base
  correction, ``head`` the trained non-LoRA parameters). A part that is never sent stays personal: it is neither
  transmitted nor mixed. The engine derives the payload (and its bytes) from this alone.
* :meth:`Algorithm.trainable`: which parts receive gradients this round (phase-alternating methods change it).
* :meth:`Algorithm.mix`: how an agent combines its own factors with what it received, for one adapted layer.

``mix`` works on stacked factors, ``A`` as (n_in, r, k) and ``B`` as (n_in, d, r), and a mixing matrix ``W`` of
shape (n_out, n_in) whose row i holds the weights output agent i gives to each stacked input; ``self_index`` says
where each output agent's own factors sit. The simulator and a distributed process make the very same call: their
own agents plus what they received. Factors a neighbour did not send are **not available** (C2 of the peer
specification): the engine fills them with NaN, so a method that reads them fails loudly instead of silently
mixing stale data; take them from the agent itself (``self_index``) instead.

Methods that need more declare it and receive it in ``context`` (:class:`LayerContext`): the agent's own
start-of-round factors, a sample of the layer's input activations on its own data, per-agent state that lives
across rounds (saved in checkpoints, :meth:`Algorithm.init_state`), the layers' base corrections; topology facts
(spectral gap, mixing rate) arrive once, at :meth:`Algorithm.setup`. Statistics returned by ``mix`` reach the
metrics, reduced over layers by the rule declared in :attr:`Algorithm.stats`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import check_fields
from ..errors import ShapeError
from ..lowrank import compute_dtype_for, mask_ranks  # noqa: F401 - mask_ranks is part of this interface

FACTORS = ("A", "B")
#: Everything an agent may send or train: the two factors, a dense base correction of the frozen weight, the head.
PARTS = ("A", "B", "E", "head")
#: How a per-layer statistic becomes one number per agent per round.
REDUCTIONS = ("sum", "max", "rss")
#: Per-layer context an algorithm may ask the engine for (:attr:`Algorithm.needs`).
NEEDS = ("start_factors", "activations")


@dataclass(frozen=True)
class MixingPlan:
    """One round's mixing: ``W[i, j]`` is the weight agent i gives to what agent j sent (rows sum to 1).

    ``server``: the exchange goes through a coordinator (each present agent uploads once and downloads the result
    once; the distributed engine gathers every payload instead of sending point to point). Otherwise an agent sends
    its payload to every agent whose row weighs it.
    """

    W: np.ndarray
    server: bool = False

    def receivers(self, sender: int) -> np.ndarray:
        """Agents other than ``sender`` whose rows weigh ``sender``."""
        col = self.W[:, sender].copy()
        col[sender] = 0
        return np.nonzero(col)[0]


@dataclass(frozen=True)
class LayerInfo:
    """One adapted layer as an algorithm sees it at set-up (for :meth:`Algorithm.init_state`)."""

    index: int
    name: str
    d: int
    k: int
    r: int
    scale: float


@dataclass
class RunFacts:
    """What an algorithm may know about the run at construction: the network (spectral gap, mixing rate, data
    sizes), the number of agents, each agent's rank, the adapted layers and the training seed."""

    n_agents: int
    network: Any = None  # decaf_lora.topology.Network
    ranks: tuple[int, ...] | None = None
    layers: tuple[LayerInfo, ...] = ()
    seed: int = 0


@dataclass
class LayerContext:
    """Everything beyond the stacked factors that ``mix`` may use for one layer (fields are None unless asked for)."""

    layer: int = 0
    name: str = ""
    scale: float = 1.0
    agents: torch.Tensor | None = None  # (n_out,) global ids of the output agents
    inputs: torch.Tensor | None = None  # (n_in,) global ids of the stacked inputs
    start_A: torch.Tensor | None = None  # (n_out, r, k) each output agent's own A at the start of the round
    start_B: torch.Tensor | None = None  # (n_out, d, r)
    activations: torch.Tensor | None = None  # (n_out, n_samples, k) the layer's inputs on the agent's own data
    E: torch.Tensor | None = None  # (n_in, d, k) dense base corrections of the inputs (for methods that send them)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # per-agent state rows of the output agents


@dataclass
class MixOutput:
    """New factors for the output agents, plus per-agent diagnostics (e.g. ``tsvd_tail``). Unpacks as ``A, B``.

    ``E``: new dense base corrections (n_out, d, k), for methods with :attr:`Algorithm.corrects_base`;
    ``state``: new per-agent state rows (same keys as :meth:`Algorithm.init_state`); ``ranks``: new ranks (n_out,)
    for methods that change an agent's rank.
    """

    A: torch.Tensor
    B: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    E: torch.Tensor | None = None
    state: dict[str, torch.Tensor] | None = None
    ranks: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.A, self.B))


@dataclass
class Algorithm(abc.ABC):
    """Base class; subclasses are dataclasses whose fields are the method's options (declared with
    :func:`decaf_lora.config.option`, so they carry help text and allowed values)."""

    name: ClassVar[str]
    #: one line for ``decaf methods``: what the method does
    summary: ClassVar[str] = ""
    #: the paper (or "ours" for a library-defined variant)
    paper: ClassVar[str] = ""
    #: statistics ``mix`` may return, with their reduction over layers ("sum", "max" or "rss")
    stats: ClassVar[dict[str, str]] = {}
    #: per-layer context the engine must provide (a subset of NEEDS)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: whether agents of different ranks (zero-padded factors, ``ranks`` in ``mix``) are handled
    supports_ranks: ClassVar[bool] = False
    #: whether ``mix`` returns a dense base correction ``E`` that the engine adds to each agent's frozen weight
    corrects_base: ClassVar[bool] = False

    def __post_init__(self) -> None:
        problems = check_fields(self)
        if problems:
            raise ShapeError(" ".join(problems))

    @property
    def changes_ranks(self) -> bool:
        """Whether ``mix`` may return new ranks (``MixOutput.ranks``): then agents' ranks can differ from round to
        round, and every payload says what rank it carries."""
        return False

    def setup(self, facts: RunFacts) -> None:
        """Called once by the engine before the first round (and again on resume) with the run's facts."""
        self.facts = facts

    def plan(self, round_: int, network) -> MixingPlan:
        """This round's mixing: gossip on the network's graph, with the round's faults applied."""
        return MixingPlan(network.gossip(round_))

    def sends(self, round_: int = 0) -> tuple[str, ...]:
        """Parts an agent transmits this round, a subset of PARTS."""
        return ("A", "B", "head")

    def trainable(self, round_: int = 0) -> tuple[str, ...]:
        """Parts that receive gradients this round, a subset of ("A", "B", "head")."""
        return ("A", "B", "head")

    def init_state(self, layer: LayerInfo, n_agents: int) -> dict[str, torch.Tensor]:
        """Per-agent state of one layer that lives across rounds: name -> (n_agents, ...) tensor. Saved in
        checkpoints; ``mix`` receives the output agents' rows in ``context.state`` and returns new ones."""
        return {}

    def payload_numel(self, A_shape: torch.Size | tuple, B_shape: torch.Size | tuple, round_: int = 0) -> int:
        """Elements one agent sends to one receiver for one layer (heads aside)."""
        r, k = A_shape[-2:]
        d = B_shape[-2]
        sizes = {"A": r * k, "B": d * r, "E": d * k}
        return sum(sizes[p] for p in self.sends(round_) if p in sizes)

    @abc.abstractmethod
    def mix(
        self, A: torch.Tensor, B: torch.Tensor, W, *, round_: int = 0, self_index=None, ranks=None, context=None
    ) -> MixOutput:
        """Combine stacked factors with mixing weights; see the module docstring for shapes."""

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class Prepared:
    A: torch.Tensor  # (n_in, r, k) in compute dtype
    B: torch.Tensor  # (n_in, d, r) in compute dtype
    W: torch.Tensor  # (n_out, n_in) in compute dtype
    self_index: torch.Tensor  # (n_out,) long
    dtype_A: torch.dtype
    dtype_B: torch.dtype

    @property
    def own_A(self) -> torch.Tensor:
        return self.A[self.self_index]

    @property
    def own_B(self) -> torch.Tensor:
        return self.B[self.self_index]

    def cast(self, A: torch.Tensor, B: torch.Tensor, stats: dict | None = None, **extra) -> MixOutput:
        return MixOutput(A.to(self.dtype_A), B.to(self.dtype_B), stats or {}, **extra)


def prepare(A: torch.Tensor, B: torch.Tensor, W, self_index=None, *, row_sums_to_one: bool = True) -> Prepared:
    """Validate one layer's stacked factors and mixing rows; move everything to a float32/float64 compute dtype."""
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor) or A.ndim != 3 or B.ndim != 3:
        raise ShapeError("A and B must be 3-D tensors: A (agents, r, k) and B (agents, d, r).")
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ShapeError(
            f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit: need A (agents, r, k) and B (agents, d, r) with "
            "equal agents and r."
        )
    dtype = compute_dtype_for(A, B)
    Wt = torch.as_tensor(W, device=A.device).to(dtype)
    n_in = A.shape[0]
    if Wt.ndim != 2 or Wt.shape[1] != n_in:
        raise ShapeError(
            f"W has shape {tuple(Wt.shape)}; it must be (output agents, {n_in}) to match the {n_in} stacked agents."
        )
    if not bool(torch.isfinite(Wt).all()) or bool((Wt < 0).any()):
        raise ShapeError("W must hold finite, non-negative mixing weights.")
    if row_sums_to_one:
        sums = Wt.sum(1)
        bad = (sums - 1).abs() > 1e-6
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ShapeError(f"W row {i} sums to {float(sums[i]):.6g}; each agent's mixing weights must sum to 1.")
    if self_index is None:
        if Wt.shape[0] != n_in:
            raise ShapeError(
                f"W is {tuple(Wt.shape)}, not square; pass self_index to say where each output agent's own factors are."
            )
        idx = torch.arange(n_in, device=A.device)
    else:
        idx = torch.as_tensor(self_index, device=A.device, dtype=torch.long).reshape(-1)
        if idx.numel() != Wt.shape[0] or bool(((idx < 0) | (idx >= n_in)).any()):
            raise ShapeError(
                f"self_index must give, for each of the {Wt.shape[0]} output agents, a position in 0..{n_in - 1}."
            )
    return Prepared(A.to(dtype), B.to(dtype), Wt, idx, A.dtype, B.dtype)


def check_ranks(ranks, n_out: int, r: int, device) -> torch.Tensor | None:
    """Per-output-agent ranks for heterogeneous adapters (factors zero-padded to the largest rank ``r``)."""
    if ranks is None:
        return None
    rk = torch.as_tensor(ranks, device=device, dtype=torch.long).reshape(-1)
    if rk.numel() != n_out or bool(((rk < 1) | (rk > r)).any()):
        raise ShapeError(f"ranks must give each of the {n_out} output agents a rank in 1..{r} (the padded rank).")
    return rk
