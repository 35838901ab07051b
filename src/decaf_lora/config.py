"""One dataclass tree for a run: YAML file, then ``key=value`` overrides, then validation of everything at once.

Every field carries its help text and, where it has them, its allowed values (``choices``: a registry or a fixed
list) and range (``ge``/``gt``/``le``/``lt``, ``items`` for the entries of a list). One generic loop,
:func:`check_fields`, checks every field against what it declares; it serves the run config and every algorithm's
options alike, so ``decaf run --help-config`` can print the same declarations the checks use. The few rules that
tie two fields together are written out in :func:`_cross_field_problems`. Validation never rewrites a setting; it
only brings names to their canonical spelling (``round_robin`` -> ``round-robin``), so what a run records is what
it ran. Problems are collected before anything runs and raised as one :class:`ConfigError` whose lines are one
sentence each, naming the field, the bad value and what is allowed; the CLI prints them and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import DecafError
from .registry import ALGORITHMS, ENGINES, GRAPHS, MIXING_RULES, PARTITIONS, SCHEDULES, TASKS, Registry, choices_of


class YamlLoader(yaml.SafeLoader):
    """YAML with the plain scalars of YAML 1.2's core schema: only true/false are booleans (``[no, yes]`` stays two
    words, not [False, True]) and ``010`` is ten (not octal eight), as every other modern tool reads them."""


class YamlDumper(yaml.SafeDumper):
    """Writes a scalar plain only if both YAML 1.1 (PyYAML's default) and :class:`YamlLoader` read it back as the
    same type: ``name: '1e3'`` and ``label_names: ['yes', 'no']`` stay strings for either reader of config.yaml."""


def _int_value(text: str) -> int:
    digits = text.lstrip("+-")
    value = int(digits[2:], 16 if digits[1] in "xX" else 8) if digits[:2].lower() in ("0x", "0o") else int(digits)
    return -value if text.startswith("-") else value


def _core_schema(resolver: type, keep_yaml_11: bool = False) -> None:
    """Install YAML 1.2 core's bool, int and float resolvers on ``resolver`` (next to 1.1's with ``keep_yaml_11``)."""
    bool_tag, int_tag, float_tag = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float"))
    resolver.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if keep_yaml_11 or tag not in (bool_tag, int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    resolver.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    resolver.add_implicit_resolver(
        int_tag, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
    )
    resolver.add_implicit_resolver(
        float_tag,
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+.0123456789"),
    )


_core_schema(YamlLoader)
YamlLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: _int_value(loader.construct_scalar(node)))
_core_schema(YamlDumper, keep_yaml_11=True)


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a YAML alias bomb or a 5000-digit number must not
    turn one sentence into megabytes, or hang)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxlong, r.maxother = 3, 8, 8, 8, 80, 40, 80
    try:
        return r.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str(), maybe inside a list
        if isinstance(value, int):
            return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
        return f"<a {type(value).__name__} holding a value too large to show>"


def read_yaml(text_or_stream):
    """Parse YAML with :class:`YamlLoader` (safe: plain data only, never Python objects)."""
    return yaml.load(text_or_stream, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


#: What a poisoned agent can be made to send (faults.poison); :mod:`decaf_lora.engine.screening` implements them.
POISONS = ("nan", "shape", "scale")
STATE_POLICIES = ("reset", "keep")
DTYPES = ("float32", "bfloat16", "float16")
#: Rounds and local steps: a bound far beyond any real run, so a slip of the keyboard is an error, not a run that
#: never ends (the schedules and plots are sized by it).
MAX_STEPS = 1_000_000
#: Mixing matrices are dense agents x agents (and so are some per-round plans): a bound checked before allocating.
MAX_AGENTS = 4096


class ConfigError(DecafError):
    """One or more invalid configuration fields; ``problems`` holds one sentence per field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def option(
    default,
    help: str,  # noqa: A002 - 'help' reads best at the call sites
    *,
    choices: Registry | Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    items: dict | None = None,
    check: Callable[[Any], str | None] | None = None,
):
    """A dataclass field with its help text and its allowed values, for configs and algorithm options alike.

    ``choices``: the allowed names (a :class:`~decaf_lora.registry.Registry`, a sequence, or a function giving one);
    ``ge``/``gt``/``le``/``lt``: a numeric range; ``items``: the same keys plus ``type`` for each entry of a list;
    ``check``: a function returning the end of a sentence ("use ...") for values the other keys cannot describe.
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "items": items, "check": check}
    meta = {k: v for k, v in meta.items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _device_problem(value: str) -> str | None:
    dev = str(value)
    if dev in ("cpu", "auto", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()):
        return None
    return "is not known; use cpu, cuda, cuda:N or auto"


#: Room left for ``-<method>-s<seed>-<YYYYmmdd-HHMMSS>[-N]`` within the usual 255-byte cap on a file name.
MAX_NAME_BYTES = 160


def _name_problem(value: str) -> str | None:
    """A run's name becomes a directory name under out_dir, so it must not be able to point anywhere else."""
    text = str(value)
    if not text.strip() or text.strip(".") == "" or any(c in text for c in "/\\\0") or text.startswith("."):
        return "cannot name a run directory; use letters, digits, '-' and '_', without '/' or a leading '.'"
    if len(text.encode()) > MAX_NAME_BYTES:
        return (
            f"is {len(text.encode())} bytes long; a run directory adds the method, seed and time to it and file "
            f"systems cap a name at 255 bytes, so use at most {MAX_NAME_BYTES}"
        )
    return None


