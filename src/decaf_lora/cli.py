"""The ``decaf`` command. User mistakes print one line and exit with code 2; no tracebacks."""

from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

from .config import MAX_AGENTS
from .errors import DecafError
from .topology import GRAPHS, RULES, Topology

MAX_PRINTED_AGENTS = 20


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_params(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DecafError(f"--param {pair!r} is not of the form key=value; write e.g. --param hubs=2.")
        out[key.strip()] = _parse_value(value.strip())
    return out


class _Group(click.Group):
    """Turns :class:`DecafError` into ``error: <sentence>`` lines on stderr and exit code 2 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DecafError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            sys.exit(2)
        except FloatingPointError as exc:  # training diverged: a user-facing condition, not a bug
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decaf-lora")
def main() -> None:
    """decaf-lora: decentralized LoRA fine-tuning (DeCAF and its baselines)."""


def format_topology(summary: dict) -> str:
    d = summary["degree"]
    lines = [
        f"topology: {summary['topology']}  ({summary['agents']} agents, {summary['edges']} edges, mixing: "
        f"{summary['mixing']})",
        f"degree: min {d['min']}, mean {d['mean']:.2f}, max {d['max']}",
        f"|lambda_2| = {summary['second_eigenvalue']:.4f}    spectral gap = {summary['spectral_gap']:.4f}",
    ]
    n = summary["agents"]
    if n > MAX_PRINTED_AGENTS:
        lines.append(f"mixing matrix: omitted for more than {MAX_PRINTED_AGENTS} agents (use --json).")
    else:
        w = np.array(summary["matrix"])
        lines.append("mixing matrix (row i: the weights agent i gives to each agent):")
        lines.append("      " + "".join(f"{j:>7d}" for j in range(n)))
        for i in range(n):
            lines.append(f"{i:>5d} " + "".join(f"{v:7.3f}" if v else f"{'.':>7s}" for v in w[i]))
    return "\n".join(lines)


@main.command(
    help="Print a topology's mixing matrix, degrees and spectral gap.\n\nNAME is one of: "
    + ", ".join(GRAPHS.names())
    + f". At most {MAX_AGENTS} agents."
)
@click.argument("name", metavar="NAME")
@click.option("--agents", "-n", type=int, default=None, help="Number of agents (optional for an edge-list file).")
@click.option("--mixing", default="metropolis", show_default=True, help=f"Mixing rule: {', '.join(RULES.names())}.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Graph parameter, e.g. hubs=2, p=0.3, k=4, seed=1, rows=2.",
)
@click.option(
    "--edges", type=click.Path(dir_okay=False), default=None, help="Edge-list file for NAME=edges (one 'i j' per line)."
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
def topology(
    name: str, agents: int | None, mixing: str, params: tuple[str, ...], edges: str | None, as_json: bool
) -> None:
    kwargs = _parse_params(params)
    if edges is not None:
        kwargs["edges"] = edges
    if agents is None and GRAPHS.canonical(name) != "edges":
        raise DecafError(f"--agents is required for topology {name!r}; pass e.g. --agents 10.")
    topo = Topology.build(name, agents, mixing=mixing, **kwargs)
    summary = topo.summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_topology(summary))


def _split_config_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]``: the first argument is a file unless it looks like an override."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def config_reference() -> str:
    """Every config field with its help, default and allowed values, then every algorithm's options."""
    from .config import field_reference
    from .registry import ALGORITHMS

    def line(name, help_text, default, allowed):
        extra = f"; {allowed}" if allowed else ""
        return f"{name:<28} {help_text} [default: {default!r}{extra}]"

    lines = [line(*row) for row in field_reference()]
    for name, cls in ALGORITHMS.items():
        rows = field_reference(cls, "algorithm_options.")
        lines += ["", f"algorithm={name}: " + (cls.summary or cls.__doc__.splitlines()[0])]
        lines += [line(*row) for row in rows] or ["  (no options)"]
    return "\n".join(lines)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option(
    "--help-config", is_flag=True, help="List every config field and every algorithm option with its help, then exit."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--resume", "resume_dir", type=click.Path(), default=None, help="Continue RUN_DIR from its last finished round."
)
def run(args: tuple[str, ...], help_config: bool, quiet: bool, resume_dir: str | None) -> None:
    """Train: decaf run [CONFIG.yaml] [key=value ...].

    With no arguments: the offline demo (8 agents on a ring, non-IID tweets, MiniLM + LoRA, DeCAF).
    Overrides such as algorithm=dlora agents=16 topology=torus partition.alpha=0.1 lora.rank=8 apply on top.
    Under torchrun with several processes it runs the distributed engine (engine=auto).
    """
    if help_config:
        click.echo(config_reference())
        return
    from .config import load_config
    from .engine import make_engine, resume
    from .report import run_table

    leader = int(os.environ.get("RANK", "0")) == 0

    def show(run_dir: str) -> None:
        if leader:
            click.echo(run_table(run_dir).split("\n\n![")[0])  # the tables, without the report's image links

    path, overrides = _split_config_args(args)
    if resume_dir is not None:
        if path is not None:
            raise DecafError(
                f"--resume takes its config from {resume_dir!r}; drop the config file {path!r} (overrides that "
                "restate it are fine)."
            )
        show(resume(resume_dir, overrides, progress=not quiet).run_dir)
        return
    engine = make_engine(load_config(path, overrides), progress=not quiet)
    if leader:
        click.echo(f"run directory: {engine.run_dir}", err=True)
    show(engine.run().run_dir)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option(
    "--algorithms",
    "algos",
    default="decaf,dlora,dlora-fa,local,fedavg",
    show_default=True,
    help="Comma-separated methods.",
)
@click.option(
    "--seeds", type=int, default=1, show_default=True, help="Training seeds per method (the data split stays fixed)."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def compare(args: tuple[str, ...], algos: str, seeds: int, quiet: bool) -> None:
    """Run several methods on one config: same data split, same initialization per seed; one table and one plot."""
    from .compare import run_comparison

    path, overrides = _split_config_args(args)
    out = run_comparison(path, overrides, [a.strip() for a in algos.split(",") if a.strip()], seeds, progress=not quiet)
    click.echo(out["table"])
    click.echo(f"\nruns, table and plot: {out['dir']}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--agent", type=int, default=None, help="Export this agent's adapter.")
@click.option(
    "--consensus", is_flag=True, help="Export the network's consensus: the best rank-r fit of the mean product."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(),
    help="New or empty directory to write (adapter_config.json + adapter_model.safetensors).",
)
@click.option("--overwrite", is_flag=True, help="Replace a previous export in --out (never anything else).")
def export(run_dir: str, agent: int | None, consensus: bool, out_dir: str, overwrite: bool) -> None:
    """Write a PEFT adapter directory that PeftModel.from_pretrained loads."""
    from .export import export_adapter

    if (agent is None) == (not consensus):
        raise DecafError("give exactly one of --agent I or --consensus.")
    path = export_adapter(run_dir, out_dir, agent=agent, overwrite=overwrite)
    click.echo(f"wrote PEFT adapter to {path}")


@main.command()
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(), metavar="ADAPTER_DIR...")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="New or empty directory to write.")
@click.option("--weights", default=None, metavar="W1,W2,...", help="One weight >= 0 per adapter, normalised to sum 1.")
@click.option("--rank", type=int, default=None, help="Rank of the merged adapter [default: largest input rank].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds a previous merge (never anything else).")
def merge(adapter_dirs: tuple[str, ...], out_dir: str, weights: str | None, rank: int | None, overwrite: bool) -> None:
    """Merge LoRA adapters of one base model: per layer the best rank-R fit of the weighted sum of products."""
    from .merge import format_report, merge_adapters, parse_weights

    w = None if weights is None else parse_weights(weights)
    result = merge_adapters(list(adapter_dirs), w, rank, out_dir=out_dir, overwrite=overwrite)
    click.echo(format_report(result))
    click.echo(f"wrote PEFT adapter to {result.out_dir}")


