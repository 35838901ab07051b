"""Plots and a markdown table for one run (``decaf report RUN_DIR``) and for a comparison of runs."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from .rundir import check_run_dir, read_json, read_metrics, write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Render to a temporary file of its own and rename, like every other output: two reports of one run at once
    never write into the same temporary file, and the plot gets the permissions of any file the user creates."""
    import tempfile

    from .rundir import file_mode

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _rounds_axis(ax) -> None:
    """Rounds are whole numbers: no 2.5 on the axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def per_round(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Rounds where ``key`` was logged, and an (rounds, agents) array of its values."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for m in metrics:
        if m.get(key) is not None:
            by_round[m["round"]].append(m[key])
    rounds = np.array(sorted(by_round))
    return rounds, np.array([by_round[r] for r in rounds])


def per_round_spread(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rounds where ``key`` was logged and its mean, min and max over the agents that logged it (absent agents log
    no training loss, so rounds may have different numbers of values)."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for m in metrics:
        if m.get(key) is not None:
            by_round[m["round"]].append(m[key])
    rounds = np.array(sorted(by_round))
    values = [np.array(by_round[r], dtype=float) for r in rounds]
    return rounds, *(np.array([f(v) for v in values]) for f in (np.mean, np.min, np.max))


def plot_run(run_dir: str) -> list[str]:
    plt = _plt()
    metrics = read_metrics(run_dir)
    summary = (
        read_json(os.path.join(run_dir, "summary.json"))
        if os.path.exists(os.path.join(run_dir, "summary.json"))
        else {}
    )
    plots = os.path.join(run_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    r, acc = per_round(metrics, "eval_accuracy")
    if len(r):
        axes[0].plot(r, acc.mean(1), marker="o", label="mean over agents")
        axes[0].fill_between(r, acc.min(1), acc.max(1), alpha=0.25, label="min-max")
        if "majority_rate" in summary:
            axes[0].axhline(summary["majority_rate"], color="grey", ls="--", lw=1, label="majority class")
        axes[0].set(xlabel="round", ylabel="test accuracy", title="shared test set")
        axes[0].legend(fontsize=8)
    r, mean, lo, hi = per_round_spread(metrics, "train_loss")
    if len(r):
        axes[1].plot(r, mean, marker="o", label="mean over agents")
        axes[1].fill_between(r, lo, hi, alpha=0.25, label="min-max")
        axes[1].set(xlabel="round", ylabel="training loss", title="local training loss (mean of the round's steps)")
        axes[1].legend(fontsize=8)
    r, cd = per_round(metrics, "consensus_distance")
    if len(r):
        axes[2].plot(r, np.maximum(cd.mean(1), 1e-12), marker="o")
        axes[2].set(
            xlabel="round",
            ylabel="mean over agents",
            title="consensus distance: sum over layers of ||s B A - mean||_F",
            yscale="log",
        )
    for ax in axes:
        _rounds_axis(ax)
    fig.suptitle(f"{summary.get('algorithm', '')} on {summary.get('topology', '')}, {summary.get('agents', '')} agents")
    path = os.path.join(plots, "training.png")
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    part_path = os.path.join(run_dir, "partition.json")
    if os.path.exists(part_path):
        part = read_json(part_path)
        hist = np.array(part["histograms"])
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(hist) + 2), 3.4), layout="constrained")
        bottom = np.zeros(len(hist))
        for c, name in enumerate(part["class_names"]):
            ax.bar(np.arange(len(hist)), hist[:, c], bottom=bottom, label=name)
            bottom += hist[:, c]
        ax.set(xlabel="agent", ylabel="training examples", title=f"label histogram per agent ({part['scheme']})")
        if len(part["class_names"]) <= 12:
            ax.legend(fontsize=8)
        path = os.path.join(plots, "label_histograms.png")
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def run_table(run_dir: str) -> str:
    summary = read_json(os.path.join(run_dir, "summary.json"))
    metrics = read_metrics(run_dir)
    last = sorted((m for m in metrics if m["round"] == summary["rounds"]), key=lambda m: m["agent"])
    fa = summary["final_accuracy"]
    lines = [
        f"# {summary['name']}: {summary['algorithm']}",
        "",
        f"{summary['agents']} agents, {summary['topology']} topology (spectral gap {summary['spectral_gap']:.3f}), "
        f"{summary['partition']} partition, {summary['rounds']} rounds x {summary['local_steps']} local steps, seed "
        f"{summary['seed']}, "
        f"optimizer state after mixing: {summary['state_after_mix']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test accuracy, mean over agents | {fa['mean']:.4f} |",
        f"| test accuracy, min / max | {fa['min']:.4f} / {fa['max']:.4f} |",
        f"| test macro-F1, mean | {summary['final_f1_mean']:.4f} |",
        f"| majority-class rate of the test set | {summary['majority_rate']:.4f} |",
        f"| consensus distance, mean | {summary['final_consensus_distance']:.4g} |",
        f"| bytes sent per agent | {summary['bytes_sent_per_agent']:.4g} |",
        f"| wall time | {summary['wall_seconds']:.1f} s |",
        "",
        "| agent | test acc | local acc | consensus distance | train loss |",
        "|---|---|---|---|---|",
    ]
    for m in last:
        local = m.get("local_accuracy")
        loss = m.get("train_loss")
        lines.append(
            f"| {m['agent']} | {m['eval_accuracy']:.4f} | {'-' if local is None else f'{local:.4f}'} | "
            f"{m['consensus_distance']:.4g} | "
            f"{'absent' if loss is None else f'{loss:.4f}'} |"
        )
    lines += ["", "![training](plots/training.png)", "", "![labels](plots/label_histograms.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: str) -> str:
    """(Re)build ``plots/`` and ``report.md`` of a finished run; returns the report's path."""
    check_run_dir(run_dir, ("config.yaml", "metrics.jsonl", "summary.json"))
    plot_run(run_dir)
    path = os.path.join(run_dir, "report.md")
    write_text(path, run_table(run_dir))
    return path


