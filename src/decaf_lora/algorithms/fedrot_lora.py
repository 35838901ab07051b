"""FedRot-LoRA in the gossip setting: rotate what you mix into a common frame, then average the factors (DLoRA).

FedRot-LoRA (Zhang, Kim, Cha, Vikalo; ICML 2026, arXiv 2602.23638) is a server method: before uploading, every
client rotates its factors toward the global model it received, ``B <- B R``, ``A <- R^T A`` with an orthogonal
``R``, so ``B A`` is unchanged but the factor-wise average has smaller cross terms. The paper has no decentralized
rule; this is a **gossip adaptation, not from the paper** (peers.md section 5.3, [INFERENCE]).

The alignment (section 5.2, from the official code): one factor per round, alternating (A on odd rounds, B on even
rounds with ``first_align="A"``), round 0 skipped. For A the cross-Gram is ``M = A_j A_ref^T``, for B it is
``M = B_j^T B_ref``; ``R* = argmax tr(R^T M)`` over O(r) (``U V^T`` from ``M = U S V^T``) or over SO(r) (the last
singular direction flipped when ``det(U V^T) < 0``). Soft rotation: ``R = polar((1 - lam) I + lam R*)``, the det
fix applied again under SO(r). Aligned inputs ``B_j R_ij``, ``R_ij^T A_j`` are then averaged with the mixing row.

Two references (``reference``):

* ``receiver`` (peers.md G2): agent i aligns each neighbour's received factors to its own post-training factors;
  its own factors are not rotated (``R_ii = I``). Stateless, reads nothing beyond the wire.
* ``own-start`` (G1, the default, "FedRot-LoRA (gossip)"). In G1 each sender rotates its *own* factors toward its
  *own* start-of-round factors before sending. ``mix`` runs on the receiver with the copies as sent, and the sender's
  start is never on the wire, so the receiver cannot compute the sender's rotation. What is computed instead (our
  reading): receiver i rotates every input it mixes, its own factors included, toward **its own** start-of-round
  factors ``(A_i^0, B_i^0)`` (``needs = {"start_factors"}``). For the agent's own factors this is exactly G1's
  rotation. For a neighbour j it replaces j's start by i's start; the two differ only by last round's consensus
  error, and where all agents start the round from the same factors (a common initialisation, the complete graph,
  any round after exact consensus) it *is* G1, and the paper's server rule. Exact G1 in general needs a hook that
  lets a sender transform its own factors between training and sending, which the interface does not have.

Guards (peers.md 5.6, C8): a cross-Gram with ``||M||_F <= eps ||X_j||_F ||X_ref||_F`` (B = 0 in round 0, an
untrained receiver) gives ``R = I``, never an SVD's arbitrary basis (the paper's random-rotation ablation drops MNLI
to .318). Singular directions of M below the same threshold do not decide anything: among the maximizers the one
closest to the identity is taken, so a rank-deficient M never rotates its null space at random.

Heterogeneous ranks (FedRot has none, [GAP]; our reading of 5.6): the Procrustes problem is restricted to the
receiver's live block (the first ``ranks[i]`` rank slots); padded slots keep ``R = I``, so no live direction is moved
into a padded slot or out of one. A sender's padded slots inside that block enter as zero rows of M and are placed by
the identity tie-break. The mixed factors are masked to the receiver's rank, as in DLoRA.

Statistics: ``cross_term_error`` ``|s| ||sum_j pi_ij B_j A_j - B_i' A_i'||_F`` (rss over layers) and
``cross_term_error_unaligned``, the same for the plain DLoRA mix of the same inputs (what the rotation saved);
``rotation_distance``, the largest ``||R_ij - I||_F`` over the inputs an agent mixes (max over layers); and
``identity_fallbacks``, how many of them fell back to ``R = I`` on a numerically zero cross-Gram (sum over layers).
All are computed from r x r Gram matrices, never from a d x k product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import DecafError, ShapeError
from .base import Algorithm, MixOutput, check_ranks, mask_ranks, prepare
from .decaf import neighbourhoods
from .dlora import average_factors
from .registry import register

REFERENCES = ("own-start", "receiver")
GROUPS = ("auto", "O", "SO")
#: Output agents per chunk of the float64 cross-term computation, bounded by this many elements.
ERROR_CHUNK_ELEMENTS = 1 << 24


def _gram_frobenius(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``||X Y||_F`` for X (b, d, q) and Y (b, q, k), as ``sqrt(sum(X^T X * Y Y^T))``: q x q Grams only."""
    value = ((X.mT @ X) * (Y @ Y.mT)).sum((-2, -1))
    return value.clamp_min(0).sqrt()


