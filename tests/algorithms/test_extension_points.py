"""The extension points peer methods build on, each exercised by a tiny test algorithm that is one class and one
registration line: per-agent state saved in checkpoints, per-layer context (start-of-round factors, activations on
the agent's own data), personal parameters, a dense base correction folded into exports, phase-dependent trainable
sets, topology facts at set-up, heterogeneous ranks end to end, and declared statistics."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import cfg_for, digits_task

from decaf_lora import algorithms
from decaf_lora.algorithms import MixOutput
from decaf_lora.algorithms.base import prepare
from decaf_lora.algorithms.dlora import DLoRA, average_factors
from decaf_lora.config import load_config
from decaf_lora.engine import make_engine, resume, run
from decaf_lora.errors import DecafError
from decaf_lora.export import export_adapter
from decaf_lora.registry import ALGORITHMS


@pytest.fixture
def registered():
    """Register test algorithms for one test only (the one line a new method needs), then forget them."""
    names = []

    def add(cls):
        ALGORITHMS.register(cls)
        names.append(cls.name)
        return cls

    yield add
    for name in names:
        ALGORITHMS.unregister(name)


def engine_for(tmp_path, write=False, **kw):
    return make_engine(load_config(cfg_for(tmp_path, **kw)), task=digits_task(), write=write, progress=False)


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


@dataclasses.dataclass
class CountsMixes(DLoRA):
    """Per-agent state that lives across rounds: how many times each agent has mixed, per layer."""

    name = "test-counts-mixes"
    stats = {"mixes": "max"}

    def init_state(self, layer, n_agents):
        return {"mixes": torch.zeros(n_agents)}

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None):
        out = super().mix(A, B, W, round_=round_, self_index=self_index, ranks=ranks, context=context)
        mixes = context.state["mixes"] + 1
        return MixOutput(out.A, out.B, {"mixes": mixes}, state={"mixes": mixes})


def test_per_agent_state_lives_across_rounds_and_survives_a_crash(tmp_path, registered, monkeypatch):
    registered(CountsMixes)
    cfg = cfg_for(tmp_path, algorithm="test-counts-mixes", rounds=4)
    full = run(cfg, task=digits_task(), write=False).metrics
    assert [m["mixes"] for m in full if m["agent"] == 0] == [1, 2, 3, 4]
    engine = make_engine(load_config(cfg), task=digits_task(), progress=False)
    real = engine.training.train
    monkeypatch.setattr(
        engine.training, "train", lambda a, t: (_ for _ in ()).throw(KeyboardInterrupt) if t == 2 else real(a, t)
    )
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    resumed = resume(engine.run_dir, task=digits_task())  # the state came back from the checkpoint, not from zero
    assert without_timing(resumed.metrics) == without_timing(full)


@dataclasses.dataclass
class SeesContext(DLoRA):
    """Asks for its own start-of-round factors and for the layer's inputs on its own data; records what it got."""

    name = "test-sees-context"
    needs = frozenset({"start_factors", "activations"})
    seen = []

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None):
        SeesContext.seen.append((round_, context.layer, context.start_A.clone(), context.activations.clone()))
        return super().mix(A, B, W, round_=round_, self_index=self_index, ranks=ranks, context=context)


def test_context_gives_start_of_round_factors_and_activations_of_the_agents_own_data(tmp_path, registered):
    registered(SeesContext)
    SeesContext.seen = []
    engine = engine_for(tmp_path, algorithm="test-sees-context", rounds=2)
    start = [A.clone() for A in engine.states.A]
    engine.run_round(0)
    first_layer = [s for s in SeesContext.seen if s[1] == 0]
    assert len(first_layer) == 1
    _, _, start_A, acts = first_layer[0]
    torch.testing.assert_close(start_A, start[0], atol=0, rtol=0)  # before training, not after
    assert not torch.equal(engine.states.A[0], start[0])  # training and mixing moved them since
    x = engine.task.x.float()
    for a in range(engine.cfg.agents):  # fc1's input is the example itself: each row is one of the agent's own
        own = x[torch.as_tensor(engine.split.train[a])]
        rows = acts[a][acts[a].abs().sum(1) > 0]
        assert len(rows) > 0 and all(bool((own == r).all(1).any()) for r in rows)


@dataclasses.dataclass
class KeepsBPersonal(algorithms.Algorithm):
    """Sends only A; B and the head are personal (never sent, never mixed)."""

    name = "test-keeps-b-personal"
    summary = "test"
    paper = "none"

    def sends(self, round_=0):
        return ("A",)

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None):
        p = prepare(A, B, W, self_index)
        return p.cast(torch.einsum("ij,jrk->irk", p.W, p.A), p.own_B)


