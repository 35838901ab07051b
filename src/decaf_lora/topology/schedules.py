"""Time-varying mixing: a different matrix each round, identical in every process.

Each round's matrix is a pure function of ``(seed, round)`` (its own ``numpy`` generator, never a shared stream),
so a distributed rank, a resumed run and the simulator all see the same graph without talking about it.
Single rounds may be disconnected (a matching is); what must be connected is the union over rounds, which
:meth:`Schedule.validate` checks over one period.
"""

from __future__ import annotations

import abc
import math

import networkx as nx
import numpy as np

from ..errors import TopologyError
from ..registry import MIXING_RULES, SCHEDULES
from .mixing import canonical_rule_name, graph_of, validate_mixing_matrix


def _round_rng(seed: int, round_: int, salt: int) -> np.random.Generator:
    if round_ < 0:
        raise TopologyError(f"round={round_} is invalid; rounds are numbered from 0.")
    return np.random.default_rng([int(seed), int(round_), salt])


class Schedule(abc.ABC):
    """A mixing matrix per round. Subclasses implement :meth:`matrix`."""

    n_agents: int
    #: rounds after which the pattern repeats (deterministic schedules) or rounds to sample to check connectivity.
    period: int = 1
    #: True when the matrices do not depend on the seed (one period then describes every round exactly).
    deterministic: bool = False

    @abc.abstractmethod
    def matrix(self, round_: int) -> np.ndarray:
        """Mixing matrix for ``round_`` (0-based), symmetric and doubly stochastic."""

    def neighbors(self, round_: int, agent: int) -> list[int]:
        w = self.matrix(round_)
        return [int(j) for j in np.nonzero(w[agent])[0] if j != agent]

    def validate(self) -> None:
        """Every matrix over one period is valid and the union of their graphs is connected."""
        union = nx.Graph()
        union.add_nodes_from(range(self.n_agents))
        for t in range(self.period):
            w = validate_mixing_matrix(self.matrix(t), require_connected=False, name=f"mixing matrix of round {t}")
            union.add_edges_from(graph_of(w).edges)
        if self.n_agents > 1 and not nx.is_connected(union):
            raise TopologyError(
                f"{type(self).__name__} never connects all agents over {self.period} rounds; use a connected base "
                "graph."
            )


class Static(Schedule):
    """The same matrix every round."""

    deterministic = True

    def __init__(self, w: np.ndarray):
        self.w = validate_mixing_matrix(w)
        self.n_agents = self.w.shape[0]

    def matrix(self, round_: int) -> np.ndarray:
        return self.w


class OnePeerExponential(Schedule):
    """Each round every agent talks to exactly one peer: agent i pairs with ``i XOR 2^(t mod tau)`` (weights 1/2).

    The symmetric (hypercube) form of the one-peer exponential graph of Ying et al. (2021); with a power-of-two
    number of agents, tau = log2(n) rounds of it average exactly. When the partner id is out of range the agent
    sits the round out (weight 1 on itself). Deterministic: the seed is not used.
    """

    deterministic = True

    def __init__(self, n_agents: int):
        self.n_agents = int(n_agents)
        self.period = max(1, math.ceil(math.log2(self.n_agents))) if self.n_agents > 1 else 1

    def matrix(self, round_: int) -> np.ndarray:
        n = self.n_agents
        w = np.eye(n)
        if n > 1:
            bit = 1 << (round_ % self.period)
            for i in range(n):
                j = i ^ bit
                if j < n:
                    w[i, i] = w[i, j] = 0.5
        return w


class RandomMatching(Schedule):
    """Each round a random maximal matching of the base graph's edges; matched pairs average (weights 1/2)."""

    def __init__(self, graph: nx.Graph, seed: int = 0, check_rounds: int = 64):
        self.graph, self.seed = graph, int(seed)
        self.n_agents = graph.number_of_nodes()
        self.period = check_rounds
        self._edges = sorted(tuple(sorted(e)) for e in graph.edges)

    def matrix(self, round_: int) -> np.ndarray:
        rng = _round_rng(self.seed, round_, 1)
        w = np.eye(self.n_agents)
        used = np.zeros(self.n_agents, dtype=bool)
        for k in rng.permutation(len(self._edges)):
            a, b = self._edges[k]
            if not used[a] and not used[b]:
                used[a] = used[b] = True
                w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        return w


class LinkFailures(Schedule):
    """Each edge of the base graph fails independently with probability ``p`` each round.

    The surviving graph is re-weighted with the same rule (so the matrix stays symmetric and doubly stochastic and
    the surviving links get more weight); for an explicit matrix the failed link's weight moves to both ends'
    diagonals instead. A round may be disconnected; over many rounds the base graph's links all appear.
    """

    def __init__(
        self,
        graph: nx.Graph,
        p: float,
        rule: str = "metropolis",
        seed: int = 0,
        base_matrix: np.ndarray | None = None,
        check_rounds: int = 64,
    ):
        if not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise TopologyError(f"link failure probability p={p!r} is invalid; use a number in [0, 1).")
        self.graph, self.p, self.seed = graph, float(p), int(seed)
        self.rule = None if base_matrix is not None else canonical_rule_name(rule)
        self.base_matrix = base_matrix
        self.n_agents = graph.number_of_nodes()
        self.period = check_rounds
        self._edges = sorted(tuple(sorted(e)) for e in graph.edges)

    def surviving_graph(self, round_: int) -> nx.Graph:
        rng = _round_rng(self.seed, round_, 2)
        alive = rng.random(len(self._edges)) >= self.p
        g = nx.Graph()
        g.add_nodes_from(range(self.n_agents))
        g.add_edges_from(e for e, ok in zip(self._edges, alive) if ok)
        return g

    def matrix(self, round_: int) -> np.ndarray:
        g = self.surviving_graph(round_)
        if self.base_matrix is None:
            return MIXING_RULES.get(self.rule)(g)
        w = self.base_matrix.copy()
        for a, b in self._edges:
            if not g.has_edge(a, b):
                w[a, a] += w[a, b]
                w[b, b] += w[a, b]
                w[a, b] = w[b, a] = 0.0
        return w


def _link_failures(topology, seed: int, p: float) -> Schedule:
    explicit = topology.rule == "explicit"
    rule = "metropolis" if explicit else topology.rule
    return LinkFailures(topology.graph, p, rule=rule, seed=seed, base_matrix=topology.matrix if explicit else None)


SCHEDULES.register(lambda topology, seed, p: Static(topology.matrix), name="static")
SCHEDULES.register(lambda topology, seed, p: OnePeerExponential(topology.n_agents), name="one-peer-exponential")
SCHEDULES.register(lambda topology, seed, p: RandomMatching(topology.graph, seed), name="random-matching")
SCHEDULES.register(_link_failures, name="link-failures")


def make_schedule(kind: str, topology, seed: int = 0, p: float = 0.0) -> Schedule:
    """Build a schedule over a :class:`~decaf_lora.topology.Topology`.

    ``kind``: ``static`` (the topology's matrix every round), ``one-peer-exponential`` (ignores the topology's
    edges; uses its agent count), ``random-matching`` (matchings of the topology's edges), ``link-failures``
    (the topology with each link down with probability ``p``).
    """
    return SCHEDULES.get(kind)(topology, seed, p)
