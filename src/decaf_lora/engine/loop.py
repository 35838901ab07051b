"""The round loop, shared by both engines: plan, train, exchange, mix, measure, record, checkpoint.

One round ``t`` (:meth:`Engine.run_round`):

1. the algorithm plans the round's mixing from the network (:meth:`~decaf_lora.algorithms.Algorithm.plan`);
2. every present agent this process owns trains ``local_steps`` steps on its own data (absent ones sit it out);
3. the exchange hook delivers payloads (described by :class:`~decaf_lora.payload.PayloadSpec`, screened by
   :mod:`~decaf_lora.engine.screening`): in-process for the simulator, point to point or gathered under torchrun;
   rejected and late senders leave the receivers' rows, which are renormalized;
4. each own agent mixes, layer by layer, its own factors with what it received (:meth:`Engine.mix_own`); parts a
   sender did not send are NaN, so a method that reads them fails loudly; statistics are reduced over layers by
   the rules the algorithm declares;
5. consensus distance, evaluation when due, one metrics row per agent (:data:`ROW_SCHEMA`), the metrics file and
   a checkpoint of every own agent.

Subclasses implement the hooks that differ between engines: :attr:`own`, :attr:`writes`, :meth:`exchange`,
:meth:`consensus`, :meth:`collect`, :meth:`gather_states`, :attr:`rank` / :attr:`world`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters import AgentStates
from ..algorithms import REDUCTIONS, LayerContext, MixingPlan
from ..config import ConfigError, config_differences, dump_config, load_config
from ..errors import DecafError
from ..lowrank import mask_ranks
from ..payload import PayloadSpec
from ..rundir import (
    file_digest,
    read_json,
    save_tensors,
    verified_identity,
    write_identity,
    write_json,
    write_jsonl,
    write_text,
)
from . import checkpoint
from .build import Run
from .screening import RoundFaults, renormalize_without, screen
from .training import LocalTraining, agent_seed

#: Every column a ``metrics.jsonl`` row may have (plus the statistics the algorithm declares in ``Algorithm.stats``).
ROW_SCHEMA: dict[str, str] = {
    "round": "round number, counted from 1",
    "agent": "agent id",
    "rank": "the agent's LoRA rank after the round (largest over layers)",
    "train_loss": "mean training loss of the round's local steps; null when the agent sat the round out",
    "train_loss_start": "loss of the round's first local step, before it updated anything: the model the last mix left",
    "lr": "learning rate of the round's last local step",
    "eval_loss": "loss on the shared test set (evaluated rounds only)",
    "eval_accuracy": "accuracy on the shared test set (evaluated rounds only)",
    "eval_f1": "macro-F1 on the shared test set (evaluated rounds only)",
    "local_loss": "loss on the agent's own held-out examples (evaluated rounds, when partition.local_eval > 0)",
    "local_accuracy": "accuracy on the agent's own held-out examples (evaluated rounds, when partition.local_eval > 0)",
    "consensus_distance": "sum over layers of ||s B_i A_i - mean_j s B_j A_j||_F after the mix",
    "neighbors": "agents whose payload this agent's row weighed this round (itself excluded)",
    "absent": "whether the agent sat the round out (no training, no exchange)",
    "rejected": "senders whose payload this agent rejected this round",
    "timed_out": "neighbours whose process missed this round's exchange deadline (engine=distributed)",
    "payload_rejected": "why this agent's own payload was rejected by its receivers, or null",
    "bytes_sent": "bytes this agent sent this round (its payload once per receiver; once to a server)",
    "bytes_received": "bytes this agent received this round",
    "seconds": "wall seconds of this agent's training, its share of the mix, and its evaluation",
}
OPTIONAL = {"eval_loss", "eval_accuracy", "eval_f1", "local_loss", "local_accuracy"}
#: Examples of an agent's own training data whose layer inputs feed activation-matching methods.
ACTIVATION_EXAMPLES = 64
ACTIVATION_ROWS = 256


@dataclass
class RunResult:
    run_dir: str | None
    summary: dict
    metrics: list[dict]


@dataclass
class Exchange:
    """What the exchange hook delivered: each accepted sender's decoded payload, the faults, and the bytes."""

    received: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    faults: RoundFaults = field(default_factory=RoundFaults)
    sent: dict[int, int] = field(default_factory=dict)
    received_bytes: dict[int, int] = field(default_factory=dict)

    def take(self, sender: int, flat: torch.Tensor, counts: list[int], receivers, spec: PayloadSpec, max_norm: float):
        """Screen one arrived payload for its receivers: accepted, it is what they mix; rejected, every one of them
        leaves ``sender`` out this round, and the reason is logged (every engine screens through here)."""
        reason, parts = screen(spec, flat, counts, max_norm)
        if reason:
            self.faults.reject(sender, receivers, reason)
        elif len(receivers):
            self.received[sender] = parts


