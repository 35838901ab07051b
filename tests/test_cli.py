"""The ``decaf`` command: output a person can read, JSON a program can, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from decaf_lora.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_topology_prints_matrix_degrees_and_spectral_gap():
    res = run("topology", "ring", "--agents", "10")
    assert res.exit_code == 0, res.output
    assert "|lambda_2| = 0.8727" in res.output
    assert "degree: min 2, mean 2.00, max 2" in res.output
    assert res.output.count("0.333") == 30


def test_topology_json_is_machine_readable():
    res = run("topology", "bipartite", "-n", "10", "--json")
    data = json.loads(res.output)
    assert data["agents"] == 10 and round(data["second_eigenvalue"], 2) == 0.78
    assert len(data["matrix"]) == 10


def test_topology_parameters_and_edge_files(tmp_path):
    assert "8 agents" in run("topology", "bipartite", "-n", "8", "--param", "hubs=3").output
    f = tmp_path / "e.txt"
    f.write_text("0 1\n1 2\n2 0\n")
    res = run("topology", "edges", "--edges", str(f))
    assert res.exit_code == 0 and "3 agents, 3 edges" in res.output


def test_large_topologies_omit_the_matrix():
    assert "omitted" in run("topology", "exponential", "-n", "64").output


@pytest.mark.parametrize(
    "args, message",
    [
        (["topology", "moebius", "-n", "4"], "error: topology='moebius' is not known; choose one of:"),
        (["topology", "ring"], "error: --agents is required"),
        (["topology", "ring", "-n", "4", "--mixing", "x"], "error: mixing='x' is not known"),
        (["topology", "ring", "-n", "4", "--param", "hubs"], "error: --param 'hubs' is not of the form key=value"),
        (
            ["topology", "star", "-n", "5", "--mixing", "uniform"],
            "error: mixing='uniform' needs every agent to have the same degree",
        ),
        (["topology", "edges", "--edges", "/no/such/file"], "error: edges='/no/such/file' is not a readable file"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, message):
    res = run(*args)
    assert res.exit_code == 2
    assert res.output.startswith(message)
    assert "Traceback" not in res.output and res.output.count("\n") == 1


def test_consensus_demo_compares_decaf_and_dlora():
    res = run("consensus-demo", "--agents", "4", "--dim", "16", "--rank", "2")
    assert res.exit_code == 0, res.output
    for name in ("ring", "bipartite", "complete"):
        assert name in res.output
    for bad in (["--agents", "1"], ["--dim", "-1"], ["--dim", "100000"], ["--rank", "0"], ["--seed", "-1"]):
        res = run("consensus-demo", *bad)
        assert res.exit_code == 2 and "Traceback" not in res.output, (bad, res.output)
        assert f"Invalid value for '{bad[0]}'" in res.output or "is invalid" in res.output, (bad, res.output)


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "decaf_lora", "topology", "complete", "-n", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "spectral gap = 1.0000" in out.stdout


# --- run, report, compare, export -------------------------------------------------------------------------------


def test_run_prints_the_result_table_and_report_rebuilds_it(tiny_text, tmp_path):
    res = run("run", "-q", *tiny_text(rounds=2))
    assert res.exit_code == 0, res.output
    assert "| test accuracy, mean over agents |" in res.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rep = run("report", str(run_dir))
    assert rep.exit_code == 0 and "| agent | test acc |" in rep.output


def test_run_with_bad_fields_lists_every_problem_and_leaves_no_run_directory(tmp_path):
    res = run("run", "agents=0", "lora.rnk=2", "algorithm=magic", f"out_dir={tmp_path}")
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"task.model": "/no/such/model"}, "task.model='/no/such/model' is not a local directory"),
        ({"lora.targets": "[nothing_like_this]"}, "matches no module of"),
        ({"lora.rank": 64}, "lora.rank=64 exceeds the size of"),
        ({"agents": 400}, "agents=400 is more than the 320 training examples"),
        ({"task.dataset": "/no/such.csv"}, "does not exist"),
    ],
)
def test_run_errors_found_while_building_are_one_sentence_too(tiny_text, tmp_path, extra, message):
    res = run("run", *tiny_text(**extra))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_csv_with_wrong_column_names_is_refused(tiny_text, tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("sentence,sentiment\nhello,pos\nbye,neg\n")
    res = run("run", *tiny_text(**{"task.dataset": str(f)}))
    assert res.exit_code == 2
    assert "task.text_column='text' is not a column of data.csv; its columns are: sentence, sentiment." in res.output


def test_help_config_lists_every_field():
    res = run("run", "--help-config")
    assert res.exit_code == 0 and "partition.alpha" in res.output and "optim.state_after_mix" in res.output


def test_compare_runs_each_method_and_seed_into_one_table_and_plot(tiny_text, tmp_path):
    res = run("compare", "-q", *tiny_text(rounds=2), "--algorithms", "decaf,local", "--seeds", "2")
    assert res.exit_code == 0, res.output
    assert "| decaf | 2 |" in res.output and "| local | 2 |" in res.output and "+-" in res.output
    (cmp_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("compare-")]
    assert {"compare.md", "compare.json", "compare.png"} <= {p.name for p in cmp_dir.iterdir()}
    assert len([p for p in cmp_dir.iterdir() if p.is_dir()]) == 4
    bad = run("compare", *tiny_text(), "--algorithms", "decaf,best")
    assert bad.exit_code == 2 and "--algorithms names 'best'" in bad.output


def test_export_cli(tiny_text, tmp_path):
    assert run("run", "-q", *tiny_text(rounds=1)).exit_code == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    res = run("export", str(run_dir), "--agent", "1", "--out", str(tmp_path / "adapter"))
    assert res.exit_code == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    res = run("export", str(run_dir), "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "exactly one of --agent I or --consensus" in res.output
    res = run("report", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "does not exist" in res.output
