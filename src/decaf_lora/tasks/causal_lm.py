"""Causal language models: classification as generation (the paper's LLaMA-2 on BoolQ / WiC, scored by F1) and
instruction data (scored by teacher-forced token accuracy).

Each example becomes ``"{input}\nAnswer:"`` followed by `` {answer}`` and the end-of-sequence token; the loss covers
the answer tokens only. With at most ``MAX_CLASSES`` distinct answers the task is a classification: a prediction is
the answer with the highest mean log-likelihood per token (rank classification), and macro-F1 is reported.
``random-tiny-llama`` is a randomly initialised toy LLaMA for tests; a directory or hub name with real weights
gives the paper's setup.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import Examples
from .base import Task, quiet_transformers
from .text import load_pretrained
from .tiny import ByteTokenizer, tiny_llama

MAX_CLASSES = 32
TEMPLATE = "{}\nAnswer:"


class CausalLM(Task):
    default_targets = ("q_proj", "v_proj")
    head_modules = ()

    def __init__(
        self, examples: Examples, model: str = "random-tiny-llama", max_length: int = 128, dtype: str = "float32"
    ):
        quiet_transformers()
        self.examples = examples
        self.max_length = max_length
        self.dtype = getattr(torch, dtype)
        self.classify = len(examples.class_names) <= MAX_CLASSES
        self.metric = "f1" if self.classify else "accuracy"
        if model == "random-tiny-llama":
            self.model_path = None
            self.tok = ByteTokenizer()
            self._encode = self.tok.encode
            self.pad, self.eos = self.tok.pad_token_id, self.tok.eos_token_id
        else:
            from transformers import AutoTokenizer

            self.model_path = model
            self.tok = load_pretrained(AutoTokenizer, model, "tokenizer")
            self._encode = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]
            self.eos = self.tok.eos_token_id
            self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self.answers = [self._encode(" " + name) + [self.eos] for name in examples.class_names]

    def build_model(self, seed: int = 0) -> nn.Module:
        if self.model_path is None:
            return tiny_llama(seed)
        from transformers import AutoModelForCausalLM

        return load_pretrained(AutoModelForCausalLM, self.model_path, "causal LM", weights=True, dtype=self.dtype)

    def _sequences(self, idx: np.ndarray, answer_of) -> dict[str, torch.Tensor]:
        """Left-truncated prompt + answer per example; labels -100 except on the answer."""
        rows, labels = [], []
        for i in idx:
            ans = self.answers[answer_of(i)]
            prompt = self._encode(TEMPLATE.format(self.examples.inputs[i]))[-(self.max_length - len(ans)) :]
            rows.append(prompt + ans)
            labels.append([-100] * len(prompt) + ans)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad)
        lab = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, (r, l) in enumerate(zip(rows, labels)):  # right padding
            ids[k, : len(r)] = torch.tensor(r)
            lab[k, : len(l)] = torch.tensor(l)
            mask[k, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        out = self._sequences(idx, lambda i: int(self.labels[i]))
        out["class"] = torch.from_numpy(self.labels[idx])
        out["index"] = torch.from_numpy(idx)
        return out

    def loss(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    @staticmethod
    def _answer_logprob(model, seq: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence: summed log-prob of the answer tokens, their count, and how many the argmax got right."""
        logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).logits[:, :-1].float()
        target = seq["labels"][:, 1:]
        keep = target != -100
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        right = (logits.argmax(-1) == target) & keep
        return (logp * keep).sum(1), keep.sum(1), right.sum(1)

    def predict(self, model, batch):
        lp, count, right = self._answer_logprob(model, batch)
        loss = -(lp / count).sum()
        if not self.classify:  # instruction data: teacher-forced token accuracy stands in for a prediction
            full = right == count
            return loss, torch.where(full, batch["class"], -1)
        device = batch["input_ids"].device
        idx = batch["index"].cpu().numpy()
        scores = []
        for c in range(len(self.answers)):
            lp_c, n_c, _ = self._answer_logprob(
                model, {k: v.to(device) for k, v in self._sequences(idx, lambda i, c=c: c).items()}
            )
            scores.append(lp_c / n_c)  # per-token: a longer answer is not penalized for its length
        return loss, torch.stack(scores, dim=1).argmax(1)
