"""The run directory: every file written atomically (temporary file + rename), so a crash never leaves half a file.

Layout: ``run.json`` (the run's identity: a unique id and the digest of its config, written first),
``config.yaml`` (resolved config), ``topology.json`` (graph, mixing matrix, spectral gap), ``partition.json`` (each
agent's examples and label histogram), ``metrics.jsonl`` (one line per agent per round; strict JSON),
``checkpoints/`` (see :mod:`decaf_lora.engine.checkpoint`), ``summary.json`` (written last: its presence means the
run finished), ``adapters.safetensors`` (every agent's final adapter), ``plots/`` and ``report.md``.

Files are created with the permissions of any file the user creates (the umask applies), never private by
accident; reads of damaged files end in one sentence naming the file, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid

import torch

from .errors import DecafError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only read by setting, which
    races with other threads creating files); elsewhere, set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Ordinary permissions for a new file, as ``open`` would give it (tempfile.mkstemp's are owner-only)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Ordinary permissions for a new directory (tempfile.mkdtemp's are owner-only)."""
    return 0o777 & ~current_umask()


#: Largest run file read back into memory (metrics of very long runs stay far below this).
MAX_READ_BYTES = 1 << 30


def _atomic(path: str, write, mode: str = "w") -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text))


def _finite(x):
    """JSON has no NaN or infinity: such a number is written as null (readers must not mistake it for a value)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str, data) -> None:
    _atomic(path, lambda fh: json.dump(_finite(data), fh, indent=2, default=_jsonable, allow_nan=False))


def write_jsonl(path: str, rows: list[dict]) -> None:
    _atomic(
        path, lambda fh: fh.writelines(json.dumps(_finite(r), default=_jsonable, allow_nan=False) + "\n" for r in rows)
    )


def _jsonable(x):
    if hasattr(x, "tolist"):
        return _finite(x.tolist())
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, never pickle: a file from elsewhere can only ever hold numbers."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    _atomic(path, lambda fh: fh.write(blob), mode="wb")


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one sentence naming the file when it is missing or damaged."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise DecafError(f"{path!r} does not exist; the run did not finish writing it.")
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DecafError(
            f"{path!r} cannot be read as safetensors ({type(exc).__name__}); the file is damaged."
        ) from None


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise DecafError(f"{path!r} does not exist.")
    if os.path.getsize(path) > MAX_READ_BYTES:
        raise DecafError(f"{path!r} is larger than {MAX_READ_BYTES >> 30} GiB; it is not a file this run wrote.")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise DecafError(f"{path!r} is not UTF-8 text; the file is damaged.") from None


def read_json(path: str):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DecafError(f"{path!r} is not valid JSON (line {exc.lineno}); the file is damaged or truncated.") from None


def read_metrics(run_dir: str) -> list[dict]:
    """Every row of ``metrics.jsonl``; a damaged line is one sentence naming the file and the line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DecafError(f"{path!r} line {lineno} is not valid JSON; the file is damaged or truncated.") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int) or not isinstance(row.get("agent"), int):
            raise DecafError(f"{path!r} line {lineno} is not a metrics row (no round and agent); the file is damaged.")
        rows.append(row)
    return rows


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_run_dir(out_dir: str, name: str, algorithm: str, seed: int) -> str:
    """A fresh run directory ``out_dir/name-algorithm-sSEED-TIME[-n]``."""
    return fresh_dir(out_dir, f"{name}-{algorithm}-s{seed}")


def fresh_dir(out_dir: str, stem: str) -> str:
    """A new directory ``out_dir/stem-TIME[-n]``, created atomically: two runs started in the same second get
    different directories, never the same one."""
    make_dir(out_dir, "out_dir")
    base = os.path.join(out_dir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise DecafError(f"cannot create {path!r} ({exc.strerror}); choose a writable out_dir.") from None
    raise DecafError(f"could not create a new directory under {out_dir!r}; remove old ones named {base!r}.")


def make_dir(path: str, field_name: str = "run_dir") -> str:
    """Create ``path`` (and its parents) for a new run, or say in one sentence why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DecafError(f"{field_name}={path!r} is a file, not a directory; give a directory.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DecafError(
            f"{field_name}={path!r} cannot be created ({exc.strerror}); choose a writable directory."
        ) from None
    return path


IDENTITY = "run.json"


def write_identity(run_dir: str, config_text: str, **extra) -> dict:
    """The run's identity, written first: a unique id and the digest of the config it was started with."""
    identity = {
        "format": 1,
        "run_id": uuid.uuid4().hex,
        "config_sha256": hashlib.sha256(config_text.encode("utf-8")).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    write_json(os.path.join(run_dir, IDENTITY), identity)
    return identity


def read_identity(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, IDENTITY)
    if not os.path.exists(path):
        return None
    identity = read_json(path)
    if not isinstance(identity, dict) or "run_id" not in identity or "config_sha256" not in identity:
        raise DecafError(f"{path!r} is not a run identity (no run_id and config_sha256); the file is damaged.")
    return identity


def verified_identity(run_dir: str) -> dict:
    """The run's identity, after checking that ``config.yaml`` is exactly what the run started with: everything that
    reads a run (resume, export) trusts the config only through this."""
    identity = read_identity(run_dir)
    if identity is None:
        raise DecafError(
            f"{run_dir!r} has no run.json, so it cannot be proven to be a run of this decaf-lora (an older version "
            "wrote it, or it is not a run); start a new run."
        )
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config) or file_digest(config) != identity["config_sha256"]:
        raise DecafError(
            f"{config!r} was changed after the run started (its digest differs from run.json's); restore it, or "
            "start a new run."
        )
    return identity


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
