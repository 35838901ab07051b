"""The distributed engine: agents spread over ``torch.distributed`` processes, launched by ``torchrun``.

    torchrun --nproc-per-node 4 -m decaf_lora run cfg.yaml engine=distributed
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id exp1 \\
        --max-restarts 3 -m decaf_lora run cfg.yaml engine=distributed

Backend gloo on CPU, NCCL on GPU (one device per local rank). Agents are split into contiguous blocks over the
processes. Each round a process trains its own agents exactly as the simulator does, then sends each agent's
payload point to point (batched isend/irecv) only to the processes that hold that agent's neighbours this round,
never an all-gather of everything; it mixes its own agents with what it received using the same algorithm code as
the simulator (rectangular mixing rows and ``self_index``). Every received payload is screened (shape, dtype,
finiteness, norm) before it is mixed. FedAvg's server average is an all-reduce.

Results equal the simulator's: the same seeds give each agent the same data order and dropout stream wherever it
runs. Each process checkpoints its state after every round (keeping the previous one too); after a crash,
``torchrun --max-restarts`` starts the job again and every process resumes from the last round all of them
finished. Run directories are named after torchrun's ``--rdzv-id`` so a restart finds its own. On several machines
the run directory must be on a shared file system (each process writes its own checkpoint; process 0 writes the
metrics and reports).

Each process keeps buffers for every agent's adapter (N small adapters) but only trains, evaluates and updates its
own; the buffers of other agents are only written by received payloads.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import time

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..faults import RoundFaults, check_parts, renormalize_without
from ..rundir import new_run_dir, read_metrics
from .checkpoint import load_checkpoint
from .simulation import Simulation


def _dist():
    import torch.distributed as dist

    return dist


class DistributedSimulation(Simulation):
    def __init__(self, cfg: RunConfig, task=None, progress: bool = True, run_dir: str | None = None):
        dist = _dist()
        if not dist.is_available():
            raise ConfigError(["engine=distributed needs a PyTorch build with torch.distributed."])
        if "RANK" not in os.environ and not dist.is_initialized():
            raise ConfigError(
                [
                    "engine=distributed must be launched by torchrun, e.g. `torchrun --nproc-per-node 2 -m decaf_lora run cfg.yaml engine=distributed`."
                ]
            )
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=cfg.faults.collective_timeout)
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            # torchrun's agent store outlives a restart; without a per-attempt prefix the new workers can read the
            # dead attempt's addresses and fail to connect ("Connection refused").
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"decaf-attempt-{attempt}", store)
            dist.init_process_group(
                "nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout
            )
        else:
            store = dist.distributed_c10d._get_default_store()
        self._store = dist.PrefixStore("exchange", store)  # small keys that settle who takes part in each exchange
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world > cfg.agents:
            raise ConfigError(
                [
                    f"engine=distributed runs {self.world} processes but agents={cfg.agents}; use at most one process per agent."
                ]
            )
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            cfg.device = f"cuda:{local}"
        self.blocks = np.array_split(np.arange(cfg.agents), self.world)
        self.owner = np.concatenate([np.full(len(b), r) for r, b in enumerate(self.blocks)])
        super().__init__(cfg, task=task, progress=progress and self.rank == 0, write=False)
        self.checkpoint_file = f"checkpoint.rank{self.rank}.safetensors"
        self.run_dir, resuming = self._agree_on_run_dir(run_dir)
        if resuming:
            self._resume()
        elif self.rank == 0:
            self._write_setup()
        dist.barrier()

    # ---------------------------------------------------------------------------------------------- set-up
    def _broadcast_text(self, text: str) -> str:
        dist = _dist()
        data = (
            torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
            if self.rank == 0
            else torch.zeros(0, dtype=torch.uint8)
        )
        size = torch.tensor([data.numel()], dtype=torch.int64)
        dist.broadcast(size, 0)
        if self.rank != 0:
            data = torch.zeros(int(size), dtype=torch.uint8)
        dist.broadcast(data, 0)
        return bytes(data.tolist()).decode("utf-8")

    def _agree_on_run_dir(self, given: str | None) -> tuple[str, bool]:
        """Process 0 picks the directory: the one given (``decaf run --resume``), or one named after torchrun's
        run id, so an elastic restart finds it again."""
        cfg = self.cfg
        text = ""
        if self.rank == 0:
            run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            prefix = os.path.join(cfg.out_dir, f"{cfg.name}-{self.algorithm.name}-s{cfg.seed}-")
            if given:
                path, exists = given, True
            elif run_id and run_id != "none":
                path = prefix + run_id
                exists = os.path.isdir(path)
                os.makedirs(path, exist_ok=True)
            elif restarted and glob.glob(prefix + "*"):
                path, exists = max(glob.glob(prefix + "*"), key=os.path.getmtime), True
            else:
                path, exists = new_run_dir(cfg.out_dir, cfg.name, self.algorithm.name, cfg.seed), False
            resuming = exists and bool(glob.glob(os.path.join(path, "checkpoint.rank*.safetensors")))
            text = json.dumps([path, resuming])
        path, resuming = json.loads(self._broadcast_text(text))
        return path, resuming

    def _resume(self) -> None:
        """Every process loads the checkpoint of the last round that all of them finished."""
        dist = _dist()
        rounds = {}
        for name in (self.checkpoint_file, self.checkpoint_file.replace(".safetensors", ".prev.safetensors")):
            if os.path.exists(os.path.join(self.run_dir, name)):
                rounds[name] = _rounds_in(os.path.join(self.run_dir, name))
        latest = torch.tensor([max(rounds.values(), default=0)], dtype=torch.int64)
        dist.all_reduce(latest, op=dist.ReduceOp.MIN)
        common = int(latest)
        match = [n for n, r in rounds.items() if r == common]
        if common and not match:
            raise ConfigError(
                [
                    f"the checkpoints in {self.run_dir!r} do not share a finished round; delete them to restart from round 0."
                ]
            )
        if common:
            self.start_round, self._elapsed_before = load_checkpoint(self, match[0])
        if self.rank == 0 and os.path.exists(os.path.join(self.run_dir, "metrics.jsonl")):
            self.metrics = [m for m in read_metrics(self.run_dir) if m["round"] <= common]

    # ---------------------------------------------------------------------------------------------- hooks
    @property
    def own(self) -> list[int]:
        return self.blocks[self.rank].tolist()

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def _flat_payload(self, agent: int, round_: int) -> tuple[torch.Tensor, list[int]]:
        parts = self.payload(agent, round_)
        return torch.cat([p.reshape(-1).float() for p in parts]), [p.numel() for p in parts]

    def _write_received(self, agent: int, parts: list[torch.Tensor], round_: int) -> None:
        st, sends = self.states, self.algorithm.sends(round_)
        it = iter(parts)
        with torch.no_grad():
            for A, B in zip(st.A, st.B):
                for name, stack in (("A", A), ("B", B)):
                    if name in sends:
                        stack[agent].copy_(next(it))
            for h in st.H.values():
                h[agent].copy_(next(it))

    def exchange_and_mix(self, round_: int, W: np.ndarray) -> dict:
        f = self.cfg.faults
        if self.rank == f.slow_rank and (not f.slow_rounds or round_ + 1 in f.slow_rounds):
            time.sleep(f.slow_seconds)  # a test fault: this process reaches the exchange late
        out = self._exchange_and_mix(round_, W)
        self._last_reasons = dict(out["faults"].reasons)
        return out

    def _exchange_and_mix(self, round_: int, W: np.ndarray) -> dict:
        comm = self.algorithm.communication
        if comm == "server":
            return self._server_average(round_, W)
        own = self.own
        off = W - np.diag(np.diag(W))
        faults = RoundFaults()
        sent_bytes = {a: 0 for a in own}
        recv_bytes = {a: 0 for a in own}
        if comm == "gossip":
            self._exchange(round_, off, faults, sent_bytes, recv_bytes)
        diagnostics = self.apply_mixing(round_, renormalize_without(W, faults.left_out()), own)
        return {"diagnostics": diagnostics, "faults": faults, "bytes": sent_bytes, "bytes_received": recv_bytes}

    def _exchange(self, round_: int, off: np.ndarray, faults: RoundFaults, sent: dict, received: dict) -> None:
        """Point-to-point: each own agent's payload to every process holding one of its neighbours this round."""
        dist = _dist()
        own = set(self.own)
        expected = self.expected_payload(round_)
        plan_send = sorted(
            {(int(j), int(self.owner[i])) for j in own for i in np.nonzero(off[:, j])[0] if self.owner[i] != self.rank}
        )
        plan_recv = sorted(
            {(int(j), int(self.owner[j])) for i in own for j in np.nonzero(off[i])[0] if self.owner[j] != self.rank}
        )
        late = self._late_peers(round_, {q for _, q in plan_send} | {q for _, q in plan_recv})
        for j, q in plan_recv:
            if q in late:  # the round goes on without it; its payload would arrive after we mixed
                for i in np.nonzero(off[:, j])[0]:
                    if int(i) in own:
                        faults.timed_out.setdefault(int(i), []).append(j)
        plan_send = [(j, q) for j, q in plan_send if q not in late]
        plan_recv = [(j, q) for j, q in plan_recv if q not in late]
        payloads = {j: self._flat_payload(j, round_) for j in own}  # built once, for the wire and for local peers
        # phase 1: headers (the sizes of each tensor), so a payload of a wrong shape cannot desynchronize the stream
        ops, headers = [], {}
        for j, q in plan_send:
            ops.append(
                dist.P2POp(
                    dist.isend, torch.tensor([len(payloads[j][1]), *payloads[j][1]], dtype=torch.int64), q, tag=j
                )
            )
        for j, q in plan_recv:
            headers[j] = torch.zeros(1 + len(expected), dtype=torch.int64)
            ops.append(dist.P2POp(dist.irecv, headers[j], q, tag=j))
        for req in dist.batch_isend_irecv(ops) if ops else []:
            req.wait()
        # phase 2: the data, sized by the header (a corrupt header that claims a different count is refused)
        ops, data = [], {}
        for j, q in plan_send:
            ops.append(dist.P2POp(dist.isend, payloads[j][0].contiguous(), q, tag=j))
        for j, q in plan_recv:
            h = headers[j]
            counts = h[1:].tolist() if int(h[0]) == len(expected) else []
            data[j] = torch.zeros(sum(counts) if counts else int(h[1:].sum()), dtype=torch.float32)
            ops.append(dist.P2POp(dist.irecv, data[j], q, tag=j))
        for req in dist.batch_isend_irecv(ops) if ops else []:
            req.wait()
        for j in own:  # logical bytes: the real payload tensor, once per neighbour agent served
            flat = payloads[j][0]
            served = [i for i in np.nonzero(off[:, j])[0] if self.owner[i] not in late]
            sent[j] = flat.numel() * flat.element_size() * len(served)
        for j, q in plan_recv:
            reason, parts = _unpack(data[j], headers[j], expected, self.cfg.faults.max_norm)
            receivers = [int(i) for i in np.nonzero(off[:, j])[0] if int(i) in own]
            for i in receivers:
                received[i] += data[j].numel() * data[j].element_size()
            if reason:
                faults.reasons[j] = reason
                for i in receivers:
                    faults.rejected.setdefault(i, []).append(j)
            else:
                self._write_received(j, parts, round_)
        for j in own:  # neighbours on this process: the payload does not cross the network but is screened alike
            local_receivers = [int(i) for i in np.nonzero(off[:, j])[0] if int(i) in own]
            if not local_receivers:
                continue
            flat, counts = payloads[j]
            reason, _ = _unpack(flat, torch.tensor([len(counts), *counts]), expected, self.cfg.faults.max_norm)
            for i in local_receivers:
                received[i] += flat.numel() * flat.element_size()
                if reason:
                    faults.reasons[j] = reason
                    faults.rejected.setdefault(i, []).append(j)
        for d in (faults.rejected, faults.timed_out):
            for i in d:
                d[i] = sorted(d[i])

    def _late_peers(self, round_: int, peers: set[int]) -> set[int]:
        """The peer processes that did not reach this round's exchange within ``faults.timeout`` seconds.

        Both ends of a link must agree, or one would send into a receive that was never posted. So each pair of
        processes settles one store key atomically (``compare_set``): the first to arrive writes ``wait:RANK``; the
        second turns it into ``go``; a process still waiting at its deadline turns its own ``wait`` into ``skip``.
        Whoever arrives later reads the settled value, so both ends always see the same answer. A late process
        then mixes without the peers that gave up on it, exactly as they mix without it.
        """
        store, me = self._store, f"wait:{self.rank}"
        keys = {q: f"r{round_}/{min(self.rank, q)}-{max(self.rank, q)}" for q in peers}
        state = {}
        for q, key in keys.items():
            value = store.compare_set(key, "", me).decode()
            if value == f"wait:{q}":  # q is already here, waiting for us
                value = store.compare_set(key, value, "go").decode()
            state[q] = value
        deadline = time.monotonic() + self.cfg.faults.timeout
        pause = 0.001
        while any(v == me for v in state.values()) and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
            for q in [q for q, v in state.items() if v == me]:
                state[q] = store.get(keys[q]).decode()
        for q in [q for q, v in state.items() if v == me]:
            state[q] = store.compare_set(keys[q], me, "skip").decode()
        for q in peers:  # the keys of two rounds ago are settled and read by both ends: free them
            if self.rank < q and round_ >= 2:
                store.delete_key(f"r{round_ - 2}/{self.rank}-{q}")
        return {q for q, v in state.items() if v != "go"}

    def _server_average(self, round_: int, W: np.ndarray) -> dict:
        """FedAvg as all-reduces: the weighted sum of every present agent's factors, minus the rejected ones.

        Each process screens its own agents' payloads (what a server would do on receipt); a rejected agent is left
        out of everyone's average but its own, exactly as the simulator's renormalized rows do.
        """
        dist = _dist()
        own = self.own
        n = self.cfg.agents
        st = self.states
        present = np.array([W[a, a] < 1 for a in range(n)])
        weights = W[int(np.argmax(present))] * present if present.any() else np.zeros(n)
        faults = RoundFaults()
        expected = self.expected_payload(round_)
        local_bad = torch.zeros(n, dtype=torch.int64)
        for j in own:
            if present[j]:
                flat, counts = self._flat_payload(j, round_)
                reason, _ = _unpack(flat, torch.tensor([len(counts), *counts]), expected, self.cfg.faults.max_norm)
                if reason:
                    faults.reasons[j] = reason
                    local_bad[j] = 1
        dist.all_reduce(local_bad)
        bad = local_bad.numpy() > 0
        w_bad = float(weights[bad].sum())
        for i in own:
            rejected = [int(j) for j in np.nonzero(bad)[0] if j != i] if present[i] else []
            if rejected:
                faults.rejected[i] = rejected
        with torch.no_grad():
            for stack in [*st.A, *st.B, *st.H.values()]:
                w = torch.from_numpy(weights).to(stack.dtype).to(stack.device)
                w_own = w[own].view(-1, *([1] * (stack.ndim - 1)))
                bad_own = torch.from_numpy(bad[own]).to(stack.device).view_as(w_own)
                total = (w_own * stack[own]).sum(0)
                total_bad = torch.where(
                    bad_own, w_own * stack[own], torch.zeros((), dtype=stack.dtype, device=stack.device)
                ).sum(0)
                both = torch.stack([total, total_bad]).contiguous()
                dist.all_reduce(both)
                for k, a in enumerate(own):
                    if not present[a]:
                        continue
                    if bad[a]:  # its own row keeps itself
                        stack[a].copy_((both[0] - both[1] + w[a] * stack[a]) / (1 - (w_bad - float(weights[a]))))
                    else:
                        stack[a].copy_((both[0] - both[1]) / (1 - w_bad))
        self.after_mix(own)
        full = self.payload_bytes(round_)
        sent = {a: (self.sent_bytes(a, round_) if present[a] else 0) for a in own}
        return {
            "diagnostics": {},
            "faults": faults,
            "bytes": sent,
            "bytes_received": {a: full if present[a] else 0 for a in own},
        }

    def consensus(self) -> dict[int, float]:
        """Each own agent's ||s B_i A_i - mean_j s B_j A_j||_F summed over layers; the mean via an all-reduce."""
        dist = _dist()
        st = self.states
        own = torch.tensor(self.own, device=st.A[0].device)
        total = {a: 0.0 for a in self.own}
        for l, layer in enumerate(st.layers):
            prod = layer.scale * (st.B[l][own].float() @ st.A[l][own].float())
            mean = prod.sum(0)
            dist.all_reduce(mean)
            mean /= self.cfg.agents
            for a, v in zip(self.own, torch.linalg.matrix_norm(prod - mean).cpu().tolist()):
                total[a] += v
        return total

    def collect(self, rows: list[dict]) -> list[dict]:
        """All processes' rows, as JSON bytes in tensors: nothing from a peer is ever unpickled.

        A rejection is detected by the receiver; the reason travels along so the sender's row reports it too.
        """
        dist = _dist()
        reasons = {str(j): r for j, r in self._last_reasons.items()}
        payload = {"rows": rows, "reasons": reasons}
        blob = torch.tensor(list(json.dumps(payload).encode("utf-8")), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([blob.numel()], dtype=torch.int64))
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[: blob.numel()] = blob
        chunks = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(chunks, padded)
        out, why = [], {}
        for size, chunk in zip(sizes, chunks):
            part = json.loads(bytes(chunk[: int(size)].tolist()).decode("utf-8"))
            out += part["rows"]
            why.update(part["reasons"])
        for row in out:
            if row.get("payload_rejected") is None and str(row["agent"]) in why:
                row["payload_rejected"] = why[str(row["agent"])]
        return out

    def gather_states(self) -> None:
        """Every agent's final adapter on every process (each contributes its own agents to a sum)."""
        dist = _dist()
        st = self.states
        mask = torch.zeros(self.cfg.agents, dtype=torch.bool)
        mask[self.own] = True
        with torch.no_grad():
            for stack in [*st.A, *st.B, *st.H.values()]:
                m = mask.to(stack.device).view(-1, *([1] * (stack.ndim - 1)))
                part = torch.where(m, stack, torch.zeros((), dtype=stack.dtype, device=stack.device)).contiguous()
                dist.all_reduce(part)
                stack.copy_(part)

    def run(self):
        result = super().run()
        dist = _dist()
        dist.barrier()  # nobody leaves while process 0 still writes the report
        dist.destroy_process_group()
        return result


def _unpack(
    flat: torch.Tensor, header: torch.Tensor, expected, max_norm: float
) -> tuple[str | None, list[torch.Tensor]]:
    """Split a received flat payload by its header's counts and screen it like the simulator does."""
    counts = header[1:].tolist()
    if int(header[0]) != len(counts) or sum(counts) != flat.numel():
        return "a malformed header", []
    pieces = list(torch.split(flat, counts)) if counts else []
    pieces = [p.to(dtype) for p, (_, dtype) in zip(pieces, expected)] + pieces[len(expected) :]
    reason = check_parts(pieces, expected, max_norm)
    if reason:
        return reason, []
    return None, [p.reshape(shape) for p, (shape, _) in zip(pieces, expected)]


def _rounds_in(path: str) -> int:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return int(json.loads(fh.metadata()["state"])["rounds_done"])
    except Exception:
        return 0
