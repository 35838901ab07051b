"""The reproduction study's own code: the plan covers the grid, every registered peer method and the heterogeneous
ranks, finished runs are not run again, the shadow diagnostic and the synthetic problem agree with dense float64
references, and the report is computed from records (here, fabricated tiny ones), partial ones included."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "reproduce"))

import study  # noqa: E402
import synthetic  # noqa: E402
from conftest import TinyMLP  # noqa: E402
from shadow import ShadowConsensus, fro_of_product, with_relative_gap  # noqa: E402

from decaf_lora.config import load_config  # noqa: E402
from decaf_lora.tasks import ModuleTask  # noqa: E402


def test_the_plan_covers_every_cell_once_and_puts_seed_0_first():
    runs = study.planned_runs()
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    grid = [r for r in runs if r.group == "grid"]
    assert len(grid) == len(study.SEEDS) * len(study.PARTITIONS) * (
        len(study.TOPOLOGIES) * len(study.GOSSIP) + len(study.NO_GRAPH)
    )
    first_seed_1 = next(i for i, r in enumerate(runs) if r.info.get("seed") == 1)
    assert all(r.info.get("seed") == 0 for r in runs[:first_seed_1])
    for r in runs:  # every planned config is valid
        load_config(None, [*r.overrides, "out_dir=/nonexistent"])


def test_fro_of_product_equals_the_dense_norm(gen):
    X = torch.randn(3, 20, 6, generator=gen, dtype=torch.float64)
    Y = torch.randn(3, 6, 15, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fro_of_product(X, Y), torch.linalg.matrix_norm(X @ Y), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("algo", ["decaf", "dlora"])
def test_shadow_logs_the_dense_difference_between_decaf_and_dlora_on_the_same_factors(gen, tmp_path, algo):
    x, y = torch.randn(120, 64, generator=gen), torch.randint(0, 10, (120,), generator=gen).numpy()
    task = ModuleTask(TinyMLP, x[40:], y[40:], x[:40], y[:40], targets=["fc1", "fc2"])
    cfg = load_config(
        {
            "agents": 4,
            "rounds": 1,
            "algorithm": algo,
            "lora": {"rank": 2},
            "out_dir": str(tmp_path),
            "partition": {"scheme": "iid", "local_eval": 0},
        }
    )
    from decaf_lora import algorithms
    from decaf_lora.engine import make_engine

    sim = make_engine(cfg, task, algorithm=ShadowConsensus(algorithms.get(algo)), progress=False, write=False)
    st = sim.states
    for A, B in zip(st.A, st.B):  # agents with different factors, as after local training
        A.copy_(torch.randn(A.shape, generator=gen))
        B.copy_(torch.randn(B.shape, generator=gen))
    before = [(A.double().clone(), B.double().clone()) for A, B in zip(st.A, st.B)]
    plan = sim.algorithm.plan(0, sim.network)
    from decaf_lora.payload import PayloadSpec

    spec = PayloadSpec.of(st, sim.algorithm.sends(0))
    diag = sim.mix_own(0, plan.W, sim.exchange(0, plan, spec).received, spec)
    Wt = torch.from_numpy(plan.W)
    gap2 = torch.zeros(4, dtype=torch.float64)
    norm2 = torch.zeros(4, dtype=torch.float64)
    for layer, (A, B) in zip(st.layers, before):
        U, S, Vh = torch.linalg.svd(torch.einsum("ij,jdk->idk", Wt, B @ A))  # DeCAF: best rank-2 of the mixed product
        decaf = (U[..., :2] * S[..., None, :2]) @ Vh[..., :2, :]
        dlora = torch.einsum("ij,jdr->idr", Wt, B) @ torch.einsum("ij,jrk->irk", Wt, A)
        gap2 += (layer.scale * torch.linalg.matrix_norm(decaf - dlora)) ** 2
        norm2 += (layer.scale * torch.linalg.matrix_norm(decaf)) ** 2
    assert np.allclose([diag["shadow_dlora_gap"][a] for a in range(4)], gap2.sqrt().numpy(), rtol=1e-6)
    assert all(v > 0 for v in diag["shadow_dlora_interference"].values())
    rows = with_relative_gap(
        [
            {"shadow_dlora_gap": diag["shadow_dlora_gap"][a], "shadow_decaf_norm": diag["shadow_decaf_norm"][a]}
            for a in range(4)
        ]
    )
    assert np.allclose([r["shadow_dlora_gap_relative"] for r in rows], (gap2.sqrt() / norm2.sqrt()).numpy(), rtol=1e-6)


def test_synthetic_gradient_is_the_autograd_gradient_of_the_mean_loss(gen):
    shift = synthetic.problem(0)["shift"]
    A = torch.randn(
        synthetic.AGENTS, synthetic.RANK, synthetic.K, generator=gen, dtype=torch.float64, requires_grad=True
    )
    B = torch.randn(
        synthetic.AGENTS, synthetic.D, synthetic.RANK, generator=gen, dtype=torch.float64, requires_grad=True
    )
    # F(A_i, B_i) = mean_j ||B_i A_i - D_j||_F^2 / 2 for each agent i's own factors
    F = sum(((B[i] @ A[i] - shift) ** 2).sum() / 2 / synthetic.AGENTS for i in range(synthetic.AGENTS))
    gA, gB = torch.autograd.grad(F, (A, B))
    ref = (gA**2).sum((-2, -1)) + (gB**2).sum((-2, -1))
    torch.testing.assert_close(synthetic.global_gradient_sq(A.detach(), B.detach(), shift), ref, atol=1e-9, rtol=1e-9)
    assert np.isfinite(synthetic.run("decaf", 30, 0))


def record(key, group, algo, acc, **info):
    rounds = [1, 2]
    ratio = {"mean": 0.01, "max": 0.02} if algo == "decaf" else None
    series = {
        k: [ratio, ratio]
        for k in (
            "tsvd_tail",
            "tsvd_tail_bound",
            "tsvd_tail_ratio",
            "factor_norm_c",
            "shadow_dlora_gap",
            "shadow_dlora_gap_relative",
            "shadow_dlora_interference",
            "shadow_decaf_truncation",
        )
    }
    series["consensus_distance"] = [{"mean": 1.0, "max": 1.0}, {"mean": 0.5, "max": 0.5}]
    series["train_loss"] = [{"mean": 1.0, "max": 1.0}] * 2
    return {
        "key": key,
        "group": group,
        "algorithm": algo,
        "final_accuracy": acc,
        "final_f1": acc,
        "majority_rate": 0.45,
        "spectral_gap": 0.2,
        "wall_seconds": 1.0,
        "bytes_sent_per_agent": 1.0,
        "rounds": rounds,
        "per_round": series,
        **info,
    }


def test_report_computes_gaps_and_verdicts_from_the_records(tmp_path, monkeypatch):
    import report

    runs = [
        record("a", "grid", "decaf", [0.6, 0.7], topology="ring", partition="iid", seed=0),
        record("b", "grid", "dlora", [0.5, 0.5], topology="ring", partition="iid", seed=0),
        record("c", "grid", "local", [0.4, 0.4], topology="any", partition="iid", seed=0),
    ]
    monkeypatch.setattr(report, "DOC", str(tmp_path / "reproduction.md"))
    monkeypatch.setattr(report, "FIG_DIR", str(tmp_path / "figures"))
    text = report.write(runs, None)
    assert "| iid | ring | +0.150 ± 0.000 | 1/1 |" in text  # decaf 0.65 vs dlora 0.5
    assert "| iid | ring | +0.250 ± 0.000 | 1/1 |" in text  # decaf vs local, which runs once for every topology
    assert "| iid | complete | not run | |" in text
    assert "largest measured tail / bound ratio is **2.00e-02**; the bound holds every round" in text
    assert (tmp_path / "figures" / "accuracy.png").exists()
    json.dumps(runs)  # records are plain JSON


# ---------------------------------------------------------------------------------------------- peer methods
def test_the_plan_runs_every_registered_method_on_ring_and_complete_under_every_partition_and_seed():
    from decaf_lora import algorithms

    runs = study.planned_runs()
    new = set(algorithms.available()) - set(study.GOSSIP) - set(study.NO_GRAPH)
    assert new and set(study.peer_methods()) == new
    peers = {
        (r.info["topology"], r.info["partition"], r.info["algorithm"], r.info["seed"]): r
        for r in runs
        if r.group == "peers"
    }
    expected = {(t, p, a, s) for t in ("ring", "complete") for p in study.PARTITIONS for a in new for s in study.SEEDS}
    assert set(peers) == expected and len([r for r in runs if r.group == "peers"]) == len(expected)
    for (t, p, a, s), r in peers.items():
        assert r.key == f"peers/{t}/{p}/{a}/s{s}"
        # the same budget, split and seed as the grid's run of that cell: only the algorithm differs
        grid = next(g for g in runs if g.key == f"grid/{t}/{p}/dlora/s{s}")
        assert [o for o in r.overrides if not o.startswith("algorithm=")] == [
            o for o in grid.overrides if not o.startswith("algorithm=")
        ]
    # the grid's keys are those of the committed records, unchanged
    grid_keys = {r.key for r in runs if r.group == "grid"}
    assert "grid/ring/iid/decaf/s0" in grid_keys and "grid/any/dirichlet-0.1/fedavg/s2" in grid_keys


def test_a_method_registered_later_joins_the_plan_by_itself():
    from decaf_lora.algorithms import DLoRA
    from decaf_lora.registry import ALGORITHMS

    ALGORITHMS.register(DLoRA, name="zz-study-probe")
    try:
        keys = {r.key for r in study.planned_runs()}
        assert {f"peers/{t}/iid/zz-study-probe/s0" for t in ("ring", "complete")} <= keys
    finally:
        ALGORITHMS.unregister("zz-study-probe")


def test_the_heterogeneous_rank_runs_give_agents_ranks_2_4_8_with_the_grids_scale():
    het = [r for r in study.planned_runs() if r.group == "hetrank"]
    cells = {(r.info["topology"], r.info["partition"], r.info["algorithm"], r.info["seed"]) for r in het}
    assert (
        len(het)
        == len(cells)
        == len(study.HET_METHODS) * len(study.HET_TOPOLOGIES) * len(study.HET_PARTITIONS) * len(study.SEEDS)
    )
    assert {"decaf", "flexlora", "hetlora", "fedhl"} == set(study.HET_METHODS)
    for r in het:
        cfg = load_config(None, [*r.overrides, "out_dir=/nonexistent"])
        assert cfg.agent_ranks() == r.info["agent_ranks"] == [2, 4, 8, 2, 4, 8, 2, 4]
        assert cfg.lora.alpha / cfg.lora.rank == float(study.budget_value("lora.alpha")) / int(
            study.budget_value("lora.rank")
        )
        assert r.key == f"hetrank/{r.info['topology']}/{r.info['partition']}/{r.info['algorithm']}/s{r.info['seed']}"


def test_recorded_runs_are_not_run_again_unless_their_overrides_changed_or_redo():
    runs = study.planned_runs()
    legacy = runs[0]  # a record of the first study: no overrides stored, taken as it is
    fresh, changed = runs[1], runs[2]
    records = {
        legacy.key: {"key": legacy.key},
        fresh.key: {"key": fresh.key, "overrides": list(fresh.overrides)},
        changed.key: {"key": changed.key, "overrides": [*changed.overrides, "rounds=99"]},
    }
    todo = study.runs_to_do(runs, records)
    assert legacy not in todo and fresh not in todo and changed in todo
    assert [r.key for r in todo] == [r.key for r in runs if r not in (legacy, fresh)]  # plan order kept
    assert study.runs_to_do(runs, records, redo=True) == runs


def test_two_studies_at_once_keep_each_others_records(tmp_path):
    """Each finished run is added to the file as it is then (under a lock), not written from one process's memory:
    a study started with --only hetrank beside another with --only peers never drops the other's runs."""
    path = str(tmp_path / "runs.jsonl")
    study.write_results([{"key": "grid/old", "v": 0}], path)
    seen_by_a = study.load_records(path)  # both processes start from the same file
    study.add_record({"key": "peers/a", "v": 1}, path)
    assert "peers/a" not in seen_by_a
    study.add_record({"key": "hetrank/b", "v": 2}, path)
    study.add_record({"key": "peers/a", "v": 3}, path)  # a redone run replaces its own record only
    assert study.load_records(path) == {
        "grid/old": {"key": "grid/old", "v": 0},
        "hetrank/b": {"key": "hetrank/b", "v": 2},
        "peers/a": {"key": "peers/a", "v": 3},
    }