@dataclass
class TopologyConfig:
    name: str = option("ring", "communication graph", choices=GRAPHS)
    mixing: str = option("metropolis", "mixing rule: how much an agent weighs each neighbour", choices=MIXING_RULES)
    schedule: str = option("static", "per-round graph", choices=SCHEDULES)
    link_drop: float = option(0.0, "probability that a link fails in a round (schedule=link-failures)", ge=0, lt=1)
    params: dict = option({}, "graph parameters, e.g. {hubs: 2}, {p: 0.3, seed: 1}, {edges: path/to/edges.txt}")


@dataclass
class PartitionConfig:
    scheme: str = option("dirichlet", "how data is split over agents", choices=PARTITIONS)
    alpha: float = option(1.0, "Dirichlet concentration (scheme=dirichlet): 0.1 strongly skewed, 100 nearly IID", gt=0)
    min_size: int = option(16, "smallest number of training examples an agent may get (scheme=dirichlet)", ge=1)
    shards_per_agent: int = option(2, "label-sorted shards per agent (scheme=shards)", ge=1)
    key: str = option("", "column holding the natural key, e.g. a user id (scheme=natural)")
    local_eval: int = option(64, "examples held out of each agent's own data for its local evaluation (0 = none)", ge=0)


@dataclass
class LoraConfig:
    rank: int = option(4, "LoRA rank r (with lora.ranks: the padded width every agent's factors are stored at)", ge=1)
    ranks: list = option(
        [],
        "heterogeneous ranks: one rank per agent, or a shorter list repeated over the agents ([2, 4, 8]: agent a "
        "gets ranks[a % 3]); each at most lora.rank; empty = every agent uses lora.rank",
        items={"type": int, "ge": 1},
    )
    alpha: float = option(
        8.0, "LoRA alpha (PEFT's lora_alpha): scale = alpha / r, or alpha / sqrt(r) with rslora", ge=0
    )
    dropout: float = option(0.0, "dropout on the LoRA input", ge=0, lt=1)
    targets: list = option(
        [],
        "module names to adapt; empty = the task's default (query, key, value, dense for BERT)",
        items={"type": str},
    )
    rslora: bool = option(False, "rank-stabilized scaling alpha / sqrt(r) (CLIP-LoRA's convention)")


