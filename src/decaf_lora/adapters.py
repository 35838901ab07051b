"""PEFT glue: one frozen base model, one LoRA slot, and every agent's factors as stacked tensors beside it.

The simulator keeps a single copy of the base weights and swaps an agent's adapter into the slot before that agent
trains or evaluates (a copy of a few hundred kilobytes), so memory is base + N x adapter, not N x base. The
stacked layout (per adapted layer: A as agents x r x k, B as agents x d x r) is exactly what
:mod:`decaf_lora.algorithms` mixes. Trainable non-LoRA parameters (a classification head, PEFT's
``modules_to_save``) are stacked the same way and mixed by plain weighted averaging, which is exact for them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError

ADAPTER = "default"


@dataclass
class AdaptedLayer:
    """One LoRA-adapted linear map: ``W0 + scale * B A``."""

    name: str
    A: nn.Parameter  # (r, k)
    B: nn.Parameter  # (d, r)
    scale: float


def attach_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    modules_to_save: Iterable[str] = (),
    seed: int = 0,
):
    """Wrap ``model`` with a PEFT LoRA adapter; A is drawn from ``seed``, so every agent starts from the same A."""
    import peft

    targets = list(targets)
    names = [n for n, _ in model.named_modules()]
    leaf = {n.rsplit(".", 1)[-1] for n in names}
    unknown = [t for t in targets if t not in leaf and not any(n.endswith("." + t) or n == t for n in names)]
    if unknown:
        examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            [
                f"lora.targets={unknown} matches no module of {type(model).__name__}; its linear layers include: {', '.join(examples[:12])}."
            ]
        )
    for n, m in model.named_modules():
        if (
            any(n == t or n.endswith("." + t) for t in targets)
            and isinstance(m, nn.Linear)
            and rank > min(m.in_features, m.out_features)
        ):
            raise ConfigError(
                [
                    f"lora.rank={rank} exceeds the size of {n} ({m.out_features} x {m.in_features}); use lora.rank <= {min(m.in_features, m.out_features)}."
                ]
            )
    save = [m for m in modules_to_save if m in leaf]
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=rslora,
        modules_to_save=save or None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return peft.get_peft_model(model, cfg)


def adapted_layers(peft_model: nn.Module) -> list[AdaptedLayer]:
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            out.append(
                AdaptedLayer(
                    name, module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, float(module.scaling[ADAPTER])
                )
            )
    return out


def head_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not LoRA factors (e.g. the classifier in ``modules_to_save``)."""
    return {
        n: p
        for n, p in peft_model.named_parameters()
        if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n
    }


