"""The simulation engine: N agents in one process around ONE frozen base model.

Each round every agent swaps its adapter into the model's LoRA slot, trains ``local_steps`` AdamW steps on its own
data (cosine schedule, gradient clipping), and swaps it back out; then the algorithm mixes the stacked factors
layer by layer with this round's mixing matrix; every ``eval_every`` rounds each agent is evaluated on the shared
test set and on its own held-out split. Memory is base + N x (adapter + optimizer state).

Training happens before the first exchange (pitfall 1 of the paper notes: LoRA's B starts at 0).
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from .. import algorithms
from ..adapters import AgentStates, attach_lora
from ..algorithms.fedavg import server_weights
from ..config import RunConfig, dump_config, load_config, validate_config
from ..faults import RoundFaults, absent_agents, check_parts, drop_links, isolate, poison, renormalize_without
from ..rundir import new_run_dir, save_tensors, write_json, write_jsonl, write_text
from ..topology import Topology
from .checkpoint import FILE as CHECKPOINT_FILE
from .checkpoint import load_checkpoint, save_checkpoint
from .split import DataSplit, split_data


@dataclass
class RunResult:
    run_dir: str | None
    summary: dict
    metrics: list[dict]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ..config import ConfigError

        raise ConfigError([f"device={name!r} but no CUDA device is visible; use device=cpu or device=auto."])
    return torch.device(name)


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``min_lr`` over the remaining steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


DIAGNOSTICS = ("tsvd_tail", "tsvd_tail_bound", "tsvd_tail_ratio", "factor_norm_c")


def accumulate_diagnostics(diag: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Fold one layer's mixing statistics into per-agent totals: tails and bounds add up, ratios and norms take the max."""
    if "tsvd_tail" not in stats:
        return
    tail = stats["tsvd_tail"].double().cpu()
    bound = stats.get("tsvd_tail_bound")
    layer = {"tsvd_tail": tail}
    if bound is not None:
        bound = bound.double().cpu()
        layer["tsvd_tail_bound"] = bound
        layer["tsvd_tail_ratio"] = torch.where(bound > 0, tail / bound.clamp(min=1e-300), torch.zeros_like(tail))
        layer["factor_norm_c"] = stats["factor_norm_c"].double().cpu()
    for k, v in layer.items():
        if k not in diag:
            diag[k] = v
        elif k in ("tsvd_tail", "tsvd_tail_bound"):
            diag[k] = diag[k] + v
        else:
            diag[k] = torch.maximum(diag[k], v)


