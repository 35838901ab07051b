"""Exact checkpoint and resume of the simulation engine.

After every round one file, ``checkpoint.safetensors``, is replaced atomically. It holds everything that decides
the rest of the run: every agent's adapter, every agent's AdamW state, the torch RNG (dropout), each agent's batch
order, cursor and numpy generator, the wall time so far and the number of finished rounds. Tensors go in the
safetensors body and the rest in its JSON metadata, so nothing is ever unpickled. The mixing schedule needs no
state: each round's matrix is a pure function of (seed, round). Metrics lines of a round that was in progress when
the process died are dropped on resume, so a crash loses at most that round.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import DecafError
from ..rundir import read_metrics, save_tensors

FILE = "checkpoint.safetensors"  # the simulator's; distributed processes write checkpoint.rank{r}.safetensors


def save_checkpoint(sim, rounds_done: int, elapsed: float) -> None:
    tensors: dict[str, torch.Tensor] = {f"agents/{k}": v for k, v in sim.states.state_dict().items()}
    groups = []
    for a, opt in enumerate(sim.optimizers):
        sd = opt.state_dict()
        for idx, st in sd["state"].items():
            for key, value in st.items():
                tensors[f"opt/{a}/{idx}/{key}"] = torch.as_tensor(value)
        groups.append(sd["param_groups"])
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and sim.device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    for a, order in enumerate(sim._orders):
        tensors[f"batch/{a}/order"] = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
    meta = {
        "rounds_done": rounds_done,
        "elapsed": elapsed,
        "cursors": list(map(int, sim._cursor)),
        "numpy_rng": [g.bit_generator.state for g in sim._batch_rng],
        "param_groups": groups,
    }
    path = os.path.join(sim.run_dir, sim.checkpoint_file)
    if os.path.exists(path):  # the previous round's stays beside it: distributed processes may be one round apart
        os.replace(path, path.replace(".safetensors", ".prev.safetensors"))
    save_tensors(path, tensors, {"state": json.dumps(meta)})


def load_checkpoint(sim, name: str | None = None) -> tuple[int, float]:
    """Restore ``sim`` to the end of the last finished round; returns (rounds done, wall seconds so far)."""
    from safetensors import safe_open

    path = os.path.join(sim.run_dir, name or sim.checkpoint_file)
    if not os.path.exists(path):
        return 0, 0.0
    try:
        with safe_open(path, framework="pt") as fh:
            meta = json.loads(fh.metadata()["state"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # a truncated or foreign file: say so, never guess
        raise DecafError(
            f"checkpoint {path!r} cannot be read ({type(exc).__name__}); delete it to restart the run from round 0."
        ) from None
    sim.states.load_state_dict(
        {k[len("agents/") :]: v.to(sim.device) for k, v in tensors.items() if k.startswith("agents/")}
    )
    for a, opt in enumerate(sim.optimizers):
        state: dict[int, dict] = {}
        prefix = f"opt/{a}/"
        for k, v in tensors.items():
            if k.startswith(prefix):
                idx, key = k[len(prefix) :].split("/", 1)
                state.setdefault(int(idx), {})[key] = v if key == "step" else v.to(sim.device)
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][a]})
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for a in range(sim.cfg.agents):
        sim._orders[a] = tensors[f"batch/{a}/order"].numpy()
        sim._batch_rng[a].bit_generator.state = meta["numpy_rng"][a]
    sim._cursor = list(meta["cursors"])
    done = int(meta["rounds_done"])
    sim.metrics = (
        [m for m in read_metrics(sim.run_dir) if m["round"] <= done]
        if os.path.exists(os.path.join(sim.run_dir, "metrics.jsonl"))
        else []
    )
    return done, float(meta["elapsed"])
