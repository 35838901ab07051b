"""A table of malformed inputs: each is answered by one sentence per problem and exit code 2, no traceback, and no
run directory left behind."""

import json

import pytest
from click.testing import CliRunner

from decaf_lora.cli import main


def files(tmp_path):
    (tmp_path / "wrong_columns.csv").write_text("sentence,sentiment\nhello,pos\nbye,neg\n")
    (tmp_path / "one_class.csv").write_text("text,label\nhello,pos\nbye,pos\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    (tmp_path / "not_objects.jsonl").write_text("[1, 2]\n")
    (tmp_path / "empty_cells.csv").write_text("text,label\nhello,pos\n,neg\n")
    (tmp_path / "keys_gap.csv").write_text(
        "text,label,user\n" + "".join(f"t{i},{i % 2},{'' if i == 7 else i % 3}\n" for i in range(60))
    )
    (tmp_path / "keys.csv").write_text("text,label,user\n" + "".join(f"t{i},{i % 2},u{i % 3}\n" for i in range(60)))
    (tmp_path / "edges_bad.txt").write_text("0 1\n1 x\n")
    (tmp_path / "bad.yaml").write_text("agents: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n")


CASES = [
    # (overrides, the sentence expected in the output)
    (["agents=0"], "agents=0 is too small; use a value in [1, 4096]."),
    (["rounds=-1"], "rounds=-1 is too small"),
    (["local_steps=0"], "local_steps=0 is too small"),
    (["eval_every=0"], "eval_every=0 is too small"),
    (["lora.rank=0"], "lora.rank=0 is too small"),
    (["lora.rank=64"], "lora.rank=64 exceeds the size of"),
    (["lora.alpha=-1"], "lora.alpha=-1.0 is too small; use a value >= 0."),
    (["lora.dropout=1.5"], "lora.dropout=1.5 is too large; use a value in [0, 1)."),
    (["lora.targets=[nope]"], "lora.targets=['nope'] matches no module of"),
    (["optim.lr=0"], "optim.lr=0.0 is too small; use a value > 0."),
    (["optim.lr=fast"], "optim.lr='fast' has the wrong type; it must be a number."),
    (["optim.state_after_mix=maybe"], "optim.state_after_mix='maybe' is not known; choose one of: keep, reset."),
    (["algorithm=nope"], "algorithm='nope' is not known; choose one of: "),
    (
        ["algorithm_options={split: x}"],
        "algorithm_options.split='x' is not known; choose one of: all-into-b, balanced.",
    ),
    (["algorithm=dlora", "algorithm_options={gauge: lstsq}"], "algorithm 'dlora' has no option gauge"),
    (["topology=moon"], "topology.name='moon' is not known"),
    (["topology=star", "topology.mixing=uniform"], "mixing='uniform' needs every agent to have the same degree"),
    (["topology=bipartite", "topology.params={hubs: 99}"], "hubs=99 is invalid for 4 agents"),
    (["topology=ring", "topology.params={hubs: 2}"], "topology 'ring' does not take hubs"),
    (["topology=erdos_renyi", "topology.params={seed: -1}"], "seed=-1 is invalid for erdos_renyi; use an integer"),
    (["name=" + "x" * 300], "is 300 bytes long; a run directory adds the method, seed and time"),
    (["topology=edges", "topology.params={edges: /no/file.txt}"], "edges='/no/file.txt' is not a readable file"),
    (["topology=edges", "topology.params={edges: FILES/edges_bad.txt}"], "line 2 reads '1 x'"),
    (["topology.link_drop=2"], "topology.link_drop=2.0 is too large; use a value in [0, 1)."),
    (["partition=zipf"], "partition.scheme='zipf' is not known"),
    (["partition.alpha=0"], "partition.alpha=0.0 is too small; use a value > 0."),
    (["partition=natural"], "partition.scheme=natural needs partition.key"),
    (
        ["partition=natural", "partition.key=user", "task.dataset=FILES/wrong_columns.csv"],
        "is not a column of wrong_columns.csv",
    ),
    (
        [
            "partition=natural",
            "partition.key=user",
            "task.dataset=FILES/keys.csv",
            "task.test_examples=10",
            "agents=5",
            "task.train_examples=0",
        ],
        "3 distinct values but agents=5",
    ),
    (["agents=400"], "agents=400 is more than the 320 training examples"),
    (["task.test_examples=100000"], "task.test_examples=100000 leaves no training data"),
    (["task.dataset=/no/such.csv"], "task.dataset='/no/such.csv' does not exist"),
    (
        ["task.dataset=FILES/wrong_columns.csv"],
        "task.text_column='text' is not a column of wrong_columns.csv; its columns are: sentence, sentiment.",
    ),
    (["task.dataset=FILES/one_class.csv"], "has 1 distinct value(s); classification needs at least 2 classes."),
    (["task.dataset=FILES/broken.jsonl"], "line 2 is not valid JSON"),
    (["task.dataset=FILES/not_objects.jsonl"], "line 1 is not a JSON object"),
    (["task.dataset=FILES/empty_cells.csv"], "row 2 has no value in column 'text'"),
    (
        ["task.dataset=FILES/keys_gap.csv", "partition.scheme=natural", "partition.key=user"],
        "no value in column 'user'",
    ),
    (["seed=-1"], "seed=-1 is too small; use a value in [0, 4294967296)"),
    (["split_seed=99999999999999999999999"], "split_seed=99999999999999999999999 is too large"),
    (["seed=" + "9" * 5000], "seed="),
    (
        ["seed=" + "9" * 400],
        "seed=999999999999999999...9999999999999999999 is too large; use a value in [0, 4294967296)",
    ),
    (["optim.lr=" + "9" * 400], "is too large for a floating-point number; use a smaller value."),
    (["rounds=" + "9" * 400], "is too large; use a value in [1, 1000000]."),
    (["lora.targets=[x" + "9" * 500 + "]"], "...9999"),
    (["lora.targets=[1]"], "lora.targets=[1] is invalid; each entry must be a string"),
    (["algorithm_options={1: 2, a: 3}"], "algorithm_options has the key 1; its keys must be option names"),
    (["task.dataset=digits"], "task.dataset='digits' holds images; use it with task.kind=clip."),
    (["task.kind=clip", "task.dataset=tweets"], "task.dataset='tweets' is not an image data set"),
    (["task.model=/no/model"], "task.model='/no/model' is not a local directory and the Hugging Face hub cannot be"),
    (["task.kind=speech"], "task.kind='speech' is not known"),
    (["task.dtype=int8"], "task.dtype='int8' is not known"),
    (["task.kind=causal_lm", "task.label_names=[a, b]"], "task.label_names has 2 names but the data has 3 classes"),
    (["device=tpu"], "device='tpu' is not known"),
    (["faults.poison_agent=99"], "faults.poison_agent=99 is out of range"),
    (["faults.poison=fire"], "faults.poison='fire' is not known"),
    (["faults=3"], "sets 'faults', which is a section; set its fields"),
    (["faults.slow_rank=1"], "faults.slow_rank=1 delays a torchrun process; use it with engine=distributed"),
    (["faults.slow_rounds=[0]"], "faults.slow_rounds=[0] is invalid; each entry must be an integer >= 1."),
    (["faults.collective_timeout=0"], "faults.collective_timeout=0.0 is too small; use a value > 0."),
    (["colour=blue"], "sets unknown field 'colour'"),
    (["lora.rnak=2"], "did you mean 'lora.rank'?"),
    (["agents"], "override 'agents' is not of the form key=value"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_malformed_input_gets_one_sentence_and_exit_code_2(tiny_text, tmp_path, overrides, message):
    files(tmp_path)
    out = tmp_path / "out"
    args = [*tiny_text(), f"out_dir={out}", *[o.replace("FILES", str(tmp_path)) for o in overrides]]
    res = CliRunner().invoke(main, ["run", "-q", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert all(line.startswith("error: ") for line in res.output.strip().splitlines())
    assert len(res.output) < 1500, "a huge value is quoted cut short, not in full"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "FILES/missing.yaml"], "config file 'FILES/missing.yaml' does not exist"),
        (["run", "FILES/bad.yaml"], "is not valid YAML at line"),
        (["run", "FILES/list.yaml"], "must hold a mapping of fields"),
        (["run", "--resume", "FILES/no_run"], "run directory 'FILES/no_run' does not exist"),
        (["export", "FILES/no_run", "--agent", "0", "--out", "FILES/x"], "does not exist"),
        (["compare", "--algorithms", "decaf,bogus"], "--algorithms names 'bogus', which is not known"),
        (["compare", "--seeds", "0"], "--seeds=0 is invalid"),
        (["topology", "ring", "-n", "0"], "agents=0 is invalid"),
    ],
)
def test_malformed_files_and_commands(tmp_path, args, message):
    files(tmp_path)
    res = CliRunner().invoke(main, [a.replace("FILES", str(tmp_path)) for a in args])
    assert res.exit_code == 2, res.output
    assert message.replace("FILES", str(tmp_path)) in res.output
    assert "Traceback" not in res.output


def test_resume_with_a_different_config_via_cli(tiny_text, tmp_path):
    assert CliRunner().invoke(main, ["run", "-q", *tiny_text(rounds=1)]).exit_code == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    res = CliRunner().invoke(main, ["run", "--resume", str(run_dir), "lora.rank=3"])
    assert res.exit_code == 2 and "with a different config (lora.rank: 4 in the run, 3 now)" in res.output
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1  # the finished run is untouched
