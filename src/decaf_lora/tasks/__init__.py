"""Tasks: model + data + loss + metrics. ``build_task(cfg)`` picks one from ``task.kind``.

* ``text``: sequence classification with any encoder (default: the pip-shipped all-MiniLM-L6-v2 on tweets);
* ``clip``: CLIP few-shot image classification (the paper's vision setup);
* ``causal_lm``: a causal LM on classification-as-generation or instruction data (the paper's LLaMA setup);
* your own ``torch.nn.Module`` and data: :class:`ModuleTask`, passed to :func:`decaf_lora.run`.
"""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..data import load_examples
from ..registry import TASKS
from .base import Task, macro_f1
from .causal_lm import CausalLM
from .checks import model_problems
from .clip import ClipFewShot
from .module import ModuleTask
from .text import TextClassification

__all__ = ["Task", "TextClassification", "ClipFewShot", "CausalLM", "ModuleTask", "build_task", "macro_f1"]


def _text(cfg: RunConfig) -> Task:
    t = cfg.task
    ex = _build(cfg, "text", t.model, "AutoModelForSequenceClassification", TextClassification.default_targets)
    task = TextClassification(ex, t.model, t.max_length, dtype=t.dtype)
    if t.dataset == "tweets":
        task.default_train_examples = TWEETS_TRAIN_EXAMPLES
    return task


def _clip(cfg: RunConfig) -> Task:
    model = "random-tiny-clip" if cfg.task.model == "minilm" else cfg.task.model
    ex = _build(cfg, "image", model, "CLIPModel", ClipFewShot.default_targets)
    return ClipFewShot(ex, model, dtype=cfg.task.dtype)


def _causal_lm(cfg: RunConfig) -> Task:
    model = "random-tiny-llama" if cfg.task.model == "minilm" else cfg.task.model
    ex = _build(cfg, "text", model, "AutoModelForCausalLM", CausalLM.default_targets)
    return CausalLM(ex, model, cfg.task.max_length, dtype=cfg.task.dtype)


def _build(cfg: RunConfig, kind: str, model: str, model_class: str, default_targets):
    """The task's examples, after checking the data, the model and the LoRA targets, so that every problem among
    them is reported at once (a bad data file does not hide a misspelt target)."""
    problems = []
    try:
        ex = _examples(cfg, kind)
    except ConfigError as exc:
        problems, ex = list(exc.problems), None
    targets = cfg.lora.targets or list(default_targets)
    max_length = cfg.task.max_length if kind == "text" else None
    problems += model_problems(model, model_class, max_length, targets, cfg.lora.rank)
    if problems:
        raise ConfigError(problems)
    return ex


def _examples(cfg: RunConfig, kind: str):
    t = cfg.task
    key = cfg.partition.key if kind == "text" else ""
    ex = load_examples(t.dataset, kind, t.text_column, t.label_column, key)
    if t.label_names:
        ex.class_names = _label_names(t.label_names, ex.class_names)
    return ex


def _module(cfg: RunConfig) -> Task:
    raise ConfigError(
        [
            "task.kind=module is a Python ModuleTask that only its own code can build; pass it as task= "
            "(decaf_lora.run, "
            "resume or export_adapter), or use task.kind=text, clip or causal-lm."
        ]
    )


#: The demo's default draw from the 38k built-in tweets (all of them would take hours on a laptop CPU).
TWEETS_TRAIN_EXAMPLES = 6000

TASKS.register(_text, name="text")
TASKS.register(_module, name="module")
TASKS.register(_clip, name="clip")
TASKS.register(_causal_lm, name="causal-lm")


def build_task(cfg: RunConfig) -> Task:
    """The task named by ``task.kind``, with its model and data."""
    return TASKS.get(cfg.task.kind)(cfg)


def _label_names(names: list, found: list[str]) -> list[str]:
    if len(names) != len(found):
        raise ConfigError(
            [
                f"task.label_names has {len(names)} names but the data has {len(found)} classes ({', '.join(found)}); "
                "give one name per class."
            ]
        )
    return [str(n) for n in names]
