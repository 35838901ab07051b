"""The reproduction study's runs: which ones, at what budget, and a resumable parallel runner.

Every run is one ``decaf run`` of the library (the same Simulation users get) on the real pretrained MiniLM and the
real tweets, scaled down to fit a 2-core machine (see ``BUDGET``). A run is named by a key that spells its
settings; its directory holds the usual run files. The runner reads finished runs back from their directories and
resumes half-finished ones from their last checkpoint, so an interrupted ``make reproduce`` loses at most the
rounds in progress; on a fresh clone (no ``reproduce/runs/``) it recomputes everything.

Run: ``python reproduce/study.py [--workers 2] [--only KEY_PREFIX] [--list]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS_DIR = os.path.join(HERE, "runs")  # bulky per-run directories; git-ignored
RESULTS = os.path.join(HERE, "results", "runs.jsonl")  # the compact record the report reads; committed

# The scaled-down budget (the paper trains far longer; see docs/reproduction.md for what this costs and means).
# 8 agents x 10 rounds x 2 local steps x batch 16 = 320 examples seen per agent; every agent is evaluated once, at
# the end, on the same 240 held-out tweets. One run takes about 80 s on one core.
BUDGET = [
    "agents=8",
    "rounds=10",
    "local_steps=2",
    "eval_every=10",
    "task.train_examples=4000",
    "task.test_examples=240",
    "task.max_length=32",
    "task.batch_size=16",
    "partition.local_eval=0",
    "lora.rank=4",
    "lora.alpha=8",
    "optim.lr=0.004",
]
SEEDS = (0, 1, 2)
TOPOLOGIES = ("ring", "complete", "bipartite")
PARTITIONS = {
    "iid": ["partition.scheme=iid"],
    "round-robin": ["partition.scheme=round_robin"],
    "dirichlet-0.1": ["partition.scheme=dirichlet", "partition.alpha=0.1"],
}
GOSSIP = ("decaf", "dlora", "dlora-fa")
NO_GRAPH = ("local", "fedavg")  # neither depends on the graph: run once per split, reported under every topology
# Policy ablations on the hardest setting (ring, Dirichlet 0.1): (label, algorithm, overrides)
ABLATIONS = [
    ("decaf/balanced", "decaf", ["algorithm_options={split: balanced}"]),
    ("decaf/keep", "decaf", ["optim.state_after_mix=keep"]),
    ("decaf/keep+procrustes", "decaf", ["optim.state_after_mix=keep", "algorithm_options={gauge: procrustes}"]),
    ("decaf/procrustes", "decaf", ["algorithm_options={gauge: procrustes}"]),
    ("dlora/keep", "dlora", ["optim.state_after_mix=keep"]),
]
ABLATION_PARTITIONS = (
    "dirichlet-0.1",
    "round-robin",
)  # on the ring; round-robin is where DeCAF learns most at this budget
SWEEP_RANKS = (1, 2, 4, 8, 16, 32)
SWEEP_ROUNDS = 5
# C5 under two parametrizations: the LoRA scale alpha / r held at 2 (as at rank 4), and alpha held at 8 (the scale
# falls as 1/r, which is the eta / r of the paper's analysis)
SWEEP_FIXED_ALPHA = 8
SWEEP_SCALINGS = ("scale-fixed", "alpha-fixed")


@dataclass
class Run:
    key: str
    overrides: list[str]
    group: str  # grid, ablation or sweep
    info: dict = field(default_factory=dict)


def planned_runs() -> list[Run]:
    """Every run of the study, seed 0 of everything first so that a partial study is already a complete picture."""
    runs: list[Run] = []
    for seed in SEEDS:
        seed_o = [f"seed={seed}", f"split_seed={seed}"]
        for part, part_o in PARTITIONS.items():
            for topo in TOPOLOGIES:
                for algo in GOSSIP:
                    runs.append(
                        Run(
                            f"grid/{topo}/{part}/{algo}/s{seed}",
                            [*BUDGET, *part_o, *seed_o, f"topology.name={topo}", f"algorithm={algo}"],
                            "grid",
                            {"topology": topo, "partition": part, "algorithm": algo, "seed": seed},
                        )
                    )
            for algo in NO_GRAPH:
                runs.append(
                    Run(
                        f"grid/any/{part}/{algo}/s{seed}",
                        [*BUDGET, *part_o, *seed_o, "topology.name=ring", f"algorithm={algo}"],
                        "grid",
                        {"topology": "any", "partition": part, "algorithm": algo, "seed": seed},
                    )
                )
        for part in ABLATION_PARTITIONS:  # keys of the first (Dirichlet) set predate the second
            prefix = "ablation" if part == "dirichlet-0.1" else f"ablation-{part}"
            for label, algo, extra in ABLATIONS:
                runs.append(
                    Run(
                        f"{prefix}/{label}/s{seed}",
                        [*BUDGET, *PARTITIONS[part], *seed_o, "topology.name=ring", f"algorithm={algo}", *extra],
                        "ablation",
                        {"label": label, "algorithm": algo, "seed": seed, "partition": part},
                    )
                )
        if seed == 0:
            for scaling in SWEEP_SCALINGS:
                for algo in ("decaf", "dlora"):  # the trajectory along which both consensus rules are compared
                    for r in SWEEP_RANKS:
                        alpha = 2 * r if scaling == "scale-fixed" else SWEEP_FIXED_ALPHA
                        key = f"sweep/rank{r}" + ("" if algo == "decaf" else "/dlora") + f"/s{seed}"
                        if scaling != "scale-fixed":
                            key = f"sweep-alpha{SWEEP_FIXED_ALPHA}/rank{r}/{algo}/s{seed}"
                        runs.append(
                            Run(
                                key,
                                [
                                    *BUDGET,
                                    *PARTITIONS["dirichlet-0.1"],
                                    *seed_o,
                                    "topology.name=ring",
                                    f"algorithm={algo}",
                                    f"lora.rank={r}",
                                    f"lora.alpha={alpha}",
                                    f"rounds={SWEEP_ROUNDS}",
                                    f"eval_every={SWEEP_ROUNDS}",
                                ],
                                "sweep",
                                {"rank": r, "seed": seed, "algorithm": algo, "scaling": scaling},
                            )
                        )
    return runs


def run_one(run: Run, runs_dir: str) -> dict:
    """Run (or finish) one run in this process and return its compact record."""
    import torch

    torch.set_num_threads(1)  # the study runs one process per core
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, HERE)
    from shadow import ShadowConsensus

    from decaf_lora import algorithms
    from decaf_lora.config import load_config
    from decaf_lora.engine import checkpoint, make_engine

    run_dir = os.path.join(runs_dir, *run.key.split("/"))
    cfg = load_config(None, [*run.overrides, f"name={run.key.replace('/', '-')}", f"out_dir={runs_dir}"])
    wrapped = None
    if cfg.algorithm in ("decaf", "dlora"):  # C5: both consensus rules on the same factors, every round
        wrapped = ShadowConsensus(algorithms.get(cfg.algorithm, **cfg.algorithm_options))
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        resumable = bool(checkpoint.list_shards(run_dir))
        if not resumable and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # a run of this study that finished no round: nothing to keep
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        make_engine(cfg, algorithm=wrapped, run_dir=run_dir, resume=resumable, progress=False).run()
    return record(run, run_dir)


def record(run: Run, run_dir: str) -> dict:
    """What the report needs from a run directory: the summary and the per-round means of the logged diagnostics."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    from shadow import with_relative_gap

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = with_relative_gap([json.loads(line) for line in f if line.strip()])
    rounds = sorted({m["round"] for m in metrics})
    per_round = {}
    for key in (
        "train_loss",
        "consensus_distance",
        "tsvd_tail",
        "tsvd_tail_bound",
        "tsvd_tail_ratio",
        "factor_norm_c",
        "shadow_dlora_gap",
        "shadow_dlora_gap_relative",
        "shadow_dlora_interference",
        "shadow_decaf_truncation",
    ):
        series = []
        for t in rounds:
            vals = [m[key] for m in metrics if m["round"] == t and m.get(key) is not None]
            series.append(None if not vals else {"mean": sum(vals) / len(vals), "max": max(vals)})
        per_round[key] = series
    final = [m for m in metrics if m["round"] == rounds[-1]]
    return {
        "key": run.key,
        "group": run.group,
        **run.info,
        "final_accuracy": [m["eval_accuracy"] for m in sorted(final, key=lambda m: m["agent"])],
        "final_f1": [m["eval_f1"] for m in sorted(final, key=lambda m: m["agent"])],
        "majority_rate": summary["majority_rate"],
        "spectral_gap": summary["spectral_gap"],
        "wall_seconds": summary["wall_seconds"],
        "bytes_sent_per_agent": summary["bytes_sent_per_agent"],
        "rounds": rounds,
        "per_round": per_round,
    }


