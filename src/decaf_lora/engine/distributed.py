"""The distributed engine: agents spread over ``torch.distributed`` processes, launched by ``torchrun``.

    torchrun --nproc-per-node 4 -m decaf_lora run cfg.yaml
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id exp1 \\
        --max-restarts 3 -m decaf_lora run cfg.yaml

Backend gloo on CPU, NCCL on GPU (one device per local rank). Agents are split into contiguous blocks over the
processes. Each round a process trains its own agents exactly as the simulator does; then, as the round's plan
says, it sends each agent's payload point to point only to the processes that hold that agent's receivers (a
gossip plan), or gathers every present agent's payload (a server plan); it screens what it received and mixes its
own agents with the same code as the simulator. Results equal the simulator's: the same seeds give each agent the
same data order and dropout stream wherever it runs.

Each process checkpoints its own agents after every round; any set of checkpoint shards covering every agent
restores the run, so a resume may use another number of processes, or the simulator. A restart must prove that
the run directory it continues is its own: it is named after torchrun's ``--rdzv-id`` and its ``run.json`` must
record that id and the same config; a restarted job without a run id refuses to guess. On several machines the
run directory must be on a shared file system (each process writes its own shard; process 0 writes the rest).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time

import numpy as np
import torch

from ..algorithms import MixingPlan
from ..config import ConfigError, RunConfig, dump_config
from ..errors import DecafError
from ..payload import PayloadSpec
from ..rundir import IDENTITY, make_dir, new_run_dir, read_identity
from .build import Run
from .loop import Engine, Exchange
from .screening import RoundFaults, outgoing
from .transport import Recv, Send, Transport, pack_blob, unpack_blob


def _dist():
    import torch.distributed as dist

    return dist


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def launch_world_size() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def init_default_group(backend: str, timeout: datetime.timedelta):
    """Initialize the default process group from torchrun's environment (or reuse one already initialized) and
    return its store, where the exchange's deadline handshake keeps its keys.

    A group made here lives until the process exits: re-creating one through the same store would let a process read
    the previous group's keys and move on while another waits forever, so several runs in one process (``decaf
    compare`` under torchrun) share the group, each with its own exchange keys.
    """
    dist = _dist()
    if not dist.is_initialized():
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent store outlives a restart; without a per-attempt prefix the new workers can read the
        # dead attempt's addresses and fail to connect ("Connection refused").
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"decaf-attempt-{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        import atexit

        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    else:
        store = dist.distributed_c10d._get_default_store()
    return store


def join_process_group(cfg: RunConfig) -> Transport:
    """Join (or reuse) the default process group; the device is the local rank's GPU under NCCL, else the CPU."""
    dist = _dist()
    if not dist.is_available():
        raise ConfigError(["engine=distributed needs a PyTorch build with torch.distributed."])
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=cfg.faults.collective_timeout)
    store = init_default_group("nccl" if use_cuda else "gloo", timeout)
    device = torch.device("cpu")
    if use_cuda:  # the local rank's GPU; the config keeps what the user asked for (device is placement)
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device(f"cuda:{local}")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > cfg.agents:
        raise ConfigError(
            [f"torchrun started {world} processes but agents={cfg.agents}; use at most one process per agent."]
        )
    global _RUNS
    _RUNS += 1  # every process counts its runs alike, so several runs in one group never share handshake keys
    prefixed = dist.PrefixStore(f"exchange-{_RUNS}", store)
    return Transport(prefixed, rank, world, device, cfg.faults.timeout)


_RUNS = 0


def choose_run_dir(cfg: RunConfig, algorithm: str, given: str | None, resume: bool, env) -> dict:
    """Where a torchrun job runs: ``{"path", "resume"}``, or ``{"error"}`` when it cannot prove which directory is its
    own. A fresh job gets a new directory (named after torchrun's run id when it has one); a restarted job must find
    the directory named after its run id holding the same config and that id in its ``run.json``."""
    if given:
        return {"path": given if resume else make_dir(given), "resume": resume}
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    restarted = int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if not run_id or run_id == "none":
        if restarted:
            return {
                "error": "this is a restart of a torchrun job without a run id, so it cannot prove which run directory "
                "is its own; launch with --rdzv-id NAME (or --standalone), or resume explicitly with "
                "`torchrun ... -m decaf_lora run --resume RUN_DIR`."
            }
        return {"path": new_run_dir(cfg.out_dir, cfg.name, algorithm, cfg.seed), "resume": False}
    path = os.path.join(cfg.out_dir, f"{cfg.name}-{algorithm}-s{cfg.seed}-{run_id}")
    if os.path.exists(path) and not os.path.isdir(path):
        return {
            "error": f"{path!r}, the run directory of torchrun run id {run_id!r}, is a file; give this job another "
            "--rdzv-id, or another name=."
        }
    if not os.path.isdir(path):
        make_dir(cfg.out_dir, "out_dir")  # the field the user gave: a failure to create it names that field
        return {"path": make_dir(path, "out_dir"), "resume": False}
    if not os.listdir(path):  # a crash between creating it and writing anything: still this job's, and empty
        return {"path": path, "resume": False}
    identity = read_identity(path)
    digest = hashlib.sha256(dump_config(cfg).encode("utf-8")).hexdigest()
    if identity is None or identity.get("torchelastic_run_id") != run_id or identity["config_sha256"] != digest:
        return {
            "error": f"{path!r} already holds another experiment (a different config or run id); give this job another "
            "--rdzv-id, or another name=."
        }
    return {"path": path, "resume": True}