def mixing_inputs(W: np.ndarray, own: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """What mixing the agents ``own`` reads: the agents their rows weigh (``inputs``, sorted, ``own`` included), the
    rows restricted to those columns, and where each own agent sits among the inputs (``self_index``)."""
    inputs = sorted(set(own) | {int(j) for i in own for j in np.nonzero(W[i])[0]})
    pos = {a: k for k, a in enumerate(inputs)}
    rows = torch.from_numpy(np.ascontiguousarray(W[np.ix_(own, inputs)]))
    return inputs, rows, torch.tensor([pos[a] for a in own])


class Simulation:
    """Build everything from a config (and optionally a ready task), then :meth:`run`."""

    def __init__(
        self,
        cfg: RunConfig,
        task=None,
        run_dir: str | None = None,
        progress: bool = True,
        write: bool = True,
        resume: bool = False,
    ):
        validate_config(cfg)
        self.cfg = cfg
        self.progress = progress
        self.device = resolve_device(cfg.device)
        from ..tasks import build_task

        self.task = task if task is not None else build_task(cfg)
        keys = self.task.examples.extra.get("key")
        self.split: DataSplit = split_data(self.task.labels, cfg, keys, getattr(self.task, "test_indices", None))
        self.task.prepare(np.concatenate([self.split.test, *self.split.train, *self.split.local_eval]))
        self.topology = Topology.build(cfg.topology.name, cfg.agents, mixing=cfg.topology.mixing, **cfg.topology.params)
        self.schedule = self.topology.schedule(cfg.topology.schedule, seed=cfg.seed, p=cfg.topology.link_drop)
        self.algorithm = algorithms.get(cfg.algorithm, **cfg.algorithm_options)

        torch.manual_seed(cfg.seed)
        base = self.task.build_model(seed=cfg.seed)
        for p in base.parameters():
            p.requires_grad_(False)
        targets = cfg.lora.targets or list(self.task.default_targets)
        self.model = attach_lora(
            base,
            targets,
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora.dropout,
            cfg.lora.rslora,
            self.task.head_modules,
            seed=cfg.seed,
        ).to(self.device)
        self.states = AgentStates(self.model, cfg.agents)
        params = self.states.parameters()
        self.optimizers = [
            torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay) for _ in range(cfg.agents)
        ]
        self._orders = [np.zeros(0, dtype=np.int64) for _ in range(cfg.agents)]
        self._cursor = [0] * cfg.agents
        self._batch_rng = [np.random.default_rng([cfg.seed, 31, a]) for a in range(cfg.agents)]
        self.total_steps = cfg.rounds * cfg.local_steps
        self.metrics: list[dict] = []
        self.run_dir = None
        self.start_round, self._elapsed_before = 0, 0.0
        self.checkpoint_file = CHECKPOINT_FILE
        if resume:
            self.run_dir = run_dir
            self.start_round, self._elapsed_before = load_checkpoint(self)
        elif write:
            self.run_dir = run_dir or new_run_dir(cfg.out_dir, cfg.name, self.algorithm.name, cfg.seed)
            self._write_setup()

    # ---------------------------------------------------------------------------------------------- set-up files
    def _write_setup(self) -> None:
        d = self.run_dir
        write_text(os.path.join(d, "config.yaml"), dump_config(self.cfg))
        write_json(os.path.join(d, "topology.json"), self.topology.summary())
        part = self.split.partition
        write_json(
            os.path.join(d, "partition.json"),
            {
                "scheme": part.scheme,
                "class_names": self.task.examples.class_names,
                "train_sizes": self.split.sizes.tolist(),
                "local_eval_sizes": [len(x) for x in self.split.local_eval],
                "histograms": part.histograms.tolist(),
                "test_histogram": np.bincount(
                    self.task.labels[self.split.test], minlength=len(self.task.examples.class_names)
                ).tolist(),
                "train": [x.tolist() for x in self.split.train],
                "local_eval": [x.tolist() for x in self.split.local_eval],
                "test": self.split.test.tolist(),
            },
        )

    # ---------------------------------------------------------------------------------------------- training
    def _next_batch(self, agent: int) -> np.ndarray:
        data = self.split.train[agent]
        bs = min(self.cfg.task.batch_size, len(data))
        if self._cursor[agent] + bs > len(self._orders[agent]):
            self._orders[agent] = data[self._batch_rng[agent].permutation(len(data))]
            self._cursor[agent] = 0
        out = self._orders[agent][self._cursor[agent] : self._cursor[agent] + bs]
        self._cursor[agent] += bs
        return out

    def train_agent(self, agent: int, round_: int) -> float:
        from ..tasks.base import to_device

        cfg = self.cfg
        opt = self.optimizers[agent]
        self.states.load(agent)
        self.model.train()
        # Dropout draws from a stream of this agent and round alone, so results do not depend on which process
        # trains which agent, nor in what order (the distributed engine equals the simulator).
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, 41, agent, round_]).generate_state(1)[0]))
        losses = []
        for s in range(cfg.local_steps):
            step = round_ * cfg.local_steps + s
            for group in opt.param_groups:
                group["lr"] = lr_at(step, self.total_steps, cfg.optim)
            batch = to_device(self.task.batch(self._next_batch(agent)), self.device)
            loss = self.task.loss(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"agent {agent} hit a non-finite loss at round {round_ + 1}; lower optim.lr (now {cfg.optim.lr})."
                )
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.states.parameters() if p.grad is not None], cfg.optim.grad_clip
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        self.states.store(agent)
        return float(np.mean(losses))

    # ---------------------------------------------------------------------------------------------- mixing
    def mixing_matrix(self, round_: int) -> torch.Tensor:
        if self.algorithm.communication == "server":
            return server_weights(self.split.sizes)
        if self.algorithm.communication == "none":
            return torch.eye(self.cfg.agents, dtype=torch.float64)
        return torch.from_numpy(self.schedule.matrix(round_))

    def round_plan(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """This round's mixing matrix after link drops and absences, and the mask of absent agents."""
        f = self.cfg.faults
        W = self.mixing_matrix(round_).numpy()
        absent = absent_agents(self.cfg.agents, f.agent_dropout, self.cfg.seed, round_)
        if self.algorithm.communication == "gossip":
            W = isolate(drop_links(W, f.link_drop, self.cfg.seed, round_), absent)
        elif self.algorithm.communication == "server" and absent.any():
            present = ~absent
            W = np.eye(self.cfg.agents)  # the absent keep their own adapter; the server averages the present
            if present.any():
                W[present] = server_weights(self.split.sizes * present, int(present.sum())).numpy()
        return W, absent

    def payload(self, agent: int, round_: int) -> list[torch.Tensor]:
        """What ``agent`` transmits this round, layer by layer (a poisoned agent transmits garbage)."""
        st = self.states
        sends = self.algorithm.sends(round_)
        out = [t[agent] for A, B in zip(st.A, st.B) for name, t in (("A", A), ("B", B)) if name in sends]
        out += [h[agent] for h in st.H.values()]
        if agent == self.cfg.faults.poison_agent:
            out = [poison(t, self.cfg.faults.poison) for t in out]
        return out

    def expected_payload(self, round_: int) -> list[tuple[torch.Size, torch.dtype]]:
        """(shape, dtype) of each tensor of a healthy payload, in :meth:`payload` order."""
        st = self.states
        sends = self.algorithm.sends(round_)
        out = [(t.shape[1:], t.dtype) for A, B in zip(st.A, st.B) for name, t in (("A", A), ("B", B)) if name in sends]
        return out + [(h.shape[1:], h.dtype) for h in st.H.values()]

    def screen(self, W: np.ndarray, round_: int) -> RoundFaults:
        """Check every payload that crosses a link; receivers drop the senders whose payload fails."""
        faults = RoundFaults()
        if self.algorithm.communication == "none":
            return faults
        expected = self.expected_payload(round_)
        off = W - np.diag(np.diag(W))
        for j in np.nonzero(off.any(axis=0))[0]:
            reason = check_parts(self.payload(int(j), round_), expected, self.cfg.faults.max_norm)
            if reason:
                faults.reasons[int(j)] = reason
                for i in np.nonzero(off[:, j])[0]:
                    faults.rejected.setdefault(int(i), []).append(int(j))
        return faults

    @torch.no_grad()
    def mix(self, round_: int, W: np.ndarray | None = None) -> dict:
        """Screen every payload, drop the rejected senders from the rows, and mix all agents."""
        W = self.round_plan(round_)[0] if W is None else W
        faults = self.screen(W, round_)
        diagnostics = self.apply_mixing(round_, renormalize_without(W, faults.rejected), self.own)
        return {"diagnostics": diagnostics, "faults": faults}

    @torch.no_grad()
    def apply_mixing(self, round_: int, W: np.ndarray, own: list[int]) -> dict[str, dict[int, float]]:
        """Mix the agents ``own`` with the rows ``W[own]`` (stacks must hold current factors of every input).

        The algorithm sees only ``own`` plus the agents those rows weigh, with ``self_index`` telling where each
        output agent's own factors sit: the same call for the simulator (all agents) and a distributed process.
        Returns the per-agent diagnostics of methods that truncate (DeCAF): the TSVD tail and its Proposition 1
        bound summed over layers, and the largest per-layer tail / bound ratio and factor norm ``c``.
        """
        st = self.states
        inputs, rows, self_index = mixing_inputs(W, own)
        dev = st.A[0].device
        own_t, in_t = torch.tensor(own, device=dev), torch.tensor(inputs, device=dev)
        diag: dict[str, torch.Tensor] = {}
        for l in range(len(st.layers)):
            out = self.algorithm.mix(st.A[l][in_t], st.B[l][in_t], rows.to(dev), round_=round_, self_index=self_index)
            st.A[l][own_t] = out.A
            st.B[l][own_t] = out.B
            accumulate_diagnostics(diag, out.stats)
        if self.algorithm.communication != "none":
            for h in st.H.values():
                h[own_t] = torch.einsum("ij,j...->i...", rows.to(h.dtype).to(h.device), h[in_t])
        self.after_mix(own)
        return {k: dict(zip(own, v.tolist())) for k, v in diag.items()}

    def after_mix(self, own: list[int]) -> None:
        """Apply ``optim.state_after_mix``: AdamW moments refer to the old factor basis, so 'reset' drops them."""
        if self.cfg.optim.state_after_mix == "reset":
            for a in own:
                self.optimizers[a].state = defaultdict(dict)

    def sent_bytes(self, agent: int, round_: int) -> int:
        """Bytes of the tensors ``agent`` actually sends to one receiver (a poisoned payload may differ in size)."""
        return sum(t.numel() * t.element_size() for t in self.payload(agent, round_))

    def payload_bytes(self, round_: int) -> int:
        """Bytes one agent sends to one receiver this round: the factors the method sends plus the head."""
        if self.algorithm.communication == "none":
            return 0
        st = self.states
        total = sum(
            self.algorithm.payload_numel(A.shape, B.shape, round_) * A.element_size() for A, B in zip(st.A, st.B)
        )
        return total + sum(h[0].numel() * h.element_size() for h in st.H.values())

    # ---------------------------------------------------------------------------------------------- evaluation
    def evaluate_agent(self, agent: int) -> dict:
        self.states.load(agent)
        bs = self.cfg.task.eval_batch_size
        shared = self.task.evaluate(self.model, self.split.test, bs, self.device)
        local = self.task.evaluate(self.model, self.split.local_eval[agent], bs, self.device)
        out = {"eval_loss": shared["loss"], "eval_accuracy": shared["accuracy"], "eval_f1": shared["f1"]}
        if local:
            out.update(local_loss=local["loss"], local_accuracy=local["accuracy"])
        return out

    # ---------------------------------------------------------------------------------------------- hooks
    # The distributed engine overrides these four; everything else is shared, so both engines compute alike.
    @property
    def own(self) -> list[int]:
        """Agents this process trains and evaluates (all of them here)."""
        return list(range(self.cfg.agents))

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory's shared files."""
        return self.run_dir is not None

    def exchange_and_mix(self, round_: int, W: np.ndarray) -> dict:
        out = self.mix(round_, W)
        n = self.cfg.agents
        if self.algorithm.communication == "none":
            out["bytes"] = out["bytes_received"] = {a: 0 for a in range(n)}
            return out
        # bytes of the tensors actually sent (a poisoned payload may be smaller), once per receiver
        size = {a: self.sent_bytes(a, round_) for a in range(n)}
        if self.algorithm.communication == "server":  # one upload and one download, unless absent (identity row)
            out["bytes"] = {a: size[a] if W[a, a] < 1 else 0 for a in range(n)}
            out["bytes_received"] = {a: self.payload_bytes(round_) if W[a, a] < 1 else 0 for a in range(n)}
        else:
            off = W - np.diag(np.diag(W))
            out["bytes"] = {a: size[a] * int(np.count_nonzero(off[:, a])) for a in range(n)}
            out["bytes_received"] = {a: sum(size[int(j)] for j in np.nonzero(off[a])[0]) for a in range(n)}
        return out

    def consensus(self) -> torch.Tensor:
        return self.states.consensus_distance()

    def collect(self, rows: list[dict]) -> list[dict]:
        """This round's metrics rows of every agent (the distributed engine gathers them from all processes)."""
        return rows

    def gather_states(self) -> None:
        """Make every agent's final adapter available to the writing process (a no-op here)."""

    # ---------------------------------------------------------------------------------------------- loop
    def run(self) -> RunResult:
        cfg = self.cfg
        n = cfg.agents
        t_start = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.rounds,
                initial=self.start_round,
                desc=f"{self.algorithm.name} x{n}",
                unit="round",
                dynamic_ncols=True,
            )
        last_acc = float("nan")
        for t in range(self.start_round, cfg.rounds):
            self.states.set_trainable(self.algorithm.trainable(t))
            W, absent = self.round_plan(t)
            t_train, losses = {}, {}
            for a in self.own:
                if absent[a]:
                    losses[a], t_train[a] = None, 0.0  # an absent agent neither trains nor talks this round
                    continue
                t0 = time.perf_counter()
                losses[a] = self.train_agent(a, t)
                t_train[a] = time.perf_counter() - t0
            t0 = time.perf_counter()
            mixed = self.exchange_and_mix(t, W)
            t_mix = (time.perf_counter() - t0) / len(self.own)
            faults = mixed["faults"]
            consensus = self.consensus()
            evals, t_eval = {a: {} for a in self.own}, {a: 0.0 for a in self.own}
            if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:
                for a in self.own:
                    t0 = time.perf_counter()
                    evals[a] = self.evaluate_agent(a)
                    t_eval[a] = time.perf_counter() - t0
            rows = []
            for a in self.own:
                rows.append(
                    {
                        "round": t + 1,
                        "agent": a,
                        "train_loss": losses[a],
                        "lr": lr_at((t + 1) * cfg.local_steps - 1, self.total_steps, cfg.optim),
                        **evals[a],
                        "consensus_distance": float(consensus[a]),
                        **dict.fromkeys(DIAGNOSTICS),
                        **{k: v.get(a) for k, v in mixed["diagnostics"].items()},
                        "neighbors": int(np.count_nonzero(W[a]) - (W[a, a] != 0)),
                        "absent": bool(absent[a]),
                        "rejected": faults.rejected.get(a, []),
                        "timed_out": faults.timed_out.get(a, []),
                        "payload_rejected": faults.reasons.get(a),
                        "bytes_sent": int(mixed["bytes"][a]),
                        "bytes_received": int(mixed["bytes_received"][a]),
                        "seconds": {"train": t_train[a], "mix": t_mix, "eval": t_eval[a]},
                    }
                )
            rows = sorted(self.collect(rows), key=lambda r: r["agent"])
            self.metrics += rows
            evaluated = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
            if evaluated:
                last_acc = float(np.mean(evaluated))
            if self.run_dir:
                if self.writes:
                    write_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), self.metrics)
                save_checkpoint(self, t + 1, self._elapsed_before + time.perf_counter() - t_start)
            if bar is not None:
                live = [r["train_loss"] for r in rows if r["train_loss"] is not None]
                bar.set_postfix(
                    loss=f"{np.mean(live):.3f}" if live else "-", acc="-" if np.isnan(last_acc) else f"{last_acc:.3f}"
                )
                bar.update(1)
        if bar is not None:
            bar.close()
        summary = self.summarize(self._elapsed_before + time.perf_counter() - t_start)
        self.gather_states()
        if self.run_dir and self.writes:
            save_tensors(
                os.path.join(self.run_dir, "adapters.safetensors"),
                self.states.state_dict(),
                {"format": "decaf-lora agents x factors"},
            )
            write_json(os.path.join(self.run_dir, "summary.json"), summary)
            from ..report import write_report

            write_report(self.run_dir)
        return RunResult(self.run_dir, summary, self.metrics)

    def summarize(self, wall: float) -> dict:
        cfg = self.cfg
        last = [m for m in self.metrics if m["round"] == cfg.rounds]
        acc = np.array([m["eval_accuracy"] for m in last])
        test_hist = np.bincount(self.task.labels[self.split.test])
        return {
            "name": cfg.name,
            "algorithm": self.algorithm.name,
            "algorithm_options": self.algorithm.options(),
            "agents": cfg.agents,
            "rounds": cfg.rounds,
            "local_steps": cfg.local_steps,
            "topology": self.topology.name,
            "spectral_gap": self.topology.spectral_gap,
            "partition": self.split.partition.scheme,
            "seed": cfg.seed,
            "split_seed": cfg.split_seed,
            "state_after_mix": cfg.optim.state_after_mix,
            "metric": self.task.metric,
            "final_accuracy": {"mean": float(acc.mean()), "min": float(acc.min()), "max": float(acc.max())},
            "final_f1_mean": float(np.mean([m["eval_f1"] for m in last])),
            "final_local_accuracy_mean": float(np.mean([m["local_accuracy"] for m in last]))
            if "local_accuracy" in last[0]
            else None,
            "final_consensus_distance": float(np.mean([m["consensus_distance"] for m in last])),
            "majority_rate": float(test_hist.max() / test_hist.sum()),
            "bytes_sent_per_agent": float(
                np.mean([sum(m["bytes_sent"] for m in self.metrics if m["agent"] == a) for a in range(cfg.agents)])
            ),
            "wall_seconds": wall,
            "adapter_bytes": self.states.adapter_bytes(),
        }


