"""Tests for tf_dpsat.experiments.reporting and examples/compare_runs.py on real digits runs."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from tf_dpsat.experiments import reporting
from tf_dpsat.experiments import training

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds each of DP-SAT and DP-SGD on digits (MLP, 2 epochs)."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for method in ("dpsat", "dpsgd"):
        for seed in (0, 1):
            model_dir = str(root / f"{method}_{seed}")
            training.train(training.TrainConfig(
                dataset="digits", model="mlp", epochs=2, batch_size=100,
                eval_batch_size=300, keras_verbose=0, seed=seed, method=method,
                dp_seed=seed, model_dir=model_dir))
            dirs[method, seed] = model_dir
    return root, dirs


def _final(model_dir):
    with open(pathlib.Path(model_dir) / "results.json") as f:
        return json.load(f)["private"]["final_test_accuracy"]


@pytest.mark.slow
def test_summary_matches_each_runs_results(runs):
    _, dirs = runs
    summary = reporting.summarize_runs(list(dirs.values()))
    assert list(summary["methods"]) == ["dpsat", "dpsgd"]
    for method in ("dpsat", "dpsgd"):
        finals = [_final(dirs[method, seed]) for seed in (0, 1)]
        stats = summary["methods"][method]["final_test_accuracy"]
        assert summary["methods"][method]["seeds"] == [0, 1]
        assert stats["mean"] == pytest.approx((finals[0] + finals[1]) / 2)
        # Sample std of two values: |a - b| / sqrt(2).
        assert stats["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert (stats["min"], stats["max"]) == (min(finals), max(finals))
    assert summary["experiment"]["dataset"] == "digits"
    assert "seed" not in summary["experiment"]
    table = reporting.markdown_table(summary)
    mean = statistics.fmean(_final(dirs["dpsat", s]) for s in (0, 1))
    assert f"| dpsat | 2 (0, 1) | {100 * mean:.2f}% +- " in table


def test_refuses_different_experiments_and_unfinished_runs(runs, tmp_path):
    root, dirs = runs
    other = str(tmp_path / "other")
    training.train(training.TrainConfig(
        dataset="digits", model="mlp", epochs=1, batch_size=100,
        eval_batch_size=300, keras_verbose=0, seed=2, model_dir=other))
    with pytest.raises(ValueError, match=r"different experiment: epochs=2"):
        reporting.summarize_runs([dirs["dpsat", 0], other])
    with pytest.raises(ValueError, match="repeated seeds"):
        reporting.summarize_runs([dirs["dpsat", 0], dirs["dpsat", 0]])
    results = pathlib.Path(other) / "results.json"
    data = json.loads(results.read_text())
    data["completed"] = False
    results.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rerun its command"):
        reporting.summarize_runs([other])


@pytest.mark.slow
def test_binary_writes_table_json_and_plot(runs, tmp_path):
    root, dirs = runs
    out_json, out_png = tmp_path / "summary.json", tmp_path / "summary.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "compare_runs.py"),
         f"--runs={root}/dp*", f"--output_json={out_json}", f"--plot={out_png}"],
        capture_output=True, text=True, timeout=300,
        # This checkout's tf_dpsat, not an installed copy: the script's own
        # directory comes first on sys.path.
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| dpsat | 2 (0, 1) |" in result.stdout
    summary = json.loads(out_json.read_text())
    assert sorted(r["model_dir"] for r in summary["runs"]) == sorted(dirs.values())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
