"""The factored truncated SVD against a dense float64 SVD of the formed matrix, on fresh random inputs."""

import pytest
import torch

from decaf_lora.errors import ShapeError
from decaf_lora.lowrank import regauge, split_factors, truncated_svd_of_sum


def random_stack(gen, lead, m, d, r, k, dtype=torch.float64):
    B = torch.randn(*lead, m, d, r, generator=gen, dtype=torch.float64)
    A = torch.randn(*lead, m, r, k, generator=gen, dtype=torch.float64)
    w = torch.rand(*lead, m, generator=gen, dtype=torch.float64)
    return B.to(dtype), A.to(dtype), (w / w.sum(-1, keepdim=True)).to(dtype)


def dense_reference(B, A, w, rank):
    """Form M in float64 and take its full SVD: the ground truth."""
    M = torch.einsum("...m,...mdr,...mrk->...dk", w.double(), B.double(), A.double())
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    best = (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]
    return M, S, best


SHAPES = [
    # (lead, m, d, r, k, rank)
    ((), 1, 20, 3, 15, 3),  # m = 1: the SVD of a single product
    ((), 3, 40, 4, 30, 4),
    ((), 3, 40, 4, 30, 12),  # rank = m r: nothing discarded
    ((), 2, 40, 4, 30, 20),  # rank > m r: surplus zero singular values
    ((4,), 5, 24, 2, 64, 2),
    ((2, 3), 3, 16, 2, 16, 3),  # batched over two leading dims (layers x agents)
    ((), 4, 6, 3, 50, 5),  # d < m r: QR of a wide stack
    ((3,), 3, 50, 4, 7, 6),  # k < m r
]