def reduce_stats(
    total: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], rules: dict[str, str], who: str
) -> None:
    """Fold one layer's per-agent statistics into the round's totals by each statistic's declared reduction."""
    for key, value in stats.items():
        rule = rules.get(key)
        if rule not in REDUCTIONS:
            raise DecafError(
                f"algorithm {who!r} returned the statistic {key!r} without declaring how it reduces over layers; "
                f"add it to the class's `stats` with one of: {', '.join(REDUCTIONS)}."
            )
        v = value.detach().double().cpu().reshape(-1)
        if rule == "rss":
            v = v * v
        if key not in total:
            total[key] = v
        elif rule == "max":
            total[key] = torch.maximum(total[key], v)
        else:
            total[key] = total[key] + v


class Engine:
    """The round loop around a built :class:`~decaf_lora.engine.build.Run`; see the module docstring."""

    rank, world = 0, 1

    def __init__(self, run: Run, *, run_dir: str | None = None, progress: bool = True):
        self.cfg, self.device, self.task, self.split = run.cfg, run.device, run.task, run.split
        self.topology, self.network, self.algorithm = run.topology, run.network, run.algorithm
        self.model, self.states = run.model, run.states
        self.training = LocalTraining(run.cfg, run.task, run.model, run.states, run.split.train, run.device)
        # per-agent algorithm state lives where the factors live, so methods compute with it on the same device
        self.algo_state = [
            {k: v.to(run.device) for k, v in self.algorithm.init_state(info, self.cfg.agents).items()}
            for info in run.layers
        ]
        self.progress = progress
        self.run_dir = run_dir
        self.metrics: list[dict] = []
        self.start_round, self.elapsed_before = 0, 0.0
        self.identity: dict | None = None
        self._file_digests: dict[str, str] = {}
        self._metrics_hash, self._hashed_rows = None, 0  # running digest of self.metrics (rows are only appended)

    # ----------------------------------------------------------------------------------------- engine hooks
    @property
    def own(self) -> list[int]:
        """Agents this process trains, mixes and evaluates."""
        raise NotImplementedError

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory's shared files."""
        raise NotImplementedError

    def exchange(self, round_: int, plan: MixingPlan, spec: PayloadSpec) -> Exchange:
        """Deliver this round's payloads to the own agents whose rows weigh them, screened."""
        raise NotImplementedError

    def consensus(self) -> dict[int, float]:
        raise NotImplementedError

    def collect(self, rows: list[dict], faults: RoundFaults) -> list[dict]:
        """This round's rows of every agent (the distributed engine gathers them from all processes)."""
        raise NotImplementedError

    def gather_states(self) -> None:
        """Make every agent's final adapter available to the writing process."""

    @property
    def optimizers(self) -> list:
        return self.training.optimizers

    # ----------------------------------------------------------------------------------------- run directory
    def write_setup(self) -> None:
        """The files written before round 1: identity first (so a resume can verify the config), then the rest."""
        d = self.run_dir
        config_text = dump_config(self.cfg)
        self.identity = write_identity(
            d,
            config_text,
            data_sha256=self.data_digest(),
            torchelastic_run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
        )
        write_text(os.path.join(d, "config.yaml"), config_text)
        write_json(os.path.join(d, "topology.json"), self.topology.summary())
        part = self.split.partition
        names = self.task.examples.class_names
        write_json(
            os.path.join(d, "partition.json"),
            {
                "scheme": part.scheme,
                "class_names": names,
                "train_sizes": self.split.sizes.tolist(),
                "local_eval_sizes": [len(x) for x in self.split.local_eval],
                "histograms": part.histograms.tolist(),
                "test_histogram": np.bincount(self.task.labels[self.split.test], minlength=len(names)).tolist(),
                "train": [x.tolist() for x in self.split.train],
                "local_eval": [x.tolist() for x in self.split.local_eval],
                "test": self.split.test.tolist(),
            },
        )

    def data_digest(self) -> str:
        """The digest of every example the run touches (training, held-out and test), recorded in run.json."""
        split = self.split
        used = np.unique(np.concatenate([*split.train, *split.local_eval, split.test]).astype(np.int64))
        return self.task.data_digest(used)

    def check_same_data(self) -> None:
        """A resume trains on the data the run started with, split the same way, or refuses in one sentence."""
        d = self.run_dir
        recorded = self.identity.get("data_sha256")
        if recorded is None:
            print(
                f"warning: {d!r} predates data digests in run.json; the data cannot be checked against the run's.",
                file=sys.stderr,
            )
        elif recorded != self.data_digest():
            raise DecafError(
                f"the task's data differs from the data {d!r} was started with (its digest in run.json); resume with "
                "the run's own data, or start a new run."
            )
        path = os.path.join(d, "partition.json")
        if not os.path.exists(path):
            return  # nothing to compare; a checkpoint that recorded it refuses the run (verify_run_files)
        stored = read_json(path)
        split = self.split
        rebuilt = {
            "train": [x.tolist() for x in split.train],
            "local_eval": [x.tolist() for x in split.local_eval],
            "test": split.test.tolist(),
        }
        if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in rebuilt.items()):
            raise DecafError(
                f"the data split rebuilt from the config differs from {path!r}; resume "
                "with the run's own data and decaf-lora version, or start a new run."
            )

    def run_file_digests(self) -> dict[str, str]:
        if not self._file_digests:
            self._file_digests = {n: file_digest(os.path.join(self.run_dir, n)) for n in checkpoint.RUN_FILES}
        return self._file_digests

    # ----------------------------------------------------------------------------------------- per-agent state
    def agent_state(self, agent: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything that decides ``agent``'s future: adapter, optimizer, batch order, algorithm state."""
        tensors = {f"adapter/{k}": v[agent : agent + 1] for k, v in self.states.state_dict().items()}
        opt, meta = self.training.state_dict(agent)
        tensors.update({f"train/{k}": v for k, v in opt.items()})
        for l, state in enumerate(self.algo_state):
            tensors.update({f"algo/{l}/{k}": v[agent] for k, v in state.items()})
        return tensors, meta

    def load_agent_state(self, agent: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        adapter = {k[len("adapter/") :]: v for k, v in tensors.items() if k.startswith("adapter/")}
        self.states.load_state_dict(adapter, agents=[agent])
        self.training.load_state_dict(
            agent, {k[len("train/") :]: v for k, v in tensors.items() if k.startswith("train/")}, meta
        )
        for l, state in enumerate(self.algo_state):
            for k, v in state.items():
                key = f"algo/{l}/{k}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(v[agent].shape):
                    raise DecafError(
                        f"the checkpoint lacks the algorithm state {key!r} of agent {agent}; it is not this run's."
                    )
                v[agent] = tensors[key].to(v.dtype).to(v.device)

    def _metrics_digest(self) -> str:
        """The digest of every metrics row so far, extended by the rows added since the last call."""
        digest, self._metrics_hash = checkpoint.metrics_digest(self.metrics[self._hashed_rows :], self._metrics_hash)
        self._hashed_rows = len(self.metrics)
        return digest

    def save_checkpoint(self, rounds_done: int, elapsed: float) -> None:
        shared = {
            "run_id": self.identity["run_id"],
            "files": self.run_file_digests(),
            "metrics_sha256": self._metrics_digest(),
            "elapsed": elapsed,
        }
        agents = {a: self.agent_state(a) for a in self.own}
        checkpoint.save_shard(self.run_dir, rounds_done, self.rank, self.world, agents, shared)

    def restore(self) -> None:
        """Continue from the newest complete, verified checkpoint of ``run_dir`` (or say plainly that none exists)."""
        d = self.run_dir
        self.identity = verified_identity(d)
        differ = config_differences(load_config(os.path.join(d, "config.yaml")).to_dict(), self.cfg.to_dict())
        if differ:  # the run as recorded, not what this process was asked to compute (a ModuleTask included)
            raise ConfigError(
                [
                    f"cannot resume {d!r} with a different config ({'; '.join(differ)}); use the run's own config and "
                    "task, or start a new run."
                ]
            )
        self.check_same_data()
        found, rows = checkpoint.verified_history(d, self.identity, self.cfg.agents)
        if found is None:
            print(f"note: no round of {d!r} finished (no checkpoint); it starts again from round 1.", file=sys.stderr)
            self.metrics = []
            return
        for why in found.skipped:
            print(f"warning: passed over {why}; resuming from round {found.round}.", file=sys.stderr)
        source = found.agent_source()
        for a in self.own:
            shard = source[a]
            prefix = f"agent/{a}/"
            tensors = {k[len(prefix) :]: v for k, v in found.tensors[shard.path].items() if k.startswith(prefix)}
            try:
                self.load_agent_state(a, tensors, shard.meta["per_agent"][str(a)])
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise DecafError(
                    f"checkpoint {shard.path!r} is damaged: agent {a}'s state is incomplete ({type(exc).__name__}: "
                    f"{exc}); restore the file, or start a new run."
                ) from None
        self.start_round = found.round
        self.elapsed_before = float(found.meta.get("elapsed", 0.0))
        self.metrics = rows

    # ----------------------------------------------------------------------------------------- one round
    def run_round(self, t: int) -> list[dict]:
        """Train, exchange, mix, measure one round (0-based ``t``); returns the round's rows of every agent."""
        cfg, algo, own = self.cfg, self.algorithm, self.own
        plan = algo.plan(t, self.network)
        absent = self.network.absent(t)
        self.states.set_trainable(algo.trainable(t))
        start = self._own_factors() if "start_factors" in algo.needs else None
        losses, t_train = {}, {}
        for a in own:
            t0 = time.perf_counter()
            losses[a] = (None, None) if absent[a] else self.training.train(a, t)
            t_train[a] = time.perf_counter() - t0
        t0 = time.perf_counter()
        activations = self._activations(t) if "activations" in algo.needs else None
        spec = PayloadSpec.of(self.states, algo.sends(t))
        ex = self.exchange(t, plan, spec)
        W = renormalize_without(plan.W, ex.faults.left_out())
        stats = self.mix_own(t, W, ex.received, spec, start, activations)
        self.training.after_mix(own)
        t_mix = (time.perf_counter() - t0) / len(own)
        consensus = self.consensus()
        evals, t_eval = {a: {} for a in own}, {a: 0.0 for a in own}
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:
            seen: dict[str, dict] = {}  # adapter digest -> its shared-test metrics, evaluated once per round
            for a in own:
                t0 = time.perf_counter()
                evals[a] = self.evaluate_agent(a, seen)
                t_eval[a] = time.perf_counter() - t0
        rows = []
        for a in own:
            row = {
                "round": t + 1,
                "agent": a,
                "rank": int(max(int(rk[a]) for rk in self.states.ranks)),
                "train_loss": losses[a][0],
                "train_loss_start": losses[a][1],
                "lr": self.training.lr(t),
                **evals[a],
                "consensus_distance": float(consensus[a]),
                **{k: v.get(a) for k, v in stats.items()},
                "neighbors": int(np.count_nonzero(W[a]) - (W[a, a] != 0)),
                "absent": bool(absent[a]),
                "rejected": ex.faults.rejected.get(a, []),
                "timed_out": ex.faults.timed_out.get(a, []),
                "payload_rejected": ex.faults.reasons.get(a),
                "bytes_sent": int(ex.sent.get(a, 0)),
                "bytes_received": int(ex.received_bytes.get(a, 0)),
                "seconds": {"train": t_train[a], "mix": t_mix, "eval": t_eval[a]},
            }
            rows.append(self._checked_row(row))
        return sorted(self.collect(rows, ex.faults), key=lambda r: r["agent"])

    def _checked_row(self, row: dict) -> dict:
        """The declared schema, with strict JSON values (a non-finite number becomes null)."""
        unknown = set(row) - set(ROW_SCHEMA) - set(self.algorithm.stats)
        if unknown:
            raise DecafError(
                f"metrics row has undeclared columns {sorted(unknown)}; declare them in ROW_SCHEMA or stats."
            )
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}

    def _own_factors(self) -> dict[str, list[torch.Tensor]]:
        own = torch.tensor(self.own, device=self.states.A[0].device)
        return {"A": [A[own].clone() for A in self.states.A], "B": [B[own].clone() for B in self.states.B]}

    @torch.no_grad()
    def _activations(self, t: int) -> list[torch.Tensor]:
        """Per layer, (own agents, rows, k): the layer's inputs on a sample of each agent's own training data, in
        eval mode, drawn from a stream of (seed, agent, round) so every process and resumed run sees the same."""
        from ..tasks.base import to_device

        layers = self.states.layers
        out: list[list[torch.Tensor]] = [[] for _ in layers]
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            layer.module.register_forward_pre_hook(lambda m, args, l=l: captured.__setitem__(l, args[0].detach()))
            for l, layer in enumerate(layers)
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            for a in self.own:
                rng = np.random.default_rng(agent_seed(self.cfg.seed, 43, a, t))
                data = self.split.train[a]
                idx = np.sort(rng.choice(data, size=min(ACTIVATION_EXAMPLES, len(data)), replace=False))
                self.states.load(a)
                captured.clear()
                self.task.loss(self.model, to_device(self.task.batch(idx), self.device))
                for l in range(len(layers)):
                    x = captured[l].reshape(-1, captured[l].shape[-1]).float()
                    pick = rng.choice(x.shape[0], size=min(ACTIVATION_ROWS, x.shape[0]), replace=False)
                    rows = x[torch.as_tensor(np.sort(pick), device=x.device)]
                    out[l].append(torch.nn.functional.pad(rows, (0, 0, 0, ACTIVATION_ROWS - rows.shape[0])))
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        return [torch.stack(x) for x in out]

    def mix_own(self, t, W, received, spec, start=None, activations=None) -> dict[str, dict[int, float]]:
        """Mix every own agent with its own factors and the payloads it received (see :func:`mix_agents`)."""
        return mix_agents(
            self.algorithm,
            self.states,
            self.algo_state,
            self.own,
            self.own,
            t,
            W,
            received,
            spec,
            start=start,
            activations=activations,
        )

    # ----------------------------------------------------------------------------------------- evaluation
    def adapter_digest(self, agent: int) -> str:
        """A digest of everything that decides ``agent``'s model: agents with equal digests predict alike."""
        import hashlib

        h = hashlib.sha256()
        for t in self.states.state_dict().values():
            h.update(t[agent].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def evaluate_agent(self, agent: int, seen: dict | None = None) -> dict:
        """Shared-test and own held-out metrics of one agent. Agents holding the very same adapter (a server method
        gives every present agent one model) reuse the shared-test result through ``seen``: evaluation is
        deterministic, so it would only repeat itself; each agent's own held-out examples are still evaluated."""
        self.states.load(agent)
        bs = self.cfg.task.eval_batch_size
        key = self.adapter_digest(agent) if seen is not None else None
        if key is not None and key in seen:
            shared = seen[key]
        else:
            shared = self.task.evaluate(self.model, self.split.test, bs, self.device)
            if key is not None:
                seen[key] = shared
        local = self.task.evaluate(self.model, self.split.local_eval[agent], bs, self.device)
        out = {"eval_loss": shared["loss"], "eval_accuracy": shared["accuracy"], "eval_f1": shared["f1"]}
        if local:
            out.update(local_loss=local["loss"], local_accuracy=local["accuracy"])
        return out

    # ----------------------------------------------------------------------------------------- the loop
    def run(self) -> RunResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            desc = f"{self.algorithm.name} x{cfg.agents}"
            bar = tqdm(total=cfg.rounds, initial=self.start_round, desc=desc, unit="round", dynamic_ncols=True)
        last_acc = float("nan")
        try:
            for t in range(self.start_round, cfg.rounds):
                rows = self.run_round(t)
                self.metrics += rows
                evaluated = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
                if evaluated:
                    last_acc = float(np.mean(evaluated))
                if self.run_dir:
                    try:
                        if self.writes:
                            write_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), self.metrics)
                    except OSError as exc:
                        raise DecafError(
                            f"could not write {os.path.join(self.run_dir, 'metrics.jsonl')!r} ({exc.strerror or exc}); "
                            "round "
                            f"{t} stays resumable: free space and continue with `decaf run --resume {self.run_dir}`."
                        ) from None
                    self.save_checkpoint(t + 1, self.elapsed_before + time.perf_counter() - t_start)
                if bar is not None:
                    live = [r["train_loss"] for r in rows if r["train_loss"] is not None]
                    loss = f"{np.mean(live):.3f}" if live else "-"
                    bar.set_postfix(loss=loss, acc="-" if np.isnan(last_acc) else f"{last_acc:.3f}")
                    bar.update(1)
        finally:  # a failed round must not leave a half-drawn bar over its error message
            if bar is not None:
                bar.close()
        summary = self.summarize(self.elapsed_before + time.perf_counter() - t_start)
        for warning in summary["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        self.gather_states()
        if self.run_dir and self.writes:
            self.write_results(summary)
        return RunResult(self.run_dir, summary, self.metrics)

    def write_results(self, summary: dict) -> None:
        """Final adapters, then the summary (its presence marks the run finished), then the report."""
        adapters = os.path.join(self.run_dir, "adapters.safetensors")
        tensors = self.states.state_dict()
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise DecafError(
                f"the final adapters hold NaN or infinite values ({bad[0]}); the run diverged, lower optim.lr."
            )
        meta = {"format": "decaf-lora agents x factors", "run_id": self.identity["run_id"]}
        save_tensors(adapters, tensors, {**meta, "tensors_sha256": checkpoint.tensors_digest(tensors)})
        write_json(os.path.join(self.run_dir, "summary.json"), summary)
        from ..report import write_report

        write_report(self.run_dir)

    def divergence_warnings(self) -> list[str]:
        """A blown-up loss, judged against the untrained model's own loss (the first step of round 1): any round whose
        mean training loss is ten times that, even if training later wandered back to chance level."""
        start = [
            m["train_loss_start"] for m in self.metrics if m["round"] == 1 and m.get("train_loss_start") is not None
        ]
        if not start:
            return []
        reference = max(float(np.mean(start)), 1e-12)
        rounds = sorted({m["round"] for m in self.metrics})
        means = {
            t: [m["train_loss"] for m in self.metrics if m["round"] == t and m["train_loss"] is not None]
            for t in rounds
        }
        worst = max(((float(np.mean(v)), t) for t, v in means.items() if v), default=(0.0, 0))
        if worst[0] <= 10 * reference:
            return []
        return [
            f"the training loss blew up: {worst[0]:.4g} in round {worst[1]} against {reference:.4g} for the untrained "
            f"model; lower optim.lr (now {self.cfg.optim.lr})."
        ]

    def summarize(self, wall: float) -> dict:
        """The run's headline numbers, from the final round's rows; refuses non-finite numbers, warns on blow-up."""
        cfg = self.cfg
        last = [m for m in self.metrics if m["round"] == cfg.rounds]
        if len(last) != cfg.agents:
            raise DecafError(
                f"the final round's metrics are incomplete ({len(last)} of {cfg.agents} agents); no summary can be "
                "computed from them."
            )
        for key in ("eval_accuracy", "eval_f1", "consensus_distance"):
            bad = [m["agent"] for m in last if not _finite(m.get(key))]
            if bad:
                raise DecafError(
                    f"the final round's {key} is missing or not finite for agents {bad[:8]}; the run diverged (or an "
                    f"agent never evaluated), so no summary is written: lower optim.lr (now {cfg.optim.lr})."
                )
        acc = np.array([m["eval_accuracy"] for m in last], dtype=float)
        warnings = self.divergence_warnings()
        test_hist = np.bincount(self.task.labels[self.split.test])
        local = [m.get("local_accuracy") for m in last]
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
            "ranks": cfg.agent_ranks(),
            "metric": self.task.metric,
            "final_accuracy": {"mean": float(acc.mean()), "min": float(acc.min()), "max": float(acc.max())},
            "final_f1_mean": float(np.mean([m["eval_f1"] for m in last])),
            "final_local_accuracy_mean": float(np.mean(local)) if all(v is not None for v in local) else None,
            "final_consensus_distance": float(np.mean([m["consensus_distance"] for m in last])),
            "majority_rate": float(test_hist.max() / test_hist.sum()),
            "bytes_sent_per_agent": float(
                np.mean([sum(m["bytes_sent"] for m in self.metrics if m["agent"] == a) for a in range(cfg.agents)])
            ),
            "wall_seconds": wall,
            "adapter_bytes": self.states.adapter_bytes(),
            "warnings": warnings,
        }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@torch.no_grad()
