"""Damaged and hostile run directories, files and commands: each ends either in one sentence with exit code 2 that
names the file or field and the fix, or in a resume identical to the uninterrupted run. Never a traceback, never a
summary computed from a state that was not verified, never a deleted file that the command did not create."""

import json
import os
import shutil
import threading

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_text_overrides

from decaf_lora.cli import main
from decaf_lora.config import load_config
from decaf_lora.engine import checkpoint, make_engine
from decaf_lora.rundir import read_metrics

ROUNDS = 4


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tmp_path_factory):
    """A finished run and the same run stopped after round 2 (a crash in round 3), made once for every case."""
    out = tmp_path_factory.mktemp("runs")
    overrides = tiny_text_overrides(tiny_bert_dir, str(out), rounds=ROUNDS, **{"lora.dropout": 0.1})
    finished = make_engine(load_config(None, overrides), progress=False)
    finished.run()
    stopped = make_engine(load_config(None, overrides), progress=False)
    real = stopped.training.train

    def crash(agent, round_):
        if round_ == 2:
            raise KeyboardInterrupt
        return real(agent, round_)

    stopped.training.train = crash
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    return {"finished": finished.run_dir, "stopped": stopped.run_dir, "reference": read_metrics(finished.run_dir)}


def cli(*args, cwd=None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, [str(a) for a in args])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def assert_one_sentence(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), res.output
    for needle in needles:
        assert needle in res.output, res.output


# ------------------------------------------------------------------------------------------------- damage helpers
def edit_text(name, fn):
    def damage(d):
        path = os.path.join(d, name)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(fn(text))

    return damage


def write_bytes(name, data):
    def damage(d):
        with open(os.path.join(d, name), "wb") as fh:
            fh.write(data)

    return damage


def truncate(name, keep):
    def damage(d):
        path = os.path.join(d, name) if not callable(name) else name(d)
        with open(path, "r+b") as fh:
            fh.truncate(keep if keep >= 0 else os.path.getsize(path) + keep)

    return damage


def remove(name):
    return lambda d: os.unlink(os.path.join(d, name))


def newest_shard(d):
    return max(checkpoint.list_shards(d), key=lambda s: s.round).path


def all_shards(fn):
    def damage(d):
        for s in checkpoint.list_shards(d):
            fn(s.path)

    return damage


def flip_a_value(path):
    """Change one stored number without touching the metadata: the digest must notice."""
    from safetensors.torch import load_file, save_file

    from decaf_lora.engine.checkpoint import read_meta

    meta = read_meta(path)
    tensors = load_file(path)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, path, metadata={"decaf_checkpoint": json.dumps(meta)})


def rewrite_shard(fn):
    """A foreign but self-consistent checkpoint: tensors changed by ``fn`` and the digest recomputed to match."""

    def damage(d):
        from safetensors.torch import load_file, save_file

        path = newest_shard(d)
        meta = checkpoint.read_meta(path)
        tensors = fn(load_file(path))
        meta["tensors_sha256"] = checkpoint.tensors_digest(tensors)
        save_file(tensors, path, metadata={"decaf_checkpoint": json.dumps(meta)})
        for s in checkpoint.list_shards(d):  # only the rewritten round is left, so nothing older can rescue it
            if s.path != path:
                os.unlink(s.path)

    return damage


def drop_first_adapter_key(tensors):
    key = next(k for k in tensors if "/adapter/" in k)
    return {k: v for k, v in tensors.items() if k != key}


def reshape_first_adapter_key(tensors):
    key = next(k for k in tensors if k.endswith(".lora_A"))
    return {**tensors, key: torch.zeros(1, 3, 3)}


def from_another_run(runs):
    def damage(d):
        other = runs["finished"]
        shutil.rmtree(os.path.join(d, checkpoint.DIR))
        shutil.copytree(os.path.join(other, checkpoint.DIR), os.path.join(d, checkpoint.DIR))

    return damage