class DistributedEngine(Engine):
    def __init__(
        self,
        run: Run,
        transport: Transport,
        *,
        run_dir: str | None = None,
        progress: bool = True,
        resume: bool = False,
        write: bool = True,
    ):
        self.transport = transport
        self.rank, self.world = transport.rank, transport.world
        self.blocks = np.array_split(np.arange(run.cfg.agents), self.world)
        self.owner = np.concatenate([np.full(len(b), r) for r, b in enumerate(self.blocks)])
        super().__init__(run, progress=progress and self.rank == 0)
        if not write and not resume:  # everything in memory, as the simulator's write=False
            return
        self.run_dir, resuming = self._agree_on_run_dir(run_dir, resume)
        if not resuming and self.rank == 0:
            self.write_setup()
        transport.barrier()
        # every process writes its own checkpoint shards into run_dir and a resume reads them all: refuse up front,
        # on every process alike, a directory that some process cannot see (out_dir on a node-local disk)
        seen = transport.gather_json(os.path.exists(os.path.join(self.run_dir, IDENTITY)))
        blind = [r for r, ok in enumerate(seen) if not ok]
        if blind:
            raise DecafError(
                f"processes {blind} cannot see {self.run_dir!r} (written by process 0); put out_dir (or run_dir) on a "
                "file system every process shares."
            )
        if resuming:
            self.restore()
        else:
            self.identity = transport.broadcast_json(self.identity)

    # ----------------------------------------------------------------------------------------- set-up
    def _agree_on_run_dir(self, given: str | None, resume: bool) -> tuple[str, bool]:
        """Process 0 picks the directory and every process gets its answer (or the same one-sentence refusal)."""
        decision = None
        if self.rank == 0:
            try:
                decision = self._choose_run_dir(given, resume)
            except DecafError as exc:  # said on every process, not only on the one that hit it
                decision = {"error": str(exc)}
        decision = self.transport.broadcast_json(decision)
        if decision.get("error"):
            raise DecafError(decision["error"])
        return decision["path"], decision["resume"]

    def _choose_run_dir(self, given: str | None, resume: bool) -> dict:
        return choose_run_dir(self.cfg, self.algorithm.name, given, resume, os.environ)

    # ----------------------------------------------------------------------------------------- hooks
    @property
    def own(self) -> list[int]:
        return self.blocks[self.rank].tolist()

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def exchange(self, round_: int, plan: MixingPlan, spec: PayloadSpec) -> Exchange:
        f = self.cfg.faults
        if self.rank == f.slow_rank and (not f.slow_rounds or round_ + 1 in f.slow_rounds):
            time.sleep(f.slow_seconds)  # a test fault: this process reaches the exchange late
        if not spec:
            return Exchange()
        return self._gather(plan, spec) if plan.server else self._point_to_point(round_, plan, spec)

    def _payloads(self, plan: MixingPlan, spec: PayloadSpec) -> dict[int, tuple[torch.Tensor, list[int]]]:
        f = self.cfg.faults
        return {
            j: outgoing(spec, spec.pack(self.states, j), f.poison if j == f.poison_agent else None)
            for j in self.own
            if len(plan.receivers(j))
        }

    def _point_to_point(self, round_: int, plan: MixingPlan, spec: PayloadSpec) -> Exchange:
        """Each own agent's payload to every process holding one of its receivers this round, and back."""
        payloads, max_norm = self._payloads(plan, spec), self.cfg.faults.max_norm
        return point_to_point(self.transport, round_, plan, spec, self.own, self.owner, payloads, max_norm)

    def _gather(self, plan: MixingPlan, spec: PayloadSpec) -> Exchange:
        """A server plan: every present agent's payload to every process (the coordinator's view), screened alike."""
        payloads, max_norm = self._payloads(plan, spec), self.cfg.faults.max_norm
        download = lambda i: spec.wire_nbytes(self.states, i)  # noqa: E731
        return gathered(self.transport, plan, spec, self.own, payloads, max_norm, download)

    def consensus(self) -> dict[int, float]:
        """Each own agent's consensus distance; the network's mean product through an all-reduce."""
        distances = self.states.consensus_distance(self.own, self.transport.all_reduce_sum)
        return dict(zip(self.own, distances.tolist()))

    def collect(self, rows: list[dict], faults: RoundFaults) -> list[dict]:
        return collect_rows(self.transport, rows, faults)

    def gather_states(self) -> None:
        """Every agent's final adapter on every process (each contributes its own agents to a sum)."""
        st = self.states
        mask = torch.zeros(self.cfg.agents, dtype=torch.bool)
        mask[self.own] = True
        with torch.no_grad():
            for stack in [*st.A, *st.B, *st.H.values(), *(st.E or []), *st.ranks]:
                m = mask.to(stack.device).view(-1, *([1] * (stack.ndim - 1)))
                part = torch.where(m, stack, torch.zeros((), dtype=stack.dtype, device=stack.device))
                stack.copy_(self.transport.all_reduce_sum(part))

    def run(self):
        result = super().run()
        self.transport.barrier()  # nobody leaves while process 0 still writes the report
        return result


