"""The ``decaf`` command. User mistakes print one line and exit with code 2; no tracebacks."""

from __future__ import annotations

import json
import sys

import click
import numpy as np

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
    """Turns :class:`DecafError` into ``error: <sentence>`` on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DecafError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decaf-lora")
def main() -> None:
    """decaf-lora: decentralized LoRA fine-tuning (DeCAF and its baselines)."""


def format_topology(summary: dict) -> str:
    d = summary["degree"]
    lines = [
        f"topology: {summary['topology']}  ({summary['agents']} agents, {summary['edges']} edges, mixing: {summary['mixing']})",
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


@main.command()
@click.argument("name", metavar="NAME")
@click.option("--agents", "-n", type=int, default=None, help="Number of agents (optional for an edge-list file).")
@click.option("--mixing", default="metropolis", show_default=True, help=f"Mixing rule: {', '.join(RULES)}.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Graph parameter, e.g. hubs=2, p=0.3, k=4, seed=1, rows=2.")
@click.option("--edges", type=click.Path(dir_okay=False), default=None, help="Edge-list file for NAME=edges (one 'i j' per line).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
def topology(name: str, agents: int | None, mixing: str, params: tuple[str, ...], edges: str | None, as_json: bool) -> None:
    """Print a topology's mixing matrix, degrees and spectral gap.

    NAME is one of: """ + ", ".join(GRAPHS) + "."
    kwargs = _parse_params(params)
    if edges is not None:
        kwargs["edges"] = edges
    if agents is None and name.replace("-", "_") not in ("edges", "edge_list"):
        raise DecafError(f"--agents is required for topology {name!r}; pass e.g. --agents 10.")
    topo = Topology.build(name, agents, mixing=mixing, **kwargs)
    summary = topo.summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_topology(summary))


@main.command()
@click.option("--agents", "-n", type=int, default=10, show_default=True)
@click.option("--rank", "-r", type=int, default=4, show_default=True)
@click.option("--dim", type=int, default=256, show_default=True, help="Layer size d = k of the random factors.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(agents: int, rank: int, dim: int, seed: int) -> None:
    """Offline demo of the core: DeCAF vs DLoRA consensus on random LoRA factors over the paper's topologies."""
    from .demo import run_core_demo

    click.echo(run_core_demo(agents=agents, rank=rank, dim=dim, seed=seed))


if __name__ == "__main__":  # pragma: no cover
    main()
