"""The aligning methods, FedRot-LoRA and DIMAT: each rule against an independent float64 reference, and the
invariants they promise (own products kept, gauge copies aligned exactly, DLoRA recovered where nothing aligns)."""

import itertools

import numpy as np
import pytest
import torch

from decaf_lora import algorithms
from decaf_lora.algorithms import LayerContext
from decaf_lora.algorithms.dimat import signed_assignment
from decaf_lora.errors import DecafError, ShapeError
from decaf_lora.topology import Topology

N, D, R, K = 5, 7, 3, 6
f64 = torch.float64


def ring(n=N):
    return torch.from_numpy(Topology.build("ring", n).matrix)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=f64)


def orthogonal(gen, n, r=R, det=None):
    """n random r x r orthogonal matrices; ``det`` = +1 or -1 forces the determinant, None leaves it random."""
    Q = torch.linalg.qr(randn(gen, n, r, r)).Q
    if det is not None:
        wrong = torch.sign(torch.linalg.det(Q)) != det
        Q[wrong, :, -1] *= -1
    return Q


def signed_permutations(gen, n, r=R):
    P = torch.zeros(n, r, r, dtype=f64)
    for i in range(n):
        perm = torch.randperm(r, generator=gen)
        signs = torch.randint(0, 2, (r,), generator=gen) * 2 - 1
        P[i, torch.arange(r), perm] = signs.to(f64)
    return P


def dense_cross_term_error(W, A, B, A_new, B_new, scale=1.0):
    target = torch.einsum("ij,jdk->idk", W, B @ A)
    return scale * torch.linalg.matrix_norm(target - B_new @ A_new)


# ---------------------------------------------------------------------------------------------------- FedRot-LoRA


def np_polar(M, special):
    U, _, Vt = np.linalg.svd(M)
    if special and np.linalg.det(U @ Vt) < 0:
        U[:, -1] *= -1
    return U @ Vt


def fedrot_reference(A, B, W, factor, lam, special, ref_A, ref_B, rotate_self):
    """Dense float64 FedRot step in numpy: rotate every weighted input toward the output agent's reference, then mix."""
    A, B, W, ref_A, ref_B = (np.asarray(x, dtype=np.float64) for x in (A, B, W, ref_A, ref_B))
    A_out, B_out = np.zeros((W.shape[0], *A.shape[1:])), np.zeros((W.shape[0], *B.shape[1:]))
    for i in range(W.shape[0]):
        for j in np.nonzero(W[i])[0]:
            M = A[j] @ ref_A[i].T if factor == "A" else B[j].T @ ref_B[i]
            Rot = np_polar(M, special)
            if lam < 1:
                Rot = np_polar((1 - lam) * np.eye(len(Rot)) + lam * Rot, special)
            if j == i and not rotate_self:
                Rot = np.eye(len(Rot))
            A_out[i] += W[i, j] * Rot.T @ A[j]
            B_out[i] += W[i, j] * B[j] @ Rot
    return torch.from_numpy(A_out), torch.from_numpy(B_out)


def fedrot(**options):
    return algorithms.get("fedrot-lora", **options)


