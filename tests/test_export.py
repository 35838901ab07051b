"""PEFT export: the adapter directory loads with PeftModel.from_pretrained and reproduces the in-run logits."""

import json
import os

import pytest
import torch

from decaf_lora.adapters import agent_state, consensus_state
from decaf_lora.config import load_config
from decaf_lora.engine import make_engine
from decaf_lora.errors import DecafError
from decaf_lora.export import export_adapter


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, tmp_path_factory):
    from conftest import tiny_text_overrides

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None, tiny_text_overrides(tiny_bert_dir, str(out), rounds=2, **{"lora.rank": 3, "lora.alpha": 12})
    )
    sim = make_engine(cfg, progress=False)
    sim.run()
    return sim


def logits_of(model, sim):
    batch = sim.task.batch(sim.split.test[:16])
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("agent", [0, 3])
def test_exported_agent_adapter_gives_the_in_run_logits(finished_run, tmp_path, agent):
    from peft import PeftModel

    sim = finished_run
    sim.states.load(agent)
    expected = logits_of(sim.model, sim)
    out = export_adapter(sim.run_dir, str(tmp_path / f"agent{agent}"), agent=agent)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    conf = json.load(open(os.path.join(out, "adapter_config.json")))
    assert conf["r"] == 3 and conf["lora_alpha"] == 12  # the scale alpha / r travels with the factors
    base = sim.task.build_model(seed=sim.cfg.seed)
    loaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits_of(loaded, sim), expected, atol=1e-5, rtol=0)


def test_agents_differ_so_the_export_check_is_meaningful(finished_run):
    sim = finished_run
    sim.states.load(0)
    a = logits_of(sim.model, sim)
    sim.states.load(1)
    b = logits_of(sim.model, sim)
    assert not torch.allclose(a, b, atol=1e-5)


def test_consensus_export_is_the_best_fit_of_the_mean_product(finished_run, tmp_path):
    from peft import PeftModel

    sim = finished_run
    cons = consensus_state(sim.states.state_dict())
    for l, layer in enumerate(sim.states.layers):
        mean = (sim.states.B[l] @ sim.states.A[l]).mean(0)
        U, S, Vh = torch.linalg.svd(mean.double())
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close(
            (cons[f"{layer.name}.lora_B"] @ cons[f"{layer.name}.lora_A"]).double(), best, atol=1e-5, rtol=1e-4
        )
    out = export_adapter(sim.run_dir, str(tmp_path / "consensus"))
    loaded = PeftModel.from_pretrained(sim.task.build_model(seed=sim.cfg.seed), out)
    assert torch.isfinite(logits_of(loaded, sim)).all()


def test_export_errors(finished_run, tmp_path):
    with pytest.raises(DecafError, match="--agent=9 is out of range; this run has agents 0..3"):
        export_adapter(finished_run.run_dir, str(tmp_path / "x"), agent=9)
    with pytest.raises(DecafError, match="does not exist"):
        export_adapter(str(tmp_path / "nope"), str(tmp_path / "x"), agent=0)
    assert not (tmp_path / "x").exists()


def test_agent_state_slices_one_agent(finished_run):
    sd = finished_run.states.state_dict()
    one = agent_state(sd, 2)
    assert all(torch.equal(one[k], v[2]) for k, v in sd.items())
