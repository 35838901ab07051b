"""The factored truncated SVD against a dense float64 SVD of the formed matrix, on fresh random inputs.

Every method runs every case: ``householder`` and ``qr`` (QRs of the stacks), ``gram`` (Gram matrices, certified,
redone in float64 where float32 cannot be trusted) and ``auto``. Accuracy promised in float32: singular values within
1e-5 of the largest, U and Vh orthonormal, and the product as close to the best rank-r approximation as the gap
between the kept and the dropped singular values allows.
"""

import pytest
import torch

from decaf_lora import algorithms, lowrank
from decaf_lora.errors import ShapeError
from decaf_lora.lowrank import METHODS, regauge, split_factors, truncated_svd_of_sum

LOW = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-10}  # singular values, relative to the largest


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


def orthonormality(t) -> float:
    """Largest entry of ``U^T U - I`` and ``Vh Vh^T - I``, in float64."""
    U, Vh = t.U.double(), t.Vh.double()
    eye = torch.eye(U.shape[-1], dtype=torch.float64)
    return max(float((U.mT @ U - eye).abs().max()), float((Vh @ Vh.mT - eye).abs().max()))


def orthonormality_bound(dtype) -> float:
    """What the library promises: Householder's Q is orthonormal to a few u; Gram results are checked against this."""
    return lowrank.GRAM_ORTHONORMAL * torch.finfo(lowrank.compute_dtype_for(torch.zeros((), dtype=dtype))).eps / 2


def check_against_dense(B, A, w, rank, t):
    """Singular values, product and orthonormality of ``t`` against the dense float64 SVD of the same inputs."""
    M, S_ref, best = dense_reference(B, A, w, rank)
    S_ref = torch.nn.functional.pad(S_ref, (0, rank + 1))  # zeros beyond min(d, k): a rank above m r has them
    top = S_ref[..., :1].clamp_min(1e-300)
    low = LOW[B.dtype]
    assert torch.isfinite(t.U).all() and torch.isfinite(t.S).all() and torch.isfinite(t.Vh).all()
    assert float(((t.S.double() - S_ref[..., :rank]).abs() / top).max()) <= low
    tail_ref = torch.linalg.vector_norm(S_ref[..., rank:], dim=-1)
    assert float(((t.tail.double() - tail_ref).abs() / top[..., 0]).max()) <= 10 * low
    # the product moves by about (rounding) x S_1 / gap, the gap between the last kept and first dropped values
    gap = ((S_ref[..., rank - 1] - S_ref[..., rank]) / top[..., 0]).clamp_min(1e-300)
    prod = (t.U.double() * t.S.double()[..., None, :]) @ t.Vh.double()
    err = torch.linalg.matrix_norm(prod - best) / torch.linalg.matrix_norm(M).clamp_min(1e-300)
    assert bool((err <= 10 * low * (1 + 1 / gap)).all()), (err, gap)
    assert orthonormality(t) <= orthonormality_bound(B.dtype)


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
    ((6,), 3, 96, 8, 80, 8),  # large enough for auto to pick the Gram path in float32
]


@pytest.mark.parametrize("method", METHODS)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lead, m, d, r, k, rank", SHAPES)
def test_low_precision_inputs_match_dense_float64_svd(gen, dtype, method, lead, m, d, r, k, rank):
    """float32 and bf16 inputs (computed in float32): the reference is the dense float64 SVD of the same values."""
    B, A, w = random_stack(gen, lead, m, d, r, k, dtype=dtype)
    t = truncated_svd_of_sum(B, A, w, rank, method=method)
    assert t.S.dtype == t.U.dtype == t.Vh.dtype == torch.float32
    check_against_dense(B, A, w, rank, t)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(4))