def cross_term_error(weight, B_nb, A_nb, B_new, A_new) -> torch.Tensor:
    """Per output agent, ``||sum_j w_j B_j A_j - B_new A_new||_F`` in float64, never forming a d x k matrix.

    ``weight`` (n, m) sums to 1 per row, ``B_nb`` (n, m, d, r), ``A_nb`` (n, m, r, k), ``B_new`` (n, d, r), ``A_new``
    (n, r, k). Written as ``sum_j w_j (B_j - Bbar)(A_j - Abar) + (Bbar - B_new) Abar + B_new (Abar - A_new)`` with
    ``Bbar = sum_j w_j B_j`` (an identity when the weights sum to 1): the differences are taken on the factors, where
    they are accurate, so a small error is not the rounding left over from subtracting two large products.
    """
    n, m, d, r = B_nb.shape
    k = A_nb.shape[-1]
    chunk = max(1, ERROR_CHUNK_ELEMENTS // ((m + 2) * r * (d + k + (m + 2) * r)))
    out = []
    for lo in range(0, n, chunk):
        sl = slice(lo, lo + chunk)
        w = weight[sl].to(torch.float64)
        Bj, Aj = B_nb[sl].to(torch.float64), A_nb[sl].to(torch.float64)
        Bn, An = B_new[sl].to(torch.float64), A_new[sl].to(torch.float64)
        Bbar = torch.einsum("im,imdr->idr", w, Bj)
        Abar = torch.einsum("im,imrk->irk", w, Aj)
        X = torch.cat([(w[..., None, None] * (Bj - Bbar[:, None])).transpose(1, 2).flatten(2), Bbar - Bn, Bn], -1)
        Y = torch.cat([(Aj - Abar[:, None]).flatten(1, 2), Abar, Abar - An], -2)
        out.append(_gram_frobenius(X, Y))
    return torch.cat(out)


def _polar(M: torch.Tensor, special: bool) -> torch.Tensor:
    """The orthogonal factor ``X Y^T`` of ``M = X S Y^T``; under ``special`` the last direction is flipped where
    ``det < 0``, giving the SO(r) maximizer of ``tr(R^T M)`` (Kabsch/Umeyama)."""
    X, _, Yh = torch.linalg.svd(M)
    R = X @ Yh
    if special:
        flip = torch.linalg.det(R) < 0
        X = torch.where(flip[..., None, None], torch.cat([X[..., :-1], -X[..., -1:]], -1), X)
        R = X @ Yh
    return R


def procrustes(M: torch.Tensor, tol: torch.Tensor, special: bool) -> torch.Tensor:
    """``argmax_R tr(R^T M)`` over O(r) (SO(r) with ``special``), ties broken toward the identity.

    Singular values of M at or below ``tol`` (batch shape) are treated as zero: their directions do not constrain R,
    so the maximizers are ``U_1 V_1^T + U_2 Q V_2^T`` for any orthogonal Q, and the one closest to the identity has
    ``Q = polar(U_2^T V_2)``. Written on the full r x r basis as ``R = U polar(C) V^T`` with ``C`` the identity on the
    live directions and ``U^T V`` on the dead ones; with no dead direction ``C = I`` and ``R = U V^T``.
    """
    U, S, Vh = torch.linalg.svd(M)
    dead = S <= tol[..., None]
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    both = dead[..., :, None] & dead[..., None, :]
    C = torch.where(both, U.mT @ Vh.mT, eye * (~dead)[..., None, :])
    Q = torch.where(dead.any(-1)[..., None, None], _polar(C, False), eye)
    R = U @ Q @ Vh
    if special:
        flip = torch.linalg.det(R) < 0  # flip the weakest direction (the last), free of cost if it is dead
        U = torch.where(flip[..., None, None], torch.cat([U[..., :-1], -U[..., -1:]], -1), U)
        R = U @ Q @ Vh
    return R


class _Needs:
    """``needs`` that depends on the options: the class lists everything the method may need (``start_factors``),
    an instance only what its ``reference`` uses, so ``receiver`` runs do not make the engine copy start factors."""

    def __get__(self, obj, cls=None) -> frozenset[str]:
        if obj is None or obj.reference == "own-start":
            return frozenset({"start_factors"})
        return frozenset()


@register
@dataclass
class FedRotLoRA(Algorithm):
    """Procrustes-align the factors one mixes (A on odd rounds, B on even ones), then average them.

    Gossip adaptation, not from the paper (the paper is server-based): ``reference="own-start"`` is our reading of
    peers.md's G1 (every input is rotated toward the receiver's own start-of-round factors), ``receiver`` is G2.
    Heterogeneous ranks: alignment restricted to the receiver's live block (our reading; the paper has no rule).
    """

    name = "fedrot-lora"
    summary = "Procrustes-rotate the factors one mixes into a common frame (A/B alternating, soft lam), then average"
    paper = "FedRot-LoRA (Zhang et al., ICML 2026), gossip adaptation"
    supports_ranks = True
    needs = _Needs()
    stats = {
        "cross_term_error": "rss",
        "cross_term_error_unaligned": "rss",
        "rotation_distance": "max",
        "identity_fallbacks": "sum",
    }
    lam: float = option(
        1.0,
        "soft rotation R = polar((1 - lam) I + lam R*): 1 = hard Procrustes, 0 = DLoRA (paper: 0.4-0.6)",
        ge=0,
        le=1,
    )
    group: str = option(
        "auto",
        "rotations allowed: O (reflections too), SO (det +1), auto = O for lam = 1 and SO for soft rotations",
        choices=GROUPS,
    )
    reference: str = option(
        "own-start",
        "align toward the receiver's start-of-round factors (G1, our reading) or its current factors (G2)",
        choices=REFERENCES,
    )
    first_align: str = option(
        "A", "factor aligned on odd rounds; the other one is aligned on even rounds", choices=("A", "B")
    )
    skip_round0: bool = option(True, "do not align in round 0 (FedRot's code: the first round cannot rotate)")
    eps: float = option(
        1e-6, "a cross-Gram with ||M||_F <= eps ||X_j||_F ||X_ref||_F gives R = I (no rotation from noise)", ge=0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group == "O" and self.lam < 1:
            raise DecafError(
                f"fedrot-lora group='O' with lam={self.lam} cannot work: a soft rotation cannot reach a reflection "
                "from the identity; use group='SO' (or 'auto') for lam < 1, or lam=1 for hard alignment over O(r)."
            )

    @property
    def special(self) -> bool:
        """Whether rotations are restricted to SO(r)."""
        return self.group == "SO" or (self.group == "auto" and self.lam < 1)

    def aligned_factor(self, round_: int) -> str | None:
        """``"A"``, ``"B"`` or None (no alignment this round): ``first_align`` on odd rounds, the other on even ones."""
        if self.lam == 0 or (round_ == 0 and self.skip_round0):
            return None
        other = "B" if self.first_align == "A" else "A"
        return self.first_align if round_ % 2 == 1 else other

    def _reference(self, p, factor: str, context) -> torch.Tensor:
        """The factor each output agent aligns to: its own current one (G2) or its start-of-round one (G1)."""
        own = p.own_A if factor == "A" else p.own_B
        if self.reference == "receiver":
            return own
        ref = None if context is None else (context.start_A if factor == "A" else context.start_B)
        if ref is None:
            raise ShapeError(
                "fedrot-lora with reference='own-start' needs context.start_A and context.start_B (each output "
                "agent's factors at the start of the round); pass a LayerContext with them or use reference='receiver'."
            )
        if tuple(ref.shape) != tuple(own.shape):
            raise ShapeError(
                f"context.start_{factor} has shape {tuple(ref.shape)}; it must be {tuple(own.shape)}, one start "
                "factor per output agent, like the agents' own factors."
            )
        return ref.to(device=own.device, dtype=own.dtype)

    def rotations(self, X_nb: torch.Tensor, X_ref: torch.Tensor, factor: str, keep: torch.Tensor):
        """Per (output agent, input) the rotation R (n, m, r, r) and whether it fell back to the identity.

        ``X_nb``: the inputs' factor (n, m, r, k) for A or (n, m, d, r) for B; ``X_ref`` (n, ...) the references;
        ``keep`` (n, r): the receiver's live rank slots, outside which R is the identity.
        """
        if factor == "A":
            X_nb = X_nb * keep[:, None, :, None]
            X_ref = X_ref * keep[:, :, None]
            M = X_nb @ X_ref[:, None].mT  # A_j A_ref^T
        else:
            X_nb = X_nb * keep[:, None, None, :]
            X_ref = X_ref * keep[:, None, :]
            M = X_nb.mT @ X_ref[:, None]  # B_j^T B_ref
        scale = torch.linalg.matrix_norm(X_nb) * torch.linalg.matrix_norm(X_ref)[:, None]
        tol = self.eps * scale
        zero = torch.linalg.matrix_norm(M) <= tol
        R = procrustes(M, tol, self.special)
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        if self.lam < 1:  # a blend near singular (lam = 0.5 against a half-turn) leaves directions free: keep them at I
            blend = (1 - self.lam) * eye + self.lam * R
            floor = max(self.eps, 16 * torch.finfo(M.dtype).eps) * M.shape[-1] ** 0.5  # ||(1-lam) I|| + ||lam R||
            R = procrustes(blend, torch.full(blend.shape[:-2], floor, dtype=M.dtype, device=M.device), self.special)
        live = keep[:, None, :, None] & keep[:, None, None, :]
        R = torch.where(live & ~zero[..., None, None], R, eye)
        return R, zero

    def mix(self, A, B, W, *, round_=0, self_index=None, ranks=None, context=None) -> MixOutput:
        p = prepare(A, B, W, self_index)
        n_out, r = p.W.shape[0], p.A.shape[1]
        rk = check_ranks(ranks, n_out, r, p.A.device)
        scale = abs(float(context.scale)) if context is not None else 1.0
        index, weight = neighbourhoods(p.W, p.self_index)
        A_nb, B_nb = p.A[index], p.B[index]  # (n_out, m, r, k), (n_out, m, d, r)
        A_dl, B_dl = average_factors(p, ranks)
        unaligned = scale * cross_term_error(weight, B_nb, A_nb, B_dl, A_dl)
        factor = self.aligned_factor(round_)
        if factor is None:  # DLoRA bit for bit
            zeros = torch.zeros(n_out, dtype=torch.float64, device=p.A.device)
            stats = {
                "cross_term_error": unaligned,
                "cross_term_error_unaligned": unaligned,
                "rotation_distance": zeros,
                "identity_fallbacks": zeros,
            }
            return p.cast(A_dl, B_dl, stats)
        X_ref = self._reference(p, factor, context)
        live_ranks = rk if rk is not None else torch.full((n_out,), r, device=p.A.device)
        keep = torch.arange(r, device=p.A.device)[None, :] < live_ranks[:, None]
        R, zero = self.rotations(A_nb if factor == "A" else B_nb, X_ref, factor, keep)
        present = weight != 0
        if self.reference == "receiver":  # the receiver is the reference: its own factors stay as they are
            is_self = index == p.self_index[:, None]
            R = torch.where(is_self[..., None, None], torch.eye(r, dtype=R.dtype, device=R.device), R)
            zero = zero & ~is_self
        A_al, B_al = R.mT @ A_nb, B_nb @ R
        A_new = torch.einsum("im,imrk->irk", weight, A_al)
        B_new = torch.einsum("im,imdr->idr", weight, B_al)
        B_new, A_new = mask_ranks(B_new, A_new, rk)
        eye = torch.eye(r, dtype=R.dtype, device=R.device)
        distance = torch.where(present, torch.linalg.matrix_norm(R - eye), 0.0).amax(1)
        stats = {
            "cross_term_error": scale * cross_term_error(weight, B_al, A_al, B_new, A_new),
            "cross_term_error_unaligned": unaligned,
            "rotation_distance": distance,
            "identity_fallbacks": (zero & present).sum(1).to(torch.float64),
        }
        return p.cast(A_new, B_new, stats)
