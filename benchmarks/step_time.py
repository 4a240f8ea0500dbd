r"""Step time and peak memory of tf_dpsat's private training against plain Keras.

What: for each model and batch size, the median wall-clock time of one
training step (``model.train_on_batch``, the Keras path users take) of

  * ``nonprivate``: the same network under plain ``keras.optimizers.SGD`` with
    momentum, the baseline every ratio is taken against;
  * ``dpsgd``: ``tf_dpsat.DPSATKeras(rho=0)``, i.e. DP-SGD;
  * ``dpsat``: ``tf_dpsat.DPSATKeras(rho>0)``, DP-SAT;
  * ``dpsam``: ``tf_dpsat.DPSAMKeras``, two private passes per step;

each with ``jit_compile`` off and on, and the peak resident memory of each
of those in a process of its own.

Why: users choose a DP library by how much slower and hungrier it is than
ordinary training; this harness makes those numbers reproducible.

How it measures:
  * synthetic data of the model's input shape (one fixed batch, a tf.Tensor);
  * every (mode, jit) pair of one model and batch size is built and compiled
    in one process; its first call (tracing, XLA compilation) is timed apart
    and ``--warmup`` more steps are discarded;
  * then ``--rounds`` rounds, each timing ``--steps`` consecutive steps of
    every pair in turn (A B C ... A B C ..., the order rotated every round),
    so that drift of a noisy machine hits all pairs alike;
  * bounds, so that a full run fits on a small machine: after
    ``--min_rounds`` rounds a pair whose timed steps took ``--pair_budget_s``
    sits out the remaining rounds; a pair whose warm-up step takes over
    ``--max_step_s`` is not timed at all (its warm-up time is reported); a
    pair that fails (e.g. out of memory) is reported with its error;
  * the statistic is the median of all timed steps of a pair; the table's
    ratios are paired: per round, a pair's median over the non-private (or
    DP-SGD) median of the same jit setting, then the median over rounds,
    which cancels drift between rounds (the JSON also has the plain ratio
    of overall medians);
  * the train step is traced once; a retrace after warm-up is reported, and
    so are XLA recompilations (counted as files written to a private
    ``--tf_xla_persistent_cache_directory``, set up before TensorFlow is
    imported; a step that recompiles on every call is flagged);
  * memory (by default at the largest batch size, jit off; see
    ``--memory_batch_sizes`` and ``--memory_jit``): one subprocess per pair
    (``--memory_mode``) reports its RSS
    after import + build + compile (the baseline) and its peak RSS over
    ``--memory_steps`` steps. The peak is the kernel's high-water mark of
    the process, the counter behind ``resource.getrusage().ru_maxrss``; on
    Linux it is read from /proc/self/status (VmHWM) after resetting it to
    the baseline, because ``ru_maxrss`` of a spawned child also carries the
    parent's peak across ``exec`` (elsewhere ``ru_maxrss`` is used as is).
    On a GPU the child also reports TensorFlow's peak device allocation.

Run it (from the repository root):

  python -m benchmarks.step_time                       # full default run
  python -m benchmarks.step_time --models=tb_cnn,mlp --batch_sizes=64 \\
      --jit=off --output_json=/tmp/bench.json --plot=/tmp/bench.png
  python -m benchmarks.step_time --clipping=vectorized # a clipping path
  python -m benchmarks.step_time --help

Output: a Markdown table on stdout and a JSON report (``--output_json``,
rewritten after every group so a run cut short keeps its finished rows)
with the environment (versions, CPUs, load, git commit, command line), the
configuration, every step time and the ratios; ``--plot`` adds a PNG.
benchmarks/README.md has a measured table and how to read it.

``--clipping`` is handed to the DP optimizers only when given, and only if
their constructor accepts a ``clipping`` argument (checked with
``inspect.signature``), so the harness runs against old and new versions.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
COUNT_COMPILES_ENV = "STEP_TIME_COUNT_COMPILES"


def _xla_cache_directory() -> Optional[Path]:
    """Points XLA's persistent cache at a fresh folder, to count compilations.

    TensorFlow writes one file there per XLA compilation, so new files while
    steps run mean the step is being recompiled. Must run before TensorFlow
    reads TF_XLA_FLAGS; a user's own cache folder is left alone (no count).
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if (os.environ.get(COUNT_COMPILES_ENV, "1") == "0" or
            "tf_xla_persistent_cache_directory" in flags):
        return None
    path = Path(tempfile.mkdtemp(prefix="step_time_xla_cache_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["TF_XLA_FLAGS"] = (
        f"{flags} --tf_xla_persistent_cache_directory={path}".strip())
    return path


XLA_CACHE = _xla_cache_directory()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

import tf_dpsat  # noqa: E402
from tf_dpsat.experiments import models as dp_models  # noqa: E402

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
MODES: tuple[str, ...] = ("nonprivate", "dpsgd", "dpsat", "dpsam")
DP_MODES: tuple[str, ...] = ("dpsgd", "dpsat", "dpsam")
BASELINE_MODE = "nonprivate"
REFERENCE_DP_MODE = "dpsgd"
MODE_LABELS = {"nonprivate": "non-private", "dpsgd": "DP-SGD",
               "dpsat": "DP-SAT", "dpsam": "DP-SAM"}
JIT_VALUES = {"off": False, "on": True}
MEMORY_MARKER = "@@step_time_memory@@"
GROUP_MARKER = "@@step_time_group@@"
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmarked network."""

    description: str
    input_shape: tuple[int, ...]
    build: Callable[[int], keras.Model]


def _registry_model(name: str, shape: tuple[int, ...]) -> Callable[[int], keras.Model]:
    return lambda seed: dp_models.build_model(name, shape, NUM_CLASSES, seed)


def _tiny_model(seed: int) -> keras.Model:
    return dp_models.mlp((6, 6, 1), NUM_CLASSES, seed, hidden=(8,))


MODEL_SPECS: dict[str, ModelSpec] = {
    "tb_cnn": ModelSpec("Tramer-Boneh tanh CNN, CIFAR-10 variant",
                        (32, 32, 3), _registry_model("tb_cnn", (32, 32, 3))),
    "dpnas": ModelSpec("DPNASNet, CIFAR-10 variant", (32, 32, 3),
                       _registry_model("dpnas_cifar", (32, 32, 3))),
    "dpnas_fmnist": ModelSpec("DPNASNet, Fashion-MNIST variant", (28, 28, 1),
                              _registry_model("dpnas_fmnist", (28, 28, 1))),
    "mlp": ModelSpec("Dense-only MLP 784-256-256-10", (28, 28, 1),
                     _registry_model("mlp", (28, 28, 1))),
    "tiny": ModelSpec("tiny Dense-only MLP 36-8-10 (smoke tests)", (6, 6, 1),
                      _tiny_model),
}
DEFAULT_MODELS: tuple[str, ...] = ("tb_cnn", "dpnas", "dpnas_fmnist", "mlp")


@dataclasses.dataclass
class Config:
    """Everything a run depends on (also written to the JSON)."""

    models: list[str]
    batch_sizes: list[int]
    modes: list[str]
    jit: list[bool]
    rounds: int = 7
    steps: int = 1
    warmup: int = 1
    max_step_s: float = 30.0
    isolate: bool = True
    group_timeout_s: int = 900
    pair_budget_s: float = 20.0
    min_rounds: int = 3
    timing: bool = True
    memory: bool = True
    memory_steps: int = 2
    memory_timeout_s: int = 1200
    # Which rows get a memory subprocess. None: the largest batch size, and
    # jit off if it is timed (a child per pair costs a TF import and a
    # compilation, and XLA's memory on CPU says little about accelerators).
    memory_batch_sizes: Optional[list[int]] = None
    memory_jit: Optional[list[bool]] = None
    clipping: Optional[str] = None
    batch_slices: Optional[int] = None
    # None: the library's default; 0: chunk_units=None (every batch at once).
    chunk_units: Optional[int] = None
    learning_rate: float = 0.05
    momentum: float = 0.9
    l2_norm_clip: float = 1.0
    noise_multiplier: float = 1.0
    rho: float = 0.05
    seed: int = 0
    output_json: Optional[str] = None
    plot: Optional[str] = None


@dataclasses.dataclass
class Trainer:
    """One compiled (model, mode, jit) pair and its fixed batch."""

    model_name: str
    batch_size: int
    mode: str
    jit: bool
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    x: tf.Tensor
    y: tf.Tensor
    traces: list[int]
    first_call_s: float = math.nan
    traces_after_warmup: int = 0
    warmup_s: list[float] = dataclasses.field(default_factory=list)
    times: list[list[float]] = dataclasses.field(default_factory=list)
    last_loss: float = math.nan
    skipped: Optional[str] = None
    compiles_first_call: Optional[int] = None
    compiles_later: Optional[int] = None


# ------------------------------------------------------------------ building


def accepts_keyword(cls: type, name: str) -> bool:
    """Whether `cls(...)` accepts keyword `name`, following **kwargs upwards.

    A class whose ``__init__`` forwards ``**kwargs`` is looked through to its
    bases, as long as they belong to tf_dpsat (Keras' own Optimizer rejects
    unknown keywords).
    """
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if not klass.__module__.startswith("tf_dpsat"):
            return False
        parameters = inspect.signature(klass.__init__).parameters
        if name in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD
                   for p in parameters.values()):
            return False
    return False


def _loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer(mode: str, cfg: Config) -> keras.optimizers.Optimizer:
    """The optimizer of `mode` with the hyperparameters of `cfg`."""
    if mode == BASELINE_MODE:
        return keras.optimizers.SGD(learning_rate=cfg.learning_rate,
                                    momentum=cfg.momentum)
    cls = tf_dpsat.DPSAMKeras if mode == "dpsam" else tf_dpsat.DPSATKeras
    kwargs: dict[str, Any] = dict(
        learning_rate=cfg.learning_rate, momentum=cfg.momentum,
        l2_norm_clip=cfg.l2_norm_clip, noise_multiplier=cfg.noise_multiplier,
        rho=0.0 if mode == "dpsgd" else cfg.rho, seed=cfg.seed)
    for name in ("clipping", "batch_slices"):  # only when given
        value = getattr(cfg, name)
        if value is None:
            continue
        if not accepts_keyword(cls, name):
            raise ValueError(
                f"--{name}={value} was given but this tf_dpsat's "
                f"{cls.__name__} has no `{name}` argument.")
        kwargs[name] = value
    if cfg.chunk_units is not None:
        kwargs["chunk_units"] = cfg.chunk_units or None
    return cls(**kwargs)


def synthetic_batch(shape: tuple[int, ...], batch_size: int,
                    seed: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A fixed batch of N(0, 1) images and uniform labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(batch_size,), dtype=np.int32)
    return tf.constant(x), tf.constant(y)


def _count_traces(model: keras.Model) -> list[int]:
    """Counts how often the train step is traced (Python runs only then)."""
    counter = [0]
    step = model.train_step

    def counted_train_step(data):
        counter[0] += 1
        return step(data)

    model.train_step = counted_train_step
    return counter


def build_trainer(model_name: str, batch_size: int, mode: str, jit: bool,
                  cfg: Config) -> Trainer:
    """Builds and compiles one pair; nothing is run yet."""
    spec = MODEL_SPECS[model_name]
    model = spec.build(cfg.seed)
    if mode != BASELINE_MODE:
        model = tf_dpsat.make_private(model)
    optimizer = make_optimizer(mode, cfg)
    model.compile(optimizer=optimizer, loss=_loss(), jit_compile=jit)
    traces = _count_traces(model)
    x, y = synthetic_batch(spec.input_shape, batch_size, cfg.seed)
    return Trainer(model_name, batch_size, mode, jit, model, optimizer, x, y,
                   traces)


def drain_compile_count() -> Optional[int]:
    """XLA compilations since the last call (None when not counted)."""
    if XLA_CACHE is None:
        return None
    count = 0
    for entry in XLA_CACHE.iterdir():
        entry.unlink(missing_ok=True)
        count += 1
    return count


def _add_compiles(total: Optional[int], new: Optional[int]) -> Optional[int]:
    return None if total is None or new is None else total + new


def run_steps(trainer: Trainer, steps: int) -> list[float]:
    """Runs `steps` training steps; returns each step's wall-clock seconds.

    `train_on_batch` returns Python floats, so each call waits for its step.
    """
    times = []
    logs: dict[str, float] = {}
    for _ in range(steps):
        start = time.perf_counter()
        logs = trainer.model.train_on_batch(trainer.x, trainer.y,
                                            return_dict=True)
        times.append(time.perf_counter() - start)
    if logs:
        trainer.last_loss = float(logs.get("loss", math.nan))
    return times


# ------------------------------------------------------------------- timing


def _groups(cfg: Config) -> list[tuple[str, int, bool]]:
    """(model, batch size, jit): each is timed on its own, modes interleaved.

    Ratios compare modes of one jit setting only, so the two settings need
    not share a process; apart, a group holds half the memory.
    """
    return [(m, b, j) for m in cfg.models for b in cfg.batch_sizes
            for j in cfg.jit]


def run_counted_steps(trainer: Trainer, steps: int) -> list[float]:
    """`run_steps`, adding the XLA compilations it caused to the trainer."""
    drain_compile_count()
    times = run_steps(trainer, steps)
    trainer.compiles_later = _add_compiles(trainer.compiles_later,
                                           drain_compile_count())
    return times


def warm_up(trainer: Trainer, warmup: int, max_step_s: float) -> None:
    """Times the first (tracing/compiling) call, then `warmup` untimed steps.

    A pair whose warm-up step takes longer than `max_step_s`, or whose step
    XLA compiles again on every call, is marked skipped and left out of the
    timed rounds (and of the memory runs), so that a pathological pair
    cannot stall the whole run.
    """
    drain_compile_count()
    trainer.first_call_s = run_steps(trainer, 1)[0]
    trainer.compiles_first_call = drain_compile_count()
    if trainer.model.jit_compile and not trainer.compiles_first_call:
        trainer.compiles_first_call = None  # The counter is not working.
    trainer.compiles_later = None if trainer.compiles_first_call is None else 0
    for _ in range(warmup):
        trainer.warmup_s.extend(run_counted_steps(trainer, 1))
        if trainer.warmup_s[-1] > max_step_s:
            trainer.skipped = (f"a warm-up step took {trainer.warmup_s[-1]:.1f} s"
                               f" > --max_step_s={max_step_s:g}")
            logging.warning("%s %s jit=%s: %s; not timed", trainer.model_name,
                            trainer.mode, trainer.jit, trainer.skipped)
            break
    if trainer.skipped is None and _recompiled_each_call(trainer):
        trainer.warmup_s.extend(run_counted_steps(trainer, 1))  # Make sure.
        if _recompiled_each_call(trainer):
            trainer.skipped = (f"XLA compiled the step again on each of "
                               f"{len(trainer.warmup_s)} calls after the first")
            logging.warning("%s %s jit=%s: %s; not timed", trainer.model_name,
                            trainer.mode, trainer.jit, trainer.skipped)
    trainer.traces_after_warmup = trainer.traces[0]


def _recompiled_each_call(trainer: Trainer) -> bool:
    later = trainer.compiles_later
    return bool(later and trainer.warmup_s and later >= len(trainer.warmup_s))


def _keeps_timing(trainer: Trainer, cfg: Config) -> bool:
    """Whether a pair takes part in the next round.

    Every timed pair gets at least `min_rounds` rounds; after that a pair
    whose timed steps used up `pair_budget_s` sits the remaining rounds out
    (its paired ratios then use the rounds it took part in).
    """
    if trainer.skipped is not None:
        return False
    if len(trainer.times) < cfg.min_rounds:
        return True
    return sum(map(sum, trainer.times)) < cfg.pair_budget_s


def _describe(error: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"[:300]


def _prepare(model_name: str, batch_size: int, mode: str, jit: bool,
             cfg: Config) -> "Trainer | dict[str, Any]":
    """A warmed-up trainer, or a result row saying why there is none."""
    logging.info("build + warm up %s batch=%d jit=%s %s", model_name,
                 batch_size, jit, mode)
    try:
        trainer = build_trainer(model_name, batch_size, mode, jit, cfg)
        warm_up(trainer, cfg.warmup, cfg.max_step_s)
    except Exception as error:  # pylint: disable=broad-except
        # E.g. out of memory: report it and measure the other pairs.
        logging.error("%s %s jit=%s failed: %s", model_name, mode, jit,
                      _describe(error))
        row = base_row(model_name, batch_size, mode, jit)
        row["error"] = _describe(error)
        return row
    logging.info("  first call %.2f s", trainer.first_call_s)
    return trainer


def _timed_round(trainers: list[Trainer], r: int, cfg: Config) -> None:
    """One round: `cfg.steps` steps of every pair still timed, rotated."""
    timed = [t for t in trainers if _keeps_timing(t, cfg)]
    shift = r % max(len(timed), 1)
    for trainer in timed[shift:] + timed[:shift]:
        try:
            trainer.times.append(run_counted_steps(trainer, cfg.steps))
        except Exception as error:  # pylint: disable=broad-except
            trainer.skipped = f"failed: {_describe(error)}"
            logging.error("%s %s jit=%s: %s", trainer.model_name,
                          trainer.mode, trainer.jit, trainer.skipped)


def time_group(model_name: str, batch_size: int, jit: bool,
               cfg: Config) -> list[dict[str, Any]]:
    """Times every mode of one model, batch size and jit setting, here."""
    prepared = [_prepare(model_name, batch_size, mode, jit, cfg)
                for mode in cfg.modes]
    trainers = [p for p in prepared if isinstance(p, Trainer)]
    for r in range(cfg.rounds):
        _timed_round(trainers, r, cfg)
        logging.info("%s batch=%d jit=%s: round %d/%d done", model_name,
                     batch_size, jit, r + 1, cfg.rounds)
    rows = [_trainer_row(p) if isinstance(p, Trainer) else p
            for p in prepared]
    prepared.clear()
    _release(trainers)
    return rows


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def base_row(model_name: str, batch_size: int, mode: str,
             jit: bool) -> dict[str, Any]:
    """A result row with every key of the schema and nothing measured."""
    spec = MODEL_SPECS[model_name]
    return {
        "model": model_name,
        "model_description": spec.description,
        "input_shape": list(spec.input_shape),
        "parameters": None,
        "batch_size": batch_size,
        "jit": jit,
        "jit_effective": None,
        "mode": mode,
        "optimizer": None,
        "clipping": None,
        "batch_slices": None,
        "chunk_units": None,
        "steps_timed": 0,
        "rounds_timed": 0,
        "median_step_s": math.nan,
        "p25_step_s": math.nan,
        "p75_step_s": math.nan,
        "min_step_s": math.nan,
        "examples_per_s": math.nan,
        "first_call_s": math.nan,
        "warmup_step_s": [],
        "skipped": None,
        "error": None,
        "xla_compiles_first_call": None,
        "xla_compiles_later": None,
        "xla_recompiles_every_step": None,
        "traces": None,
        "retraces_while_timed": None,
        "final_loss": math.nan,
        "round_medians_s": [],
        "step_times_s": [],
        "memory": None,
    }


def _recompiles_every_step(trainer: Trainer) -> Optional[bool]:
    """Whether XLA compiled the step again on (nearly) every later call.

    Python retracing is counted exactly by `traces`; XLA also recompiles a
    traced function, without retracing it, when it must treat an input as a
    compile-time constant. Such a step costs about as much as the first.
    """
    if trainer.compiles_later is None:
        return None
    calls = len(trainer.warmup_s) + sum(map(len, trainer.times))
    return calls > 0 and trainer.compiles_later >= max(calls - 1, 1)


def _trainer_row(trainer: Trainer) -> dict[str, Any]:
    """The measurements of one pair, before ratios are added."""
    flat = [t for round_times in trainer.times for t in round_times]
    retraced = trainer.traces[0] - trainer.traces_after_warmup
    if retraced:
        logging.warning("%s %s jit=%s retraced %d times while timed",
                        trainer.model_name, trainer.mode, trainer.jit, retraced)
    row = base_row(trainer.model_name, trainer.batch_size, trainer.mode,
                   trainer.jit)
    row.update({
        "parameters": int(trainer.model.count_params()),
        "jit_effective": bool(trainer.model.jit_compile),
        "optimizer": type(trainer.optimizer).__name__,
        "clipping": getattr(trainer.optimizer, "clipping", None),
        # What the traced step used (one slice under XLA by default).
        "batch_slices": getattr(trainer.optimizer, "traced_batch_slices",
                                None),
        "chunk_units": getattr(trainer.optimizer, "chunk_units", None),
        "first_call_s": trainer.first_call_s,
        "warmup_step_s": list(trainer.warmup_s),
        "skipped": trainer.skipped,
        "xla_compiles_first_call": trainer.compiles_first_call,
        "xla_compiles_later": trainer.compiles_later,
        "xla_recompiles_every_step": _recompiles_every_step(trainer),
        "traces": trainer.traces[0],
        "retraces_while_timed": retraced,
        "final_loss": trainer.last_loss,
        "round_medians_s": [statistics.median(t) for t in trainer.times if t],
        "step_times_s": flat,
    })
    if flat:
        median = statistics.median(flat)
        row.update({
            "steps_timed": len(flat),
            "rounds_timed": len(trainer.times),
            "median_step_s": median,
            "p25_step_s": _percentile(flat, 25),
            "p75_step_s": _percentile(flat, 75),
            "min_step_s": min(flat),
            "examples_per_s": trainer.batch_size / median,
        })
    return row


def _release(trainers: list[Trainer]) -> None:
    trainers.clear()
    keras.backend.clear_session()
    gc.collect()


# ------------------------------------------------------------------- ratios


def _key(row: dict[str, Any], mode: str) -> tuple:
    return (row["model"], row["batch_size"], row["jit"], mode)


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    if not (numerator and denominator) or not math.isfinite(numerator / denominator):
        return None
    return numerator / denominator


def _paired_ratio(row: dict[str, Any], base: dict[str, Any]) -> Optional[float]:
    pairs = zip(row["round_medians_s"], base["round_medians_s"])
    ratios = [a / b for a, b in pairs if b > 0]
    return statistics.median(ratios) if ratios else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Adds time and memory ratios against non-private and against DP-SGD."""
    by_key = {_key(row, row["mode"]): row for row in rows}
    for row in rows:
        base = by_key.get(_key(row, BASELINE_MODE))
        ref = by_key.get(_key(row, REFERENCE_DP_MODE))
        row["ratio_vs_nonprivate"] = (
            _ratio(row["median_step_s"], base["median_step_s"]) if base else None)
        row["paired_ratio_vs_nonprivate"] = (
            _paired_ratio(row, base) if base else None)
        is_dp = row["mode"] in DP_MODES
        row["ratio_vs_dpsgd"] = (
            _ratio(row["median_step_s"], ref["median_step_s"])
            if ref and is_dp else None)
        row["paired_ratio_vs_dpsgd"] = (
            _paired_ratio(row, ref) if ref and is_dp else None)
        memory, base_memory = row.get("memory"), (base or {}).get("memory")
        if memory and base_memory and "rss_peak_mb" in memory \
                and "rss_peak_mb" in base_memory:
            memory["ratio_vs_nonprivate"] = _ratio(memory["rss_peak_mb"],
                                                   base_memory["rss_peak_mb"])
            memory["step_ratio_vs_nonprivate"] = _ratio(
                memory["rss_step_mb"], base_memory["rss_step_mb"])
            memory["gpu_ratio_vs_nonprivate"] = _ratio(
                memory.get("gpu_peak_mb") or math.nan,
                base_memory.get("gpu_peak_mb") or math.nan)


# ------------------------------------------------------------------- memory


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def ru_maxrss_mb() -> float:
    """`getrusage(RUSAGE_SELF).ru_maxrss` in MiB.

    Linux keeps the maximum across `exec`, so in a subprocess this is at
    least the parent's RSS at the time it spawned the child; the memory
    children therefore read their own address space's counters instead.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_mib = 1024 * 1024 if sys.platform == "darwin" else 1024
    return peak / per_mib


def _proc_status_mb(field: str) -> Optional[float]:
    """`VmRSS` (current) or `VmHWM` (peak) of this process in MiB, if known."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb() -> float:
    value = _proc_status_mb("VmRSS")
    return ru_maxrss_mb() if value is None else value


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS to its current RSS (Linux only)."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> tuple[float, str]:
    """This process's peak RSS in MiB and the counter it came from."""
    value = _proc_status_mb("VmHWM")
    if value is None:
        return ru_maxrss_mb(), "ru_maxrss"
    return value, "VmHWM"


def _reset_gpu_peak() -> Optional[str]:
    """Resets TensorFlow's peak-memory statistic of the first GPU, if any."""
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    tf.config.experimental.reset_memory_stats(gpus[0].name)
    return gpus[0].name


def _gpu_peak_mb(device: Optional[str]) -> Optional[float]:
    """Peak bytes TensorFlow allocated on `device` since the reset, in MiB."""
    if device is None:
        return None
    return tf.config.experimental.get_memory_info(device)["peak"] / 2**20


def measure_memory_here(model_name: str, batch_size: int, jit: bool,
                        mode: str, cfg: Config,
                        rss_after_import_mb: float) -> dict[str, Any]:
    """Runs in the child: peak RSS of a few steps of one pair.

    The baseline is the RSS after import, build and compile; the peak is
    the high-water mark of the steps (the first one traces and, with jit,
    compiles), taken after resetting the counter to the baseline.
    """
    trainer = build_trainer(model_name, batch_size, mode, jit, cfg)
    gc.collect()
    gpu = _reset_gpu_peak()
    baseline = current_rss_mb()
    was_reset = reset_peak_rss()
    run_steps(trainer, cfg.memory_steps)
    peak, counter = peak_rss_mb()
    if not was_reset:
        counter += " (not reset: includes import and build)"
    return {
        "parameters": int(trainer.model.count_params()),
        "gpu_peak_mb": _gpu_peak_mb(gpu),
        "rss_after_import_mb": rss_after_import_mb,
        "rss_baseline_mb": baseline,
        "rss_peak_mb": max(peak, baseline),
        "rss_step_mb": max(peak - baseline, 0.0),
        "peak_counter": counter,
        "ru_maxrss_mb": ru_maxrss_mb(),
        "steps": cfg.memory_steps,
        "final_loss": trainer.last_loss,
    }


def _child_argv(cfg: Config, model_name: str, batch_size: int, jit: bool,
                mode: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.step_time",
            f"--memory_mode={mode}", f"--models={model_name}",
            f"--batch_sizes={batch_size}", f"--jit={'on' if jit else 'off'}",
            f"--memory_steps={cfg.memory_steps}",
            f"--learning_rate={cfg.learning_rate}",
            f"--momentum={cfg.momentum}", f"--l2_norm_clip={cfg.l2_norm_clip}",
            f"--noise_multiplier={cfg.noise_multiplier}", f"--rho={cfg.rho}",
            f"--seed={cfg.seed}"]
    if cfg.clipping is not None:
        argv.append(f"--clipping={cfg.clipping}")
    if cfg.batch_slices is not None:
        argv.append(f"--batch_slices={cfg.batch_slices}")
    if cfg.chunk_units is not None:
        argv.append(f"--chunk_units={cfg.chunk_units or 'none'}")
    return argv


def _child_env(count_compiles: bool) -> dict[str, str]:
    """The environment of a child process.

    This repository importable, and its own XLA compile counter (or none:
    cache files would add to a memory child's RSS).
    """
    env = dict(os.environ)
    env[COUNT_COMPILES_ENV] = "1" if count_compiles else "0"
    if XLA_CACHE is not None:  # The child sets up its own, or none.
        flags = env.get("TF_XLA_FLAGS", "").replace(
            f"--tf_xla_persistent_cache_directory={XLA_CACHE}", "").strip()
        if flags:
            env["TF_XLA_FLAGS"] = flags
        else:
            env.pop("TF_XLA_FLAGS", None)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


@dataclasses.dataclass
class ChildResult:
    """What a child process left: its marked JSON line, or why there is none."""

    payload: Any
    error: Optional[str]


def _exit_reason(code: Optional[int], timeout_s: int) -> str:
    if code is None:
        return f"timed out after {timeout_s} s"
    if code < 0:
        note = " (out of memory?)" if code == -9 else ""
        return f"killed by signal {-code}{note}"
    return f"exit code {code}"


def run_child(argv: list[str], marker: str, timeout_s: int,
              count_compiles: bool, forward_stderr: bool) -> ChildResult:
    """Runs `argv` with a time limit and returns the JSON after `marker`.

    stderr is kept (its tail ends up in the error) and, with
    `forward_stderr`, copied to ours so that progress stays visible.
    """
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT,
                                env=_child_env(count_compiles), stdout=stdout,
                                stderr=subprocess.PIPE, text=True)

        def pump() -> None:
            for line in proc.stderr:
                tail.append(line)
                if forward_stderr:
                    sys.stderr.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: Optional[int] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        reader.join(timeout=10)
        stdout.seek(0)
        lines = stdout.read().splitlines()
    for line in reversed(lines):
        if line.startswith(marker):
            return ChildResult(json.loads(line[len(marker):]), None)
    reason = _exit_reason(code, timeout_s)
    return ChildResult(None, f"{reason}; stderr tail: {''.join(tail)[-1500:]}")


