"""``decaf compare``: several methods on one config, same data split and, per seed, the same initialization."""

from __future__ import annotations

import os
import time

from .config import ConfigError, load_config
from .rundir import write_json, write_text


def run_comparison(path: str | None, overrides: list[str], algos: list[str], seeds: int, progress: bool = True) -> dict:
    from . import algorithms
    from .engine import Simulation
    from .report import compare_table, plot_compare

    if seeds < 1:
        raise ConfigError([f"--seeds={seeds} is invalid; use 1 or more."])
    if not algos:
        raise ConfigError(["--algorithms is empty; name at least one method, e.g. decaf,dlora."])
    problems = []
    for a in algos:
        if a.strip().lower().replace("_", "-") not in algorithms.available():
            problems.append(
                f"--algorithms names {a!r}, which is not known; choose from: {', '.join(algorithms.available())}."
            )
    if problems:
        raise ConfigError(problems)
    base = load_config(path, overrides)  # validates once, before any training
    out_dir = os.path.join(base.out_dir, f"compare-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    summaries, dirs = [], {}
    for seed in range(seeds):
        for algo in algos:
            # the base config's algorithm options belong to its own algorithm only
            extra = [] if algo == base.algorithm else ["algorithm_options={}"]
            cfg = load_config(
                path, [*overrides, f"algorithm={algo}", f"seed={base.seed + seed}", f"out_dir={out_dir}", *extra]
            )
            sim = Simulation(cfg, progress=progress)
            res = sim.run()
            summaries.append(res.summary)
            dirs.setdefault(res.summary["algorithm"], []).append(res.run_dir)
    table = compare_table(summaries)
    write_text(
        os.path.join(out_dir, "compare.md"),
        f"# {base.name}: comparison over {seeds} seed(s)\n\n{table}\n\n![accuracy](compare.png)\n",
    )
    write_json(os.path.join(out_dir, "compare.json"), {"summaries": summaries, "runs": dirs})
    plot_compare(dirs, os.path.join(out_dir, "compare.png"))
    return {"dir": out_dir, "table": table, "summaries": summaries}
