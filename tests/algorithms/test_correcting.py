"""LoRA-FAIR, FedEx-LoRA and FedSA-LoRA: each rule against an independent dense float64 reference, and the
invariants the peer specification (§6, §10, §11) promises."""

import sys
from fractions import Fraction
from pathlib import Path

import pytest
import scipy.optimize
import torch

from decaf_lora import algorithms
from decaf_lora.algorithms import LayerContext
from decaf_lora.config import load_config
from decaf_lora.errors import ShapeError
from decaf_lora.topology import Topology

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_simulation import cfg_for, digits_task  # noqa: E402

from decaf_lora.engine import make_engine, run  # noqa: E402

N, D, R, K = 6, 12, 3, 10


def misaligned(gen, n=N, d=D, r=R, k=K):
    """Factors with independent A's: averaging them factor-wise leaves large cross terms."""
    A = torch.randn(n, r, k, generator=gen, dtype=torch.float64)
    B = 0.1 * torch.randn(n, d, r, generator=gen, dtype=torch.float64)
    return A, B


def gossip(name, n=N):
    return torch.from_numpy(Topology.build(name, n).matrix)


def mixed_products(W, A, B):
    """Dense ``sum_j W_ij B_j A_j`` for every row i, by explicit loops."""
    return torch.stack([sum(W[i, j] * B[j] @ A[j] for j in range(A.shape[0])) for i in range(W.shape[0])])


def cos(X, Y):
    return (X * Y).sum() / (X.norm() * Y.norm())


# ------------------------------------------------------------------------------------------------- LoRA-FAIR


def fair_objective(B_bar, A_bar, target, lam):
    """The paper's objective on dense matrices: 1 - cos(dW, (B_bar + dB) A_bar) + lam ||dB||_F, as f(dB)."""

    def f(dB):
        return 1 - cos(target, (B_bar + dB) @ A_bar) + lam * dB.norm()

    return f


def dense_minimum(f, shape, start):
    """The reference minimizer: scipy's BFGS on the dense objective with autograd gradients."""

    def value_and_grad(x):
        dB = torch.tensor(x, dtype=torch.float64).reshape(shape).requires_grad_(True)
        value = f(dB)
        (grad,) = torch.autograd.grad(value, dB)
        return value.item(), grad.reshape(-1).numpy()

    res = scipy.optimize.minimize(value_and_grad, start.reshape(-1).numpy(), jac=True, method="BFGS", tol=1e-14)
    return float(res.fun)


@pytest.mark.parametrize("lam", [0.01, 0.0])
def test_fair_cosine_reaches_the_minimum_a_dense_reference_solver_finds(gen, lam):
    A, B = misaligned(gen)
    W = gossip("ring")
    out = algorithms.get("lora-fair", lam=lam).mix(A, B, W)
    target = mixed_products(W, A, B)
    A_bar, B_bar = torch.einsum("ij,jrk->irk", W, A), torch.einsum("ij,jdr->idr", W, B)
    torch.testing.assert_close(out.A, A_bar, atol=1e-14, rtol=0)  # A is DLoRA's mix, untouched
    for i in range(N):
        f = fair_objective(B_bar[i], A_bar[i], target[i], lam)
        start = 0.01 * torch.randn(D, R, generator=gen, dtype=torch.float64)  # away from the kink of ||dB|| at 0
        reference = dense_minimum(f, (D, R), start)
        assert f(out.B[i] - B_bar[i]).item() <= reference + 1e-9
        assert f(out.B[i] - B_bar[i]).item() < f(torch.zeros(D, R, dtype=torch.float64)).item() - 1e-3


