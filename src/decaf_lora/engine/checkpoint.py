"""Exact checkpoints after every round, that a resume can trust.

A round's checkpoint is one or more *shards* under ``checkpoints/``: ``round-00003.rank-0-of-2.safetensors`` holds
the state of the agents process 0 owns after round 3 (the simulator writes one shard with every agent). What a
shard holds is collected from the engine's parts through their state dicts, agent by agent: the adapter (factors,
heads, ranks, base corrections), AdamW's moments, the batch order and its generator, and the algorithm's per-agent
state. Keys are prefixed by the agent, so any set of shards that covers every agent restores the run, whichever
process count or engine wrote them: placement never changes the numbers. No RNG state is needed: every random draw
(dropout, batch order, faults, activation samples) is a function of (seed, agent, round).

Trust: the metadata records SHA-256 digests of the shard's tensors, of the run files it depends on
(``config.yaml``, ``topology.json``, ``partition.json``) and of the metrics rows up to its round, plus the run's
identity. :func:`latest_complete` verifies all of it and returns the newest round whose shards are complete and
intact; a damaged newest checkpoint falls back to the previous one, loudly. Rotation never opens a window without
a complete checkpoint: a shard is written to a temporary file and renamed into place, and only then are the shards
of rounds older than the previous one deleted (by the process that wrote them, and only files of this naming
scheme). A crash therefore loses at most the round in progress; a full disk is one sentence, and the last complete
round stays resumable. Tensors travel in the safetensors body and the rest in its JSON metadata: nothing is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import DecafError
from ..rundir import file_digest, save_tensors

DIR = "checkpoints"
FORMAT = 2
KEEP_ROUNDS = 2  # the newest and the one before: distributed processes may be one round apart when one dies
_NAME = re.compile(r"^round-(\d{5,})\.rank-(\d+)-of-(\d+)\.safetensors$")
#: Run files a checkpoint depends on; their digests are recorded and checked on resume.
RUN_FILES = ("config.yaml", "topology.json", "partition.json")


def shard_name(round_: int, rank: int, world: int) -> str:
    return f"round-{round_:05d}.rank-{rank}-of-{world}.safetensors"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metrics_digest(rows: list[dict], running=None):
    """Digest of metrics rows as they read back from ``metrics.jsonl`` (JSON round-trips floats exactly). Pass the
    ``running`` hash of the rows before these to extend it (a round adds its rows, not the whole history again);
    returns ``(hexdigest, hash)``."""
    h = running.copy() if running is not None else hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest(), h


@dataclass
class Shard:
    path: str
    round: int
    rank: int
    world: int
    meta: dict = field(default_factory=dict)

    @property
    def agents(self) -> list[int]:
        return [int(a) for a in self.meta.get("agents", [])]


def save_shard(
    run_dir: str, round_: int, rank: int, world: int, agents: dict[int, tuple[dict, dict]], shared: dict
) -> str:
    """Write one process's shard for ``round_`` atomically, then drop its own shards older than the previous round.

    ``agents``: agent -> (tensors, small JSON-able state); ``shared``: metadata common to the round (run identity,
    digests of run files and metrics, elapsed time).
    """
    tensors, per_agent = {}, {}
    for a, (ts, meta) in agents.items():
        tensors.update({f"agent/{a}/{k}": v.detach().cpu().contiguous() for k, v in ts.items()})
        per_agent[str(a)] = meta
    meta = {**shared, "format": FORMAT, "round": round_, "rank": rank, "world": world, "agents": sorted(agents)}
    meta["per_agent"] = per_agent
    meta["tensors_sha256"] = tensors_digest(tensors)
    folder = os.path.join(run_dir, DIR)
    path = os.path.join(folder, shard_name(round_, rank, world))
    try:
        os.makedirs(folder, exist_ok=True)
        save_tensors(path, tensors, {"decaf_checkpoint": json.dumps(meta)})
    except OSError as exc:
        raise DecafError(
            f"could not write checkpoint {path!r} ({exc.strerror or exc}); the run stopped after round {round_ - 1}, "
            f"which stays resumable: free space and continue with `decaf run --resume {run_dir}`."
        ) from None
    for name in os.listdir(folder):  # rotation: this process's own older shards; process 0 also those of another
        m = _NAME.match(name)  # process count (a run resumed on fewer or more processes), which nobody else owns
        mine = int(m.group(2)) == rank and int(m.group(3)) == world if m else False
        earlier_world = rank == 0 and int(m.group(3)) != world if m else False
        if m and (mine or earlier_world) and int(m.group(1)) <= round_ - KEEP_ROUNDS:
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
    return path


def read_meta(path: str) -> dict | None:
    """A shard's metadata, or None if the file cannot be read as a checkpoint (truncated, foreign, damaged)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return json.loads((fh.metadata() or {})["decaf_checkpoint"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a usable checkpoint
        return None


