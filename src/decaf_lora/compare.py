"""``decaf compare`` and :func:`compare`: several methods on one config, the same data split and, per seed, the same
initialization; one table and one plot.

The Python form also takes your own task (a :class:`~decaf_lora.tasks.ModuleTask`), built once and shared by every
run, so a custom model is compared exactly like the built-in ones.
"""

from __future__ import annotations

import os

from .config import ConfigError, RunConfig, load_config
from .registry import ALGORITHMS
from .rundir import fresh_dir, write_json, write_text

DEFAULT = ("decaf", "dlora", "dlora-fa", "local", "fedavg")


def method_names(algorithms) -> list[str]:
    """Canonical method names from a list or a comma-separated string; ``all`` means every registered method."""
    if isinstance(algorithms, str):
        algorithms = [a.strip() for a in algorithms.split(",") if a.strip()]
    algorithms = list(algorithms)
    if not algorithms:
        raise ConfigError(["--algorithms is empty; name at least one method, e.g. decaf,dlora, or all."])
    if [a.lower() for a in algorithms] == ["all"]:
        return ALGORITHMS.names()
    problems, names = [], []
    for a in algorithms:
        if a in ALGORITHMS:
            names.append(ALGORITHMS.canonical(a))
        else:
            problems.append(
                f"--algorithms names {a!r}, which is not known; choose from: all, {', '.join(ALGORITHMS.names())}."
            )
    if problems:
        raise ConfigError(problems)
    return list(dict.fromkeys(names))


def compare(
    config=None, algorithms=DEFAULT, seeds: int = 1, *, task=None, overrides=(), progress: bool = False
) -> dict:
    """Run each method for ``seeds`` training seeds on one config; returns the output directory, the markdown table
    and every run's summary. ``config``: a YAML path, a mapping or a :class:`RunConfig`; ``task``: your own task."""
    from .engine import make_engine
    from .report import compare_table, plot_compare

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError([f"--seeds={seeds} is invalid; use 1 or more."])
    names = method_names(algorithms)
    if isinstance(config, RunConfig):
        config = config.to_dict()
    overrides = list(overrides)
    base = load_config(config, overrides)
    # every run's config is checked before the first one trains: a method that refuses the config (ranks, options)
    # must not be found out hours into the comparison
    planned, problems = [], []
    for seed in range(seeds):
        for algo in names:
            # the base config's algorithm options belong to its own algorithm only
            extra = [] if algo == base.algorithm else ["algorithm_options={}"]
            try:
                planned.append(
                    load_config(config, [*overrides, f"algorithm={algo}", f"seed={base.seed + seed}", *extra])
                )
            except ConfigError as exc:
                problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise ConfigError(problems)
    out_dir, leader = _output_dir(base)
    summaries, dirs = [], {}
    for cfg in planned:
        cfg.out_dir = out_dir
        res = make_engine(cfg, task, progress=progress).run()
        summaries.append(res.summary)
        dirs.setdefault(res.summary["algorithm"], []).append(res.run_dir)
    table = compare_table(summaries)
    if leader:
        title = f"# {base.name}: comparison over {seeds} seed(s)\n\n{table}\n\n![accuracy](compare.png)\n"
        write_text(os.path.join(out_dir, "compare.md"), title)
        write_json(os.path.join(out_dir, "compare.json"), {"summaries": summaries, "runs": dirs})
        plot_compare(dirs, os.path.join(out_dir, "compare.png"))
    return {"dir": out_dir, "table": table, "summaries": summaries}


def _output_dir(base) -> tuple[str, bool]:
    """The comparison's directory and whether this process writes its files: under a multi-process torchrun, process 0
    creates it and every process learns its name (each would otherwise make one of its own)."""
    from .engine import resolve_engine
    from .engine.distributed import join_process_group

    if resolve_engine(base) != "distributed":
        return fresh_dir(base.out_dir, f"compare-{base.name}"), True
    transport = join_process_group(base)
    made = fresh_dir(base.out_dir, f"compare-{base.name}") if transport.rank == 0 else None
    return transport.broadcast_json(made), transport.rank == 0


def run_comparison(path: str | None, overrides: list[str], algos: list[str], seeds: int, progress: bool = True) -> dict:
    """The CLI's form of :func:`compare`."""
    return compare(path, algos, seeds, overrides=overrides, progress=progress)