def test_fair_ls_is_the_ridge_least_squares_fit_of_the_mixed_product(gen):
    A, B = misaligned(gen)
    W = gossip("ring")
    lam = 0.05
    out = algorithms.get("lora-fair", objective="ls", lam=lam).mix(A, B, W)
    target = mixed_products(W, A, B)
    for i in range(N):
        A_bar, B_bar = sum(W[i, j] * A[j] for j in range(N)), sum(W[i, j] * B[j] for j in range(N))
        mu = lam * A_bar.pow(2).sum() / R  # the ridge is relative to A_bar's mean squared singular value
        # min ||dB A_bar - (target - B_bar A_bar)||^2 + mu ||dB||^2 as one stacked least-squares problem
        lhs = torch.cat([A_bar.T, mu.sqrt() * torch.eye(R, dtype=torch.float64)])
        rhs = torch.cat([(target[i] - B_bar @ A_bar).T, torch.zeros(R, D, dtype=torch.float64)])
        dB = torch.linalg.lstsq(lhs, rhs).solution.T
        torch.testing.assert_close(out.B[i], B_bar + dB, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.stats["fair_dB_norm"][i], dB.norm(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("objective", ["cosine", "ls"])
def test_fair_statistics_match_dense_computations(gen, objective):
    A, B = misaligned(gen)
    W = gossip("torus")
    out = algorithms.get("lora-fair", objective=objective).mix(A, B, W)
    dlora = algorithms.get("dlora").mix(A, B, W)
    target = mixed_products(W, A, B)
    for i in range(N):
        before, after = dlora.B[i] @ dlora.A[i], out.B[i] @ out.A[i]
        expect = {
            "fair_cosine_gap_before": 1 - cos(target[i], before),
            "fair_cosine_gap_after": 1 - cos(target[i], after),
            "fair_rel_error_before": (before - target[i]).norm() / target[i].norm(),
            "fair_rel_error_after": (after - target[i]).norm() / target[i].norm(),
            "fair_dB_norm": (out.B[i] - dlora.B[i]).norm(),
            "fair_skipped": torch.tensor(0.0, dtype=torch.float64),
        }
        for key, value in expect.items():
            torch.testing.assert_close(out.stats[key][i], value, atol=1e-10, rtol=0, msg=key)


@pytest.mark.parametrize("topology", ["ring", "star", "complete", "erdos-renyi"])
def test_fair_product_is_at_least_as_close_to_the_mixed_product_as_dlora(gen, topology):
    """Both objectives, on random misaligned factors: the cosine for 'cosine', the distance for 'ls'."""
    A, B = misaligned(gen, n=8)
    W = gossip(topology, 8)
    target = mixed_products(W, A, B)
    dlora = algorithms.get("dlora").mix(A, B, W)
    fair = algorithms.get("lora-fair").mix(A, B, W)
    ls = algorithms.get("lora-fair", objective="ls").mix(A, B, W)
    for i in range(8):
        base = dlora.B[i] @ dlora.A[i]
        assert cos(target[i], fair.B[i] @ fair.A[i]) > cos(target[i], base)
        assert (ls.B[i] @ ls.A[i] - target[i]).norm() < (base - target[i]).norm()


def test_fair_with_a_large_lam_is_dlora(gen):
    A, B = misaligned(gen)
    W = gossip("ring")
    dlora = algorithms.get("dlora").mix(A, B, W)
    # The norm penalty is a threshold: once lam exceeds the cosine's gradient, dB = 0 exactly.
    cosine = algorithms.get("lora-fair", lam=1e3).mix(A, B, W)
    assert torch.equal(cosine.B, dlora.B) and torch.equal(cosine.A, dlora.A)
    assert (cosine.stats["fair_dB_norm"] == 0).all()
    # The ridge shrinks the correction continuously toward 0.
    norms = [
        algorithms.get("lora-fair", objective="ls", lam=lam).mix(A, B, W).stats["fair_dB_norm"]
        for lam in (0, 1, 1e2, 1e8)
    ]
    assert all((a > b).all() for a, b in zip(norms, norms[1:]))
    far = algorithms.get("lora-fair", objective="ls", lam=1e8).mix(A, B, W)
    torch.testing.assert_close(far.B, dlora.B, atol=1e-8, rtol=0)


@pytest.mark.parametrize("objective", ["cosine", "ls"])
def test_fair_with_all_products_zero_keeps_the_dlora_mix_without_nan(gen, objective):
    """Round 0 of LoRA (B = 0 everywhere): nothing to match, so nothing is corrected and nothing is NaN."""
    A, _ = misaligned(gen)
    B = torch.zeros(N, D, R, dtype=torch.float64)
    out = algorithms.get("lora-fair", objective=objective).mix(A, B, gossip("ring"))
    assert (out.B == 0).all() and torch.equal(out.A, algorithms.get("dlora").mix(A, B, gossip("ring")).A)
    assert all(torch.isfinite(v).all() for v in out.stats.values())
    assert (out.stats["fair_skipped"] == 1).all()


@pytest.mark.parametrize("objective", ["cosine", "ls"])
def test_fair_heterogeneous_ranks_correct_only_each_agents_own_columns(gen, objective):
    A, B = misaligned(gen, r=4)
    ranks = torch.tensor([2, 4, 3, 4, 1, 2])
    keep = torch.arange(4)[None, :] < ranks[:, None]
    A, B = A * keep[:, :, None], B * keep[:, None, :]  # agents own their first ranks[i] rows / columns
    W = gossip("ring")
    out = algorithms.get("lora-fair", objective=objective).mix(A, B, W, ranks=ranks)
    dlora = algorithms.get("dlora").mix(A, B, W, ranks=ranks)
    assert (out.B[~keep[:, None, :].expand_as(out.B)] == 0).all()
    assert (out.A[~keep[:, :, None].expand_as(out.A)] == 0).all()
    target = mixed_products(W, A, B)
    for i in range(N):
        base, fixed = dlora.B[i] @ dlora.A[i], out.B[i] @ out.A[i]
        if objective == "cosine":
            assert cos(target[i], fixed) >= cos(target[i], base)
        else:
            assert (fixed - target[i]).norm() <= (base - target[i]).norm()


def test_fair_on_the_complete_graph_gives_every_agent_the_server_result(gen):
    A, B = misaligned(gen)
    out = algorithms.get("lora-fair").mix(A, B, gossip("complete"))
    torch.testing.assert_close(out.B, out.B[:1].expand_as(out.B), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------- FedEx-LoRA


def fedex_context(E, scale):
    return LayerContext(scale=scale, E=E)


def test_fedex_matches_a_dense_reference(gen):
    A, B = misaligned(gen)
    E = 0.1 * torch.randn(N, D, K, generator=gen, dtype=torch.float64)
    W, s = gossip("ring"), 0.5
    out = algorithms.get("fedex-lora").mix(A, B, W, context=fedex_context(E, s))
    for i in range(N):
        A_bar, B_bar = sum(W[i, j] * A[j] for j in range(N)), sum(W[i, j] * B[j] for j in range(N))
        E_ref = sum(W[i, j] * (E[j] + s * B[j] @ A[j]) for j in range(N)) - s * B_bar @ A_bar
        torch.testing.assert_close(out.A[i], A_bar, atol=1e-14, rtol=0)
        torch.testing.assert_close(out.B[i], B_bar, atol=1e-14, rtol=0)
        torch.testing.assert_close(out.E[i], E_ref, atol=1e-12, rtol=0)
        residual = s * (sum(W[i, j] * B[j] @ A[j] for j in range(N)) - B_bar @ A_bar)
        torch.testing.assert_close(out.stats["fedex_residual_norm"][i], residual.norm(), atol=1e-12, rtol=0)
        torch.testing.assert_close(out.stats["fedex_correction_norm"][i], E_ref.norm(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("topology", ["ring", "star", "erdos-renyi"])
def test_fedex_effective_update_is_the_exact_average_of_the_neighbourhood(gen, topology):
    A, B = misaligned(gen, n=8)
    E = torch.randn(8, D, K, generator=gen, dtype=torch.float64)
    W, s = gossip(topology, 8), 2.0
    out = algorithms.get("fedex-lora").mix(A, B, W, context=fedex_context(E, s))
    effective = s * B @ A + E
    torch.testing.assert_close(s * out.B @ out.A + out.E, torch.einsum("ij,jdk->idk", W, effective), atol=1e-12, rtol=0)


def test_fedex_on_the_complete_graph_gives_every_agent_the_mean_effective_update(gen):
    A, B = misaligned(gen)
    E = torch.randn(N, D, K, generator=gen, dtype=torch.float64)
    out = algorithms.get("fedex-lora").mix(A, B, gossip("complete"), context=fedex_context(E, 0.25))
    after = 0.25 * out.B @ out.A + out.E
    torch.testing.assert_close(after, (0.25 * B @ A + E).mean(0).expand_as(after), atol=1e-12, rtol=0)


def test_fedex_heterogeneous_ranks_stay_exact(gen):
    A, B = misaligned(gen, r=4)
    ranks = torch.tensor([1, 4, 2, 4, 3, 2])
    keep = torch.arange(4)[None, :] < ranks[:, None]
    A, B = A * keep[:, :, None], B * keep[:, None, :]
    E, W = torch.randn(N, D, K, generator=gen, dtype=torch.float64), gossip("ring")
    out = algorithms.get("fedex-lora").mix(A, B, W, ranks=ranks, context=fedex_context(E, 1.0))
    assert (out.B[~keep[:, None, :].expand_as(out.B)] == 0).all()
    torch.testing.assert_close(out.B @ out.A + out.E, torch.einsum("ij,jdk->idk", W, B @ A + E), atol=1e-12, rtol=0)


def test_fedex_a_rank_with_some_agents_computes_the_same_rows_as_the_simulator(gen):
    """What a distributed rank does: its own agents first, then the received copies, the matching rows of W."""
    A, B = misaligned(gen, n=8)
    E = torch.randn(8, D, K, generator=gen, dtype=torch.float64)
    W = gossip("ring", 8)
    full = algorithms.get("fedex-lora").mix(A, B, W, context=fedex_context(E, 0.5))
    own, stack = [2, 3], [2, 3, 1, 4]
    part = algorithms.get("fedex-lora").mix(
        A[stack], B[stack], W[own][:, stack], self_index=[0, 1], context=fedex_context(E[stack], 0.5)
    )
    torch.testing.assert_close(part.E, full.E[own], atol=1e-12, rtol=0)
    torch.testing.assert_close(part.B @ part.A, (full.B @ full.A)[own], atol=1e-12, rtol=0)


def test_fedex_payload_is_dlora_plus_the_dense_correction():
    for d, k, r in [(768, 768, 2), (4096, 4096, 4), (32, 64, 2)]:
        shapes = ((r, k), (d, r))
        ratio = Fraction(
            algorithms.get("fedex-lora").payload_numel(*shapes), algorithms.get("dlora").payload_numel(*shapes)
        )
        assert ratio == 1 + Fraction(d * k, (d + k) * r)
    assert set(algorithms.get("fedex-lora").sends()) == {"A", "B", "E", "head"}


def test_fedex_without_base_corrections_says_what_it_needs(gen):
    A, B = misaligned(gen)
    with pytest.raises(ShapeError, match=r"fedex-lora needs the stacked base corrections.*\(6, 12, 10\)"):
        algorithms.get("fedex-lora").mix(A, B, gossip("ring"))
    with pytest.raises(ShapeError, match=r"context.E has shape \(6, 10, 12\); fedex-lora needs \(6, 12, 10\)"):
        algorithms.get("fedex-lora").mix(A, B, gossip("ring"), context=fedex_context(torch.zeros(6, K, D), 1.0))


def test_fedex_in_the_engine_mixes_effective_weights_exactly_and_applies_them_in_the_forward_pass(tmp_path):
    """End to end: the engine stores E, ships it, and its forward hook makes the layer compute W0 + E + s B A."""
    engine = make_engine(
        load_config(cfg_for(tmp_path, algorithm="fedex-lora")), task=digits_task(), write=False, progress=False
    )
    expected = {}
    mix = engine.algorithm.mix

    def recording_mix(A, B, W, **kw):  # the exact neighbourhood average of what the engine stacked
        ctx = kw["context"]
        effective = ctx.scale * B.double() @ A.double() + ctx.E.double()
        expected[ctx.layer] = torch.einsum("ij,jdk->idk", torch.as_tensor(W).double(), effective)
        return mix(A, B, W, **kw)

    engine.algorithm.mix = recording_mix
    engine.run_round(0)
    st = engine.states
    assert all(bool((E != 0).any()) for E in st.E)  # the residual reached the stored corrections
    for l in range(len(st.layers)):
        torch.testing.assert_close(st.products(l).double(), expected[l], atol=1e-5, rtol=0)
    x = torch.randn(5, st.layers[0].module.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    for agent in range(4):
        st.load(agent)
        layer = st.layers[0]
        W_eff = layer.module.base_layer.weight + st.products(0, [agent])[0]
        with torch.no_grad():
            torch.testing.assert_close(layer.module(x), x @ W_eff.T + layer.module.base_layer.bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo", ["fedex-lora", "fedsa-lora"])
def test_engine_bytes_follow_what_each_method_sends(tmp_path, algo):
    res = run(cfg_for(tmp_path, algorithm=algo, agents=6, rounds=1), task=digits_task(), write=False)
    rank, (d1, k1), (d2, k2) = 2, (32, 64), (10, 32)  # TinyMLP's fc1, fc2
    dlora = (d1 + k1) * rank + (d2 + k2) * rank
    numel = {"fedex-lora": dlora + d1 * k1 + d2 * k2, "fedsa-lora": k1 * rank + k2 * rank}[algo]
    assert all(m["bytes_sent"] == m["bytes_received"] == 4 * numel * 2 for m in res.metrics)  # float32, 2 neighbours


# ------------------------------------------------------------------------------------------------- FedSA-LoRA


def test_fedsa_matches_a_dense_reference(gen):
    A, B = misaligned(gen)
    W = gossip("ring")
    out = algorithms.get("fedsa-lora").mix(A, B, W)
    for i in range(N):
        A_ref = sum(W[i, j] * A[j] for j in range(N))
        torch.testing.assert_close(out.A[i], A_ref, atol=1e-14, rtol=0)
        assert torch.equal(out.B[i], B[i])
        torch.testing.assert_close(out.stats["fedsa_a_disagreement"][i], (A[i] - A_ref).norm(), atol=1e-12, rtol=0)


def test_fedsa_never_reads_the_neighbours_b(gen):
    """The engine's stack: own agents first, then each sender's copy, whose unsent B is NaN."""
    A, B = misaligned(gen)
    W = gossip("ring")
    rows = torch.cat([torch.diag(torch.diag(W)), W - torch.diag(torch.diag(W))], dim=1)
    copies_B = torch.full_like(B, float("nan"))
    out = algorithms.get("fedsa-lora").mix(torch.cat([A, A]), torch.cat([B, copies_B]), rows, self_index=list(range(N)))
    clean = algorithms.get("fedsa-lora").mix(A, B, W)
    assert torch.isfinite(out.B).all() and torch.equal(out.B, B)
    torch.testing.assert_close(out.A, clean.A, atol=1e-14, rtol=0)


def test_fedsa_sends_only_a_which_is_k_over_d_plus_k_of_dlora():
    fedsa = algorithms.get("fedsa-lora")
    assert fedsa.sends() == ("A",)  # B and the head are personal
    assert set(fedsa.trainable()) == {"A", "B", "head"}
    for d, k, r in [(768, 768, 8), (32, 64, 2), (4096, 11008, 16)]:
        shapes = ((r, k), (d, r))
        assert Fraction(fedsa.payload_numel(*shapes), algorithms.get("dlora").payload_numel(*shapes)) == Fraction(
            k, d + k
        )


def test_fedsa_keeps_a_common_a_common_and_the_complete_graph_makes_it_common(gen):
    A, B = misaligned(gen)
    common = A[:1].expand_as(A).clone()
    out = algorithms.get("fedsa-lora").mix(common, B, gossip("ring"))
    torch.testing.assert_close(out.A, common, atol=1e-14, rtol=0)
    assert torch.equal(out.B, B)
    full = algorithms.get("fedsa-lora").mix(A, B, gossip("complete"))
    torch.testing.assert_close(full.A, A.mean(0).expand_as(A), atol=1e-14, rtol=0)
    assert torch.equal(full.B, B)  # "shared A + local B"


def test_fedsa_heterogeneous_ranks_cut_the_shared_a_to_each_agents_rank(gen):
    A, B = misaligned(gen, r=4)
    ranks = torch.tensor([1, 4, 2, 4, 3, 2])
    keep = torch.arange(4)[None, :] < ranks[:, None]
    A, B = A * keep[:, :, None], B * keep[:, None, :]
    W = gossip("ring")
    out = algorithms.get("fedsa-lora").mix(A, B, W, ranks=ranks)
    torch.testing.assert_close(out.A, torch.einsum("ij,jrk->irk", W, A) * keep[:, :, None], atol=1e-14, rtol=0)
    assert torch.equal(out.B, B)
