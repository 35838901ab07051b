"""Each task, end to end on a tiny model: a few local steps make the loss fall.

CLIP and LLaMA here are tiny RANDOMLY initialised models (no pretrained weights exist offline); they test the code
paths, not the paper's accuracy.
"""

import numpy as np
import pytest
import torch
from conftest import TinyMLP

from decaf_lora.config import ConfigError, load_config
from decaf_lora.engine import make_engine, run
from decaf_lora.tasks import CausalLM, ClipFewShot, ModuleTask, build_task


def first_and_last_round_loss(metrics):
    rounds = sorted({m["round"] for m in metrics})
    mean = lambda r: np.mean([m["train_loss"] for m in metrics if m["round"] == r])  # noqa: E731
    return mean(rounds[0]), mean(rounds[-1])


def test_text_classification_on_tweets_learns(tiny_text):
    res = run(None, overrides=tiny_text(rounds=4, local_steps=5, algorithm="fedavg", **{"partition.scheme": "iid"}))
    first, last = first_and_last_round_loss(res.metrics)
    assert last < first


def test_clip_few_shot_on_digits_learns(tmp_path):
    cfg = load_config(
        None,
        [
            "task.kind=clip",
            "task.model=random-tiny-clip",
            "task.dataset=digits",
            "task.shots=6",
            "task.test_examples=100",
            "task.batch_size=16",
            "agents=2",
            "rounds=4",
            "local_steps=6",
            "optim.lr=5e-3",
            "partition.scheme=iid",
            "lora.rank=4",
            "partition.local_eval=0",
            f"out_dir={tmp_path}",
        ],
    )
    sim = make_engine(cfg, progress=False, write=False)
    assert isinstance(sim.task, ClipFewShot)
    names = {layer.name.rsplit(".", 1)[-1] for layer in sim.states.layers}
    assert names == {"q_proj", "k_proj", "v_proj"}
    assert any("text_model" in layer.name for layer in sim.states.layers) and any(
        "vision_model" in layer.name for layer in sim.states.layers
    )
    assert sim.task.prompts[3] == "a photo of a three."
    first, last = first_and_last_round_loss(sim.run().metrics)
    assert last < first


def test_causal_lm_classification_as_generation_learns(tmp_path):
    cfg = load_config(
        None,
        [
            "task.kind=causal_lm",
            "task.model=random-tiny-llama",
            "task.dataset=tweets",
            "task.train_examples=200",
            "task.test_examples=24",
            "task.max_length=48",
            "task.batch_size=8",
            "agents=2",
            "rounds=4",
            "local_steps=5",
            "optim.lr=1e-2",
            "partition.scheme=iid",
            "partition.local_eval=0",
            f"out_dir={tmp_path}",
        ],
    )
    sim = make_engine(cfg, progress=False, write=False)
    assert isinstance(sim.task, CausalLM) and sim.task.metric == "f1"
    res = sim.run()
    first, last = first_and_last_round_loss(res.metrics)
    assert last < first
    assert 0 <= res.summary["final_f1_mean"] <= 1


def test_causal_lm_rank_classification_is_not_biased_by_answer_length():
    """With uniform next-token probabilities every answer is equally likely per token: no class wins by being short.

    ('neutral' is one byte shorter than 'negative' and 'positive'; summed log-probabilities would always pick it.)
    """
    cfg = load_config(
        None, ["task.kind=causal_lm", "task.dataset=tweets", "task.train_examples=50", "task.test_examples=10"]
    )
    task = build_task(cfg)
    assert len(task.answers[1]) < len(task.answers[0])
    model = task.build_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    loss, pred = task.predict(model, task.batch(np.arange(6)))
    assert pred.tolist() == [0] * 6  # exact ties resolve to the first class
    assert torch.isfinite(loss)


def test_label_names_replace_class_names_in_prompts():
    cfg = load_config(None, ["task.kind=causal_lm", "task.dataset=tweets", "task.label_names=[bad, meh, good]"])
    assert build_task(cfg).examples.class_names == ["bad", "meh", "good"]


def digits_task():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = d.target
    return ModuleTask(TinyMLP, x[300:], y[300:], x[:300], y[:300], targets=["fc1"], head=["fc2"])


def test_module_task_trains_a_users_own_model(tmp_path):
    task = digits_task()
    res = run(
        {
            "agents": 3,
            "rounds": 5,
            "local_steps": 10,
            "eval_every": 5,
            "optim": {"lr": 1e-2},
            "partition": {"scheme": "iid"},
            "out_dir": str(tmp_path),
        },
        task=task,
    )
    first, last = first_and_last_round_loss(res.metrics)
    assert last < first
    assert res.summary["final_accuracy"]["mean"] > 0.5  # 10 digit classes: chance is 0.1
    assert len(res.metrics) == 15


