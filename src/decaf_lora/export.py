"""``decaf export``: one agent's adapter, or the network's consensus, as a PEFT adapter directory.

What is exported is exactly what the agent ran with: its own rank in every layer (``rank_pattern``), the run's
LoRA scale (``alpha_pattern`` keeps ``alpha / r`` equal to the run's scale at any exported rank), its trained head,
and, for methods that correct the frozen weight (FedEx-LoRA), that dense correction folded in exactly: ``E`` is
appended to the factors as extra rank (``B' = [B, U S / s]``, ``A' = [A; V^T]`` from the SVD of ``E``, its numerical
rank only), so plain PEFT computes ``W0 + s B' A' = W0 + s B A + E``.

Nothing is trusted unverified: the run's ``adapters.safetensors`` must carry the run's identity and the digest it
was written with, and hold only finite numbers. And nothing is destroyed: the output directory must be new or empty;
``overwrite=True`` may replace a previous export (a directory this command wrote, recognised by its
``decaf_export.json``), never anything else. The adapter is written into a temporary directory beside the target
and moved into place, so a crash leaves no half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import torch

from .adapters import ADAPTER, adapted_layers, agent_state, consensus_state, head_parameters
from .config import load_config
from .errors import DecafError
from .rundir import check_run_dir, dir_mode, file_mode, load_tensors, verified_identity, write_json

MARKER = "decaf_export.json"
EXPORT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", MARKER}


def read_run_adapters(run_dir: str):
    """The run's config, identity and final adapters, each verified against what the run wrote."""
    from safetensors import safe_open

    check_run_dir(run_dir, ("config.yaml", "adapters.safetensors"))
    identity = verified_identity(run_dir)
    config_path = os.path.join(run_dir, "config.yaml")
    path = os.path.join(run_dir, "adapters.safetensors")
    tensors = load_tensors(path)
    from .engine.checkpoint import tensors_digest

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - load_tensors above already read it; metadata of a foreign file may be absent
        meta = {}
    if meta.get("run_id") != identity["run_id"] or meta.get("tensors_sha256") != tensors_digest(tensors):
        raise DecafError(
            f"{path!r} is not the adapters this run wrote (identity or digest differs); it was replaced or damaged."
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DecafError(f"{path!r} holds NaN or infinite values in {bad[0]!r}; there is no usable adapter to export.")
    return load_config(config_path), identity, tensors


def export_adapter(run_dir: str, out_dir: str, agent: int | None = None, *, task=None, overwrite: bool = False) -> str:
    """Write agent ``agent``'s adapter (or, with ``agent=None``, the consensus adapter) to ``out_dir``.

    ``task``: the task object a Python run was made with (needed for runs of a custom ``ModuleTask``, whose model
    only its Python code can rebuild).
    """
    cfg, identity, tensors = read_run_adapters(run_dir)
    if agent is not None and not 0 <= agent < cfg.agents:
        raise DecafError(f"--agent={agent} is out of range; this run has agents 0..{cfg.agents - 1}.")
    check_out_dir(out_dir, run_dir, overwrite)
    if task is None and cfg.task.kind == "module":
        raise DecafError(
            "this run trained a custom model (task.kind=module) that only its Python code can rebuild; export it from "
            "Python with decaf_lora.export.export_adapter(run_dir, out_dir, agent=..., task=your_task)."
        )
    if task is None:
        from .tasks import build_task

        task = build_task(cfg)
    single = agent_state(tensors, agent) if agent is not None else consensus_state(tensors)
    marker = {"run_dir": os.path.abspath(run_dir), "run_id": identity["run_id"], "agent": agent}
    return write_peft_adapter(task, cfg, single, out_dir, marker, overwrite)


def check_out_dir(out_dir: str, run_dir: str, overwrite: bool) -> None:
    """The target must be new or empty; ``overwrite`` may replace a previous export and nothing else."""
    target = os.path.abspath(out_dir)
    if os.path.commonpath([target, os.path.abspath(run_dir)]) == target:
        raise DecafError(f"--out {out_dir!r} holds the run itself; give a new directory for the adapter.")
    if os.path.islink(target):  # replacing it would move the link and empty the directory it points to
        raise DecafError(f"--out {out_dir!r} is a symbolic link; give a new directory for the adapter.")
    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise DecafError(f"--out {out_dir!r} is a file; give a new directory for the adapter.")
    entries = set(os.listdir(target))
    if not entries:
        return
    if not _is_previous_export(target):
        raise DecafError(
            f"--out {out_dir!r} is not empty and is not a previous export; give a new directory (nothing there is "
            "deleted or overwritten)."
        )
    if not overwrite:
        raise DecafError(
            f"--out {out_dir!r} holds a previous export; pass --overwrite to replace it, or give a new directory."
        )


def folded_factors(B: torch.Tensor, A: torch.Tensor, rank: int, scale: float, E: torch.Tensor | None):
    """``(B', A')`` with ``scale B' A' = scale B[:, :rank] A[:rank] + E`` exactly (E at its numerical rank)."""
    B, A = B[:, :rank].float(), A[:rank].float()
    if E is None or not bool(E.abs().any()):
        return B, A
    U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    keep = S > S[0] * max(E.shape) * torch.finfo(torch.float32).eps
    k = int(keep.sum())
    B_E = (U[:, :k] * S[:k] / scale).to(B.dtype)
    return torch.cat([B, B_E], 1), torch.cat([A, Vh[:k].to(A.dtype)], 0)


def write_peft_adapter(task, cfg, single: dict[str, torch.Tensor], out_dir: str, marker: dict, overwrite: bool) -> str:
    """A PEFT adapter directory for one adapter state (factors at each layer's own rank, heads, corrections): one
    base model is built, given a LoRA config whose ``rank_pattern``/``alpha_pattern`` match, filled and saved."""
    import peft

    lora = cfg.lora
    scale = lora.alpha / (lora.rank**0.5 if lora.rslora else lora.rank)  # one LoRA scale for every layer of the run
    factors, rank_pattern, alpha_pattern = {}, {}, {}
    for key in [k for k in single if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        B, A = folded_factors(
            single[f"{name}.lora_B"],
            single[key],
            int(single[f"{name}.rank"]),
            scale,
            single.get(f"{name}.base_correction"),
        )
        path, r = name.removeprefix("base_model.model."), A.shape[0]
        rank_pattern[path] = r
        alpha_pattern[path] = scale * (r**0.5 if lora.rslora else r)  # PEFT's alpha / r stays the run's scale
        factors[name] = (B, A)
    base = task.build_model(seed=cfg.seed)
    saved = [m for m in task.head_modules if any(n.rsplit(".", 1)[-1] == m for n, _ in base.named_modules())]
    config = peft.LoraConfig(
        r=max(rank_pattern.values()),
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets or list(task.default_targets),
        use_rslora=lora.rslora,
        modules_to_save=saved or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        layers = adapted_layers(model)
        if {layer.name for layer in layers} != set(factors):
            raise DecafError(
                "the run's adapters do not name the layers its config adapts; the files do not belong together."
            )
        for layer in layers:
            B, A = factors[layer.name]
            layer.A.copy_(A)
            layer.B.copy_(B)
        for name, p in head_parameters(model).items():
            p.copy_(single[f"head::{name}"])
    if task.model_path:
        model.peft_config[ADAPTER].base_model_name_or_path = task.model_path
    return _move_into_place(model, out_dir, marker, overwrite)


def _move_into_place(model, out_dir: str, marker: dict, overwrite: bool) -> str:
    target = os.path.abspath(out_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    old = None
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json"), encoding="utf-8") as fh:
            json.load(fh)  # sanity: PEFT wrote a readable config
        write_json(os.path.join(tmp, MARKER), marker)
        for name in os.listdir(tmp):  # ordinary permissions, whatever the writers of PEFT's files chose
            os.chmod(os.path.join(tmp, name), file_mode())
        os.chmod(tmp, dir_mode())
        if os.path.isdir(target) and os.listdir(target):  # a previous export, checked by check_out_dir
            old = tempfile.mkdtemp(dir=parent, prefix=".export-old-")
            os.rmdir(old)
            os.replace(target, old)
            if not _is_previous_export(old):  # something appeared there while the adapter was being built
                os.replace(old, target)
                old = None
                raise DecafError(
                    f"--out {out_dir!r} changed while the adapter was built and is no longer only a previous export; "
                    "give a new directory (nothing there was deleted or overwritten)."
                )
        elif os.path.isdir(target):
            os.rmdir(target)  # empty: nothing of anyone's is lost
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(target):
            os.replace(old, target)
        raise
    if old:  # the previous export's own files only; a directory someone else wrote into stays (rmdir refuses)
        for name in EXPORT_FILES & set(os.listdir(old)):
            path = os.path.join(old, name)
            if os.path.isfile(path) and not os.path.islink(path):  # a directory by that name is not ours either
                os.unlink(path)
        try:
            os.rmdir(old)
        except OSError:
            print(f"warning: left {old!r} in place: it holds files the previous export did not write.", file=sys.stderr)
    return out_dir


def _is_previous_export(path: str) -> bool:
    entries = set(os.listdir(path))
    return MARKER in entries and entries <= EXPORT_FILES
