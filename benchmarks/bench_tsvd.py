"""Micro-benchmark of DeCAF's aggregation kernel, ``truncated_svd_of_sum``.

Prints ratios measured side by side in one run (absolute seconds are context only on a shared machine):

* dense / factored: a dense ``torch.linalg.svd`` of the formed d x k matrix vs the factored TSVD (target > 1000x
  at d = k = 4096, r = 8, m = 3);
* factored / floor: vs the two thin QR factorizations of the stacked factors alone, the least work an exact answer
  needs (target <= 1.5); also vs Householder QR (geqrf) alone, which does not even form Q;
* factored / average: vs DLoRA's plain factor averaging (context: an exact TSVD cannot cost as little as a mean);
* methods: the Householder and Gram paths side by side on that layer;
* batching: many layers in one batched call vs a loop over layers, per layer shape (sets ``LOOP_ABOVE_ELEMENTS``
  of the Householder path);
* auto: Gram / Householder time over a grid of shapes, and what ``method="auto"`` picks (sets
  ``GRAM_ABOVE_WORK``);
* gram rounding: the measured entrywise rounding of float32 Gram products, against the model the Gram path's
  certificate assumes (``sqrt(n) u``);
* inputs: the Gram path's accuracy and route (float32 certified, redone in float64, or Householder) on random,
  near-consensus, ill-conditioned and rank-deficient inputs, with its time relative to Householder.

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
        "householder": lambda: truncated_svd_of_sum(B, A, w, r, method="householder"),
        "gram": lambda: truncated_svd_of_sum(B, A, w, r, method="gram"),
        "floor_two_thin_qr": lambda: (torch.linalg.qr(P), torch.linalg.qr(Qt)),
        "floor_two_geqrf": lambda: (torch.geqrf(P), torch.geqrf(Qt)),
        "factor_average": lambda: (torch.einsum("j,jdr->dr", w, B), torch.einsum("j,jrk->rk", w, A)),
    }
    if dense:
        contenders["dense_svd"] = lambda: torch.linalg.svd(torch.einsum("j,jdr,jrk->dk", w, B, A), full_matrices=False)
    t = interleaved_medians(contenders, reps, only_once=("dense_svd",))
    out = {"d": d, "k": d, "r": r, "m": m, "auto_picks": auto_pick(1, d, d, m * r, r), "seconds": t}
    out["ratios"] = {
        "factored_over_two_thin_qr": t["factored"] / t["floor_two_thin_qr"],
        "factored_over_two_geqrf": t["factored"] / t["floor_two_geqrf"],
        "factored_over_average": t["factored"] / t["factor_average"],
    }
    if dense:
        out["ratios"]["dense_over_factored"] = t["dense_svd"] / t["factored"]
    out["method_ratios"] = {
        f"{name}_over_{base}": t[name] / t[key]
        for name in ("householder", "gram")
        for base, key in (("two_thin_qr", "floor_two_thin_qr"), ("average", "factor_average"))
    }
    out["method_ratios"]["gram_over_householder"] = t["gram"] / t["householder"]
    return out


def auto_pick(batch: int, d: int, k: int, mr: int, rank: int) -> str:
    """What ``method='auto'`` resolves to for one float32 CPU call of this shape."""
    cpu = torch.device("cpu")
    return lowrank._resolve_method("auto", device=cpu, dtype=torch.float32, batch=batch, d=d, k=k, mr=mr, rank=rank)


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
                truncated_svd_of_sum(B, A, w, r, method="householder")
            finally:
                lowrank.LOOP_ABOVE_ELEMENTS = saved

        t = interleaved_medians(
            {
                "batched": batched,
                "loop": lambda: [truncated_svd_of_sum(B[i], A[i], w, r, method="householder") for i in range(layers)],
                "auto": lambda: truncated_svd_of_sum(B, A, w, r, method="householder"),
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


def auto_grid(ds: list[int], mrs: list[tuple[int, int]], layers: list[int], reps: int, gen: torch.Generator) -> list:
    """Gram / Householder time per shape (float32, CPU), and whether auto's pick is the faster one.

    Shapes whose stacks hold more than 2^16 x 4 rows in all (64 layers of 4096) are left out to keep the run short.
    """
    rows = []
    for L in layers:
        for m, r in mrs:
            for d in ds:
                if m * r > d or L * d > 1 << 18:
                    continue
                B = torch.randn(L, m, d, r, generator=gen) / d**0.25
                A = torch.randn(L, m, r, d, generator=gen) / d**0.25
                w = torch.full((m,), 1.0 / m)
                t = interleaved_medians(
                    {
                        "householder": lambda: truncated_svd_of_sum(B, A, w, r, method="householder"),
                        "gram": lambda: truncated_svd_of_sum(B, A, w, r, method="gram"),
                    },
                    reps,
                )
                pick = auto_pick(L, d, d, m * r, r)
                rows.append(
                    {
                        "layers": L,
                        "m": m,
                        "r": r,
                        "d": d,
                        "work": L * 2 * d * (m * r) ** 2,
                        "seconds": t,
                        "gram_over_householder": t["gram"] / t["householder"],
                        "auto_picks": pick,
                        "auto_over_best": t[pick] / min(t.values()),
                    }
                )
    return rows


def gram_rounding(ns: list[int], gen: torch.Generator) -> list[dict]:
    """Largest ``|fl(X X^T) - X X^T|_ab / (|x_a| |x_b|)`` of float32 Gram products, in units of u = 2^-24."""
    u = torch.finfo(torch.float32).eps / 2
    rows = []
    for n in ns:
        worst = 0.0
        for kind in ("normal", "positive", "near-equal rows"):
            if kind == "normal":
                X = torch.randn(8, 24, n, generator=gen)
            elif kind == "positive":  # all terms of one sign: no cancellation to hide the accumulated rounding
                X = torch.rand(8, 24, n, generator=gen)
            else:
                X = torch.randn(8, 1, n, generator=gen) + 1e-3 * torch.randn(8, 24, n, generator=gen)
            X64 = X.double()
            exact = X64 @ X64.mT
            norms = torch.linalg.vector_norm(X64, dim=-1)
            err = ((X @ X.mT).double() - exact).abs() / (norms[..., :, None] * norms[..., None, :])
            worst = max(worst, float(err.max()) / u)
        rows.append({"n": n, "max_error_in_u": worst, "model_sqrt_n": n**0.5})
    return rows


def input_families(d: int, r: int, m: int, L: int, gen: torch.Generator) -> dict[str, tuple]:
    """Random, near-consensus and adversarial inputs (B, A, w, rank), float32, L layers of d x d."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def orthonormal(*shape):
        return torch.linalg.qr(randn(*shape)).Q

    w = torch.full((m,), 1.0 / m)
    spectrum = 0.6 ** torch.arange(r, dtype=torch.float32)  # an adapter's decaying singular values
    B_mean, A_mean = orthonormal(L, d, r) * spectrum, orthonormal(L, d, r).mT
    graded = 10.0 ** -torch.linspace(0, 4, r)
    return {
        "random": (randn(L, m, d, r) / d**0.25, randn(L, m, r, d) / d**0.25, w, r),
        "near-consensus 1e-3": (
            B_mean[:, None] + 1e-3 * randn(L, m, d, r) / d**0.5,
            A_mean[:, None] + 1e-3 * randn(L, m, r, d) / d**0.5,
            w,
            r,
        ),
        "graded B (1e-4), rank m r": (orthonormal(L, m, d, r) * graded, orthonormal(L, m, d, r).mT, w, m * r),
        "equal B 1e-4, random A": (B_mean[:, None] + 1e-4 * randn(L, m, d, r) / d**0.5, randn(L, m, r, d), w, r),
        "identical A, rank 2r": (randn(L, m, d, r), randn(L, 1, r, d).expand(L, m, r, d).contiguous(), w, 2 * r),
        "zero weight (padding)": (randn(L, m, d, r), randn(L, m, r, d), torch.tensor([0.5] * (m - 1) + [0.0]), r),
        "B = 0": (torch.zeros(L, m, d, r), randn(L, m, r, d), w, r),
    }


