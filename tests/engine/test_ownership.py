"""A restarted torchrun job continues only a run directory it can prove is its own; a custom task is compared from
Python exactly like a built-in one."""

import os

import pytest
from conftest import cfg_for, digits_task

import decaf_lora
from decaf_lora.config import dump_config, load_config
from decaf_lora.engine.distributed import choose_run_dir
from decaf_lora.rundir import write_identity


def test_a_fresh_job_gets_a_directory_named_after_its_run_id(tmp_path):
    cfg = load_config(cfg_for(tmp_path))
    got = choose_run_dir(cfg, "decaf", None, False, {"TORCHELASTIC_RUN_ID": "exp1"})
    assert got == {"path": os.path.join(str(tmp_path), "demo-decaf-s0-exp1"), "resume": False}
    assert os.path.isdir(got["path"])


def test_a_restart_continues_its_own_directory(tmp_path):
    cfg = load_config(cfg_for(tmp_path))
    path = choose_run_dir(cfg, "decaf", None, False, {"TORCHELASTIC_RUN_ID": "exp1"})["path"]
    write_identity(path, dump_config(cfg), torchelastic_run_id="exp1")
    env = {"TORCHELASTIC_RUN_ID": "exp1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert choose_run_dir(cfg, "decaf", None, False, env) == {"path": path, "resume": True}


@pytest.mark.parametrize("change", ["another config", "another run id", "no identity"])
def test_a_restart_never_takes_over_another_experiment(tmp_path, change):
    cfg = load_config(cfg_for(tmp_path))
    path = os.path.join(str(tmp_path), "demo-decaf-s0-exp1")
    os.makedirs(path)
    (tmp_path / "demo-decaf-s0-exp1" / "notes.txt").write_text("someone's")
    if change != "no identity":
        other = load_config(cfg_for(tmp_path, rounds=99)) if change == "another config" else cfg
        write_identity(path, dump_config(other), torchelastic_run_id="exp1" if change != "another run id" else "exp0")
    env = {"TORCHELASTIC_RUN_ID": "exp1", "TORCHELASTIC_RESTART_COUNT": "1"}
    got = choose_run_dir(cfg, "decaf", None, False, env)
    assert "already holds another experiment" in got["error"]


def test_a_file_where_the_run_directory_belongs_is_named_as_such_not_blamed_on_out_dir(tmp_path):
    cfg = load_config(cfg_for(tmp_path))
    (tmp_path / "demo-decaf-s0-exp1").write_text("someone's")
    got = choose_run_dir(cfg, "decaf", None, False, {"TORCHELASTIC_RUN_ID": "exp1"})
    assert "the run directory of torchrun run id 'exp1', is a file; give this job another --rdzv-id" in got["error"]
    assert (tmp_path / "demo-decaf-s0-exp1").read_text() == "someone's"


def test_a_restart_takes_back_the_empty_directory_a_crash_left(tmp_path):
    cfg = load_config(cfg_for(tmp_path))
    path = os.path.join(str(tmp_path), "demo-decaf-s0-exp1")
    os.makedirs(path)  # made, then killed before run.json
    env = {"TORCHELASTIC_RUN_ID": "exp1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert choose_run_dir(cfg, "decaf", None, False, env) == {"path": path, "resume": False}


def test_a_restart_without_a_run_id_refuses_to_guess(tmp_path):
    cfg = load_config(cfg_for(tmp_path))
    os.makedirs(os.path.join(str(tmp_path), "demo-decaf-s0-20260101-000000"))  # what the old code would have taken
    got = choose_run_dir(cfg, "decaf", None, False, {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert "cannot prove which run directory is its own; launch with --rdzv-id NAME" in got["error"]
    assert choose_run_dir(cfg, "decaf", None, False, {"TORCHELASTIC_RUN_ID": "none"})["resume"] is False  # first start


def test_compare_from_python_on_a_custom_task(tmp_path):
    out = decaf_lora.compare(cfg_for(tmp_path, rounds=2), ["decaf", "local"], seeds=2, task=digits_task())
    assert [s["algorithm"] for s in out["summaries"]] == ["decaf", "local", "decaf", "local"]
    assert "| decaf | 2 |" in out["table"] and os.path.exists(os.path.join(out["dir"], "compare.png"))
    assert {s["seed"] for s in out["summaries"]} == {0, 1}
    every = decaf_lora.compare(cfg_for(tmp_path, rounds=1), "all", task=digits_task())
    assert sorted(s["algorithm"] for s in every["summaries"]) == decaf_lora.algorithms.available()