@main.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir: str) -> None:
    """Rebuild a run's plots and markdown report, and print the report (a finished, verified run only)."""
    from .engine import verified_run
    from .report import write_report

    verified_run(run_dir)
    path = write_report(run_dir)
    with open(path, encoding="utf-8") as fh:
        click.echo(fh.read())


@main.command()
@click.option("--markdown", is_flag=True, help="Print the README's markdown table instead.")
def methods(markdown: bool) -> None:
    """Every method: what it does, what it sends (bytes per round vs DLoRA), heterogeneous ranks, its paper."""
    from .methods import methods_markdown, methods_text

    click.echo(methods_markdown() if markdown else methods_text())


@main.command("consensus-demo")
@click.option("--agents", "-n", type=click.IntRange(3, 256), default=10, show_default=True)
@click.option("--rank", "-r", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option(
    "--dim",
    type=click.IntRange(1, 4096),
    default=256,
    show_default=True,
    help="Layer size d = k of the random factors (the demo forms d x k products to measure consensus).",
)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def consensus_demo(agents: int, rank: int, dim: int, seed: int) -> None:
    """DeCAF vs DLoRA consensus on random LoRA factors over the paper's topologies (no model, seconds)."""
    from .demo import run_core_demo

    click.echo(run_core_demo(agents=agents, rank=rank, dim=dim, seed=seed))


if __name__ == "__main__":  # pragma: no cover
    main()
