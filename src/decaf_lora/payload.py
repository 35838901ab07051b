"""An agent's payload for a round: the one place that decides which tensors go on the wire, in what order, and how
many bytes they are.

:meth:`PayloadSpec.of` describes the payload from the parts an algorithm sends this round (``A``, ``B``, ``E``,
``head``) and the agents' stacked states; :meth:`PayloadSpec.pack` takes an agent's tensors in that order;
:func:`encode` turns them into one flat byte buffer (each tensor's raw bytes, whatever its dtype, so nothing is
rounded on the way) and :meth:`PayloadSpec.decode` splits a received buffer back into tensors, refusing one whose
sizes do not match the description. Both engines move payloads only through these functions, so the bytes the
metrics report are the bytes of this description, and a method's mix sees exactly what was sent.

In a run whose agents' ranks can differ (``lora.ranks``, or a method that prunes), every payload starts with the
sender's rank in each layer and carries only its live slots: A at its rank's rows, B at its rank's columns, so an
agent of rank 2 among rank-8 agents sends a quarter of their factor bytes, as it would in practice. The receiver
checks every factor against the announced rank exactly and pads it back to the common width it stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import AgentStates


@dataclass(frozen=True)
class Entry:
    """One tensor of a payload: which part of which layer (or head), its shape and dtype."""

    part: str  # "ranks", "A", "B", "E" or "head"
    where: int | str  # layer index for A, B, E; head name for head; "all" for the ranks of every layer
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.numel_of(self.shape)

    @staticmethod
    def numel_of(shape) -> int:
        out = 1
        for s in shape:
            out *= s
        return out

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def at_rank(self, rank: int) -> tuple[int, ...]:
        """This entry's shape when its sender has rank ``rank`` (factors only; the rest never shrink)."""
        if self.part == "A":
            return (rank, self.shape[1])
        if self.part == "B":
            return (self.shape[0], rank)
        return self.shape

    def describe(self, shape: tuple[int, ...] | None = None) -> str:
        where = (
            f"head {self.where}"
            if self.part == "head"
            else "every layer"
            if self.part == "ranks"
            else f"layer {self.where}"
        )
        return f"{self.part} of {where} {tuple(shape or self.shape)} {str(self.dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class PayloadSpec:
    """The ordered tensors one agent sends one receiver in a round."""

    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, states: AgentStates, parts) -> PayloadSpec:
        parts = set(parts)
        entries = []
        if states.variable_ranks and parts & {"A", "B"}:
            entries.append(Entry("ranks", "all", (len(states.layers),), torch.int64))
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

    def rows(self, states: AgentStates, agent: int) -> list[torch.Tensor]:
        """``agent``'s tensors in the order of the description, factors at the full stored width (views)."""
        stacks = {"A": states.A, "B": states.B, "E": states.E, "head": states.H}
        return [
            torch.stack([r[agent] for r in states.ranks]).to(torch.int64)
            if e.part == "ranks"
            else stacks[e.part][e.where][agent]
            for e in self.entries
        ]

    def pack(self, states: AgentStates, agent: int) -> list[torch.Tensor]:
        """What ``agent`` puts on the wire: :meth:`rows`, factors cut to its rank when ranks can differ."""
        if not states.variable_ranks:
            return self.rows(states, agent)
        out = []
        for e, t in zip(self.entries, self.rows(states, agent)):
            rank = int(states.ranks[e.where][agent]) if e.part in ("A", "B") else None
            out.append(t[:rank] if e.part == "A" else t[:, :rank] if e.part == "B" else t)
        return out

    def wire_nbytes(self, states: AgentStates, agent: int) -> int:
        """Bytes of ``agent``'s payload on the wire (its own rank's share of the factors)."""
        return sum(t.numel() * t.element_size() for t in self.pack(states, agent))

    def decode(self, flat: torch.Tensor, counts: list[int]) -> tuple[str | None, list[torch.Tensor]]:
        """Received bytes -> tensors at the stored width, or the reason they do not fit the description."""
        if len(counts) != len(self.entries):
            return f"{len(counts)} tensors instead of {len(self.entries)}", []
        if sum(counts) != flat.numel():
            return "a malformed header", []
        out, start, ranks = [], 0, None
        for e, n in zip(self.entries, counts):
            shape = e.shape if ranks is None or e.part not in ("A", "B") else e.at_rank(int(ranks[e.where]))
            if n != e.numel_of(shape) * e.dtype.itemsize:
                return f"a tensor of {n} bytes instead of {e.describe(shape)}", []
            t = flat[start : start + n].clone().view(e.dtype).reshape(shape)  # own storage: aligned for any dtype
            start += n
            if e.part == "ranks":
                width = self.width
                if bool(((t < 1) | (t > width)).any()):
                    return f"ranks {t.tolist()} outside 1..{width}", []
                ranks = t
            elif shape != e.shape:  # a lower-rank sender: pad back to the stored width
                pad = (0, 0, 0, e.shape[0] - shape[0]) if e.part == "A" else (0, e.shape[1] - shape[1])
                t = torch.nn.functional.pad(t, pad)
            out.append(t)
        return None, out

    @property
    def width(self) -> int:
        """The stored rank width of the factors (the padded rank)."""
        return next(e.shape[0] if e.part == "A" else e.shape[1] for e in self.entries if e.part in ("A", "B"))


def encode(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Tensors -> one flat uint8 buffer of their raw bytes, and the byte count of each (the header)."""
    if not parts:
        return torch.zeros(0, dtype=torch.uint8), []
    raw = [p.detach().contiguous().reshape(-1).view(torch.uint8) for p in parts]
    return torch.cat(raw), [r.numel() for r in raw]
