"""Topologies: graphs, mixing matrices and their time-varying schedules.

>>> topo = Topology.build("ring", 10)
>>> round(topo.second_eigenvalue, 2)
0.87
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ..errors import TopologyError
from .graphs import GRAPHS, build_graph, canonical_graph_name
from .mixing import (
    RULES,
    canonical_rule_name,
    graph_of,
    make_lazy,
    mixing_matrix,
    second_eigenvalue,
    spectral_gap,
    validate_mixing_matrix,
)
from .network import Network
from .schedules import SCHEDULES, LinkFailures, OnePeerExponential, RandomMatching, Schedule, Static, make_schedule

__all__ = [
    "Network",
    "GRAPHS",
    "RULES",
    "SCHEDULES",
    "Topology",
    "Schedule",
    "Static",
    "OnePeerExponential",
    "RandomMatching",
    "LinkFailures",
    "make_schedule",
    "build_graph",
    "mixing_matrix",
    "validate_mixing_matrix",
    "second_eigenvalue",
    "spectral_gap",
    "graph_of",
    "make_lazy",
]


@dataclass(frozen=True)
class Topology:
    """A connected graph with a validated, symmetric, doubly stochastic mixing matrix.

    Build with :meth:`build` (a named graph and rule) or :meth:`from_matrix` (a user's matrix, whose support is
    the graph). ``matrix[i, j]`` is the weight agent i gives to what agent j sent; rows index receivers.
    """

    name: str
    graph: nx.Graph = field(repr=False, compare=False)
    matrix: np.ndarray = field(repr=False, compare=False)
    rule: str = "metropolis"

    @classmethod
    def build(cls, name: str, n_agents: int | None, mixing: str = "metropolis", **params) -> Topology:
        """A named graph (see ``GRAPHS``) mixed by a named rule (see ``RULES``); extra keywords go to the graph."""
        key = canonical_graph_name(name)
        rule = canonical_rule_name(mixing)
        graph = build_graph(key, n_agents, **params)
        return cls(key, graph, mixing_matrix(graph, rule), rule)

    @classmethod
    def from_matrix(cls, matrix, name: str = "explicit") -> Topology:
        """A user's mixing matrix; its non-zero off-diagonal entries define the graph."""
        w = validate_mixing_matrix(np.array(matrix, dtype=np.float64))
        return cls(name, graph_of(w), w, "explicit")

    @property
    def n_agents(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def degrees(self) -> np.ndarray:
        return np.array([self.graph.degree(i) for i in range(self.n_agents)], dtype=np.int64)

    def neighbors(self, agent: int) -> list[int]:
        """Agents that ``agent`` exchanges with (itself excluded), in increasing order."""
        if not 0 <= agent < self.n_agents:
            raise TopologyError(f"agent={agent} is out of range; use 0..{self.n_agents - 1}.")
        return sorted(int(j) for j in self.graph.neighbors(agent))

    @property
    def second_eigenvalue(self) -> float:
        return second_eigenvalue(self.matrix)

    @property
    def spectral_gap(self) -> float:
        return spectral_gap(self.matrix)

    def schedule(self, kind: str = "static", seed: int = 0, p: float = 0.0) -> Schedule:
        """A per-round schedule over this topology (see :func:`make_schedule`)."""
        return make_schedule(kind, self, seed=seed, p=p)

    def summary(self) -> dict:
        """Plain-Python description: what ``decaf topology --json`` prints and run directories store."""
        d = self.degrees
        return {
            "topology": self.name,
            "mixing": self.rule,
            "agents": self.n_agents,
            "edges": int(self.graph.number_of_edges()),
            "degree": {"min": int(d.min()), "mean": float(d.mean()), "max": int(d.max())},
            "second_eigenvalue": self.second_eigenvalue,
            "spectral_gap": self.spectral_gap,
            "matrix": self.matrix.tolist(),
        }
