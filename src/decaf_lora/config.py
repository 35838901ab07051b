"""One dataclass tree for a run: YAML file, then ``key=value`` overrides, then validation of everything at once.

Every field carries help text (``decaf run --help-config`` prints them all). Validation collects every problem
before anything runs and raises one :class:`ConfigError` whose lines are one sentence each, naming the field, the
bad value and what is allowed; the CLI prints them and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import DecafError


class ConfigError(DecafError):
    """One or more invalid configuration fields; ``problems`` holds one sentence per field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _f(default, help: str, **kw):  # noqa: A002 - 'help' reads best at the call sites
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TopologyConfig:
    name: str = _f(
        "ring",
        "communication graph: ring, complete, torus, grid, star, bipartite, exponential, erdos_renyi, small_world, edges",
    )
    mixing: str = _f("metropolis", "mixing rule: metropolis, uniform, max-degree, lazy")
    schedule: str = _f("static", "per-round graph: static, one_peer_exponential, random_matching, link_failures")
    link_drop: float = _f(0.0, "probability that a link fails in a round (schedule=link_failures)")
    params: dict = _f({}, "graph parameters, e.g. {hubs: 2}, {p: 0.3, seed: 1}, {edges: path/to/edges.txt}")


@dataclass
class PartitionConfig:
    scheme: str = _f("dirichlet", "how data is split over agents: iid, dirichlet, round_robin, shards, natural")
    alpha: float = _f(1.0, "Dirichlet concentration (scheme=dirichlet): 0.1 strongly skewed, 100 nearly IID")
    min_size: int = _f(16, "smallest number of training examples an agent may get (scheme=dirichlet)")
    shards_per_agent: int = _f(2, "label-sorted shards per agent (scheme=shards)")
    key: str = _f("", "column holding the natural key, e.g. a user id (scheme=natural)")
    local_eval: int = _f(64, "examples held out of each agent's own data for its local evaluation (0 = none)")


@dataclass
class LoraConfig:
    rank: int = _f(4, "LoRA rank r")
    alpha: float = _f(8.0, "LoRA alpha (PEFT's lora_alpha): scale = alpha / r, or alpha / sqrt(r) with rslora")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    targets: list = _f([], "module names to adapt; empty = the task's default (query, key, value, dense for BERT)")
    rslora: bool = _f(False, "rank-stabilized scaling alpha / sqrt(r) (CLIP-LoRA's convention)")


