"""Faults: dropped links, absent agents and poisoned payloads; the run goes on and logs what happened."""

import numpy as np
import pytest
import torch
from conftest import cfg_for, digits_task

from decaf_lora.config import load_config
from decaf_lora.engine import make_engine, run
from decaf_lora.engine.screening import renormalize_without
from decaf_lora.topology import Topology, validate_mixing_matrix
from decaf_lora.topology.faults import absent_agents, drop_links, isolate


def test_dropped_links_and_absent_agents_keep_the_matrix_doubly_stochastic():
    w = Topology.build("torus", 16).matrix
    for t in range(20):
        wt = isolate(drop_links(w, 0.3, seed=1, round_=t), absent_agents(16, 0.2, seed=1, round_=t))
        validate_mixing_matrix(wt, require_connected=False)
        assert np.array_equal(
            wt, isolate(drop_links(w, 0.3, seed=1, round_=t), absent_agents(16, 0.2, seed=1, round_=t))
        )
    links = lambda m: np.count_nonzero(m - np.diag(np.diag(m)))  # noqa: E731
    alive = [links(drop_links(w, 0.3, 0, t)) for t in range(300)]
    assert np.mean(alive) / links(w) == pytest.approx(0.7, abs=0.03)


def test_absent_agent_is_cut_off():
    w = Topology.build("ring", 5).matrix
    wt = isolate(w, np.array([False, True, False, False, False]))
    assert wt[1, 1] == 1 and wt[0, 1] == wt[2, 1] == 0


def test_renormalize_without_rejected_senders():
    w = Topology.build("ring", 4).matrix
    out = renormalize_without(w, {0: [1]})
    assert out[0, 1] == 0 and out[0].sum() == pytest.approx(1) and out[0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["nan", "shape", "scale"])
def test_poisoned_agent_is_rejected_every_round_and_healthy_agents_keep_their_accuracy(tmp_path, kind):
    base = cfg_for(tmp_path, agents=8, rounds=6, eval_every=6, partition={"scheme": "iid"})
    clean = run(base, task=digits_task(), write=False)
    faulty_cfg = dict(base, faults={"link_drop": 0.3, "poison_agent": 3, "poison": kind})
    faulty = run(faulty_cfg, task=digits_task(), write=False)
    assert len(faulty.metrics) == 8 * 6
    for m in faulty.metrics:
        assert 3 not in m["rejected"] or m["agent"] in (2, 4)
        if m["agent"] == 3:
            assert m["payload_rejected"] is not None
        else:
            assert m["payload_rejected"] is None
    # every round in which agent 3 still had a live link, its neighbours on that link rejected it
    assert sum(3 in m["rejected"] for m in faulty.metrics) >= 6
    last = lambda res: {m["agent"]: m["eval_accuracy"] for m in res.metrics if m["round"] == 6}  # noqa: E731
    healthy = [a for a in range(8) if a not in (2, 3, 4)]
    assert all(np.isfinite(list(last(faulty).values())))
    assert abs(np.mean([last(faulty)[a] for a in healthy]) - np.mean([last(clean)[a] for a in healthy])) < 0.05


def test_agent_dropout_skips_training_and_exchange(tmp_path):
    res = run(cfg_for(tmp_path, agents=6, rounds=4, faults={"agent_dropout": 0.3}), task=digits_task(), write=False)
    absent = [m for m in res.metrics if m["absent"]]
    assert absent and all(m["train_loss"] is None and m["bytes_sent"] == 0 and m["neighbors"] == 0 for m in absent)
    assert any(not m["absent"] for m in res.metrics)


def test_fedavg_averages_only_the_present_agents_weighted_by_their_data(tmp_path, monkeypatch):
    """After a round with absent agents, every present agent holds sum_j n_j X_j / sum_j n_j over the PRESENT agents'
    post-training factors (n_j: data sizes), and every absent agent keeps its own."""
    cfg = load_config(cfg_for(tmp_path, agents=6, rounds=3, algorithm="fedavg", faults={"agent_dropout": 0.3}))
    engine = make_engine(cfg, task=digits_task(), write=False, progress=False)
    before = {}
    exchange = engine.exchange

    def snapshot(t, plan, spec):
        before["A"] = [A.clone().double() for A in engine.states.A]
        return exchange(t, plan, spec)

    monkeypatch.setattr(engine, "exchange", snapshot)
    sizes = np.array([len(x) for x in engine.split.train], dtype=float)
    assert len(set(sizes)) > 1  # unequal data sizes, so the weighting matters
    checked = 0
    for t in range(cfg.rounds):
        engine.run_round(t)
        absent = engine.network.absent(t)
        present = ~absent
        if not absent.any() or present.sum() < 2:
            continue
        w = sizes * present / (sizes * present).sum()
        for l, A0 in enumerate(before["A"]):
            expected = torch.einsum("j,jrk->rk", torch.from_numpy(w), A0)
            for a in range(6):
                want = A0[a] if absent[a] else expected
                torch.testing.assert_close(engine.states.A[l][a].double(), want, atol=1e-6, rtol=1e-6)
        checked += 1
    assert checked  # some round had absent and present agents