def time_group_isolated(model_name: str, batch_size: int, jit: bool,
                        cfg: Config) -> list[dict[str, Any]]:
    """Runs `time_group` in a fresh process.

    A crash, a kernel OOM kill or a hung compilation then costs only this
    group (reported as errors).
    """
    spec = {"config": dataclasses.asdict(cfg), "model": model_name,
            "batch_size": batch_size, "jit": jit}
    argv = [sys.executable, "-m", "benchmarks.step_time",
            f"--group_spec={json.dumps(spec)}"]
    logging.info("group %s batch=%d jit=%s in a subprocess", model_name,
                 batch_size, jit)
    result = run_child(argv, GROUP_MARKER, cfg.group_timeout_s,
                       count_compiles=True, forward_stderr=True)
    if result.error is None:
        return result.payload
    logging.error("group %s batch=%d jit=%s: %s", model_name, batch_size, jit,
                  result.error.split(";")[0])
    rows = []
    for mode in cfg.modes:
        row = base_row(model_name, batch_size, mode, jit)
        row["error"] = f"group process: {result.error}"
        rows.append(row)
    return rows


def measure_memory(model_name: str, batch_size: int, jit: bool, mode: str,
                   cfg: Config) -> dict[str, Any]:
    """Peak RSS of one pair, measured in a fresh subprocess."""
    argv = _child_argv(cfg, model_name, batch_size, jit, mode)
    logging.info("memory: %s", shlex.join(argv[1:]))
    result = run_child(argv, MEMORY_MARKER, cfg.memory_timeout_s,
                       count_compiles=False, forward_stderr=False)
    return result.payload if result.error is None else {"error": result.error}


