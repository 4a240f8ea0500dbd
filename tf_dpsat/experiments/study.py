"""A paired study of DP-SAT against DP-SGD: the grid of runs and its summary.

A study is a grid of runs of the binary (`examples/train_cifar.py`): DP-SGD,
and DP-SAT at each radius rho and ascent direction, each at several seeds.
The runs of one seed share `--seed` (initialisation) and `--dp_seed` (batch
sampling and noise): every method sees the same batches and the same noise
draws, so the paired difference DP-SAT - DP-SGD at a seed is free of most of
the seed-to-seed noise (common random numbers), and its spread over seeds
gives a confidence interval.

Privacy (`PAIRED_RUNS_WARNING`, which the runner logs when it starts): common
random numbers are an experiment-design tool for public benchmark data. The
runs of a pair add the same noise, so the difference of their weights is
free of noise, and anyone who sees two runs of a pair can test whether an
example was in the training set without knowing the seed. Each run alone is
(epsilon, delta)-DP only against those who do not know its `--dp_seed`, which
is also its `--seed` (shown in its directory name and results.json);
releasing two runs of a pair is not covered. On private data publish at most
one run of a pair, keeping its seed secret, or train the runs to publish
unpaired, with fresh secrets (the binary without `--dp_seed`).

`grid` lists the runs and their directory names; `summarize` reads the
finished runs' results.json and computes, per cell, mean and standard
deviation of test and validation accuracy and of the top Hessian eigenvalue,
the paired differences against DP-SGD with 95% intervals over seeds, and the
cell chosen on validation accuracy; `plot` draws it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any
from typing import Dict
from typing import List
from typing import NamedTuple
from typing import Optional
from typing import Sequence

from tf_dpsat import validation

__all__ = [
    "BASELINE",
    "Cell",
    "FinalModel",
    "LANDSCAPE_NOTE",
    "PAIRED_RUNS_WARNING",
    "Run",
    "grid",
    "eigenvalue_by_subset",
    "has_sharpness",
    "load_final_model",
    "loss_landscape",
    "markdown_table",
    "measure_sharpness",
    "plot",
    "read_run",
    "summarize",
    "write_json",
]

# The method every DP-SAT cell is paired with.
BASELINE = "dpsgd"
_RESULTS_FILE = "results.json"
SHARPNESS_FILE = "sharpness.json"
LANDSCAPE_NOTE = (
    "NOT private: the mean training loss along random directions, measured on "
    "the first training examples of each run (tf_dpsat.sharpness.loss_slice). "
    "A function of those private examples, without noise: a diagnostic, "
    "outside the (epsilon, delta) guarantee.")
# What the runner logs once when it starts (see the module docstring).
PAIRED_RUNS_WARNING = (
    "Paired runs share their noise: every run of a seed gets --dp_seed=<seed>, "
    "so its DP-SGD and DP-SAT runs draw the same batches and add the same noise "
    "(common random numbers). The difference of their weights is then free of "
    "noise: anyone who sees two runs of a pair can test whether an example was "
    "in the training set, without knowing the seed. Each run alone is (epsilon, "
    "delta)-DP only against those who do not know its --dp_seed, which is also "
    "its --seed (in its directory name and results.json); two runs of a pair "
    "together are not covered. Common random numbers are an experiment-design "
    "tool for public benchmark data. On private data, publish at most one run "
    "of a pair and keep its seed secret, or train the runs you publish unpaired, "
    "with fresh secrets (examples/train_cifar.py without --dp_seed).")


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    """One setting of the grid; DP-SGD has rho 0 and no direction."""

    method: str
    rho: float = 0.0
    direction: Optional[str] = None

    @property
    def name(self) -> str:
        """Directory-name stem, e.g. `dpsat_rho0.03_gradient` or `dpsgd`."""
        if self.method == BASELINE:
            return BASELINE
        return f"{self.method}_rho{self.rho:g}_{self.direction}"

    def flags(self) -> List[str]:
        """The binary's flags of this cell."""
        flags = [f"--method={self.method}"]
        if self.method != BASELINE:
            flags += [f"--rho={self.rho:g}", f"--direction={self.direction}"]
        return flags


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the grid: a cell at a seed, in `directory`."""

    cell: Cell
    seed: int
    directory: str

    def flags(self) -> List[str]:
        """The binary's flags of this run (seed and dp_seed: paired by seed).

        The runs of a seed share their noise: see `PAIRED_RUNS_WARNING`.
        """
        return self.cell.flags() + [f"--seed={self.seed}", f"--dp_seed={self.seed}",
                                    f"--model_dir={self.directory}"]


def grid(study_dir: str, *, rhos: Sequence[float], directions: Sequence[str],
         seeds: Sequence[int], method: str = "dpsat") -> List[Run]:
    """The runs of a study, seed by seed (each seed's runs form one pair set).

    Args:
      study_dir: Directory holding one sub-directory per run.
      rhos: DP-SAT radii (> 0; the baseline is DP-SGD).
      directions: DP-SAT ascent directions ("gradient", "momentum").
      seeds: Seeds; each is both `--seed` and `--dp_seed` of its runs (which
        therefore share their noise: see `PAIRED_RUNS_WARNING`).
      method: The method compared with DP-SGD ("dpsat" or "dpsam").

    Returns:
      For each seed, the DP-SGD run, then one run per (rho, direction).

    Raises:
      UserError: An empty or repeated list entry, or rho <= 0.
    """
    for name, values in (("rhos", rhos), ("directions", directions), ("seeds", seeds)):
        if not values:
            raise validation.UserError(f"Expected at least one value in {name}.")
        if len(set(values)) != len(values):
            raise validation.UserError(f"Expected distinct {name}, got {list(values)}.")
    for rho in rhos:
        validation.check_positive("rho", rho)
    cells = [Cell(BASELINE)] + [Cell(method, float(r), d)
                                for r in rhos for d in directions]
    return [Run(cell, seed, os.path.join(study_dir, f"{cell.name}_s{seed}"))
            for seed in seeds for cell in cells]


def _non_private(results: Dict[str, Any], section: str) -> Optional[Dict[str, Any]]:
    """A section of results.json's non_private_diagnostics.

    results.json of older versions kept "validation" and "sharpness" at the
    top level.
    """
    diagnostics = results.get("non_private_diagnostics") or {}
    return diagnostics.get(section) or results.get(section)


def read_run(directory: str) -> Optional[Dict[str, Any]]:
    """What the summary needs of a finished run; None if it is not finished.

    Returns:
      method, rho, direction, seed, test accuracy (final evaluation),
      validation accuracy (final, or None), epsilon, and the top Hessian
      eigenvalue of `sharpness.json` or of results.json (or None).
    """
    path = os.path.join(directory, _RESULTS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if not results.get("completed"):
        return None
    flags = results["flags"]
    method = flags["method"]
    eigenvalue = None
    sharpness_path = os.path.join(directory, SHARPNESS_FILE)
    if os.path.exists(sharpness_path):
        with open(sharpness_path) as f:
            eigenvalue = json.load(f).get("top_hessian_eigenvalue")
    elif _non_private(results, "sharpness"):
        eigenvalue = _non_private(results, "sharpness").get(
            "final_top_hessian_eigenvalue")
    held_out = _non_private(results, "validation") or {}
    return {
        "cell": (Cell(BASELINE) if method == BASELINE else
                 Cell(method, float(flags["rho"]), flags["direction"])),
        "seed": int(flags["seed"]),
        "test_accuracy": results["private"]["final_test_accuracy"],
        "validation_accuracy": held_out.get("final_accuracy"),
        "epsilon": results["private"]["epsilon"],
        "top_hessian_eigenvalue": eigenvalue,
        "wall_time_s": results.get("wall_time_s"),
    }


def has_sharpness(directory: str) -> bool:
    """Whether a finished run holds a top Hessian eigenvalue."""
    run = read_run(directory)
    return run is not None and run["top_hessian_eigenvalue"] is not None


class FinalModel(NamedTuple):
    """A finished run's last checkpoint and the training examples measured on."""

    model: Any
    x: Any
    y: Any
    checkpoint: str
    eval_batch_size: int


def load_final_model(directory: str, num_examples: int) -> FinalModel:
    """A finished run's final model and its first `num_examples` training examples.

    The examples are those of the binary's `--sharpness_examples`: the first
    `num_examples` training examples after the run's validation split, the
    same in every run of a study. They are private training data: whatever
    is measured on them is a non-private diagnostic.

    Raises:
      UserError: The run is not finished.
    """
    # Imported here: training pulls in TensorFlow, which summaries do not need.
    import keras

    from tf_dpsat.experiments import training

    if read_run(directory) is None:
        raise validation.UserError(f"{directory} holds no finished run.")
    with open(os.path.join(directory, training.STATE_FILE)) as f:
        state = json.load(f)
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    # dp_seed: state.json shows it redacted, and loading data and the model
    # draws neither batches nor noise.
    config = training.TrainConfig(**{k: v for k, v in state["config"].items()
                                     if k in fields} | {"sharpness_examples": num_examples,
                                                        "dp_seed": None})
    dataset, _ = training.split_validation(training.load_data(config),
                                           config.validation_examples)
    x, y = training.sharpness_batch(config, dataset)
    model = keras.models.load_model(os.path.join(directory, state["checkpoint"]))
    return FinalModel(model, x, y, state["checkpoint"], config.eval_batch_size)


def measure_sharpness(directory: str, num_examples: int) -> Dict[str, Any]:
    """Measures a finished run's final top Hessian eigenvalue; writes sharpness.json.

    The same measurement as the binary's `--sharpness_examples`
    (`training.top_eigenvalue` on `load_final_model`'s examples), on the
    run's last checkpoint: for runs that were trained without that flag.

    Args:
      directory: A finished run's `--model_dir`.
      num_examples: Training examples to measure on.

    Returns:
      What sharpness.json holds: the eigenvalue, whether the power iteration
      converged, the number of examples and iterations, and a note that it
      is not private.

    Raises:
      UserError: The run is not finished.
    """
    from tf_dpsat.experiments import training

    final = load_final_model(directory, num_examples)
    result = training.top_eigenvalue(final.model, final.x, final.y,
                                     batch_size=final.eval_batch_size)
    measured = {"top_hessian_eigenvalue": result.eigenvalue,
                "converged": result.converged, "iterations": result.iterations,
                "num_examples": num_examples, "checkpoint": final.checkpoint,
                "note": training.SHARPNESS_NOTE}
    write_json(os.path.join(directory, SHARPNESS_FILE), measured)
    return measured


def eigenvalue_by_subset(directory: str, num_examples: int,
                         subsets: int) -> List[float]:
    """A finished run's final top Hessian eigenvalue on disjoint example sets.

    Subset k holds training examples k * N to (k + 1) * N - 1 in
    `load_final_model`'s order, so subset 0 is what `measure_sharpness`
    measures with the same N. The spread over subsets is how much the
    measurement depends on which examples it sees. Not private.
    """
    from tf_dpsat.experiments import training

    final = load_final_model(directory, num_examples * subsets)
    return [training.top_eigenvalue(
        final.model, final.x[k * num_examples:(k + 1) * num_examples],
        final.y[k * num_examples:(k + 1) * num_examples],
        batch_size=final.eval_batch_size).eigenvalue for k in range(subsets)]


def loss_landscape(directory: str, num_examples: int, radii: Sequence[float],
                   directions: int) -> Dict[str, Any]:
    """The training loss of a finished run's final model along random directions.

    `tf_dpsat.sharpness.loss_slice` along `directions` filter-normalised
    random directions (public seeds 0, 1, ...; the same directions for every
    run of one architecture), on `load_final_model`'s examples: the 1-D
    landscapes of Li et al. (2018). Not private, like the eigenvalue.

    Returns:
      radii, the losses per direction, their mean per radius, the number of
      examples, the checkpoint, and the note that it is not private.
    """
    from tf_dpsat import sharpness

    final = load_final_model(directory, num_examples)
    losses = [sharpness.loss_slice(final.model, final.x, final.y,
                                   loss=final.model.loss, radii=radii, seed=seed,
                                   batch_size=final.eval_batch_size).losses.tolist()
              for seed in range(directions)]
    return {"radii": [float(r) for r in radii], "losses": losses,
            "mean_loss": [statistics.fmean(column) for column in zip(*losses)],
            "num_examples": num_examples, "checkpoint": final.checkpoint,
            "note": LANDSCAPE_NOTE}


def _t_quantile_975(dof: int) -> float:
    # Imported here: scipy is needed only for intervals.
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def _mean_std(values: Sequence[float]) -> Dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def _paired(differences: Sequence[float]) -> Dict[str, Any]:
    """Mean paired difference and its 95% t-interval over seeds."""
    summary = _mean_std(differences)
    n = summary["n"]
    if n > 1:
        half = _t_quantile_975(n - 1) * summary["std"] / math.sqrt(n)
        summary["ci95"] = [summary["mean"] - half, summary["mean"] + half]
    else:
        summary["ci95"] = None
    summary["per_seed"] = list(differences)
    return summary


def summarize(directories: Sequence[str]) -> Dict[str, Any]:
    """Summarises the finished runs among `directories` (others are skipped).

    Returns:
      A JSON-able dict: "cells" (per cell: runs, seeds, test and validation
      accuracy and eigenvalue as mean/std/n, and for DP-SAT cells "paired"
      test- and validation-accuracy differences against DP-SGD at the same
      seeds with 95% intervals), "chosen" (the non-baseline cell with the
      best mean validation accuracy, None without validation), "unfinished"
      (directories without a completed run).

    Raises:
      UserError: Two finished runs share a cell and a seed.
    """
    runs, unfinished = [], []
    for directory in directories:
        run = read_run(directory)
        if run is None:
            unfinished.append(directory)
        else:
            runs.append(dict(run, directory=directory))
    by_cell: Dict[Cell, Dict[int, Dict[str, Any]]] = {}
    for run in runs:
        seeds = by_cell.setdefault(run["cell"], {})
        if run["seed"] in seeds:
            raise validation.UserError(
                f"Two runs of {run['cell'].name} with seed {run['seed']}: "
                f"{seeds[run['seed']]['directory']} and {run['directory']}; "
                "pass each run once.")
        seeds[run["seed"]] = run
    baseline = by_cell.get(Cell(BASELINE), {})
    cells = []
    for cell in sorted(by_cell, key=lambda c: (c.method != BASELINE, c.rho,
                                               c.direction or "")):
        seeds = by_cell[cell]
        entry = {
            "method": cell.method, "rho": cell.rho, "direction": cell.direction,
            "name": cell.name, "seeds": sorted(seeds),
            "test_accuracy": _mean_std([r["test_accuracy"] for r in seeds.values()]),
            "validation_accuracy": _mean_std(
                [r["validation_accuracy"] for r in seeds.values()]),
            "top_hessian_eigenvalue": _mean_std(
                [r["top_hessian_eigenvalue"] for r in seeds.values()]),
            "epsilon": max(r["epsilon"] for r in seeds.values()),
            # Each seed's value, in the order of "seeds": the plot marks them,
            # since the eigenvalue can vary more between seeds than between
            # methods, and only the pairs show the method's effect.
            "by_seed": {key: [seeds[s][key] for s in sorted(seeds)]
                         for key in ("test_accuracy", "top_hessian_eigenvalue")},
        }
        if cell.method != BASELINE:
            common = sorted(set(seeds) & set(baseline))
            entry["paired_seeds"] = common
            for key in ("test_accuracy", "validation_accuracy",
                        "top_hessian_eigenvalue"):
                pairs = [(seeds[s][key], baseline[s][key]) for s in common]
                if all(a is not None and b is not None for a, b in pairs):
                    entry[f"paired_{key}"] = _paired([a - b for a, b in pairs])
        cells.append(entry)
    candidates = [c for c in cells if c["method"] != BASELINE
                  and c["validation_accuracy"]["mean"] is not None]
    chosen = max(candidates, key=lambda c: c["validation_accuracy"]["mean"],
                 default=None)
    return {"cells": cells, "chosen": chosen["name"] if chosen else None,
            "unfinished": unfinished}


def write_json(path: str, summary: Dict[str, Any]) -> None:
    """Writes `summary` atomically (a reader never sees a partial file)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def markdown_table(summary: Dict[str, Any]) -> str:
    """The summary as a Markdown table (accuracies in percent)."""

    def pct(stat):
        if stat["mean"] is None:
            return "-"
        std = f" +- {100 * stat['std']:.2f}" if stat["std"] is not None else ""
        return f"{100 * stat['mean']:.2f}{std}"

    def diff(entry, key, scale=100.0, form="+.2f"):
        paired = entry.get(f"paired_{key}")
        if not paired or paired["mean"] is None:
            return "-"
        low, high = paired["ci95"] or (None, None)
        interval = (f" [{scale * low:{form}}, {scale * high:{form}}]"
                    if paired["ci95"] else "")
        return f"{scale * paired['mean']:{form}}{interval}"

    def eig(entry):
        stat = entry["top_hessian_eigenvalue"]
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:.3g}" + (f" +- {stat['std']:.2g}" if stat["std"] else "")

    lines = ["| cell | seeds | validation acc. (%) | test acc. (%) | "
             "paired test diff. vs DP-SGD (95% CI) | top Hessian eigenvalue | "
             "paired eigenvalue diff. vs DP-SGD (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for entry in summary["cells"]:
        mark = " (chosen)" if entry["name"] == summary["chosen"] else ""
        lines.append(
            f"| {entry['name']}{mark} | {len(entry['seeds'])} | "
            f"{pct(entry['validation_accuracy'])} | {pct(entry['test_accuracy'])} | "
            f"{diff(entry, 'test_accuracy')} | {eig(entry)} | "
            f"{diff(entry, 'top_hessian_eigenvalue', scale=1.0, form='+.3g')} |")
    return "\n".join(lines)


def plot(summary: Dict[str, Any], path: str, title: str = "") -> None:
    """Writes the study's PNG.

    Accuracy against rho per direction (DP-SGD as a band), and the top
    Hessian eigenvalue per cell: mean +- std over seeds as a bar, and each
    seed's value as a marker of its own.
    """
    import matplotlib  # Lazy: only the plot needs it.

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    cells = summary["cells"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    baseline = next((c for c in cells if c["method"] == BASELINE), None)
    styles = {"gradient": ("tab:blue", "o"), "momentum": ("tab:orange", "s")}
    for split, line in (("test_accuracy", "-"), ("validation_accuracy", ":")):
        if baseline and baseline[split]["mean"] is not None:
            mean, std = 100 * baseline[split]["mean"], 100 * (baseline[split]["std"] or 0)
            left.axhline(mean, color="gray", linestyle=line,
                         label=f"DP-SGD ({split.split('_')[0]})")
            left.axhspan(mean - std, mean + std, color="gray", alpha=0.12)
        for direction, (color, marker) in styles.items():
            points = [c for c in cells if c["direction"] == direction
                      and c[split]["mean"] is not None]
            if not points:
                continue
            left.errorbar([c["rho"] for c in points],
                          [100 * c[split]["mean"] for c in points],
                          yerr=[100 * (c[split]["std"] or 0) for c in points],
                          color=color, marker=marker, linestyle=line, capsize=3,
                          label=f"DP-SAT {direction} ({split.split('_')[0]})")
    left.set_xscale("log")
    left.set_xlabel("rho")
    left.set_ylabel("accuracy (%), mean +- std over seeds")
    left.legend(fontsize=7)
    left.set_title("accuracy vs rho")
    measured = [c for c in cells if c["top_hessian_eigenvalue"]["mean"] is not None]
    if measured:
        right.bar(range(len(measured)),
                  [c["top_hessian_eigenvalue"]["mean"] for c in measured],
                  yerr=[c["top_hessian_eigenvalue"]["std"] or 0 for c in measured],
                  color=["gray" if c["method"] == BASELINE else
                         styles.get(c["direction"], ("tab:green", ""))[0]
                         for c in measured], capsize=3, alpha=0.8)
        # One marker per seed, the same on every bar, so a seed's pair reads
        # across the bars.
        markers = "o^sDvP*X"
        seeds = sorted({s for c in measured for s in c["seeds"]})
        for index, seed in enumerate(seeds):
            shift = 0.12 * (index - (len(seeds) - 1) / 2)  # Off the error bar.
            points = [(i + shift, value) for i, c in enumerate(measured)
                      for s, value in zip(c["seeds"],
                                          c["by_seed"]["top_hessian_eigenvalue"])
                      if s == seed and value is not None]
            if points:
                right.scatter(*zip(*points), marker=markers[index % len(markers)],
                              color="black", s=18, zorder=3, label=f"seed {seed}")
        right.legend(fontsize=7)
        right.set_xticks(range(len(measured)))
        right.set_xticklabels([c["name"].replace("_", "\n") for c in measured],
                              fontsize=7)
        right.set_ylabel("top Hessian eigenvalue (final weights)")
    else:
        right.text(0.5, 0.5, "no sharpness measured", ha="center", va="center",
                   transform=right.transAxes)
    right.set_title("sharpness")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
