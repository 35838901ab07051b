"""Checks of a task's model that need no weights: what ``task.model``, ``task.max_length`` and ``lora.targets`` can
get wrong, found from the model's config alone, so they are reported together with the data's problems."""

from __future__ import annotations

from .base import quiet_transformers


def model_problems(model: str, model_class: str, max_length: int | None, targets, rank: int) -> list[str]:
    """Problems of ``task.model``, ``task.max_length`` and ``lora.targets``/``lora.rank`` found from the model's
    config alone: its structure is built on the meta device (no weights, no memory), so even a 7B model is checked in
    a moment, before any data or weights are loaded."""
    import torch
    import transformers

    from ..adapters import target_problems
    from .text import load_pretrained, resolve_model_path
    from .tiny import TINY_CONFIGS

    quiet_transformers()
    try:
        if model in TINY_CONFIGS:
            config = TINY_CONFIGS[model]()
        else:
            config = load_pretrained(transformers.AutoConfig, resolve_model_path(model), "model config")
    except Exception as exc:  # noqa: BLE001 - ConfigError carries the sentence; anything else is summarised
        return list(getattr(exc, "problems", [f"task.model={model!r} cannot be read ({type(exc).__name__})."]))
    problems = []
    positions = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    if max_length is not None and positions and max_length > positions:
        problems.append(
            f"task.max_length={max_length} exceeds the {positions} positions of task.model={model!r}; use "
            f"task.max_length <= {positions}."
        )
    try:
        with torch.device("meta"):
            cls = getattr(transformers, model_class)
            skeleton = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception:  # noqa: BLE001 - an unusual architecture: the real build checks the targets instead
        return problems
    return problems + target_problems(skeleton, targets, rank)
