"""The simulation engine: N agents in one process around ONE frozen base model.

Each round every agent swaps its adapter into the model's LoRA slot, trains on its own data and swaps it back out
(memory: base + N x (adapter + optimizer state), never N x base). Payloads still go through the wire format: each
sender's tensors are packed, encoded, decoded and screened exactly as the distributed engine does with bytes that
crossed the network, so both engines mix the same inputs and a poisoned payload reaches its receivers alike.
"""

from __future__ import annotations

from ..algorithms import MixingPlan
from ..payload import PayloadSpec
from .loop import Engine, Exchange
from .screening import RoundFaults, outgoing


class Simulation(Engine):
    """Every agent in this process: the hooks of :class:`~decaf_lora.engine.loop.Engine` without any network."""

    @property
    def own(self) -> list[int]:
        return list(range(self.cfg.agents))

    @property
    def writes(self) -> bool:
        return self.run_dir is not None

    def exchange(self, round_: int, plan: MixingPlan, spec: PayloadSpec) -> Exchange:
        ex = Exchange()
        if not spec:
            return ex
        f = self.cfg.faults
        for j in range(self.cfg.agents):
            receivers = plan.receivers(j)
            if not len(receivers):
                continue
            flat, counts = outgoing(spec, spec.pack(self.states, j), f.poison if j == f.poison_agent else None)
            size = flat.numel()
            ex.sent[j] = size if plan.server else size * len(receivers)
            if plan.server:  # each participant downloads the averaged model once, at its own rank
                ex.received_bytes[j] = spec.wire_nbytes(self.states, j)
            else:
                for i in receivers:
                    ex.received_bytes[int(i)] = ex.received_bytes.get(int(i), 0) + size
            ex.take(j, flat, counts, receivers, spec, f.max_norm)
        ex.faults.sort()
        return ex

    def consensus(self) -> dict[int, float]:
        return dict(enumerate(self.states.consensus_distance().tolist()))

    def collect(self, rows: list[dict], faults: RoundFaults) -> list[dict]:
        return rows
