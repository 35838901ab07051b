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
    assert set(ratios) == {
        "dense_over_factored",
        "factored_over_two_thin_qr",
        "factored_over_two_geqrf",
        "factored_over_average",
    }
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert len(data["batching"]) == 3
    assert "target > 1000x" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers


def test_bench_aggregation_runs_on_a_tiny_grid(tmp_path, capsys):
    import bench_aggregation

    out = tmp_path / "agg.json"
    data = bench_aggregation.main(
        [
            "--layers",
            "2",
            "--d",
            "64",
            "--ranks",
            "8",
            "--ms",
            "3",
            "--reps",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    (row,) = data["rows"]
    assert {"factored_over_floor", "factored_over_average", "dense_over_factored", "share_of_training_step"} <= set(row)
    assert json.loads(out.read_text())["layers"] == 2
    assert "share of step" in capsys.readouterr().out


def test_aggregation_flop_count_is_linear_in_layers_and_far_below_a_dense_svd():
    import bench_aggregation

    one = bench_aggregation.aggregation_flops(1, 4096, 4096, 3, 8)
    assert bench_aggregation.aggregation_flops(64, 4096, 4096, 3, 8) == 64 * one
    two_qrs = 2 * (2 * 4096 * 24**2 - 2 * 24**3 / 3)
    assert two_qrs < one < 2 * two_qrs  # the QRs and the two ormqr back-multiplications dominate
    assert one < 1e-4 * 22 * 4096**3  # a dense SVD of the formed 4096 x 4096 matrix: ~22 n^3
