"""An agent's payload for a round: the one place that decides which tensors go on the wire, in what order, and how
many bytes they are.

:meth:`PayloadSpec.of` describes the payload from the parts an algorithm sends this round (``A``, ``B``, ``E``,
``head``) and the agents' stacked states; :meth:`PayloadSpec.pack` takes an agent's tensors in that order;
:func:`encode` turns them into one flat byte buffer (each tensor's raw bytes, whatever its dtype, so nothing is
rounded on the way) and :meth:`PayloadSpec.decode` splits a received buffer back into tensors, refusing one whose
sizes do not match the description. Both engines move payloads only through these functions, so the bytes the
metrics report are the bytes of this description, and a method's mix sees exactly what was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import AgentStates


@dataclass(frozen=True)
class Entry:
    """One tensor of a payload: which part of which layer (or head), its shape and dtype."""

    part: str  # "A", "B", "E" or "head"
    where: int | str  # layer index for A, B, E; head name for head
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        where = f"layer {self.where}" if self.part != "head" else f"head {self.where}"
        return f"{self.part} of {where} {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class PayloadSpec:
    """The ordered tensors one agent sends one receiver in a round."""

    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, states: AgentStates, parts) -> PayloadSpec:
        parts = set(parts)
        entries = []
        for l, (A, B) in enumerate(zip(states.A, states.B)):
            if "A" in parts:
                entries.append(Entry("A", l, tuple(A.shape[1:]), A.dtype))
            if "B" in parts:
                entries.append(Entry("B", l, tuple(B.shape[1:]), B.dtype))
            if "E" in parts and states.E is not None:
                entries.append(Entry("E", l, tuple(states.E[l].shape[1:]), states.E[l].dtype))
        if "head" in parts:
            entries += [Entry("head", n, tuple(h.shape[1:]), h.dtype) for n, h in states.H.items()]
        return cls(tuple(entries))

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def parts(self) -> set[str]:
        return {e.part for e in self.entries}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def pack(self, states: AgentStates, agent: int) -> list[torch.Tensor]:
        """``agent``'s tensors in the order of the description (views, no copies)."""
        stacks = {"A": states.A, "B": states.B, "E": states.E, "head": states.H}
        return [stacks[e.part][e.where][agent] for e in self.entries]

    def decode(self, flat: torch.Tensor, counts: list[int]) -> tuple[str | None, list[torch.Tensor]]:
        """Received bytes -> tensors, or the reason they do not fit the description (then no tensors)."""
        if len(counts) != len(self.entries):
            return f"{len(counts)} tensors instead of {len(self.entries)}", []
        if sum(counts) != flat.numel():
            return "a malformed header", []
        out, start = [], 0
        for e, n in zip(self.entries, counts):
            if n != e.nbytes:
                return f"a tensor of {n} bytes instead of {e.describe()}", []
            piece = flat[start : start + n].clone()  # own storage: aligned for any dtype
            out.append(piece.view(e.dtype).reshape(e.shape))
            start += n
        return None, out


def encode(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Tensors -> one flat uint8 buffer of their raw bytes, and the byte count of each (the header)."""
    if not parts:
        return torch.zeros(0, dtype=torch.uint8), []
    raw = [p.detach().contiguous().reshape(-1).view(torch.uint8) for p in parts]
    return torch.cat(raw), [r.numel() for r in raw]