class AgentStates:
    """Every agent's adapter as stacked tensors, and the swap in/out of the model's single LoRA slot."""

    def __init__(self, peft_model: nn.Module, n_agents: int):
        self.model = peft_model
        self.layers = adapted_layers(peft_model)
        self.heads = head_parameters(peft_model)
        if not self.layers:
            raise ConfigError(["lora.targets adapted no layer of the model; name linear modules such as query, value."])
        self.n_agents = n_agents
        with torch.no_grad():
            self.A = [layer.A.detach().unsqueeze(0).repeat(n_agents, 1, 1) for layer in self.layers]
            self.B = [layer.B.detach().unsqueeze(0).repeat(n_agents, 1, 1) for layer in self.layers]
            self.H = {n: p.detach().unsqueeze(0).repeat(n_agents, *([1] * p.ndim)) for n, p in self.heads.items()}

    @torch.no_grad()
    def load(self, agent: int) -> None:
        """Put ``agent``'s adapter into the model."""
        for layer, A, B in zip(self.layers, self.A, self.B):
            layer.A.copy_(A[agent])
            layer.B.copy_(B[agent])
        for n, p in self.heads.items():
            p.copy_(self.H[n][agent])

    @torch.no_grad()
    def store(self, agent: int) -> None:
        """Copy the model's current adapter back into ``agent``'s slot."""
        for layer, A, B in zip(self.layers, self.A, self.B):
            A[agent].copy_(layer.A)
            B[agent].copy_(layer.B)
        for n, p in self.heads.items():
            self.H[n][agent].copy_(p)

    def set_trainable(self, factors: Iterable[str]) -> None:
        factors = set(factors)
        for layer in self.layers:
            layer.A.requires_grad_("A" in factors)
            layer.B.requires_grad_("B" in factors)

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter an agent may train (factor freezing is done with requires_grad)."""
        return [p for layer in self.layers for p in (layer.A, layer.B)] + list(self.heads.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> (agents, ...) tensor map for safetensors."""
        out = {}
        for layer, A, B in zip(self.layers, self.A, self.B):
            out[f"{layer.name}.lora_A"] = A.contiguous()
            out[f"{layer.name}.lora_B"] = B.contiguous()
        for n, h in self.H.items():
            out[f"head::{n}"] = h.contiguous()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, A, B in zip(self.layers, self.A, self.B):
                A.copy_(tensors[f"{layer.name}.lora_A"])
                B.copy_(tensors[f"{layer.name}.lora_B"])
            for n, h in self.H.items():
                h.copy_(tensors[f"head::{n}"])

    def adapter_bytes(self) -> int:
        """Bytes of one agent's adapter (factors and head)."""
        per = sum(a[0].numel() * a.element_size() + b[0].numel() * b.element_size() for a, b in zip(self.A, self.B))
        return per + sum(h[0].numel() * h.element_size() for h in self.H.values())

    def products(self, layer: int) -> torch.Tensor:
        """(agents, d, k) scaled products ``s B_i A_i`` of one layer."""
        return self.layers[layer].scale * (self.B[layer].float() @ self.A[layer].float())

    def consensus_distance(self) -> torch.Tensor:
        """Per agent: sum over layers of ``||s B_i A_i - mean_j s B_j A_j||_F``."""
        total = torch.zeros(self.n_agents)
        for l in range(len(self.layers)):
            prod = self.products(l)
            total += torch.linalg.matrix_norm(prod - prod.mean(0, keepdim=True)).cpu()
        return total


def consensus_state(states: AgentStates, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One adapter for the whole network: the best rank-r factorization of the (weighted) mean product per layer,
    and the weighted mean head. This is what a server would compute; a natural single model to ship."""
    from .lowrank import split_factors, truncated_svd_of_sum

    n = states.n_agents
    w = torch.full((n,), 1.0 / n) if weights is None else weights / weights.sum()
    out = {}
    for layer, A, B in zip(states.layers, states.A, states.B):
        t = truncated_svd_of_sum(B, A, w.to(A.device), A.shape[1])
        Bc, Ac = split_factors(t.U, t.S, t.Vh, "all-into-b")
        out[f"{layer.name}.lora_A"] = Ac.to(A.dtype)
        out[f"{layer.name}.lora_B"] = Bc.to(B.dtype)
    for name, h in states.H.items():
        out[f"head::{name}"] = torch.einsum("i,i...->...", w.to(h.dtype), h)
    return out


def agent_state(states_dict: dict[str, torch.Tensor], agent: int) -> dict[str, torch.Tensor]:
    return {k: v[agent] for k, v in states_dict.items()}


def save_peft_adapter(
    peft_model: nn.Module, single_state: dict[str, torch.Tensor], out_dir: str, base_model_path: str | None = None
) -> str:
    """Load one adapter (unstacked state) into ``peft_model`` and write a PEFT adapter directory atomically.

    The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
    ``PeftModel.from_pretrained(base, out_dir)``. Factors are stored unscaled, exactly as PEFT keeps them, with the
    run's ``lora_alpha`` and rank, so PEFT applies the same scale the run used.
    """
    layers = adapted_layers(peft_model)
    heads = head_parameters(peft_model)
    with torch.no_grad():
        for layer in layers:
            layer.A.copy_(single_state[f"{layer.name}.lora_A"])
            layer.B.copy_(single_state[f"{layer.name}.lora_B"])
        for n, p in heads.items():
            p.copy_(single_state[f"head::{n}"])
    if base_model_path:
        peft_model.peft_config[ADAPTER].base_model_name_or_path = base_model_path
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        peft_model.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json"), encoding="utf-8") as fh:
            json.load(fh)  # sanity: PEFT wrote a readable config
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
