"""Your own ``torch.nn.Module`` and data, trained by the same engine.

>>> task = ModuleTask(lambda: MyNet(), X_train, y_train, X_test, y_test, targets=["fc1", "fc2"], head=["out"])
>>> decaf_lora.run({"agents": 4, "rounds": 10}, task=task)
>>> decaf_lora.compare({"agents": 4, "rounds": 10}, ["decaf", "dlora", "local"], task=task)

Inputs are tensors indexed along the first dimension; labels are the integers 0..C-1 (C = the number of classes,
at most the model's number of outputs); the loss defaults to cross-entropy on the model's output. ``head`` names
modules that train fully (not through LoRA) and are mixed by plain averaging. Every example given is used (the
config's ``task.train_examples`` can ask for fewer), and everything is checked when the run is built, before any
file is written: a misspelt target or head, labels that are not class ids, a model whose output is too small.
Floating-point inputs are cast to the model's parameter dtype (float64 data with a float32 model just works).
A run records ``task.kind=module`` with the model's class in its config; resume and export it from Python by
passing the same task again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, shown
from ..data import Examples
from .base import Task

#: Class ids index a head's outputs and a per-class F1 table: an id in the millions is a label left unnumbered.
MAX_CLASSES = 1 << 16


def _class_ids(y, what: str) -> np.ndarray:
    """Labels as int64 class ids, or one sentence saying why they are not."""
    y = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1:
        raise ConfigError([f"ModuleTask {what} has shape {y.shape}; give one integer class id per example (1-D)."])
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise ConfigError([f"ModuleTask {what} holds NaN or infinite values; give integer class ids 0..C-1."])
        if not np.all(y == np.round(y)):
            raise ConfigError([f"ModuleTask {what} holds non-integer values; give integer class ids 0..C-1."])
    elif y.dtype.kind not in "iu":
        raise ConfigError([f"ModuleTask {what} has dtype {y.dtype}; give integer class ids 0..C-1."])
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise ConfigError([f"ModuleTask {what} holds the negative label {int(y.min())}; give class ids 0..C-1."])
    return y


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
        x_train, x_test = torch.as_tensor(x_train), torch.as_tensor(x_test)
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ConfigError(
                [
                    f"ModuleTask got {len(x_train)} training inputs for {len(y_train)} labels and {len(x_test)} test "
                    "inputs "
                    f"for {len(y_test)} labels; give one label per input."
                ]
            )
        if len(x_test) == 0 or len(x_train) == 0:
            raise ConfigError(["ModuleTask needs at least one training and one test example."])
        y = np.concatenate([_class_ids(y_test, "y_test"), _class_ids(y_train, "y_train")])
        n_classes = int(y.max()) + 1
        if n_classes > MAX_CLASSES:
            raise ConfigError(
                [
                    f"ModuleTask labels go up to {n_classes - 1}, beyond the bound of {MAX_CLASSES} classes; labels "
                    "are class ids 0..C-1, so renumber them (e.g. with numpy.unique(..., return_inverse=True))."
                ]
            )
        if class_names is not None and len(class_names) < n_classes:
            raise ConfigError(
                [
                    f"ModuleTask class_names has {len(class_names)} names but the labels go up to {n_classes - 1}; "
                    "give one "
                    "name per class."
                ]
            )
        names = list(class_names) if class_names else [str(c) for c in range(n_classes)]
        self.examples = Examples(list(range(len(y))), y, names)
        self.x = torch.cat([x_test, x_train])
        self.test_indices = np.arange(len(y_test))  # the user's test set is the shared test set
        self.model_fn = model_fn
        self.default_targets = tuple(targets)
        self.head_modules = tuple(head)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.model_path = None
        self._dtype = None

    def build_model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                [f"ModuleTask's model_fn returned {type(model).__name__}; it must return a torch.nn.Module."]
            )
        return model

    def data_digest(self, indices) -> str:
        """The tensors' rows, not the placeholder inputs (their positions), decide the digest."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        x = self.x[idx].detach().cpu().contiguous()
        h = hashlib.sha256(f"{x.dtype} {tuple(x.shape)}:".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(np.ascontiguousarray(self.labels[np.asarray(indices, dtype=np.int64)]).tobytes())
        return h.hexdigest()

    def config_fields(self) -> dict:
        model = self.build_model()
        return {
            "kind": "module",
            "model": f"{type(model).__name__} (a Python ModuleTask)",
            "dataset": f"in-memory tensors ({len(self.x) - len(self.test_indices)} training, {len(self.test_indices)} "
            "test)",
        }

    def check_model(self, model: nn.Module) -> None:
        """Heads must exist (a misspelt head would silently stay frozen at its random start), and one forward pass
        must give at least as many outputs as there are classes."""
        names = [n for n, _ in model.named_modules()]
        leaves = {n.rsplit(".", 1)[-1] for n in names if n}
        missing = [h for h in self.head_modules if h not in leaves]
        if missing:
            raise ConfigError(
                [
                    f"ModuleTask head={shown(missing)} matches no module of {type(model).__name__}; its modules are: "
                    f"{', '.join(sorted(leaves)[:16])}."
                ]
            )
        params = list(model.parameters())
        self._dtype = params[0].dtype if params else torch.float32
        was_training = model.training
        model.eval()  # a look at the output, not a step: no batch-norm statistics may move
        with torch.no_grad():
            try:
                out = model(self._cast(self.x[:2]))
            except Exception as exc:  # noqa: BLE001 - a user's model may raise anything; say which call failed
                raise ConfigError(
                    [
                        f"ModuleTask's model cannot run on the inputs ({type(exc).__name__}: {exc}); check the input "
                        f"shape {tuple(self.x.shape[1:])}."
                    ]
                ) from None
            finally:
                model.train(was_training)
        if self.loss_fn is nn.functional.cross_entropy:
            n_classes = len(self.examples.class_names)
            if out.ndim != 2 or out.shape[-1] < n_classes:
                raise ConfigError(
                    [
                        f"ModuleTask's model outputs shape {tuple(out.shape)} per batch but the labels name "
                        f"{n_classes} "
                        f"classes (0..{n_classes - 1}); give a model with {n_classes} outputs or fix the labels."
                    ]
                )

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if self._dtype is not None and x.is_floating_point() and x.dtype != self._dtype:
            return x.to(self._dtype)
        return x

    def batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"x": self._cast(self.x[idx]), "labels": torch.from_numpy(self.labels[idx.numpy()])}

    def loss(self, model, batch):
        return self.loss_fn(model(batch["x"]), batch["labels"])

    def predict(self, model, batch):
        out = model(batch["x"])
        return self.loss_fn(out, batch["labels"]) * len(batch["labels"]), out.argmax(-1)
