"""Randomly initialised tiny models and matching tokenizers, for testing the CLIP and causal-LM code paths offline.

No pretrained CLIP or LLaMA weights exist offline; these models have the real architectures (transformers'
CLIPModel and LlamaForCausalLM) at toy sizes with RANDOM weights. They exercise every line of the tasks, but their
accuracy means nothing about the pretrained models.
"""

from __future__ import annotations

import re

import torch


class WordTokenizer:
    """Whitespace/punctuation word ids over a fixed vocabulary (built from the prompts): enough for a random CLIP."""

    pad_token_id, bos_token_id, unk_token_id, eos_token_id = 0, 1, 2, 3  # eos != 2: CLIP's legacy argmax pooling

    def __init__(self, texts: list[str]):
        words = sorted({w for t in texts for w in self.split(t)})
        self.vocab = {w: i + 4 for i, w in enumerate(words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())

    def __len__(self) -> int:
        return len(self.vocab) + 4

    def __call__(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        rows = [
            [self.bos_token_id]
            + [self.vocab.get(w, self.unk_token_id) for w in self.split(t)][: max_length - 2]
            + [self.eos_token_id]
            for t in texts
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos): any text, no vocabulary file; for a random LLaMA."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


def tiny_clip_config(vocab_size: int = 64):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=WordTokenizer.eos_token_id,
        pad_token_id=0,
        bos_token_id=1,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def tiny_clip(vocab_size: int, seed: int = 0):
    from transformers import CLIPModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPModel(tiny_clip_config(vocab_size))


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config())


#: The random toy models by name, as configs (their structure can be checked without building them).
TINY_CONFIGS = {"random-tiny-clip": tiny_clip_config, "random-tiny-llama": tiny_llama_config}
