"""Compares finished training runs: per-method means over seeds, a table, a plot.

Each run is a `--model_dir` written by `tf_dpsat.experiments.training.train` (or
`examples/train_cifar.py`), holding `results.json`. Runs are grouped by
method; runs of one method that differ only in their seed are repeats, and
the summary gives the mean, standard deviation and range of their test
accuracy. Runs that differ in anything else that changes training (dataset,
model, epsilon, batch size, ...) are refused: their mean would compare
different experiments.
"""

import json
import math
import os
import statistics
from typing import Any
from typing import Dict
from typing import List
from typing import Sequence

from tf_dpsat.experiments import training

# Flags that do not change what is trained (those a resumed run may change,
# and the seeds): they may differ between repeats.
_NON_TRAINING_FLAGS = training.RESUMABLE_FIELDS | {"seed", "dp_seed"}
# Flags that name the method being compared; they label groups.
_METHOD_FLAGS = ("method", "rho", "direction")
# Flags without effect on non-private training.
_PRIVACY_FLAGS = frozenset({
    "epsilon", "delta", "noise_multiplier", "l2_norm_clip", "rho", "direction"})


def load_run(model_dir: str) -> Dict[str, Any]:
    """Reads `results.json` of a finished run.

    Args:
      model_dir: the run's `--model_dir`.

    Returns:
      The parsed results.

    Raises:
      FileNotFoundError: without `results.json`.
      ValueError: for a run that has not finished (its numbers would bias a
        comparison).
    """
    path = os.path.join(model_dir, training.RESULTS_FILE)
    with open(path) as f:
        results = json.load(f)
    if not results.get("completed"):
        raise ValueError(
            f"{model_dir}: the run stopped after epoch "
            f"{results.get('epochs_completed')} of {results['flags']['epochs']}; "
            "rerun its command with the same --model_dir to finish it first.")
    return results


def _label(flags: Dict[str, Any], varying: Sequence[str]) -> str:
    parts = [flags["method"]]
    if flags["method"] != "nonprivate":
        parts += [f"{name}={flags[name]}" for name in varying]
    return " ".join(parts)


def _check_same_experiment(runs: Sequence[Dict[str, Any]], dirs: Sequence[str]):
    """Raises ValueError when runs differ in a flag that changes training."""
    reference = runs[0]["flags"]
    for run, model_dir in zip(runs[1:], dirs[1:]):
        flags = run["flags"]
        ignored = set(_NON_TRAINING_FLAGS) | set(_METHOD_FLAGS)
        if "nonprivate" in (flags["method"], reference["method"]):
            ignored |= _PRIVACY_FLAGS
        differing = sorted(k for k in set(flags) | set(reference)
                           if k not in ignored and flags.get(k) != reference.get(k))
        if differing:
            details = ", ".join(f"{k}={reference.get(k)!r} in {dirs[0]} but "
                                f"{flags.get(k)!r}" for k in differing)
            raise ValueError(f"{model_dir} is a different experiment: {details}. "
                             "Compare runs that differ only in method and seed.")


def _stats(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize_runs(model_dirs: Sequence[str]) -> Dict[str, Any]:
    """Groups finished runs by method and summarises their test accuracy.

    Args:
      model_dirs: `--model_dir`s of finished runs of one experiment.

    Returns:
      A JSON-serialisable dict: "experiment" (the shared flags), "runs" (one
      entry per run: directory, method label, seed, final and best test
      accuracy, epsilon, total delta, sigma, steps, wall time; only the
      private outputs of each results.json, never its non-private
      diagnostics) and "methods" (per label:
      number of runs, seeds, and mean/std/min/max of final and best test
      accuracy; std is the sample standard deviation, 0 for a single run).

    Raises:
      ValueError: no runs, an unfinished run, a repeated seed within a method,
        or runs of different experiments.
    """
    if not model_dirs:
        raise ValueError("Expected at least one run directory.")
    dirs = list(model_dirs)
    runs = [load_run(d) for d in dirs]
    _check_same_experiment(runs, dirs)
    private = [r["flags"] for r in runs if r["flags"]["method"] != "nonprivate"]
    varying = [name for name in _METHOD_FLAGS[1:]
               if len({f[name] for f in private}) > 1]
    entries = []
    for model_dir, run in zip(dirs, runs):
        flags, private = run["flags"], run["private"]
        entries.append({
            "model_dir": model_dir,
            "method": _label(flags, varying),
            "seed": flags["seed"],
            "final_test_accuracy": private["final_test_accuracy"],
            "best_test_accuracy": private["best_test_accuracy"],
            "epsilon": private["epsilon"],
            "delta": private["delta"],
            "noise_multiplier": run["noise_multiplier"],
            "steps": run["steps"],
            "wall_time_s": run["wall_time_s"],
            "history": [{"epoch": h["epoch"], "test_accuracy": h["test_accuracy"]}
                        for h in private["history"]
                        if h.get("test_accuracy") is not None],
        })
    methods = {}
    for label in dict.fromkeys(e["method"] for e in entries):
        group = [e for e in entries if e["method"] == label]
        seeds = [e["seed"] for e in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"Method {label!r} has repeated seeds {seeds}: "
                             "the same run was given twice?")
        methods[label] = {
            "runs": len(group), "seeds": seeds,
            "final_test_accuracy": _stats([e["final_test_accuracy"] for e in group]),
            "best_test_accuracy": _stats([e["best_test_accuracy"] for e in group]),
            "epsilon": max(e["epsilon"] for e in group),
        }
    experiment = {k: v for k, v in runs[0]["flags"].items()
                  if k not in _NON_TRAINING_FLAGS and k not in _METHOD_FLAGS}
    return {"experiment": experiment, "runs": entries, "methods": methods}


def markdown_table(summary: Dict[str, Any]) -> str:
    """One row per method: runs, final test accuracy mean +- std and range."""
    lines = ["| method | runs (seeds) | final test accuracy, mean +- std | range | "
             "best test accuracy, mean | epsilon |",
             "|---|---|---|---|---|---|"]
    for label, m in summary["methods"].items():
        final, best = m["final_test_accuracy"], m["best_test_accuracy"]
        eps = "inf" if not math.isfinite(m["epsilon"]) else f"{m['epsilon']:.3f}"
        lines.append(
            f"| {label} | {m['runs']} ({', '.join(map(str, m['seeds']))}) | "
            f"{100 * final['mean']:.2f}% +- {100 * final['std']:.2f} | "
            f"{100 * final['min']:.2f}-{100 * final['max']:.2f}% | "
            f"{100 * best['mean']:.2f}% | {eps} |")
    return "\n".join(lines)


def plot_summary(summary: Dict[str, Any], path: str) -> None:
    """Test accuracy per epoch: each method's mean over seeds and its range."""
    import matplotlib  # Lazy: only needed for the plot.

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in summary["methods"]:
        histories = [r["history"] for r in summary["runs"] if r["method"] == label]
        epochs = sorted(set.intersection(*(
            {h["epoch"] for h in history} for history in histories)))
        by_epoch = [[100 * next(h["test_accuracy"] for h in history
                                if h["epoch"] == epoch) for history in histories]
                    for epoch in epochs]
        line, = ax.plot(epochs, [statistics.fmean(v) for v in by_epoch],
                        label=f"{label} ({len(histories)} runs)")
        ax.fill_between(epochs, [min(v) for v in by_epoch],
                        [max(v) for v in by_epoch], color=line.get_color(),
                        alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