def compare_table(rows: list[dict]) -> str:
    """Markdown table, mean +- std over seeds per algorithm. ``rows``: one summary per run."""
    by_algo: dict[str, list[dict]] = defaultdict(list)
    for s in rows:
        by_algo[s["algorithm"]].append(s)

    def ms(values):
        v = np.array(values, dtype=float)
        return f"{v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"

    lines = [
        "| algorithm | seeds | test acc (mean over agents) | worst agent | consensus distance | MB sent per agent |",
        "|---|---|---|---|---|---|",
    ]
    for algo, ss in by_algo.items():
        lines.append(
            f"| {algo} | {len(ss)} | {ms([s['final_accuracy']['mean'] for s in ss])} | "
            f"{ms([s['final_accuracy']['min'] for s in ss])} | "
            f"{ms([s['final_consensus_distance'] for s in ss])} | "
            f"{np.mean([s['bytes_sent_per_agent'] for s in ss]) / 1e6:.3g} |"
        )
    if rows:
        lines += ["", f"Majority-class rate of the test set: {rows[0]['majority_rate']:.4f}."]
    return "\n".join(lines)


def plot_compare(run_dirs: dict[str, list[str]], path: str) -> str:
    """Test accuracy per round, mean over agents and seeds, one line per algorithm.

    With the whole registry on one plot, colours alone repeat (matplotlib cycles 10): each method also gets its own
    marker and line style, and the legend sits beside the axes, where it hides no line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5 if len(run_dirs) > 6 else 6, 3.8), layout="constrained")
    colours = plt.get_cmap("tab20").colors
    markers, styles = "osD^vP*Xh<>", ("-", "--", ":", "-.")
    for i, (algo, dirs) in enumerate(run_dirs.items()):
        curves = []
        for d in dirs:
            r, acc = per_round(read_metrics(d), "eval_accuracy")
            curves.append(acc.mean(1))
        c = np.array(curves)
        colour = colours[(2 * i) % 20 + (2 * i) // 20 % 2]
        ax.plot(
            r, c.mean(0), marker=markers[i % len(markers)], ls=styles[i // 10 % len(styles)], color=colour, label=algo
        )
        if len(c) > 1:
            ax.fill_between(r, c.mean(0) - c.std(0), c.mean(0) + c.std(0), alpha=0.2, color=colour)
    ax.set(xlabel="round", ylabel="test accuracy (mean over agents)", title="comparison")
    _rounds_axis(ax)
    if len(run_dirs) > 6:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=1 + len(run_dirs) // 13)
    else:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path
