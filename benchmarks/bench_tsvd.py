"""Micro-benchmark of DeCAF's aggregation kernel, ``truncated_svd_of_sum``.

Prints ratios measured side by side in one run (absolute seconds are context only on a shared machine):

* dense / factored: a dense ``torch.linalg.svd`` of the formed d x k matrix vs the factored TSVD (target > 1000x
  at d = k = 4096, r = 8, m = 3);
* factored / floor: vs the two thin QR factorizations of the stacked factors alone, the least work an exact answer
  needs (target <= 1.5); also vs Householder QR (geqrf) alone, which does not even form Q;
* factored / average: vs DLoRA's plain factor averaging (context: an exact TSVD cannot cost as little as a mean);
* batching: many layers in one batched call vs a loop over layers, per layer shape (sets ``LOOP_ABOVE_ELEMENTS``).

Run: ``python benchmarks/bench_tsvd.py`` (or ``make bench``); ``--d 512`` for a quick look.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians, write_json_atomically  # noqa: E402

from decaf_lora import lowrank  # noqa: E402
from decaf_lora.lowrank import truncated_svd_of_sum  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_tsvd.json")


def single_layer(d: int, r: int, m: int, reps: int, dense: bool, gen: torch.Generator) -> dict:
    B = torch.randn(m, d, r, generator=gen) / d**0.25
    A = torch.randn(m, r, d, generator=gen) / d**0.25
    w = torch.full((m,), 1.0 / m)
    P, Qt = lowrank._stack(B, A, w)  # the floors get the same LAPACK-friendly (column-major) stacks

    contenders = {
        "factored": lambda: truncated_svd_of_sum(B, A, w, r),
        "floor_two_thin_qr": lambda: (torch.linalg.qr(P), torch.linalg.qr(Qt)),
        "floor_two_geqrf": lambda: (torch.geqrf(P), torch.geqrf(Qt)),
        "factor_average": lambda: (torch.einsum("j,jdr->dr", w, B), torch.einsum("j,jrk->rk", w, A)),
    }
    if dense:
        contenders["dense_svd"] = lambda: torch.linalg.svd(torch.einsum("j,jdr,jrk->dk", w, B, A), full_matrices=False)
    t = interleaved_medians(contenders, reps, only_once=("dense_svd",))
    out = {"d": d, "k": d, "r": r, "m": m, "seconds": t}
    out["ratios"] = {
        "factored_over_two_thin_qr": t["factored"] / t["floor_two_thin_qr"],
        "factored_over_two_geqrf": t["factored"] / t["floor_two_geqrf"],
        "factored_over_average": t["factored"] / t["factor_average"],
    }
    if dense:
        out["ratios"]["dense_over_factored"] = t["dense_svd"] / t["factored"]
    return out


def batching(shapes: list[tuple[int, int]], r: int, m: int, reps: int, gen: torch.Generator) -> list[dict]:
    rows = []
    for d, layers in shapes:
        B = torch.randn(layers, m, d, r, generator=gen)
        A = torch.randn(layers, m, r, d, generator=gen)
        w = torch.full((m,), 1.0 / m)
        saved = lowrank.LOOP_ABOVE_ELEMENTS

        def batched():
            lowrank.LOOP_ABOVE_ELEMENTS = 1 << 62
            try:
                truncated_svd_of_sum(B, A, w, r)
            finally:
                lowrank.LOOP_ABOVE_ELEMENTS = saved

        t = interleaved_medians(
            {
                "batched": batched,
                "loop": lambda: [truncated_svd_of_sum(B[i], A[i], w, r) for i in range(layers)],
                "auto": lambda: truncated_svd_of_sum(B, A, w, r),
            },
            reps,
        )
        rows.append(
            {
                "d": d,
                "layers": layers,
                "seconds": t,
                "batched_over_loop": t["batched"] / t["loop"],
                "auto_over_best": t["auto"] / min(t["batched"], t["loop"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4096, help="layer size d = k")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--m", type=int, default=3, help="stacked agents (neighbours + self)")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per contender (dense SVD: once)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SVD (slow at d = 4096)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--json", default=DEFAULT_JSON, help="where to write the results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    print(
        f"truncated_svd_of_sum vs alternatives; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    single = single_layer(args.d, args.r, args.m, args.reps, not args.no_dense, gen)
    s, ra = single["seconds"], single["ratios"]
    print(f"\none layer d = k = {args.d}, r = {args.r}, m = {args.m} (median seconds, float32):")
    for name, sec in s.items():
        print(f"  {name:<20} {sec * 1e3:10.3f} ms")
    print("ratios:")
    if "dense_over_factored" in ra:
        print(f"  dense SVD / factored         {ra['dense_over_factored']:10.1f}x   (target > 1000x)")
    print(f"  factored / two thin QRs      {ra['factored_over_two_thin_qr']:10.2f}    (target <= 1.5)")
    print(f"  factored / two geqrf only    {ra['factored_over_two_geqrf']:10.2f}    (Householder without forming Q)")
    print(f"  factored / factor averaging  {ra['factored_over_average']:10.2f}    (context)")

    shapes = [(args.d, 4), (max(args.d // 5, 64), 24), (max(args.d // 16, 32), 64)]
    rows = batching(shapes, args.r, args.m, max(3, args.reps // 3), gen)
    print(f"\nbatching: one batched call over layers vs a loop (LOOP_ABOVE_ELEMENTS = {lowrank.LOOP_ABOVE_ELEMENTS}):")
    for row in rows:
        print(
            f"  d = {row['d']:>5}, {row['layers']:>3} layers: batched / loop = {row['batched_over_loop']:5.2f}, auto / best = {row['auto_over_best']:5.2f}"
        )

    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "single_layer": single,
        "batching": rows,
    }
    write_json_atomically(args.json, result)
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