def write_results(records: list[dict], path: str = RESULTS) -> None:
    from decaf_lora.rundir import write_text

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["key"])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one core each")
    ap.add_argument("--only", default="", help="run only the keys starting with this prefix, e.g. grid/ring")
    ap.add_argument("--list", action="store_true", help="print the planned runs and exit")
    ap.add_argument("--runs-dir", default=RUNS_DIR)
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers={args.workers} is invalid; use 1 or more (one core each).")
    runs = [r for r in planned_runs() if r.key.startswith(args.only)]
    if args.list:
        print("\n".join(r.key for r in runs))
        print(f"{len(runs)} runs")
        return 0
    from tqdm import tqdm

    records = {}  # the committed records of runs not redone now (e.g. with --only) stay in the file
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            records = {rec["key"]: rec for rec in (json.loads(line) for line in f if line.strip())}
    # a run whose directory holds a summary is only read back; everything else is (re)computed
    with (
        ProcessPoolExecutor(max_workers=args.workers) as pool,
        tqdm(total=len(runs), desc="study runs", unit="run") as bar,
    ):
        futures = {pool.submit(run_one, r, args.runs_dir): r for r in runs}
        for fut in as_completed(futures):
            rec = fut.result()
            records[rec["key"]] = rec
            write_results(list(records.values()))  # after every run: an interrupted study keeps what finished
            bar.set_postfix_str(rec["key"])
            bar.update(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
