"""The heterogeneous-rank peers (flexlora, hetlora, fedhl) against dense float64 references of their rules.

Agents have ranks (2, 4, 8, 4), stored zero-padded to 8, as the engine stores them: agent i owns the first r_i
columns of B and rows of A.
"""

import math

import numpy as np
import pytest
import torch
from conftest import TinyMLP

import decaf_lora
from decaf_lora import algorithms
from decaf_lora.algorithms import LayerContext, LayerInfo, RunFacts
from decaf_lora.algorithms.fedhl import drift_weights
from decaf_lora.config import load_config
from decaf_lora.engine import make_engine, resume, run
from decaf_lora.errors import DecafError
from decaf_lora.tasks import ModuleTask
from decaf_lora.topology import Topology

RANKS = torch.tensor([2, 4, 8, 4])
D, R, K = 12, 8, 10


def padded_layer(gen, ranks=RANKS, d=D, r=R, k=K):
    """Random factors, zero beyond each agent's rank."""
    n = len(ranks)
    A = torch.randn(n, r, k, generator=gen, dtype=torch.float64)
    B = torch.randn(n, d, r, generator=gen, dtype=torch.float64)
    keep = torch.arange(r)[None, :] < ranks[:, None]
    return A * keep[:, :, None], B * keep[:, None, :]


