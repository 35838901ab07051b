"""The benchmark scripts keep working (tiny shapes; no timing is asserted, only that every figure is produced)."""

import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_tsvd  # noqa: E402


def test_bench_tsvd_runs_and_writes_every_ratio(tmp_path, capsys):
    out = tmp_path / "tsvd.json"
    bench_tsvd.main(["--d", "64", "--r", "2", "--reps", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    ratios = data["single_layer"]["ratios"]
    assert set(ratios) == {"dense_over_factored", "factored_over_two_thin_qr", "factored_over_two_geqrf", "factored_over_average"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert len(data["batching"]) == 3
    assert "target > 1000x" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers
