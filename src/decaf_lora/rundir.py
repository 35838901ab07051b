"""The run directory: every file written atomically (temporary file + rename), so a crash never leaves half a file.

Layout: ``config.yaml`` (resolved config), ``topology.json`` (graph, mixing matrix, spectral gap),
``partition.json`` (each agent's examples and label histogram), ``metrics.jsonl`` (one line per agent per round),
``summary.json`` (written last: its presence means the run finished), ``adapters.safetensors`` (every agent's
final adapter), ``plots/`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from .errors import DecafError


def _atomic(path: str, write, mode: str = "w") -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text))


def write_json(path: str, data) -> None:
    _atomic(path, lambda fh: json.dump(data, fh, indent=2, default=_jsonable))


def write_jsonl(path: str, rows: list[dict]) -> None:
    _atomic(path, lambda fh: fh.writelines(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, never pickle: a file from elsewhere can only ever hold numbers."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    _atomic(path, lambda fh: fh.write(blob), mode="wb")


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def new_run_dir(out_dir: str, name: str, algorithm: str, seed: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{name}-{algorithm}-s{seed}-{stamp}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    os.makedirs(path)
    return path


def check_run_dir(run_dir: str, need: tuple[str, ...] = ("config.yaml", "metrics.jsonl")) -> str:
    """A finished or running run directory, or one clear error."""
    if not os.path.isdir(run_dir):
        raise DecafError(
            f"run directory {run_dir!r} does not exist; pass a directory created by `decaf run` (under runs/)."
        )
    missing = [f for f in need if not os.path.exists(os.path.join(run_dir, f))]
    if missing:
        raise DecafError(f"run directory {run_dir!r} lacks {', '.join(missing)}; it is not a (finished) decaf run.")
    return run_dir
