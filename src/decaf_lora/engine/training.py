"""Local training of one agent: its AdamW, its learning-rate schedule, its batches, its dropout stream.

Every agent has its own AdamW over the shared LoRA slot's parameters (only that agent's moments live in it), a
linear warm-up then cosine schedule over the run's total steps, and gradient clipping. Dropout draws from a stream
seeded by (seed, agent, round) alone, so results do not depend on which process trains which agent, nor in what
order. After a mix, ``optim.state_after_mix=reset`` drops the moments (they refer to the old factor basis; the
same policy applies to every method in a comparison), ``keep`` keeps them.

Phase-dependent trainable sets (:meth:`~decaf_lora.algorithms.Algorithm.trainable`) are applied with
``requires_grad``: a frozen parameter gets no gradient, so AdamW neither updates nor decays it, and its moments stay
as they were. With ``keep``, a factor that becomes trainable again resumes with the moments of its last active
round; with ``reset`` (the default) every round starts from fresh moments anyway.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from ..errors import DecafError
from .batches import BatchOrder


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``min_lr`` over the remaining steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def agent_seed(seed: int, salt: int, agent: int, round_: int) -> int:
    """A seed for one agent's randomness in one round: independent of placement and order."""
    return int(np.random.SeedSequence([seed, salt, agent, round_]).generate_state(1)[0])


class LocalTraining:
    def __init__(self, cfg, task, model, states, train_split: list[np.ndarray], device: torch.device):
        self.cfg, self.task, self.model, self.states, self.device = cfg, task, model, states, device
        params = states.parameters()
        opt = cfg.optim
        self.optimizers = [
            torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay) for _ in range(cfg.agents)
        ]
        self.batches = BatchOrder(train_split, cfg.task.batch_size, cfg.seed)
        self.total_steps = cfg.rounds * cfg.local_steps

    def lr(self, round_: int) -> float:
        """The learning rate of the round's last step (what the metrics report)."""
        return lr_at((round_ + 1) * self.cfg.local_steps - 1, self.total_steps, self.cfg.optim)

    def train(self, agent: int, round_: int) -> tuple[float, float]:
        """``local_steps`` AdamW steps of ``agent`` on its own batches; returns the mean training loss and the loss of
        the first step (before this round changed anything: the model as the last mix left it)."""
        from ..tasks.base import to_device

        cfg = self.cfg
        opt = self.optimizers[agent]
        self.states.load(agent)
        self.model.train()
        torch.manual_seed(agent_seed(cfg.seed, 41, agent, round_))
        trained = [p for p in self.states.parameters() if p.requires_grad]
        losses = []
        for s in range(cfg.local_steps):
            step = round_ * cfg.local_steps + s
            for group in opt.param_groups:
                group["lr"] = lr_at(step, self.total_steps, cfg.optim)
            batch = to_device(self.task.batch(self.batches.next(agent)), self.device)
            loss = self.task.loss(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"agent {agent} hit a non-finite loss at round {round_ + 1}; lower optim.lr (now {cfg.optim.lr})."
                )
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in trained if p.grad is not None], cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if not all(bool(torch.isfinite(p).all()) for p in trained):  # the loss was finite, the step overflowed
            raise FloatingPointError(
                f"agent {agent}'s adapter became non-finite in round {round_ + 1} (its last step overflowed); lower "
                f"optim.lr (now {cfg.optim.lr}) or set optim.grad_clip."
            )
        self.states.store(agent)
        return float(np.mean(losses)), float(losses[0])

    def after_mix(self, agents) -> None:
        """Apply ``optim.state_after_mix`` to the agents just mixed."""
        if self.cfg.optim.state_after_mix == "reset":
            for a in agents:
                self.optimizers[a].state = defaultdict(dict)

    def state_dict(self, agent: int) -> tuple[dict[str, torch.Tensor], dict]:
        """One agent's AdamW moments (tensors) and its param groups and batch order (small state)."""
        sd = self.optimizers[agent].state_dict()
        tensors = {f"opt/{idx}/{key}": torch.as_tensor(v) for idx, st in sd["state"].items() for key, v in st.items()}
        order, batch_state = self.batches.state_dict(agent)
        tensors["batch/order"] = torch.from_numpy(order)
        return tensors, {"param_groups": sd["param_groups"], "batches": batch_state}

    def load_state_dict(self, agent: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        state: dict[int, dict] = {}
        n_params = len(self.states.parameters())
        for k, v in tensors.items():
            if k.startswith("opt/"):
                idx, key = k[len("opt/") :].split("/", 1)
                if not idx.isdigit() or int(idx) >= n_params:
                    raise DecafError(
                        f"the saved optimizer state of agent {agent} names parameter {idx}; it is not this run's."
                    )
                state.setdefault(int(idx), {})[key] = v if key == "step" else v.to(self.device)
        try:
            self.optimizers[agent].load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise DecafError(f"the saved optimizer state of agent {agent} does not fit this model ({exc}).") from None
        self.batches.load_state_dict(agent, tensors["batch/order"].numpy(), meta["batches"])
