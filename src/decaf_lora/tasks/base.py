"""What the engine needs from a task: a base model, labelled examples, batches, a loss and an evaluation.

A task owns its data (an :class:`~decaf_lora.data.Examples` pool, addressed by integer indices) and knows how to
turn indices into tensors. The engine never looks inside a batch; it only splits indices, moves batches to the
device and calls :meth:`Task.loss` and :meth:`Task.evaluate`.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data import Examples


class Task(abc.ABC):
    #: headline metric reported in tables: "accuracy" or "f1"
    metric: str = "accuracy"
    #: LoRA target module names when ``lora.targets`` is empty
    default_targets: tuple[str, ...] = ()
    #: trainable non-LoRA modules (a fresh classification head), mixed by plain averaging
    head_modules: tuple[str, ...] = ()
    #: where the base weights come from (written into exported adapters); None for random models
    model_path: str | None = None
    #: training examples drawn when ``task.train_examples`` is -1 (0 = all of them)
    default_train_examples: int = 0

    examples: Examples

    @property
    def labels(self) -> np.ndarray:
        return self.examples.labels

    @abc.abstractmethod
    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh base model (no LoRA yet). Deterministic for a seed, so exports rebuild the same head init."""

    def prepare(self, indices: Sequence[int]) -> None:  # noqa: B027 - optional hook, a no-op for most tasks
        """Pre-encode the examples that will be used (tokenization, ...). Called once, before training."""

    def config_fields(self) -> dict:
        """What this task is, for the run's config.yaml, when the config alone does not say it (a Python task)."""
        return {}

    def data_digest(self, indices: Sequence[int]) -> str:
        """sha256 of the labels and inputs at ``indices``, in order: run.json records it, so a resume refuses data
        that changed under the run (a regenerated CSV, another ``ModuleTask`` tensor) instead of training on it."""
        idx = np.asarray(indices, dtype=np.int64)
        h = hashlib.sha256(np.ascontiguousarray(self.labels[idx]).tobytes())
        for i in idx:
            h.update(_input_bytes(self.examples.inputs[i]))
        return h.hexdigest()

    def check_model(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Refuse in one sentence a model that cannot train on this task's data (called before anything is written)."""

    @abc.abstractmethod
    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Tensors for the examples at ``indices``."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a batch."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over the batch, predicted class per example)."""

    def eval_order(self, indices: np.ndarray) -> np.ndarray:
        """The order evaluation batches ``indices`` in; metrics do not depend on it, padding cost does."""
        return indices

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, indices: Sequence[int], batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of ``model`` on ``indices``."""
        if len(indices) == 0:
            return {}
        indices = self.eval_order(np.asarray(indices, dtype=np.int64))
        was_training = model.training
        model.eval()
        total_loss, preds = 0.0, []
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            b = to_device(self.batch(idx), device)
            loss_sum, pred = self.predict(model, b)
            total_loss += float(loss_sum)
            preds.append(pred.cpu())
        model.train(was_training)
        pred = torch.cat(preds).numpy()
        true = self.labels[indices]
        return {
            "loss": total_loss / len(indices),
            "accuracy": float((pred == true).mean()),
            "f1": macro_f1(true, pred, len(self.examples.class_names)),
        }


def macro_f1(true: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-averaged F1 over the classes present in ``true`` or ``pred``."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def quiet_transformers() -> None:
    """No weight-loading progress bars or 'newly initialized' warnings in our output: we report what matters."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _input_bytes(value) -> bytes:
    """One example's input as bytes, with its type and shape, so that equal digests mean equal data."""
    if isinstance(value, np.ndarray):
        return f"array {value.dtype.str} {value.shape}:".encode() + np.ascontiguousarray(value).tobytes()
    if isinstance(value, str):
        return b"str %d:" % len(value.encode()) + value.encode()
    return b"json:" + json.dumps(value, sort_keys=True, default=str).encode() + b"\n"