def test_list_prints_the_plan_with_counts_by_group(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "runs.jsonl"))
    assert study.main(["--list", "--only", "peers/ring/iid/"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("peers/ring/iid/") and out[-1].startswith(
        f"{len(study.peer_methods()) * len(study.SEEDS)} runs (peers:"
    )


def test_a_record_keeps_every_statistic_the_method_declares_and_the_final_ranks(tmp_path):
    run = study.Run("peers/ring/iid/zz/s0", ["algorithm=adf-lora"], "peers", {"algorithm": "adf-lora", "seed": 0})
    rows = [
        {
            "round": t,
            "agent": a,
            "rank": 4 - a,
            "train_loss": 1.0 / t,
            "consensus_distance": 0.5,
            "cross_term_error": 0.1 * (a + 1),
            "eval_accuracy": 0.5 + a / 10,
            "eval_f1": 0.4,
        }
        for t in (1, 2)
        for a in (1, 0)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(
        json.dumps({"majority_rate": 0.4, "spectral_gap": 0.2, "wall_seconds": 3.0, "bytes_sent_per_agent": 10.0})
    )
    rec = study.record(run, str(tmp_path), ["cross_term_error"])
    assert rec["per_round"]["cross_term_error"] == [{"mean": pytest.approx(0.15), "max": pytest.approx(0.2)}] * 2
    assert rec["per_round"]["tsvd_tail"] == [None, None]  # the fixed diagnostics stay, empty where not logged
    assert rec["final_accuracy"] == [0.5, 0.6] and rec["final_rank"] == [4, 3]  # sorted by agent
    assert rec["stats"] == ["cross_term_error"] and rec["overrides"] == ["algorithm=adf-lora"]


def peer_record(group, algo, topo, part, seed, acc, label=None, **series):
    r = record(
        f"{group}/{topo}/{part}/{label or algo}/s{seed}", group, algo, acc, topology=topo, partition=part, seed=seed
    )
    for k, v in series.items():
        r["per_round"][k] = [{"mean": v, "max": v}] * len(r["rounds"])
    r["stats"] = list(series)
    if label:
        r["label"] = label
    return r


def test_report_peer_sections_compute_claims_het_ranks_and_which_method_when(tmp_path, monkeypatch):
    import report

    runs = []
    for s in (0, 1, 2):  # dlora 0.5 everywhere; adf-lora below it by 0.1, 0.12, 0.08 on the ring + iid
        for t in ("ring", "complete"):
            runs.append(
                record(f"grid/{t}/iid/dlora/s{s}", "grid", "dlora", [0.5, 0.5], topology=t, partition="iid", seed=s)
            )
        runs.append(
            peer_record(
                "peers",
                "adf-lora",
                "ring",
                "iid",
                s,
                [0.4 - 0.02 * (s == 1) + 0.02 * (s == 2)] * 2,
                cross_term_error=0.01,
            )
        )
        # TAD chose T = 5 (ADF-LoRA's T) on the ring: identical to ADF there; +0.05 over ADF on the complete graph
        runs.append(
            peer_record(
                "peers", "tad-lora", "ring", "iid", s, runs[-1]["final_accuracy"], phase_length=5.0, mixing_rate=0.648
            )
        )
        runs.append(peer_record("peers", "adf-lora", "complete", "iid", s, [0.45, 0.45]))
        runs.append(
            peer_record("peers", "tad-lora", "complete", "iid", s, [0.5, 0.5], phase_length=3.0, mixing_rate=0.0)
        )
        # heterogeneous ranks: 8 agents, ranks 2,4,8,2,4,8,2,4; the rank-8 agents (2 and 5) are 0.2 better
        het = [0.5, 0.6, 0.7, 0.5, 0.6, 0.7, 0.5, 0.6]
        for algo, shift in (("flexlora", 0.0), ("fedhl", 0.01 * (s - 1))):
            r = record(
                f"hetrank/ring/iid/{algo}/s{s}",
                "hetrank",
                algo,
                [a + shift for a in het],
                topology="ring",
                partition="iid",
                seed=s,
                agent_ranks=[2, 4, 8, 2, 4, 8, 2, 4],
            )
            runs.append(r)
    monkeypatch.setattr(report, "DOC", str(tmp_path / "reproduction.md"))
    monkeypatch.setattr(report, "FIG_DIR", str(tmp_path / "figures"))
    text = report.write(runs, None)
    # (a) side by side, std over seeds; a missing cell says so
    assert "| adf-lora | 0.400 ± 0.016 | 0.450 ± 0.000 |" in text
    assert "| dimat | not run yet | not run yet |" in text
    assert (tmp_path / "figures" / "methods.png").exists()
    # (b) ADF-LoRA vs DLoRA: paired gaps -0.10, -0.12, -0.08 on ring + iid, -0.05 x 3 on complete + iid
    assert "| ring | iid | -0.100 ± 0.016 | 0/3 |" in text
    assert (
        "**ADF-LoRA beats DLoRA: reversed.** Over 6 (setting, seed) pairs the mean paired gap adf-lora - dlora is "
        "-0.075" in text
    )
    assert "adf-lora freezes the classification head and dlora trains it" in text
    assert "switches factor every 5 rounds: in this budget's 2 rounds it trains B in 2 and A in 0" in text
    # TAD: gain 0 on the ring, +0.05 on the complete graph: the sparse-graph claim is reversed, T = ADF's T there
    assert "**TAD-LoRA's gain over ADF-LoRA is larger on the ring than on the complete graph: reversed.**" in text
    assert (
        "chose T = 5, ADF-LoRA's own T" in text
        and "| iid | 0.000 ± 0.000 | 0.050 ± 0.000 | -0.050 ± 0.000 | 5 / 3 |" in text
    )
    # (c) heterogeneous ranks: rank groups by agent, rank 8 - rank 2 paired over seeds
    assert (
        "| ring | iid | flexlora | 0.587 ± 0.000 | 0.500 ± 0.000 | 0.600 ± 0.000 | 0.700 ± 0.000 | "
        "+0.200 (3/3 seeds >= 0) |" in text
    )
    assert "| ring | iid | decaf | not run yet |" in text
    assert (
        "**FedHL (our reading) beats FlexLoRA: does not show at this budget.** Over 3 (setting, seed) pairs the mean "
        "paired gap "
        "fedhl - flexlora is +0.000" in text
    )
    # (d) which method when: dlora best on ring + iid, adf-lora and tad-lora clearly below it
    assert "- **ring + iid**: best dlora (0.500; " in text
    assert "every other method tested is below it by more than the seed noise" in text


def test_report_peer_sections_survive_a_study_with_no_new_runs_yet(tmp_path, monkeypatch):
    import report

    monkeypatch.setattr(report, "DOC", str(tmp_path / "reproduction.md"))
    monkeypatch.setattr(report, "FIG_DIR", str(tmp_path / "figures"))
    one = [peer_record("peers", "fedex-lora", "complete", "round-robin", 0, [0.4, 0.4], fedex_residual_norm=0.1)]
    for runs in ([], one):
        text = report.write(runs, None)
        assert "## Every method side by side" in text and "## Which method when" in text
        assert "**FedRot-LoRA beats DLoRA: not run yet.**" in text
        assert "0 of 48 runs finished" in text
    assert "**FedEx-LoRA beats DLoRA: not run yet.**" in text  # one fedex run, no dlora to pair it with
    assert "- **complete + round-robin**: best fedex-lora (0.400; " in text
