"""The exact truncated SVD of a weighted sum of low-rank products, without forming it.

DeCAF's consensus step needs ``TSVD_r(sum_j w_j B_j A_j)`` for every agent and every adapted layer. The sum has
rank at most ``m * r`` (m = neighbours + self), so stacking ``P = [w_1 B_1 ... w_m B_m]`` (d x mr) and
``Q = [A_1; ...; A_m]`` (mr x k) gives ``M = P Q``. Any square roots ``R_P``, ``R_Q`` with ``P = Q_P R_P`` and
``Q^T = Q_Q R_Q`` (Q_P, Q_Q orthonormal columns) give ``M = Q_P (R_P R_Q^T) Q_Q^T``, so the SVD of a small
``mr x mr`` core gives the exact SVD of M. Cost ``O((d + k)(mr)^2 + (mr)^3)`` instead of the ``O(d k min(d, k))`` of
a dense SVD; the d x k matrix never exists. Two ways to get the roots:

* ``householder`` / ``qr``: thin QR factorizations of the stacks (backward stable, orthonormal by construction).
* ``gram``: the ``mr x mr`` Gram matrices ``P^T P`` (blocks ``w_i w_j B_i^T B_j``) and ``Q Q^T`` (blocks
  ``A_i A_j^T``) from one batched matrix product each, everything small in float64, and U, Vh from one thin product
  each (CholeskyQR-style). Fewer passes over the factors and all of them matrix products, but a Gram squares the
  condition number; see :func:`_gram_core` for how each result is certified and when it is redone in float64.

This module is pure tensor code: no models, no agents. Everything is batched over leading dimensions, so one call
serves many layers (or many agents) at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ShapeError, choice_error

SPLITS = ("all-into-b", "balanced")
GAUGES = ("none", "procrustes", "lstsq")
METHODS = ("auto", "householder", "qr", "gram")


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

    def __iter__(self):
        """``U, S, Vh = truncated_svd_of_sum(...)`` unpacks like ``torch.linalg.svd``; ``tail`` stays an attribute."""
        return iter((self.U, self.S, self.Vh))


def compute_dtype_for(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision inputs are always upcast (pitfall 6)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_rank(rank, limit: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ShapeError(f"rank={rank!r} is invalid; use an integer >= 1.")
    if rank > limit:
        raise ShapeError(f"rank={rank} exceeds {what}={limit}; use a rank <= {limit}.")
    return rank


def _check_inputs(B: torch.Tensor, A: torch.Tensor, weights) -> torch.Tensor:
    """Validate shapes and dtypes; return the weights as a tensor on B's device."""
    if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
        raise ShapeError("B and A must be torch tensors of shapes (..., m, d, r) and (..., m, r, k).")
    if B.ndim < 3 or A.ndim != B.ndim:
        raise ShapeError(
            f"B has shape {tuple(B.shape)} and A has shape {tuple(A.shape)}; "
            "use B (..., m, d, r) and A (..., m, r, k) with the same leading dims."
        )
    if B.shape[:-2] != A.shape[:-2] or B.shape[-1] != A.shape[-2]:
        raise ShapeError(
            f"B {tuple(B.shape)} and A {tuple(A.shape)} do not fit: "
            "need B (..., m, d, r) and A (..., m, r, k) with equal '...', m and r."
        )
    if not (B.is_floating_point() and A.is_floating_point()):
        raise ShapeError(f"B and A must be floating point, got {B.dtype} and {A.dtype}.")
    weights = torch.as_tensor(weights, device=B.device)
    m = B.shape[-3]
    if weights.ndim == 0 or weights.shape[-1] != m:
        raise ShapeError(
            f"weights has shape {tuple(weights.shape)}; it must end in m={m} (one weight per stacked factor pair)."
        )
    return weights