def list_shards(run_dir: str) -> list[Shard]:
    folder = os.path.join(run_dir, DIR)
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        m = _NAME.match(name)
        if m:
            out.append(Shard(os.path.join(folder, name), int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return out


def load_shard(shard: Shard) -> dict[str, torch.Tensor]:
    """The shard's tensors after checking them against the digest they were written with."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(shard.path)
    except Exception as exc:  # noqa: BLE001
        raise DecafError(f"checkpoint {shard.path!r} cannot be read ({type(exc).__name__}).") from None
    if tensors_digest(tensors) != shard.meta.get("tensors_sha256"):
        raise DecafError(
            f"checkpoint {shard.path!r} is damaged: its tensors do not match the digest it was written with."
        )
    return tensors


@dataclass
class Resumable:
    """The newest complete round: which shard holds each agent, and what was skipped on the way (and why)."""

    round: int
    shards: list[Shard]
    meta: dict
    tensors: dict[str, dict[str, torch.Tensor]]  # shard path -> its verified tensors
    skipped: list[str] = field(default_factory=list)

    def agent_source(self) -> dict[int, Shard]:
        return {a: s for s in self.shards for a in s.agents}


def latest_complete(run_dir: str, n_agents: int, check_round) -> Resumable | None:
    """The newest round whose shards cover every agent, read and verify; None if no round does.

    ``check_round(meta)`` verifies the round against the run (identity, run files, metrics) and raises a
    :class:`DecafError` naming the file that does not match; a round that fails it is not used. Older intact
    rounds are used in place of damaged newer ones, and ``skipped`` says which files were passed over.
    """
    shards = list_shards(run_dir)
    skipped: list[str] = []
    problems: list[DecafError] = []
    for r in sorted({s.round for s in shards}, reverse=True):
        readable: list[Shard] = []
        for s in (s for s in shards if s.round == r):
            s.meta = read_meta(s.path) or {}
            if s.meta.get("format") != FORMAT or s.meta.get("round") != r:
                problem = DecafError(
                    f"checkpoint {s.path!r} cannot be read (truncated, damaged, or written by another version) and no "
                    f"older intact checkpoint exists; delete {os.path.join(run_dir, DIR)!r} to start the run over."
                )
                problems.append(problem)
                skipped.append(f"{s.path} (unreadable)")
                continue
            readable.append(s)
        # one process count's shards at a time: a leftover shard of a run resumed on fewer or more processes (its
        # rotation pending) must not stand in for, and so hide, the complete set the run wrote last
        for world in sorted(
            {s.world for s in readable}, key=lambda w: -max(_mtime(s) for s in readable if s.world == w)
        ):
            chosen: dict[int, Shard] = {}
            for s in (s for s in readable if s.world == world):
                for a in s.agents:
                    chosen.setdefault(a, s)
            if set(chosen) != set(range(n_agents)):
                missing = sorted(set(range(n_agents)) - set(chosen))
                skipped.append(f"round {r} of {world} process(es) (no intact shard holds agents {missing[:8]})")
                continue
            used = sorted({s.path: s for s in chosen.values()}.values(), key=lambda s: s.rank)
            try:
                loaded = {}
                for s in used:
                    loaded[s.path] = load_shard(s)
                    check_round(s.meta)
            except DecafError as exc:
                problems.append(exc)
                skipped.append(str(exc))
                continue
            return Resumable(r, used, used[0].meta, loaded, skipped)
    if problems:
        raise problems[0]  # checkpoints exist but none can be trusted: say why the newest one cannot
    return None


def _mtime(shard: Shard) -> float:
    try:
        return os.path.getmtime(shard.path)
    except OSError:
        return 0.0


def verify_run_files(run_dir: str, meta: dict) -> None:
    """Every run file the checkpoint recorded still has the digest it had when the round finished."""
    for name, digest in meta.get("files", {}).items():
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            raise DecafError(f"{path!r} is missing; it was part of the run when round {meta['round']} finished.")
        if file_digest(path) != digest:
            raise DecafError(
                f"{path!r} was changed after round {meta['round']} finished (its digest differs from the "
                "checkpoint's); restore it, or start a new run."
            )


def verified_history(run_dir: str, identity: dict, n_agents: int) -> tuple[Resumable | None, list[dict]]:
    """The newest complete round whose checkpoint, run files and metrics all check out, and the metrics rows up to it
    (``None, []`` when no round finished). What a resume continues from, and what a finished run is judged by."""
    from ..rundir import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    has_metrics = os.path.exists(path)
    rows = read_metrics(run_dir) if has_metrics else []

    def check_round(meta: dict) -> None:
        if meta.get("run_id") != identity["run_id"]:
            raise DecafError(f"the checkpoints in {run_dir!r} belong to another run (run id differs); start a new run.")
        verify_run_files(run_dir, meta)
        if not has_metrics:
            raise DecafError(f"{path!r} is missing but round {meta['round']} finished; restore it, or start a new run.")
        done = [r for r in rows if r["round"] <= meta["round"]]
        if metrics_digest(done)[0] != meta.get("metrics_sha256"):
            raise DecafError(
                f"{path!r} does not hold the rows of rounds 1..{meta['round']} the run wrote (edited, emptied or "
                "truncated); restore it, or start a new run."
            )

    found = latest_complete(run_dir, n_agents, check_round)
    return found, [r for r in rows if found is not None and r["round"] <= found.round]