def _wants_memory(row: dict[str, Any], cfg: Config) -> bool:
    batches = cfg.memory_batch_sizes or [max(cfg.batch_sizes)]
    jits = cfg.memory_jit or ([False] if False in cfg.jit else cfg.jit)
    return row["batch_size"] in batches and row["jit"] in jits


def add_memory(row: dict[str, Any], cfg: Config) -> None:
    """Measures one row's memory in a subprocess and stores it in the row."""
    reason = row["error"] or row["skipped"]
    if reason:
        row["memory"] = {"error": f"not measured: {reason}"}
        return
    memory = measure_memory(row["model"], row["batch_size"], row["jit"],
                            row["mode"], cfg)
    if row["parameters"] is None and memory.get("parameters") is not None:
        row["parameters"] = memory["parameters"]
    row["memory"] = memory


# ------------------------------------------------------------------- output


def _git_describe() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=30, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    affinity = (len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity") else None)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.step_time",
                               *argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "tf_dpsat": tf_dpsat.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "load_average_start": _load_average(),
        "xla_compile_counting": XLA_CACHE is not None,
        "git": _git_describe(),
    }


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def _step_cell(row: dict[str, Any]) -> str:
    """Median ms/step, or why there is none; flags per-step recompiles."""
    reason = row.get("error") or row.get("skipped") or ""
    failure = reason.removeprefix("failed: ").split(":")[0]
    if row.get("error") or (reason.startswith("failed")
                            and not row["steps_timed"]):
        return f"failed: {failure}"
    if row["steps_timed"]:
        cell = _fmt(1e3 * row["median_step_s"], ".1f")
    elif reason:
        last = (row.get("warmup_step_s") or [math.nan])[-1]
        cell = f"not timed ({_fmt(last, '.1f')} s/step)"
    else:
        return "-"
    if row.get("xla_recompiles_every_step"):
        cell += " (XLA recompiles every step)"
    if reason.startswith("failed"):
        cell += f" (then failed: {failure})"
    return cell


