"""Moving bytes between ``torch.distributed`` processes: point-to-point payloads with a deadline, gathers of bytes
and JSON, and the store handshake that lets a round go on without a late peer.

Nothing here knows about agents' factors or algorithms: payloads arrive as flat ``uint8`` buffers with a header of
byte counts (see :mod:`decaf_lora.payload`), and nothing from a peer is ever unpickled (metrics travel as JSON
bytes). Collective tensors live on the process's device, so the same code runs on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Send:
    tag: int  # the sending agent: one message per (agent, destination process)
    dst: int
    flat: torch.Tensor  # uint8
    counts: list[int]


@dataclass(frozen=True)
class Recv:
    tag: int
    src: int
    n_parts: int  # how many tensors the sender's payload should hold (the header's length)


class Transport:
    """One process's end: its store (for the deadline handshake), rank, world size and device."""

    def __init__(self, store, rank: int, world: int, device: torch.device, timeout: float):
        self.store, self.rank, self.world, self.device, self.timeout = store, rank, world, device, timeout

    # ------------------------------------------------------------------------------------------- point to point
    def late_peers(self, round_: int, peers: set[int]) -> set[int]:
        """The peer processes that did not reach this round's exchange within ``timeout`` seconds.

        Both ends of a link must agree, or one would send into a receive that was never posted. So each pair of
        processes settles one store key atomically (``compare_set``): the first to arrive writes ``wait:RANK``; the
        second turns it into ``go``; a process still waiting at its deadline turns its own ``wait`` into ``skip``.
        Whoever arrives later reads the settled value, so both ends always see the same answer. A late process
        then mixes without the peers that gave up on it, exactly as they mix without it.
        """
        store, me = self.store, f"wait:{self.rank}"
        keys = {q: f"r{round_}/{min(self.rank, q)}-{max(self.rank, q)}" for q in peers}
        state = {}
        for q, key in keys.items():
            value = store.compare_set(key, "", me).decode()
            if value == f"wait:{q}":  # q is already here, waiting for us
                value = store.compare_set(key, value, "go").decode()
            state[q] = value
        deadline = time.monotonic() + self.timeout
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

    def exchange(self, sends: list[Send], recvs: list[Recv]) -> dict[int, tuple[torch.Tensor, list[int]]]:
        """Batched isend/irecv in two phases: headers (byte counts), then the bytes they announce.

        The header phase means a payload of a wrong size can never desynchronize the stream: the receiver sizes its
        buffer from what the sender announced, and the payload's own checks then refuse it. Returns, per received
        tag, the bytes and the announced counts (an empty list when the header itself was malformed).
        """
        dist = _dist()
        ops, headers = [], {}
        for s in sends:
            header = torch.tensor([len(s.counts), *s.counts], dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.isend, header, s.dst, tag=s.tag))
        for r in recvs:
            headers[r.tag] = torch.zeros(1 + r.n_parts, dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.irecv, headers[r.tag], r.src, tag=r.tag))
        _wait(dist.batch_isend_irecv(ops) if ops else [])
        ops, data, counts = [], {}, {}
        for s in sends:
            ops.append(dist.P2POp(dist.isend, s.flat.to(self.device).contiguous(), s.dst, tag=s.tag))
        for r in recvs:
            h = headers[r.tag].cpu()
            announced = h[1:].tolist()
            counts[r.tag] = announced if int(h[0]) == r.n_parts and min(announced, default=0) >= 0 else []
            size = sum(announced) if counts[r.tag] else max(0, int(h[1:].clamp(min=0).sum()))
            data[r.tag] = torch.zeros(size, dtype=torch.uint8, device=self.device)
            ops.append(dist.P2POp(dist.irecv, data[r.tag], r.src, tag=r.tag))
        _wait(dist.batch_isend_irecv(ops) if ops else [])
        return {tag: (data[tag].cpu(), counts[tag]) for tag in data}

    # ------------------------------------------------------------------------------------------- collectives
    def all_gather_bytes(self, blob: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``uint8`` buffer (sizes may differ), in rank order."""
        dist = _dist()
        size = torch.tensor([blob.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        width = int(max(int(s) for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8, device=self.device)
        padded[: blob.numel()] = blob.to(self.device)
        chunks = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(chunks, padded)
        return [c[: int(s)].cpu() for c, s in zip(chunks, sizes)]

    def gather_json(self, obj) -> list:
        """Every process's JSON-able object, in rank order (JSON bytes: nothing from a peer is unpickled)."""
        blob = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
        return [json.loads(bytes(b.tolist()).decode("utf-8")) for b in self.all_gather_bytes(blob)]

    def broadcast_json(self, obj, src: int = 0):
        """``src``'s JSON-able object on every process."""
        return self.gather_json(obj if self.rank == src else None)[src]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist = _dist()
        out = t.to(self.device).contiguous()
        dist.all_reduce(out)
        return out.to(t.device)

    def barrier(self) -> None:
        _dist().barrier()


def _wait(requests) -> None:
    for req in requests:
        req.wait()


def pack_blob(header: dict, flat: torch.Tensor) -> torch.Tensor:
    """A JSON header and raw bytes in one buffer: 8 bytes of header length, the header, the bytes."""
    head = json.dumps(header).encode("utf-8")
    size = torch.tensor([len(head)], dtype=torch.int64).view(torch.uint8)
    return torch.cat([size, torch.tensor(list(head), dtype=torch.uint8), flat.cpu()])


def unpack_blob(blob: torch.Tensor) -> tuple[dict, torch.Tensor]:
    n = int(blob[:8].clone().view(torch.int64))
    return json.loads(bytes(blob[8 : 8 + n].tolist()).decode("utf-8")), blob[8 + n :]
