"""The alternating family (adf-lora, tad-lora, rolora): each rule against a dense float64 reference, the phase
schedule, TAD-LoRA's phase length from the mixing rate, RoLoRA's reduction to the server rule, bytes, and a short
run through the engine."""

import numpy as np
import pytest
import torch
from conftest import digits_task

from decaf_lora import algorithms
from decaf_lora.algorithms import LayerContext, LayerInfo, RunFacts
from decaf_lora.algorithms.adf_lora import cross_term_error
from decaf_lora.algorithms.base import prepare
from decaf_lora.algorithms.tad_lora import tad_phase_length
from decaf_lora.config import ConfigError, load_config
from decaf_lora.errors import DecafError
from decaf_lora.topology import Network, Topology

N, D, R, K = 8, 14, 3, 11
TOPOLOGIES = ["ring", "complete", "star", "bipartite"]


def layer(gen, n=N, d=D, r=R, k=K, common_a=False):
    A = torch.randn(n, r, k, generator=gen, dtype=torch.float64)
    if common_a:
        A = A[:1].expand(n, r, k).clone()
    return A, torch.randn(n, d, r, generator=gen, dtype=torch.float64)


def matrix(topology, n=N):
    return torch.from_numpy(Topology.build(topology, n).matrix)


def facts(n=N, topology="ring", schedule="static", p=0.0, seed=0):
    network = Network(Topology.build(topology, n).schedule(schedule, seed=seed, p=p), seed=seed)
    return RunFacts(n, network, None, (LayerInfo(0, "layer", D, K, R, 1.0),), seed)


def made(name, n=N, topology="ring", **options):
    algo = algorithms.get(name, **options)
    algo.setup(facts(n, topology))
    return algo


@pytest.fixture(params=["one-gram", "per-agent"])
def gram_path(request, monkeypatch):
    """The statistic's two ways to its Gram blocks: one Gram of all inputs (the default for these small cases), or
    per output agent, one at a time (what a tiny memory budget forces)."""
    if request.param == "per-agent":
        from decaf_lora.algorithms import adf_lora

        monkeypatch.setattr(adf_lora, "ERROR_CHUNK_ELEMENTS", 1)
    return request.param


def dense_error(W, A, B, A_new, B_new, scale=1.0):
    """``|s| ||sum_j W_ij B_j A_j - B_i' A_i'||_F`` with the d x k matrices formed."""
    M = torch.einsum("ij,jdk->idk", W, B @ A)
    return abs(scale) * torch.linalg.matrix_norm(M - B_new @ A_new)


# ---------------------------------------------------------------------------------------------- the rules, float64


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("name", ["adf-lora", "tad-lora"])
def test_adf_and_tad_mix_both_factors_and_report_the_cross_term_error(gen, name, topology, gram_path):
    A, B = layer(gen)
    W = matrix(topology)
    algo = made(name, topology=topology)
    for t in range(12):  # the mix does not depend on the phase: both factors, every round
        out = algo.mix(A, B, W, round_=t, context=LayerContext(scale=2.5))
        torch.testing.assert_close(out.A, torch.einsum("ij,jrk->irk", W, A), atol=1e-13, rtol=0)
        torch.testing.assert_close(out.B, torch.einsum("ij,jdr->idr", W, B), atol=1e-13, rtol=0)
        torch.testing.assert_close(
            out.stats["cross_term_error"], dense_error(W, A, B, out.A, out.B, 2.5), atol=1e-10, rtol=1e-10
        )
    assert (out.stats["cross_term_error"] > 0).all()


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_rolora_mixes_the_active_factor_and_keeps_its_own_frozen_one(gen, topology):
    A, B = layer(gen)
    W = matrix(topology)
    algo = made("rolora", topology=topology)
    for t in range(4):
        out = algo.mix(A, B, W, round_=t, context=LayerContext(scale=0.5))
        if t % 2 == 0:  # B-round
            torch.testing.assert_close(out.B, torch.einsum("ij,jdr->idr", W, B), atol=1e-13, rtol=0)
            assert torch.equal(out.A, A)
        else:
            torch.testing.assert_close(out.A, torch.einsum("ij,jrk->irk", W, A), atol=1e-13, rtol=0)
            assert torch.equal(out.B, B)
        # the agent's own frozen factor standing in for its neighbours' (d x k formed): zero by construction
        stand_in = B @ torch.einsum("ij,jrk->irk", W, A) if t % 2 else torch.einsum("ij,jdr->idr", W, B) @ A
        residual = torch.linalg.matrix_norm(stand_in - out.B @ out.A)
        assert (residual <= 1e-13 * torch.linalg.matrix_norm(out.B @ out.A)).all()
        assert torch.equal(out.stats["cross_term_error"], torch.zeros(N, dtype=torch.float64))


