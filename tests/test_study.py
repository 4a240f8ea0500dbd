"""Tests for tf_dpsat.experiments.study and examples/study.py: the grid, the paired summary."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_dpsat.experiments import study

REPO = pathlib.Path(__file__).resolve().parent.parent


def _write_run(directory, method, seed, test, validation=None, rho=0.0,
               direction="gradient", eigenvalue=None, completed=True,
               old_layout=False):
    os.makedirs(directory, exist_ok=True)
    results = {"completed": completed,
               "flags": {"method": method, "rho": rho, "direction": direction,
                         "seed": seed, "dp_seed": "<redacted>"},
               "private": {"final_test_accuracy": test, "epsilon": 2.0},
               "non_private_diagnostics": {"history": []},
               "wall_time_s": 1.0}
    if validation is not None:
        # Older versions kept "validation" at the top of results.json.
        section = results if old_layout else results["non_private_diagnostics"]
        section["validation"] = {"final_accuracy": validation}
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(results, f)
    if eigenvalue is not None:
        with open(os.path.join(directory, study.SHARPNESS_FILE), "w") as f:
            json.dump({"top_hessian_eigenvalue": eigenvalue}, f)


def test_grid_pairs_every_cell_with_dp_sgd_at_each_seed(tmp_path):
    runs = study.grid(str(tmp_path), rhos=[0.03, 0.1], directions=["gradient"],
                      seeds=[0, 5])
    assert [os.path.basename(r.directory) for r in runs] == [
        "dpsgd_s0", "dpsat_rho0.03_gradient_s0", "dpsat_rho0.1_gradient_s0",
        "dpsgd_s5", "dpsat_rho0.03_gradient_s5", "dpsat_rho0.1_gradient_s5"]
    assert runs[4].flags() == [
        "--method=dpsat", "--rho=0.03", "--direction=gradient", "--seed=5",
        "--dp_seed=5", f"--model_dir={tmp_path}/dpsat_rho0.03_gradient_s5"]
    assert runs[0].flags()[:3] == ["--method=dpsgd", "--seed=0", "--dp_seed=0"]
    with pytest.raises(ValueError, match="distinct seeds"):
        study.grid(str(tmp_path), rhos=[0.1], directions=["gradient"], seeds=[1, 1])
    with pytest.raises(ValueError, match="rho=0.0 > 0"):
        study.grid(str(tmp_path), rhos=[0.0], directions=["gradient"], seeds=[1])


def test_summary_pairs_by_seed_with_a_t_interval(tmp_path):
    # Three seeds. DP-SGD 0.80, 0.90, 0.70; DP-SAT 0.81, 0.92, 0.70, so the
    # paired differences are +0.01, +0.02, 0.00: mean 0.01, sample std 0.01,
    # half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.302653 * 0.0057735 = 0.024841.
    # Unpaired, the DP-SAT mean (0.81) sits well inside DP-SGD's std (0.1).
    for seed, (sgd, sat) in enumerate([(0.80, 0.81), (0.90, 0.92), (0.70, 0.70)]):
        _write_run(tmp_path / f"dpsgd_s{seed}", "dpsgd", seed, sgd, validation=sgd,
                   eigenvalue=10.0 + seed)
        _write_run(tmp_path / f"dpsat_rho0.1_gradient_s{seed}", "dpsat", seed, sat,
                   rho=0.1, validation=sat - 0.05, eigenvalue=8.0 + seed)
        _write_run(tmp_path / f"dpsat_rho0.03_gradient_s{seed}", "dpsat", seed,
                   sat, rho=0.03, validation=sat, old_layout=seed == 2)
    _write_run(tmp_path / "unfinished", "dpsat", 0, 0.5, rho=0.3, completed=False)
    summary = study.summarize(sorted(str(p) for p in tmp_path.iterdir()))
    names = [c["name"] for c in summary["cells"]]
    assert names == ["dpsgd", "dpsat_rho0.03_gradient", "dpsat_rho0.1_gradient"]
    assert summary["unfinished"] == [str(tmp_path / "unfinished")]
    sgd, sat03, sat1 = summary["cells"]
    assert sgd["test_accuracy"]["mean"] == pytest.approx(0.8)
    assert sgd["test_accuracy"]["std"] == pytest.approx(0.1)
    paired = sat1["paired_test_accuracy"]
    assert paired["per_seed"] == pytest.approx([0.01, 0.02, 0.0])
    assert paired["mean"] == pytest.approx(0.01)
    assert paired["ci95"] == pytest.approx([0.01 - 0.024841, 0.01 + 0.024841], abs=1e-6)
    # Eigenvalues: 8, 9, 10 against 10, 11, 12: paired -2 each, std 0.
    assert sat1["top_hessian_eigenvalue"]["mean"] == pytest.approx(9.0)
    assert sat1["by_seed"]["top_hessian_eigenvalue"] == [8.0, 9.0, 10.0]
    assert sat03["by_seed"]["top_hessian_eigenvalue"] == [None, None, None]
    assert sgd["by_seed"]["test_accuracy"] == [0.80, 0.90, 0.70]
    assert sat1["paired_top_hessian_eigenvalue"]["ci95"] == pytest.approx([-2, -2])
    assert "paired_top_hessian_eigenvalue" not in sat03  # Not measured there.
    # Chosen on validation (rho 0.03: 0.81 mean; rho 0.1: 0.76), not on test.
    assert summary["chosen"] == "dpsat_rho0.03_gradient"
    table = study.markdown_table(summary)
    assert "| dpsat_rho0.1_gradient | 3 | 76.00 +- 11.00 | 81.00 +- 11.00 | " \
           "+1.00 [-1.48, +3.48] | 9 +- 1 | -2 [-2, -2] |" in table
    assert "dpsat_rho0.03_gradient (chosen)" in table
    study.plot(summary, str(tmp_path / "study.png"), title="t")
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_summary_refuses_two_runs_of_one_cell_and_seed(tmp_path):
    _write_run(tmp_path / "a", "dpsgd", 0, 0.8)
    _write_run(tmp_path / "b", "dpsgd", 0, 0.7)
    with pytest.raises(ValueError, match="Two runs of dpsgd with seed 0"):
        study.summarize([str(tmp_path / "a"), str(tmp_path / "b")])


def run_runner(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "study.py"), *args],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO)))


def test_runner_warns_once_that_paired_runs_share_their_noise(tmp_path):
    # --summarize_only over an empty study: the runner starts, trains nothing.
    started = run_runner(f"--study_dir={tmp_path}", "--rhos=0.1",
                         "--directions=gradient", "--seeds=3", "--summarize_only",
                         "--", "--dataset=digits")
    assert started.returncode == 0, started.stderr[-2000:]
    warnings = [line for line in started.stderr.splitlines()
                if line.startswith("W") and "Paired runs share their noise" in line]
    assert len(warnings) == 1
    assert started.stderr.count("Paired runs share their noise") == 1
    text = " ".join(started.stderr.split())
    for claim in ("without knowing the seed", "two runs of a pair together are "
                  "not covered", "public benchmark data", "publish at most one run "
                  "of a pair", "without --dp_seed"):
        assert claim in text, claim
    # The summary reads validation accuracy and eigenvalues, which
    # --norecord_train_diagnostics would drop: refused before any run.
    for flag in ("--norecord_train_diagnostics", "--record_train_diagnostics=false"):
        refused = run_runner(f"--study_dir={tmp_path}", "--seeds=3", "--",
                             "--dataset=digits", flag)
        assert refused.returncode != 0
        assert "--norecord_train_diagnostics drops the validation accuracy" in (
            refused.stderr)
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.slow
def test_runner_trains_pairs_resumes_and_summarises(tmp_path):
    command = [sys.executable, str(REPO / "examples" / "study.py"),
               f"--study_dir={tmp_path}", "--rhos=0.1", "--directions=gradient",
               "--seeds=3", f"--output_json={tmp_path}/summary.json", "--",
               "--dataset=digits", "--model=mlp", "--epochs=1", "--batch_size=100",
               "--validation_examples=300"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    first = subprocess.run(command, capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stderr.count("Paired runs share their noise") == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["name"] for c in summary["cells"]] == ["dpsgd", "dpsat_rho0.1_gradient"]
    dpsat = summary["cells"][1]
    assert dpsat["paired_seeds"] == [3]
    # Paired: both runs of seed 3 used --dp_seed=3 (and 1200 examples).
    for name in ("dpsgd_s3", "dpsat_rho0.1_gradient_s3"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["flags"]["seed"] == 3 and results["num_train_examples"] == 1200
        assert results["flags"]["dp_seed"] == "<redacted>"
        assert results["non_private_diagnostics"]["validation"]["num_examples"] == 300
    again = subprocess.run(command, capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier") == 2
    # Sharpness of the finished runs, measured afterwards: the same value as
    # the binary's --sharpness_examples would record for the final model.
    measured = subprocess.run(command[:-6] + ["--measure_sharpness=32", "--"] +
                              command[-5:], capture_output=True, text=True,
                              env=env, timeout=600)
    assert measured.returncode == 0, measured.stderr[-2000:]
    assert measured.stdout.count(": top Hessian eigenvalue") == 2
    saved = json.loads((tmp_path / "dpsgd_s3" / "sharpness.json").read_text())
    assert saved["num_examples"] == 32 and "not private" in saved["note"].lower()
    summary = json.loads((tmp_path / "summary.json").read_text())
    paired = summary["cells"][1]["paired_top_hessian_eigenvalue"]
    assert paired["per_seed"] == [pytest.approx(
        json.loads((tmp_path / "dpsat_rho0.1_gradient_s3" / "sharpness.json")
                   .read_text())["top_hessian_eigenvalue"]
        - saved["top_hessian_eigenvalue"])]
    # Disjoint sets of 32 examples: the first is what sharpness.json measured.
    by_subset = study.eigenvalue_by_subset(str(tmp_path / "dpsgd_s3"), 32, 2)
    assert by_subset[0] == pytest.approx(saved["top_hessian_eigenvalue"], rel=1e-6)
    assert by_subset[1] != pytest.approx(by_subset[0], rel=1e-6)
    refused = subprocess.run(command + ["--seed=1"], capture_output=True, text=True,
                             env=env, timeout=600)
    assert refused.returncode != 0 and "--seed is set by the study" in refused.stderr
    # The 1-D landscapes of both runs along two shared random directions.
    runs = [str(tmp_path / "dpsgd_s3"), str(tmp_path / "dpsat_rho0.1_gradient_s3")]
    drawn = subprocess.run(
        [sys.executable, str(REPO / "examples" / "loss_landscape.py"),
         f"--run_dirs={','.join(runs)}", "--labels=DP-SGD,DP-SAT",
         "--num_examples=64", "--radii=-0.5,0,0.5", "--directions=2",
         f"--output_json={tmp_path}/landscape.json", f"--plot={tmp_path}/landscape.png"],
        capture_output=True, text=True, env=env, timeout=600)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (tmp_path / "landscape.png").stat().st_size > 10_000
    landscape = json.loads((tmp_path / "landscape.json").read_text())
    assert "not private" in landscape["note"].lower()
    final = study.load_final_model(runs[0], 64)
    # At alpha = 0 every direction evaluates the final weights: the mean
    # cross-entropy of the saved model's softmax on those 64 examples.
    probabilities = tf.nn.softmax(final.model.predict(final.x, verbose=0)).numpy()
    expected = -np.mean(np.log(probabilities[np.arange(64), final.y]))
    losses = landscape["landscapes"]["DP-SGD"]["losses"]
    assert len(losses) == 2 and [row[1] for row in losses] == pytest.approx(
        [expected] * 2, rel=1e-4)
    # Away from the minimum the loss rises along both directions.
    assert all(min(row[0], row[2]) > row[1] for row in losses)