@dataclass
class OptimConfig:
    lr: float = option(4e-3, "peak AdamW learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    min_lr: float = option(0.0, "learning rate at the end of the cosine schedule (at most optim.lr)", ge=0)
    warmup_steps: int = option(0, "linear warm-up steps before the cosine decay", ge=0)
    grad_clip: float = option(1.0, "clip each agent's gradient norm to this (0 = off)", ge=0)
    state_after_mix: str = option(
        "reset",
        "AdamW moments after each mixing step: reset (they refer to the old basis) or keep",
        choices=STATE_POLICIES,
    )


@dataclass
class TaskConfig:
    kind: str = option("text", "what to learn", choices=TASKS)
    model: str = option(
        "minilm",
        "base model: minilm (pip-shipped all-MiniLM-L6-v2; for causal-lm it means random-tiny-llama), "
        "random-tiny-clip, "
        "random-tiny-llama, a local directory or a hub name",
    )
    dataset: str = option(
        "tweets", "data: tweets (38k labelled tweets), digits, mnist, a .csv/.jsonl file, an image folder, or hf:NAME"
    )
    text_column: str = option(
        "text", "column with the input text (csv/jsonl); several columns joined: passage,question"
    )
    label_column: str = option("label", "column with the label (csv/jsonl)")
    max_length: int = option(32, "tokens per example after truncation", ge=2)
    train_examples: int = option(
        -1,
        "training examples drawn from the data set before splitting: -1 = the data set's default (6000 of the built-in "
        "tweets, all of any other data), 0 = all",
        ge=-1,
    )
    test_examples: int = option(400, "examples held out as the shared test set", ge=1)
    batch_size: int = option(16, "local mini-batch size", ge=1)
    eval_batch_size: int = option(128, "batch size for evaluation", ge=1)
    shots: int = option(0, "few-shot: training examples per class per agent (0 = use train_examples)", ge=0)
    dtype: str = option(
        "float32",
        "weights of a pretrained base model (LoRA factors, trained heads and their mixing stay float32)",
        choices=DTYPES,
    )
    label_names: list = option(
        [],
        "words for the classes in sorted label order, e.g. [no, yes] (used by clip prompts and causal-lm answers)",
        items={"type": str},
    )


@dataclass
class FaultsConfig:
    link_drop: float = option(
        0.0, "probability that each link is down in a round, on top of the topology's schedule", ge=0, lt=1
    )
    agent_dropout: float = option(
        0.0, "probability that an agent sits a round out (no training, no exchange)", ge=0, lt=1
    )
    poison_agent: int = option(-1, "for testing defences: this agent sends broken payloads (-1 = nobody)", ge=-1)
    poison: str = option("nan", "what the poisoned agent sends: nan, shape (a wrong shape) or scale", choices=POISONS)
    max_norm: float = option(1e4, "reject a received factor whose Frobenius norm exceeds this (0 = no bound)", ge=0)
    timeout: float = option(
        300.0,
        "engine=distributed: seconds a process waits for a neighbour's process at the exchange; a late one is left "
        "out of that round's mix (weights renormalized, logged as timed_out)",
        gt=0,
    )
    collective_timeout: float = option(
        1800.0,
        "engine=distributed: seconds before a process that never joins the round's collectives (metrics, "
        "checkpoint) fails the job; torchrun --max-restarts then resumes it",
        gt=0,
    )
    slow_rank: int = option(
        -1, "for testing timeouts (engine=distributed): this process sleeps slow_seconds before the exchange", ge=-1
    )
    slow_seconds: float = option(0.0, "how long the slow process sleeps", ge=0)
    slow_rounds: list = option(
        [], "rounds (1-based, as in the metrics) in which it is slow; empty = every round", items={"type": int, "ge": 1}
    )


@dataclass
class RunConfig:
    name: str = option("demo", "a label for the run; the run directory is named after it", check=_name_problem)
    algorithm: str = option("decaf", "aggregation method (`decaf methods` lists them)", choices=ALGORITHMS)
    algorithm_options: dict = option({}, "method options, e.g. {split: balanced, gauge: procrustes} for decaf")
    agents: int = option(8, "number of agents", ge=1, le=MAX_AGENTS)
    rounds: int = option(12, "communication rounds", ge=1, le=MAX_STEPS)
    local_steps: int = option(5, "local optimizer steps per agent between exchanges", ge=1, le=MAX_STEPS)
    eval_every: int = option(6, "evaluate every this many rounds (and always after the last)", ge=1)
    seed: int = option(0, "training seed: initialization, batch order, dropout", ge=0, lt=2**32)
    split_seed: int = option(
        0, "data-split seed: test hold-out, subsampling and the partition over agents", ge=0, lt=2**32
    )
    device: str = option("cpu", "cpu, cuda, cuda:N or auto", check=_device_problem)
    out_dir: str = option("runs", "where run directories are created")
    engine: str = option(
        "auto",
        "auto (distributed when launched by torchrun with several processes, else simulation), simulation (one "
        "process, one shared base model) or distributed (under torchrun)",
        choices=ENGINES,
    )
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def agent_ranks(self) -> list[int] | None:
        """Each agent's LoRA rank when ``lora.ranks`` is set (the short list repeated over the agents), else None."""
        if not self.lora.ranks:
            return None
        return [int(self.lora.ranks[a % len(self.lora.ranks)]) for a in range(self.agents)]


#: ``section=value`` sets the section's main field: ``topology=torus``, ``partition=iid``, ``task=clip``.
SECTION_SHORTCUTS = {"topology": "name", "partition": "scheme", "task": "kind", "lora": "rank"}


def _sections(cls=RunConfig) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _number(value) -> str:
    """A bound as a person writes it: integers in full (4294967296, not 4.29497e+09), other numbers short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _interval(meta: dict) -> str:
    lo = f"[{_number(meta['ge'])}" if "ge" in meta else f"({_number(meta['gt'])}" if "gt" in meta else "(-inf"
    hi = f"{_number(meta['le'])}]" if "le" in meta else f"{_number(meta['lt'])})" if "lt" in meta else "inf)"
    return f"{lo}, {hi}"


def allowed_text(meta: dict) -> str:
    """What a field accepts, in words: the printable form of its declared choices and range."""
    if "choices" in meta:
        return "one of: " + ", ".join(choices_of(meta["choices"]))
    bounds = [k for k in ("ge", "gt", "le", "lt") if k in meta]
    if len(bounds) == 1:
        sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bounds[0]]
        return f"{sign} {_number(meta[bounds[0]])}"
    if bounds:
        return "in " + _interval(meta)
    if "items" in meta:
        return (
            "a list of "
            + ("integers" if meta["items"].get("type") is int else "values")
            + (f" {allowed_text(meta['items'])}" if allowed_text(meta["items"]) else "")
        )
    return ""


def field_help(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field: the config reference."""
    return [(name, help_text, default) for name, help_text, default, _ in field_reference(cls, prefix)]


def field_reference(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, help, default, allowed values in words) for every leaf field of a config dataclass."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints.get(f.name)):
            rows += field_reference(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("help"):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((prefix + f.name, f.metadata["help"], default, allowed_text(f.metadata)))
    return rows


def _leaf_names() -> list[str]:
    return [name for name, _, _ in field_help()]


_KIND = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _coerce(path: str, value: Any, typ: type, problems: list[str]) -> Any:
    """Check one value against its declared type; ints are accepted for floats, '5e-3' for a float."""
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
        problems.append(f"{path}={shown(value)} has the wrong type; it must be {_KIND[typ]}.")
        return None
    if typ is float:
        try:
            return float(value)
        except OverflowError:  # an integer of more than 308 digits
            problems.append(f"{path}={shown(value)} is too large for a floating-point number; use a smaller value.")
            return None
    if typ is str:
        return str(value)
    if typ is list:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    return value


def check_value(name: str, value: Any, meta: dict) -> tuple[Any, str | None]:
    """Check one value against a field's declared choices, range, list items and check; returns (canonical value,
    the problem in one sentence or None). Choices come back in their canonical spelling."""
    if value is None:
        return value, None
    if "choices" in meta:
        spec = meta["choices"]
        if isinstance(spec, Registry):
            if value in spec:
                return spec.canonical(value), None
            return value, str(spec.error(value, name))
        allowed = choices_of(spec)
        if value in allowed:
            return value, None
        return value, f"{name}={shown(value)} is not known; choose one of: {', '.join(sorted(allowed))}."
    if "items" in meta and isinstance(value, list):
        out, item_meta = [], meta["items"]
        kind = {int: "an integer", str: "a string (quote a word YAML reads otherwise)"}.get(
            item_meta.get("type"), "a value"
        )
        each = f"each entry must be {kind}" + (f" {allowed_text(item_meta)}" if allowed_text(item_meta) else "")
        for item in value:
            if item_meta.get("type") is int:
                item = item if isinstance(item, int) and not isinstance(item, bool) else _as_int(item)
            elif item_meta.get("type") is str and not isinstance(item, str):
                item = None
            if item is None or check_value(name, item, item_meta)[1]:
                return value, f"{name}={shown(value)} is invalid; {each}."
            out.append(item)
        value = out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):  # ints are finite (isfinite overflows on 1e400)
            return value, f"{name}={shown(value)} is invalid; use a finite number."
        low = ("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
        high = ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"])
        bounded_both = any(k in meta for k in ("ge", "gt")) and any(k in meta for k in ("le", "lt"))
        if (low or high) and bounded_both:
            return (
                value,
                f"{name}={shown(value)} is too {'small' if low else 'large'}; use a value in {_interval(meta)}.",
            )
        if low:
            return value, f"{name}={shown(value)} is too small; use a value {allowed_text(meta)}."
        if high:
            return value, f"{name}={shown(value)} is too large; use a value {allowed_text(meta)}."
    if "check" in meta:
        problem = meta["check"](value)
        if problem:
            return value, f"{name}={shown(value)} {problem}."
    return value, None


def _as_int(item: Any) -> int | None:
    try:
        return int(str(item))
    except ValueError:
        return None


def check_fields(obj: Any, prefix: str = "") -> list[str]:
    """The one generic loop: check every field of a (nested) dataclass instance against what it declares, bringing
    names to their canonical spelling in place; returns one sentence per problem."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += check_fields(value, f"{prefix}{f.name}.")
            continue
        canonical, problem = check_value(prefix + f.name, value, dict(f.metadata))
        if problem:
            problems.append(problem)
        elif canonical is not value:
            setattr(obj, f.name, canonical)
    return problems


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
                example = next(n for n in leaves if n.startswith(parts[0] + "."))
                problems.append(f"{origin} sets '{parts[0]}', which is a section; set its fields, e.g. {example}=...")
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
        value = read_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer too long to convert
        value = raw
    return key.strip(), value


MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: str) -> dict:
    """A YAML config file as a mapping, or one sentence naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise ConfigError([f"config file {path!r} does not exist; give the path of a YAML file (see examples/)."])
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"config file {path!r} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few lines."]
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = read_yaml(fh) or {}
    except UnicodeDecodeError:
        raise ConfigError([f"config file {path!r} is not UTF-8 text; save it as UTF-8."]) from None
    except (ValueError, RecursionError):
        raise ConfigError(
            [f"config file {path!r} holds a number too long or nesting too deep to read; a config is a few lines."]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"config file {path!r} is not valid YAML{where}; fix the syntax."]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"config file {path!r} must hold a mapping of fields (key: value), not {type(data).__name__}."]
        )
    return data


