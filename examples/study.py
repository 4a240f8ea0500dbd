r"""Runs a paired DP-SAT vs DP-SGD study over the binary, resumably, and summarises it.

    python examples/study.py --study_dir=/tmp/study --rhos=0.01,0.03,0.1,0.3 \
        --directions=gradient,momentum --seeds=0,1,2 \
        --output_json=study.json --plot=study.png -- \
        --dataset=fashion_mnist --raw_data_dir=/usr/share/datasets/fashion-mnist \
        --model=tb_cnn --epsilon=2 --epochs=40 --validation_examples=5000

Every flag after `--` goes to examples/train_cifar.py unchanged. For each
seed the runner trains DP-SGD and every (rho, direction) of DP-SAT, with
`--seed` and `--dp_seed` set to that seed: the runs of one seed share their
initialisation, batches and noise draws (common random numbers), so their
paired difference is far less noisy than that of independent runs.

Privacy: common random numbers are an experiment-design tool for public
benchmark data. The DP-SGD and DP-SAT runs of a seed add the same noise, so
the difference of their weights is free of noise: anyone who sees two runs
of a pair can test whether an example was in the training set, without
knowing the seed. Each run alone is (epsilon, delta)-DP only against those
who do not know its `--dp_seed`, which is also its `--seed` (shown in its
directory name and results.json); releasing two runs of a pair is not
covered at all. On private data, publish at most one run of a pair and keep
its seed secret, or train the runs you publish unpaired, with fresh secrets
(train_cifar.py without `--dp_seed`). The runner logs this warning once when
it starts. It refuses `--norecord_train_diagnostics`: the summary reads the
validation accuracy and eigenvalues that the runs record as non-private
diagnostics.

Stop it at any time and run the same command again: finished runs are
skipped, an interrupted one resumes from its last epoch (the binary resumes
bitwise from its `--model_dir`). The summary (JSON, PNG, Markdown table) is
rewritten after every run; `--summarize_only` writes it without training.
"""

import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

try:
    from tf_dpsat.experiments import study
except ImportError:  # Run from a source checkout without `pip install -e .`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_dpsat.experiments import study

BINARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_cifar.py")

_STUDY_DIR = flags.DEFINE_string("study_dir", None, "One sub-directory per run.",
                                 required=True)
_METHOD = flags.DEFINE_enum("method", "dpsat", ["dpsat", "dpsam"],
                            "The method compared with DP-SGD.")
_RHOS = flags.DEFINE_list("rhos", ["0.01", "0.03", "0.1", "0.3"], "Radii rho > 0.")
_DIRECTIONS = flags.DEFINE_list("directions", ["gradient", "momentum"],
                                "DP-SAT ascent directions.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"],
                           "Seeds: --seed and --dp_seed of each pair of runs "
                           "(the runs of a seed share their noise: on private "
                           "data publish at most one of them).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Summary JSON path.")
_PLOT = flags.DEFINE_string("plot", None, "Summary PNG path.")
_TITLE = flags.DEFINE_string("title", "", "Title of the plot.")
_MEASURE_SHARPNESS = flags.DEFINE_integer(
    "measure_sharpness", 0,
    "After each run, measure the top Hessian eigenvalue of its final model on "
    "the first N training examples (sharpness.json; NOT private), also for runs "
    "finished earlier that lack it; 0 measures nothing. For runs trained "
    "without the binary's --sharpness_examples.")
_SUMMARIZE_ONLY = flags.DEFINE_bool("summarize_only", False,
                                    "Summarise the finished runs; train nothing.")


def _summarize(runs):
    summary = study.summarize([r.directory for r in runs])
    if _OUTPUT_JSON.value:
        study.write_json(_OUTPUT_JSON.value, summary)
    if _PLOT.value:
        study.plot(summary, _PLOT.value, title=_TITLE.value)
    return summary


def _measure(run, label):
    if not _MEASURE_SHARPNESS.value or study.has_sharpness(run.directory):
        return
    start = time.monotonic()
    measured = study.measure_sharpness(run.directory, _MEASURE_SHARPNESS.value)
    print(f"{label}: top Hessian eigenvalue {measured['top_hessian_eigenvalue']:.4g} "
          f"({time.monotonic() - start:.0f} s)", flush=True)


def main(argv):
    binary_flags = argv[1:]
    for flag in binary_flags:
        name = flag.lstrip("-").split("=")[0]
        if name in ("method", "rho", "direction", "seed", "dp_seed", "model_dir"):
            raise app.UsageError(f"--{name} is set by the study for each run; "
                                 "remove it from the flags after --.")
        value = flag.split("=", 1)[1].lower() if "=" in flag else ""
        if name == "norecord_train_diagnostics" or (
                name == "record_train_diagnostics" and value in ("false", "f", "0")):
            raise app.UsageError(
                "--norecord_train_diagnostics drops the validation accuracy the "
                "study chooses rho on, and the eigenvalues it compares (both NOT "
                "private); remove it from the flags after --.")
    logging.warning(study.PAIRED_RUNS_WARNING)
    try:
        runs = study.grid(_STUDY_DIR.value, rhos=[float(r) for r in _RHOS.value],
                          directions=_DIRECTIONS.value,
                          seeds=[int(s) for s in _SEEDS.value], method=_METHOD.value)
    except ValueError as error:
        sys.exit(f"error: {error}")
    os.makedirs(_STUDY_DIR.value, exist_ok=True)
    if not _SUMMARIZE_ONLY.value:
        for index, run in enumerate(runs, 1):
            label = f"[{index}/{len(runs)}] {os.path.basename(run.directory)}"
            if study.read_run(run.directory) is not None:
                print(f"{label}: finished earlier", flush=True)
                _measure(run, label)
                continue
            print(f"{label}: training (log: {run.directory}.log)", flush=True)
            start = time.monotonic()
            with open(f"{run.directory}.log", "a") as log:
                code = subprocess.call(
                    [sys.executable, BINARY, *binary_flags, *run.flags(),
                     "--keras_verbose=2"], stdout=log, stderr=subprocess.STDOUT)
            if code != 0:
                sys.exit(f"error: {label} failed (exit {code}); see {run.directory}.log")
            finished = study.read_run(run.directory)
            print(f"{label}: test accuracy {100 * finished['test_accuracy']:.2f}% "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
            _measure(run, label)
            _summarize(runs)
    summary = _summarize(runs)
    print(study.markdown_table(summary))


if __name__ == "__main__":
    app.run(main)
