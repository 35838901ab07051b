"""Your own ``torch.nn.Module`` and data, trained by the same engine.

>>> task = ModuleTask(lambda: MyNet(), X_train, y_train, X_test, y_test, targets=["fc1", "fc2"])
>>> decaf_lora.run({"agents": 4, "rounds": 10, "task": {"test_examples": len(y_test)}}, task=task)

Inputs are tensors indexed along the first dimension; the loss defaults to cross-entropy on the model's output.
``head`` names modules that train fully (not through LoRA) and are mixed by plain averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data import Examples
from .base import Task


class ModuleTask(Task):
    metric = "accuracy"

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        x_train: torch.Tensor,
        y_train,
        x_test: torch.Tensor,
        y_test,
        targets: Sequence[str],
        head: Sequence[str] = (),
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        class_names: Sequence[str] | None = None,
    ):
        x = torch.cat([torch.as_tensor(x_test), torch.as_tensor(x_train)])
        y = np.concatenate([np.asarray(y_test), np.asarray(y_train)]).astype(np.int64)
        if len(x) != len(y):
            raise ConfigError([f"ModuleTask got {len(x)} inputs but {len(y)} labels; give one label per input."])
        n_classes = int(y.max()) + 1
        self.examples = Examples(
            list(range(len(y))), y, list(class_names) if class_names else [str(c) for c in range(n_classes)]
        )
        self.x = x
        self.test_indices = np.arange(len(y_test))  # the user's test set is the shared test set
        self.model_fn = model_fn
        self.default_targets = tuple(targets)
        self.head_modules = tuple(head)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.model_path = None

    def build_model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.model_fn()

    def batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"x": self.x[idx], "labels": torch.from_numpy(self.labels[idx.numpy()])}

    def loss(self, model, batch):
        return self.loss_fn(model(batch["x"]), batch["labels"])

    def predict(self, model, batch):
        out = model(batch["x"])
        return self.loss_fn(out, batch["labels"]) * len(batch["labels"]), out.argmax(-1)
