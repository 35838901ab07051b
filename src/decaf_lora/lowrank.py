"""The exact truncated SVD of a weighted sum of low-rank products, without forming it.

DeCAF's consensus step needs ``TSVD_r(sum_j w_j B_j A_j)`` for every agent and every adapted layer. The sum has
rank at most ``m * r`` (m = neighbours + self), so stacking ``P = [w_1 B_1 ... w_m B_m]`` (d x mr) and
``Q = [A_1; ...; A_m]`` (mr x k) gives ``M = P Q``. With thin QR factorizations ``P = Q_P R_P`` and
``Q^T = Q_Q R_Q``, ``M = Q_P (R_P R_Q^T) Q_Q^T``, so the SVD of the small ``mr x mr`` core ``R_P R_Q^T = U' S V'^T``
gives the exact SVD of M: ``U = Q_P U'``, ``V = Q_Q V'``. Cost ``O((d + k)(mr)^2 + (mr)^3)`` instead of the
``O(d k min(d, k))`` of a dense SVD; the d x k matrix never exists.

This module is pure tensor code: no models, no agents. Everything is batched over leading dimensions, so one call
serves many layers (or many agents) at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShapeError, choice_error

SPLITS = ("all-into-b", "balanced")
GAUGES = ("none", "procrustes", "lstsq")
METHODS = ("auto", "householder", "qr")


@dataclass(frozen=True)
class TruncatedSVD:
    """``M ~= U diag(S) Vh``, the best rank-``rank`` approximation, plus what was thrown away.

    ``tail`` is ``||M - U diag(S) Vh||_F`` (the Frobenius norm of the discarded singular values), which
    Proposition 1 of the DeCAF paper bounds by ``sqrt((|N_b(i)| - 1) r) c^2``.
    """

    U: torch.Tensor  # (..., d, rank)
    S: torch.Tensor  # (..., rank), descending, >= 0
    Vh: torch.Tensor  # (..., rank, k)
    tail: torch.Tensor  # (...,)


def compute_dtype_for(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision inputs are always upcast (pitfall 6)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_rank(rank, limit: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ShapeError(f"rank={rank!r} is invalid; use an integer >= 1.")
    if rank > limit:
        raise ShapeError(f"rank={rank} exceeds {what}={limit}; use a rank <= {limit}.")
    return rank


def _stack(B: torch.Tensor, A: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and return ``P`` (..., d, m r) and ``Q^T`` (..., k, m r), both in the compute dtype."""
    if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
        raise ShapeError("B and A must be torch tensors of shapes (..., m, d, r) and (..., m, r, k).")
    if B.ndim < 3 or A.ndim != B.ndim:
        raise ShapeError(
            f"B has shape {tuple(B.shape)} and A has shape {tuple(A.shape)}; use B (..., m, d, r) and A (..., m, r, k) with the same leading dims."
        )
    if B.shape[:-2] != A.shape[:-2] or B.shape[-1] != A.shape[-2]:
        raise ShapeError(
            f"B {tuple(B.shape)} and A {tuple(A.shape)} do not fit: need B (..., m, d, r) and A (..., m, r, k) with equal '...', m and r."
        )
    if not (B.is_floating_point() and A.is_floating_point()):
        raise ShapeError(f"B and A must be floating point, got {B.dtype} and {A.dtype}.")
    weights = torch.as_tensor(weights, device=B.device)
    m = B.shape[-3]
    if weights.ndim == 0 or weights.shape[-1] != m:
        raise ShapeError(
            f"weights has shape {tuple(weights.shape)}; it must end in m={m} (one weight per stacked factor pair)."
        )
    dtype = compute_dtype_for(B, A)
    w = weights.to(dtype)
    # Both stacks come out column-major (a transposed view of a contiguous tensor): LAPACK's layout, so geqrf
    # and ormqr need no transposing copies.
    Pt = B.to(dtype).transpose(-2, -1) * w[..., :, None, None]  # (..., m, r, d) = P^T in blocks
    lead = torch.broadcast_shapes(Pt.shape[:-3], A.shape[:-3])
    d, r, k = B.shape[-2], B.shape[-1], A.shape[-1]
    P = Pt.expand(*lead, m, r, d).reshape(*lead, m * r, d).transpose(-2, -1)
    Qt = A.to(dtype).expand(*lead, m, r, k).reshape(*lead, m * r, k).transpose(-2, -1)
    return P, Qt


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[-1] >= width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _embed_rows(x: torch.Tensor, height: int) -> torch.Tensor:
    """``x`` (..., h, c) as the top rows of a zero (..., height, c) matrix, column-major for ormqr."""
    out = x.new_zeros(*x.shape[:-2], x.shape[-1], height).transpose(-2, -1)
    out[..., : x.shape[-2], :] = x
    return out