# --------------------------------------------------------------------------------------------- the exchange itself
# Module-level so that decaf_lora.gossip (one agent per process, the user's own loop) runs the very same exchange,
# screening, byte accounting and fault bookkeeping as the engine. ``own``: the agents this process holds;
# ``owner[j]``: the process holding agent j; ``payloads``: each own sender's (bytes, counts), as ``outgoing`` made them.


def point_to_point(
    transport: Transport,
    round_: int,
    plan: MixingPlan,
    spec: PayloadSpec,
    own_agents: list[int],
    owner: np.ndarray,
    payloads: dict[int, tuple[torch.Tensor, list[int]]],
    max_norm: float,
) -> Exchange:
    """Each own agent's payload to every process holding one of its receivers this round, and back: the deadline
    handshake leaves late processes out (both ends agree), received payloads are screened, bytes are counted."""
    ex, own, W, rank = Exchange(), set(own_agents), plan.W, transport.rank
    plan_send = sorted({(j, int(owner[i])) for j in own for i in plan.receivers(j) if owner[i] != rank})
    plan_recv = sorted({(int(j), int(owner[j])) for i in own for j in np.nonzero(W[i])[0] if owner[j] != rank})
    late = transport.late_peers(round_, {q for _, q in plan_send} | {q for _, q in plan_recv})
    for j, q in plan_recv:
        if q in late:  # the round goes on without it; its payload would arrive after we mixed
            for i in plan.receivers(j):
                if int(i) in own:
                    ex.faults.timed_out.setdefault(int(i), []).append(j)
    sends = [Send(j, q, *payloads[j]) for j, q in plan_send if q not in late]
    recvs = [Recv(j, q, len(spec.entries)) for j, q in plan_recv if q not in late]
    got = transport.exchange(sends, recvs)
    for j, (flat, _) in payloads.items():  # logical bytes: the real payload, once per receiver served
        served = [i for i in plan.receivers(j) if owner[i] not in late]
        ex.sent[j] = flat.numel() * len(served)
    arrived = {j: got[j] for j in got}
    arrived.update({j: payloads[j] for j in own if j in payloads})  # local receivers: screened alike
    for j, (flat, counts) in arrived.items():
        receivers = [int(i) for i in plan.receivers(j) if int(i) in own]
        if not receivers:
            continue
        for i in receivers:
            ex.received_bytes[i] = ex.received_bytes.get(i, 0) + flat.numel()
        ex.take(j, flat, counts, receivers, spec, max_norm)
    ex.faults.sort()
    return ex


def gathered(
    transport: Transport,
    plan: MixingPlan,
    spec: PayloadSpec,
    own_agents: list[int],
    payloads: dict[int, tuple[torch.Tensor, list[int]]],
    max_norm: float,
    download,
) -> Exchange:
    """A server plan: every present agent's payload to every process (the coordinator's view), screened alike.
    ``download(i)``: the bytes of the averaged model agent i receives back (at its own rank)."""
    ex, own = Exchange(), set(own_agents)
    header = {"agents": sorted(payloads), "counts": [payloads[j][1] for j in sorted(payloads)]}
    flat = torch.cat([payloads[j][0] for j in sorted(payloads)]) if payloads else torch.zeros(0, dtype=torch.uint8)
    for blob in transport.all_gather_bytes(pack_blob(header, flat)):
        head, data = unpack_blob(blob)
        start = 0
        for j, counts in zip(head["agents"], head["counts"]):
            size = sum(counts)
            receivers = [int(i) for i in plan.receivers(j) if int(i) in own]
            ex.take(j, data[start : start + size], counts, receivers, spec, max_norm)
            start += size
            if j in own:
                ex.sent[j] = size
    for i in own:
        if np.count_nonzero(plan.W[i]) > (plan.W[i, i] != 0):
            ex.received_bytes[i] = download(i)
    ex.faults.sort()
    return ex


def collect_rows(transport: Transport, rows: list[dict], faults: RoundFaults) -> list[dict]:
    """All processes' rows, as JSON (nothing from a peer is unpickled); a rejection is detected by the receiver,
    so the reason travels along and the sender's row reports it too."""
    out, why = [], {}
    for part in transport.gather_json({"rows": rows, "reasons": {str(j): r for j, r in faults.reasons.items()}}):
        out += part["rows"]
        why.update(part["reasons"])
    for row in out:
        if row.get("payload_rejected") is None and str(row["agent"]) in why:
            row["payload_rejected"] = why[str(row["agent"])]
    return out