@dataclass
class OptimConfig:
    lr: float = _f(4e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine schedule")
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine decay")
    grad_clip: float = _f(1.0, "clip each agent's gradient norm to this (0 = off)")
    state_after_mix: str = _f(
        "reset", "AdamW moments after each mixing step: reset (they refer to the old basis) or keep"
    )


@dataclass
class TaskConfig:
    kind: str = _f("text", "task: text (sequence classification), clip (few-shot image classification), causal_lm")
    model: str = _f(
        "minilm",
        "base model: minilm (pip-shipped all-MiniLM-L6-v2; for causal_lm it means random-tiny-llama), random-tiny-clip, random-tiny-llama, a local directory or a hub name",
    )
    dataset: str = _f(
        "tweets", "data: tweets (38k labelled tweets), digits, mnist, a .csv/.jsonl file, an image folder, or hf:NAME"
    )
    text_column: str = _f("text", "column with the input text (csv/jsonl); several columns joined: passage,question")
    label_column: str = _f("label", "column with the label (csv/jsonl)")
    max_length: int = _f(32, "tokens per example after truncation")
    train_examples: int = _f(6000, "training examples drawn from the data set before splitting over agents (0 = all)")
    test_examples: int = _f(400, "examples held out as the shared test set")
    batch_size: int = _f(16, "local mini-batch size")
    eval_batch_size: int = _f(128, "batch size for evaluation")
    shots: int = _f(0, "few-shot: training examples per class per agent (0 = use train_examples)")
    dtype: str = _f(
        "float32",
        "weights of a pretrained base model: float32, bfloat16 or float16 (LoRA factors and their mixing stay float32)",
    )
    label_names: list = _f(
        [], "words for the classes in sorted label order, e.g. [no, yes] (used by clip prompts and causal_lm answers)"
    )


@dataclass
class FaultsConfig:
    link_drop: float = _f(0.0, "probability that each link is down in a round, on top of the topology's schedule")
    agent_dropout: float = _f(0.0, "probability that an agent sits a round out (no training, no exchange)")
    poison_agent: int = _f(-1, "for testing defences: this agent sends broken payloads (-1 = nobody)")
    poison: str = _f("nan", "what the poisoned agent sends: nan, shape (a wrong shape) or scale (huge values)")
    max_norm: float = _f(1e4, "reject a received factor whose Frobenius norm exceeds this (0 = no bound)")
    timeout: float = _f(
        300.0,
        "engine=distributed: seconds a process waits for a neighbour's process at the exchange; a late one is left out of that round's mix (weights renormalized, logged as timed_out)",
    )
    collective_timeout: float = _f(
        1800.0,
        "engine=distributed: seconds before a process that never joins the round's collectives (metrics, checkpoint) fails the job; torchrun --max-restarts then resumes it",
    )
    slow_rank: int = _f(
        -1,
        "for testing timeouts (engine=distributed): this process sleeps slow_seconds before the exchange (-1 = none)",
    )
    slow_seconds: float = _f(0.0, "how long the slow process sleeps")
    slow_rounds: list = _f([], "rounds (1-based, as in the metrics) in which it is slow; empty = every round")


@dataclass
class RunConfig:
    name: str = _f("demo", "a label for the run; the run directory is named after it")
    algorithm: str = _f("decaf", "aggregation method: decaf, dlora, dlora-fa, local, fedavg")
    algorithm_options: dict = _f({}, "method options, e.g. {split: balanced, gauge: procrustes} for decaf")
    agents: int = _f(8, "number of agents")
    rounds: int = _f(12, "communication rounds")
    local_steps: int = _f(5, "local optimizer steps per agent between exchanges")
    eval_every: int = _f(6, "evaluate every this many rounds (and always after the last)")
    seed: int = _f(0, "training seed: initialization, batch order, dropout")
    split_seed: int = _f(0, "data-split seed: test hold-out, subsampling and the partition over agents")
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto")
    out_dir: str = _f("runs", "where run directories are created")
    engine: str = _f("simulation", "simulation (one process, one shared base model) or distributed (under torchrun)")
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: ``section=value`` sets the section's main field: ``topology=torus``, ``partition=iid``, ``task=clip``.
SECTION_SHORTCUTS = {"topology": "name", "partition": "scheme", "task": "kind", "lora": "rank"}


def _sections(cls=RunConfig) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def field_help(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_help(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((prefix + f.name, f.metadata.get("help", ""), default))
    return rows


def _leaf_names_of(section: str) -> list[str]:
    return [n for n in _leaf_names() if n.startswith(section + ".")]


def _leaf_names() -> list[str]:
    return [name for name, _, _ in field_help()]


def _coerce(path: str, value: Any, typ: type, problems: list[str]) -> Any:
    """Check one leaf value against its declared type; ints are accepted for floats, '5e-3' for a float."""
    if typ in (int, float) and isinstance(value, str):
        try:
            value = typ(value)
        except ValueError:
            pass
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
        list: isinstance(value, (list, tuple)) or isinstance(value, str),
        dict: isinstance(value, dict),
    }[typ]
    if not ok:
        kind = {
            int: "an integer",
            float: "a number",
            bool: "true or false",
            str: "a string",
            list: "a list",
            dict: "a mapping",
        }[typ]
        problems.append(f"{path}={value!r} has the wrong type; it must be {kind}.")
        return None
    if typ is float:
        return float(value)
    if typ is str:
        return str(value)
    if typ is list:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    return value


def _apply(cfg: RunConfig, data: dict, problems: list[str], origin: str) -> None:
    sections = _sections()
    leaves = _leaf_names()
    for key, value in data.items():
        parts = str(key).split(".")
        if parts[0] in sections and len(parts) == 1 and isinstance(value, dict):
            _apply(cfg, {f"{parts[0]}.{k}": v for k, v in value.items()}, problems, origin)
            continue
        if parts[0] in sections and len(parts) == 1:
            if parts[0] not in SECTION_SHORTCUTS:
                problems.append(
                    f"{origin} sets '{parts[0]}', which is a section; set its fields, e.g. {_leaf_names_of(parts[0])[0]}=..."
                )
                continue
            parts = [parts[0], SECTION_SHORTCUTS[parts[0]]]
        dotted = ".".join(parts)
        if dotted not in leaves:
            close = difflib.get_close_matches(dotted, leaves, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see `decaf run --help-config` for the fields."
            problems.append(f"{origin} sets unknown field '{dotted}'{hint}")
            continue
        target = cfg
        for p in parts[:-1]:
            target = getattr(target, p)
        typ = typing.get_type_hints(type(target))[parts[-1]]
        coerced = _coerce(dotted, value, typ, problems)
        if coerced is not None:
            setattr(target, parts[-1], coerced)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, true/false, [lists], {maps}); strings stay strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {text!r} is not of the form key=value; write e.g. agents=16 or lora.rank=8."])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | dict | None = None, overrides: list[str] | tuple[str, ...] = (), validate: bool = True
) -> RunConfig:
    """Defaults, then the YAML file or mapping (if any), then overrides; every problem reported at once."""
    cfg = RunConfig()
    problems: list[str] = []
    if isinstance(path, dict):
        _apply(cfg, path, problems, "config")
    elif path is not None:
        if not os.path.isfile(path):
            raise ConfigError([f"config file {path!r} does not exist; give the path of a YAML file (see examples/)."])
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError([f"config file {path!r} is not valid YAML{where}; fix the syntax."]) from None
        if not isinstance(data, dict):
            raise ConfigError(
                [f"config file {path!r} must hold a mapping of fields (key: value), not {type(data).__name__}."]
            )
        _apply(cfg, data, problems, f"config file {os.path.basename(path)}")
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems += exc.problems
            continue
        _apply(cfg, {key: value}, problems, f"override '{text}'")
    if validate:  # semantic checks run even after type errors, so the user sees every problem in one go
        try:
            validate_config(cfg)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _choice(problems, name, value, allowed) -> None:
    if value not in allowed:
        problems.append(f"{name}={value!r} is not known; choose one of: {', '.join(sorted(allowed))}.")


def validate_config(cfg: RunConfig) -> RunConfig:
    """Semantic checks that need no model or data: ranges, names, combinations."""
    from . import algorithms
    from .lowrank import GAUGES, SPLITS
    from .partition import SCHEMES
    from .topology import GRAPHS, RULES, SCHEDULES
    from .topology.graphs import _ALIASES as GRAPH_ALIASES

    p: list[str] = []

    def positive(name, value, minimum=1):
        if value is not None and value < minimum:
            p.append(f"{name}={value} is too small; use a value >= {minimum}.")

    positive("agents", cfg.agents)
    positive("rounds", cfg.rounds)
    positive("local_steps", cfg.local_steps)
    positive("eval_every", cfg.eval_every)
    positive("lora.rank", cfg.lora.rank)
    positive("task.batch_size", cfg.task.batch_size)
    positive("task.eval_batch_size", cfg.task.eval_batch_size)
    positive("task.max_length", cfg.task.max_length, 2)
    positive("task.test_examples", cfg.task.test_examples)
    positive("task.train_examples", cfg.task.train_examples, 0)
    positive("task.shots", cfg.task.shots, 0)
    positive("partition.local_eval", cfg.partition.local_eval, 0)
    positive("partition.shards_per_agent", cfg.partition.shards_per_agent)
    positive("partition.min_size", cfg.partition.min_size, 1)
    positive("optim.warmup_steps", cfg.optim.warmup_steps, 0)
    if not cfg.optim.lr > 0:
        p.append(f"optim.lr={cfg.optim.lr} is invalid; use a positive learning rate such as 1e-3.")
    elif cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        p.append(f"optim.min_lr={cfg.optim.min_lr} is invalid; use a value from 0 to optim.lr={cfg.optim.lr}.")
    for name, value in (
        ("optim.weight_decay", cfg.optim.weight_decay),
        ("optim.grad_clip", cfg.optim.grad_clip),
        ("lora.alpha", cfg.lora.alpha),
    ):
        if value < 0:
            p.append(f"{name}={value} is invalid; use a value >= 0.")
    if not 0 <= cfg.lora.dropout < 1:
        p.append(f"lora.dropout={cfg.lora.dropout} is invalid; use a probability in [0, 1).")
    if not 0 <= cfg.topology.link_drop < 1:
        p.append(f"topology.link_drop={cfg.topology.link_drop} is invalid; use a probability in [0, 1).")
    if cfg.topology.link_drop > 0 and cfg.topology.schedule == "static":
        cfg.topology.schedule = "link_failures"
    for name, value in (("faults.link_drop", cfg.faults.link_drop), ("faults.agent_dropout", cfg.faults.agent_dropout)):
        if not 0 <= value < 1:
            p.append(f"{name}={value} is invalid; use a probability in [0, 1).")
    if not -1 <= cfg.faults.poison_agent < cfg.agents:
        p.append(
            f"faults.poison_agent={cfg.faults.poison_agent} is out of range; use -1 (nobody) or an agent from 0 to {cfg.agents - 1}."
        )
    _choice(p, "faults.poison", cfg.faults.poison, {"nan", "shape", "scale"})
    if cfg.faults.max_norm < 0:
        p.append(f"faults.max_norm={cfg.faults.max_norm} is invalid; use a positive bound, or 0 for none.")
    if not cfg.partition.alpha > 0:
        p.append(
            f"partition.alpha={cfg.partition.alpha} is invalid; use a positive number (0.1 skewed, 100 nearly IID)."
        )
    _choice(p, "algorithm", cfg.algorithm.strip().lower().replace("_", "-"), algorithms.available())
    _choice(p, "topology.name", cfg.topology.name.strip().lower().replace("-", "_"), set(GRAPHS) | set(GRAPH_ALIASES))
    _choice(
        p, "topology.mixing", cfg.topology.mixing.strip().lower().replace("_", "-"), set(RULES) | {"max_degree", "mh"}
    )
    _choice(p, "topology.schedule", cfg.topology.schedule.strip().lower().replace("-", "_"), SCHEDULES)
    _choice(p, "partition.scheme", cfg.partition.scheme.strip().lower().replace("-", "_"), SCHEMES)
    _choice(p, "optim.state_after_mix", cfg.optim.state_after_mix, {"reset", "keep"})
    _choice(p, "task.kind", cfg.task.kind, {"text", "clip", "causal_lm"})
    _choice(p, "task.dtype", cfg.task.dtype, {"float32", "bfloat16", "float16"})
    _choice(p, "engine", cfg.engine, {"simulation", "distributed"})
    for name, value in (
        ("faults.timeout", cfg.faults.timeout),
        ("faults.collective_timeout", cfg.faults.collective_timeout),
    ):
        if not value > 0:
            p.append(f"{name}={value} is invalid; use a positive number of seconds.")
    if cfg.faults.slow_rank < -1:
        p.append(f"faults.slow_rank={cfg.faults.slow_rank} is invalid; use -1 (none) or a process rank.")
    elif cfg.faults.slow_rank >= 0 and cfg.engine != "distributed":
        p.append(
            f"faults.slow_rank={cfg.faults.slow_rank} delays a torchrun process; use it with engine=distributed, or set it to -1."
        )
    if not cfg.faults.slow_seconds >= 0:
        p.append(f"faults.slow_seconds={cfg.faults.slow_seconds} is invalid; use 0 or more seconds.")
    if not isinstance(cfg.faults.slow_rounds, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in cfg.faults.slow_rounds
    ):
        p.append(
            f"faults.slow_rounds={cfg.faults.slow_rounds!r} is invalid; use a list of rounds counted from 1, e.g. [2, 3], or [] for every round."
        )
    if cfg.partition.scheme == "natural" and not cfg.partition.key:
        p.append("partition.scheme=natural needs partition.key, the column holding the natural key (e.g. user).")
    opts = cfg.algorithm_options
    if cfg.algorithm == "decaf":
        if "split" in opts:
            _choice(p, "algorithm_options.split", opts["split"], SPLITS)
        if "gauge" in opts:
            _choice(p, "algorithm_options.gauge", opts["gauge"], GAUGES)
    if cfg.algorithm in algorithms.available():
        try:
            algorithms.get(cfg.algorithm, **opts)
        except DecafError as exc:
            if not any(s.startswith("algorithm_options.") for s in p):
                p.append(str(exc))
    dev = str(cfg.device)
    if not (dev in ("cpu", "auto", "cuda") or dev.startswith("cuda:")):
        p.append(f"device={dev!r} is not known; use cpu, cuda, cuda:N or auto.")
    if p:
        raise ConfigError(p)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
