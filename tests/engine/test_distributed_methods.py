"""Every method family under torchrun equals the simulator, and a run resumes across engines and process counts:
placement never changes the numbers. Several runs share one torchrun launch (start-up paid once)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import digits_task, method_config

import decaf_lora
from decaf_lora.engine import checkpoint

pytestmark = pytest.mark.distributed
TIMEOUT = 600
JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_job.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
#: One method per family: alternating (one factor on the wire), aligning (start-of-round factors, activations),
#: correcting, personal (A only; B and head never sent), residual (dense E), heterogeneous ranks with pruning (state).
FAMILIES = ["rolora", "tad-lora", "fedrot-lora", "dimat", "lora-fair", "fedsa-lora", "fedex-lora", "hetlora"]


def torchrun(*args, procs=2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        JOB,
        *map(str, args),
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def metrics_of(out):
    (run_dir,) = [p for p in os.listdir(out) if os.path.isdir(os.path.join(out, p))]
    return [json.loads(line) for line in open(os.path.join(out, run_dir, "metrics.jsonl"))]


def assert_same(dist_rows, sim_rows, stats=()):
    assert len(dist_rows) == len(sim_rows)
    for d, s in zip(dist_rows, sim_rows):
        for k in ("round", "agent", "rank", "eval_accuracy", "neighbors", "bytes_sent", "bytes_received", "rejected"):
            assert d.get(k) == s.get(k), (k, d, s)
        for k in ("train_loss", "train_loss_start", "eval_loss", "consensus_distance", *stats):
            if s.get(k) is not None:
                assert d[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6), k


def test_every_method_family_under_torchrun_equals_the_simulator(tmp_path):
    torchrun("methods", tmp_path / "dist", ",".join(FAMILIES))
    for name in FAMILIES:
        sim = decaf_lora.run(method_config(tmp_path / "sim" / name, name), task=digits_task(head=True), write=False)
        stats = decaf_lora.algorithms.get(name).stats
        assert_same(metrics_of(tmp_path / "dist" / name), sim.metrics, stats)


def test_a_run_stopped_in_the_simulator_resumes_under_torchrun_and_back(tmp_path):
    """Placement never matters: shards hold each agent's state, whoever wrote them."""
    full = decaf_lora.run(method_config(tmp_path / "full", "decaf"), task=digits_task(head=True)).metrics
    # simulator -> torchrun with 2 processes
    engine = decaf_lora.make_engine(
        decaf_lora.load_config(method_config(tmp_path / "a", "decaf")), digits_task(head=True), progress=False
    )
    real = engine.run_round
    engine.run_round = lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t == 2 else real(t)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    torchrun("resume", engine.run_dir)
    assert_same(metrics_of(tmp_path / "a"), full)
    # torchrun with 2 processes -> simulator
    torchrun("stop", tmp_path / "b")
    (run_dir,) = [os.path.join(tmp_path / "b", p) for p in os.listdir(tmp_path / "b")]
    assert {s.world for s in checkpoint.list_shards(run_dir)} == {2}
    decaf_lora.resume(run_dir, task=digits_task(head=True))
    assert_same(metrics_of(tmp_path / "b"), full)
