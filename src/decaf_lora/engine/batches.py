"""Each agent's order of its own training examples: reshuffled at every epoch from a generator of its own.

Every agent's order is a function of (seed, agent) and of how many batches it has taken, never of which process
runs it or in what order agents train, so a distributed run, a resumed run and the simulator draw the same batches.
``state_dict`` holds each agent's current order, its position in it and its generator, for exact resume.
"""

from __future__ import annotations

import numpy as np

from ..errors import DecafError


class BatchOrder:
    def __init__(self, train: list[np.ndarray], batch_size: int, seed: int):
        self.train = train
        self.batch_size = batch_size
        self.orders = [np.zeros(0, dtype=np.int64) for _ in train]
        self.cursors = [0] * len(train)
        self.rngs = [np.random.default_rng([seed, 31, a]) for a in range(len(train))]

    def next(self, agent: int) -> np.ndarray:
        """The indices of ``agent``'s next mini-batch."""
        data = self.train[agent]
        bs = min(self.batch_size, len(data))
        if self.cursors[agent] + bs > len(self.orders[agent]):
            self.orders[agent] = data[self.rngs[agent].permutation(len(data))]
            self.cursors[agent] = 0
        out = self.orders[agent][self.cursors[agent] : self.cursors[agent] + bs]
        self.cursors[agent] += bs
        return out

    def state_dict(self, agent: int) -> tuple[np.ndarray, dict]:
        """(order array, small JSON-able state) of one agent."""
        return np.ascontiguousarray(self.orders[agent], dtype=np.int64), {
            "cursor": int(self.cursors[agent]),
            "rng": self.rngs[agent].bit_generator.state,
        }

    def load_state_dict(self, agent: int, order: np.ndarray, state: dict) -> None:
        order = np.asarray(order, dtype=np.int64)
        if not np.isin(order, self.train[agent]).all() or not 0 <= int(state["cursor"]) <= len(order):
            raise DecafError(
                f"the saved batch order of agent {agent} does not fit its data; the checkpoint is not this run's."
            )
        self.orders[agent] = order
        self.cursors[agent] = int(state["cursor"])
        self.rngs[agent].bit_generator.state = state["rng"]
