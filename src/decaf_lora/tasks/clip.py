"""CLIP few-shot image classification, the DeCAF paper's vision setup (as in CLIP-LoRA).

Logits are ``100 x cosine(image embedding, text embedding of "a photo of a {class}.")``; LoRA goes on q, k, v of
both encoders, so the class prompts are re-encoded at every step. ``random-tiny-clip`` is a randomly initialised
toy CLIP for tests; a directory with pretrained CLIP weights (and its processor) gives the paper's setup.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import Examples
from .base import Task, quiet_transformers
from .text import load_pretrained
from .tiny import WordTokenizer, tiny_clip

PROMPT = "a photo of a {}."
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


class ClipFewShot(Task):
    metric = "accuracy"
    default_targets = ("q_proj", "k_proj", "v_proj")
    head_modules = ()

    def __init__(
        self, examples: Examples, model: str = "random-tiny-clip", logit_scale: float = 100.0, dtype: str = "float32"
    ):
        quiet_transformers()
        self.examples = examples
        self.logit_scale = logit_scale
        self.dtype = getattr(torch, dtype)
        self.prompts = [PROMPT.format(name) for name in examples.class_names]
        if model == "random-tiny-clip":
            self.model_path = None
            self.tokenizer = WordTokenizer(self.prompts)
            self.image_size = 32
            self._processor = None
            self._text = self.tokenizer(self.prompts, max_length=32)
        else:
            from transformers import CLIPProcessor

            self.model_path = model
            self._processor = load_pretrained(CLIPProcessor, model, "CLIP processor")
            self.image_size = None
            self._text = dict(self._processor.tokenizer(self.prompts, padding=True, return_tensors="pt"))

    def build_model(self, seed: int = 0) -> nn.Module:
        if self.model_path is None:
            return tiny_clip(len(self.tokenizer), seed)
        from transformers import CLIPModel

        return load_pretrained(CLIPModel, self.model_path, "CLIP model", weights=True, dtype=self.dtype)

    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        if self._processor is not None:
            return self._processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        x = torch.stack([torch.as_tensor(np.array(im, dtype=np.float32)).permute(2, 0, 1) for im in images]) / 255.0
        x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - CLIP_MEAN) / CLIP_STD

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return {
            "pixel_values": self._pixels([self.examples.inputs[i] for i in idx]).to(self.dtype),
            "labels": torch.from_numpy(self.labels[idx]),
            **self._text,
        }

    def _logits(self, model, batch) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        return self.logit_scale * out.image_embeds.float() @ out.text_embeds.float().T  # embeds are L2-normalized

    def loss(self, model, batch):
        return nn.functional.cross_entropy(self._logits(model, batch), batch["labels"])

    def predict(self, model, batch):
        logits = self._logits(model, batch)
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"), logits.argmax(-1)