def _stack(B: torch.Tensor, A: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and return ``P`` (..., d, m r) and ``Q^T`` (..., k, m r), both in the compute dtype."""
    return _stack_checked(B, A, _check_inputs(B, A, weights))


def _stack_checked(B: torch.Tensor, A: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = B.shape[-3]
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

#: ``auto`` picks ``gram`` on CPU for float32 (or half-precision) inputs when the call's work
#: ``batch * (d + k) * (m r)^2`` is at least this; below it the Gram path's fixed cost (a few dozen small float64
#: steps) outweighs what its matrix products save over the QRs. Measured by ``benchmarks/bench_tsvd.py`` (section
#: "auto"); see :func:`_resolve_method`.
GRAM_ABOVE_WORK = 1 << 24

#: A Gram result is kept when its first-order error bound on every returned singular value is at most this, relative
#: to the largest, per result dtype: for float32 the accuracy the factored TSVD promises (the Householder path's own
#: float32 error is about 1e-6 on random inputs, ``benchmarks/bench_tsvd.py`` section "inputs"); for float64 a bound
#: the squared condition number lets a float64 Gram meet only on well-conditioned inputs (Householder: about 1e-15).
GRAM_CERTIFY = {torch.float32: 1e-5, torch.float64: 1e-12}

#: Gram-path U and Vh are kept when their predicted departure from orthonormality is at most this many unit
#: roundoffs of the result dtype (2.4e-4 in float32, 4.5e-13 in float64); the rest, typically directions whose
#: singular value is near the rounding level, take Householder vectors.
GRAM_ORTHONORMAL = 2**12


def _float32_matmul_is_ieee(device: torch.device) -> bool:
    """Whether float32 matrix products round in float32; TF32 or bf16 modes would void the Gram rounding bound."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(backend, "fp32_precision", "none") in ("none", "ieee")


def _resolve_method(
    method: str, *, device: torch.device, dtype: torch.dtype, batch: int, d: int, k: int, mr: int, rank: int
) -> str:
    """The path ``auto`` takes for ``batch`` sums of shape (d, k, m r), decided by measurement.

    ``gram`` where it is faster: on CPU, for float32 work ``batch (d + k) (m r)^2`` of at least ``GRAM_ABOVE_WORK``
    (``benchmarks/bench_tsvd.py``, section "auto", gives Gram / Householder per shape; at LLaMA-7B's 64 layers of
    4096 x 4096, m = 3, r = 8, see ``docs/benchmarks.md``). Its float32 pass certifies typical inputs there, random
    and near-consensus alike; entries it cannot certify are redone in float64, so it stays accurate, only slower.
    ``householder`` (geqrf + ormqr, Q never formed) everywhere else: below that work; for a rank above ``m r`` or a
    stack wider than it is tall (structural zero singular values, whose vectors Householder completes for free);
    float64 inputs (no float32 pass to gain from); reduced-precision float32 matmul modes (TF32, bf16) that void the
    Gram's rounding model; and devices other than the CPU, where it has not been measured yet.
    """
    if method not in METHODS:
        raise choice_error(ShapeError, "method", method, METHODS)
    if method != "auto":
        return method
    gram = (
        device.type == "cpu"
        and dtype == torch.float32
        and rank <= mr <= min(d, k)
        and batch * (d + k) * mr * mr >= GRAM_ABOVE_WORK
        and _float32_matmul_is_ieee(device)
    )
    return "gram" if gram else "householder"


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


def _qr_svd(B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, rank: int, how: str) -> tuple[torch.Tensor, ...]:
    """The QR paths on checked inputs, flattened over the leading dims: U (b, d, rank), all singular values (b, s),
    Vh (b, rank, k)."""
    P, Qt = _stack_checked(B, A, w)
    d, k, mr = P.shape[-2], Qt.shape[-2], P.shape[-1]
    q = max(mr, rank)
    # Zero columns complete the basis: Householder QR keeps Q orthogonal, so surplus directions come out orthonormal.
    P, Qt = _pad_columns(P, q).reshape(-1, d, q), _pad_columns(Qt, q).reshape(-1, k, q)
    if P.shape[0] > 1 and P.device.type == "cpu" and max(d, k) * q > LOOP_ABOVE_ELEMENTS:
        parts = [_factored_svd(P[i : i + 1], Qt[i : i + 1], rank, how) for i in range(P.shape[0])]
        U, S, V = (torch.cat(x) for x in zip(*parts))
    else:
        U, S, V = _factored_svd(P, Qt, rank, how)
    return U, S, V.transpose(-2, -1)


# --- the Gram path -------------------------------------------------------------------------------------------------


def _gram_rounding(dtype: torch.dtype, n: int) -> float:
    """``g`` with ``|fl(X X^T) - X X^T|_ab <= g |x_a| |x_b|`` for rows of n entries computed in ``dtype``.

    ``sqrt(n) u`` (u the unit roundoff) is the probabilistic bound of Higham and Mary (2019), which holds for any
    summation order a BLAS may choose; it is floored at ``16 u`` because for short rows it has no slack left (MKL's
    sgemm measured 7.0 u at n = 64). For long rows it is pessimistic (4.7 u measured at n = 4096 against 64 u), so
    certificates built on it err on the safe side. Measured by ``benchmarks/bench_tsvd.py``, section
    "gram rounding".
    """
    return torch.finfo(dtype).eps / 2 * max(math.sqrt(n), 16.0)


@dataclass(frozen=True)
class _Root:
    """``R`` with ``R^T R = G`` on the numerically nonzero directions, its pseudo-inverse, and what was dropped.

    The rows of R are the coordinates of the core; ``keep`` marks the rows that carry a direction of P.
    """

    R: torch.Tensor  # (b, q, q)
    pinv: torch.Tensor  # (b, q, q), R^+ (zero columns where a row was dropped)
    keep: torch.Tensor  # (b, q) bool
    dropped: torch.Tensor | None  # (b, q) an upper bound on each dropped direction's true eigenvalue, 0 where kept
    vectors: torch.Tensor | None  # (b, q, q) columns D h_j: the dropped directions in unscaled coordinates
    any_dropped: bool  # whether any entry took the eigen-decomposition (only those can drop directions)


def _scaled_root(G: torch.Tensor, g: float) -> _Root:
    """A square root of the Gram ``G`` from its unit-diagonal scaling ``H = D^+ G D^+`` (D the column norms).

    Scaling first makes the threshold scale-free: with entrywise rounding ``g |x_a| |x_b|`` the scaled Gram is off by
    at most g per entry, so eigenvalues of H at or below ``tau = q g`` are indistinguishable from zero and are
    dropped (a pseudo-inverse) instead of amplified into noise. Zero columns (B = 0, a zero weight) have D = 0 and
    drop out exactly: H gets a 1 on their diagonal, which R's zero column then multiplies away.

    Cholesky (``R = L^T D``) serves every entry whose smallest eigenvalue is certified above tau by
    ``lambda_min(H) >= 1 / ||L^-1||_F^2``; only the others pay for an eigen-decomposition, whose small eigenvalues
    are then dropped.
    """
    q = G.shape[-1]
    tau = q * g
    D = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    Dinv = torch.where(D > 0, D.reciprocal(), 0.0)
    H = G * (Dinv[..., :, None] * Dinv[..., None, :])
    H.diagonal(dim1=-2, dim2=-1).masked_fill_(D == 0, 1.0)
    L, info = torch.linalg.cholesky_ex(H)
    eye = torch.eye(q, dtype=G.dtype, device=G.device)
    Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    chol = (info == 0) & (Linv.pow(2).sum((-2, -1)) * tau < 1)
    root = _Root(L.mT * D[..., None, :], Dinv[..., :, None] * Linv.mT, D > 0, None, None, False)
    return root if bool(chol.all()) else _eigen_root(root, (~chol).nonzero().squeeze(-1), H, D, tau)


def _eigen_root(root: _Root, eig: torch.Tensor, H: torch.Tensor, D: torch.Tensor, tau: float) -> _Root:
    """``root`` with the entries ``eig`` redone from an eigen-decomposition of H; eigenvalues <= tau are dropped."""
    lam, h = torch.linalg.eigh(H[eig])
    De, Dinv = D[eig], torch.where(D[eig] > 0, D[eig].reciprocal(), 0.0)
    kept = (lam > tau) & (h.pow(2) * (De > 0)[..., :, None]).sum(-2).gt(0.5)  # not an identity-padded column
    lam_k = lam.clamp_min(tau)
    R = torch.where(kept, lam_k.sqrt(), 0.0)[..., :, None] * h.mT * De[..., None, :]
    pinv = Dinv[..., :, None] * h * torch.where(kept, lam_k.rsqrt(), 0.0)[..., None, :]
    return _Root(
        root.R.index_copy(0, eig, R),
        root.pinv.index_copy(0, eig, pinv),
        root.keep.index_copy(0, eig, kept),
        torch.zeros_like(D).index_copy(0, eig, torch.where(kept, 0.0, tau + lam.abs())),
        torch.zeros_like(H).index_copy(0, eig, De[..., :, None] * h),
        True,
    )


@dataclass(frozen=True)
class _GramCore:
    """One thin product each turns these into U and Vh; plus the certificates that decide whether to trust them."""

    TP: torch.Tensor  # (b, q, rank): U = P0 TP, P0 = [B_1 ... B_m] unweighted (the weights are folded in)
    TQ: torch.Tensor  # (b, q, rank): Vh = TQ^T Q
    S: torch.Tensor  # (b, max(q, rank)), descending; exact zeros where indistinguishable from zero
    err: torch.Tensor  # (b,) bound on the error of the returned singular values, absolute
    orth: torch.Tensor  # (b,) predicted departure of U's and V's columns from orthonormality
    dead: torch.Tensor  # (b,) some returned direction has singular value 0: its vectors need completing


def _gram_core(GB: torch.Tensor, GQ: torch.Tensor, ww: torch.Tensor, rank: int, gP: float, gQ: float, u: float):
    """The small steps, all in float64: from ``GB = P0^T P0`` and ``GQ = Q Q^T`` (b, q, q) to coefficients.

    ``R_P`` is the scaled root of ``G_P = W GB W`` (W = diag(ww), the weight of each stacked column). The core
    ``K = R_P G_Q R_P^T = X diag(S^2) X^T`` gives ``U = P R_P^+ X`` and ``V = Q^T R_P^T X S^+``. Its eigenvalues are
    squared singular values, so with float64 arithmetic the core itself is accurate to ``1e-8`` relative to S_1.
    The risk is the Gram's own rounding (``gP``, ``gQ``, see :func:`_gram_rounding`): :func:`_sv2_error` bounds its
    effect on each ``S_i^2``, and ``S_i^2`` at or below that bound is set to exactly 0.
    """
    q = GB.shape[-1]
    n = min(rank, q)
    GP = GB * (ww[..., :, None] * ww[..., None, :])
    root = _scaled_root(GP, gP)
    s2, X = torch.linalg.eigh(root.R @ GQ @ root.R.mT)  # reads the lower triangle only: no need to symmetrize
    s2, X = s2.flip(-1).clamp_min(0), X.flip(-1)
    Y = root.R.mT @ X  # column i: y_i = P^T u_i
    DP2, DQ2 = GP.diagonal(dim1=-2, dim2=-1), GQ.diagonal(dim1=-2, dim2=-1)  # squared column norms of P and Q^T
    e = _sv2_error(GQ, Y, s2, DP2, DQ2, gP, gQ)
    live = s2 > e
    S = torch.where(live, s2.sqrt(), 0.0)
    tiny = torch.finfo(torch.float64).tiny
    err = e[..., :n] / (2 * S[..., :n] + e[..., :n].sqrt()).clamp_min(tiny)  # e / 2 S_i, or sqrt(e) near S_i = 0
    if root.any_dropped:  # the Frobenius mass of M along dropped directions: sqrt(lam (D h)^T G_Q (D h)) at most
        quad = ((GQ @ root.vectors) * root.vectors).sum(-2).clamp_min(0)
        err = err + (root.dropped * quad).sum(-1, keepdim=True).sqrt()
    X, Y, kept = X[..., :n], Y[..., :n], live[..., :n]
    TP, TQ = root.pinv @ X, Y * torch.where(kept, S[..., :n].reciprocal(), 0.0)[..., None, :]
    return _GramCore(
        TP=_pad_columns(TP * ww[..., :, None], rank),
        TQ=_pad_columns(TQ, rank),
        S=_pad_columns(S, max(q, rank)),
        err=err.amax(-1),
        orth=_orthonormality(root, X, TP, TQ, DP2, DQ2, gP, gQ, u),
        dead=(~kept).any(-1) | (n < rank),
    )


def _sv2_error(GQ, Y, s2, DP2, DQ2, gP: float, gQ: float) -> torch.Tensor:
    """First-order bound on the error of each ``S_i^2`` (b, q) caused by rounding in the two Gram products.

    ``S_i^2`` moves by ``z^T E_P z + y^T E_Q y`` (``z = Q v_i``, ``y = P^T u_i``, E the Gram rounding), which is about
    ``gP |D_P z|^2 + gQ |D_Q y|^2`` for rounding errors of independent sign. Near-consensus stacks (agents' factors
    almost equal) are ill-conditioned but harmless, since their small directions of P meet small directions of Q, and
    the bound sees that; equal B's with different A's are not, and the bound sees that too. Plus the float64 core's
    own ``q eps S_1^2``.
    """
    q = Y.shape[-1]
    tiny = torch.finfo(torch.float64).tiny
    # |D_P z_i|^2 with z_i = Q v_i = G_Q y_i / S_i, capped by max(D_P)^2 ||Q||^2 where S_i is too small to divide by
    dz = (DP2[..., :, None] * (GQ @ Y).pow(2)).sum(-2) / s2.clamp_min(tiny)
    dz = dz.minimum(DP2.amax(-1, keepdim=True) * DQ2.sum(-1, keepdim=True))
    dy = (DQ2[..., :, None] * Y.pow(2)).sum(-2)
    return gP * dz + gQ * dy + q * torch.finfo(torch.float64).eps * s2[..., :1]


def _orthonormality(root: _Root, X, TP, TQ, DP2, DQ2, gP: float, gQ: float, u: float) -> torch.Tensor:
    """Predicted departure of U's and V's columns from orthonormality (b,), the largest over the columns.

    ``U^T U = TP^T G_P TP`` is the identity for the Gram used, so the Gram rounding shows through the pseudo-inverse
    as ``gP |D_P TP_i|^2`` (likewise for V; column-weighted, as in :func:`_sv2_error`: the unweighted
    ``||P||_F^2 |TP_i|^2`` would be m r times too pessimistic and send every entry to Householder); the thin output
    products add ``u sqrt(q) ||P||_F |TP_i|``; and ``X_i``'s mass on dropped directions is missing from U_i.
    """
    c = u * math.sqrt(TP.shape[-2])
    TP2, TQ2 = TP.pow(2), TQ.pow(2)
    orth = (
        gP * (DP2[..., :, None] * TP2).sum(-2)
        + gQ * (DQ2[..., :, None] * TQ2).sum(-2)
        + c * (DP2.sum(-1, keepdim=True) * TP2.sum(-2)).sqrt()
        + c * (DQ2.sum(-1, keepdim=True) * TQ2.sum(-2)).sqrt()
    )
    if root.any_dropped:
        orth = orth + (1 - (X.pow(2) * root.keep[..., :, None]).sum(-2)).abs()
    return orth.amax(-1)


@dataclass(frozen=True)
class _GramPass:
    U: torch.Tensor  # (b, d, rank)
    S: torch.Tensor  # (b, max(q, rank)) float64
    Vh: torch.Tensor  # (b, rank, k)
    certified: torch.Tensor  # (b,) the singular values are within GRAM_CERTIFY of the exact ones
    complete: torch.Tensor  # (b,) U and Vh have orthonormal columns / rows


def _gram_pass(B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, rank: int, dtype: torch.dtype, out: torch.dtype):
    """One Gram pass with products in ``dtype`` over flattened inputs B (b, m, d, r), A (b, m, r, k), w (b, m).

    The only d- or k-sized work is one copy of B into the stack ``P0^T`` (transposed, unweighted: the weights go
    into the small Gram), one Gram product per stack and one thin product per output; A is used in place.
    """
    b, m, d, r = B.shape
    k, q = A.shape[-1], m * r
    Pt = torch.empty((b, m, r, d), dtype=dtype, device=B.device)
    Pt.copy_(B.transpose(-2, -1))  # one pass: transpose and upcast together
    Pt = Pt.view(b, q, d)
    Qs = A.to(dtype).reshape(b, q, k)
    GB, GQ = (Pt @ Pt.mT).to(torch.float64), (Qs @ Qs.mT).to(torch.float64)
    ww = w.to(torch.float64).repeat_interleave(r, dim=-1)
    u = torch.finfo(dtype).eps / 2
    core = _gram_core(GB, GQ, ww, rank, _gram_rounding(dtype, d), _gram_rounding(dtype, k), u)
    U = (core.TP.to(dtype).mT @ Pt).mT  # (b, d, rank), column-major like the Householder path's
    Vh = core.TQ.to(dtype).mT @ Qs
    # A float32 Gram of entries whose squares are subnormal loses precision: redo those in float64.
    big = torch.finfo(dtype).tiny / torch.finfo(dtype).eps
    scale = torch.stack([GB.diagonal(dim1=-2, dim2=-1).amax(-1), GQ.diagonal(dim1=-2, dim2=-1).amax(-1)])
    representable = ((scale == 0) | (scale >= big)).all(0) & torch.isfinite(scale).all(0)
    certified = representable & (core.err <= GRAM_CERTIFY[out] * core.S[..., 0])
    complete = ~core.dead & (core.orth <= GRAM_ORTHONORMAL * torch.finfo(out).eps / 2)
    return _GramPass(U.to(out), core.S, Vh.to(out), certified, complete)


def _gram_svd(B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, rank: int, dtype: torch.dtype):
    """The Gram path: U (b, d, rank), all singular values (b, s), Vh (b, rank, k) in ``dtype``.

    A float32 pass first (unless the inputs are float64 or float32 matmuls run in reduced precision); entries it
    cannot certify are redone with the Gram accumulated in float64, and entries even that cannot certify (condition
    numbers near 1e8) take the Householder path. Entries whose directions need completing (zero singular values
    within the rank) or came out less than orthonormal take U and Vh from the Householder path, whose zero-padded
    QR completes them; their singular values stay the Gram's, exact zeros included.
    """
    first = dtype if dtype == torch.float64 or _float32_matmul_is_ieee(B.device) else torch.float64
    res = _gram_pass(B, A, w, rank, first, dtype)
    U, S, Vh, certified, complete = res.U, res.S, res.Vh, res.certified, res.complete
    if first != torch.float64 and not bool(certified.all()):
        redo = (~certified).nonzero().squeeze(-1)
        again = _gram_pass(B[redo], A[redo], w[redo], rank, torch.float64, dtype)
        U, S, Vh = U.index_copy(0, redo, again.U), S.index_copy(0, redo, again.S), Vh.index_copy(0, redo, again.Vh)
        certified = certified.index_copy(0, redo, again.certified)
        complete = complete.index_copy(0, redo, again.complete)
    if not bool((certified & complete).all()):
        fix = (~certified | ~complete).nonzero().squeeze(-1)
        Uh, Sh, Vhh = _qr_svd(B[fix], A[fix], w[fix], rank, "householder")
        U, Vh = U.index_copy(0, fix, Uh), Vh.index_copy(0, fix, Vhh)
        Sh = _pad_columns(Sh.to(torch.float64), S.shape[-1])
        S = S.index_copy(0, fix, torch.where(certified[fix, None], S[fix], Sh))
    return U, S.to(dtype), Vh


def truncated_svd_of_sum(B: torch.Tensor, A: torch.Tensor, weights, rank: int, *, method: str = "auto") -> TruncatedSVD:
    """Exact top-``rank`` SVD of ``sum_j weights_j B_j A_j``, batched over leading dimensions.

    Args:
        B: (..., m, d, r) left factors. A: (..., m, r, k) right factors. weights: (..., m) or (m,) mixing weights.
        rank: how many singular triplets to keep; at most ``min(d, k)``. It may exceed ``m r`` (the most the sum
            can have): the extra singular values are 0 and their vectors still orthonormal, so a split that puts
            all of S into B keeps A's rows alive.
        method: ``householder`` (geqrf + ormqr, Q never formed), ``qr`` (``torch.linalg.qr``), ``gram`` (Gram
            matrices and one thin product per output, certified, see :func:`_gram_core`), or ``auto`` (the fastest
            of them for the shape, see :func:`_resolve_method`).

    Computation happens in float64 if any input is float64, else float32 (bf16/fp16 are upcast); results are in
    that dtype. All-zero or rank-deficient sums give zero singular values, never NaN. Every method returns U, Vh with
    orthonormal columns and rows and singular values within about 1e-5 (float32) of ``sum_j |w_j| |B_j| |A_j|``
    (spectral norms): that is the largest singular value when the terms do not cancel, as with mixing weights on
    agents that roughly agree, but a sum that nearly cancels keeps only the absolute accuracy. The result unpacks like
    ``torch.linalg.svd``: ``U, S, Vh = truncated_svd_of_sum(...)``.
    """
    w = _check_inputs(B, A, weights)
    (m, d, r), k = B.shape[-3:], A.shape[-1]
    lead = torch.broadcast_shapes(B.shape[:-3], A.shape[:-3], w.shape[:-1])
    rank = _check_rank(rank, min(d, k), "min(d, k)")
    dtype = compute_dtype_for(B, A)
    how = _resolve_method(method, device=B.device, dtype=dtype, batch=lead.numel(), d=d, k=k, mr=m * r, rank=rank)
    if how == "gram":
        flat = (B.expand(*lead, m, d, r).reshape(-1, m, d, r), A.expand(*lead, m, r, k).reshape(-1, m, r, k))
        U, S, Vh = _gram_svd(*flat, w.expand(*lead, m).reshape(-1, m), rank, dtype)
    else:
        U, S, Vh = _qr_svd(B, A, w, rank, how)
    tail = torch.linalg.vector_norm(S[..., rank:], dim=-1)
    return TruncatedSVD(
        U.reshape(*lead, d, rank),
        S[..., :rank].reshape(*lead, rank),
        Vh.reshape(*lead, rank, k),
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
            f"regauge needs new and old factors of equal shapes, got B {tuple(B_new.shape)} vs {tuple(B_old.shape)} "
            f"and A {tuple(A_new.shape)} vs {tuple(A_old.shape)}."
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


def mask_ranks(B: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the columns of B (n, d, r) and rows of A (n, r, k) beyond each agent's rank ``ranks`` (n,): agents of
    different ranks are stored zero-padded to the common width ``r``. ``None`` leaves both unchanged."""
    if ranks is None:
        return B, A
    keep = torch.arange(B.shape[-1], device=B.device)[None, :] < ranks.to(B.device)[:, None]  # (n, r)
    return B * keep[:, None, :], A * keep[:, :, None]
