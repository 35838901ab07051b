"""The reproduction study's runs: which ones, at what budget, and a resumable parallel runner.

Every run is one ``decaf run`` of the library (the same Simulation users get) on the real pretrained MiniLM and the
real tweets, scaled down to fit a 2-core machine (see ``BUDGET``). A run is named by a key that spells its
settings; its directory holds the usual run files. A run whose compact record is already in
``reproduce/results/runs.jsonl`` (with the same overrides) is not run again: the committed records are the study's
memory, so a later session only adds the runs the plan gained. Otherwise the runner reads finished runs back from
their directories and resumes half-finished ones from their last checkpoint, so an interrupted ``make reproduce``
loses at most the rounds in progress. ``--redo`` ignores the records and recomputes (a fresh clone with ``--redo``
recomputes everything).

Groups of runs (the key's first word): ``grid`` (DeCAF and the baselines on every topology and partition),
``peers`` (every other registered method on the ring and the complete graph, same seeds and budget: the list comes
from the registry, so a method added later joins the plan by itself), ``peers-diag`` (ADF-LoRA with its head
trained, to explain a claim), ``hetrank`` (agents of ranks 2, 4 and 8),
``ablation`` (DeCAF's policies) and ``sweep`` (the rank sweep of claim C5).

Run: ``python reproduce/study.py [--workers 2] [--only KEY_PREFIX] [--list] [--redo]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
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


def budget_value(name: str) -> str:
    """A setting of ``BUDGET`` (e.g. the number of agents), so that the plan and the report never restate it."""
    return dict(o.split("=", 1) for o in BUDGET)[name]


SEEDS = (0, 1, 2)
TOPOLOGIES = ("ring", "complete", "bipartite")
PARTITIONS = {
    "iid": ["partition.scheme=iid"],
    "round-robin": ["partition.scheme=round_robin"],
    "dirichlet-0.1": ["partition.scheme=dirichlet", "partition.alpha=0.1"],
}
GOSSIP = ("decaf", "dlora", "dlora-fa")
NO_GRAPH = ("local", "fedavg")  # neither depends on the graph: run once per split, reported under every topology
# The peer methods run on the two extremes of connectivity that the grid already has for the baselines: the sparse
# ring (slowest mixing, where the peers' claims about cross terms and switching intervals should show most) and the
# complete graph (one mix is an exact average). The bipartite graph is left to the grid: it would cost 3 partitions x
# 3 seeds = 9 more runs per method, for a setting where no method learns much at this budget.
PEER_TOPOLOGIES = ("ring", "complete")
# One diagnostic, not a tuning: ADF-LoRA (like the papers' setting) freezes the classification head, which in this
# task is randomly initialised, while DLoRA trains and averages it. The same runs with the head trained separate
# that difference from the alternation itself when the report tests "ADF-LoRA beats DLoRA". (label, algo, overrides)
PEER_DIAGNOSTICS = [("adf-lora+head-trained", "adf-lora", ["algorithm_options={head: trained}"])]
# Heterogeneous ranks: the short list is repeated over the agents (agent a has rank HET_RANKS[a % 3]), factors are
# stored at the padded width HET_RANK, and alpha keeps the LoRA scale alpha / width at the grid's 2 (8 / 4), so that
# a rank-4 agent here trains exactly as one of the grid's. The methods are the ones built for different ranks (and
# DeCAF, whose truncation handles them too); FedHL is the library's reading of it (no public code).
HET_RANKS = (2, 4, 8)
HET_RANK = max(HET_RANKS)
HET_ALPHA = float(budget_value("lora.alpha")) / int(budget_value("lora.rank")) * HET_RANK  # BUDGET's scale (2)
HET_METHODS = ("decaf", "flexlora", "hetlora", "fedhl")
HET_TOPOLOGIES = ("ring", "complete")
# IID isolates the effect of the ranks; Dirichlet 0.1 adds label skew. Round-robin is left out on purpose: it gives
# agent a the class a % 3, the same pattern as the ranks (a % 3), so every rank group would be one class and the
# rank groups' accuracies would measure the classes, not the ranks.
HET_PARTITIONS = ("iid", "dirichlet-0.1")
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
    group: str  # grid, peers, peers-diag, hetrank, ablation or sweep
    info: dict = field(default_factory=dict)


def peer_methods() -> list[str]:
    """Every registered method the grid does not already run: the registry's list, so a new method joins by itself."""
    from decaf_lora import algorithms

    return [a for a in algorithms.available() if a not in (*GOSSIP, *NO_GRAPH)]


