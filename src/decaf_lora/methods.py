"""What every registered method is, from the methods themselves: ``decaf methods`` and the README's method table.

One row per method: what it does (its ``summary``), what it sends and how many bytes per round relative to DLoRA
(computed from its own ``sends`` and ``payload_numel`` at the demo's layer shape, averaged over rounds so that
alternating methods count fairly), whether it trains agents of different ranks, and its paper. The README's table
is this function's markdown output, and a test keeps the two identical, so neither can drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import ALGORITHMS

#: The layer shape the byte ratios are computed at (MiniLM's attention projections at the demo's rank).
REFERENCE = {"d": 384, "k": 384, "r": 4}
ROUNDS = 24


@dataclass(frozen=True)
class MethodRow:
    name: str
    summary: str
    sends: str
    bytes_vs_dlora: float
    heterogeneous_ranks: bool
    paper: str


def method_rows() -> list[MethodRow]:
    d, k, r = REFERENCE["d"], REFERENCE["k"], REFERENCE["r"]
    shapes = ((r, k), (d, r))
    dlora = ALGORITHMS.get("dlora")()
    per_round = sum(dlora.payload_numel(*shapes, t) for t in range(ROUNDS))
    rows = []
    for name, cls in ALGORITHMS.items():
        algo = cls()
        sent = sum(algo.payload_numel(*shapes, t) for t in range(ROUNDS))
        parts = sorted({p for t in range(ROUNDS) for p in algo.sends(t)}, key=("A", "B", "E", "head").index)
        alternating = len({tuple(algo.sends(t)) for t in range(ROUNDS)}) > 1
        what = ", ".join(parts) or "nothing"
        rows.append(
            MethodRow(
                name,
                cls.summary,
                f"{what} (one factor per round)" if alternating else what,
                sent / per_round,
                bool(cls.supports_ranks),
                cls.paper,
            )
        )
    return rows


def _ratio(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}x"


def methods_markdown() -> str:
    """The README's method table."""
    lines = [
        f"| method | what it does | sends | bytes per round vs DLoRA (d = k = {REFERENCE['d']}, r = {REFERENCE['r']}) "
        "| different ranks | paper |",
        "|---|---|---|---|---|---|",
    ]
    for m in method_rows():
        ranks = "yes" if m.heterogeneous_ranks else "no"
        lines.append(f"| `{m.name}` | {m.summary} | {m.sends} | {_ratio(m.bytes_vs_dlora)} | {ranks} | {m.paper} |")
    return "\n".join(lines)


def methods_text() -> str:
    """``decaf methods``: the same rows, for a terminal."""
    out = []
    for m in method_rows():
        ranks = "different ranks: yes" if m.heterogeneous_ranks else "different ranks: no"
        out += [
            f"{m.name}",
            f"  {m.summary}",
            f"  sends {m.sends}; {_ratio(m.bytes_vs_dlora)} DLoRA's bytes per round; {ranks}",
            f"  paper: {m.paper}",
        ]
    note = (
        f"Bytes: factors only (heads aside), at one {REFERENCE['d']} x {REFERENCE['k']} layer of rank "
        f"{REFERENCE['r']}, "
        f"averaged over {ROUNDS} rounds. Options: `decaf run --help-config`; method pages: docs/methods/."
    )
    return "\n".join([*out, "", note])