def adapters_with(fn, keep_digest=False):
    def damage(d):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = os.path.join(d, "adapters.safetensors")
        with safe_open(path, framework="pt") as fh:
            meta = dict(fh.metadata())
        tensors = fn(load_file(path))
        if not keep_digest:
            meta["tensors_sha256"] = checkpoint.tensors_digest(tensors)
        save_file(tensors, path, metadata=meta)

    return damage


def nan_in_first(tensors):
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    t = tensors[key].clone()
    t.view(-1)[0] = float("nan")
    return {**tensors, key: t}


def extra_metrics_round(d):
    """A crash between writing round 3's metrics and its checkpoint leaves rows of an unfinished round."""
    rows = read_metrics(d)
    extra = [dict(r, round=3, train_loss=123.0) for r in rows if r["round"] == 2]
    with open(os.path.join(d, "metrics.jsonl"), "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in extra)


# ------------------------------------------------------------------------------------------------- the table
RESUME = ("run", "-q", "--resume", "DIR")
REPORT = ("report", "DIR")
EXPORT = ("export", "DIR", "--agent", "0", "--out", "OUT")

CASES = [
    # (id, which run, damage, command, expectation: "same" for an identical resume, else a phrase of the sentence)
    (
        "config edited",
        "stopped",
        edit_text("config.yaml", lambda t: t.replace("rounds: 4", "rounds: 5")),
        RESUME,
        "config.yaml' was changed after the run started",
    ),
    (
        "config truncated",
        "stopped",
        truncate("config.yaml", 40),
        RESUME,
        "config.yaml' was changed after the run started",
    ),
    (
        "config not utf-8",
        "stopped",
        write_bytes("config.yaml", b"\xff\xfe rounds: 4\n"),
        RESUME,
        "config.yaml' was changed",
    ),
    ("config deleted", "stopped", remove("config.yaml"), RESUME, "holds no config.yaml"),
    ("identity deleted", "stopped", remove("run.json"), RESUME, "has no run.json"),
    ("identity not json", "stopped", write_bytes("run.json", b"{nope"), RESUME, "run.json' is not valid JSON"),
    ("identity wrong shape", "stopped", write_bytes("run.json", b"[1, 2]"), RESUME, "run.json' is not a run identity"),
    ("identity not utf-8", "stopped", write_bytes("run.json", b"\xff\xff"), RESUME, "run.json' is not UTF-8 text"),
    ("metrics deleted", "stopped", remove("metrics.jsonl"), RESUME, "metrics.jsonl' is missing but round 2 finished"),
    ("metrics emptied", "stopped", write_bytes("metrics.jsonl", b""), RESUME, "metrics.jsonl' does not hold the rows"),
    ("metrics truncated mid-line", "stopped", truncate("metrics.jsonl", -30), RESUME, "metrics.jsonl' line"),
    (
        "metrics value edited",
        "stopped",
        edit_text("metrics.jsonl", lambda t: t.replace('"agent": 1,', '"agent": 1, "x": 1,', 1)),
        RESUME,
        "metrics.jsonl' does not hold the rows",
    ),
    (
        "metrics not utf-8",
        "stopped",
        write_bytes("metrics.jsonl", b"\xff\xfe{}\n"),
        RESUME,
        "metrics.jsonl' is not UTF-8",
    ),
    ("metrics not rows", "stopped", write_bytes("metrics.jsonl", b"[1]\n"), RESUME, "is not a metrics row"),
    ("metrics of an unfinished round", "stopped", extra_metrics_round, RESUME, "same"),
    ("newest checkpoint truncated", "stopped", truncate(newest_shard, 200), RESUME, "same"),
    ("newest checkpoint one value changed", "stopped", lambda d: flip_a_value(newest_shard(d)), RESUME, "same"),
    (
        "every checkpoint truncated",
        "stopped",
        all_shards(lambda p: open(p, "r+b").truncate(100)),
        RESUME,
        "cannot be read (truncated, damaged",
    ),
    (
        "every checkpoint changed",
        "stopped",
        all_shards(flip_a_value),
        RESUME,
        "is damaged: its tensors do not match the digest",
    ),
    (
        "checkpoint missing an entry",
        "stopped",
        rewrite_shard(drop_first_adapter_key),
        RESUME,
        "the saved adapters lack",
    ),
    (
        "checkpoint with a wrong shape",
        "stopped",
        rewrite_shard(reshape_first_adapter_key),
        RESUME,
        "has shape (1, 3, 3) but this run needs",
    ),
    ("checkpoint of another run", "stopped", "another-run", RESUME, "belong to another run"),
    (
        "stray temporary file",
        "stopped",
        write_bytes("checkpoints/.round-00003.rank-0-of-1.safetensors.x.tmp", b"junk"),
        RESUME,
        "same",
    ),
    ("foreign file in checkpoints", "stopped", write_bytes("checkpoints/notes.txt", b"mine"), RESUME, "same"),
    (
        "topology edited",
        "stopped",
        edit_text("topology.json", lambda t: t.replace('"ring"', '"rings"')),
        RESUME,
        "topology.json' was changed after round 2",
    ),
    ("partition deleted", "stopped", remove("partition.json"), RESUME, "partition.json' is missing"),
    ("killed before anything", "empty", None, RESUME, "holds no config.yaml"),
    ("not a directory", "missing", None, RESUME, "does not exist"),
    ("summary truncated", "finished", truncate("summary.json", 20), RESUME, "summary.json' is not valid JSON"),
    ("summary not utf-8", "finished", write_bytes("summary.json", b"\xff\xfe"), REPORT, "summary.json' is not UTF-8"),
    (
        "summary wrong shape",
        "finished",
        write_bytes("summary.json", b"[]"),
        RESUME,
        "summary.json' is not a run summary",
    ),
    (
        "summary edited",
        "finished",
        edit_text("summary.json", lambda t: t.replace('"mean": 0.', '"mean": 0.9', 1)),
        RESUME,
        "summary.json' does not match the run's verified checkpoint and metrics",
    ),
    ("report of an unfinished run", "stopped", None, REPORT, "lacks summary.json"),
    ("report with metrics truncated", "finished", truncate("metrics.jsonl", -15), REPORT, "metrics.jsonl' line"),
    (
        "adapters truncated",
        "finished",
        truncate("adapters.safetensors", 64),
        EXPORT,
        "adapters.safetensors' cannot be read",
    ),
    ("adapters deleted", "finished", remove("adapters.safetensors"), EXPORT, "lacks adapters.safetensors"),
    ("adapters hold NaN", "finished", adapters_with(nan_in_first), EXPORT, "holds NaN or infinite values"),
    (
        "adapters changed",
        "finished",
        adapters_with(nan_in_first, keep_digest=True),
        EXPORT,
        "is not the adapters this run wrote",
    ),
    (
        "export config edited",
        "finished",
        edit_text("config.yaml", lambda t: t + "\n# note\n"),
        EXPORT,
        "config.yaml' was changed after the run started",
    ),
]


@pytest.mark.parametrize("name, which, damage, command, expect", CASES, ids=[c[0] for c in CASES])
def test_damaged_run_directory(runs, tmp_path, name, which, damage, command, expect):
    run_dir = tmp_path / "run"
    if which in runs:
        shutil.copytree(runs[which], run_dir)
    elif which == "empty":
        run_dir.mkdir()
    if damage == "another-run":
        damage = from_another_run(runs)
    if damage is not None:
        damage(str(run_dir))
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    args = [str(a).replace("DIR", str(run_dir)).replace("OUT", str(tmp_path / "adapter")) for a in command]
    res = cli(*args)
    if expect == "same":
        assert res.exit_code == 0, res.output
        assert without_timing(read_metrics(run_dir)) == without_timing(runs["reference"])
        assert (
            json.loads((run_dir / "summary.json").read_text())["final_accuracy"]
            == json.loads((pathlib_of(runs["finished"]) / "summary.json").read_text())["final_accuracy"]
        )
    else:
        assert_one_sentence(res, expect)
        after = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
        assert after == before  # a refused command changes nothing
        assert not (tmp_path / "adapter").exists()


def pathlib_of(p):
    import pathlib

    return pathlib.Path(p)


def test_the_table_is_long_enough():
    assert len(CASES) + len(HOSTILE) + len(EXPORT_CASES) >= 40


# ------------------------------------------------------------------------------------------------- hostile inputs
def write_files(tmp_path):
    (tmp_path / "wide.csv").write_text(",".join(f"c{i}" for i in range(5000)) + "\n" + ",".join("1" * 5000) + "\n")
    (tmp_path / "long.csv").write_text("text,label\n" + "x" * (1 << 20) + "y,1\nshort,0\n")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,1\nthé,0\n".encode("latin-1"))
    (tmp_path / "nan_labels.csv").write_text("text,label\nhello,pos\nbye,NaN\nok,neg\n")
    (tmp_path / "far_edge.txt").write_text("0 1\n1 99999999\n")
    (tmp_path / "a_file").write_text("not a directory")


HOSTILE = [
    (["out_dir=FILES/a_file"], "out_dir='FILES/a_file' is a file, not a directory"),
    (["name=../.."], "name='../..' cannot name a run directory"),
    (["name=a/b"], "name='a/b' cannot name a run directory"),
    (["agents=30000"], "agents=30000 is too large; use a value in [1, 4096]."),
    (
        ["topology=edges", "topology.params={edges: FILES/far_edge.txt}"],
        "edge (1, 99999999) names an agent outside 0..3",
    ),
    (["task.dataset=FILES/wide.csv"], "has 5000 columns"),
    (["task.dataset=FILES/long.csv"], "line 2 is longer than 1048576 characters"),
    (["task.dataset=FILES/latin1.csv"], "is not UTF-8 text; save it as UTF-8."),
    (["task.dataset=FILES/nan_labels.csv"], "is missing in row 2 ('NaN')"),
    (["task.max_length=1000"], "task.max_length=1000 exceeds the 64 positions of task.model="),
    (
        ["task.train_examples=40", "agents=4", "partition.alpha=0.01", "partition.min_size=9"],
        "lower partition.min_size",
    ),
    (["task.dtype=float16"], "task.dtype=float16 needs a GPU"),
]


@pytest.mark.parametrize("overrides, message", HOSTILE, ids=[" ".join(h[0])[:50] for h in HOSTILE])
def test_hostile_inputs_are_one_sentence_before_anything_is_allocated_or_written(
    tiny_text, tmp_path, overrides, message
):
    write_files(tmp_path)
    out = tmp_path / "out"
    args = [*tiny_text(), f"out_dir={out}", *[o.replace("FILES", str(tmp_path)) for o in overrides]]  # last wins
    res = cli("run", "-q", *args)
    assert_one_sentence(res, message.replace("FILES", str(tmp_path)))
    assert not out.exists() or not any(out.iterdir())


def test_huge_topology_is_refused_before_allocating():
    assert_one_sentence(cli("topology", "ring", "--agents", "1000000"), "agents=1000000 is too large; use at most 4096")


def test_topology_help_is_not_blank():
    res = cli("topology", "--help")
    assert res.exit_code == 0 and "mixing matrix, degrees and spectral gap" in res.output and "ring" in res.output


# ------------------------------------------------------------------------------------------------- export never deletes
EXPORT_CASES = [
    ("out is the run", lambda t, run: run, "holds the run itself"),
    ("out is the working folder", lambda t, run: ".", "holds the run itself"),  # the run lies below it
    ("out is a user's folder", lambda t, run: t / "mine", "is not empty and is not a previous export"),
    ("out is a file", lambda t, run: t / "mine" / "keep.txt", "is a file"),
    ("out is a previous export", lambda t, run: t / "previous", "holds a previous export; pass --overwrite"),
    ("out links to an empty folder", lambda t, run: t / "link-to-empty", "is a symbolic link"),
    ("out links to a previous export", lambda t, run: t / "link-to-previous", "is a symbolic link"),
]


@pytest.mark.parametrize("name, target, message", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_never_deletes_what_it_did_not_create(runs, tmp_path, name, target, message):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["finished"], run_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    assert cli("export", run_dir, "--agent", "0", "--out", tmp_path / "previous").exit_code == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "link-to-empty").symlink_to(tmp_path / "empty")
    (tmp_path / "link-to-previous").symlink_to(tmp_path / "previous")
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for overwrite in ([], ["--overwrite"]) if "link" in name else ([],):
        res = cli("export", run_dir, "--agent", "1", "--out", target(tmp_path, run_dir), *overwrite, cwd=tmp_path)
        assert_one_sentence(res, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
    assert (tmp_path / "link-to-empty").is_symlink() and (tmp_path / "empty").is_dir()


def test_overwrite_replaces_a_previous_export_and_nothing_else(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["finished"], run_dir)
    out = tmp_path / "adapter"
    assert cli("export", run_dir, "--agent", "0", "--out", out).exit_code == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    res = cli("export", run_dir, "--agent", "3", "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert json.loads((out / "decaf_export.json").read_text())["agent"] == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    assert_one_sentence(
        cli("export", run_dir, "--agent", "0", "--out", tmp_path / "mine", "--overwrite"), "not a previous export"
    )
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary directory left


# ------------------------------------------------------------------------------------------------- disk, races, modes
def test_a_full_disk_is_one_sentence_and_the_last_complete_round_stays_resumable(
    tiny_text, runs, tmp_path, monkeypatch
):
    import errno

    from decaf_lora.errors import DecafError

    engine = make_engine(load_config(None, tiny_text(rounds=ROUNDS, **{"lora.dropout": 0.1})), progress=False)
    real = checkpoint.save_tensors
    calls = {"n": 0}

    def full_disk(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_tensors", full_disk)
    with pytest.raises(
        DecafError,
        match=r"could not write checkpoint .*No space left on device.*round 2, which stays "
        r"resumable",
    ):
        engine.run()
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    assert not [p for p in os.listdir(os.path.join(engine.run_dir, checkpoint.DIR)) if p.endswith(".tmp")]
    assert cli("run", "-q", "--resume", engine.run_dir).exit_code == 0
    assert without_timing(read_metrics(engine.run_dir)) == without_timing(runs["reference"])


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from decaf_lora.rundir import new_run_dir

    made = []
    threads = [
        threading.Thread(target=lambda: made.append(new_run_dir(str(tmp_path), "x", "decaf", 0))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(os.path.isdir(p) for p in made)


def test_two_reports_of_one_run_at_once_both_succeed(runs, tmp_path):
    from decaf_lora.report import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(runs["finished"], run_dir)
    errors = []

    def report():
        try:
            write_report(str(run_dir))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=report) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not [p for p in (run_dir / "plots").iterdir() if ".tmp" in p.name]


def test_run_files_plots_and_exports_get_ordinary_permissions(runs, tmp_path):
    from decaf_lora.rundir import file_mode

    run_dir = pathlib_of(runs["finished"])
    files = [
        run_dir / "metrics.jsonl",
        run_dir / "summary.json",
        run_dir / "adapters.safetensors",
        run_dir / "plots" / "training.png",
    ]
    out = tmp_path / "adapter"
    assert cli("export", run_dir, "--agent", "0", "--out", out).exit_code == 0
    files += [out / "adapter_model.safetensors", out / "decaf_export.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(file_mode()) for p in files}


def test_metrics_are_strict_json_without_bare_nan(tmp_path):
    from decaf_lora.rundir import write_jsonl

    write_jsonl(str(tmp_path / "m.jsonl"), [{"round": 1, "agent": 0, "eval_loss": float("nan"), "x": [float("inf")]}])
    text = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"round": 1, "agent": 0, "eval_loss": None, "x": [None]}