def load_config(
    path: str | dict | None = None, overrides: list[str] | tuple[str, ...] = (), validate: bool = True
) -> RunConfig:
    """Defaults, then the YAML file or mapping (if any), then overrides; every problem reported at once."""
    cfg = RunConfig()
    problems: list[str] = []
    if isinstance(path, dict):
        _apply(cfg, path, problems, "config")
    elif path is not None:
        _apply(cfg, read_config_file(path), problems, f"config file {os.path.basename(path)}")
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems += exc.problems
            continue
        _apply(cfg, {key: value}, problems, f"override '{text}'")
    if validate:  # semantic checks run even after type errors, so the user sees every problem in one go
        problems += validation_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def validation_problems(cfg: RunConfig) -> list[str]:
    """Every field against its declaration, then the rules that tie fields together, then the algorithm's options."""
    problems = check_fields(cfg)
    bad = {p.split("=", 1)[0] for p in problems}
    problems += _cross_field_problems(cfg, bad)
    if "algorithm" not in bad:
        problems += algorithm_option_problems(cfg.algorithm, cfg.algorithm_options)
    return problems


def validate_config(cfg: RunConfig) -> RunConfig:
    """Raise one :class:`ConfigError` listing every problem of an already built config; returns it checked."""
    problems = validation_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def algorithm_option_problems(name: str, options: dict, prefix: str = "algorithm_options.") -> list[str]:
    """Options of one algorithm against the fields its class declares (the same generic checks as the config)."""
    cls = ALGORITHMS.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    not_names = [k for k in options if not isinstance(k, str)]
    if not_names:
        return [f"{prefix.rstrip('.')} has the key {not_names[0]!r}; its keys must be option names (strings)."]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        listed = ", ".join(sorted(fields)) or "none"
        return [f"algorithm {cls.name!r} has no option {', '.join(unknown)}; its options are: {listed}."]
    problems = []
    for key, value in options.items():
        _, problem = check_value(prefix + key, value, dict(fields[key].metadata))
        if problem:
            problems.append(problem)
    if not problems:
        try:
            cls(**options)
        except DecafError as exc:
            problems.append(str(exc))
        except TypeError as exc:  # a value of the wrong kind that the option's own code could not take
            problems.append(f"algorithm_options for {cls.name!r} could not be used ({exc}); see `decaf methods`.")
    return problems