def routes(B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, rank: int) -> dict[str, int]:
    """How many layers the Gram path settles in its float32 pass, redoes in float64, or hands to Householder."""
    m = B.shape[-3]
    flat = B.reshape(-1, *B.shape[-3:]), A.reshape(-1, *A.shape[-3:]), w.expand(B.shape[0], m)
    first = lowrank._gram_pass(*flat, rank, torch.float32, torch.float32)
    redo = (~first.certified).nonzero().squeeze(-1)
    certified, complete = first.certified.clone(), first.complete.clone()
    if redo.numel():
        again = lowrank._gram_pass(*(x[redo] for x in flat), rank, torch.float64, torch.float32)
        certified[redo], complete[redo] = again.certified, again.complete
    return {
        "float32": int(first.certified.sum()),
        "float64": int(redo.numel()),
        "householder_vectors": int((~complete | ~certified).sum()),
    }


def inputs(d: int, r: int, m: int, L: int, reps: int, gen: torch.Generator) -> list[dict]:
    rows = []
    for name, (B, A, w, rank) in input_families(d, r, m, L, gen).items():
        M = torch.einsum("...j,...jdr,...jrk->...dk", w.double(), B.double(), A.double())
        ref = torch.linalg.svdvals(M)
        top = ref[..., :1].clamp_min(torch.finfo(torch.float64).tiny)

        def error(S, ref=ref, top=top, rank=rank):
            return float(((S.double() - ref[..., :rank]).abs() / top).max())

        t = interleaved_medians(
            {
                "householder": lambda: truncated_svd_of_sum(B, A, w, rank, method="householder"),
                "gram": lambda: truncated_svd_of_sum(B, A, w, rank, method="gram"),
            },
            reps,
        )
        g = truncated_svd_of_sum(B, A, w, rank, method="gram")
        h = truncated_svd_of_sum(B, A, w, rank, method="householder")
        eye = torch.eye(rank, dtype=torch.float64)
        orth = max(
            float((g.U.double().mT @ g.U.double() - eye).abs().max()),
            float((g.Vh.double() @ g.Vh.double().mT - eye).abs().max()),
        )
        rows.append(
            {
                "inputs": name,
                "rank": rank,
                "gram_sv_error": error(g.S),
                "householder_sv_error": error(h.S),
                "gram_orthonormality": orth,
                "gram_nan": bool(g.U.isnan().any() or g.Vh.isnan().any() or g.S.isnan().any()),
                "routes": routes(B, A, w, rank),
                "gram_over_householder": t["gram"] / t["householder"],
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
    load_before = os.getloadavg()

    print(
        f"truncated_svd_of_sum vs alternatives; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    single = single_layer(args.d, args.r, args.m, args.reps, not args.no_dense, gen)
    s, ra, mra = single["seconds"], single["ratios"], single["method_ratios"]
    print(f"\none layer d = k = {args.d}, r = {args.r}, m = {args.m} (median seconds, float32):")
    for name, sec in s.items():
        print(f"  {name:<20} {sec * 1e3:10.3f} ms")
    print(f"ratios (factored = method 'auto', which picks {single['auto_picks']} here):")
    if "dense_over_factored" in ra:
        print(f"  dense SVD / factored         {ra['dense_over_factored']:10.1f}x   (target > 1000x)")
    print(f"  factored / two thin QRs      {ra['factored_over_two_thin_qr']:10.2f}    (target <= 1.5)")
    print(f"  factored / two geqrf only    {ra['factored_over_two_geqrf']:10.2f}    (Householder without forming Q)")
    print(f"  factored / factor averaging  {ra['factored_over_average']:10.2f}    (context)")
    print(f"  householder / averaging      {mra['householder_over_average']:10.2f}")
    print(f"  gram / averaging             {mra['gram_over_average']:10.2f}")
    print(f"  gram / householder           {mra['gram_over_householder']:10.2f}")

    shapes = [(args.d, 4), (max(args.d // 5, 64), 24), (max(args.d // 16, 32), 64)]
    rows = batching(shapes, args.r, args.m, max(3, args.reps // 3), gen)
    print(
        "\nbatching (Householder path): one batched call vs a loop "
        f"(LOOP_ABOVE_ELEMENTS = {lowrank.LOOP_ABOVE_ELEMENTS}):"
    )
    for row in rows:
        print(
            f"  d = {row['d']:>5}, {row['layers']:>3} layers: batched / loop = {row['batched_over_loop']:5.2f}, "
            f"auto / best = {row['auto_over_best']:5.2f}"
        )

    ds = [x for x in (64, 256, 1024, 4096) if x < args.d] + [args.d]
    grid = auto_grid(ds, [(3, 4), (3, 8), (5, 16)], [1, 4, 16, 64], max(3, args.reps // 2), gen)
    print(
        f"\nauto: gram / householder, float32 (gram where work = layers (d + k) (m r)^2 >= {lowrank.GRAM_ABOVE_WORK}):"
    )
    print(f"  {'layers':>6} {'m':>3} {'r':>3} {'d':>5} {'work':>10} {'gram/hh':>8} {'auto':>12} {'auto/best':>10}")
    for row in grid:
        print(
            f"  {row['layers']:>6} {row['m']:>3} {row['r']:>3} {row['d']:>5} {row['work']:>10.3g} "
            f"{row['gram_over_householder']:>8.2f} {row['auto_picks']:>12} {row['auto_over_best']:>10.2f}"
        )
    worst = max(grid, key=lambda row: row["auto_over_best"])
    where = f"layers {worst['layers']}, m {worst['m']}, r {worst['r']}, d {worst['d']}"
    print(f"  worst auto / best: {worst['auto_over_best']:.2f} ({where})")

    rounding = gram_rounding([64, 1024, 4096, 16384], gen)
    print("\ngram rounding: largest entrywise error of float32 Gram products, in units of u = 2^-24:")
    for row in rounding:
        print(f"  n = {row['n']:>5}: {row['max_error_in_u']:6.2f} u   (model sqrt(n) = {row['model_sqrt_n']:6.1f} u)")

    fam = inputs(min(args.d, 512), args.r, args.m, 8, max(3, args.reps // 3), gen)
    print(f"\ninputs: gram path, 8 layers of d = k = {min(args.d, 512)}, float32 (errors relative to the largest):")
    print(f"  {'inputs':<28} {'gram err':>9} {'hh err':>9} {'orth':>9} {'f32/f64/hh':>11} {'gram/hh':>8}")
    for row in fam:
        rt = row["routes"]
        route = f"{rt['float32']}/{rt['float64']}/{rt['householder_vectors']}"
        print(
            f"  {row['inputs']:<28} {row['gram_sv_error']:>9.1e} {row['householder_sv_error']:>9.1e} "
            f"{row['gram_orthonormality']:>9.1e} {route:>11} {row['gram_over_householder']:>8.2f}"
        )

    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],  # other users of the shared machine
        "device": "cpu",
        "single_layer": single,
        "batching": rows,
        "auto": grid,
        "gram_rounding": rounding,
        "inputs": fam,
    }
    write_json_atomically(args.json, result)
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