#: Above this many elements per stacked matrix, batched LAPACK calls lose to a loop over the batch on CPU
#: (the batch is copied into column-major blocks that no longer fit in cache); below it, batching wins.
#: Measured by ``benchmarks/bench_tsvd.py`` (section "batching").
LOOP_ABOVE_ELEMENTS = 1 << 16


def _resolve_method(method: str) -> str:
    if method not in METHODS:
        raise choice_error(ShapeError, "method", method, METHODS)
    # Householder QR (geqrf) + ormqr never forms Q: fewest flops and fastest on CPU (benchmarks/bench_tsvd.py).
    return "householder" if method == "auto" else method


def _factored_svd(P: torch.Tensor, Qt: torch.Tensor, rank: int, how: str) -> tuple[torch.Tensor, ...]:
    """SVD of ``P Qt^T`` from the QRs of P (b, d, q) and Qt (b, k, q); returns U, all singular values, V."""
    d, k, q = P.shape[-2], Qt.shape[-2], P.shape[-1]
    pd, pk = min(d, q), min(k, q)
    if how == "householder":
        aP, tP = torch.geqrf(P)
        aQ, tQ = torch.geqrf(Qt)
        RP, RQ = torch.triu(aP[..., :pd, :]), torch.triu(aQ[..., :pk, :])
    else:
        QP, RP = torch.linalg.qr(P, mode="reduced")
        QQ, RQ = torch.linalg.qr(Qt, mode="reduced")
    Uc, S, Vhc = torch.linalg.svd(RP @ RQ.transpose(-2, -1), full_matrices=False)  # the small (pd, pk) core
    Uc, Vc = Uc[..., :rank], Vhc[..., :rank, :].transpose(-2, -1)
    if how == "householder":
        return torch.ormqr(aP, tP, _embed_rows(Uc, d)), S, torch.ormqr(aQ, tQ, _embed_rows(Vc, k))
    return QP @ Uc, S, QQ @ Vc


def truncated_svd_of_sum(B: torch.Tensor, A: torch.Tensor, weights, rank: int, *, method: str = "auto") -> TruncatedSVD:
    """Exact top-``rank`` SVD of ``sum_j weights_j B_j A_j``, batched over leading dimensions.

    Args:
        B: (..., m, d, r) left factors. A: (..., m, r, k) right factors. weights: (..., m) or (m,) mixing weights.
        rank: how many singular triplets to keep; at most ``min(d, k)``. It may exceed ``m r`` (the most the sum
            can have): the extra singular values are 0 and their vectors still orthonormal, so a split that puts
            all of S into B keeps A's rows alive.
        method: ``householder`` (geqrf + ormqr, Q never formed), ``qr`` (``torch.linalg.qr``), or ``auto``.

    Computation happens in float64 if any input is float64, else float32 (bf16/fp16 are upcast); results are in
    that dtype. All-zero or rank-deficient sums give zero singular values, never NaN.
    """
    P, Qt = _stack(B, A, weights)
    lead, d, k, mr = P.shape[:-2], P.shape[-2], Qt.shape[-2], P.shape[-1]
    rank = _check_rank(rank, min(d, k), "min(d, k)")
    how = _resolve_method(method)
    q = max(mr, rank)
    # Zero columns complete the basis: Householder QR keeps Q orthogonal, so surplus directions come out orthonormal.
    P, Qt = _pad_columns(P, q).reshape(-1, d, q), _pad_columns(Qt, q).reshape(-1, k, q)
    if P.shape[0] > 1 and P.device.type == "cpu" and max(d, k) * q > LOOP_ABOVE_ELEMENTS:
        parts = [_factored_svd(P[i : i + 1], Qt[i : i + 1], rank, how) for i in range(P.shape[0])]
        U, S, V = (torch.cat(x) for x in zip(*parts))
    else:
        U, S, V = _factored_svd(P, Qt, rank, how)
    tail = torch.linalg.vector_norm(S[..., rank:], dim=-1)
    return TruncatedSVD(
        U.reshape(*lead, d, rank),
        S[..., :rank].reshape(*lead, rank),
        V.transpose(-2, -1).reshape(*lead, rank, k),
        tail.reshape(lead),
    )


