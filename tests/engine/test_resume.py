"""Checkpoint every round; a run killed at any point and resumed ends with the numbers of an uninterrupted run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import cfg_for, digits_task

from decaf_lora import algorithms
from decaf_lora.config import ConfigError, load_config
from decaf_lora.engine import checkpoint, make_engine, resume, run
from decaf_lora.errors import DecafError
from decaf_lora.rundir import read_metrics


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def test_a_resume_refuses_data_that_changed_under_the_run(tmp_path, monkeypatch):
    """Same sizes, same labels, one input changed: the config cannot tell, the data digest in run.json does."""
    sim = stopped_in_round_3(cfg_for(tmp_path, rounds=3), monkeypatch)
    for changed in (0, len(sim.task.x) - 1):  # one input of the shared test set; one training input
        other = digits_task()
        assert changed in set(sim.split.test.tolist()) or any(changed in set(a.tolist()) for a in sim.split.train)
        other.x[changed] = other.x[changed] + 1
        with pytest.raises(DecafError, match="the task's data differs from the data .* was started with"):
            resume(sim.run_dir, task=other)
    assert resume(sim.run_dir, task=digits_task()).summary["rounds"] == 3  # the run's own data resumes


def stopped_in_round_3(cfg, monkeypatch):
    """The engine of a run killed during round 3 (its checkpoint of round 2 is complete)."""
    sim = make_engine(load_config(cfg), task=digits_task(), progress=False)
    real = sim.training.train

    def crash(agent, round_):
        if round_ == 2:
            raise KeyboardInterrupt
        return real(agent, round_)

    monkeypatch.setattr(sim.training, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    return sim


def test_a_leftover_shard_of_another_process_count_never_hides_the_complete_round(tmp_path, monkeypatch, capsys):
    """A shard left by a 2-process run (an incomplete set: one of its two shards), and a 0-process name that sorts
    before the real one, are tried apart from the round's complete set, which is used: the resume goes on from round
    2, passing nothing over."""
    run_dir = stopped_in_round_3(cfg_for(tmp_path / "a", rounds=3), monkeypatch).run_dir
    other = stopped_in_round_3(cfg_for(tmp_path / "b", rounds=3), monkeypatch).run_dir
    for rank, world in ((1, 2), (0, 0)):
        stale = os.path.join(run_dir, checkpoint.DIR, checkpoint.shard_name(2, rank, world))
        shutil.copy(os.path.join(other, checkpoint.DIR, checkpoint.shard_name(2, 0, 1)), stale)
        os.utime(stale, (1, 1))
    capsys.readouterr()
    engine = make_engine(
        load_config(os.path.join(run_dir, "config.yaml")),
        task=digits_task(),
        run_dir=run_dir,
        resume=True,
        progress=False,
    )
    assert engine.start_round == 2 and "passed over" not in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_crash_mid_round_then_resume_equals_uninterrupted(tmp_path, monkeypatch, policy):
    # LoRA dropout makes the torch RNG matter; 'keep' makes Adam's moments matter.
    cfg = cfg_for(tmp_path, rounds=5, lora={"rank": 2, "dropout": 0.2}, optim={"lr": 1e-2, "state_after_mix": policy})
    full = run(cfg, task=digits_task(), write=False).metrics

    sim = make_engine(load_config(cfg), task=digits_task(), progress=False)
    real = sim.training.train

    def crash(agent, round_):
        if round_ == 3 and agent == 2:
            raise KeyboardInterrupt  # the process dies in the middle of round 4
        return real(agent, round_)

    monkeypatch.setattr(sim.training, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    assert max(m["round"] for m in read_metrics(sim.run_dir)) == 3
    assert not os.path.exists(os.path.join(sim.run_dir, "summary.json"))

    resumed = resume(sim.run_dir, task=digits_task())
    assert without_timing(resumed.metrics) == without_timing(full)
    assert without_timing(read_metrics(sim.run_dir)) == without_timing(full)
    assert resume(sim.run_dir, task=digits_task()).summary == resumed.summary  # a finished run resumes to itself


def test_resume_with_a_different_config_is_refused(tmp_path):
    res = run(cfg_for(tmp_path, rounds=1), task=digits_task())
    with pytest.raises(
        ConfigError, match=r"cannot resume .* with a different config \(lora.rank: 2 in the run, 3 now\)"
    ):
        resume(res.run_dir, ["lora.rank=3"], task=digits_task())
    resume(res.run_dir, ["lora.rank=2", "device=cpu"], task=digits_task())  # restating the config is fine


def test_unreadable_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, rounds=3)
    sim = make_engine(load_config(cfg), task=digits_task(), progress=False)
    real = sim.training.train
    monkeypatch.setattr(
        sim.training, "train", lambda a, t: (_ for _ in ()).throw(KeyboardInterrupt) if t == 1 else real(a, t)
    )
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    (shard,) = checkpoint.list_shards(sim.run_dir)
    with open(shard.path, "r+b") as fh:
        fh.truncate(100)
    from decaf_lora.errors import DecafError

    with pytest.raises(DecafError, match=r"cannot be read \(truncated, damaged, or written by another version\)"):
        resume(sim.run_dir, task=digits_task())


def checkpoint_rounds(run_dir):
    return max((s.round for s in checkpoint.list_shards(run_dir)), default=0)


def test_sigkill_at_any_point_then_resume_equals_uninterrupted(tiny_text, tmp_path):
    """A real process, killed with SIGKILL mid-run, resumed by the CLI; bounded by timeouts, never hangs."""
    overrides = tiny_text(rounds=6, local_steps=4, **{"lora.dropout": 0.1, "optim.state_after_mix": "keep"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    victim_out = tmp_path / "victim"
    cmd = [sys.executable, "-m", "decaf_lora", "run", "-q", *overrides, f"out_dir={victim_out}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    run_dir = None
    try:
        while time.time() < deadline:
            dirs = [p for p in victim_out.iterdir()] if victim_out.exists() else []
            if dirs and checkpoint_rounds(str(dirs[0])) >= 2:
                run_dir = str(dirs[0])
                break
            time.sleep(0.02)
        assert run_dir is not None and proc.poll() is None, "the run should still be going when it is killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    done = subprocess.run(
        [sys.executable, "-m", "decaf_lora", "run", "-q", "--resume", run_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # the reference runs in the same conditions (a fresh process, same threads): bitwise equality is expected
    subprocess.run(
        [sys.executable, "-m", "decaf_lora", "run", "-q", *overrides, f"out_dir={tmp_path / 'full'}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (full_dir,) = list((tmp_path / "full").iterdir())
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(str(full_dir)))


def test_kills_at_random_moments_always_resume_to_the_uninterrupted_numbers(tiny_text, tmp_path):
    """SIGKILL a real run at random moments (seeded), over and over: during start-up, training, the metrics write,
    the checkpoint rotation. Every time, `decaf run --resume` either continues or, if nothing was written yet, says
    so plainly; the finished run's metrics equal an uninterrupted run's."""
    import random

    overrides = tiny_text(rounds=12, local_steps=2, **{"lora.dropout": 0.1, "optim.state_after_mix": "keep"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "decaf_lora", "run", "-q"]
    t0 = time.monotonic()
    subprocess.run(
        [*base, *overrides, f"out_dir={tmp_path / 'full'}"], env=env, check=True, capture_output=True, timeout=300
    )
    duration = time.monotonic() - t0  # start-up included: kills land anywhere from import to the last write
    (full_dir,) = list((tmp_path / "full").iterdir())
    rng = random.Random(20261123)
    victim = tmp_path / "victim"
    kills, restarted_plainly, finished = 0, 0, False
    for _ in range(12):
        dirs = list(victim.iterdir()) if victim.exists() else []
        cmd = [*base, "--resume", str(dirs[0])] if dirs else [*base, *overrides, f"out_dir={victim}"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(0.1, 0.6) * duration if kills < 5 else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
            continue
        err = proc.stderr.read()
        if proc.returncode == 2 and "holds no config.yaml" in err:  # killed before it wrote anything: start over
            shutil.rmtree(dirs[0])
            restarted_plainly += 1
            continue
        assert proc.returncode == 0, err[-2000:]
        finished = True
        break
    assert finished and kills >= 3, (kills, restarted_plainly)
    (run_dir,) = list(victim.iterdir())
    assert without_timing(read_metrics(str(run_dir))) == without_timing(read_metrics(str(full_dir)))


@pytest.mark.parametrize("algo", algorithms.available())
def test_every_method_resumes_exactly(tmp_path, algo):
    """Crash in round 3 of 3, resume: every method's numbers (and its per-agent state) come back exactly."""
    cfg = cfg_for(tmp_path, algorithm=algo, rounds=3, local_steps=3, eval_every=3, lora={"rank": 2, "dropout": 0.1})
    full = run(cfg, task=digits_task(), write=False).metrics
    engine = make_engine(load_config(cfg), task=digits_task(), progress=False)
    real = engine.training.train

    def crash(agent, round_):
        if round_ == 2 and agent == 1:
            raise KeyboardInterrupt
        return real(agent, round_)

    engine.training.train = crash
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert without_timing(resume(engine.run_dir, task=digits_task()).metrics) == without_timing(full)
