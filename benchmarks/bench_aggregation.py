"""Aggregation at LLaMA-7B shapes: DeCAF's factored TSVD for all adapted layers of a model at once.

64 adapted layers (q_proj and v_proj of 32 blocks), d = k = 4096, ranks r in 4, 8, 16, 32 and neighbourhoods of
m = 3, 5, 9 agents, batched over layers as the engine would call it. Printed side by side, as ratios:

* factored / floor: the TSVD as ``method="auto"`` runs it vs the two thin QR factorizations of the stacked factors
  alone (the least a QR-based exact answer needs);
* householder / average, gram / average, auto / average: each path vs DLoRA's factor averaging (target for the
  path auto picks at r = 8, m = 3: <= 3), and which path auto picks;
* gram routes: how many layers the Gram path settled in float32, redid in float64, or handed to Householder;
* gram error: the Gram path's largest singular-value error, relative to the largest singular value, against a
  float64 reference (the Householder path in float64, itself checked against a dense float64 SVD by
  ``tests/test_lowrank.py``) on the first ``--check-layers`` layers (target <= 1e-5);
* dense / factored: a DeCAF that forms each d x k matrix and takes its dense SVD (timed on a few layers and scaled
  to 64, since 64 dense 4096 x 4096 SVDs take many minutes on a CPU);
* FLOPs of the aggregation vs one LLaMA-7B training step (6 x 6.7e9 parameters x tokens): the share it adds.

Run: ``python benchmarks/bench_aggregation.py`` (``--quick`` for a smaller grid).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians, write_json_atomically  # noqa: E402
from bench_tsvd import routes  # noqa: E402

from decaf_lora import lowrank  # noqa: E402
from decaf_lora.lowrank import truncated_svd_of_sum  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_aggregation.json")
LLAMA_PARAMS = 6.74e9


def aggregation_flops(layers: int, d: int, k: int, m: int, r: int) -> float:
    """Householder QR of both stacks, the core product and SVD, and the two ormqr back-multiplications."""
    q = m * r
    qr = lambda n: 2 * n * q * q - 2 * q**3 / 3  # noqa: E731
    return layers * (qr(d) + qr(k) + 2 * q**3 + 22 * q**3 + 4 * (d + k) * q * r)


def sv_errors(B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, r: int, layers: int) -> dict[str, float]:
    """Largest singular-value error of each float32 path on the first layers, relative to the largest value.

    The reference is the Householder path in float64: exact to about 1e-15 (tests/test_lowrank.py checks it against
    a dense float64 SVD), and seconds instead of the minutes a dense float64 SVD of 4096 x 4096 layers would take.
    """
    B, A = B[:layers], A[:layers]
    ref = truncated_svd_of_sum(B.double(), A.double(), w.double(), r, method="householder").S
    out = {}
    for method in ("gram", "householder"):
        S = truncated_svd_of_sum(B, A, w, r, method=method).S.double()
        out[f"{method}_sv_error"] = float(((S - ref).abs() / ref[..., :1]).max())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--ranks", default="4,8,16,32")
    ap.add_argument("--ms", default="3,5,9")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-layers", type=int, default=1, help="layers timed with a dense SVD (scaled to --layers)")
    ap.add_argument("--check-layers", type=int, default=2, help="layers checked against a float64 reference")
    ap.add_argument("--tokens", type=int, default=32 * 512, help="tokens in one training step (batch 32 x 512)")
    ap.add_argument("--quick", action="store_true", help="r in 4, 8 and m in 3, 5 only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ranks = [4, 8] if args.quick else [int(x) for x in args.ranks.split(",")]
    ms = [3, 5] if args.quick else [int(x) for x in args.ms.split(",")]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    L, d = args.layers, args.d
    step_flops = 6 * LLAMA_PARAMS * args.tokens
    print(
        f"aggregation for {L} layers of {d} x {d} on {dev} ({torch.get_num_threads()} threads); "
        f"one 7B training step = {step_flops:.3g} FLOPs"
    )
    print(
        f"{'r':>3} {'m':>3} {'factored s':>11} {'/ 2 QRs':>8} {'hh/avg':>7} {'gram/avg':>9} {'auto/avg':>9} "
        f"{'auto':>12} {'gram err':>9} {'f32/f64/hh':>11} {'dense/fact':>11} {'share of step':>14}"
    )
    rows = []
    for r in ranks:
        for m in ms:
            B = torch.randn(L, m, d, r, generator=gen, device=dev) / d**0.25
            A = torch.randn(L, m, r, d, generator=gen, device=dev) / d**0.25
            w = torch.full((m,), 1.0 / m, device=dev)
            P, Qt = lowrank._stack(B, A, w)

            def timed(fn):
                def run():
                    fn()
                    sync()

                return run

            contenders = {
                "factored": timed(lambda: truncated_svd_of_sum(B, A, w, r)),
                "householder": timed(lambda: truncated_svd_of_sum(B, A, w, r, method="householder")),
                "gram": timed(lambda: truncated_svd_of_sum(B, A, w, r, method="gram")),
                "two_thin_qr": timed(lambda: (torch.linalg.qr(P), torch.linalg.qr(Qt))),
                "average": timed(lambda: (torch.einsum("j,ljdr->ldr", w, B), torch.einsum("j,ljrk->lrk", w, A))),
            }
            dense_layers = min(args.dense_layers, L)
            if r == 8 and m == 3 and dense_layers > 0:  # --dense-layers 0 skips the (slow) dense SVD
                contenders["dense_svd"] = timed(
                    lambda: [
                        torch.linalg.svd(torch.einsum("j,jdr,jrk->dk", w, B[l], A[l]), full_matrices=False)
                        for l in range(dense_layers)
                    ]
                )
            t = interleaved_medians(contenders, args.reps, only_once=("dense_svd",))
            pick = lowrank._resolve_method("auto", device=dev, dtype=torch.float32, batch=L, d=d, k=d, mr=m * r, rank=r)
            row = {
                "r": r,
                "m": m,
                "seconds": t,
                "auto_picks": pick,
                "factored_over_floor": t["factored"] / t["two_thin_qr"],
                "factored_over_average": t["factored"] / t["average"],
                "householder_over_average": t["householder"] / t["average"],
                "gram_over_average": t["gram"] / t["average"],
                **sv_errors(B, A, w, r, min(args.check_layers, L)),
                "gram_routes": routes(B, A, w, r),
                "flops": aggregation_flops(L, d, d, m, r),
                "share_of_training_step": aggregation_flops(L, d, d, m, r) / step_flops,
            }
            if "dense_svd" in t:
                row["dense_over_factored"] = t["dense_svd"] * L / dense_layers / t["factored"]
            rows.append(row)
            dense = f"{row['dense_over_factored']:>11.0f}" if "dense_over_factored" in row else f"{'-':>11}"
            route = "/".join(str(v) for v in row["gram_routes"].values())
            print(
                f"{r:>3} {m:>3} {t['factored']:>11.4f} {row['factored_over_floor']:>8.2f} "
                f"{row['householder_over_average']:>7.2f} {row['gram_over_average']:>9.2f} "
                f"{row['factored_over_average']:>9.2f} {pick:>12} {row['gram_sv_error']:>9.1e} {route:>11} {dense} "
                f"{row['share_of_training_step']:>13.5%}"
            )
    result = {
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],  # other users of the shared machine
        "layers": L,
        "d": d,
        "step_flops": step_flops,
        "rows": rows,
    }
    write_json_atomically(args.json, result)
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
