r"""Plots the training loss of finished runs' final models along random directions.

    python examples/loss_landscape.py \
        --run_dirs=/tmp/study/dpsgd_s0,/tmp/study/dpsat_rho0.03_gradient_s0 \
        --num_examples=10000 --directions=3 \
        --output_json=landscape.json --plot=landscape.png

For each run (a finished `--model_dir` of examples/train_cifar.py), the mean
training loss at w + alpha * d for each alpha in `--radii`, along
`--directions` filter-normalised random directions d (Li et al. 2018; public
seeds 0, 1, ..., so runs of one architecture share their directions). A flat
minimum keeps a low loss further from alpha = 0.

NOT private: the losses are functions of the first `--num_examples` training
examples of each run, without noise. They are diagnostics outside the
(epsilon, delta) guarantee; do not publish them as private results.
"""

import json
import os
import sys

from absl import app
from absl import flags

try:
    from tf_dpsat.experiments import study
except ImportError:  # Run from a source checkout without `pip install -e .`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_dpsat.experiments import study

_RUN_DIRS = flags.DEFINE_list("run_dirs", None, "Finished runs' --model_dir.",
                              required=True)
_LABELS = flags.DEFINE_list("labels", None,
                            "Legend labels, one per run (default: directory names).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 10000,
                                     "Training examples to evaluate the loss on.")
_RADII = flags.DEFINE_list("radii", [f"{r / 10:g}" for r in range(-10, 11)],
                           "The values of alpha.")
_DIRECTIONS = flags.DEFINE_integer("directions", 3, "Random directions per run.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Output JSON path.")
_PLOT = flags.DEFINE_string("plot", None, "Output PNG path.")


def _plot(landscapes, path):
    import matplotlib  # Lazy: only the plot needs it.

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.2))
    for label, landscape in landscapes.items():
        radii = landscape["radii"]
        line, = axis.plot(radii, landscape["mean_loss"], label=label)
        axis.fill_between(radii, [min(c) for c in zip(*landscape["losses"])],
                          [max(c) for c in zip(*landscape["losses"])],
                          color=line.get_color(), alpha=0.15)
    axis.set_xlabel("alpha (filter-normalised direction)")
    axis.set_ylabel("training loss (mean; band: min-max over directions)")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.set_title("loss along random directions (NOT private)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    labels = _LABELS.value or [os.path.basename(d.rstrip("/")) for d in _RUN_DIRS.value]
    if len(labels) != len(_RUN_DIRS.value):
        raise app.UsageError(f"Expected one label per run: {len(_RUN_DIRS.value)} "
                             f"runs, {len(labels)} labels.")
    radii = [float(r) for r in _RADII.value]
    landscapes = {}
    for label, directory in zip(labels, _RUN_DIRS.value):
        landscapes[label] = study.loss_landscape(directory, _NUM_EXAMPLES.value,
                                                 radii, _DIRECTIONS.value)
        mean = landscapes[label]["mean_loss"]
        print(f"{label}: loss {mean[len(mean) // 2]:.4g} at alpha "
              f"{radii[len(radii) // 2]:g}, {mean[0]:.4g} at {radii[0]:g}, "
              f"{mean[-1]:.4g} at {radii[-1]:g}", flush=True)
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump({"runs": dict(zip(labels, _RUN_DIRS.value)),
                       "landscapes": landscapes, "note": study.LANDSCAPE_NOTE},
                      f, indent=1, sort_keys=True)
            f.write("\n")
    if _PLOT.value:
        _plot(landscapes, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