def resume(run_dir: str, overrides: list[str] | tuple[str, ...] = (), task=None, progress: bool = False) -> RunResult:
    """Continue a run from its last finished round; the result equals that of an uninterrupted run.

    ``overrides`` may only restate the run's own config (and change ``device``): a resume with a different config
    is refused, since it would silently mix two experiments in one directory.
    """
    from ..config import ConfigError
    from ..rundir import check_run_dir, read_json

    check_run_dir(run_dir, ("config.yaml",))
    stored = load_config(os.path.join(run_dir, "config.yaml"))
    wanted = load_config(stored.to_dict(), overrides)
    differ = [
        f"{k}: {a!r} in the run, {b!r} now" for k, a, b in _diff(stored.to_dict(), wanted.to_dict()) if k != "device"
    ]
    if differ:
        raise ConfigError(
            [
                f"cannot resume {run_dir!r} with a different config ({'; '.join(differ)}); drop those overrides or start a new run."
            ]
        )
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        from ..rundir import read_metrics

        return RunResult(run_dir, read_json(os.path.join(run_dir, "summary.json")), read_metrics(run_dir))
    if wanted.engine == "distributed":
        from .distributed import DistributedSimulation

        return DistributedSimulation(wanted, task=task, progress=progress, run_dir=run_dir).run()
    return Simulation(wanted, task=task, run_dir=run_dir, progress=progress, resume=True).run()


def _diff(a: dict, b: dict, prefix: str = ""):
    for k in a:
        if isinstance(a[k], dict) and isinstance(b.get(k), dict) and k not in ("algorithm_options", "params"):
            yield from _diff(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b.get(k):
            yield prefix + k, a[k], b.get(k)


def run(
    config, task=None, progress: bool = False, overrides: list[str] | tuple[str, ...] = (), write: bool = True
) -> RunResult:
    """Python entry point: ``decaf_lora.run("cfg.yaml")``, ``run(RunConfig(...))`` or ``run({"agents": 4, ...})``.

    Pass ``task`` to train your own model and data (see :class:`decaf_lora.tasks.ModuleTask`).
    """
    if isinstance(config, RunConfig):
        config = config.to_dict()
    return Simulation(load_config(config, overrides), task=task, progress=progress, write=write).run()
