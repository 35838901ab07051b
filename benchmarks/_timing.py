"""Side-by-side timing for a shared, noisy machine: contenders run interleaved, medians compared as ratios."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], reps: int, only_once: tuple[str, ...] = ()
) -> dict[str, float]:
    """Median seconds per contender; each round runs every contender once, so load spikes hit all of them alike.

    Contenders named in ``only_once`` (a dense SVD taking many seconds) run in the first round only.
    """
    for name, fn in contenders.items():  # warm-up: allocator, LAPACK workspace, lazy imports
        if name not in only_once:
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps):
        for name, fn in contenders.items():
            if name in only_once and rep > 0:
                continue
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def write_json_atomically(path: str, data: dict) -> None:
    """Write to a temporary file beside ``path`` and rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
