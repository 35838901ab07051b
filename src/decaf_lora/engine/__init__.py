"""Engines run the round loop; this is the one module that names both and picks between them.

``engine=auto`` (the default) runs the distributed engine when the process was launched by ``torchrun`` with more
than one process, and the simulator otherwise. Asking for ``distributed`` outside torchrun, or for ``simulation``
under a multi-process torchrun (which would run duplicate simulations), is one sentence that says what to do.
"""

from __future__ import annotations

import os

from ..config import ConfigError, RunConfig, load_config
from ..errors import DecafError
from ..registry import ENGINES
from ..rundir import check_run_dir, file_digest, new_run_dir, read_identity, read_json, read_metrics
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
    if resolve_engine(cfg) == "distributed":
        transport = join_process_group(cfg)
        return DistributedEngine(
            build_run(cfg, task, algorithm), transport, run_dir=run_dir, progress=progress, resume=resume
        )
    if run_dir and not resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise DecafError(f"run directory {run_dir!r} is not empty; give a new directory, or resume it with --resume.")
    engine = Simulation(build_run(cfg, task, algorithm), progress=progress)
    if resume:
        engine.run_dir = run_dir
        engine.restore()
    elif write:
        engine.run_dir = run_dir or new_run_dir(cfg.out_dir, cfg.name, engine.algorithm.name, cfg.seed)
        os.makedirs(engine.run_dir, exist_ok=True)
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


#: Settings that may differ on resume: where the run executes, never what it computes.
PLACEMENT = ("device", "engine")


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
    identity = read_identity(run_dir)
    if identity is None:
        raise DecafError(
            f"{run_dir!r} has no run.json, so it cannot be proven to be a run of this decaf-lora (an older version "
            "wrote it, or it is not a run); start a new run."
        )
    if file_digest(config_path) != identity["config_sha256"]:
        raise DecafError(
            f"{config_path!r} was changed after the run started (its digest differs from run.json's); restore it, or "
            "start a new run."
        )
    stored = load_config(config_path)
    wanted = load_config(stored.to_dict(), overrides)
    differ = [
        f"{k}: {a!r} in the run, {b!r} now"
        for k, a, b in _diff(stored.to_dict(), wanted.to_dict())
        if k not in PLACEMENT
    ]
    if differ:
        raise ConfigError(
            [
                f"cannot resume {run_dir!r} with a different config ({'; '.join(differ)}); drop those overrides or "
                "start a new run."
            ]
        )
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        summary = read_json(os.path.join(run_dir, "summary.json"))
        if not isinstance(summary, dict) or "final_accuracy" not in summary:
            raise DecafError(f"{os.path.join(run_dir, 'summary.json')!r} is not a run summary; the file is damaged.")
        return RunResult(run_dir, summary, read_metrics(run_dir))
    return make_engine(wanted, task, algorithm=algorithm, run_dir=run_dir, resume=True, progress=progress).run()


def _diff(a: dict, b: dict, prefix: str = ""):
    for k in a:
        if isinstance(a[k], dict) and isinstance(b.get(k), dict) and k not in ("algorithm_options", "params"):
            yield from _diff(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b.get(k):
            yield prefix + k, a[k], b.get(k)
