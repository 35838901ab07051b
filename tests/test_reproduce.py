"""The reproduction study's own code: the plan covers the grid, the shadow diagnostic and the synthetic problem agree
with dense float64 references, and the report is computed from records (here, fabricated tiny ones)."""

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
