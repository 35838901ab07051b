"""PEFT glue: one frozen base model, one LoRA slot, and every agent's factors as stacked tensors beside it.

The simulator keeps a single copy of the base weights and swaps an agent's adapter into the slot before that agent
trains or evaluates (a copy of a few hundred kilobytes), so memory is base + N x adapter, not N x base. The
stacked layout (per adapted layer: A as agents x r x k, B as agents x d x r) is exactly what
:mod:`decaf_lora.algorithms` mixes. Trainable non-LoRA parameters (a classification head, PEFT's
``modules_to_save``) are stacked the same way and mixed by plain weighted averaging, which is exact for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, shown
from .errors import DecafError
from .lowrank import mask_ranks

ADAPTER = "default"


@dataclass
class AdaptedLayer:
    """One LoRA-adapted linear map: ``W0 + scale * B A`` (plus a per-agent dense correction ``E`` where one applies)."""

    name: str
    A: nn.Parameter  # (r, k)
    B: nn.Parameter  # (d, r)
    scale: float
    module: nn.Module | None = None  # the PEFT LoRA layer (its base_layer is the frozen linear map)


def target_problems(model: nn.Module, targets: Iterable[str], rank: int) -> list[str]:
    """Every problem of ``lora.targets`` and ``lora.rank`` on this model, one sentence each (works on a model built on
    the meta device, so a large model's structure can be checked before its weights are loaded)."""
    targets = list(targets)
    names = [n for n, _ in model.named_modules()]
    leaf = {n.rsplit(".", 1)[-1] for n in names}
    problems = []
    unknown = [t for t in targets if t not in leaf and not any(n.endswith("." + t) or n == t for n in names)]
    if unknown:
        examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        problems.append(
            f"lora.targets={shown(unknown)} matches no module of {type(model).__name__}; its linear layers include: "
            f"{', '.join(examples[:12])}."
        )
    for n, m in model.named_modules():
        hit = any(n == t or n.endswith("." + t) for t in targets)
        if hit and isinstance(m, nn.Linear) and rank > min(m.in_features, m.out_features):
            problems.append(
                f"lora.rank={rank} exceeds the size of {n} ({m.out_features} x {m.in_features}); use lora.rank <= "
                f"{min(m.in_features, m.out_features)}."
            )
            break
    return problems


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
    problems = target_problems(model, targets, rank)
    if problems:
        raise ConfigError(problems)
    leaf = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
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


def heads_in_float32(peft_model: nn.Module) -> None:
    """Train the heads (PEFT's ``modules_to_save`` copies) in float32 whatever the base model's dtype.

    A half-precision head updated by AdamW in half precision loses its small updates (bfloat16) or overflows to NaN
    within a step (float16): mixed precision keeps the trainable parameters and their optimizer state in float32.
    The head's inputs are cast up on the way in and its output back to the dtype the rest of the model expects.
    PEFT already keeps LoRA factors in float32 (``autocast_adapter_dtype``).
    """
    from peft.utils import ModulesToSaveWrapper

    for wrapper in [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        head = wrapper.modules_to_save[ADAPTER]
        dtypes = {p.dtype for p in head.parameters()}
        if not dtypes or dtypes == {torch.float32}:
            continue
        outer = next(iter(dtypes))
        head.float()
        head.register_forward_pre_hook(
            lambda mod, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )
        head.register_forward_hook(
            lambda mod, args, out, dt=outer: out.to(dt) if torch.is_tensor(out) and out.is_floating_point() else out
        )


def adapted_layers(peft_model: nn.Module) -> list[AdaptedLayer]:
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            A, B = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            out.append(AdaptedLayer(name, A, B, float(module.scaling[ADAPTER]), module))
    return out


def head_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not LoRA factors (e.g. the classifier in ``modules_to_save``)."""
    return {
        n: p
        for n, p in peft_model.named_parameters()
        if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n
    }


class AgentStates:
    """Every agent's adapter as stacked tensors, and the swap in/out of the model's single LoRA slot.

    Per adapted layer ``l``: ``A[l]`` (agents, r, k), ``B[l]`` (agents, d, r), ``ranks[l]`` (agents,) and, for
    methods that correct the frozen weight, ``E[l]`` (agents, d, k); ``H`` holds the trained heads. Agents of
    different ranks are stored zero-padded to the width ``r``: agent a owns the first ``ranks[l][a]`` columns of
    B and rows of A, and the padded entries stay zero through training (their gradients are zero) and mixing.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        n_agents: int,
        ranks: list[int] | None = None,
        base_correction: bool = False,
        variable_ranks: bool = False,
    ):
        self.model = peft_model
        self.layers = adapted_layers(peft_model)
        self.heads = head_parameters(peft_model)
        if not self.layers:
            raise ConfigError(["lora.targets adapted no layer of the model; name linear modules such as query, value."])
        self.n_agents = n_agents
        #: agents' ranks may differ (configured per agent, or changed by the method): payloads then say theirs
        self.variable_ranks = bool(ranks) or variable_ranks
        width = self.layers[0].A.shape[0]
        per_agent = torch.tensor(ranks if ranks is not None else [width] * n_agents, dtype=torch.long)
        self.ranks = [per_agent.clone() for _ in self.layers]
        with torch.no_grad():
            self.A = [layer.A.detach().unsqueeze(0).repeat(n_agents, 1, 1) for layer in self.layers]
            self.B = [layer.B.detach().unsqueeze(0).repeat(n_agents, 1, 1) for layer in self.layers]
            self.H = {n: p.detach().unsqueeze(0).repeat(n_agents, *([1] * p.ndim)) for n, p in self.heads.items()}
            if ranks is not None:  # every agent starts from the common A, cut to its own rank
                for l in range(len(self.layers)):
                    self.B[l], self.A[l] = mask_ranks(self.B[l], self.A[l], self.ranks[l])
        self.E: list[torch.Tensor] | None = None
        self._current = 0
        if base_correction:
            self.E = [layer.B.new_zeros(n_agents, layer.B.shape[0], layer.A.shape[1]) for layer in self.layers]
            for l, layer in enumerate(self.layers):
                layer.module.base_layer.register_forward_hook(self._correction_hook(l))

    def _correction_hook(self, l: int):
        """Adds the loaded agent's dense correction ``x E^T`` to the frozen layer's output (exact, no weight edits)."""

        def hook(module, inputs, output):
            E = self.E[l][self._current]
            return output + nn.functional.linear(inputs[0].to(E.dtype), E).to(output.dtype)

        return hook

    @torch.no_grad()
    def load(self, agent: int) -> None:
        """Put ``agent``'s adapter into the model."""
        self._current = agent
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

    def set_trainable(self, parts: Iterable[str]) -> None:
        """Gradients for the named parts only ("A", "B", "head"); a frozen parameter gets no grad, so AdamW skips it
        (no update, no weight decay) and keeps whatever moments it had."""
        parts = set(parts)
        for layer in self.layers:
            layer.A.requires_grad_("A" in parts)
            layer.B.requires_grad_("B" in parts)
        for p in self.heads.values():
            p.requires_grad_("head" in parts)

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter an agent may train (freezing is done with requires_grad)."""
        return [p for layer in self.layers for p in (layer.A, layer.B)] + list(self.heads.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> (agents, ...) tensor map for safetensors: factors, heads, ranks and base corrections."""
        out = {}
        for l, (layer, A, B) in enumerate(zip(self.layers, self.A, self.B)):
            out[f"{layer.name}.lora_A"] = A.contiguous()
            out[f"{layer.name}.lora_B"] = B.contiguous()
            out[f"{layer.name}.rank"] = self.ranks[l].clone()
            if self.E is not None:
                out[f"{layer.name}.base_correction"] = self.E[l].contiguous()
        for n, h in self.H.items():
            out[f"head::{n}"] = h.contiguous()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], agents=None) -> None:
        """Restore every agent (or only ``agents``, rows of the given tensors in that order) from ``state_dict``'s
        names; a missing or misshapen entry is one sentence."""
        rows = slice(None) if agents is None else torch.as_tensor(list(agents), dtype=torch.long)
        targets = {}
        for l, (layer, A, B) in enumerate(zip(self.layers, self.A, self.B)):
            targets[f"{layer.name}.lora_A"] = A
            targets[f"{layer.name}.lora_B"] = B
            targets[f"{layer.name}.rank"] = self.ranks[l]
            if self.E is not None:
                targets[f"{layer.name}.base_correction"] = self.E[l]
        for n, h in self.H.items():
            targets[f"head::{n}"] = h
        with torch.no_grad():
            for key, dest in targets.items():
                if key not in tensors:
                    raise DecafError(
                        f"the saved adapters lack {key!r}; they were not written for this model and config."
                    )
                src = tensors[key]
                want = dest[rows].shape
                if tuple(src.shape) != tuple(want):
                    raise DecafError(
                        f"the saved {key!r} has shape {tuple(src.shape)} but this run needs {tuple(want)}."
                    )
                dest[rows] = src.to(dest.dtype).to(dest.device)

    def adapter_bytes(self) -> int:
        """Bytes of one agent's adapter (factors, heads and base corrections)."""
        per = sum(a[0].numel() * a.element_size() + b[0].numel() * b.element_size() for a, b in zip(self.A, self.B))
        per += sum(e[0].numel() * e.element_size() for e in self.E or [])
        return per + sum(h[0].numel() * h.element_size() for h in self.H.values())

    def products(self, layer: int, agents=None) -> torch.Tensor:
        """(agents, d, k) effective updates ``s B_i A_i (+ E_i)`` of one layer."""
        rows = slice(None) if agents is None else agents
        out = self.layers[layer].scale * (self.B[layer][rows].float() @ self.A[layer][rows].float())
        if self.E is not None:
            out = out + self.E[layer][rows].float()
        return out

    def consensus_distance(self, agents=None, sum_over_all=None) -> torch.Tensor:
        """Per agent of ``agents`` (default: all): sum over layers of ``||s B_i A_i (+ E_i) - mean_j (...)||_F``, the
        mean taken over every agent of the network. ``sum_over_all`` turns the sum of these agents' products into the
        network's (a distributed process all-reduces it). Both engines compute it here; the all-reduced sum adds partial
        sums, so across engines the distance may differ in its last bits (it is a reported metric, not mixed)."""
        rows = list(range(self.n_agents)) if agents is None else list(agents)
        index = torch.tensor(rows, device=self.A[0].device)
        total = torch.zeros(len(rows), dtype=torch.float64)
        for l in range(len(self.layers)):
            prod = self.products(l, index)
            summed = prod.sum(0) if sum_over_all is None else sum_over_all(prod.sum(0))
            total += torch.linalg.matrix_norm(prod - summed / self.n_agents).double().cpu()
        return total