@pytest.mark.parametrize("reference", ["own-start", "receiver"])
@pytest.mark.parametrize("round_, factor", [(1, "A"), (2, "B"), (3, "A")])
@pytest.mark.parametrize("lam, group, special", [(1.0, "auto", False), (1.0, "SO", True), (0.5, "auto", True)])
def test_fedrot_matches_a_float64_reference(gen, reference, round_, factor, lam, group, special):
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    start_A, start_B = randn(gen, N, R, K), randn(gen, N, D, R)
    W = ring()
    ctx = LayerContext(scale=0.5, start_A=start_A, start_B=start_B)
    out = fedrot(lam=lam, group=group, reference=reference).mix(A, B, W, round_=round_, context=ctx)
    own_start = reference == "own-start"
    ref_A, ref_B = (start_A, start_B) if own_start else (A, B)
    A_ref, B_ref = fedrot_reference(A, B, W, factor, lam, special, ref_A, ref_B, rotate_self=own_start)
    torch.testing.assert_close(out.A, A_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.B, B_ref, atol=1e-10, rtol=0)
    err = dense_cross_term_error(W, A, B, A_ref, B_ref, scale=0.5)
    torch.testing.assert_close(out.stats["cross_term_error"], err, atol=1e-10, rtol=1e-9)
    plain = dense_cross_term_error(W, A, B, torch.einsum("ij,jrk->irk", W, A), torch.einsum("ij,jdr->idr", W, B), 0.5)
    torch.testing.assert_close(out.stats["cross_term_error_unaligned"], plain, atol=1e-10, rtol=1e-9)


def test_fedrot_aligns_a_on_odd_rounds_and_b_on_even_ones_and_skips_round_0():
    algo = fedrot()
    assert [algo.aligned_factor(t) for t in range(5)] == [None, "A", "B", "A", "B"]
    assert [fedrot(first_align="B").aligned_factor(t) for t in range(3)] == [None, "B", "A"]
    assert fedrot(skip_round0=False).aligned_factor(0) == "B"
    assert fedrot(lam=0.0).aligned_factor(1) is None


def one_hot_rows(n=N):
    """Stack own factors, then one received copy per agent (as the engine does); row i takes only neighbour i+1."""
    W = torch.zeros(n, 2 * n, dtype=f64)
    W[torch.arange(n), n + (torch.arange(n) + 1) % n] = 1.0
    return W, list(range(n))


@pytest.mark.parametrize("reference", ["own-start", "receiver"])
@pytest.mark.parametrize("round_", [1, 2])
def test_fedrot_rotation_keeps_each_neighbours_own_product(gen, reference, round_):
    """With a row that weighs a single neighbour, the output is that neighbour's rotated factors (B_j R, R^T A_j)."""
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    W, self_index = one_hot_rows()
    ctx = LayerContext(start_A=randn(gen, N, R, K), start_B=randn(gen, N, D, R))
    out = fedrot(reference=reference).mix(
        torch.cat([A, A]), torch.cat([B, B]), W, round_=round_, self_index=self_index, context=ctx
    )
    nxt = (torch.arange(N) + 1) % N
    torch.testing.assert_close(out.B @ out.A, (B @ A)[nxt], atol=1e-10, rtol=0)
    assert (out.stats["rotation_distance"] > 0.1).all()  # the factors really were rotated
    assert not torch.allclose(out.B, B[nxt])


def test_fedrot_reduces_the_cross_term_error_of_dlora_on_rotated_copies(gen):
    base_A, base_B = randn(gen, R, K), randn(gen, D, R)
    Q = orthogonal(gen, N)
    A = Q.mT @ base_A + 0.05 * randn(gen, N, R, K)
    B = base_B @ Q + 0.05 * randn(gen, N, D, R)
    W = ring()
    for round_ in (1, 2):
        out = fedrot(reference="receiver").mix(A, B, W, round_=round_, context=LayerContext(scale=2.0))
        dlora = algorithms.get("dlora").mix(A, B, W)
        torch.testing.assert_close(
            out.stats["cross_term_error_unaligned"], dense_cross_term_error(W, A, B, dlora.A, dlora.B, 2.0)
        )
        assert (out.stats["cross_term_error"] < 0.1 * out.stats["cross_term_error_unaligned"]).all()


@pytest.mark.parametrize("reference", ["own-start", "receiver"])
def test_fedrot_with_lam_0_is_dlora_bit_for_bit(gen, reference):
    A, B = randn(gen, N, R, K).float(), randn(gen, N, D, R).float()
    ctx = LayerContext(start_A=A + 1, start_B=B + 1)
    dlora = algorithms.get("dlora").mix(A, B, ring())
    for round_ in range(4):
        out = fedrot(lam=0.0, reference=reference).mix(A, B, ring(), round_=round_, context=ctx)
        assert torch.equal(out.A, dlora.A) and torch.equal(out.B, dlora.B)
        assert (out.stats["rotation_distance"] == 0).all()


