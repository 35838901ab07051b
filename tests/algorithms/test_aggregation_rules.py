"""Each method's rule against a dense float64 reference, and DeCAF's documented behaviours."""

import math

import pytest
import torch

from decaf_lora import algorithms
from decaf_lora.topology import Topology


def layer(gen, n, d, r, k):
    return torch.randn(n, r, k, generator=gen, dtype=torch.float64), torch.randn(
        n, d, r, generator=gen, dtype=torch.float64
    )


def best_rank(M, rank):
    U, S, Vh = torch.linalg.svd(M)
    return (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :], S


@pytest.mark.parametrize("topology", ["ring", "bipartite", "complete", "star"])
@pytest.mark.parametrize("split", ["all-into-b", "balanced"])
def test_decaf_product_is_the_optimal_rank_r_approximation_of_the_mixed_product(gen, topology, split):
    A, B = layer(gen, 10, 30, 3, 25)
    W = torch.from_numpy(Topology.build(topology, 10).matrix)
    M = torch.einsum("ij,jdk->idk", W, B @ A)
    best, S = best_rank(M, 3)
    out = algorithms.get("decaf", split=split).mix(A, B, W)
    torch.testing.assert_close(out.B @ out.A, best, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.stats["tsvd_tail"], torch.linalg.vector_norm(S[:, 3:], dim=-1), atol=1e-9, rtol=0)


def test_decaf_product_is_the_same_for_both_split_policies(gen):
    A, B = layer(gen, 8, 20, 2, 16)
    W = torch.from_numpy(Topology.build("torus", 8).matrix)
    a = algorithms.get("decaf", split="all-into-b").mix(A, B, W)
    b = algorithms.get("decaf", split="balanced").mix(A, B, W)
    torch.testing.assert_close(a.B @ a.A, b.B @ b.A, atol=1e-12, rtol=0)


def test_decaf_tail_respects_proposition_1(gen):
    """||M_i - TSVD_r(M_i)||_F <= sqrt((|N_b(i)| - 1) r) c^2 with c the largest factor spectral norm."""
    for topology in ("ring", "bipartite", "complete"):
        A, B = layer(gen, 10, 40, 4, 30)
        topo = Topology.build(topology, 10)
        out = algorithms.get("decaf").mix(A, B, torch.from_numpy(topo.matrix))
        c = max(torch.linalg.matrix_norm(A, 2).max(), torch.linalg.matrix_norm(B, 2).max())
        bound = torch.tensor([math.sqrt(len(topo.neighbors(i)) * 4) for i in range(10)], dtype=torch.float64) * c**2
        assert (out.stats["tsvd_tail"] <= bound).all()