def digits_task():
    """The tiny digits MLP of the engine tests (LoRA on fc1 and fc2)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return ModuleTask(lambda: TinyMLP(32), x[300:], d.target[300:], x[:300], d.target[:300], targets=["fc1", "fc2"])


def ring(n=4):
    return torch.from_numpy(Topology.build("ring", n).matrix)


def best_rank(M, rank):
    U, S, Vh = torch.linalg.svd(M)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank], S


def products(A, B):
    return B @ A  # (n, d, k): dense, for references only


# ----------------------------------------------------------------------------------------------------- flexlora
def test_flexlora_is_decaf_with_all_singular_values_in_b_and_the_same_ranks(gen):
    A, B = padded_layer(gen)
    for ranks in (RANKS, None):
        flex = algorithms.get("flexlora").mix(A, B, ring(), ranks=ranks)
        decaf = algorithms.get("decaf", split="all-into-b", gauge="none").mix(A, B, ring(), ranks=ranks)
        assert torch.equal(flex.A, decaf.A) and torch.equal(flex.B, decaf.B)
        assert all(torch.equal(flex.stats[k], v) for k, v in decaf.stats.items())


def test_flexlora_keeps_each_agents_top_singular_triplets_of_the_mixed_product(gen):
    A, B = padded_layer(gen)
    out = algorithms.get("flexlora").mix(A, B, ring(), ranks=RANKS)
    M = torch.einsum("ij,jdk->idk", ring(), products(A, B))
    for i, r in enumerate(RANKS.tolist()):
        best, S = best_rank(M[i], r)
        torch.testing.assert_close(out.B[i] @ out.A[i], best, atol=1e-10, rtol=0)
        torch.testing.assert_close(out.B[i].norm(dim=0)[:r], S[:r], atol=1e-10, rtol=0)  # all of S is in B


def test_flexlora_fixes_the_options_it_presets():
    with pytest.raises(DecafError, match=r"split='balanced' is not known; choose one of: all-into-b"):
        algorithms.get("flexlora", split="balanced")
    with pytest.raises(DecafError, match=r"gauge='procrustes' is not known; choose one of: none"):
        algorithms.get("flexlora", gauge="procrustes")


def test_flexlora_reports_the_energy_beyond_the_smallest_rank_of_each_neighbourhood(gen):
    """Rank collapse (peers.md §7.5): the kept singular-value energy in slots the lowest-rank neighbour lacks."""
    A, B = padded_layer(gen)
    W = ring()
    out = algorithms.get("flexlora").mix(A, B, W, ranks=RANKS)
    M = torch.einsum("ij,jdk->idk", W, products(A, B))
    for i, r in enumerate(RANKS.tolist()):
        r_min = min(RANKS[j].item() for j in range(4) if W[i, j] > 0)
        S2 = torch.linalg.svdvals(M[i]).pow(2)
        beyond = S2[r_min:r].sum()
        torch.testing.assert_close(out.stats["beyond_min_rank_norm"][i], beyond.sqrt(), atol=1e-10, rtol=0)
        torch.testing.assert_close(out.stats["beyond_min_rank_energy"][i], beyond / S2[:r].sum(), atol=1e-12, rtol=0)
    assert out.stats["beyond_min_rank_energy"][0] == 0  # agent 0 has the smallest rank: nothing lies beyond it
    equal = algorithms.get("flexlora").mix(*padded_layer(gen, torch.tensor([8, 8, 8, 8])), W)
    assert (equal.stats["beyond_min_rank_energy"] == 0).all()


# ----------------------------------------------------------------------------------------------------- all three
METHODS = [
    ("flexlora", {}),
    ("hetlora", {}),
    ("hetlora", {"weights": "pi"}),
    ("hetlora", {"prune": True}),
    ("fedhl", {}),
]


@pytest.mark.parametrize("name, options", METHODS, ids=["flexlora", "hetlora", "hetlora-pi", "hetlora-prune", "fedhl"])
def test_every_method_keeps_each_agents_factors_zero_beyond_its_rank(gen, name, options):
    A, B = padded_layer(gen)
    out = algorithms.get(name, **options).mix(A, B, ring(), ranks=RANKS)
    for i, r in enumerate(RANKS.tolist()):
        assert (out.B[i][:, r:] == 0).all() and (out.A[i][r:] == 0).all()
        assert (out.B[i][:, :r] != 0).any(0).all() and (out.A[i][:r] != 0).any(1).all()  # its own slots stay alive


# ----------------------------------------------------------------------------------------------------- hetlora
def test_hetlora_weighs_neighbours_by_pi_times_product_norm_then_truncates_to_the_own_rank(gen):
    A, B = padded_layer(gen)
    W = ring()
    out = algorithms.get("hetlora").mix(A, B, W, ranks=RANKS)
    norms = torch.linalg.matrix_norm(products(A, B))  # dense reference: ||B_j A_j||_F
    w = W * norms[None, :]
    w = w / w.sum(1, keepdim=True)
    for i, r in enumerate(RANKS.tolist()):
        A_ref = torch.einsum("j,jrk->rk", w[i], A)[:r]
        B_ref = torch.einsum("j,jdr->dr", w[i], B)[:, :r]
        torch.testing.assert_close(out.A[i][:r], A_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.B[i][:, :r], B_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.stats["self_weight"], w.diagonal(), atol=1e-12, rtol=0)


def test_hetlora_with_pi_weights_is_dlora_truncated_to_each_rank(gen):
    A, B = padded_layer(gen)
    het = algorithms.get("hetlora", weights="pi").mix(A, B, ring(), ranks=RANKS)
    dlora = algorithms.get("dlora").mix(A, B, ring(), ranks=RANKS)
    torch.testing.assert_close(het.A, dlora.A, atol=1e-14, rtol=0)
    torch.testing.assert_close(het.B, dlora.B, atol=1e-14, rtol=0)


def test_hetlora_falls_back_to_pi_when_every_product_is_zero(gen):
    A, _ = padded_layer(gen)
    B = torch.zeros(4, D, R, dtype=torch.float64)  # LoRA's start: every product is 0, the weights would be 0/0
    out = algorithms.get("hetlora").mix(A, B, ring(), ranks=RANKS)
    ref = algorithms.get("dlora").mix(A, B, ring(), ranks=RANKS)
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    torch.testing.assert_close(out.A, ref.A, atol=1e-14, rtol=0)
    torch.testing.assert_close(out.stats["self_weight"], ring().diagonal(), atol=0, rtol=0)


def test_hetlora_gives_no_weight_to_a_neighbour_whose_product_is_zero(gen):
    A, B = padded_layer(gen)
    B[1] = 0  # agent 1 has not trained yet; its neighbours 0 and 2 ignore it, agent 1 itself follows them
    W = ring()
    out = algorithms.get("hetlora").mix(A, B, W, ranks=RANKS)
    norms = torch.linalg.matrix_norm(products(A, B))
    for i in (0, 1, 2):
        w = W[i] * norms / (W[i] * norms).sum()
        assert w[1] == 0
        torch.testing.assert_close(
            out.A[i][: RANKS[i]], torch.einsum("j,jrk->rk", w, A)[: RANKS[i]], atol=1e-12, rtol=0
        )
    assert out.stats["self_weight"][1] == 0


def prune_step(algo, A, B, state, scale=1.0, ranks=None):
    """One mix of each agent alone (identity rows, so the factors stay the agents' own), with the state passed along
    as the engine does."""
    n = A.shape[0]
    ctx = LayerContext(scale=scale, agents=torch.arange(n), inputs=torch.arange(n), state=state)
    return algo.mix(A, B, torch.eye(n, dtype=torch.float64), ranks=ranks, context=ctx)


def test_hetlora_prunes_only_when_the_tail_norm_fell_and_never_below_rank_1(gen):
    ranks = torch.tensor([8, 8, 1, 2])
    algo = algorithms.get("hetlora", prune=True, gamma=0.75)
    algo.setup(RunFacts(4, None, tuple(ranks.tolist()), (LayerInfo(0, "l", D, K, R, 0.5),), 0))
    state = algo.init_state(LayerInfo(0, "l", D, K, R, 0.5), 4)
    assert state["rank"].tolist() == ranks.tolist() and (state["tail"] == -1).all()
    A, B = padded_layer(gen, ranks)

    first = prune_step(algo, A, B, state, scale=0.5, ranks=ranks)  # no previous tail: only records it
    assert first.ranks.tolist() == ranks.tolist()
    for i, (r, cut) in enumerate(zip(ranks.tolist(), [6, 6, 1, 1])):  # cut = max(1, floor(0.75 r))
        tau = torch.linalg.matrix_norm(0.5 * B[i][:, cut:r] @ A[i][cut:r])
        torch.testing.assert_close(first.state["tail"][i], tau, atol=1e-12, rtol=0)
    torch.testing.assert_close(first.stats["tail_norm"], first.state["tail"], atol=0, rtol=0)

    B2 = B.clone()
    B2[0][:, 6:] *= 0.5  # agent 0's tail fell: prune 8 -> 6
    B2[1][:, 6:] *= 2.0  # agent 1's tail grew: keep 8
    B2[3][:, 1:] *= 0.5  # agent 3's tail fell: 2 -> 1; agent 2 is at rank 1 and cannot go lower
    second = prune_step(algo, A, B2, first.state, scale=0.5, ranks=first.ranks)
    assert second.ranks.tolist() == [6, 8, 1, 1]
    assert second.stats["rank_after_prune"].tolist() == [6, 8, 1, 1]  # one layer here
    assert (second.B[0][:, 6:] == 0).all() and (second.A[0][6:] == 0).all()
    torch.testing.assert_close(second.B[0][:, :6] @ second.A[0][:6], B2[0][:, :6] @ A[0][:6], atol=1e-12, rtol=0)
    # after a prune the reference is the tail of the new rank (slots 4..5 of rank 6), measured on the pruned factors
    torch.testing.assert_close(
        second.state["tail"][0], torch.linalg.matrix_norm(0.5 * B2[0][:, 4:6] @ A[0][4:6]), atol=1e-12, rtol=0
    )
    assert second.state["rank"].tolist() == [6, 8, 1, 1]


def test_hetlora_reads_a_pruned_rank_from_its_state_when_the_engine_passes_no_ranks(gen):
    """A run whose agents start at equal ranks gets ``ranks=None``; the rank a prune set lives in the state."""
    algo = algorithms.get("hetlora", prune=True)
    state = algo.init_state(LayerInfo(0, "l", D, K, R, 1.0), 4)
    state["rank"] = torch.tensor([3, 8, 8, 8])
    A, B = padded_layer(gen, torch.tensor([3, 8, 8, 8]))
    out = prune_step(algo, A, B, state)
    assert out.ranks.tolist() == [3, 8, 8, 8] and (out.B[0][:, 3:] == 0).all()


def test_hetlora_pruning_state_survives_a_crash_and_resume(tmp_path, monkeypatch):
    """The per-agent reference tail norms are checkpointed: a run killed before its last round prunes there exactly
    as an uninterrupted run does (a lost reference, -1, would skip the prune)."""
    cfg = {
        "agents": 4,
        "rounds": 5,
        "local_steps": 2,
        "eval_every": 5,
        "optim": {"lr": 3e-2},
        "lora": {"rank": 4},
        "algorithm": "hetlora",
        "algorithm_options": {"prune": True, "gamma": 0.5},
        "out_dir": str(tmp_path),
    }
    full = run(cfg, task=digits_task(), write=False).metrics
    total = 4 * 2  # rank 4 in each of the two adapted layers
    assert all(m["rank_after_prune"] == total for m in full if m["round"] < 5)
    assert any(m["rank_after_prune"] < total for m in full if m["round"] == 5)  # the last round prunes
    sim = make_engine(load_config(cfg), task=digits_task(), progress=False)
    real = sim.training.train

    def crash(agent, round_):
        if round_ == 4:
            raise KeyboardInterrupt
        return real(agent, round_)

    monkeypatch.setattr(sim.training, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    resumed = resume(sim.run_dir, task=digits_task()).metrics
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in resumed]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in full]


# ----------------------------------------------------------------------------------------------------- fedhl
def reference_fedhl_weights(A, B, W, beta):
    """Dense float64: delta_ij = ||P_j - sum_l pi_il P_l||^2, w_ij = pi_ij exp(-beta delta_ij / dbar_i) / Z_i."""
    P = products(A, B)
    Mbar = torch.einsum("ij,jdk->idk", W, P)
    delta = (P[None] - Mbar[:, None]).pow(2).sum((-2, -1))  # (n, n)
    dbar = (W * delta).sum(1, keepdim=True)
    w = W * torch.exp(-beta * delta / dbar)
    return w / w.sum(1, keepdim=True), delta


def test_fedhl_weights_are_the_gibbs_weights_of_the_product_drift(gen):
    A, B = padded_layer(gen)
    W = ring()
    for beta in (0.5, 3.0):
        ref, _ = reference_fedhl_weights(A, B, W, beta)
        dw = drift_weights(A, B, W, torch.arange(4), beta)
        torch.testing.assert_close(dw.W, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(dw.W.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-14, rtol=0)
        assert torch.equal(dw.W > 0, W > 0)  # the same neighbours, no weight outside the graph


def test_fedhl_truncates_the_full_rank_reweighted_product_to_each_agents_rank(gen):
    A, B = padded_layer(gen)
    W = ring()
    out = algorithms.get("fedhl", beta=2.0).mix(A, B, W, ranks=RANKS)
    w, _ = reference_fedhl_weights(A, B, W, 2.0)
    M = torch.einsum("ij,jdk->idk", w, products(A, B))
    for i, r in enumerate(RANKS.tolist()):
        torch.testing.assert_close(out.B[i] @ out.A[i], best_rank(M[i], r)[0], atol=1e-10, rtol=0)


def test_fedhl_weights_minimise_the_stated_objective_and_lower_the_drift(gen):
    """J(w) = sum_j w_j delta_j / dbar + KL(w || pi) / beta is minimal at the returned row, over the simplex."""
    A, B = padded_layer(gen)
    W, beta = ring(), 1.5
    w, delta = reference_fedhl_weights(A, B, W, beta)
    out = algorithms.get("fedhl", beta=beta).mix(A, B, W, ranks=RANKS)
    torch.testing.assert_close(out.stats["drift"], (w * delta).sum(1), atol=1e-9, rtol=0)
    assert (out.stats["drift_ratio"] < 1).all()  # unequal drifts: reweighting lowers the weighted drift
    rng = np.random.default_rng(0)
    for i in range(4):
        nb = (W[i] > 0).nonzero().squeeze(1)
        pi, d = W[i, nb], delta[i, nb]

        def J(x, pi=pi, d=d):
            return float((x * d).sum() / (pi * d).sum() + (x * torch.log(x / pi)).sum() / beta)

        best = J(w[i, nb])
        for _ in range(200):
            x = torch.from_numpy(rng.dirichlet(np.ones(len(nb))))
            assert J(x) >= best - 1e-12


def test_fedhl_is_flexlora_when_its_weights_equal_pi(gen):
    """beta = 0, and products that all coincide (B = 0 before training), give pi and so exactly FlexLoRA."""
    A, B = padded_layer(gen)
    for beta, B_in in ((0.0, B), (1.0, torch.zeros_like(B))):
        fedhl = algorithms.get("fedhl", beta=beta).mix(A, B_in, ring(), ranks=RANKS)
        flex = algorithms.get("flexlora").mix(A, B_in, ring(), ranks=RANKS)
        assert torch.equal(fedhl.A, flex.A) and torch.equal(fedhl.B, flex.B)
        assert (fedhl.stats["weight_shift"] == 0).all() and (fedhl.stats["drift_ratio"] == 1).all()


def test_fedhl_gives_pi_when_every_neighbour_drifts_equally(gen):
    """Two agents on a symmetric row: their drifts from the midpoint are equal, so nothing moves away from pi."""
    A, B = padded_layer(gen, torch.tensor([8, 8]))
    W = torch.full((2, 2), 0.5, dtype=torch.float64)
    dw = drift_weights(A, B, W, torch.arange(2), 5.0)
    torch.testing.assert_close(dw.W, W, atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["flexlora", "hetlora", "fedhl"])
def test_heterogeneous_ranks_train_end_to_end(name):
    cfg = {
        "agents": 4,
        "rounds": 3,
        "local_steps": 6,
        "eval_every": 3,
        "optim": {"lr": 1e-2},
        "algorithm": name,
        "lora": {"rank": 4, "ranks": [2, 4]},
    }
    m = decaf_lora.run(cfg, task=digits_task(), write=False).metrics
    assert [x["rank"] for x in m if x["round"] == 3] == [2, 4, 2, 4]
    first = np.mean([x["train_loss"] for x in m if x["round"] == 1])
    last = np.mean([x["train_loss"] for x in m if x["round"] == 3])
    assert last < first and all(math.isfinite(x["consensus_distance"]) for x in m)
