"""Engines run the round loop; this is the one module that names both and picks between them.

``engine=auto`` (the default) runs the distributed engine when the process was launched by ``torchrun`` with more
than one process, and the simulator otherwise. Asking for ``distributed`` outside torchrun, or for ``simulation``
under a multi-process torchrun (which would run duplicate simulations), is one sentence that says what to do.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import ConfigError, RunConfig, config_differences, load_config
from ..errors import DecafError
from ..registry import ENGINES
from ..rundir import check_run_dir, make_dir, new_run_dir, read_json, verified_identity
from . import checkpoint
from .build import Run, build_run
from .distributed import DistributedEngine, join_process_group, launch_world_size, launched_by_torchrun
from .loop import ROW_SCHEMA, Engine, RunResult
from .simulation import Simulation

ENGINES.register(Simulation, name="simulation")
ENGINES.register(DistributedEngine, name="distributed")

TORCHRUN = "torchrun --nproc-per-node 2 -m decaf_lora run CONFIG.yaml"

__all__ = [
    "ROW_SCHEMA",
    "DistributedEngine",
    "Engine",
    "Run",
    "RunResult",
    "Simulation",
    "build_run",
    "make_engine",
    "resolve_engine",
    "resume",
    "run",
]


def resolve_engine(cfg: RunConfig) -> str:
    """``simulation`` or ``distributed`` for this config in this process (``auto`` decided by how it was launched)."""
    world = launch_world_size()
    if cfg.engine == "distributed" and not launched_by_torchrun():
        raise ConfigError(
            [
                f"engine=distributed must be launched by torchrun, e.g. `{TORCHRUN}`; without torchrun use engine=auto "
                "(the default) or engine=simulation."
            ]
        )
    if cfg.engine == "simulation" and world > 1:
        raise ConfigError(
            [
                f"engine=simulation under torchrun with {world} processes would run {world} duplicate simulations; "
                "drop "
                "engine=simulation (the default, engine=auto, runs one distributed job) or start it with python, not "
                "torchrun."
            ]
        )
    kind = cfg.engine if cfg.engine != "auto" else ("distributed" if world > 1 else "simulation")
    if kind == "simulation" and cfg.faults.slow_rank >= 0:
        raise ConfigError(
            [
                f"faults.slow_rank={cfg.faults.slow_rank} delays a torchrun process; use it with engine=distributed "
                "under "
                "torchrun, or set it to -1."
            ]
        )
    return kind


ENGINES.register(resolve_engine, name="auto")


def make_engine(
    cfg: RunConfig,
    task=None,
    *,
    algorithm=None,
    run_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    write: bool = True,
) -> Engine:
    """The engine for ``cfg``, built and ready to :meth:`~Engine.run` (or to step with :meth:`~Engine.run_round`).

    ``write=False`` keeps everything in memory (no run directory); ``run_dir`` names the directory of a new run
    (it must not exist or be empty) or, with ``resume=True``, the run to continue. ``algorithm`` replaces the
    config's algorithm with an instance (e.g. a wrapper that adds diagnostics).
    """
    if resume and not run_dir:
        raise DecafError("make_engine(resume=True) needs run_dir= naming the run to continue.")
    if run_dir and not resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise DecafError(f"run directory {run_dir!r} is not empty; give a new directory, or resume it with --resume.")
    if resolve_engine(cfg) == "distributed":
        transport = join_process_group(cfg)
        run = build_run(cfg, task, algorithm, device=transport.device)
        return DistributedEngine(run, transport, run_dir=run_dir, progress=progress, resume=resume, write=write)
    engine = Simulation(build_run(cfg, task, algorithm), progress=progress)
    if resume:
        engine.run_dir = run_dir
        engine.restore()
    elif write:
        engine.run_dir = (
            make_dir(run_dir) if run_dir else new_run_dir(cfg.out_dir, cfg.name, engine.algorithm.name, cfg.seed)
        )
        engine.write_setup()
    return engine


def run(config, task=None, progress: bool = False, overrides=(), write: bool = True, algorithm=None) -> RunResult:
    """Python entry point: ``decaf_lora.run("cfg.yaml")``, ``run(RunConfig(...))`` or ``run({"agents": 4, ...})``.

    Pass ``task`` to train your own model and data (see :class:`decaf_lora.tasks.ModuleTask`). Under torchrun with
    several processes (and ``engine=auto``) this runs the distributed engine; every process returns the result.
    """
    if isinstance(config, RunConfig):
        config = config.to_dict()
    cfg = load_config(config, overrides)
    return make_engine(cfg, task, algorithm=algorithm, progress=progress, write=write).run()


def resume(run_dir: str, overrides=(), task=None, progress: bool = False, algorithm=None) -> RunResult:
    """Continue a run from its newest complete, verified round; the result equals that of an uninterrupted run.

    ``overrides`` may only restate the run's own config (and change ``device`` or ``engine``: placement never
    changes the numbers): a resume with a different config is refused, since it would silently mix two
    experiments in one directory. Every file the resume reads is verified against what the run wrote.
    """
    if not os.path.isdir(run_dir):
        check_run_dir(run_dir, ())
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise DecafError(
            f"{run_dir!r} holds no config.yaml: the run was stopped before it wrote anything, so there is nothing to "
            "resume; start it again with `decaf run`."
        )
    verified_identity(run_dir)
    stored = load_config(config_path)
    wanted = load_config(stored.to_dict(), overrides)
    differ = config_differences(stored.to_dict(), wanted.to_dict())
    if differ:
        raise ConfigError(
            [
                f"cannot resume {run_dir!r} with a different config ({'; '.join(differ)}); drop those overrides or "
                "start a new run."
            ]
        )
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return finished_result(run_dir, wanted)
    return make_engine(wanted, task, algorithm=algorithm, run_dir=run_dir, resume=True, progress=progress).run()


def finished_result(run_dir: str, cfg: RunConfig) -> RunResult:
    """A finished run's result, believed only as far as it checks out: the last round's checkpoint and metrics are
    verified, and the summary's headline accuracy must be the one those rows give."""
    path = os.path.join(run_dir, "summary.json")
    summary = read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("final_accuracy"), dict):
        raise DecafError(f"{path!r} is not a run summary; the file is damaged.")
    found, rows = checkpoint.verified_history(run_dir, verified_identity(run_dir), cfg.agents)
    last = [r for r in rows if r["round"] == cfg.rounds]
    final = [r.get("eval_accuracy") for r in last]
    fa = summary["final_accuracy"]

    def mean_of(key: str):
        values = [r.get(key) for r in last]
        return None if None in values or not values else float(np.mean(values))

    same = (
        found is not None
        and found.round == cfg.rounds
        and len(final) == cfg.agents
        and None not in final
        and [fa.get("mean"), fa.get("min"), fa.get("max")] == [float(np.mean(final)), min(final), max(final)]
        and summary.get("final_f1_mean") == mean_of("eval_f1")
        and summary.get("final_consensus_distance") == mean_of("consensus_distance")
    )
    if not same:
        raise DecafError(
            f"{path!r} does not match the run's verified checkpoint and metrics; remove it and resume the run to "
            "compute it again."
        )
    return RunResult(run_dir, summary, rows)


def verified_run(run_dir: str) -> RunResult:
    """A finished run read back from its directory, every number checked against what the run wrote (for reports:
    a copied, edited or half-deleted run directory is refused, never summarized)."""
    check_run_dir(run_dir, ("config.yaml", "metrics.jsonl", "summary.json"))
    verified_identity(run_dir)
    return finished_result(run_dir, load_config(os.path.join(run_dir, "config.yaml")))
