"""Tasks: model + data + loss + metrics. ``build_task(cfg)`` picks one from ``task.kind``.

* ``text``: sequence classification with any encoder (default: the pip-shipped all-MiniLM-L6-v2 on tweets);
* ``clip``: CLIP few-shot image classification (the paper's vision setup);
* ``causal_lm``: a causal LM on classification-as-generation or instruction data (the paper's LLaMA setup);
* your own ``torch.nn.Module`` and data: :class:`ModuleTask`, passed to :func:`decaf_lora.run`.
"""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..data import load_examples
from .base import Task, macro_f1
from .causal_lm import CausalLM
from .clip import ClipFewShot
from .module import ModuleTask
from .text import TextClassification

__all__ = ["Task", "TextClassification", "ClipFewShot", "CausalLM", "ModuleTask", "build_task", "macro_f1"]


def build_task(cfg: RunConfig) -> Task:
    t = cfg.task
    if t.kind == "clip":
        ex = load_examples(t.dataset, "image", t.text_column, t.label_column)
        if t.label_names:
            ex.class_names = _label_names(t.label_names, ex.class_names)
        return ClipFewShot(ex, "random-tiny-clip" if t.model == "minilm" else t.model, dtype=t.dtype)
    ex = load_examples(t.dataset, "text", t.text_column, t.label_column, cfg.partition.key)
    if t.label_names:
        ex.class_names = _label_names(t.label_names, ex.class_names)
    if t.kind == "causal_lm":
        return CausalLM(ex, "random-tiny-llama" if t.model == "minilm" else t.model, t.max_length, dtype=t.dtype)
    return TextClassification(ex, t.model, t.max_length, dtype=t.dtype)


def _label_names(names: list, found: list[str]) -> list[str]:
    if len(names) != len(found):
        raise ConfigError(
            [
                f"task.label_names has {len(names)} names but the data has {len(found)} classes ({', '.join(found)}); give one name per class."
            ]
        )
    return [str(n) for n in names]
