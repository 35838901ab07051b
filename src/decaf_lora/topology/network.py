"""The network as one round sees it: the schedule's graph with this round's faults, who is absent, how much data
each agent holds, and how fast gossip on it mixes.

This is what an algorithm plans a round with (:meth:`decaf_lora.algorithms.Algorithm.plan`): gossip methods take
:meth:`Network.gossip`, a server method weighs the present agents by :attr:`Network.data_sizes`, local training
takes :meth:`Network.identity`. Every answer is a pure function of (seed, round), so all processes agree.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from .faults import absent_agents, drop_links, isolate
from .mixing import spectral_gap
from .schedules import Schedule

#: Rounds sampled to estimate the mixing rate of a schedule that changes from round to round: the top eigenvalue of
#: a Monte Carlo mean is biased upward (noise lifts the largest of several near-equal eigenvalues), by about +0.03
#: at 256 rounds and +0.01 at 4096 on random pairwise encounters, so small networks get many rounds; the work is
#: bounded for large ones (about 2e9 matrix entries visited in all, at least 16 rounds).
MIXING_RATE_SAMPLES = 4096
MIXING_RATE_WORK = 2e9
#: Up to this many agents the mixing rate's eigenvalue comes from a dense eigendecomposition.
DENSE_EIGEN_AGENTS = 1024


class Network:
    """A schedule plus the run's faults and data sizes; see the module docstring."""

    def __init__(
        self,
        schedule: Schedule,
        *,
        seed: int = 0,
        link_drop: float = 0.0,
        agent_dropout: float = 0.0,
        data_sizes: np.ndarray | None = None,
    ):
        self.schedule = schedule
        self.n_agents = int(schedule.n_agents)
        self.seed = int(seed)
        self.link_drop = float(link_drop)
        self.agent_dropout = float(agent_dropout)
        sizes = np.ones(self.n_agents) if data_sizes is None else np.asarray(data_sizes, dtype=np.float64)
        self.data_sizes = sizes

    def absent(self, round_: int) -> np.ndarray:
        """Agents that sit ``round_`` out (no training, no exchange)."""
        return absent_agents(self.n_agents, self.agent_dropout, self.seed, round_)

    def gossip(self, round_: int) -> np.ndarray:
        """This round's mixing matrix: the schedule's, with failed links and absent agents cut off."""
        w = drop_links(self.schedule.matrix(round_), self.link_drop, self.seed, round_)
        return isolate(w, self.absent(round_))

    def identity(self) -> np.ndarray:
        return np.eye(self.n_agents)

    @property
    def faulty(self) -> bool:
        return self.link_drop > 0 or self.agent_dropout > 0

    @cached_property
    def spectral_gap(self) -> float:
        """``1 - |lambda_2|`` of the round-0 matrix without faults (the nominal graph)."""
        return spectral_gap(self.schedule.matrix(0))

    def mixing_rate(self, samples: int | None = None) -> float:
        """``rho = lambda_max(E[W^T W] - 1 1^T / N)`` over the rounds the run will see, faults included.

        Koloskova et al.'s contraction factor of random gossip: one round shrinks the expected squared disagreement
        by at least rho. For a static symmetric W without faults it is exactly ``lambda_2(W)^2``; otherwise
        ``E[W^T W]`` is averaged over rounds 0..samples-1 (the schedule's and the faults' own random draws, so the
        estimate is what this run will see). TAD-LoRA chooses its phase length from it.
        """
        import scipy.sparse as sp

        n = self.n_agents
        if n < 2:
            return 0.0
        if samples is None:  # each sampled round costs O(n^2) (the dense matrix, made sparse); its product is sparse
            samples = int(min(MIXING_RATE_SAMPLES, max(16, MIXING_RATE_WORK / n**2)))
        deterministic = getattr(self.schedule, "deterministic", False)
        rounds = range(self.schedule.period) if deterministic and not self.faulty else range(samples)
        second = sp.csr_matrix((n, n))
        for t in rounds:
            w = sp.csr_matrix(self.gossip(t))
            second = second + w.T @ w
        second = (second / len(rounds)).tocsr()
        second = 0.5 * (second + second.T)
        if n <= DENSE_EIGEN_AGENTS:
            top = np.linalg.eigvalsh(second.toarray() - np.full((n, n), 1.0 / n))[-1]
        else:  # the top of E[W^T W] on the complement of the all-ones vector, without forming an n x n matrix
            from scipy.sparse.linalg import LinearOperator, eigsh

            op = LinearOperator((n, n), matvec=lambda x: second @ x - x.sum() / n, dtype=np.float64)
            top = eigsh(op, k=1, which="LA", return_eigenvectors=False)[0]
        return float(max(0.0, top))
