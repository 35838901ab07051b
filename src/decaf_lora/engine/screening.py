"""What a receiver checks before it mixes anything, the garbage a poisoned agent sends to test that, and how a
receiver's weights are renormalized over the neighbours that passed.

Every received tensor is checked for its shape (by byte count, as on the wire), finiteness and a norm bound; a
payload that fails is rejected, logged, and the receiver mixes with the neighbours that passed, its row
renormalized over them and itself. Both engines screen through these functions, so they reject alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import POISONS
from ..payload import PayloadSpec, encode


def check_values(t: torch.Tensor, max_norm: float) -> str | None:
    if not bool(torch.isfinite(t).all()):
        return "NaN or infinite values"
    norm = float(torch.linalg.vector_norm(t.float()))
    if max_norm and norm > max_norm:
        return f"norm {norm:.3g} above faults.max_norm={max_norm:g}"
    return None


def screen(spec: PayloadSpec, flat: torch.Tensor, counts: list[int], max_norm: float) -> tuple[str | None, list]:
    """A received payload (bytes and header) -> its tensors, or why it is rejected (then no tensors)."""
    reason, parts = spec.decode(flat, counts)
    if reason:
        return reason, []
    for entry, t in zip(spec.entries, parts):
        if not t.is_floating_point():  # announced ranks: already checked against the width by decode
            continue
        reason = check_values(t, max_norm)
        if reason:
            return f"{reason} in {entry.describe()}", []
    return None, parts


def poison(t: torch.Tensor, kind: str) -> torch.Tensor:
    """What a broken or hostile agent sends instead of ``t`` (for testing the defences)."""
    if kind == "nan":
        return torch.full_like(t, float("nan"))
    if kind == "scale":
        return t * 1e8 + 1e4
    if kind == "shape":
        return t[..., :-1].clone() if t.shape[-1] > 1 else torch.cat([t, t], -1)
    raise ValueError(f"poison kind {kind!r} is not one of {POISONS}")


def outgoing(spec: PayloadSpec, parts: list[torch.Tensor], poisoned: str | None) -> tuple[torch.Tensor, list[int]]:
    """What an agent puts on the wire: its packed tensors, as garbage of kind ``poisoned`` if it is the poisoned one."""
    if poisoned:  # the garbage is in the numbers; the announced ranks stay what they were
        parts = [poison(t, poisoned) if t.is_floating_point() else t for t in parts]
    return encode(parts)


def renormalize_without(w: np.ndarray, rejected: dict[int, list[int]]) -> np.ndarray:
    """Zero each receiver's weight on the senders it rejected and rescale the rest of its row to sum to 1."""
    if not rejected:
        return w
    w = w.copy()
    for i, senders in rejected.items():
        w[i, senders] = 0.0
        w[i] /= w[i].sum()
    return w


@dataclass
class RoundFaults:
    """What went wrong in one round, as logged in the metrics."""

    rejected: dict[int, list[int]] = field(default_factory=dict)  # receiver -> senders rejected
    reasons: dict[int, str] = field(default_factory=dict)  # sender -> why its payload was rejected
    timed_out: dict[int, list[int]] = field(default_factory=dict)  # receiver -> neighbours whose process was too late

    def reject(self, sender: int, receivers, reason: str) -> None:
        self.reasons[sender] = reason
        for i in receivers:
            self.rejected.setdefault(int(i), []).append(int(sender))

    def left_out(self) -> dict[int, list[int]]:
        """Receiver -> every neighbour missing from its mix this round, rejected or late."""
        out = {i: sorted(js) for i, js in self.rejected.items()}
        for i, js in self.timed_out.items():
            out[i] = sorted(set(out.get(i, [])) | set(js))
        return out

    def sort(self) -> None:
        for d in (self.rejected, self.timed_out):
            for i in d:
                d[i] = sorted(set(d[i]))