def test_rolora_never_reads_the_neighbours_frozen_factor(gen):
    """As the engine stacks them: own agents first, then received copies whose unsent factor is NaN."""
    A, B = layer(gen)
    W = matrix("ring")
    off = W - torch.diag(torch.diag(W))
    rows = torch.cat([torch.diag(torch.diag(W)), off], dim=1)
    algo = made("rolora")
    for t in range(4):
        A2, B2 = torch.cat([A, A]), torch.cat([B, B])
        if algo.phase(t) == "B":
            A2[N:] = float("nan")
        else:
            B2[N:] = float("nan")
        out = algo.mix(A2, B2, rows, round_=t, self_index=list(range(N)))
        ref = algo.mix(A, B, W, round_=t)
        assert all(torch.isfinite(x).all() for x in (out.A, out.B, out.stats["cross_term_error"]))
        torch.testing.assert_close(out.B @ out.A, ref.B @ ref.A, atol=1e-12, rtol=0)


def test_cross_term_error_on_rows_that_weigh_a_subset_of_the_inputs(gen, gram_path):
    """What a distributed rank computes: some output agents, rows over its own and received inputs."""
    A, B = layer(gen, n=6)
    W = torch.rand(3, 6, generator=gen, dtype=torch.float64) * (torch.rand(3, 6, generator=gen) < 0.6)
    W[torch.arange(3), torch.tensor([0, 2, 5])] += 0.1
    W = W / W.sum(1, keepdim=True)
    p = prepare(A, B, W, self_index=[0, 2, 5])
    A_new, B_new = W @ A.reshape(6, -1), W @ B.reshape(6, -1)
    ref = dense_error(W, A, B, A_new.reshape(3, R, K), B_new.reshape(3, D, R), 3.0)
    torch.testing.assert_close(cross_term_error(p, scale=-3.0), ref)


def test_cross_term_error_vanishes_while_the_neighbours_share_a(gen, gram_path):
    """The first B phase of a run from a common A: sum_j w_j B_j A = (sum_j w_j B_j) A, no cross terms."""
    A, B = layer(gen, common_a=True)
    out = made("adf-lora").mix(A, B, matrix("ring"))
    size = torch.linalg.matrix_norm(out.B @ out.A)
    # the floor of a norm summed in squares: about sqrt(float64 rounding) of the products' size
    assert (out.stats["cross_term_error"] <= 1e-7 * size).all()