def _cross_field_problems(cfg: RunConfig, bad: set[str]) -> list[str]:
    """The rules that involve two fields; every single-field rule is declared on the field itself."""
    p: list[str] = []
    if "optim.min_lr" not in bad and "optim.lr" not in bad and cfg.optim.min_lr > cfg.optim.lr:
        p.append(
            f"optim.min_lr={cfg.optim.min_lr} is larger than optim.lr={cfg.optim.lr}; use a value from 0 to optim.lr."
        )
    if "faults.poison_agent" not in bad and cfg.faults.poison_agent >= cfg.agents:
        p.append(
            f"faults.poison_agent={cfg.faults.poison_agent} is out of range; use -1 (nobody) or an agent from 0 to "
            f"{cfg.agents - 1}."
        )
    if cfg.partition.scheme == "natural" and not cfg.partition.key:
        p.append("partition.scheme=natural needs partition.key, the column holding the natural key (e.g. user).")
    if "topology.link_drop" not in bad and cfg.topology.link_drop > 0 and cfg.topology.schedule != "link-failures":
        p.append(
            f"topology.link_drop={cfg.topology.link_drop} needs topology.schedule=link-failures (links re-weighted "
            f"each round); set it, or use faults.link_drop to drop links on top of schedule={cfg.topology.schedule}."
        )
    if cfg.lora.ranks and "lora.ranks" not in bad:
        p += _rank_problems(cfg, bad)
    return p


