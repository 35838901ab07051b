"""``decaf export``: one agent's adapter, or the network's consensus, as a PEFT adapter directory."""

from __future__ import annotations

import os

from .adapters import AgentStates, agent_state, attach_lora, consensus_state, save_peft_adapter
from .config import load_config
from .errors import DecafError
from .rundir import check_run_dir, load_tensors


def rebuild_model(run_dir: str):
    """The run's base model with its LoRA slot, as at the start of the run, plus the run's task."""
    from .tasks import build_task

    check_run_dir(run_dir, ("config.yaml", "adapters.safetensors"))
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    task = build_task(cfg)
    base = task.build_model(seed=cfg.seed)
    targets = cfg.lora.targets or list(task.default_targets)
    model = attach_lora(
        base,
        targets,
        cfg.lora.rank,
        cfg.lora.alpha,
        cfg.lora.dropout,
        cfg.lora.rslora,
        task.head_modules,
        seed=cfg.seed,
    )
    return cfg, task, model


def export_adapter(run_dir: str, out_dir: str, agent: int | None = None) -> str:
    """Write agent ``agent``'s adapter (or, with ``agent=None``, the consensus adapter) to ``out_dir``."""
    cfg, task, model = rebuild_model(run_dir)
    tensors = load_tensors(os.path.join(run_dir, "adapters.safetensors"))
    if agent is not None:
        if not 0 <= agent < cfg.agents:
            raise DecafError(f"--agent={agent} is out of range; this run has agents 0..{cfg.agents - 1}.")
        single = agent_state(tensors, agent)
    else:
        states = AgentStates(model, cfg.agents)
        states.load_state_dict(tensors)
        single = consensus_state(states)
    return save_peft_adapter(model, single, out_dir, task.model_path)