def _spread_cell(row: dict[str, Any]) -> str:
    if not row["steps_timed"]:
        return "-"
    return (f"{_fmt(1e3 * row['p25_step_s'], '.1f')}-"
            f"{_fmt(1e3 * row['p75_step_s'], '.1f')}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows.

    The time ratios are the paired ones (median over rounds of the ratio of
    round medians), which cancel drift of the machine between rounds; the
    JSON also has the plain ratio of the overall medians.
    """
    header = ("| model | batch | jit | mode | ms/step (median) | p25-p75 ms "
              "| examples/s | x non-private | x DP-SGD | first call s "
              "| peak RSS MB | step RSS MB | RSS x non-private |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        memory = row.get("memory") or {}
        lines.append("| " + " | ".join([
            row["model"], str(row["batch_size"]),
            "on" if row["jit"] else "off", MODE_LABELS[row["mode"]],
            _step_cell(row),
            _spread_cell(row),
            _fmt(row["examples_per_s"], ".0f"),
            _fmt(row.get("paired_ratio_vs_nonprivate"), ".2f"),
            _fmt(row.get("paired_ratio_vs_dpsgd"), ".2f"),
            _fmt(row["first_call_s"], ".1f"),
            _fmt(memory.get("rss_peak_mb"), ".0f"),
            _fmt(memory.get("rss_step_mb"), ".0f"),
            _fmt(memory.get("ratio_vs_nonprivate"), ".2f"),
        ]) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(_json_safe(report), indent=1,
                                  allow_nan=False) + "\n")
    os.replace(partial, target)  # A run cut short never leaves half a file.


def write_plot(rows: list[dict[str, Any]], path: str) -> None:
    """A bar chart of step-time ratios vs non-private, one group per setting.

    Missing bars are modes that were not timed or failed (see the table).
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["batch_size"], r["jit"])
                                for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    values = {(r["model"], r["batch_size"], r["jit"], r["mode"]):
              r.get("paired_ratio_vs_nonprivate") or 0.0 for r in rows}
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups)), 4.0))
    for i, mode in enumerate(modes):
        xs = [g + (i - (len(modes) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get((*g, mode), 0.0) for g in groups], width,
               label=MODE_LABELS[mode])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nB={b} xla={'on' if j else 'off'}"
                        for m, b, j in groups], fontsize=8)
    ax.set_ylabel("step time / non-private (paired, log)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- main


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return items
    return parse


def _jit_value(text: str) -> bool:
    if text not in JIT_VALUES:
        raise argparse.ArgumentTypeError(f"jit values are on/off, got {text!r}")
    return JIT_VALUES[text]


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(options)}")
        return text
    return check


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _chunk_units(text: str) -> int:
    # 0 stands for chunk_units=None: no chunks.
    return 0 if text == "none" else _positive_int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step_time",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_csv(_choice(tuple(MODEL_SPECS))),
                   default=list(DEFAULT_MODELS),
                   help=f"comma-separated, of {', '.join(MODEL_SPECS)}")
    p.add_argument("--batch_sizes", type=_csv(_positive_int), default=[64, 256])
    p.add_argument("--modes", type=_csv(_choice(MODES)), default=list(MODES))
    p.add_argument("--jit", type=_csv(_jit_value), default=[False, True],
                   help="comma-separated jit_compile settings: off,on")
    p.add_argument("--rounds", type=_positive_int, default=Config.rounds)
    p.add_argument("--steps", type=_positive_int, default=Config.steps,
                   help="timed steps per pair per round")
    p.add_argument("--warmup", type=int, default=Config.warmup,
                   help="untimed steps after the first call")
    p.add_argument("--max_step_s", type=float, default=Config.max_step_s,
                   help="a pair whose warm-up step takes longer is not timed")
    p.add_argument("--pair_budget_s", type=float, default=Config.pair_budget_s,
                   help="after --min_rounds rounds, a pair whose timed steps "
                        "took this long sits the remaining rounds out")
    p.add_argument("--min_rounds", type=_positive_int, default=Config.min_rounds)
    p.add_argument("--timing", action=argparse.BooleanOptionalAction,
                   default=Config.timing,
                   help="time the steps (--no-timing: memory only)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction,
                   default=Config.memory,
                   help="measure peak RSS, one subprocess per pair")
    p.add_argument("--memory_batch_sizes", type=_csv(_positive_int),
                   default=None, help="measure memory at these batch sizes "
                   "(default: the largest of --batch_sizes)")
    p.add_argument("--memory_jit", type=_csv(_jit_value), default=None,
                   help="measure memory with these jit settings (default: "
                        "off, or --jit when that has no off)")
    p.add_argument("--memory_steps", type=_positive_int,
                   default=Config.memory_steps)
    p.add_argument("--memory_timeout_s", type=_positive_int,
                   default=Config.memory_timeout_s)
    p.add_argument("--clipping", default=None,
                   help="passed to DPSATKeras/DPSAMKeras as clipping= when "
                        "given (e.g. auto, fast, vectorized)")
    p.add_argument("--batch_slices", type=_positive_int, default=None,
                   help="passed to DPSATKeras/DPSAMKeras as batch_slices= "
                        "when given (default: the library's choice)")
    p.add_argument("--chunk_units", type=_chunk_units, default=None,
                   help="passed to DPSATKeras/DPSAMKeras as chunk_units= when "
                        "given; 'none' clips every batch at once (default: "
                        "the library's choice)")
    p.add_argument("--learning_rate", type=float, default=Config.learning_rate)
    p.add_argument("--momentum", type=float, default=Config.momentum)
    p.add_argument("--l2_norm_clip", type=float, default=Config.l2_norm_clip)
    p.add_argument("--noise_multiplier", type=float,
                   default=Config.noise_multiplier)
    p.add_argument("--rho", type=float, default=Config.rho,
                   help="radius of DP-SAT and DP-SAM (DP-SGD uses 0)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--output_json", default="benchmarks/results/step_time.json")
    p.add_argument("--plot", default=None, help="PNG path for a ratio chart")
    p.add_argument("--table_from", default=None,
                   help="print the table of an earlier JSON report and exit")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction,
                   default=Config.isolate,
                   help="time each (model, batch, jit) group in a subprocess "
                        "of its own (a crash or OOM kill costs that group)")
    p.add_argument("--group_timeout_s", type=_positive_int,
                   default=Config.group_timeout_s,
                   help="time limit of one isolated group")
    p.add_argument("--group_spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory_mode", type=_choice(MODES), default=None,
                   help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields})