@pytest.mark.parametrize("group, det", [("O", None), ("SO", 1.0), ("auto", None)])
@pytest.mark.parametrize("reference", ["own-start", "receiver"])
@pytest.mark.parametrize("round_", [1, 2])
def test_fedrot_aligns_gauge_copies_exactly(gen, group, det, reference, round_):
    """Neighbours (B Q_j, Q_j^T A), Q_j in the option's group: alignment recovers Q_j and the mix keeps B A."""
    base_A, base_B = randn(gen, R, K), randn(gen, D, R)
    Q = orthogonal(gen, N, det=det)
    if det is None:  # make sure reflections are present
        Q[0, :, 0] *= -1
    A, B = Q.mT @ base_A, base_B @ Q
    S = orthogonal(gen, N, det=det)  # each agent's start-of-round frame, all different
    ctx = LayerContext(start_A=S.mT @ base_A, start_B=base_B @ S)
    out = fedrot(group=group, reference=reference).mix(A, B, ring(), round_=round_, context=ctx)
    torch.testing.assert_close(out.B @ out.A, (base_B @ base_A).expand(N, D, K), atol=1e-10, rtol=0)
    assert (out.stats["cross_term_error"] < 1e-10).all()
    assert (out.stats["cross_term_error_unaligned"] > 0.1).all()


def test_fedrot_over_so_cannot_undo_a_reflection_and_over_o_it_can(gen):
    base_A, base_B = randn(gen, R, K), randn(gen, D, R)
    Q = orthogonal(gen, N, det=1.0)
    Q[1, :, 0] *= -1  # agent 1 holds a reflected copy
    A, B = Q.mT @ base_A, base_B @ Q
    target = base_B @ base_A
    hard_o = fedrot(group="O", reference="receiver").mix(A, B, ring(), round_=1)
    hard_so = fedrot(group="SO", reference="receiver").mix(A, B, ring(), round_=1)
    torch.testing.assert_close(hard_o.B[0] @ hard_o.A[0], target, atol=1e-10, rtol=0)
    assert torch.linalg.matrix_norm(hard_so.B[0] @ hard_so.A[0] - target) > 1e-3


def test_fedrot_at_rank_1_so_keeps_the_sign_and_o_flips_it(gen):
    a, b = randn(gen, 1, K), randn(gen, D, 1)
    A, B = torch.stack([a, -a, a]), torch.stack([b, -b, b])
    W = torch.full((3, 3), 1 / 3, dtype=f64)
    flipped = fedrot(group="O", reference="receiver").mix(A, B, W, round_=1)
    torch.testing.assert_close(flipped.B @ flipped.A, (b @ a).expand(3, D, K), atol=1e-12, rtol=0)
    kept = fedrot(group="SO", reference="receiver").mix(A, B, W, round_=1)
    dlora = algorithms.get("dlora").mix(A, B, W)
    torch.testing.assert_close(kept.B @ kept.A, dlora.B @ dlora.A, atol=1e-12, rtol=0)