@pytest.mark.parametrize("method", ["householder", "qr"])
@pytest.mark.parametrize("lead, m, d, r, k, rank", SHAPES)
def test_matches_dense_float64_svd(gen, method, lead, m, d, r, k, rank):
    B, A, w = random_stack(gen, lead, m, d, r, k)
    M, S_ref, best = dense_reference(B, A, w, rank)
    t = truncated_svd_of_sum(B, A, w, rank, method=method)
    assert t.U.shape == (*lead, d, rank) and t.S.shape == (*lead, rank) and t.Vh.shape == (*lead, rank, k)
    torch.testing.assert_close(t.S, S_ref[..., :rank], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((t.U * t.S[..., None, :]) @ t.Vh, best, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(t.tail, torch.linalg.vector_norm(S_ref[..., rank:], dim=-1), rtol=1e-8, atol=1e-9)
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(
        t.U.transpose(-2, -1) @ t.U, eye.expand_as(t.U.transpose(-2, -1) @ t.U), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        t.Vh @ t.Vh.transpose(-2, -1), eye.expand_as(t.Vh @ t.Vh.transpose(-2, -1)), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("seed", range(6))
def test_float32_singular_values_within_1e_5_relative(seed):
    gen = torch.Generator().manual_seed(seed)
    B, A, w = random_stack(gen, (3,), 3, 96, 8, 80, dtype=torch.float32)
    _, S_ref, best = dense_reference(B, A, w, 8)
    t = truncated_svd_of_sum(B, A, w, 8)
    assert t.S.dtype == torch.float32
    rel = ((t.S.double() - S_ref[..., :8]).abs() / S_ref[..., :1]).max()
    assert rel < 1e-5
    prod = (t.U * t.S[..., None, :]) @ t.Vh
    assert ((prod.double() - best).norm() / best.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast(gen, dtype):
    B, A, w = random_stack(gen, (), 3, 32, 4, 24, dtype=dtype)
    _, S_ref, _ = dense_reference(B, A, w, 4)  # reference from the same (rounded) half-precision values
    t = truncated_svd_of_sum(B, A, w, 4)
    assert t.S.dtype == torch.float32
    assert ((t.S.double() - S_ref[:4]).abs() / S_ref[0]).max() < 1e-5


def test_rank_deficient_input_has_zero_tail_and_no_nan(gen):
    # every agent's B spans the same 2 columns: the sum has rank 2 although m r = 12
    base = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    B = torch.stack([torch.cat([base * (j + 1), torch.zeros(30, 2, dtype=torch.float64)], 1) for j in range(3)])
    A = torch.randn(3, 4, 25, generator=gen, dtype=torch.float64)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    M, S_ref, _ = dense_reference(B, A, w, 8)
    t = truncated_svd_of_sum(B, A, w, 8)
    assert torch.isfinite(t.U).all() and torch.isfinite(t.Vh).all()
    torch.testing.assert_close(t.S[2:], torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((t.U * t.S) @ t.Vh, M, atol=1e-10, rtol=0)
    assert float(t.tail) < 1e-12


@pytest.mark.parametrize("method", ["householder", "qr"])
def test_all_zero_input_gives_zeros_and_orthonormal_vectors(method):
    B, A = torch.zeros(2, 3, 10, 4), torch.zeros(2, 3, 4, 9)
    t = truncated_svd_of_sum(B, A, torch.full((2, 3), 1 / 3), 6, method=method)
    assert (t.S == 0).all() and (t.tail == 0).all()
    assert torch.isfinite(t.U).all() and torch.isfinite(t.Vh).all()
    torch.testing.assert_close(t.Vh @ t.Vh.transpose(-2, -1), torch.eye(6).expand(2, 6, 6), atol=1e-6, rtol=0)


def test_weights_broadcast_from_one_vector(gen):
    B, A, _ = random_stack(gen, (4,), 3, 12, 2, 10)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    t1 = truncated_svd_of_sum(B, A, w, 2)
    t2 = truncated_svd_of_sum(B, A, w.expand(4, 3), 2)
    torch.testing.assert_close(t1.S, t2.S)


def test_the_dense_matrix_is_never_formed(gen, monkeypatch):
    """A d x k intermediate would show up as a tensor with both large dimensions; none is created."""
    B, A, w = random_stack(gen, (), 3, 500, 2, 400)
    seen = []
    real_svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    truncated_svd_of_sum(B, A, w, 2)
    assert [s[-2:] for s in seen] == [(6, 6)]  # only the small (m r x m r) core is ever decomposed


@pytest.mark.parametrize("policy", ["all-into-b", "balanced"])
def test_split_policies_reproduce_the_product(gen, policy):
    B, A, w = random_stack(gen, (2,), 3, 20, 3, 16)
    t = truncated_svd_of_sum(B, A, w, 3)
    Bn, An = split_factors(t.U, t.S, t.Vh, policy)
    torch.testing.assert_close(Bn @ An, (t.U * t.S[..., None, :]) @ t.Vh, atol=1e-12, rtol=0)
    if policy == "balanced":
        torch.testing.assert_close(torch.linalg.vector_norm(Bn, dim=-2), torch.linalg.vector_norm(An, dim=-1))


def test_all_into_b_keeps_a_alive_where_singular_values_are_zero():
    t = truncated_svd_of_sum(torch.zeros(1, 8, 2), torch.zeros(1, 2, 6), torch.ones(1), 2)
    B, A = split_factors(t.U, t.S, t.Vh, "all-into-b")
    assert (B == 0).all() and torch.linalg.matrix_norm(A) > 1
    B, A = split_factors(t.U, t.S, t.Vh, "balanced")
    assert (B == 0).all() and (A == 0).all()  # the dead adapter of pitfall 1: why balanced is not the default


def test_unknown_split_policy():
    with pytest.raises(ShapeError, match=r"split='half' is not known; choose one of: all-into-b, balanced"):
        split_factors(torch.zeros(3, 1), torch.zeros(1), torch.zeros(1, 3), "half")


@pytest.mark.parametrize(
    "B_shape, A_shape, w_shape, rank, match",
    [
        ((2, 10, 3), (2, 3, 8), (2,), 0, r"rank=0 is invalid"),
        ((2, 10, 3), (2, 3, 8), (2,), 9, r"rank=9 exceeds min\(d, k\)=8"),
        ((2, 10, 3), (2, 4, 8), (2,), 2, r"do not fit"),
        ((2, 10, 3), (3, 3, 8), (2,), 2, r"do not fit"),
        ((2, 10, 3), (2, 3, 8), (3,), 2, r"weights has shape \(3,\); it must end in m=2"),
        ((10, 3), (3, 8), (1,), 2, r"use B \(\.\.\., m, d, r\)"),
    ],
)
def test_bad_shapes_raise_clear_errors(B_shape, A_shape, w_shape, rank, match):
    with pytest.raises(ShapeError, match=match):
        truncated_svd_of_sum(torch.zeros(B_shape), torch.zeros(A_shape), torch.ones(w_shape), rank)


def test_unknown_method():
    with pytest.raises(ShapeError, match=r"method='lu' is not known"):
        truncated_svd_of_sum(torch.zeros(1, 4, 2), torch.zeros(1, 2, 4), torch.ones(1), 1, method="lu")


# --- gauge -------------------------------------------------------------------------------------------------------


def svd_refactor(B_old, A_old, policy="all-into-b"):
    """What DeCAF does to a lone agent: the same product, a fresh SVD basis."""
    t = truncated_svd_of_sum(
        B_old[..., None, :, :], A_old[..., None, :, :], torch.ones(1, dtype=B_old.dtype), B_old.shape[-1]
    )
    return split_factors(t.U, t.S, t.Vh, policy)


@pytest.mark.parametrize("policy", ["all-into-b", "balanced"])
def test_lstsq_regauge_undoes_the_svd_basis_change_exactly(gen, policy):
    B_old = torch.randn(5, 40, 4, generator=gen, dtype=torch.float64) * 0.1
    A_old = torch.randn(5, 4, 30, generator=gen, dtype=torch.float64)
    B_new, A_new = svd_refactor(B_old, A_old, policy)
    assert (B_new - B_old).norm() / B_old.norm() > 0.5  # the fresh SVD basis is far from the old factors
    B_g, A_g = regauge(B_new, A_new, B_old, A_old, "lstsq")
    torch.testing.assert_close(B_g @ A_g, B_new @ A_new, atol=1e-12, rtol=0)
    torch.testing.assert_close(B_g, B_old, atol=1e-10, rtol=0)
    torch.testing.assert_close(A_g, A_old, atol=1e-10, rtol=0)


def test_procrustes_regauge_undoes_a_rotation_and_keeps_the_product(gen):
    B_old = torch.randn(4, 40, 3, generator=gen, dtype=torch.float64)
    A_old = torch.randn(4, 3, 30, generator=gen, dtype=torch.float64)
    R = torch.linalg.qr(torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)).Q
    B_new, A_new = B_old @ R, R.transpose(-2, -1) @ A_old
    B_g, A_g = regauge(B_new, A_new, B_old, A_old, "procrustes")
    torch.testing.assert_close(B_g, B_old, atol=1e-10, rtol=0)
    torch.testing.assert_close(A_g, A_old, atol=1e-10, rtol=0)


def test_procrustes_regauge_never_does_worse_than_no_gauge(gen):
    """Identity is one orthogonal candidate, so the optimum aligns at least as well (on the normalized objective)."""
    B_old = torch.randn(6, 40, 4, generator=gen, dtype=torch.float64)
    A_old = torch.randn(6, 4, 30, generator=gen, dtype=torch.float64)
    B_new, A_new = svd_refactor(B_old, A_old, "balanced")
    B_g, A_g = regauge(B_new, A_new, B_old, A_old, "procrustes")
    torch.testing.assert_close(B_g @ A_g, B_new @ A_new, atol=1e-11, rtol=0)

    def misfit(B, A):
        return (B - B_old).pow(2).sum((-2, -1)) / B_old.pow(2).sum((-2, -1)) + (A - A_old).pow(2).sum(
            (-2, -1)
        ) / A_old.pow(2).sum((-2, -1))

    assert (misfit(B_g, A_g) <= misfit(B_new, A_new) + 1e-12).all()
    assert misfit(B_g, A_g).sum() < 0.5 * misfit(B_new, A_new).sum()


def test_regauge_aligns_on_a_when_b_is_zero(gen):
    A_old = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    A_old = torch.linalg.qr(A_old.T).Q.T  # orthonormal rows, as all-into-b produces
    R = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64)).Q
    B_zero = torch.zeros(15, 3, dtype=torch.float64)
    for method in ("procrustes", "lstsq"):  # lstsq is singular here and must fall back
        B_g, A_g = regauge(B_zero, R.T @ A_old, B_zero, A_old, method)
        assert torch.isfinite(A_g).all()
        torch.testing.assert_close(A_g, A_old, atol=1e-10, rtol=0)


def test_regauge_none_and_errors(gen):
    B, A = torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)
    assert regauge(B, A, B, A, "none")[0] is B
    with pytest.raises(ShapeError, match="gauge='spin' is not known"):
        regauge(B, A, B, A, "spin")
    with pytest.raises(ShapeError, match="equal shapes"):
        regauge(B, A, B[:3], A, "procrustes")