def run(cfg: Config, argv: Sequence[str],
        checkpoint: Optional[Callable[[dict[str, Any]], None]] = None
        ) -> dict[str, Any]:
    """Times (and measures the memory of) every pair; returns the report.

    `checkpoint` is called with the report, ratios updated and `complete`
    False, after every model/batch group and every memory subprocess, so a
    run cut short by a time limit still leaves its finished rows.
    """
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    report = {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "environment": environment(argv),
        "config": dataclasses.asdict(cfg),
        "results": rows,
        "group_wall_s": [],
        "memory_wall_s": 0.0,
        "total_runtime_s": 0.0,
    }

    def save() -> None:
        add_ratios(rows)
        report["total_runtime_s"] = time.perf_counter() - start
        report["environment"]["load_average_last"] = _load_average()
        if checkpoint is not None:
            checkpoint(report)

    timer = time_group_isolated if cfg.isolate else time_group
    for model_name, batch_size, jit in _groups(cfg):
        if cfg.timing:
            group_start = time.perf_counter()
            rows.extend(timer(model_name, batch_size, jit, cfg))
            report["group_wall_s"].append(
                {"model": model_name, "batch_size": batch_size, "jit": jit,
                 "wall_s": time.perf_counter() - group_start})
            save()
        else:
            untimed = (base_row(model_name, batch_size, mode, jit)
                       for mode in cfg.modes)
            rows.extend(r for r in untimed if _wants_memory(r, cfg))
    if cfg.memory:
        memory_start = time.perf_counter()
        for row in filter(lambda r: _wants_memory(r, cfg), rows):
            add_memory(row, cfg)
            report["memory_wall_s"] = time.perf_counter() - memory_start
            save()
    report["complete"] = True
    save()
    return report