def test_decaf_reports_proposition_1_bound_with_c_measured_on_each_neighbourhood(gen):
    for topology in ("ring", "bipartite", "star"):
        A, B = layer(gen, 10, 40, 4, 30)
        topo = Topology.build(topology, 10)
        out = algorithms.get("decaf").mix(A, B, torch.from_numpy(topo.matrix))
        for i in range(10):
            nb = [i, *topo.neighbors(i)]
            c = max(max(torch.linalg.matrix_norm(A[j], 2), torch.linalg.matrix_norm(B[j], 2)) for j in nb)
            torch.testing.assert_close(out.stats["factor_norm_c"][i], c, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(
                out.stats["tsvd_tail_bound"][i], math.sqrt((len(nb) - 1) * 4) * c**2, atol=1e-9, rtol=1e-10
            )
        assert (out.stats["tsvd_tail"] <= out.stats["tsvd_tail_bound"]).all()


def test_decaf_with_gauge_keeps_the_same_product(gen):
    A, B = layer(gen, 6, 20, 3, 15)
    W = torch.from_numpy(Topology.build("ring", 6).matrix)
    plain = algorithms.get("decaf").mix(A, B, W)
    for gauge in ("procrustes", "lstsq"):
        g = algorithms.get("decaf", gauge=gauge).mix(A, B, W)
        torch.testing.assert_close(g.B @ g.A, plain.B @ plain.A, atol=1e-10, rtol=0)
        assert (g.B - B).norm() < (plain.B - B).norm()  # closer to the agents' previous factors


def test_decaf_heterogeneous_ranks_truncate_each_agent_to_its_own_rank(gen):
    A, B = layer(gen, 6, 20, 4, 18)
    ranks = torch.tensor([4, 1, 2, 4, 3, 2])
    # zero-padded factors, as agents of smaller rank would send them
    keep = torch.arange(4)[None, :] < ranks[:, None]
    A, B = A * keep[:, :, None], B * keep[:, None, :]
    W = torch.from_numpy(Topology.build("ring", 6).matrix)
    out = algorithms.get("decaf").mix(A, B, W, ranks=ranks)
    M = torch.einsum("ij,jdk->idk", W, B @ A)
    for i, r in enumerate(ranks.tolist()):
        best, S = best_rank(M[i], r)
        torch.testing.assert_close(out.B[i] @ out.A[i], best, atol=1e-10, rtol=0)
        assert (out.B[i][:, r:] == 0).all() and (out.A[i][r:] == 0).all()
        torch.testing.assert_close(out.stats["tsvd_tail"][i], torch.linalg.vector_norm(S[r:]), atol=1e-9, rtol=0)


def test_pitfall_1_decaf_before_any_training_keeps_the_common_init(gen):
    """B = 0 everywhere (LoRA's init): every mixed product is 0. DeCAF keeps each agent's factors, so A survives."""
    A = torch.randn(1, 4, 16, generator=gen).expand(5, 4, 16).clone()
    B = torch.zeros(5, 24, 4)
    W = torch.from_numpy(Topology.build("ring", 5).matrix)
    for split in ("all-into-b", "balanced"):
        out = algorithms.get("decaf", split=split).mix(A, B, W)
        assert torch.equal(out.A, A) and torch.equal(out.B, B)
        assert out.stats["skipped_zero"].all()
    # Without the guard the balanced split kills the adapter for good: this is the failure the guard prevents.
    dead = algorithms.get("decaf", split="balanced", skip_zero=False).mix(A, B, W)
    assert (dead.A == 0).all() and (dead.B == 0).all()
    # ... while all-into-b still hands back orthonormal rows of A, so gradients keep flowing into B.
    alive = algorithms.get("decaf", split="all-into-b", skip_zero=False).mix(A, B, W)
    torch.testing.assert_close(alive.A @ alive.A.transpose(1, 2), torch.eye(4).expand(5, 4, 4), atol=1e-5, rtol=0)


def test_pitfall_1_only_zero_agents_are_skipped(gen):
    A, B = layer(gen, 6, 10, 2, 8)
    B[:3] = 0  # agents 0-2 untrained; on a ring agent 1's neighbourhood {0, 1, 2} is all zero
    out = algorithms.get("decaf").mix(A, B, torch.from_numpy(Topology.build("ring", 6).matrix))
    assert out.stats["skipped_zero"].tolist() == [False, True, False, False, False, False]


def test_decaf_agent_with_nothing_to_mix_keeps_its_factors_but_zero_self_weight_takes_the_neighbour(gen):
    """Alone (all weight on itself: absent, isolated, every payload rejected) means unchanged factors, not a fresh
    SVD basis; a row that gives the agent itself weight 0 is not alone, it takes its neighbour's product exactly."""
    A, B = layer(gen, 3, 12, 2, 10)
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    out = algorithms.get("decaf").mix(A, B, W)
    assert torch.equal(out.A[0], A[0]) and torch.equal(out.B[0], B[0])
    torch.testing.assert_close(out.B[1] @ out.A[1], B[2] @ A[2], atol=1e-10, rtol=0)
    best, _ = best_rank(0.5 * (B[1] @ A[1] + B[2] @ A[2]), 2)
    torch.testing.assert_close(out.B[2] @ out.A[2], best, atol=1e-10, rtol=0)


def test_dlora_averages_factors_and_suffers_consensus_interference(gen):
    A, B = layer(gen, 6, 12, 3, 9)
    W = torch.from_numpy(Topology.build("ring", 6).matrix)
    out = algorithms.get("dlora").mix(A, B, W)
    torch.testing.assert_close(out.A, torch.einsum("ij,jrk->irk", W, A))
    torch.testing.assert_close(out.B, torch.einsum("ij,jdr->idr", W, B))
    mixed_product = torch.einsum("ij,jdk->idk", W, B @ A)
    assert (out.B @ out.A - mixed_product).norm() > 0.1 * mixed_product.norm()


def test_dlora_fa_is_exact_consensus_on_products_when_a_is_common(gen):
    A, B = layer(gen, 6, 12, 3, 9)
    A = A[:1].expand_as(A).clone()
    W = torch.from_numpy(Topology.build("ring", 6).matrix)
    out = algorithms.get("dlora-fa").mix(A, B, W)
    assert torch.equal(out.A, A)
    torch.testing.assert_close(out.B @ out.A, torch.einsum("ij,jdk->idk", W, B @ A), atol=1e-12, rtol=0)


def test_fedavg_is_the_data_size_weighted_mean_for_everyone(gen):
    A, B = layer(gen, 4, 8, 2, 6)
    sizes = torch.tensor([10.0, 30.0, 20.0, 40.0])
    out = algorithms.get("fedavg").mix(A, B, sizes)
    p = (sizes / sizes.sum()).double()
    for i in range(4):
        torch.testing.assert_close(out.A[i], torch.einsum("j,jrk->rk", p, A))
        torch.testing.assert_close(out.B[i], torch.einsum("j,jdr->dr", p, B))


def test_local_returns_its_own_factors_untouched(gen):
    A, B = layer(gen, 4, 8, 2, 6)
    out = algorithms.get("local").mix(A, B, torch.full((4, 4), 0.25, dtype=torch.float64))
    assert torch.equal(out.A, A) and torch.equal(out.B, B)


def test_decaf_reaches_the_server_answer_on_a_complete_graph(gen):
    """On a complete graph with uniform weights every agent's M_i is the global mean product."""
    A, B = layer(gen, 5, 16, 2, 12)
    W = torch.full((5, 5), 0.2, dtype=torch.float64)
    out = algorithms.get("decaf").mix(A, B, W)
    best, _ = best_rank((B @ A).mean(0), 2)
    torch.testing.assert_close(out.B @ out.A, best.expand(5, -1, -1), atol=1e-10, rtol=0)