def test_personal_parameters_are_never_sent_nor_mixed_and_export_per_agent(tmp_path, registered):
    from peft import PeftModel

    registered(KeepsBPersonal)
    task = digits_task(head=True)
    res = run(cfg_for(tmp_path, algorithm="test-keeps-b-personal", rounds=2), task=task)
    a_bytes = 4 * 2 * 64  # float32 A of fc1 (2 x 64); fc2 is the head
    assert all(m["bytes_sent"] == 2 * a_bytes for m in res.metrics)  # ring: two neighbours, A only
    engine = make_engine(
        load_config(os.path.join(res.run_dir, "config.yaml")),
        task=task,
        run_dir=res.run_dir,
        resume=True,
        progress=False,
    )
    heads = next(iter(engine.states.H.values()))
    assert not torch.allclose(heads[0], heads[1])  # heads were trained apart and never averaged
    x = task.x[:16].float()
    for agent in (0, 1):
        out = export_adapter(res.run_dir, str(tmp_path / f"agent{agent}"), agent=agent, task=task)
        loaded = PeftModel.from_pretrained(task.build_model(seed=0), out).eval()
        engine.states.load(agent)
        engine.model.eval()
        torch.testing.assert_close(loaded(x), engine.model(x), atol=1e-5, rtol=0)


@dataclasses.dataclass
class AddsCorrection(DLoRA):
    """A dense base correction per agent: the factor-wise mix, plus a residual that makes the effective weights
    (W0 + E + s B A) reach their exact average (the shape of FedEx-LoRA)."""

    name = "test-adds-correction"
    corrects_base = True
    stats = {"correction": "rss"}

    def sends(self, round_=0):
        return ("A", "B", "E", "head")

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None):
        p = prepare(A, B, W, self_index)
        A_new, B_new = average_factors(p)
        s = context.scale
        exact = torch.einsum("ij,jdk->idk", p.W, s * p.B @ p.A + context.E.to(p.A.dtype))
        E_new = exact - s * B_new @ A_new
        return p.cast(A_new, B_new, {"correction": torch.linalg.matrix_norm(E_new)}, E=E_new.to(context.E.dtype))


def test_a_dense_base_correction_is_applied_counted_checkpointed_and_folded_into_exports(tmp_path, registered):
    from peft import PeftModel

    registered(AddsCorrection)
    task = digits_task(head=True)
    # the complete graph: the exact mix leaves every agent with the same effective weight, so the consensus export
    # must reproduce every agent; on any graph, an agent's export must reproduce that agent
    res = run(cfg_for(tmp_path, algorithm="test-adds-correction", rounds=2, topology={"name": "complete"}), task=task)
    factors = 2 * 64 + 32 * 2  # LoRA on fc1
    dense = 32 * 64  # its base correction
    head = 10 * 32 + 10  # fc2, trained fully
    assert all(m["bytes_sent"] == 3 * 4 * (factors + dense + head) for m in res.metrics)  # three neighbours
    engine = make_engine(
        load_config(os.path.join(res.run_dir, "config.yaml")),
        task=task,
        run_dir=res.run_dir,
        resume=True,
        progress=False,
    )
    assert engine.states.E is not None and float(engine.states.E[0].abs().sum()) > 0
    x = task.x[:16].float()
    engine.model.eval()
    for agent in (0, None):
        out = export_adapter(res.run_dir, str(tmp_path / f"e{agent}"), agent=agent, task=task)
        conf = json.load(open(os.path.join(out, "adapter_config.json")))
        assert max(conf["rank_pattern"].values()) > 2  # the correction was folded in as extra rank
        loaded = PeftModel.from_pretrained(task.build_model(seed=0), out).eval()
        if agent is not None:
            engine.states.load(agent)
            torch.testing.assert_close(loaded(x), engine.model(x), atol=1e-5, rtol=0)
        else:
            for a in range(engine.cfg.agents):
                engine.states.load(a)
                torch.testing.assert_close(loaded(x), engine.model(x), atol=1e-4, rtol=0)


@dataclasses.dataclass
class AlternatesFactors(DLoRA):
    """Phase-dependent trainable sets: B (and the head) in even rounds, A in odd rounds."""

    name = "test-alternates"

    def trainable(self, round_=0):
        return ("B", "head") if round_ % 2 == 0 else ("A",)


def test_phase_dependent_trainable_sets_freeze_the_other_factor_during_training(tmp_path, registered, monkeypatch):
    registered(AlternatesFactors)
    engine = engine_for(tmp_path, algorithm="test-alternates", rounds=2)
    changed = {}
    exchange = engine.exchange

    def after_training(t, plan, spec):
        changed[t] = {
            "A": not torch.equal(engine.states.A[0], before[0]),
            "B": not torch.equal(engine.states.B[0], before[1]),
        }
        return exchange(t, plan, spec)

    monkeypatch.setattr(engine, "exchange", after_training)
    for t in range(2):
        before = (engine.states.A[0].clone(), engine.states.B[0].clone())
        engine.run_round(t)
    assert changed == {0: {"A": False, "B": True}, 1: {"A": True, "B": False}}