def _group_main(spec_json: str) -> int:
    """Child of `time_group_isolated`: times one group, prints its rows."""
    spec = json.loads(spec_json)
    cfg = Config(**spec["config"])
    rows = time_group(spec["model"], spec["batch_size"], spec["jit"], cfg)
    print(GROUP_MARKER + json.dumps(_json_safe(rows)), flush=True)
    return 0


def _child_main(args: argparse.Namespace, rss_after_import_mb: float) -> int:
    cfg = config_from_args(args)
    if len(cfg.models) != 1 or len(cfg.batch_sizes) != 1 or len(cfg.jit) != 1:
        print("--memory_mode takes exactly one model, batch size and jit",
              file=sys.stderr)
        return 2
    result = measure_memory_here(cfg.models[0], cfg.batch_sizes[0],
                                 cfg.jit[0], args.memory_mode, cfg,
                                 rss_after_import_mb)
    print(MEMORY_MARKER + json.dumps(_json_safe(result)), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    rss_after_import_mb = current_rss_mb()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.set_verbosity(logging.INFO)
    if args.memory_mode is not None:
        return _child_main(args, rss_after_import_mb)
    if args.group_spec is not None:
        return _group_main(args.group_spec)
    if args.table_from is not None:
        report = json.loads(Path(args.table_from).read_text())
        print(format_table(report["results"]))
        print(f"\n{report['environment']['date_utc']}; "
              f"{report['environment']['command']}")
        return 0
    cfg = config_from_args(args)
    if not (cfg.timing or cfg.memory):
        print("nothing to do: --no-timing and --no-memory", file=sys.stderr)
        return 2
    checkpoint = None
    if cfg.output_json:
        checkpoint = lambda report: write_json(report, cfg.output_json)
    report = run(cfg, argv, checkpoint)
    print(format_table(report["results"]))
    print(f"\ntotal {report['total_runtime_s']:.0f} s; "
          f"{report['environment']['command']}")
    if cfg.output_json:
        logging.info("wrote %s", cfg.output_json)
    if cfg.plot:
        write_plot(report["results"], cfg.plot)
        logging.info("wrote %s", cfg.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