def test_float32_singular_values_within_1e_5_relative(seed, method):
    gen = torch.Generator().manual_seed(seed)
    B, A, w = random_stack(gen, (3,), 3, 96, 8, 80, dtype=torch.float32)
    _, S_ref, best = dense_reference(B, A, w, 8)
    t = truncated_svd_of_sum(B, A, w, 8, method=method)
    assert t.S.dtype == torch.float32
    rel = ((t.S.double() - S_ref[..., :8]).abs() / S_ref[..., :1]).max()
    assert rel < 1e-5
    prod = (t.U * t.S[..., None, :]) @ t.Vh
    assert ((prod.double() - best).norm() / best.norm()) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast(gen, dtype, method):
    B, A, w = random_stack(gen, (), 3, 32, 4, 24, dtype=dtype)
    _, S_ref, _ = dense_reference(B, A, w, 4)  # reference from the same (rounded) half-precision values
    t = truncated_svd_of_sum(B, A, w, 4, method=method)
    assert t.S.dtype == torch.float32
    assert ((t.S.double() - S_ref[:4]).abs() / S_ref[0]).max() < 1e-5


# --- ill-conditioned and rank-deficient inputs ----------------------------------------------------------------------


def hard_case(gen, name, dtype):
    """(B, A, w, rank) of 4 layers, m = 3, d = 48, k = 40, r = 4: the inputs DeCAF meets, and the ones it fears."""
    L, m, d, r, k = 4, 3, 48, 4, 40

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def orthonormal(*shape):
        return torch.linalg.qr(randn(*shape)).Q

    w = torch.full((m,), 1 / 3, dtype=torch.float64)
    B_mean, A_mean = orthonormal(L, d, r) * 0.5 ** torch.arange(r), orthonormal(L, k, r).mT
    graded = 10.0 ** -torch.linspace(0, 5, r, dtype=torch.float64)
    cases = {
        # agents close to consensus: P and Q ill-conditioned, but their small directions meet each other
        "near-consensus": (B_mean[:, None] + 1e-4 * randn(L, m, d, r), A_mean[:, None] + 1e-4 * randn(L, m, r, k), r),
        # equal B's, different A's: the small directions of P meet large ones of Q (float32 Gram is not enough)
        "equal B, random A": (B_mean[:, None] + 1e-5 * randn(L, m, d, r), randn(L, m, r, k), r),
        "equal B, random A, rank m r": (B_mean[:, None] + 1e-5 * randn(L, m, d, r), randn(L, m, r, k), m * r),
        "graded columns, rank m r": (orthonormal(L, m, d, r) * graded, orthonormal(L, m, k, r).mT, m * r),
        "graded both, rank m r": (orthonormal(L, m, d, r) * graded, (orthonormal(L, m, k, r) * graded).mT, m * r),
        "identical A": (randn(L, m, d, r), randn(L, 1, r, k).expand(L, m, r, k), r),
        "identical A, rank 2r": (randn(L, m, d, r), randn(L, 1, r, k).expand(L, m, r, k), 2 * r),
        "B = 0": (torch.zeros(L, m, d, r, dtype=torch.float64), randn(L, m, r, k), r),
        "zero weight, repeated A (padding)": (randn(L, m, d, r), randn(L, 2, r, k)[:, [0, 1, 0]], r),
    }
    B, A, rank = cases[name]
    if name.startswith("zero weight"):
        w = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    return B.to(dtype), A.contiguous().to(dtype), w.to(dtype), rank