@dataclasses.dataclass
class ReadsFacts(DLoRA):
    """Reads the network's spectral gap and mixing rate once, at set-up."""

    name = "test-reads-facts"
    facts_seen = {}

    def setup(self, facts):
        super().setup(facts)
        ReadsFacts.facts_seen = {
            "gap": facts.network.spectral_gap,
            "rho": facts.network.mixing_rate(),
            "n": facts.n_agents,
        }


def test_topology_facts_reach_the_algorithm_at_set_up(tmp_path, registered):
    from decaf_lora.topology import Topology

    registered(ReadsFacts)
    engine_for(tmp_path, algorithm="test-reads-facts", agents=6)
    ring = Topology.build("ring", 6)
    assert ReadsFacts.facts_seen["n"] == 6
    assert ReadsFacts.facts_seen["gap"] == pytest.approx(ring.spectral_gap)
    assert ReadsFacts.facts_seen["rho"] == pytest.approx(ring.second_eigenvalue**2)  # static W: lambda_2(W)^2
    engine_for(tmp_path, algorithm="test-reads-facts", agents=6, faults={"link_drop": 0.5})
    assert ReadsFacts.facts_seen["rho"] > ring.second_eigenvalue**2  # failing links mix slower


def test_heterogeneous_ranks_train_mix_checkpoint_and_export_at_each_agents_rank(tmp_path, monkeypatch):
    from peft import PeftModel

    task = digits_task()
    cfg = cfg_for(tmp_path, rounds=3, lora={"rank": 4, "ranks": [2, 4]})
    full = run(cfg, task=task, write=False)
    assert {m["agent"]: m["rank"] for m in full.metrics} == {0: 2, 1: 4, 2: 2, 3: 4}
    engine = make_engine(load_config(cfg), task=task, progress=False)
    for t in range(2):
        engine.run_round(t)
        for A, B in zip(engine.states.A, engine.states.B):
            assert not A[0::2, 2:].any() and not B[0::2, :, 2:].any()  # rank-2 agents stay rank 2
            assert A[1::2, 2:].any()
    engine = make_engine(load_config(cfg), task=task, progress=False)
    real = engine.training.train
    monkeypatch.setattr(
        engine.training, "train", lambda a, t: (_ for _ in ()).throw(KeyboardInterrupt) if t == 2 else real(a, t)
    )
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    resumed = resume(engine.run_dir, task=task)
    assert without_timing(resumed.metrics) == without_timing(full.metrics)
    out = export_adapter(engine.run_dir, str(tmp_path / "agent0"), agent=0, task=task)
    assert set(json.load(open(os.path.join(out, "adapter_config.json")))["rank_pattern"].values()) == {2}
    check = make_engine(load_config(cfg), task=task, run_dir=engine.run_dir, resume=True, progress=False)
    check.states.load(0)
    check.model.eval()
    loaded = PeftModel.from_pretrained(task.build_model(seed=0), out).eval()
    x = task.x[:16].float()
    torch.testing.assert_close(loaded(x), check.model(x), atol=1e-5, rtol=0)


def test_methods_that_cannot_train_different_ranks_refuse_in_one_sentence(tmp_path):
    from decaf_lora.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"algorithm=dlora-fa cannot train agents of different ranks \(lora.ranks\); use one of: .*decaf",
    ):
        load_config(cfg_for(tmp_path, algorithm="dlora-fa", lora={"rank": 4, "ranks": [2, 4]}))


@dataclasses.dataclass
class UndeclaredStat(DLoRA):
    name = "test-undeclared-stat"

    def mix(self, A, B, W, **kw):
        out = super().mix(A, B, W, **kw)
        out.stats = {"mystery": torch.zeros(out.A.shape[0])}
        return out


def test_a_statistic_without_a_declared_reduction_is_a_clear_error(tmp_path, registered):
    registered(UndeclaredStat)
    with pytest.raises(DecafError, match=r"returned the statistic 'mystery' without declaring how it reduces"):
        run(cfg_for(tmp_path, algorithm="test-undeclared-stat", rounds=1), task=digits_task(), write=False)


def test_every_reduction_rule_is_applied_over_layers(tmp_path, registered):
    @dataclasses.dataclass
    class OnePerLayer(DLoRA):
        name = "test-one-per-layer"
        stats = {"s_sum": "sum", "s_max": "max", "s_rss": "rss"}

        def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None):
            out = super().mix(A, B, W, round_=round_, self_index=self_index)
            v = torch.full((out.A.shape[0],), float(context.layer + 3))  # 3 in layer 0, 4 in layer 1
            out.stats = {"s_sum": v, "s_max": v, "s_rss": v}
            return out

    registered(OnePerLayer)
    m = run(cfg_for(tmp_path, algorithm="test-one-per-layer", rounds=1), task=digits_task(), write=False).metrics[0]
    assert (m["s_sum"], m["s_max"], m["s_rss"]) == (7.0, 4.0, 5.0)
    assert np.isclose(m["s_rss"], (3**2 + 4**2) ** 0.5)
