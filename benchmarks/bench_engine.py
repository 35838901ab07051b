"""End-to-end costs of the simulation engine on the MiniLM demo (real pretrained model, real tweets), side by side.

* round time DeCAF / DLoRA: one round (8 agents x local steps, then the mix) of each, interleaved; target <= 1.05;
* simulator overhead: an N-agent round vs N x E plain PEFT training steps on the same batches (no adapter swaps,
  no mixing); target <= 1.1;
* memory: peak RSS of a process running 1, 4 and 16 agents (one shared base model); target 16 agents <= 1.3 x one.

Absolute seconds on a shared machine are context only. Run: ``python benchmarks/bench_engine.py`` (``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import write_json_atomically  # noqa: E402

from decaf_lora.config import load_config  # noqa: E402
from decaf_lora.engine import Engine, make_engine  # noqa: E402
from decaf_lora.payload import PayloadSpec  # noqa: E402
from decaf_lora.tasks.base import to_device  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_engine.json")
SMALL = ["task.train_examples=2000", "task.test_examples=64", "partition.local_eval=0", "rounds=100", "eval_every=1000"]


def one_round(sim: Engine, t: int) -> float:
    """One round of the engine's own loop (training, exchange, mix; the config evaluates never); returns seconds."""
    t0 = time.perf_counter()
    sim.run_round(t)
    return time.perf_counter() - t0


def mix_only(sim: Engine, t: int) -> float:
    """The exchange and mixing step alone, through the engine's public hooks; returns seconds."""
    t0 = time.perf_counter()
    plan = sim.algorithm.plan(t, sim.network)
    spec = PayloadSpec.of(sim.states, sim.algorithm.sends(t))
    sim.mix_own(t, plan.W, sim.exchange(t, plan, spec).received, spec)
    return time.perf_counter() - t0


def plain_peft_round(sim: Engine, t: int, opt) -> float:
    """The same agents' batches through one PEFT model with plain AdamW steps: no swaps, no mixing, no seeding."""
    t0 = time.perf_counter()
    sim.model.train()
    for a in sim.own:
        for _ in range(sim.cfg.local_steps):
            batch = to_device(sim.task.batch(sim.training.batches.next(a)), sim.device)
            loss = sim.task.loss(sim.model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in sim.states.parameters() if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def memory_child(agents: int) -> None:
    cfg = load_config(None, [*SMALL, f"agents={agents}", "rounds=1", "local_steps=2"])
    sim = make_engine(cfg, progress=False, write=False)
    one_round(sim, 0)
    import psutil

    print(
        json.dumps(
            {
                "agents": agents,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_round_mb": psutil.Process().memory_info().rss / 2**20,
                "adapter_mb": sim.states.adapter_bytes() / 2**20,
            }
        )
    )


def timed_rounds(reps: int) -> dict:
    """One round of DeCAF, of DLoRA and of plain PEFT training on the same batches, interleaved."""
    sims = {
        name: make_engine(load_config(None, [*SMALL, f"algorithm={name}"]), progress=False, write=False)
        for name in ("decaf", "dlora")
    }
    plain = make_engine(load_config(None, [*SMALL, "algorithm=local"]), progress=False, write=False)
    plain_opt = torch.optim.AdamW(plain.states.parameters(), lr=plain.cfg.optim.lr)
    samples: dict[str, list[float]] = {"decaf": [], "dlora": [], "plain_peft": []}
    one_round(sims["decaf"], 0), one_round(sims["dlora"], 0), plain_peft_round(plain, 0, plain_opt)  # warm-up
    for t in range(1, reps + 1):  # interleaved, so load on the shared machine hits all three alike
        samples["decaf"].append(one_round(sims["decaf"], t))
        samples["dlora"].append(one_round(sims["dlora"], t))
        samples["plain_peft"].append(plain_peft_round(plain, t, plain_opt))
    med = {k: statistics.median(v) for k, v in samples.items()}
    mix_share = {}
    for name, sim in sims.items():
        mix_share[name] = mix_only(sim, reps + 1)
    print(
        f"MiniLM demo round (8 agents x {sims['decaf'].cfg.local_steps} steps + mix), median of {reps}, seconds: "
        + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
    )
    print(f"  round time decaf / dlora          {med['decaf'] / med['dlora']:.3f}   (target <= 1.05)")
    print(f"  simulator (decaf) / plain PEFT    {med['decaf'] / med['plain_peft']:.3f}   (target <= 1.1)")
    print(f"  mixing step alone: decaf {mix_share['decaf'] * 1e3:.1f} ms, dlora {mix_share['dlora'] * 1e3:.1f} ms")
    return {
        "round_seconds": med,
        "decaf_over_dlora": med["decaf"] / med["dlora"],
        "simulator_over_plain_peft": med["decaf"] / med["plain_peft"],
        "mix_seconds": mix_share,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4, help="timed rounds per contender")
    ap.add_argument("--quick", action="store_true", help="2 timed rounds, memory with 1 and 4 agents")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help="skip the timed rounds")
    ap.add_argument("--json", default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args.memory_child)
    reps = 2 if args.quick else args.reps
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.memory_only:
        result.update(timed_rounds(reps))
    mem = []
    for n in (1, 4) if args.quick else (1, 4, 16):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-child", str(n)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base, now = mem[0]["peak_rss_mb"], mem[0]["rss_after_round_mb"]
    print(f"memory (one adapter is {mem[0]['adapter_mb']:.2f} MB; the peak includes loading the data and the model):")
    for m in mem:
        print(
            f"  {m['agents']:>2} agents: peak RSS {m['peak_rss_mb']:.0f} MB ({m['peak_rss_mb'] / base:.3f}x), RSS "
            f"after a round {m['rss_after_round_mb']:.0f} MB ({m['rss_after_round_mb'] / now:.3f}x)"
        )
    if len(mem) == 3:
        print(f"  16 agents / 1 agent, peak RSS     {mem[2]['peak_rss_mb'] / base:.3f}   (target <= 1.3)")
    result["memory"] = mem
    write_json_atomically(args.json, result)
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