def test_clip_reads_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("red_rose", "sunflower"):
        (tmp_path / name).mkdir()
        for k in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{k}.png")
    cfg = load_config(
        None, ["task.kind=clip", "task.model=random-tiny-clip", f"task.dataset={tmp_path}", "task.test_examples=4"]
    )
    task = build_task(cfg)
    assert task.examples.class_names == ["red rose", "sunflower"] and len(task.labels) == 10
    batch = task.batch([0, 7])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    (tmp_path / "sunflower" / "broken.png").write_text("not an image")
    with pytest.raises(Exception, match="cannot be read; remove or replace it"):
        build_task(cfg)


def test_causal_lm_on_instruction_data_scores_token_accuracy(tmp_path):
    import json

    f = tmp_path / "instr.jsonl"
    with open(f, "w") as fh:
        for k in range(60):
            fh.write(json.dumps({"instruction": f"repeat the number {k}", "output": f"{k} {k}"}) + "\n")
    cfg = load_config(
        None,
        [
            "task.kind=causal_lm",
            f"task.dataset={f}",
            "task.text_column=instruction",
            "task.label_column=output",
            "task.test_examples=10",
            "task.batch_size=10",
            "agents=2",
            "rounds=3",
            "local_steps=5",
            "optim.lr=1e-2",
            "partition.scheme=iid",
            "partition.local_eval=0",
            "eval_every=3",
        ],
    )
    sim = make_engine(cfg, progress=False, write=False)
    assert not sim.task.classify and sim.task.metric == "accuracy"
    res = sim.run()
    first, last = first_and_last_round_loss(res.metrics)
    assert last < first


def test_hugging_face_datasets_need_the_package_or_say_why():
    from decaf_lora.config import ConfigError

    cfg = load_config(None, ["task.dataset=hf:glue:sst2", "task.text_column=sentence"])
    with pytest.raises(ConfigError, match="task.dataset='hf:glue:sst2'"):
        build_task(cfg)  # without `datasets` installed or without network: one sentence, not a traceback


def test_labels_that_only_look_numeric_are_words_and_numbers_sort_numerically(tmp_path):
    from decaf_lora.data import load_examples

    path = tmp_path / "labels.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{['--5', '²', '10', '9', '-1'][i % 5]}\n" for i in range(10)))
    ex = load_examples(str(path), "text")
    assert ex.class_names == ["-1", "9", "10", "--5", "²"]


def test_every_example_the_run_uses_enters_its_data_digest():
    task = ModuleTask(
        TinyMLP, torch.randn(20, 64), torch.arange(20) % 2, torch.randn(6, 64), torch.arange(6) % 2, ["fc1"]
    )
    idx = np.arange(26)
    before = task.data_digest(idx)
    assert task.data_digest(idx) == before
    task.x[3, 0] += 1e-6  # one input moved by a hair
    assert task.data_digest(idx) != before


def test_a_model_directory_with_only_pickled_weights_is_refused(tiny_bert_dir, tmp_path):
    """A ``pytorch_model.bin`` is a pickle: loading it could run code, so only safetensors weights load."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from decaf_lora.tasks.text import load_pretrained

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, pickled)
    model = AutoModelForSequenceClassification.from_pretrained(str(pickled))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert (pickled / "pytorch_model.bin").exists()
    with pytest.raises(ConfigError, match=r"weights load only from model.safetensors, never from a pickled .bin"):
        load_pretrained(AutoModelForSequenceClassification, str(pickled), "sequence classifier", weights=True)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0, 1, 2, 70000]), r"labels go up to 70000, beyond the bound of 65536 classes; .* renumber them"),
        (np.array([0, 1, -1, 2]), r"holds the negative label -1"),
        (np.array([0.0, 1.5, 2.0, 1.0]), r"holds non-integer values"),
        (np.array([0.0, np.nan, 2.0, 1.0]), r"holds NaN or infinite values"),
        (np.array(["a", "b", "a", "b"]), r"has dtype <U1; give integer class ids"),
        (np.zeros((4, 2), dtype=int), r"has shape \(4, 2\); give one integer class id per example"),
        (np.array([0, 1, 2]), r"got 4 training inputs for 3 labels"),
    ],
)
def test_module_task_refuses_labels_that_are_not_class_ids_in_one_sentence(labels, message):
    x = torch.zeros(4, 64)
    with pytest.raises(ConfigError, match=message):
        ModuleTask(TinyMLP, x, labels, x[:2], np.array([0, 1]), targets=["fc1"])