def _rank_problems(cfg: RunConfig, bad: set[str]) -> list[str]:
    ranks = cfg.lora.ranks
    p = []
    if len(ranks) > cfg.agents:
        p.append(f"lora.ranks has {len(ranks)} entries but agents={cfg.agents}; give one rank per agent or fewer.")
    if "lora.rank" not in bad and max(ranks) > cfg.lora.rank:
        p.append(
            f"lora.ranks={ranks} asks for rank {max(ranks)} but lora.rank={cfg.lora.rank} is the padded width every "
            f"agent's factors are stored at; set lora.rank={max(ranks)}."
        )
    if "algorithm" not in bad:
        cls = ALGORITHMS.get(cfg.algorithm)
        if not getattr(cls, "supports_ranks", False):
            able = [n for n, c in ALGORITHMS.items() if getattr(c, "supports_ranks", False)]
            p.append(
                f"algorithm={cfg.algorithm} cannot train agents of different ranks (lora.ranks); use one of: "
                f"{', '.join(able)}, or drop lora.ranks."
            )
    return p


#: Settings that may differ when a run resumes: where it executes, never what it computes.
PLACEMENT = ("device", "engine")


def config_differences(a: dict, b: dict, ignore=PLACEMENT, prefix: str = "") -> list[str]:
    """``"field: x in the run, y now"`` for every leaf that differs between two configs (as dicts)."""
    out = []
    for k in a:
        if prefix + k in ignore or k in ignore and not prefix:
            continue
        if isinstance(a[k], dict) and isinstance(b.get(k), dict) and k not in ("algorithm_options", "params"):
            out += config_differences(a[k], b[k], ignore, f"{prefix}{k}.")
        elif a[k] != b.get(k):
            out.append(f"{prefix}{k}: {a[k]!r} in the run, {b.get(k)!r} now")
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=YamlDumper, sort_keys=False)