def mix_agents(
    algo,
    st: AgentStates,
    algo_state: list[dict[str, torch.Tensor]],
    agents: list[int],
    slots: list[int],
    t: int,
    W: np.ndarray,
    received: dict[int, list[torch.Tensor]],
    spec: PayloadSpec,
    *,
    start=None,
    activations=None,
) -> dict[str, dict[int, float]]:
    """Mix ``agents`` (global ids, held in rows ``slots`` of the stacked states ``st`` and of ``algo_state``), layer
    by layer, with their own factors and the payloads they received; returns the declared statistics per agent.

    The stacked inputs are the own agents (their true current state) and every received sender (the decoded
    payload, exactly what crossed the wire), ordered by agent id, so every engine sums in the same order. A part the
    sender did not send is NaN in its copy. A copy that carries every factor part and equals the sender's own state
    byte for byte (a healthy own neighbour) shares that agent's column instead: the same values, one input fewer, and
    rows that weigh the same agents alike (a server plan) give bitwise-identical results. Row i puts ``W[i, j]`` on
    sender j's column and ``W[i, i]`` on agent i's own. Both engines and the one-agent API
    (:class:`decaf_lora.gossip.Gossip`) mix through here.
    """
    dev = st.A[0].device
    slot_of = dict(zip(agents, slots))
    complete = {"A", "B"} <= spec.parts and (st.E is None or "E" in spec.parts)

    def same_as_state(j: int) -> bool:
        return all(torch.equal(a.to(b.device), b) for a, b in zip(received[j], spec.rows(st, slot_of[j])))

    shared = {j for j in received if j in slot_of and complete and same_as_state(j)}
    copies = sorted(j for j in received if j not in shared)
    columns = sorted([(a, 0) for a in agents] + [(j, 1) for j in copies])
    own_col = {a: k for k, (a, kind) in enumerate(columns) if kind == 0}
    copy_col = {j: k for k, (j, kind) in enumerate(columns) if kind == 1}
    rows_np = np.zeros((len(agents), len(columns)))
    for ii, i in enumerate(agents):
        for j in np.nonzero(W[i])[0]:
            j = int(j)
            if j != i and j not in received:  # its own state is not what it sent: mixing it would fake a delivery
                raise DecafError(
                    f"algorithm {algo.name!r} weighs agent {j} in agent {i}'s row of round {t + 1}, but agent {j} "
                    f"sent nothing (sends() gave {sorted(spec.parts) or 'no parts'}); plan() must weigh only agents "
                    "that send, e.g. the identity in a round without exchange."
                )
            rows_np[ii, own_col[i] if j == i else copy_col.get(j, own_col.get(j))] = W[i, j]
    rows = torch.from_numpy(rows_np).to(dev)
    self_index = torch.tensor([own_col[i] for i in agents], device=dev)
    slot_t, slot_cpu = torch.tensor(slots, device=dev), torch.tensor(slots)
    agents_t, inputs = torch.tensor(agents, device=dev), torch.tensor([a for a, _ in columns], device=dev)
    index = {(e.part, e.where): k for k, e in enumerate(spec.entries)}

    def stacked(part: str, where, own_rows: torch.Tensor) -> torch.Tensor:
        k = index.get((part, where))
        by_agent = dict(zip(agents, own_rows))
        out = []
        for a, kind in columns:
            if kind == 0:
                out.append(by_agent[a])
            elif k is None:
                out.append(torch.full_like(own_rows[0], float("nan")))
            else:
                out.append(received[a][k].to(dev).to(own_rows.dtype))
        return torch.stack(out)

    for l in range(len(st.layers)):  # a zero weight times NaN is NaN: one diverged agent would poison every row
        for factor in (st.A[l][slot_t], st.B[l][slot_t]):
            bad = ~torch.isfinite(factor).flatten(1).all(1)
            if bool(bad.any()):
                raise DecafError(
                    f"agent {agents[int(bad.nonzero()[0])]}'s own adapter holds NaN or infinite values before the mix "
                    f"of round {t + 1}; its training diverged: lower the learning rate (optim.lr of a decaf run, or "
                    "your own optimizer's)."
                )
    totals: dict[str, torch.Tensor] = {}
    for l, layer in enumerate(st.layers):
        ctx = LayerContext(
            layer=l,
            name=layer.name,
            scale=layer.scale,
            agents=agents_t,
            inputs=inputs,
            start_A=start["A"][l] if start else None,
            start_B=start["B"][l] if start else None,
            activations=activations[l] if activations is not None else None,
            E=stacked("E", l, st.E[l][slot_t]) if st.E is not None else None,
            state={k: v[slot_t] for k, v in algo_state[l].items()},
        )
        own_ranks = st.ranks[l][slot_cpu]
        # ranks reach the method whenever an output agent's differs from the width (set by the config, or pruned)
        ranks = own_ranks.to(dev) if bool((own_ranks != st.A[l].shape[1]).any()) else None
        A_in, B_in = stacked("A", l, st.A[l][slot_t]), stacked("B", l, st.B[l][slot_t])
        out = algo.mix(A_in, B_in, rows, round_=t, self_index=self_index, ranks=ranks, context=ctx)
        if out.ranks is not None:
            st.ranks[l][slot_cpu] = out.ranks.to(st.ranks[l].dtype).cpu()
        st.A[l][slot_t] = out.A.to(st.A[l].dtype)
        st.B[l][slot_t] = out.B.to(st.B[l].dtype)
        if ranks is not None or out.ranks is not None:
            st.B[l][slot_t], st.A[l][slot_t] = mask_ranks(st.B[l][slot_t], st.A[l][slot_t], st.ranks[l][slot_cpu])
        if out.E is not None:
            st.E[l][slot_t] = out.E.to(st.E[l].dtype)
        for k, v in (out.state or {}).items():
            algo_state[l][k][slot_t] = v.to(algo_state[l][k].dtype).to(algo_state[l][k].device)
        reduce_stats(totals, out.stats, algo.stats, algo.name)
    if "head" in spec.parts:
        for name, h in st.H.items():
            h[slot_t] = torch.einsum("ij,j...->i...", rows.to(h.dtype), stacked("head", name, h[slot_t]))
    for key, rule in algo.stats.items():
        if key in totals and rule == "rss":
            totals[key] = totals[key].sqrt()
    return {k: dict(zip(agents, v.tolist())) for k, v in totals.items()}
