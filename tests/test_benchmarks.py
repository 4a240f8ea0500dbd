"""Smoke tests of benchmarks/step_time.py, so that the harness cannot rot.

They check that it runs end to end on a tiny model (2 timed steps per mode,
jit off and on, each group in its own subprocess as by default), that the
JSON has its schema and sane ratios, that one memory subprocess reports its
RSS and that crashed or hung children become errors. They assert nothing
about speed.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import tf_dpsat  # noqa: E402
from benchmarks import step_time  # noqa: E402

ROW_KEYS = {
    "model", "model_description", "input_shape", "parameters", "batch_size",
    "jit", "jit_effective", "mode", "optimizer", "clipping", "batch_slices",
    "chunk_units", "steps_timed",
    "median_step_s", "p25_step_s", "p75_step_s", "min_step_s",
    "examples_per_s", "first_call_s", "traces", "retraces_while_timed",
    "final_loss", "round_medians_s", "step_times_s", "memory", "error",
    "skipped", "rounds_timed", "warmup_step_s", "xla_compiles_first_call",
    "xla_compiles_later", "xla_recompiles_every_step",
    "ratio_vs_nonprivate", "paired_ratio_vs_nonprivate", "ratio_vs_dpsgd",
    "paired_ratio_vs_dpsgd",
}
ENVIRONMENT_KEYS = {"date_utc", "command", "python", "cpu_count",
                    "tensorflow", "keras", "numpy", "tf_dpsat", "gpus", "git",
                    "load_average_start", "xla_compile_counting"}
MEMORY_KEYS = {"rss_after_import_mb", "rss_baseline_mb", "rss_peak_mb",
               "rss_step_mb", "peak_counter", "ru_maxrss_mb", "steps",
               "parameters", "gpu_peak_mb"}


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step_time.json"
    argv = ["--models=tiny", "--batch_sizes=4", "--jit=off,on", "--rounds=1",
            "--steps=2", "--warmup=0", "--no-memory", f"--output_json={out}",
            f"--plot={out.with_suffix('.png')}"]
    assert step_time.main(argv) == 0
    return json.loads(out.read_text()), out


@pytest.mark.slow
def test_json_schema(report):
    data, _ = report
    assert data["schema_version"] == step_time.SCHEMA_VERSION
    assert data["complete"] is True
    assert ENVIRONMENT_KEYS <= set(data["environment"])
    assert "--models=tiny" in data["environment"]["command"]
    assert data["config"]["steps"] == 2
    rows = data["results"]
    pairs = {(r["mode"], r["jit"]) for r in rows}
    assert pairs == {(m, j) for m in step_time.MODES for j in (False, True)}
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["steps_timed"] == 2
        assert len(row["step_times_s"]) == 2
        assert row["retraces_while_timed"] == 0
        assert row["memory"] is None


def test_times_and_ratios_are_positive_and_finite(report):
    data, _ = report
    for row in data["results"]:
        for key in ("median_step_s", "examples_per_s", "first_call_s",
                    "ratio_vs_nonprivate", "paired_ratio_vs_nonprivate",
                    "final_loss"):
            assert _positive_finite(row[key]), (key, row[key])
        if row["mode"] == "nonprivate":
            assert row["ratio_vs_nonprivate"] == 1.0
            assert row["ratio_vs_dpsgd"] is None
            assert row["optimizer"] == "SGD"
        else:
            assert _positive_finite(row["ratio_vs_dpsgd"])
            assert row["optimizer"] in ("DPSATKeras", "DPSAMKeras")


def test_plot_written(report):
    _, out = report
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_lists_every_row(report):
    data, _ = report
    table = step_time.format_table(data["results"]).splitlines()
    assert len(table) == 2 + len(data["results"])
    assert all(line.startswith("|") and line.endswith("|") for line in table)


@pytest.mark.slow
def test_memory_subprocess():
    cfg = step_time.Config(models=["tiny"], batch_sizes=[4], modes=["dpsat"],
                           jit=[False], memory_steps=2)
    memory = step_time.measure_memory("tiny", 4, False, "dpsat", cfg)
    assert "error" not in memory, memory.get("error")
    assert MEMORY_KEYS <= set(memory)
    for key in ("rss_after_import_mb", "rss_baseline_mb", "rss_peak_mb"):
        assert _positive_finite(memory[key]), (key, memory[key])
    assert memory["rss_peak_mb"] >= memory["rss_baseline_mb"]
    assert memory["parameters"] == 36 * 8 + 8 + 8 * 10 + 10


def test_memory_ratios_from_rows():
    rows = []
    for mode, median, peak, step in (("nonprivate", 0.01, 1000.0, 10.0),
                                     ("dpsgd", 0.04, 1200.0, 40.0),
                                     ("dpsat", 0.042, 1210.0, 41.0)):
        row = step_time.base_row("tiny", 4, mode, False)
        row.update(median_step_s=median, round_medians_s=[median, median],
                   memory={"rss_peak_mb": peak, "rss_step_mb": step})
        rows.append(row)
    step_time.add_ratios(rows)
    nonprivate, dpsgd, dpsat = rows
    assert dpsgd["ratio_vs_nonprivate"] == pytest.approx(4.0)
    assert dpsat["ratio_vs_dpsgd"] == pytest.approx(1.05)
    assert dpsat["paired_ratio_vs_dpsgd"] == pytest.approx(1.05)
    assert dpsgd["memory"]["ratio_vs_nonprivate"] == pytest.approx(1.2)
    assert dpsgd["memory"]["step_ratio_vs_nonprivate"] == pytest.approx(4.0)
    assert nonprivate["ratio_vs_dpsgd"] is None


def test_clipping_is_passed_only_when_accepted():
    class Base:
        __module__ = "tf_dpsat.fake"

        def __init__(self, *, rho=0.0, clipping="auto"):
            pass

    class Forwarding(Base):
        __module__ = "tf_dpsat.fake"

        def __init__(self, *args, rho=0.1, **kwargs):
            super().__init__(*args, rho=rho, **kwargs)

    class Closed:
        __module__ = "tf_dpsat.fake"

        def __init__(self, *, rho=0.0):
            pass

    assert step_time.accepts_keyword(Base, "clipping")
    assert step_time.accepts_keyword(Forwarding, "clipping")
    assert not step_time.accepts_keyword(Closed, "clipping")
    cfg = step_time.Config(models=["tiny"], batch_sizes=[4], modes=["dpsgd"],
                           jit=[False], clipping="fast")
    if step_time.accepts_keyword(step_time.tf_dpsat.DPSATKeras, "clipping"):
        assert step_time.make_optimizer("dpsgd", cfg).rho == 0.0
    else:
        with pytest.raises(ValueError, match="clipping"):
            step_time.make_optimizer("dpsgd", cfg)


@pytest.mark.slow
def test_batch_slices_are_passed_and_reported():
    cfg = step_time.Config(models=["tiny"], batch_sizes=[4],
                           modes=["nonprivate", "dpsat"], jit=[False],
                           rounds=1, steps=1, warmup=1, batch_slices=3)
    assert step_time.make_optimizer("dpsat", cfg).batch_slices == 3
    rows = step_time.time_group("tiny", 4, False, cfg)
    assert {r["mode"]: r["batch_slices"] for r in rows} == {
        "nonprivate": None, "dpsat": 3}
    argv = step_time._child_argv(cfg, "tiny", 4, False, "dpsat")
    assert "--batch_slices=3" in argv
    # Not given: the row reports what the library's default traced.
    default = dataclasses.replace(cfg, batch_slices=None, jit=[False, True])
    rows = [r for jit in (False, True)
            for r in step_time.time_group("tiny", 4, jit, default)
            if r["mode"] == "dpsat"]
    assert [r["batch_slices"] for r in rows] == [2, 1]


def test_chunk_units_are_passed_to_the_optimizer_and_the_children():
    # Unset: the library's default; "none" (0 in the config): no chunks.
    args = step_time.parser().parse_args(["--chunk_units=none"])
    assert args.chunk_units == 0
    assert step_time.parser().parse_args(["--chunk_units=64"]).chunk_units == 64
    with pytest.raises(SystemExit):
        step_time.parser().parse_args(["--chunk_units=0"])
    cfg = step_time.Config(models=["tiny"], batch_sizes=[4], modes=["dpsat"],
                           jit=[False])
    assert (step_time.make_optimizer("dpsat", cfg).chunk_units ==
            tf_dpsat.per_example.DEFAULT_CHUNK_UNITS)
    for given, expected, flag in ((0, None, "--chunk_units=none"),
                                  (64, 64, "--chunk_units=64")):
        chosen = dataclasses.replace(cfg, chunk_units=given)
        assert step_time.make_optimizer("dpsat", chosen).chunk_units == expected
        assert flag in step_time._child_argv(chosen, "tiny", 4, False, "dpsat")
    assert not any(a.startswith("--chunk_units")
                   for a in step_time._child_argv(cfg, "tiny", 4, False, "dpsat"))


@pytest.mark.slow
def test_in_process_group_without_isolation():
    cfg = step_time.Config(models=["tiny"], batch_sizes=[4],
                           modes=["nonprivate", "dpsgd"], jit=[False],
                           rounds=2, steps=1, warmup=1)
    rows = step_time.time_group("tiny", 4, False, cfg)
    assert [r["mode"] for r in rows] == ["nonprivate", "dpsgd"]
    assert all(r["steps_timed"] == 2 and r["error"] is None for r in rows)


def test_child_crash_and_timeout_become_errors():
    crash = step_time.run_child(
        [sys.executable, "-c", "import os, signal; "
         "os.kill(os.getpid(), signal.SIGKILL)"],
        "@@marker@@", timeout_s=60, count_compiles=False, forward_stderr=False)
    assert crash.payload is None
    assert crash.error.startswith("killed by signal 9 (out of memory?)")
    hang = step_time.run_child(
        [sys.executable, "-c", "import time; time.sleep(30)"], "@@marker@@",
        timeout_s=1, count_compiles=False, forward_stderr=False)
    assert hang.error.startswith("timed out after 1 s")
    ok = step_time.run_child(
        [sys.executable, "-c", "print('noise'); print('@@marker@@[1, 2]')"],
        "@@marker@@", timeout_s=60, count_compiles=False, forward_stderr=False)
    assert ok.error is None and ok.payload == [1, 2]


def test_table_from_json(report, capsys):
    _, out = report
    assert step_time.main([f"--table_from={out}"]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | 4 | off | DP-SAT |" in printed


def test_accelerator_script_parses():
    script = REPO_ROOT / "benchmarks" / "accelerator.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