def consensus_state(stacked: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One adapter for the whole network from every agent's stacked state (:meth:`AgentStates.state_dict`): the best
    rank-r factorization of the (weighted) mean product per layer, the weighted mean head and the weighted mean base
    correction (exact). This is what a server would compute; a natural single model to ship."""
    from .lowrank import split_factors, truncated_svd_of_sum

    n = next(iter(stacked.values())).shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    out = {}
    for key in [k for k in stacked if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        A, B = stacked[key], stacked[f"{name}.lora_B"]
        t = truncated_svd_of_sum(B, A, w.to(A.device), A.shape[1])
        Bc, Ac = split_factors(t.U, t.S, t.Vh, "all-into-b")
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = Ac.to(A.dtype), Bc.to(B.dtype)
        out[f"{name}.rank"] = torch.tensor(A.shape[1])
        if f"{name}.base_correction" in stacked:
            E = stacked[f"{name}.base_correction"]
            out[f"{name}.base_correction"] = torch.einsum("i,idk->dk", w.to(E.dtype), E)
    for key in [k for k in stacked if k.startswith("head::")]:
        out[key] = torch.einsum("i,i...->...", w.to(stacked[key].dtype), stacked[key])
    return out


def agent_state(states_dict: dict[str, torch.Tensor], agent: int) -> dict[str, torch.Tensor]:
    return {k: v[agent] for k, v in states_dict.items()}
