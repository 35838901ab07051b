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
        (["topology", "star", "-n", "5", "--mixing", "uniform"], "error: mixing='uniform' needs every agent to have the same degree"),
        (["topology", "edges", "--edges", "/no/such/file"], "error: edges='/no/such/file' is not a readable file"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, message):
    res = run(*args)
    assert res.exit_code == 2
    assert res.output.startswith(message)
    assert "Traceback" not in res.output and res.output.count("\n") == 1


def test_demo_compares_decaf_and_dlora():
    res = run("demo", "--agents", "4", "--dim", "16", "--rank", "2")
    assert res.exit_code == 0, res.output
    for name in ("ring", "bipartite", "complete"):
        assert name in res.output
    assert run("demo", "--agents", "1").exit_code == 2


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "decaf_lora", "topology", "complete", "-n", "3"], capture_output=True, text=True, check=True)
    assert "spectral gap = 1.0000" in out.stdout
