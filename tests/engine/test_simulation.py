"""The simulation engine: every algorithm trains, metrics are complete and exact, runs reproduce, memory is shared."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TinyMLP, cfg_for, digits_task  # noqa: F401 - cfg_for and digits_task re-exported

from decaf_lora import algorithms
from decaf_lora.config import load_config
from decaf_lora.engine import ROW_SCHEMA, make_engine, run
from decaf_lora.engine.loop import OPTIONAL


@pytest.mark.parametrize("algo", algorithms.available())
def test_every_algorithm_trains_and_logs_every_agent_every_round(tmp_path, algo):
    res = run(cfg_for(tmp_path, algorithm=algo), task=digits_task())
    m = res.metrics
    assert len(m) == 4 * 4
    first = np.mean([x["train_loss"] for x in m if x["round"] == 1])
    last = np.mean([x["train_loss"] for x in m if x["round"] == 4])
    assert last < first
    declared = set(algorithms.get(algo).stats)
    required = set(ROW_SCHEMA) - OPTIONAL
    assert all(required <= set(x) <= set(ROW_SCHEMA) | declared for x in m)
    evaluated = [x for x in m if "eval_accuracy" in x]
    assert sorted({x["round"] for x in evaluated}) == [2, 4]
    assert all({"eval_loss", "local_accuracy"} <= set(x) for x in evaluated)
    if algo == "decaf":  # every statistic DeCAF returns reaches the metrics; Proposition 1 holds everywhere
        assert all(declared <= set(r) for r in m)
        assert all(0 <= r["tsvd_tail"] <= r["tsvd_tail_bound"] and r["tsvd_tail_ratio"] <= 1 for r in m)


def test_run_directory_holds_everything_and_nothing_half_written(tmp_path):
    res = run(cfg_for(tmp_path), task=digits_task())
    files = set(os.listdir(res.run_dir))
    assert {
        "config.yaml",
        "topology.json",
        "partition.json",
        "metrics.jsonl",
        "summary.json",
        "adapters.safetensors",
        "report.md",
        "plots",
    } <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert set(os.listdir(os.path.join(res.run_dir, "plots"))) == {"training.png", "label_histograms.png"}
    part = json.load(open(os.path.join(res.run_dir, "partition.json")))
    assert len(part["histograms"]) == 4 and sum(part["train_sizes"]) + sum(part["local_eval_sizes"]) == 1497
    summary = json.load(open(os.path.join(res.run_dir, "summary.json")))
    assert summary["algorithm"] == "decaf" and summary["rounds"] == 4 and summary["state_after_mix"] == "reset"
    recorded = load_config(os.path.join(res.run_dir, "config.yaml"))
    assert recorded.task.kind == "module" and recorded.task.model == "TinyMLP (a Python ModuleTask)"  # what really ran
    expected = load_config(cfg_for(tmp_path)).to_dict()
    expected["task"].update(kind="module", model=recorded.task.model, dataset=recorded.task.dataset)
    assert recorded.to_dict() == expected


def test_same_config_and_seed_give_the_same_numbers(tmp_path):
    a = run(cfg_for(tmp_path, rounds=2), task=digits_task(), write=False).metrics
    b = run(cfg_for(tmp_path, rounds=2), task=digits_task(), write=False).metrics
    strip = lambda ms: [{k: v for k, v in x.items() if k != "seconds"} for x in ms]  # noqa: E731
    assert strip(a) == strip(b)
    c = run(cfg_for(tmp_path, rounds=2, seed=1), task=digits_task(), write=False).metrics
    assert strip(a) != strip(c)


def test_training_seed_does_not_change_the_data_split(tmp_path):
    s0 = make_engine(load_config(cfg_for(tmp_path, seed=0)), task=digits_task(), write=False, progress=False)
    s1 = make_engine(load_config(cfg_for(tmp_path, seed=5)), task=digits_task(), write=False, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(s0.split.train, s1.split.train))
    s2 = make_engine(load_config(cfg_for(tmp_path, split_seed=5)), task=digits_task(), write=False, progress=False)
    assert not all(np.array_equal(a, b) for a, b in zip(s0.split.train, s2.split.train))


def test_all_agents_start_from_the_same_adapter(tmp_path):
    sim = make_engine(load_config(cfg_for(tmp_path)), task=digits_task(), write=False, progress=False)
    for A, B in zip(sim.states.A, sim.states.B):
        assert torch.equal(A, A[:1].expand_as(A)) and (B == 0).all()


@pytest.mark.parametrize("algo", ["decaf", "dlora", "dlora-fa"])
def test_bytes_are_payload_size_times_neighbours(tmp_path, algo):
    res = run(cfg_for(tmp_path, algorithm=algo, agents=6, rounds=1), task=digits_task(), write=False)
    rank, k1, d1, k2, d2 = 2, 64, 32, 32, 10
    a_numel, b_numel = rank * k1 + rank * k2, d1 * rank + d2 * rank
    factor = {"decaf": a_numel + b_numel, "dlora": a_numel + b_numel, "dlora-fa": b_numel}[algo]
    for m in res.metrics:
        assert m["neighbors"] == 2  # ring
        assert m["bytes_sent"] == m["bytes_received"] == 4 * factor * 2


def test_fedavg_reaches_consensus_and_local_does_not_communicate(tmp_path):
    fed = run(cfg_for(tmp_path, algorithm="fedavg", rounds=2), task=digits_task(), write=False).metrics
    assert max(m["consensus_distance"] for m in fed) < 1e-5
    loc = run(cfg_for(tmp_path, algorithm="local", rounds=2), task=digits_task(), write=False).metrics
    assert all(m["bytes_sent"] == 0 for m in loc) and max(m["consensus_distance"] for m in loc) > 1e-3


def test_dlora_fa_never_changes_a(tmp_path):
    sim = make_engine(
        load_config(cfg_for(tmp_path, algorithm="dlora-fa", rounds=2)), task=digits_task(), write=False, progress=False
    )
    before = [A.clone() for A in sim.states.A]
    sim.run()
    assert all(torch.equal(a, b) for a, b in zip(before, sim.states.A))


def test_keep_policy_keeps_adam_state_and_reset_clears_it(tmp_path):
    keep = make_engine(
        load_config(cfg_for(tmp_path, rounds=1, optim={"lr": 1e-2, "state_after_mix": "keep"})),
        task=digits_task(),
        write=False,
        progress=False,
    )
    keep.run()
    assert all(len(o.state) > 0 for o in keep.optimizers)
    reset = make_engine(load_config(cfg_for(tmp_path, rounds=1)), task=digits_task(), write=False, progress=False)
    reset.run()
    assert all(len(o.state) == 0 for o in reset.optimizers)


def storage_bytes(sim) -> int:
    """Bytes of every distinct tensor storage the engine holds: model, agents' adapters, optimizer states."""
    seen, total = set(), 0
    tensors = list(sim.model.parameters()) + list(sim.model.buffers())
    tensors += [*sim.states.A, *sim.states.B, *sim.states.H.values()]
    tensors += [v for o in sim.optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def test_one_shared_base_model_memory_grows_by_about_one_adapter_per_agent(tmp_path):
    """Measured by tensor storage: base + N x (adapter + Adam state), never N x base."""
    sizes = {}
    for n in (1, 2, 4, 8):
        sim = make_engine(
            load_config(cfg_for(tmp_path, agents=n, rounds=1, optim={"lr": 1e-2, "state_after_mix": "keep"})),
            task=digits_task(width=512),
            write=False,
            progress=False,
        )
        sim.run()
        sizes[n] = storage_bytes(sim)
        adapter = sim.states.adapter_bytes()
    base = sum(p.numel() * p.element_size() for n_, p in sim.model.named_parameters() if "lora_" not in n_)
    per_agent = (sizes[8] - sizes[1]) / 7
    assert per_agent <= 3.2 * adapter  # the adapter itself + Adam's two moments
    assert per_agent >= 0.9 * adapter
    assert adapter < 0.2 * base
    assert sizes[8] < 1.1 * base + 8 * 3.2 * adapter  # the base is held once, not once per agent


def test_link_failures_and_schedules_are_used(tmp_path):
    res = run(
        cfg_for(
            tmp_path, agents=6, rounds=4, topology={"name": "complete", "schedule": "link-failures", "link_drop": 0.5}
        ),
        task=digits_task(),
        write=False,
    )
    neighbours = {m["neighbors"] for m in res.metrics}
    assert len(neighbours) > 1 and max(neighbours) <= 5


def test_a_diverging_run_stops_with_a_clear_message(tmp_path):
    with pytest.raises(FloatingPointError, match="lower optim.lr"):
        run(cfg_for(tmp_path, optim={"lr": 1e30, "grad_clip": 0}), task=digits_task(), write=False)


def test_a_blown_up_loss_is_warned_in_the_log_and_the_summary_even_if_it_comes_back(tmp_path, capsys):
    """lr=3 sends the loss to ~1e6 in round 1; by round 4 it is back at chance level. Still a blow-up, still said."""
    res = run(cfg_for(tmp_path, optim={"lr": 3.0}), task=digits_task(), write=False)
    assert res.summary["warnings"] and "the training loss blew up" in res.summary["warnings"][0]
    assert "warning: the training loss blew up" in capsys.readouterr().err
    calm = run(cfg_for(tmp_path), task=digits_task(), write=False)
    assert calm.summary["warnings"] == []
    assert all(m["train_loss_start"] is not None for m in calm.metrics)


def test_agents_holding_the_same_adapter_are_evaluated_on_the_shared_test_set_once(tmp_path, monkeypatch):
    """Under FedAvg every agent holds one model after the mix: the shared test set is evaluated once per round
    (evaluation is deterministic), each agent's own held-out examples still separately."""
    cfg = load_config(cfg_for(tmp_path, algorithm="fedavg", rounds=1))
    engine = make_engine(cfg, task=digits_task(), write=False, progress=False)
    sizes = []
    real = engine.task.evaluate

    def counting(model, indices, batch_size, device):
        sizes.append(len(indices))
        return real(model, indices, batch_size, device)

    monkeypatch.setattr(engine.task, "evaluate", counting)
    rows = engine.run_round(0)
    assert sizes.count(len(engine.split.test)) == 1 and len(sizes) == 1 + 4
    assert len({r["eval_accuracy"] for r in rows}) == 1
    local = run(cfg_for(tmp_path, algorithm="local", rounds=1), task=digits_task(), write=False).metrics
    assert len({r["eval_accuracy"] for r in local}) > 1  # different adapters: each evaluated


def test_a_method_that_weighs_a_neighbour_who_sent_nothing_is_refused(tmp_path):
    """Mixing a sender's own in-memory state in place of a payload that never crossed the wire would fake a
    delivery (and report zero bytes); the engine refuses the plan instead."""
    from decaf_lora.errors import DecafError

    class Silent(type(algorithms.get("dlora"))):
        def sends(self, round_=0):
            return ()

    with pytest.raises(DecafError, match="weighs agent 1 in agent 0's row of round 1, but agent 1 sent nothing"):
        run(cfg_for(tmp_path, rounds=1), task=digits_task(), write=False, algorithm=Silent())