def test_fedrot_soft_rotation_is_proper_and_within_lemma_a1_of_the_identity(gen):
    """Lemma A.1 of the paper: ||R_soft - I||_F <= 2 lam ||R* - I||_F, and a soft rotation stays in SO(r)."""
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    W, self_index = one_hot_rows()
    stack = dict(self_index=self_index, round_=2)
    hard = fedrot(group="SO", reference="receiver").mix(torch.cat([A, A]), torch.cat([B, B]), W, **stack)
    for lam in (0.2, 0.5, 0.8):
        soft = fedrot(lam=lam, reference="receiver").mix(torch.cat([A, A]), torch.cat([B, B]), W, **stack)
        dist = soft.stats["rotation_distance"]
        assert (dist <= 2 * lam * hard.stats["rotation_distance"] + 1e-12).all() and (dist > 0).all()
        nxt = (torch.arange(N) + 1) % N
        rot = torch.linalg.lstsq(B[nxt], soft.B).solution  # B_j R = B_out
        torch.testing.assert_close(rot.mT @ rot, torch.eye(R, dtype=f64).expand(N, R, R), atol=1e-10, rtol=0)
        torch.testing.assert_close(torch.linalg.det(rot), torch.ones(N, dtype=f64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("reference", ["own-start", "receiver"])
def test_fedrot_round_0_and_zero_b_give_no_nan_and_no_rotation(gen, reference):
    A = randn(gen, R, K).expand(N, R, K).clone() + 0.01 * randn(gen, N, R, K)
    B = torch.zeros(N, D, R, dtype=f64)
    ctx = LayerContext(start_A=A.clone(), start_B=torch.zeros(N, D, R, dtype=f64))
    dlora = algorithms.get("dlora").mix(A, B, ring())
    r0 = fedrot(reference=reference).mix(A, B, ring(), round_=0, context=ctx)
    assert torch.equal(r0.A, dlora.A) and torch.equal(r0.B, dlora.B)
    r2 = fedrot(reference=reference).mix(A, B, ring(), round_=2, context=ctx)  # aligns B, which is zero
    assert torch.isfinite(r2.A).all() and torch.isfinite(r2.B).all()
    torch.testing.assert_close(r2.A, dlora.A, atol=1e-14, rtol=0)
    assert (r2.stats["rotation_distance"] == 0).all()
    assert r2.stats["identity_fallbacks"].tolist() == [3.0 if reference == "own-start" else 2.0] * N


def test_fedrot_treats_numerically_orthogonal_factors_as_zero_cross_gram(gen):
    """B_j spanning directions orthogonal to the receiver's B: M is rounding noise, so R = I, not its SVD basis."""
    A, B = randn(gen, N, R, K), torch.zeros(N, D, R, dtype=f64)
    B[::2, :R] = randn(gen, 3, R, R)  # even agents live in the first three coordinates of R^d
    B[1::2, R : 2 * R] = randn(gen, 2, R, R)  # odd agents in the next three
    B = B + 1e-12 * randn(gen, N, D, R)
    W = torch.tensor(
        [[0.5, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5, 0], [0, 0, 0, 0, 1]]
    )
    out = fedrot(reference="receiver").mix(A, B, W.to(f64), round_=2)
    assert out.stats["identity_fallbacks"].tolist() == [1, 1, 1, 1, 0]
    assert (out.stats["rotation_distance"] == 0).all()


def test_fedrot_directions_the_reference_lacks_are_completed_toward_the_identity(gen):
    """The receiver's B has rank 2 (its columns miss a direction v of the rank space), so M = B_j^T B_i fixes R only
    up to the sign of R v: the maximizer closest to the identity is taken (v^T R v >= 0), never whichever sign the
    SVD happened to return."""
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    v = torch.nn.functional.normalize(randn(gen, N, R, 1), dim=1)
    own_B = B - (B @ v) @ v.mT  # B_i v = 0
    W, self_index = one_hot_rows()
    out = fedrot(reference="receiver").mix(torch.cat([A, A]), torch.cat([own_B, B]), W, round_=2, self_index=self_index)
    nxt = (torch.arange(N) + 1) % N
    rot = torch.linalg.lstsq(B[nxt], out.B).solution  # B_j R = B_out
    torch.testing.assert_close(rot.mT @ rot, torch.eye(R, dtype=f64).expand(N, R, R), atol=1e-10, rtol=0)
    M = B[nxt].mT @ own_B
    objective = (rot * M).sum((-2, -1))  # tr(R^T M) is at its maximum, the nuclear norm of M
    torch.testing.assert_close(objective, torch.linalg.matrix_norm(M, "nuc"), atol=1e-10, rtol=0)
    assert ((v.mT @ rot @ v).flatten() >= 0).all()


def test_fedrot_own_start_with_a_common_start_is_the_senders_rotation_then_dlora(gen):
    """G1 as specified: each sender rotates its own factors toward its own start, receivers average. When all agents
    start the round from the same factors, the receiver-side form computes exactly that."""
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    start_A, start_B = randn(gen, R, K), randn(gen, D, R)
    for round_, factor in ((1, "A"), (2, "B")):
        rotated_A, rotated_B = [], []
        for j in range(N):
            M = A[j] @ start_A.T if factor == "A" else B[j].T @ start_B
            Rot = torch.from_numpy(np_polar(M.numpy(), special=False))
            rotated_A.append(Rot.T @ A[j])
            rotated_B.append(B[j] @ Rot)
        g1 = algorithms.get("dlora").mix(torch.stack(rotated_A), torch.stack(rotated_B), ring())
        ctx = LayerContext(start_A=start_A.expand(N, R, K), start_B=start_B.expand(N, D, R))
        out = fedrot().mix(A, B, ring(), round_=round_, context=ctx)
        torch.testing.assert_close(out.A, g1.A, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.B, g1.B, atol=1e-12, rtol=0)


def test_fedrot_heterogeneous_ranks_align_within_the_receivers_live_block(gen):
    """All agents rank 2 in width-3 storage: gauge copies inside the live block are aligned exactly, padding stays 0."""
    base_A = torch.cat([randn(gen, 2, K), torch.zeros(1, K, dtype=f64)])
    base_B = torch.cat([randn(gen, D, 2), torch.zeros(D, 1, dtype=f64)], 1)
    Q = torch.eye(R, dtype=f64).repeat(N, 1, 1)
    Q[:, :2, :2] = orthogonal(gen, N, r=2)
    A, B = Q.mT @ base_A, base_B @ Q
    out = fedrot(reference="receiver").mix(A, B, ring(), round_=1, ranks=[2] * N)
    torch.testing.assert_close(out.B @ out.A, (base_B @ base_A).expand(N, D, K), atol=1e-10, rtol=0)
    assert (out.A[:, 2] == 0).all() and (out.B[:, :, 2] == 0).all()


def test_fedrot_rank_2_receiver_never_rotates_a_neighbours_third_direction_into_its_block(gen):
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    W, self_index = one_hot_rows()
    ranks = torch.tensor([2, 3, 2, 3, 2])
    out = fedrot(reference="receiver").mix(
        torch.cat([A, A]), torch.cat([B, B]), W, round_=2, self_index=self_index, ranks=ranks
    )
    nxt = (torch.arange(N) + 1) % N
    for i in range(N):
        r_i = int(ranks[i])
        assert (out.B[i, :, r_i:] == 0).all() and (out.A[i, r_i:] == 0).all()
        # the live columns are an orthogonal recombination of the neighbour's first r_i columns only
        rot = torch.linalg.lstsq(B[nxt[i], :, :r_i], out.B[i, :, :r_i]).solution
        torch.testing.assert_close(B[nxt[i], :, :r_i] @ rot, out.B[i, :, :r_i], atol=1e-10, rtol=0)
        torch.testing.assert_close(rot.mT @ rot, torch.eye(r_i, dtype=f64), atol=1e-10, rtol=0)


def test_fedrot_needs_start_factors_only_for_the_own_start_reference():
    assert type(fedrot()).needs == frozenset({"start_factors"})
    assert fedrot().needs == frozenset({"start_factors"})
    assert fedrot(reference="receiver").needs == frozenset()


def test_fedrot_errors_name_the_fix(gen):
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    with pytest.raises(ShapeError, match=r"needs context.start_A .* or use reference='receiver'"):
        fedrot().mix(A, B, ring(), round_=1)
    with pytest.raises(ShapeError, match=r"context.start_A has shape \(2, 3, 6\); it must be \(5, 3, 6\)"):
        fedrot().mix(A, B, ring(), round_=1, context=LayerContext(start_A=A[:2], start_B=B))
    with pytest.raises(DecafError, match=r"group='O' with lam=0.5 .* use group='SO'"):
        fedrot(group="O", lam=0.5)
    with pytest.raises(DecafError, match=r"lam"):
        fedrot(lam=1.5)


# ---------------------------------------------------------------------------------------------------------- DIMAT


def np_corr(Zi, Zj, eps=1e-7):
    Zi, Zj = Zi - Zi.mean(0), Zj - Zj.mean(0)
    cov = Zi.T @ Zj / len(Zi)
    outer = np.outer(np.sqrt((Zi**2).mean(0)), np.sqrt((Zj**2).mean(0)))
    return cov / np.maximum(outer, eps)


def best_signed_permutation(C, signed):
    """Brute force over all permutations: slot a takes direction sigma[a] with sign sign(C[a, sigma[a]])."""
    r = C.shape[0]
    score = np.abs(C) if signed else C
    sigma = max(itertools.permutations(range(r)), key=lambda s: sum(score[a, s[a]] for a in range(r)))
    sign = np.array([np.sign(C[a, sigma[a]]) if signed else 1.0 for a in range(r)])
    return np.array(sigma), sign


def dimat_reference(A, B, W, X, signed):
    A, B, W, X = (np.asarray(x, dtype=np.float64) for x in (A, B, W, X))
    A_out, B_out = np.zeros_like(A), np.zeros_like(B)
    cost, permuted = np.zeros(len(W)), np.zeros(len(W))
    for i in range(len(W)):
        costs = []
        for j in np.nonzero(W[i])[0]:
            sigma, sign = np.arange(A.shape[1]), np.ones(A.shape[1])
            if j != i:
                C = np_corr(X[i] @ A[i].T, X[i] @ A[j].T)
                sigma, sign = best_signed_permutation(C, signed)
                matched = C[np.arange(len(sigma)), sigma]
                costs.append(1 - (np.abs(matched) if signed else matched).mean())
                permuted[i] += (sigma != np.arange(len(sigma))).any() or (sign < 0).any()
            A_out[i] += W[i, j] * sign[:, None] * A[j][sigma]
            B_out[i] += W[i, j] * B[j][:, sigma] * sign
        cost[i] = np.mean(costs)
    return torch.from_numpy(A_out), torch.from_numpy(B_out), torch.from_numpy(cost), torch.from_numpy(permuted)


def dimat(**options):
    return algorithms.get("dimat", **options)


@pytest.mark.parametrize("signed", [True, False])
def test_dimat_matches_a_brute_force_float64_reference(gen, signed):
    A, B, X = randn(gen, N, R, K), randn(gen, N, D, R), randn(gen, N, 40, K)
    W = torch.from_numpy(Topology.build("complete", N).matrix)
    out = dimat(signed=signed).mix(A, B, W, context=LayerContext(scale=0.5, activations=X))
    A_ref, B_ref, cost, permuted = dimat_reference(A, B, W, X, signed)
    torch.testing.assert_close(out.A, A_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.B, B_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.stats["matching_cost"], cost, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.stats["neighbours_permuted"], permuted)
    assert permuted.sum() > 0  # random factors: the test exercises real permutations
    err = dense_cross_term_error(W, A, B, A_ref, B_ref, scale=0.5)
    torch.testing.assert_close(out.stats["cross_term_error"], err, atol=1e-10, rtol=1e-9)


def test_dimat_recovers_the_exact_average_of_signed_permuted_copies(gen):
    base_A, base_B = randn(gen, R, K), randn(gen, D, R)
    P = signed_permutations(gen, N)
    A, B = P.mT @ base_A, base_B @ P
    out = dimat().mix(A, B, ring(), context=LayerContext(activations=randn(gen, N, 32, K)))
    torch.testing.assert_close(out.B @ out.A, (base_B @ base_A).expand(N, D, K), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.A, A, atol=1e-12, rtol=0)  # every agent ends in its own frame
    assert (out.stats["matching_cost"] < 1e-12).all()
    assert (out.stats["cross_term_error"] < 1e-12).all()
    differs = [sum(not torch.equal(P[i], P[j]) for j in ((i - 1) % N, (i + 1) % N)) for i in range(N)]
    assert out.stats["neighbours_permuted"].tolist() == differs


def test_dimat_with_a_common_untrained_a_is_dlora_bit_for_bit(gen):
    A = randn(gen, R, K).expand(N, R, K).clone().float()
    for B in (torch.zeros(N, D, R), randn(gen, N, D, R).float()):
        out = dimat().mix(A, B, ring(), context=LayerContext(activations=randn(gen, N, 32, K).float()))
        dlora = algorithms.get("dlora").mix(A, B, ring())
        assert torch.equal(out.A, dlora.A) and torch.equal(out.B, dlora.B)
        assert (out.stats["neighbours_permuted"] == 0).all()


def test_dimat_keeps_dead_directions_in_place_and_ignores_padding_rows(gen):
    """A zero row of A is a zero-variance direction: no NaN, it stays in its slot; zero activation rows are padding."""
    base_A = torch.cat([randn(gen, 2, K), torch.zeros(1, K, dtype=f64)])
    base_B = randn(gen, D, R)
    P = torch.eye(R, dtype=f64).repeat(N, 1, 1)
    P[:, :2, :2] = signed_permutations(gen, N, r=2)
    A, B = P.mT @ base_A, base_B @ P
    X = randn(gen, N, 20, K)
    out = dimat().mix(A, B, ring(), context=LayerContext(activations=X))
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    assert (out.A[:, 2] == 0).all()
    torch.testing.assert_close(out.B[:, :, 2], ring() @ B[:, :, 2], atol=1e-12, rtol=0)  # averaged in place
    torch.testing.assert_close(out.B @ out.A, (base_B @ base_A).expand(N, D, K), atol=1e-12, rtol=0)
    padded = torch.cat([X, torch.zeros(N, 12, K, dtype=f64)], 1)
    again = dimat().mix(A, B, ring(), context=LayerContext(activations=padded))
    torch.testing.assert_close(again.A, out.A, atol=1e-12, rtol=0)
    torch.testing.assert_close(again.stats["matching_cost"], out.stats["matching_cost"], atol=1e-12, rtol=0)


def test_dimat_heterogeneous_ranks_match_only_the_receivers_live_slots(gen):
    base_A, base_B = randn(gen, R, K), randn(gen, D, R)
    P = signed_permutations(gen, N)
    A, B = P.mT @ base_A, base_B @ P
    ranks = torch.tensor([2, 3, 2, 3, 3])
    A = A * (torch.arange(R)[None, :, None] < ranks[:, None, None])
    B = B * (torch.arange(R)[None, None, :] < ranks[:, None, None])
    out = dimat().mix(A, B, ring(), ranks=ranks, context=LayerContext(activations=randn(gen, N, 32, K)))
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    for i in range(N):
        assert (out.A[i, int(ranks[i]) :] == 0).all() and (out.B[i, :, int(ranks[i]) :] == 0).all()


def test_dimat_breaks_ties_toward_the_identity():
    """Correlations that differ by less than the identity bonus (e.g. rounding noise on dead directions) do not
    permute; a real preference does."""
    sigma, sign = signed_assignment(np.array([[0.0, 1e-9], [1e-9, 0.0]]), 2, signed=True)
    assert sigma.tolist() == [0, 1] and sign.tolist() == [1, 1]
    sigma, sign = signed_assignment(np.array([[0.1, -0.9], [0.8, 0.2]]), 2, signed=True)
    assert sigma.tolist() == [1, 0] and sign.tolist() == [-1, 1]


def test_dimat_with_fewer_than_two_samples_does_not_permute(gen):
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    X = torch.zeros(N, 8, K, dtype=f64)
    X[:, 0] = randn(gen, N, K)
    out = dimat().mix(A, B, ring(), context=LayerContext(activations=X))
    dlora = algorithms.get("dlora").mix(A, B, ring())
    assert torch.equal(out.A, dlora.A) and (out.stats["neighbours_permuted"] == 0).all()


def test_dimat_errors_name_the_fix(gen):
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    with pytest.raises(ShapeError, match=r"dimat needs context.activations"):
        dimat().mix(A, B, ring())
    with pytest.raises(ShapeError, match=r"context.activations has shape \(5, 8, 4\); it must be \(5, samples, 6\)"):
        dimat().mix(A, B, ring(), context=LayerContext(activations=torch.zeros(5, 8, 4)))


# ----------------------------------------------------------------------------------- both, with non-default options

VARIANTS = [
    ("fedrot-lora", {}),
    ("fedrot-lora", {"reference": "receiver"}),
    ("fedrot-lora", {"lam": 0.5}),
    ("fedrot-lora", {"group": "SO", "first_align": "B", "skip_round0": False}),
    ("dimat", {}),
    ("dimat", {"signed": False}),
]


def full_context(gen, n, dtype=f64):
    """Start factors and activations for every agent; a call's context takes the rows of its output agents."""
    return randn(gen, n, R, K).to(dtype), randn(gen, n, D, R).to(dtype), randn(gen, n, 16, K).to(dtype)


@pytest.mark.parametrize("name, options", VARIANTS)
def test_a_rank_with_some_agents_computes_the_same_rows_as_the_simulator(gen, name, options):
    algo = algorithms.get(name, **options)
    n = 8
    A, B = randn(gen, n, R, K), randn(gen, n, D, R)
    sA, sB, X = full_context(gen, n)
    W = torch.from_numpy(Topology.build("ring", n).matrix)
    own, stack = [2, 3], [2, 3, 1, 4]
    for round_ in range(4):
        full = algo.mix(A, B, W, round_=round_, context=LayerContext(start_A=sA, start_B=sB, activations=X))
        ctx = LayerContext(start_A=sA[own], start_B=sB[own], activations=X[own])
        part = algo.mix(A[stack], B[stack], W[own][:, stack], round_=round_, self_index=[0, 1], context=ctx)
        torch.testing.assert_close(part.A, full.A[own], atol=1e-12, rtol=0)
        torch.testing.assert_close(part.B, full.B[own], atol=1e-12, rtol=0)
        for key, value in part.stats.items():
            torch.testing.assert_close(value, full.stats[key][own], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name, options", VARIANTS)
def test_options_keep_bfloat16_shapes_finite_values_and_identity_mixing(gen, name, options):
    algo = algorithms.get(name, **options)
    A, B = randn(gen, N, R, K), randn(gen, N, D, R)
    sA, sB, X = full_context(gen, N)
    for round_ in range(3):
        ctx = LayerContext(start_A=sA.bfloat16(), start_B=sB.bfloat16(), activations=X.float())
        out = algo.mix(A.bfloat16(), B.bfloat16(), ring(), round_=round_, context=ctx)
        assert out.A.dtype == out.B.dtype == torch.bfloat16
        assert torch.isfinite(out.A.float()).all() and torch.isfinite(out.B.float()).all()
        assert set(out.stats) == set(type(algo).stats)
        same = algo.mix(
            A, B, torch.eye(N, dtype=f64), round_=round_, context=LayerContext(start_A=sA, start_B=sB, activations=X)
        )
        torch.testing.assert_close(same.B @ same.A, B @ A, atol=1e-10, rtol=0)