def test_cross_term_error_is_the_same_in_chunks(gen, monkeypatch):
    from decaf_lora.algorithms import adf_lora

    A, B = layer(gen)
    W = matrix("complete")
    whole = made("adf-lora").mix(A, B, W).stats["cross_term_error"]
    monkeypatch.setattr(adf_lora, "ERROR_CHUNK_ELEMENTS", 1)  # one output agent at a time
    torch.testing.assert_close(made("adf-lora").mix(A, B, W).stats["cross_term_error"], whole, atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_term_error_is_accurate_when_neighbours_nearly_agree(gen, dtype, gram_path):
    """A tiny error is not lost to cancellation (it is built from deviations, not from the large products)."""
    A0, B0 = layer(gen, n=1)
    A, B = layer(gen)
    A, B = (A0 + 1e-4 * A).to(dtype), (B0 + 1e-4 * B).to(dtype)
    W = matrix("ring")
    out = made("adf-lora").mix(A, B, W)
    # the rule's exact error: the weights as the mix used them (its compute dtype, rows normalized), the inputs as
    # given, the mixed factors before they are rounded to the training dtype
    W_used = W.to(dtype).double()
    W_used = W_used / W_used.sum(1, keepdim=True)
    A64, B64 = A.double(), B.double()
    new_A, new_B = torch.einsum("ij,jrk->irk", W_used, A64), torch.einsum("ij,jdr->idr", W_used, B64)
    ref = dense_error(W_used, A64, B64, new_A, new_B)
    assert float(ref.max()) < 1e-6 * float(torch.linalg.matrix_norm(B0 @ A0).max())  # the error is tiny...
    torch.testing.assert_close(out.stats["cross_term_error"], ref, rtol=1e-6, atol=0)  # ...and still exact


def test_heterogeneous_ranks_are_masked_and_the_error_measures_the_masked_mix(gen, gram_path):
    A, B = layer(gen)
    ranks = torch.tensor([1, 2, 3, 3, 2, 1, 3, 2])
    keep = torch.arange(R)[None, :] < ranks[:, None]
    A, B = A * keep[:, :, None], B * keep[:, None, :]  # agents hold zero-padded factors
    W = matrix("ring")
    out = made("adf-lora").mix(A, B, W, ranks=ranks)
    torch.testing.assert_close(out.A, torch.einsum("ij,jrk->irk", W, A) * keep[:, :, None], atol=1e-13, rtol=0)
    torch.testing.assert_close(out.B, torch.einsum("ij,jdr->idr", W, B) * keep[:, None, :], atol=1e-13, rtol=0)
    torch.testing.assert_close(out.stats["cross_term_error"], dense_error(W, A, B, out.A, out.B))
    ro = made("rolora").mix(A, B, W, round_=0, ranks=ranks)
    torch.testing.assert_close(ro.B, torch.einsum("ij,jdr->idr", W, B) * keep[:, None, :], atol=1e-13, rtol=0)
    assert torch.equal(ro.A, A)


# ---------------------------------------------------------------------------------------------- the phase schedule


def test_adf_trains_b_for_t_rounds_then_a_and_always_sends_both():
    algo = made("adf-lora")
    assert algo.T == 5 and algo.phase_length == 5
    assert [algo.trainable(t) for t in range(20)] == [("B",)] * 5 + [("A",)] * 5 + [("B",)] * 5 + [("A",)] * 5
    assert all(algo.sends(t) == ("A", "B") for t in range(20))
    a_first = made("adf-lora", T=2, first_phase="A")
    assert [a_first.phase(t) for t in range(6)] == ["A", "A", "B", "B", "A", "A"]


def test_rolora_alternates_every_round_and_sends_what_it_trains():
    algo = made("rolora")
    assert [algo.phase(t) for t in range(6)] == ["B", "A", "B", "A", "B", "A"]
    assert all(algo.sends(t) == algo.trainable(t) == (algo.phase(t),) for t in range(12))


@pytest.mark.parametrize("name", ["adf-lora", "tad-lora", "rolora"])
def test_the_head_is_frozen_and_unsent_by_default_or_trained_and_sent_every_round(name):
    frozen, trained = made(name), made(name, head="trained")
    for t in range(12):
        assert "head" not in frozen.trainable(t) and "head" not in frozen.sends(t)
        assert "head" in trained.trainable(t) and "head" in trained.sends(t)
        assert frozen.trainable(t) + ("head",) == trained.trainable(t)
        # whatever trains is sent (adf/tad also send the frozen factor; rolora sends exactly what it trains)
        assert set(trained.trainable(t)) <= set(trained.sends(t))


def test_adf_with_t_1_differs_from_rolora_only_in_also_mixing_the_frozen_factor(gen):
    adf, ro = made("adf-lora", T=1), made("rolora")
    A, B = layer(gen)
    W = matrix("ring")
    for t in range(6):
        assert adf.trainable(t) == ro.trainable(t)
        assert set(adf.sends(t)) - set(ro.sends(t)) == {"A", "B"} - {ro.phase(t)}
        a, b = adf.mix(A, B, W, round_=t), ro.mix(A, B, W, round_=t)
        active, frozen = ("B", "A") if ro.phase(t) == "B" else ("A", "B")
        assert torch.equal(getattr(a, active), getattr(b, active))
        assert torch.equal(getattr(b, frozen), {"A": A, "B": B}[frozen])
        mixed = torch.einsum("ij,j...->i...", W, {"A": A, "B": B}[frozen])
        torch.testing.assert_close(getattr(a, frozen), mixed, atol=1e-13, rtol=0)


# ---------------------------------------------------------------------------------------------- TAD-LoRA's T


@pytest.mark.parametrize(
    "inv_sqrt_gap, T",
    # peers.md section 3.2's table (N = 10, c = 3), its column 1 / sqrt(1 - rho): complete, ER p = 0.5 .. 0.01, ring,
    # DIMAT's bipartite. (Its rho column is rounded to 3 digits: 0.957 alone would give 14.47 -> 14, not 15.)
    [(1.00, 3), (1.09, 3), (1.34, 4), (1.68, 5), (2.20, 7), (3.43, 10), (4.84, 15), (2.05, 6), (1.60, 5)],
)
def test_the_auto_rule_reproduces_the_table_of_the_spec(inv_sqrt_gap, T):
    assert tad_phase_length(1 - inv_sqrt_gap**-2) == T


def test_the_auto_rule_rounds_half_up_and_clips():
    assert tad_phase_length(0.75, c=1.25) == 3  # c / sqrt(1 - rho) = 2.5 exactly (Python's round() would give 2)
    assert tad_phase_length(0.0, c=0.1) == 1 and tad_phase_length(0.999) == 15 and tad_phase_length(1.0) == 15
    assert tad_phase_length(0.99, T_max=40) == 30 and tad_phase_length(0.999, T_max=40) == 40


def test_tad_on_a_static_ring_of_10_uses_lambda_2_squared_and_t_6(gen):
    algo = made("tad-lora", n=10, topology="ring")
    lam2 = Topology.build("ring", 10).second_eigenvalue
    assert algo.rho == pytest.approx(lam2**2, abs=1e-12) and algo.rho == pytest.approx(0.762, abs=5e-4)
    assert algo.phase_length == 6
    assert [algo.phase(t) for t in (0, 5, 6, 11, 12)] == ["B", "B", "A", "A", "B"]
    A, B = layer(gen, n=10)
    out = algo.mix(A, B, matrix("ring", 10))
    assert (out.stats["phase_length"] == 6).all() and (out.stats["mixing_rate"] == algo.rho).all()


def test_tad_on_the_complete_graph_uses_t_3():
    algo = made("tad-lora", n=10, topology="complete")
    assert algo.rho == pytest.approx(0.0, abs=1e-12) and algo.phase_length == 3


def test_tad_on_random_pairwise_encounters_matches_the_table_within_monte_carlo_error():
    """ER(p = 0.1) edge activation on 10 agents (= link failures with probability 0.9 on the complete graph, MH
    weights), where the spec's table gives rho = 0.646 and T = 5.

    Tolerance 0.06 on rho, wide on purpose: ``Network.mixing_rate`` averages ``W^T W`` over 4096 rounds, and the top
    eigenvalue of that average scatters by about 0.002 (std over seeds 0-7) and sits about 0.01 *above* the truth
    (mean 0.6456): by symmetry every non-trivial eigenvalue of ``E[W^T W] - J`` is the same (9-fold), and sampling
    noise splits them, pushing the largest up. The truth, ``(E||W||_F^2 - 1) / (N - 1)`` by that same symmetry, is
    0.634; the table's own 4000 draws sit about 0.01 above it. What matters is T: it is 5 for any rho in
    [0.556, 0.702).
    """
    algo = algorithms.get("tad-lora")
    algo.setup(facts(10, "complete", "link-failures", p=0.9, seed=0))
    assert abs(algo.rho - 0.646) <= 0.06
    assert algo.phase_length == 5


def test_tad_with_an_integer_t_uses_it_and_reports_no_rate(gen):
    algo = made("tad-lora", T=4, c=100.0, T_max=2)
    assert algo.phase_length == 4 and algo.rho is None
    out = algo.mix(*layer(gen), matrix("ring"))
    assert (out.stats["phase_length"] == 4).all() and "mixing_rate" not in out.stats


def test_tad_auto_needs_the_network():
    algo = algorithms.get("tad-lora")
    with pytest.raises(DecafError, match="before setup"):
        algo.trainable(0)
    with pytest.raises(DecafError, match="hold no network"):
        algo.setup(RunFacts(4))


@pytest.mark.parametrize("T", ["fast", 0, True, 2.5, "5"])
def test_tad_t_must_be_auto_or_a_positive_integer(T):
    with pytest.raises(DecafError, match=r"use 'auto' .* or an integer >= 1"):
        algorithms.get("tad-lora", T=T)
    with pytest.raises(ConfigError, match=r"algorithm_options.T="):
        load_config({"algorithm": "tad-lora", "algorithm_options": {"T": T}})


def test_options_are_checked_against_their_declarations():
    for name, options, match in [
        ("adf-lora", {"T": 0}, r"T=0 is too small"),
        ("adf-lora", {"T": "auto"}, r"T='auto' is invalid; use an integer >= 1"),
        ("adf-lora", {"first_phase": "C"}, r"first_phase='C' is not known; choose one of: A, B"),
        ("rolora", {"head": "local"}, r"head='local' is not known; choose one of: frozen, trained"),
        ("tad-lora", {"c": 0}, r"c=0 is too small"),
        ("tad-lora", {"T_max": 0}, r"T_max=0 is too small"),
    ]:
        with pytest.raises(DecafError, match=match):
            algorithms.get(name, **options)
    assert load_config({"algorithm": "tad-lora", "algorithm_options": {"T": 7}}).algorithm_options == {"T": 7}


# ---------------------------------------------------------------------------------------------- RoLoRA's reductions


def test_gossip_rolora_on_the_complete_graph_with_a_common_start_is_server_rolora(gen):
    """W = 1/N everywhere and one frozen factor at every agent: the gossip port computes the server's average of the
    active factor, keeps the common frozen one, and so is exact on the product, round after round."""
    n = 6
    algo = made("rolora", n=n, topology="complete")
    W = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    A, _ = layer(gen, n=1)
    A, B = A.expand(n, R, K).clone(), torch.zeros(n, D, R, dtype=torch.float64)  # C3: common A, B = 0
    server_A, server_B = A[0].clone(), B[0].clone()
    for t in range(8):
        # local training moves the active factor of every agent differently
        active = algo.phase(t)
        step = {
            "A": torch.randn(n, R, K, generator=gen, dtype=torch.float64),
            "B": torch.randn(n, D, R, generator=gen, dtype=torch.float64),
        }[active]
        trained_A, trained_B = (A + step, B) if active == "A" else (A, B + step)
        server_trained_A = server_A + step if active == "A" else server_A.expand(n, R, K)
        server_trained_B = server_B + step if active == "B" else server_B.expand(n, D, R)
        # the server: average the active factor, keep the common frozen one; exact on the product
        server_A, server_B = server_trained_A.mean(0), server_trained_B.mean(0)
        exact = (server_trained_B @ server_trained_A).mean(0)
        torch.testing.assert_close(server_B @ server_A, exact, atol=1e-12, rtol=0)
        A, B = algo.mix(trained_A, trained_B, W, round_=t)
        torch.testing.assert_close(A, server_A.expand(n, R, K), atol=1e-13, rtol=0)
        torch.testing.assert_close(B, server_B.expand(n, D, R), atol=1e-13, rtol=0)


@pytest.mark.parametrize("d, k", [(4096, 4096), (768, 768), (64, 32)])
def test_rolora_sends_half_of_dloras_bytes_on_square_layers(d, k):
    ro, dl, adf, tad = algorithms.get("rolora"), algorithms.get("dlora"), made("adf-lora"), made("tad-lora")
    shapes = ((8, k), (d, 8))
    full = dl.payload_numel(*shapes)
    assert adf.payload_numel(*shapes) == tad.payload_numel(*shapes) == full
    sent = [ro.payload_numel(*shapes, round_=t) for t in range(4)]
    assert sent == [d * 8, k * 8, d * 8, k * 8]
    if d == k:
        assert all(2 * s == full for s in sent)


# ---------------------------------------------------------------------------------------------- through the engine


def engine(tmp_path, algorithm, options=None, head=False, **kw):
    from decaf_lora.engine import make_engine

    cfg = {
        "agents": 6,
        "rounds": 4,
        "local_steps": 4,
        "eval_every": 4,
        "optim": {"lr": 2e-2},
        "lora": {"rank": 2},
        "out_dir": str(tmp_path),
        "algorithm": algorithm,
        "algorithm_options": options or {},
        **kw,
    }
    return make_engine(load_config(cfg), task=digits_task(head=head), write=False, progress=False)


def test_engine_trains_only_the_phase_factor_and_keeps_a_frozen_head(tmp_path):
    sim = engine(tmp_path, "adf-lora", {"T": 2}, head=True)
    A0, H0 = sim.states.A[0].clone(), {k: v.clone() for k, v in sim.states.H.items()}
    rows = sim.run_round(0) + sim.run_round(1)  # the B phase: A stays the common initial A (mixing A's that agree)
    torch.testing.assert_close(sim.states.A[0], A0, atol=1e-6, rtol=0)
    assert not torch.equal(sim.states.B[0], torch.zeros_like(sim.states.B[0]))
    sim.run_round(2)  # the A phase
    assert not torch.allclose(sim.states.A[0], A0, atol=1e-4)
    assert all(torch.equal(v, H0[k]) for k, v in sim.states.H.items())  # head frozen, never sent
    assert all(r["cross_term_error"] >= 0 for r in rows)

    trained = engine(tmp_path, "rolora", {"head": "trained"}, head=True)
    trained.run_round(0)
    assert not all(torch.equal(v, H0[k]) for k, v in trained.states.H.items())


def test_engine_rolora_keeps_its_own_frozen_factor_and_sends_half(tmp_path):
    sim = engine(tmp_path, "rolora", rounds=2)
    A0 = sim.states.A[0].clone()
    rows = sim.run_round(0)  # B-round: A is untouched, exactly
    assert torch.equal(sim.states.A[0], A0)
    rows += sim.run_round(1)
    rank, (k1, d1), (k2, d2) = 2, (64, 32), (32, 10)
    per_round = {1: rank * (d1 + d2), 2: rank * (k1 + k2)}  # B of both layers, then A of both layers
    for r in rows:
        assert r["bytes_sent"] == 4 * per_round[r["round"]] * 2  # float32, ring: two receivers


def test_engine_reports_tads_phase_length_and_mixing_rate_every_row(tmp_path):
    sim = engine(tmp_path, "tad-lora", topology={"name": "ring"}, agents=10, rounds=1)
    rows = sim.run_round(0)
    assert sim.algorithm.phase_length == 6
    assert all(r["phase_length"] == 6 and r["mixing_rate"] == pytest.approx(0.762, abs=5e-4) for r in rows)
    assert all(r["cross_term_error"] >= 0 for r in rows)
    assert np.isfinite([r["cross_term_error"] for r in rows]).all()


def test_a_resumed_run_continues_the_phase_schedule(tmp_path, monkeypatch):
    """TAD-LoRA on a random schedule (T chosen again at resume) with Adam moments kept: a run killed mid-round and
    resumed ends with the numbers of the uninterrupted run."""
    from decaf_lora.engine import resume, run

    cfg = {
        "agents": 6,
        "rounds": 5,
        "local_steps": 3,
        "eval_every": 5,
        "optim": {"lr": 2e-2, "state_after_mix": "keep"},
        "lora": {"rank": 2},
        "topology": {"name": "complete", "schedule": "link-failures", "link_drop": 0.5},
        "algorithm": "tad-lora",
        "out_dir": str(tmp_path),
    }
    full = run(cfg, task=digits_task(), write=False).metrics
    assert {m["phase_length"] for m in full} == {3}  # so the run switches phase before and after the crash
    sim = make_engine_for(cfg)
    real = sim.training.train

    def crash(agent, round_):
        if round_ == 3 and agent == 2:
            raise KeyboardInterrupt
        return real(agent, round_)

    monkeypatch.setattr(sim.training, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(resume(sim.run_dir, task=digits_task()).metrics) == strip(full)


def make_engine_for(cfg):
    from decaf_lora.engine import make_engine

    return make_engine(load_config(cfg), task=digits_task(), progress=False)