HARD = [
    "near-consensus",
    "equal B, random A",
    "equal B, random A, rank m r",
    "graded columns, rank m r",
    "graded both, rank m r",
    "identical A",
    "identical A, rank 2r",
    "B = 0",
    "zero weight, repeated A (padding)",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", HARD)
def test_ill_conditioned_and_rank_deficient_inputs(gen, name, method, dtype):
    B, A, w, rank = hard_case(gen, name, dtype)
    t = truncated_svd_of_sum(B, A, w, rank, method=method)
    check_against_dense(B, A, w, rank, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_gives_exact_zeros_where_the_sum_has_lower_rank(gen, dtype):
    """Zero singular values come out as exact zeros (from the float64 redo for float32 inputs), never NaN.

    float64 inputs get Householder's values there instead (about 1e-15): a float64 Gram resolves singular values
    to 1e-8 of the largest only, short of the 1e-12 promised for float64.
    """
    B, A, w, rank = hard_case(gen, "identical A, rank 2r", dtype)  # the sum has rank r = 4, asked for 8
    t = truncated_svd_of_sum(B, A, w, rank, method="gram")
    assert (t.S[..., :4] > 0).all() and (t.S[..., 4:] == 0).all() and (t.tail == 0).all()
    assert orthonormality(t) <= orthonormality_bound(dtype) and torch.isfinite(t.U).all()
    B, A, w, rank = hard_case(gen, "B = 0", dtype)
    t = truncated_svd_of_sum(B, A, w, rank, method="gram")
    assert (t.S == 0).all() and (t.tail == 0).all() and orthonormality(t) <= orthonormality_bound(dtype)


class Routes:
    """Counts what the Gram path did: its passes (by dtype) and the entries it handed to the Householder path."""

    def __init__(self, monkeypatch):
        self.passes, self.householder = [], 0
        real_pass, real_qr = lowrank._gram_pass, lowrank._qr_svd

        def gram_pass(B, A, w, rank, dtype, out):
            self.passes.append((dtype, B.shape[0]))
            return real_pass(B, A, w, rank, dtype, out)

        def qr_svd(B, A, w, rank, how):
            self.householder += B.shape[0]
            return real_qr(B, A, w, rank, how)

        monkeypatch.setattr(lowrank, "_gram_pass", gram_pass)
        monkeypatch.setattr(lowrank, "_qr_svd", qr_svd)


def test_gram_settles_well_conditioned_float32_inputs_in_one_float32_pass(gen, monkeypatch):
    routes = Routes(monkeypatch)
    for name in ("near-consensus", "identical A", "zero weight, repeated A (padding)"):
        B, A, w, rank = hard_case(gen, name, torch.float32)
        truncated_svd_of_sum(B, A, w, rank, method="gram")
    B, A, w = random_stack(gen, (4,), 3, 48, 4, 40, dtype=torch.float32)
    truncated_svd_of_sum(B, A, w, 4, method="gram")
    B, A, w = random_stack(gen, (4,), 5, 256, 8, 200, dtype=torch.float32)  # m r = 40: the bounds grow with m r
    truncated_svd_of_sum(B, A, w, 8, method="gram")
    assert routes.passes == [(torch.float32, 4)] * 5 and routes.householder == 0


def test_gram_redoes_in_float64_what_a_float32_gram_cannot_resolve(gen, monkeypatch):
    """Equal B's with different A's: a float32 Gram is off by more than 1e-5, the certificate catches it."""
    B, A, w, rank = hard_case(gen, "equal B, random A, rank m r", torch.float32)
    routes = Routes(monkeypatch)
    t = truncated_svd_of_sum(B, A, w, rank, method="gram")
    assert routes.passes == [(torch.float32, 4), (torch.float64, 4)]
    check_against_dense(B, A, w, rank, t)
    monkeypatch.setitem(lowrank.GRAM_CERTIFY, torch.float32, float("inf"))  # trust the float32 Gram: wrong here
    blind = truncated_svd_of_sum(B, A, w, rank, method="gram")
    _, S_ref, _ = dense_reference(B, A, w, rank)
    assert float(((blind.S.double() - S_ref[..., :rank]).abs() / S_ref[..., :1]).max()) > 1e-5


def test_gram_uses_float64_when_float32_matmuls_are_reduced_precision(gen, monkeypatch):
    B, A, w = random_stack(gen, (2,), 3, 48, 4, 40, dtype=torch.float32)
    routes = Routes(monkeypatch)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # TF32 / bf16 products would void the float32 rounding model
    try:
        t = truncated_svd_of_sum(B, A, w, 4, method="gram")
        auto = lowrank._resolve_method(
            "auto", device=B.device, dtype=torch.float32, batch=64, d=4096, k=4096, mr=24, rank=8
        )
    finally:
        torch.set_float32_matmul_precision(saved)
    assert routes.passes == [(torch.float64, 2)] and auto == "householder"
    check_against_dense(B, A, w, 4, t)


@pytest.mark.parametrize(
    "device, dtype, batch, d, k, mr, rank, expected",
    [
        ("cpu", torch.float32, 64, 4096, 4096, 24, 8, "gram"),  # LLaMA-7B q/v projections, m = 3, r = 8
        ("cpu", torch.float32, 1, 4096, 4096, 80, 16, "gram"),  # one layer, m = 5, r = 16
        ("cpu", torch.float32, 1, 4096, 4096, 24, 8, "householder"),  # one layer, m = 3, r = 8: too little work
        ("cpu", torch.float32, 8, 64, 64, 6, 2, "householder"),  # the test suite's tiny DeCAF layers
        ("cpu", torch.float64, 64, 4096, 4096, 24, 8, "householder"),  # no float32 pass to gain from
        ("cpu", torch.float32, 64, 4096, 4096, 8, 20, "householder"),  # rank > m r: structural zeros to complete
        ("cpu", torch.float32, 64, 6, 4096, 12, 5, "householder"),  # d < m r: the Gram is singular by shape
        ("cuda", torch.float32, 64, 4096, 4096, 24, 8, "householder"),  # not measured on a GPU yet
    ],
)
def test_auto_rule(device, dtype, batch, d, k, mr, rank, expected):
    got = lowrank._resolve_method(
        "auto", device=torch.device(device), dtype=dtype, batch=batch, d=d, k=k, mr=mr, rank=rank
    )
    assert got == expected


@pytest.mark.parametrize("method", ["auto", "gram"])
@pytest.mark.parametrize("d, k, r", [(40, 36, 4), (256, 128, 8)])  # auto takes Householder, then Gram
def test_decaf_mix_products_do_not_move_beyond_rounding(gen, method, d, k, r):
    """DeCAF through ``method`` against the Householder path and the exact (float64) products, float32 inputs.

    The paths may differ by the Householder path's own float32 error (about 1e-6 of the product here, the Gram
    path's is smaller); beyond that, by less than 1e-6 relative.
    """
    n = 6
    A = torch.randn(n, r, k, generator=gen)
    B = torch.randn(n, d, r, generator=gen)
    W = 0.5 * torch.eye(n) + 0.25 * (torch.roll(torch.eye(n), 1, 0) + torch.roll(torch.eye(n), -1, 0))  # a ring

    def products(method, dtype=torch.float32):
        out = algorithms.get("decaf", method=method).mix(A.to(dtype), B.to(dtype), W.to(dtype))
        return out.B.double() @ out.A.double()

    def rel(x, y):
        return float((torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)).max())

    exact, householder, got = products("householder", torch.float64), products("householder"), products(method)
    assert rel(got, householder) <= rel(householder, exact) + 1e-6
    assert rel(got, exact) <= max(rel(householder, exact), 1e-6)


# --- edge cases, structure and errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_input_has_zero_tail_and_no_nan(gen, method):
    # every agent's B spans the same 2 columns: the sum has rank 2 although m r = 12
    base = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    B = torch.stack([torch.cat([base * (j + 1), torch.zeros(30, 2, dtype=torch.float64)], 1) for j in range(3)])
    A = torch.randn(3, 4, 25, generator=gen, dtype=torch.float64)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    M, S_ref, _ = dense_reference(B, A, w, 8)
    t = truncated_svd_of_sum(B, A, w, 8, method=method)
    assert torch.isfinite(t.U).all() and torch.isfinite(t.Vh).all()
    torch.testing.assert_close(t.S[2:], torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((t.U * t.S) @ t.Vh, M, atol=1e-10, rtol=0)
    assert float(t.tail) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_input_gives_zeros_and_orthonormal_vectors(method):
    B, A = torch.zeros(2, 3, 10, 4), torch.zeros(2, 3, 4, 9)
    t = truncated_svd_of_sum(B, A, torch.full((2, 3), 1 / 3), 6, method=method)
    assert (t.S == 0).all() and (t.tail == 0).all()
    assert torch.isfinite(t.U).all() and torch.isfinite(t.Vh).all()
    torch.testing.assert_close(t.Vh @ t.Vh.transpose(-2, -1), torch.eye(6).expand(2, 6, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(t.U.transpose(-2, -1) @ t.U, torch.eye(6).expand(2, 6, 6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_zero_weights_give_zeros_and_no_nan(gen, method):
    B, A, _ = random_stack(gen, (2,), 3, 30, 4, 20, dtype=torch.float32)
    t = truncated_svd_of_sum(B, A, torch.zeros(3), 4, method=method)
    assert (t.S == 0).all() and torch.isfinite(t.U).all() and torch.isfinite(t.Vh).all()
    assert orthonormality(t) <= orthonormality_bound(torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_weights_broadcast_from_one_vector(gen, method):
    B, A, _ = random_stack(gen, (4,), 3, 12, 2, 10)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    t1 = truncated_svd_of_sum(B, A, w, 2, method=method)
    t2 = truncated_svd_of_sum(B, A, w.expand(4, 3), 2, method=method)
    torch.testing.assert_close(t1.S, t2.S)


def test_result_unpacks_like_torch_svd(gen):
    B, A, w = random_stack(gen, (2,), 3, 12, 2, 10)
    t = truncated_svd_of_sum(B, A, w, 3)
    U, S, Vh = t
    assert U is t.U and S is t.S and Vh is t.Vh and t.tail.shape == (2,)
    _, S_ref, best = dense_reference(B, A, w, 3)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, best)  # the same reconstruction as torch.linalg.svd's
    with pytest.raises(ValueError, match="values to unpack"):
        U, S, Vh, tail = t


class LargestTensor(torch.overrides.TorchFunctionMode):
    """Records the largest tensor any torch function returns while active."""

    largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("method", METHODS)
def test_the_dense_matrix_is_never_formed(gen, method):
    """A d x k intermediate would be the largest tensor of the call; every tensor stays far smaller."""
    B, A, w = random_stack(gen, (), 3, 500, 2, 400, dtype=torch.float32)
    with LargestTensor() as spy:
        truncated_svd_of_sum(B, A, w, 2, method=method)
    assert spy.largest <= 2 * 3 * 500 * 2  # the stacks (and their QR workspace), never 500 x 400
    with LargestTensor() as spy:  # the spy sees a formed matrix when there is one
        torch.einsum("m,mdr,mrk->dk", w, B, A)
    assert spy.largest == 500 * 400


@pytest.mark.parametrize("policy", ["all-into-b", "balanced"])
def test_split_policies_reproduce_the_product(gen, policy):
    B, A, w = random_stack(gen, (2,), 3, 20, 3, 16)
    t = truncated_svd_of_sum(B, A, w, 3)
    Bn, An = split_factors(t.U, t.S, t.Vh, policy)
    torch.testing.assert_close(Bn @ An, (t.U * t.S[..., None, :]) @ t.Vh, atol=1e-12, rtol=0)
    if policy == "balanced":
        torch.testing.assert_close(torch.linalg.vector_norm(Bn, dim=-2), torch.linalg.vector_norm(An, dim=-1))


@pytest.mark.parametrize("method", METHODS)
def test_all_into_b_keeps_a_alive_where_singular_values_are_zero(method):
    t = truncated_svd_of_sum(torch.zeros(1, 8, 2), torch.zeros(1, 2, 6), torch.ones(1), 2, method=method)
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
    with pytest.raises(ShapeError, match=r"method='lu' is not known; choose one of: auto, gram, householder, qr"):
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
