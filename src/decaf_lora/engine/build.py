"""Everything a run is made of, built from its config: task and data split, network, algorithm, model and adapters.

Both engines build the same run the same way; only what they do with it each round differs. Building checks
what the config alone could not (the model's layers, the data's size) and fails with one sentence per problem,
before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import algorithms
from ..adapters import AgentStates, attach_lora, heads_in_float32
from ..algorithms import Algorithm, LayerInfo, RunFacts
from ..config import ConfigError, RunConfig, validate_config
from ..topology import Network, Topology
from .split import DataSplit, split_data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device={name!r} but no CUDA device is visible; use device=cpu or device=auto."])
    return torch.device(name)


@dataclass
class Run:
    """The parts of a run, built once: the engines hold one of these."""

    cfg: RunConfig
    device: torch.device
    task: object
    split: DataSplit
    topology: Topology
    network: Network
    algorithm: Algorithm
    model: torch.nn.Module
    states: AgentStates

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        return tuple(
            LayerInfo(l, layer.name, layer.B.shape[0], layer.A.shape[1], layer.A.shape[0], layer.scale)
            for l, layer in enumerate(self.states.layers)
        )


def build_run(cfg: RunConfig, task=None, algorithm: Algorithm | None = None, device: torch.device | None = None) -> Run:
    """Build every part of a run from ``cfg`` (``task``: a ready task such as a ModuleTask; ``algorithm``: an
    instance to use instead of ``cfg.algorithm``'s, e.g. a wrapper that adds diagnostics; ``device``: where this
    process computes, when the launcher decides it, e.g. a torchrun process's own GPU)."""
    validate_config(cfg)
    device = device if device is not None else resolve_device(cfg.device)
    if cfg.task.dtype == "float16" and device.type == "cpu":
        raise ConfigError(
            [
                "task.dtype=float16 needs a GPU (CPU kernels for half precision are slow and lose the small updates); "
                "use task.dtype=bfloat16 or float32 on CPU, or device=cuda."
            ]
        )
    from ..tasks import build_task

    if task is not None:  # record what the run really is: a Python task is not the config's default text task
        for key, value in task.config_fields().items():
            setattr(cfg.task, key, value)
    task = task if task is not None else build_task(cfg)
    keys = task.examples.extra.get("key")
    test = getattr(task, "test_indices", None)
    split = split_data(task.labels, cfg, keys, test, task.default_train_examples)
    task.prepare(np.concatenate([split.test, *split.train, *split.local_eval]))
    topology = Topology.build(cfg.topology.name, cfg.agents, mixing=cfg.topology.mixing, **cfg.topology.params)
    schedule = topology.schedule(cfg.topology.schedule, seed=cfg.seed, p=cfg.topology.link_drop)
    network = Network(
        schedule,
        seed=cfg.seed,
        link_drop=cfg.faults.link_drop,
        agent_dropout=cfg.faults.agent_dropout,
        data_sizes=split.sizes,
    )
    algorithm = algorithm if algorithm is not None else algorithms.get(cfg.algorithm, **cfg.algorithm_options)

    torch.manual_seed(cfg.seed)
    base = task.build_model(seed=cfg.seed)
    task.check_model(base)
    for p in base.parameters():
        p.requires_grad_(False)
    targets = cfg.lora.targets or list(task.default_targets)
    lora = cfg.lora
    model = attach_lora(
        base, targets, lora.rank, lora.alpha, lora.dropout, lora.rslora, task.head_modules, seed=cfg.seed
    )
    heads_in_float32(model)
    model = model.to(device)
    states = AgentStates(
        model, cfg.agents, cfg.agent_ranks(), algorithm.corrects_base, variable_ranks=algorithm.changes_ranks
    )
    run = Run(cfg, device, task, split, topology, network, algorithm, model, states)
    ranks = cfg.agent_ranks()
    algorithm.setup(RunFacts(cfg.agents, network, tuple(ranks) if ranks else None, run.layers, cfg.seed))
    return run