def het_agent_ranks() -> list[int]:
    """Each agent's rank in the heterogeneous runs (``lora.ranks`` repeated over the agents, as the config does)."""
    return [HET_RANKS[a % len(HET_RANKS)] for a in range(int(budget_value("agents")))]


def planned_runs() -> list[Run]:
    """Every run of the study, seed 0 of everything first so that a partial study is already a complete picture."""
    runs: list[Run] = []
    peers = peer_methods()
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
        for part, part_o in PARTITIONS.items():
            for topo in PEER_TOPOLOGIES:
                for algo in peers:
                    runs.append(
                        Run(
                            f"peers/{topo}/{part}/{algo}/s{seed}",
                            [*BUDGET, *part_o, *seed_o, f"topology.name={topo}", f"algorithm={algo}"],
                            "peers",
                            {"topology": topo, "partition": part, "algorithm": algo, "seed": seed},
                        )
                    )
        for part, part_o in PARTITIONS.items():
            for topo in PEER_TOPOLOGIES:
                for label, algo, extra in PEER_DIAGNOSTICS:
                    runs.append(
                        Run(
                            f"peers-diag/{topo}/{part}/{label}/s{seed}",
                            [*BUDGET, *part_o, *seed_o, f"topology.name={topo}", f"algorithm={algo}", *extra],
                            "peers-diag",
                            {"topology": topo, "partition": part, "algorithm": algo, "label": label, "seed": seed},
                        )
                    )
        for part in HET_PARTITIONS:
            for topo in HET_TOPOLOGIES:
                for algo in HET_METHODS:
                    runs.append(
                        Run(
                            f"hetrank/{topo}/{part}/{algo}/s{seed}",
                            [
                                *BUDGET,
                                *PARTITIONS[part],
                                *seed_o,
                                f"topology.name={topo}",
                                f"algorithm={algo}",
                                f"lora.rank={HET_RANK}",
                                f"lora.alpha={HET_ALPHA}",
                                f"lora.ranks=[{','.join(map(str, HET_RANKS))}]",
                            ],
                            "hetrank",
                            {
                                "topology": topo,
                                "partition": part,
                                "algorithm": algo,
                                "seed": seed,
                                "agent_ranks": het_agent_ranks(),
                            },
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
    # C5: both consensus rules on the same factors, every round; only where the report reads it (grid, ablation,
    # sweep: the shadow compares equal-rank factors and costs a second mix per round)
    if cfg.algorithm in ("decaf", "dlora") and run.group in ("grid", "ablation", "sweep"):
        wrapped = ShadowConsensus(algorithms.get(cfg.algorithm, **cfg.algorithm_options))
    declared = list((wrapped or algorithms.get(cfg.algorithm, **cfg.algorithm_options)).stats)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        resumable = bool(checkpoint.list_shards(run_dir))
        if not resumable and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # a run of this study that finished no round: nothing to keep
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        make_engine(cfg, algorithm=wrapped, run_dir=run_dir, resume=resumable, progress=False).run()
    return record(run, run_dir, declared)


# The diagnostics every record keeps, whatever the method (the report's C1-C5 read them); a method's own declared
# statistics (``Algorithm.stats``) are added to these per run, so a new method's diagnostics reach the records
# without a change here.
PER_ROUND_KEYS = (
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
)


def record(run: Run, run_dir: str, declared: list[str] | tuple[str, ...] = ()) -> dict:
    """What the report needs from a run directory: the summary, the per-round mean and max over agents of the logged
    diagnostics (the fixed ones and every statistic the method declares), each agent's final rank, and the overrides
    (so that a changed plan is recognised as a different run)."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    from shadow import with_relative_gap

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = with_relative_gap([json.loads(line) for line in f if line.strip()])
    rounds = sorted({m["round"] for m in metrics})
    per_round = {}
    for key in dict.fromkeys([*PER_ROUND_KEYS, *declared]):
        series = []
        for t in rounds:
            vals = [m[key] for m in metrics if m["round"] == t and m.get(key) is not None]
            series.append(None if not vals else {"mean": sum(vals) / len(vals), "max": max(vals)})
        per_round[key] = series
    final = sorted((m for m in metrics if m["round"] == rounds[-1]), key=lambda m: m["agent"])
    return {
        "key": run.key,
        "group": run.group,
        **run.info,
        "overrides": list(run.overrides),
        "stats": list(declared),
        "final_accuracy": [m["eval_accuracy"] for m in final],
        "final_f1": [m["eval_f1"] for m in final],
        "final_rank": [m.get("rank") for m in final],
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


def add_record(rec: dict, path: str = RESULTS) -> None:
    """Add one finished run to the file as it is now, under a lock: two studies at once (say ``--only peers`` and
    ``--only hetrank``) each add their own runs and never drop the other's."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = load_records(path)
        records[rec["key"]] = rec
        write_results(list(records.values()), path)


def load_records(path: str | None = None) -> dict[str, dict]:
    """The records finished so far (of ``RESULTS``, read when called), by key."""
    path = path or RESULTS
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {rec["key"]: rec for rec in (json.loads(line) for line in f if line.strip())}


def is_recorded(run: Run, rec: dict | None) -> bool:
    """Whether ``rec`` is this run's finished record. Records written before the overrides were stored (the first
    153 runs) are taken as they are: their keys spell their settings and the plan kept those keys unchanged."""
    return rec is not None and rec.get("overrides", run.overrides) == run.overrides


def runs_to_do(runs: list[Run], records: dict[str, dict], redo: bool = False) -> list[Run]:
    """The runs still to compute, in plan order (seed 0 first): those without a matching record, or all with redo."""
    return [r for r in runs if redo or not is_recorded(r, records.get(r.key))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one core each")
    ap.add_argument("--only", default="", help="run only the keys starting with this prefix, e.g. grid/ring")
    ap.add_argument("--list", action="store_true", help="print the planned runs and exit")
    ap.add_argument("--redo", action="store_true", help="recompute runs that already have a record")
    ap.add_argument("--runs-dir", default=RUNS_DIR)
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers={args.workers} is invalid; use 1 or more (one core each).")
    runs = [r for r in planned_runs() if r.key.startswith(args.only)]
    records = load_records()  # the committed records of runs not redone now (e.g. with --only) stay in the file
    todo = runs_to_do(runs, records, args.redo)
    if args.list:
        print("\n".join(f"{r.key}{'' if r in todo else '  (recorded)'}" for r in runs))
        counts = Counter(r.group for r in runs)
        print(f"{len(runs)} runs ({', '.join(f'{g}: {n}' for g, n in counts.items())}); {len(todo)} still to run")
        return 0
    from tqdm import tqdm

    # a run whose directory holds a summary is only read back; everything else is (re)computed
    with (
        ProcessPoolExecutor(max_workers=args.workers) as pool,
        tqdm(total=len(todo), desc="study runs", unit="run") as bar,
    ):
        futures = {pool.submit(run_one, r, args.runs_dir): r for r in todo}
        for fut in as_completed(futures):
            rec = fut.result()
            add_record(rec)  # after every run: an interrupted study keeps what finished
            bar.set_postfix_str(rec["key"])
            bar.update(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