def split_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, policy: str = "all-into-b"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``U diag(S) Vh`` into LoRA factors ``(B, A)`` with ``B A = U diag(S) Vh``.

    ``all-into-b``: ``B = U S``, ``A = Vh`` (FlexLoRA's convention). A keeps orthonormal rows even where S is 0, so
    no direction can die (pitfall 1 of the paper notes). ``balanced``: ``B = U sqrt(S)``, ``A = sqrt(S) Vh``; equal
    factor norms, but a zero singular value zeroes both factors of that direction for good.
    """
    if policy == "all-into-b":
        return U * S[..., None, :], Vh
    if policy == "balanced":
        root = S.clamp_min(0).sqrt()
        return U * root[..., None, :], root[..., :, None] * Vh
    raise choice_error(ShapeError, "split", policy, SPLITS)


def _procrustes(B_new, A_new, B_old, A_old) -> torch.Tensor:
    """Orthogonal R maximizing alignment of ``B_new R`` with ``B_old`` and ``R^T A_new`` with ``A_old``.

    Each factor's cross-Gram is normalized by its old factor's squared norm, so a tiny B (early training, or
    B = 0 at start) hands the decision to A instead of being swamped or dividing by zero.
    """
    tiny = torch.finfo(B_new.dtype).tiny ** 0.5
    nb = B_old.pow(2).sum((-2, -1), keepdim=True)
    na = A_old.pow(2).sum((-2, -1), keepdim=True)
    cross = B_new.transpose(-2, -1) @ B_old * torch.where(nb > tiny, 1 / nb.clamp_min(tiny), 0.0)
    cross = cross + A_new @ A_old.transpose(-2, -1) * torch.where(na > tiny, 1 / na.clamp_min(tiny), 0.0)
    X, _, Yh = torch.linalg.svd(cross)
    return X @ Yh


def regauge(
    B_new, A_new, B_old, A_old, method: str = "procrustes", max_condition: float = 1e4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express ``(B_new, A_new)`` as ``(B_new G, G^-1 A_new)``, close to the previous factors; ``B A`` is unchanged.

    An SVD returns its factors in a fresh basis (arbitrary signs and rotations within equal singular values), so
    right after DeCAF's consensus B can change by 100% and A by several hundred percent while the product barely
    moves, scrambling per-coordinate optimizer state. An r x r change of basis fixes that at negligible cost.

    ``procrustes``: G orthogonal (keeps the split's factor norms), aligning both B and A. ``lstsq``: G the
    least-squares map ``B_new G ~= B_old``; where it is ill-conditioned (condition number above
    ``max_condition``, e.g. B_old near 0), that batch entry falls back to ``procrustes``. ``none``: unchanged.
    Shapes: B (..., d, r), A (..., r, k); batched over '...'.
    """
    if method == "none":
        return B_new, A_new
    if method not in GAUGES:
        raise choice_error(ShapeError, "gauge", method, GAUGES)
    if B_new.shape != B_old.shape or A_new.shape != A_old.shape:
        raise ShapeError(
            f"regauge needs new and old factors of equal shapes, got B {tuple(B_new.shape)} vs {tuple(B_old.shape)} and A {tuple(A_new.shape)} vs {tuple(A_old.shape)}."
        )
    dtype = compute_dtype_for(B_new, A_new, B_old, A_old)
    Bn, An, Bo, Ao = (t.to(dtype) for t in (B_new, A_new, B_old, A_old))
    R = _procrustes(Bn, An, Bo, Ao)
    B_out, A_out = Bn @ R, R.transpose(-2, -1) @ An
    if method == "lstsq":
        gram = Bn.transpose(-2, -1) @ Bn
        G = torch.linalg.lstsq(gram, Bn.transpose(-2, -1) @ Bo).solution
        cond = torch.linalg.cond(G)
        ok = torch.isfinite(cond) & (cond < max_condition)
        if bool(ok.any()):
            Gs = torch.where(ok[..., None, None], G, torch.eye(G.shape[-1], dtype=dtype, device=G.device))
            B_ls, A_ls = Bn @ Gs, torch.linalg.solve(Gs, An)
            B_out = torch.where(ok[..., None, None], B_ls, B_out)
            A_out = torch.where(ok[..., None, None], A_ls, A_out)
    return B_out.to(B_new.dtype), A_out.to(A_new.dtype)
