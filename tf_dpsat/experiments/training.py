"""The training library behind `examples/train_cifar.py`: one call, one run.

What: `train(TrainConfig(...))` loads a dataset, builds a model, calibrates the
noise multiplier to a privacy budget, trains with DP-SAT (or DP-SGD, DP-SAM,
or without privacy), evaluates, checkpoints every epoch and writes
`results.json`, TensorBoard logs and a plot into `model_dir`. Rerunning with
the same `model_dir` resumes where the last run stopped.

Why a library: the command line binary is a thin absl main over
`define_flags` / `config_from_flags` / `train`, so tests (and notebooks) run
exactly the code the binary runs.

Sampling and accounting:
  * `sampling="poisson"` (default): every logical step includes each of the N
    training examples independently with probability q = batch_size / N, for
    round(N / batch_size) steps per epoch. Batches are padded with zero-weight
    rows to one static size (`tf_dpsat.sampling.padded_batch_size`, chosen so that
    any overflow during the whole run has probability <= 1e-3 * delta; an
    overflow raises, it never drops an example, and its probability is added to
    the reported delta), and the optimizer divides by the expected batch size.
    The Poisson-subsampled Gaussian analysis applies, add/remove-one adjacency.
  * `sampling="shuffle"`: fixed-size batches from a shuffled pass per epoch
    (floor(N / batch_size) steps, the remainder dropped). Only the "each example
    once per epoch" analysis (no amplification by sampling) is proven for it,
    under replace-one adjacency (sensitivity 2C), so sigma is calibrated to that
    analysis, which needs far more noise.

Secrets:
  `--seed` seeds the weight initialisation only: it is data-independent and may
  be published. The batch sampling (and shuffle order) and the noise come from a
  secret drawn per run from OS entropy. With a `model_dir` it is kept in
  `model_dir/PRIVATE-dp-secret.key` (mode 0600, created atomically, read on
  resume; never publish it) and in memory only otherwise. No checkpoint,
  state.json, results.json, log or TensorBoard file holds it, so a released run
  cannot be replayed on a neighbouring dataset. `--dp_seed=N` opts into
  reproducible sampling and noise derived from N; the guarantee then holds only
  against those who do not know N, and runs that share N share their noise
  (release at most one of them). N takes the secret's place in the PRIVATE
  file (state.json and results.json only say that a dp_seed was set), where a
  resumed run checks that its --dp_seed is the run's: a model_dir always holds
  exactly one PRIVATE file, with what the guarantee depends on.

  Epoch e always consumes logical steps [e * S, (e + 1) * S) of one sample
  sequence keyed by the secret, so a resumed run sees exactly the batches an
  uninterrupted run sees, and, with the optimizer state restored from the
  checkpoint and the noise key from the secret, ends with bitwise the same
  weights and the same epsilon.

Outputs:
  results.json keeps the DP outputs (model, test metrics, epsilon, delta and its
  parts) in its "private" section, apart from "non_private_diagnostics": the
  training-batch loss and accuracy, `grad_norm_clipped_fraction` and
  `nonfinite_gradients`, exact functions of the private batches without any
  guarantee, and the accuracy on held-out training examples
  (`--validation_examples`) and the top Hessian eigenvalue
  (`--sharpness_examples`), functions of private examples outside the
  accounted training set or without noise. All of them, and any other metric
  the training step reports, show as "not_private/<name>" in the epoch log,
  the progress bar and TensorBoard (tag "epoch_not_private/loss"); epsilon and
  the test metrics keep their names. `--norecord_train_diagnostics` keeps all
  of them out of results.json, TensorBoard and the printed per-epoch log
  (and skips the validation and sharpness measurements).
  Keras callbacks that monitor the training loss or accuracy
  (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint(save_best_only=True))
  steer training with un-noised statistics of the private data, which is
  outside the (epsilon, delta) guarantee: never use them on private data, or
  let them monitor only quantities the guarantee covers (epsilon, metrics on
  public data).

  `physical_batch_size` bounds memory: each (padded) logical batch is cut, in
  order, into k = padded / physical physical batches that the optimizer
  accumulates into one noisy step (`gradient_accumulation_steps=k`).

Distribution:
  `distribution` "mirrored" (local GPUs), "multi_worker" (the `TF_CONFIG`
  cluster) or "tpu" trains with `tf_dpsat.distributed.fit`: every worker
  draws the same global batches from the run's secret (the chief's, sent to
  the others at start-up) and each of the R replicas takes a contiguous 1/R
  of every physical batch (so physical_batch_size counts the rows of one
  pass of all replicas together); each replica adds noise of variance
  sigma^2 C^2 / R, so the step is the one-process step and epsilon is
  unchanged. Only the chief writes to `model_dir`, which every worker reads
  when resuming: on several machines it must be a shared filesystem.
  `jit_compile` applies to Keras's fit (distribution "none") only.

Reference:
  Park, Kim, Choi, Lee. "Differentially Private Sharpness-Aware Training".
  ICML 2023. https://arxiv.org/abs/2306.05651
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import tempfile
import time
from typing import Any
from typing import Dict
from typing import List
from typing import NamedTuple
from typing import Optional
from typing import Sequence
from typing import Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

from tf_dpsat import accounting
from tf_dpsat import distributed
from tf_dpsat import noise
from tf_dpsat import sampling
from tf_dpsat import sharpness
from tf_dpsat import validation
from tf_dpsat.callbacks import SAMPLINGS
from tf_dpsat.callbacks import PrivacyCallback
from tf_dpsat.dp_model import make_private
from tf_dpsat.experiments import datasets as data
from tf_dpsat.experiments import models
from tf_dpsat.optimizer import DIRECTIONS
from tf_dpsat.optimizer import DPSAMKeras
from tf_dpsat.optimizer import DPSATKeras
from tf_dpsat.version import __version__

__all__ = [
    "JIT_CHOICES",
    "METHODS",
    "RunPlan",
    "SAMPLINGS",
    "SECRET_FILE",
    "TrainConfig",
    "build_model",
    "config_from_flags",
    "define_flags",
    "delta_parts",
    "load_data",
    "make_plan",
    "privacy_report",
    "run_secret",
    "split_validation",
    "test_batches",
    "train",
    "train_batches",
    "Validation",
]

METHODS: Tuple[str, ...] = ("dpsat", "dpsgd", "dpsam", "nonprivate")
JIT_CHOICES: Tuple[str, ...] = ("auto", "true", "false")

# Allowed probability that some Poisson batch of the run exceeds the padded
# size, as a fraction of delta: the run would then stop with an error (see
# tf_dpsat.sampling), an event outside the analysis whose probability is added to
# the reported delta (tf_dpsat.accounting.padding_overflow_delta).
OVERFLOW_DELTA_FRACTION = 1e-3

RESULTS_FILE = "results.json"
STATE_FILE = "state.json"
PLOT_FILE = "accuracy_epsilon.png"
TENSORBOARD_DIR = "tensorboard"
_CHECKPOINT_PATTERN = "checkpoint-{:04d}.keras"
# The run's secret (sampling and noise). The name says what it is, so that
# nobody publishes it with the rest of a model_dir by mistake.
SECRET_FILE = "PRIVATE-dp-secret.key"
_SECRET_HEADER = """\
# PRIVATE - NEVER PUBLISH, UPLOAD OR SHARE THIS FILE.
# The secret of this run's batch sampling and differential-privacy noise
# (tf_dpsat.experiments.training). With it and the run's checkpoints anyone can replay the
# sampling and subtract the noise, which voids the privacy guarantee. It is only
# needed to resume the run; delete it once the run is finished.
"""
# With --dp_seed, the file holds the seed instead (one line "dp_seed=N"):
# a resumed run checks its --dp_seed against it, and no other file of the run
# holds the seed.
_DP_SEED_PREFIX = "dp_seed="
_DP_SEED_HEADER = """\
# PRIVATE - NEVER PUBLISH, UPLOAD OR SHARE THIS FILE.
# The --dp_seed of this run (tf_dpsat.experiments.training): its batch sampling and
# differential-privacy noise are derived from it. With it and the run's
# checkpoints anyone can replay the sampling and subtract the noise, which voids
# the privacy guarantee. A resumed run checks its --dp_seed against it; delete
# it once the run is finished (and keep the seed itself as secret as this file).
"""

# Fields that may change between a run and its resumption: they do not change
# what is trained (only where data is read from, how often it is evaluated,
# the compiler, and the console output).
RESUMABLE_FIELDS = frozenset({
    "data_dir", "raw_data_dir", "download", "model_dir", "eval_every",
    "eval_batch_size", "jit_compile", "keras_verbose", "record_train_diagnostics",
    "sharpness_examples",
    # Where the steps run: the same global batches and ledger on any cluster,
    # the noise from the same distribution (only its realisation differs).
    "distribution",
})

# Test-set metrics: post-processing of the private model on public data.
_PRIVATE_METRICS: Tuple[str, ...] = ("test_loss", "test_accuracy")
# Held-out training examples: not private (see _VALIDATION_NOTE).
_VALIDATION_METRICS: Tuple[str, ...] = ("validation_loss", "validation_accuracy")
_PRIVATE_HISTORY_KEYS: Tuple[str, ...] = (
    "epoch", "steps", "epsilon", "wall_time_s") + _PRIVATE_METRICS
_PRIVATE_NOTE = (
    "Covered by the (epsilon, delta) guarantee (none for method=nonprivate): the "
    "model (every checkpoint) and what is computed from it and the test set.")
# What results.json shows for a set --dp_seed.
_REDACTED = "<redacted>"

# Which training examples --validation_examples holds out: a fixed public
# permutation, the same for every run (so runs that differ in method, rho or
# seed are selected on the same examples) and independent of the data.
VALIDATION_SPLIT_SEED = 0
_VALIDATION_NOTE = (
    "NOT private: accuracy and loss on training examples held out of training "
    "(--validation_examples). The model is trained without them, but these "
    "numbers are functions of them, and choosing hyperparameters on them is "
    "outside the (epsilon, delta) guarantee.")

# --sharpness_examples: power iterations per measurement, and the public seed
# of their start vector.
SHARPNESS_ITERATIONS = 20
SHARPNESS_SEED = 0
# Most examples per Hessian-vector product minibatch: DPNASNet's double
# backward pass over the 1000 examples of an evaluation batch outgrew a
# 24 GB machine.
SHARPNESS_BATCH_SIZE = 250
SHARPNESS_METRIC = "top_hessian_eigenvalue"
SHARPNESS_NOTE = (
    "NOT private: the largest eigenvalue of the Hessian of the mean training "
    "loss, measured on the first --sharpness_examples training examples (power "
    "iteration, tf_dpsat.sharpness). A function of those private examples, "
    "without noise: a diagnostic, outside the (epsilon, delta) guarantee.")

# Every non-private number reaches the epoch logs under this prefix: the
# training step's metrics (_TrainingStatistics renames them), the validation
# metrics and the sharpness. It labels them in the epoch line and progress bar
# ("not_private/loss: ...") and in TensorBoard (tag "epoch_not_private/loss"),
# and keeps them from callbacks that monitor a plain "loss". state.json and
# results.json keep the plain names, in non_private_diagnostics.
NOT_PRIVATE_LOG_PREFIX = "not_private/"
# The keys of the epoch logs that the guarantee covers, which the binary's own
# callbacks add: epsilon (from the public plan and the step count) and the
# test metrics (the private model on the public test set).
_RELEASED_LOG_KEYS: Tuple[str, ...] = ("epsilon",) + _PRIVATE_METRICS
# The keys of a history entry that are not training-step metrics: the others
# make up non_private_diagnostics' history in results.json.
_NOT_TRAINING_HISTORY_KEYS: Tuple[str, ...] = (
    _PRIVATE_HISTORY_KEYS + _VALIDATION_METRICS + (SHARPNESS_METRIC,))

# Purposes of the seeds derived from TrainConfig.seed (_SEED_MODEL) and from
# the run's secret (the others).
_SEED_MODEL, _SEED_SAMPLING, _SEED_NOISE = 0, 1, 2
# Seeds and secrets are int64 keys of stateless RNGs.
_SEED_LIMIT = 2**63


# --------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; mirrors the binary's flags.

    The defaults are the DP-SAT authors' CIFAR-10 setup (DPNASNet, epsilon 3,
    30 epochs, expected batch 2000, SGD lr 2 momentum 0.9, C 0.1, rho 0.03).

    Attributes:
      dataset: One of `tf_dpsat.experiments.datasets.DATASETS`.
      model: One of `tf_dpsat.experiments.models.MODEL_NAMES`.
      method: "dpsat", "dpsgd" (DP-SAT with rho = 0), "dpsam" (two noisy
        queries per step) or "nonprivate" (plain SGD, no noise, no clipping).
      epsilon: Target epsilon; sigma is calibrated to reach it after `epochs`
        epochs. Ignored when `noise_multiplier` is given.
      delta: Target delta.
      noise_multiplier: Fixed sigma; None calibrates it from `epsilon`.
      epochs: Number of epochs.
      batch_size: Expected (Poisson) or fixed (shuffle) logical batch size.
      learning_rate: SGD learning rate.
      momentum: SGD momentum.
      l2_norm_clip: Per-example clip norm C.
      rho: DP-SAT / DP-SAM radius (forced to 0 for "dpsgd").
      direction: DP-SAT direction, "gradient" or "momentum" (the authors'
        DPSATMomentum variant).
      sampling: "poisson" or "shuffle" (see the module docstring).
      physical_batch_size: Examples per forward/backward pass; None processes
        a whole (padded) logical batch at once.
      jit_compile: "auto", "true" or "false" (XLA compilation).
      seed: Seed of the weight initialisation only (public).
      dp_seed: None (default) draws the secret of the batch sampling and the
        noise from OS entropy (kept in `model_dir/PRIVATE-dp-secret.key`).
        An int in [0, 2**63) derives them from it instead, for reproducible
        runs: the guarantee then holds only against those who do not know it.
        It is kept in that file instead of the secret (and redacted from
        state.json and results.json); a resumed run must pass the same one.
      eval_every: Evaluate on the test set every this many epochs (and
        always after the last one).
      eval_batch_size: Batch size of evaluation.
      max_train_examples: Use only the first this many training examples
        (smoke runs); accounting uses the truncated size.
      validation_examples: Hold this many training examples out of training
        (a fixed public choice, `VALIDATION_SPLIT_SEED`) and evaluate on them
        at every evaluation, to choose hyperparameters without reading the
        test set. DP training and its accountant see the remaining examples.
        The metrics are NOT private (the guarantee does not cover the
        held-out examples): recorded as a non-private diagnostic, only with
        `record_train_diagnostics`.
      sharpness_examples: At every evaluation, measure the top eigenvalue of
        the Hessian of the training loss on this many training examples
        (the first ones after the validation split: a fixed public choice);
        0 measures nothing. A non-private diagnostic, like the training loss,
        measured only with `record_train_diagnostics`. Under a distribution,
        each worker measures on its own.
      data_dir: tensorflow-datasets directory with a prepared dataset.
      raw_data_dir: Directory with the dataset's original files.
      download: Let tensorflow-datasets download a dataset that is not
        prepared in `data_dir` (only if its host answers within seconds).
      model_dir: Output directory (checkpoints, TensorBoard, results); None
        writes nothing and cannot resume.
      keras_verbose: Keras fit verbosity: 0 silent, 1 progress bar, 2 one
        line per epoch.
      record_train_diagnostics: Record the non-private training diagnostics
        (training-batch loss and accuracy, `grad_norm_clipped_fraction`,
        `nonfinite_gradients`, any other metric of the training step, and
        the metrics of `validation_examples` and `sharpness_examples`) in
        results.json, TensorBoard and the printed per-epoch log, where they
        are labelled "not_private/<name>". They are functions of private
        examples without a guarantee. False leaves them out of every log
        (and measures neither validation nor sharpness).
      distribution: "none" (Keras's fit), "mirrored" (MirroredStrategy over
        this machine's GPUs), "multi_worker" (MultiWorkerMirroredStrategy
        from `TF_CONFIG`) or "tpu" (TPUStrategy, untested); the strategies
        train with `tf_dpsat.distributed.fit`. The global batches,
        the noise's distribution and epsilon do not depend on it (see
        `tf_dpsat.distributed`); only the chief writes to `model_dir`, which
        every worker must reach (a shared filesystem).
    """

    dataset: str = "cifar10"
    model: str = "dpnas"
    method: str = "dpsat"
    epsilon: float = 3.0
    delta: float = 1e-5
    noise_multiplier: Optional[float] = None
    epochs: int = 30
    batch_size: int = 2000
    learning_rate: float = 2.0
    momentum: float = 0.9
    l2_norm_clip: float = 0.1
    rho: float = 0.03
    direction: str = "gradient"
    sampling: str = "poisson"
    physical_batch_size: Optional[int] = None
    jit_compile: str = "auto"
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 1000
    max_train_examples: Optional[int] = None
    validation_examples: int = 0
    sharpness_examples: int = 0
    data_dir: Optional[str] = None
    raw_data_dir: Optional[str] = None
    download: bool = True
    model_dir: Optional[str] = None
    keras_verbose: int = 1
    dp_seed: Optional[int] = None
    record_train_diagnostics: bool = True
    distribution: str = "none"

    def __post_init__(self):
        try:
            self._validate()
        except TypeError as error:  # A config error either way, for the CLI.
            raise validation.UserError(str(error)) from error

    def _validate(self):
        check = validation
        check.check_one_of("dataset", self.dataset, data.DATASETS)
        check.check_one_of("model", self.model, models.MODEL_NAMES)
        check.check_one_of("method", self.method, METHODS)
        check.check_one_of("sampling", self.sampling, SAMPLINGS)
        check.check_one_of("direction", self.direction, DIRECTIONS)
        check.check_one_of("jit_compile", self.jit_compile, JIT_CHOICES)
        check.check_one_of("distribution", self.distribution, distributed.DISTRIBUTIONS)
        check.check_positive("epsilon", self.epsilon)
        check.check_delta(self.delta)
        if self.noise_multiplier is not None:
            check.check_non_negative("noise_multiplier", self.noise_multiplier)
        check.check_positive("learning_rate", self.learning_rate)
        if check.check_non_negative("momentum", self.momentum) > 1:
            raise validation.UserError(f"Expected momentum={self.momentum} <= 1.")
        check.check_positive("l2_norm_clip", self.l2_norm_clip)
        check.check_non_negative("rho", self.rho)
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            check.check_int(name, getattr(self, name))
        check.check_int("validation_examples", self.validation_examples, minimum=0)
        check.check_int("sharpness_examples", self.sharpness_examples, minimum=0)
        for name in ("physical_batch_size", "max_train_examples"):
            check.check_int(name, getattr(self, name), allow_none=True)
        if check.check_int("seed", self.seed, minimum=0) >= _SEED_LIMIT:
            raise validation.UserError(f"Expected seed={self.seed} < 2**63.")
        if self.dp_seed is not None and check.check_int(
                "dp_seed", self.dp_seed, minimum=0) >= _SEED_LIMIT:
            # Not echoed: it seeds the noise.
            raise validation.UserError("Expected dp_seed < 2**63.")
        for name in ("download", "record_train_diagnostics"):
            if not isinstance(getattr(self, name), bool):
                raise validation.UserError(f"Expected {name}={getattr(self, name)!r} to be "
                                 "a bool.")
        if check.check_int("keras_verbose", self.keras_verbose, minimum=0) > 2:
            raise validation.UserError(f"Expected keras_verbose={self.keras_verbose} "
                             "to be 0, 1 or 2.")
        if self.distribution != "none" and self.method == "nonprivate":
            # Keras's own step would average per-replica means of unequally
            # padded shares: not the one-process step; not supported yet.
            raise validation.UserError(
                f"distribution={self.distribution!r} trains the DP methods only; "
                "train method='nonprivate' with distribution='none'.")
        if self.method == "dpsam" and self.rho == 0:
            raise validation.UserError("method='dpsam' needs rho > 0; rho=0 is DP-SGD "
                             "(method='dpsgd'), which spends one query per step.")
        if self.method == "dpsam" and self.direction != "gradient":
            raise validation.UserError("method='dpsam' takes direction='gradient' only: its "
                             "ascent direction is a fresh private gradient.")

    @property
    def private(self) -> bool:
        """Whether the run is differentially private."""
        return self.method != "nonprivate"

    @property
    def effective_rho(self) -> float:
        """The radius actually used: 0 for DP-SGD and non-private SGD."""
        return 0.0 if self.method in ("dpsgd", "nonprivate") else float(self.rho)

    @property
    def queries_per_step(self) -> int:
        """Noisy gradient queries per step: 2 for DP-SAM, else 1."""
        return DPSAMKeras.queries_per_step if self.method == "dpsam" else 1


# --------------------------------------------------------------------------
# Flags.
# --------------------------------------------------------------------------

_FLAG_HELP = {
    "dataset": "Dataset (tensorflow-datasets name; digits = scikit-learn's 8x8 "
               "digits, offline).",
    "model": "Network from tf_dpsat.experiments.models (dpnas picks the CIFAR or FMNIST "
             "variant by input channels).",
    "method": "dpsat; dpsgd (rho = 0); dpsam (two noisy queries per step); "
              "nonprivate (SGD without clipping or noise).",
    "epsilon": "Target epsilon: calibrates the noise multiplier for the whole "
               "run. Ignored if --noise_multiplier is set.",
    "delta": "Target delta.",
    "noise_multiplier": "Fixed noise multiplier; overrides --epsilon.",
    "epochs": "Epochs.",
    "batch_size": "Expected (Poisson) or fixed (shuffle) logical batch size.",
    "learning_rate": "SGD learning rate.",
    "momentum": "SGD momentum.",
    "l2_norm_clip": "Per-example gradient clip norm C.",
    "rho": "DP-SAT / DP-SAM perturbation radius (ignored by dpsgd).",
    "direction": "DP-SAT ascent direction: gradient (DP-SAT) or momentum "
                 "(the authors' DPSATMomentum variant).",
    "sampling": "poisson: each example joins each step with probability "
                "batch_size/N (padded static batches); shuffle: fixed-size "
                "shuffled batches (once-per-epoch accounting).",
    "physical_batch_size": "Examples per forward/backward pass (memory); a "
                           "logical batch becomes several accumulated passes.",
    "jit_compile": "XLA compilation: auto, true or false.",
    "seed": "Seed of the weight initialisation only (public; batch sampling "
            "and noise come from a secret, see --dp_seed).",
    "dp_seed": "Unset (default): batch sampling and noise come from a secret "
               f"drawn from OS entropy, kept in <model_dir>/{SECRET_FILE} "
               "(never publish it). Set: derive them from this number instead "
               "(reproducible; private only against those who do not know it; "
               "kept in that file instead, and a resumed run must pass the same "
               "one; runs sharing it share their noise: release at most one).",
    "record_train_diagnostics": "Record the NOT private numbers in "
                                "results.json (non_private_diagnostics), "
                                "TensorBoard and the epoch log: training-batch "
                                "loss/accuracy, grad_norm_clipped_fraction, "
                                "nonfinite_gradients, and the metrics of "
                                "--validation_examples and --sharpness_examples. "
                                "--norecord_train_diagnostics leaves them all "
                                "out (and measures neither of the last two).",
    "eval_every": "Evaluate on the test set every N epochs (and after the last).",
    "eval_batch_size": "Evaluation batch size.",
    "max_train_examples": "Use only the first N training examples (smoke runs).",
    "sharpness_examples": "At each evaluation, measure the top Hessian "
                          "eigenvalue of the training loss on the first N "
                          "training examples (NOT private, so not with "
                          "--norecord_train_diagnostics; seconds for tb_cnn "
                          "and N=1000, minutes for DPNASNet).",
    "validation_examples": "Hold N training examples out of training (a fixed "
                           "public choice) and report accuracy on them at each "
                           "evaluation (NOT private, so not with "
                           "--norecord_train_diagnostics), to choose "
                           "hyperparameters without the test set; the "
                           "accountant sees the rest.",
    "data_dir": "tensorflow-datasets data directory.",
    "raw_data_dir": "Directory with the original files: MNIST/Fashion-MNIST "
                    "*-ubyte.gz, CIFAR-10 python batches, SVHN *_32x32.mat.",
    "download": "Download and prepare a tensorflow-datasets dataset missing "
                "from --data_dir (fails within seconds without a network).",
    "model_dir": "Output directory: checkpoints, TensorBoard logs, "
                 "results.json, plot. Rerunning with it resumes.",
    "distribution": "none; mirrored (this machine's GPUs); multi_worker "
                    "(MultiWorkerMirroredStrategy over the TF_CONFIG cluster; "
                    "--model_dir on a shared filesystem); tpu (TPUStrategy, "
                    "untested).",
    "keras_verbose": "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line "
                     "per epoch.",
}

_ENUM_FLAGS = {
    "dataset": data.DATASETS,
    "model": models.MODEL_NAMES,
    "method": METHODS,
    "sampling": SAMPLINGS,
    "direction": DIRECTIONS,
    "jit_compile": JIT_CHOICES,
    "distribution": distributed.DISTRIBUTIONS,
}
_FLOAT_FLAGS = ("epsilon", "delta", "noise_multiplier", "learning_rate", "momentum",
                "l2_norm_clip", "rho")
_INT_FLAGS = ("epochs", "batch_size", "physical_batch_size", "seed", "eval_every",
              "eval_batch_size", "max_train_examples", "validation_examples",
              "sharpness_examples",
              "keras_verbose", "dp_seed")
_STRING_FLAGS = ("data_dir", "raw_data_dir", "model_dir")
_BOOL_FLAGS = ("download", "record_train_diagnostics")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per `TrainConfig` field, with its default.

    Args:
      flag_values: Where to define them (a fresh `flags.FlagValues()` in tests).
    """
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        default, help_text = getattr(defaults, name), _FLAG_HELP[name]
        if name in _ENUM_FLAGS:
            flags.DEFINE_enum(name, default, _ENUM_FLAGS[name], help_text,
                              flag_values=flag_values)
        elif name in _FLOAT_FLAGS:
            flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
        elif name in _INT_FLAGS:
            flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
        elif name in _STRING_FLAGS:
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
        elif name in _BOOL_FLAGS:
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        else:  # Guard against a new field without a flag type.
            raise TypeError(f"No flag type for TrainConfig.{name}.")


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
    """Builds a validated `TrainConfig` from parsed flags.

    Raises:
      ValueError: A flag value is out of range (the message names it).
    """
    return TrainConfig(**{f.name: flag_values[f.name].value
                          for f in dataclasses.fields(TrainConfig)})


# --------------------------------------------------------------------------
# The run plan: sampling, accumulation and privacy parameters.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a config means for a training set of a given size.

    Attributes:
      num_examples: Training examples N (after `max_train_examples`).
      steps_per_epoch: Logical (noisy) steps per epoch.
      total_steps: Logical steps of the whole run.
      sampling_probability: q = batch_size / N (Poisson); 1 per epoch (shuffle).
      logical_batch_size: Rows per logical step: the padded size (Poisson) or
        the batch size (shuffle).
      physical_batch_size: Rows per forward/backward pass.
      accumulation_steps: Physical batches per logical step.
      noise_multiplier: sigma per query (None when non-private).
      queries_per_step: Noisy queries per step.
      epsilon: Epsilon after the whole run (inf when non-private).
      privacy_analysis: "poisson", "once_per_epoch" or "none".
      overflow_probability: Bound on the probability that a padded Poisson
        batch of the run overflows (0 for shuffled batches).
    """

    num_examples: int
    steps_per_epoch: int
    total_steps: int
    sampling_probability: float
    logical_batch_size: int
    physical_batch_size: int
    accumulation_steps: int
    noise_multiplier: Optional[float]
    queries_per_step: int
    epsilon: float
    privacy_analysis: str
    overflow_probability: float = 0.0

    @property
    def adjacency(self) -> Optional[str]:
        """The neighbouring relation the guarantee is stated for."""
        return {"poisson": "add/remove-one",
                "once_per_epoch": "replace-one (sensitivity 2C)"}.get(
                    self.privacy_analysis)


def _steps_per_epoch(config: TrainConfig, num_examples: int) -> int:
    if config.sampling == "poisson":
        # round(N / B), half up, at least one step: the accounting tool's rule.
        return accounting.poisson_steps_per_epoch(
            num_examples=num_examples, batch_size=config.batch_size)
    return num_examples // config.batch_size


def _calibrated_sigma(config: TrainConfig, q: float, total_steps: int) -> float:
    if config.sampling == "poisson":
        return accounting.calibrate_noise_multiplier(
            target_epsilon=config.epsilon, sampling_probability=q, steps=total_steps,
            delta=config.delta, queries_per_step=config.queries_per_step)
    # Once per epoch: each epoch is one unsubsampled Gaussian mechanism, under
    # replace-one adjacency (sensitivity 2C).
    return accounting.calibrate_noise_multiplier_once_per_epoch(
        target_epsilon=config.epsilon, epochs=config.epochs, delta=config.delta,
        queries_per_step=config.queries_per_step)


def _planned_epsilon(config: TrainConfig, sigma: float, q: float, total_steps: int) -> float:
    if config.sampling == "poisson":
        return accounting.compute_epsilon(
            noise_multiplier=sigma, sampling_probability=q, steps=total_steps,
            delta=config.delta, queries_per_step=config.queries_per_step)
    return accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=sigma, epochs=config.epochs, delta=config.delta,
        queries_per_step=config.queries_per_step)


def _overflow_probability(config: TrainConfig) -> float:
    """The padding's overflow bound: 0 without padding (shuffle)."""
    return OVERFLOW_DELTA_FRACTION * config.delta if config.sampling == "poisson" else 0.0


def _batch_layout(config: TrainConfig, num_examples: int, total_steps: int) -> Tuple[int, int]:
    """(logical rows per step, physical rows per pass)."""
    physical = config.physical_batch_size
    if config.sampling == "poisson":
        padded = functools.partial(
            sampling.padded_batch_size, config.batch_size, num_examples, total_steps,
            failure_probability=_overflow_probability(config))
        if physical is not None and physical > padded():
            # One pass would hold the whole batch plus extra padding rows.
            raise validation.UserError(
                f"Expected physical_batch_size={physical} <= {padded()} rows, the "
                f"padded Poisson batch for batch_size={config.batch_size}: it "
                "only splits a batch into passes to bound memory. Lower it or "
                "leave it unset.")
        logical = padded(multiple_of=physical or 1)
        return logical, physical or logical
    if physical is not None and config.batch_size % physical:
        raise validation.UserError(
            f"With sampling='shuffle', physical_batch_size={physical} must divide "
            f"batch_size={config.batch_size} (so it is at most batch_size); pick a "
            "divisor or leave it unset.")
    return config.batch_size, physical or config.batch_size


def make_plan(config: TrainConfig, num_examples: int) -> RunPlan:
    """Derives steps, padding, accumulation and sigma for a training set.

    Args:
      config: The run's configuration.
      num_examples: Training-set size N (after `max_train_examples`).

    Returns:
      The `RunPlan`.

    Raises:
      ValueError: batch_size > N, a shuffle epoch with no full batch, a
        physical batch that does not divide the shuffle batch, or DP-SAM with
        gradient accumulation.
    """
    validation.check_int("num_examples", num_examples)
    if config.batch_size > num_examples:
        raise validation.UserError(
            f"Expected batch_size={config.batch_size} <= {num_examples} training "
            "examples; use a smaller --batch_size.")
    steps_per_epoch = _steps_per_epoch(config, num_examples)
    total_steps = steps_per_epoch * config.epochs
    q = config.batch_size / num_examples
    logical, physical = _batch_layout(config, num_examples, total_steps)
    accumulation = logical // physical
    if config.method == "dpsam" and accumulation > 1:
        raise validation.UserError(
            f"method='dpsam' cannot accumulate gradients (its ascent query needs the "
            f"whole logical batch), but physical_batch_size={physical} splits the "
            f"{logical}-row logical batch into {accumulation}. Use a larger "
            "--physical_batch_size or leave it unset.")
    if not config.private:
        return RunPlan(num_examples, steps_per_epoch, total_steps, q, logical,
                       physical, accumulation, None, 1, math.inf, "none")
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = _calibrated_sigma(config, q, total_steps)
    epsilon = _planned_epsilon(config, sigma, q, total_steps)
    analysis = "poisson" if config.sampling == "poisson" else "once_per_epoch"
    return RunPlan(num_examples, steps_per_epoch, total_steps, q, logical, physical,
                   accumulation, float(sigma), config.queries_per_step, epsilon,
                   analysis, _overflow_probability(config))


def delta_parts(config: TrainConfig, plan: RunPlan, num_params: int,
                replicas: int = 1) -> Optional[accounting.DeltaBreakdown]:
    """The run's delta and its parts.

    The accountant's, the noise sampler's tail, the padding's overflow, and
    their total (`tf_dpsat.accounting.delta_breakdown`).

    Args:
      config: The run's configuration.
      plan: Its plan; the extra terms use its whole-run epsilon and steps.
      num_params: Trainable parameters (noise coordinates per query).
      replicas: Replicas that each draw their own share of every query's
        noise (`tf.distribute`; 1 without a strategy).

    Returns:
      The parts and their total; None for non-private runs.
    """
    if not config.private:
        return None
    validation.check_int("replicas", replicas)
    # Each replica draws its own N(0, sigma^2 C^2 / R) for all num_params
    # coordinates (tf_dpsat.noise.normal_samples: ceil(num_params / 2) pairs)
    # from a stream of its own, so the sampler runs R times per query and a
    # step draws R x queries_per_step x num_params normals. Counted as R x
    # queries_per_step draws of num_params, the pairs round up per replica,
    # as they are drawn (num_params x R would round once: up to R / 2 pairs
    # short for an odd num_params).
    return accounting.delta_breakdown(
        epsilon=plan.epsilon, delta=config.delta, steps=plan.total_steps,
        queries_per_step=plan.queries_per_step * replicas, num_params=num_params,
        overflow_probability=plan.overflow_probability)


def privacy_report(config: TrainConfig, plan: RunPlan,
                   num_params: Optional[int] = None, replicas: int = 1) -> str:
    """The privacy statement of a run, saying which analysis applies.

    Args:
      config: The run's configuration.
      plan: Its plan.
      num_params: The model's trainable parameters; given, the report adds the
        run's total delta (`delta_parts`).
      replicas: Replicas that each draw a share of the noise (`delta_parts`).

    Returns:
      Plain text (a one-paragraph statement for non-private runs).
    """
    if not config.private:
        return ("Non-private training (method='nonprivate'): no clipping, no noise, "
                "no privacy guarantee (epsilon = inf).\n")
    # accounting.poisson_steps counts the trainer's steps: the statement's
    # Poisson step count is this run's.
    statement = accounting.privacy_statement(
        num_examples=plan.num_examples, batch_size=config.batch_size,
        noise_multiplier=plan.noise_multiplier, epochs=float(config.epochs),
        delta=config.delta,
        queries_per_step=plan.queries_per_step)
    if config.sampling == "poisson":
        which = (f"This run samples batches by Poisson sampling ({plan.adjacency} "
                 f"adjacency): the (*) value applies; epsilon = {plan.epsilon:.4f} "
                 f"after all {plan.total_steps} steps.")
    else:
        which = (f"This run uses fixed-size shuffled batches ({plan.adjacency} "
                 f"adjacency): only the (**) value is a proven guarantee; epsilon "
                 f"= {plan.epsilon:.4f} after {config.epochs} epochs.")
    if num_params is not None:
        which += ("\nThis run's delta = accountant + noise sampler tail + padding "
                  "overflow = " + accounting.format_delta_breakdown(
                      delta_parts(config, plan, num_params, replicas)) + ".")
    if config.dp_seed is not None:
        which += ("\n--dp_seed is set: the batch sampling and the noise are "
                  "derived from it, so the guarantee holds only against those "
                  "who do not know it. Runs with the same --dp_seed add the same "
                  "noise: releasing more than one of them is not covered.")
    return statement + "\n" + which + "\n"


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def load_data(config: TrainConfig) -> data.Dataset:
    """Loads the configured dataset, truncated to `max_train_examples`.

    Raises:
      tf_dpsat.experiments.datasets.DatasetNotAvailableError: Neither `raw_data_dir` nor a
        prepared tfds dataset, and no download (or its host is unreachable);
        raised within seconds.
      ValueError: `max_train_examples` exceeds the training set.
    """
    dataset = data.load_dataset(config.dataset, data_dir=config.data_dir,
                                raw_data_dir=config.raw_data_dir,
                                download=config.download)
    limit = config.max_train_examples
    if limit is None:
        return dataset
    if limit > len(dataset.train_images):
        raise validation.UserError(f"max_train_examples={limit} exceeds the "
                         f"{len(dataset.train_images)} training examples.")
    logging.info("Using the first %d of %d training examples.", limit,
                 len(dataset.train_images))
    return dataclasses.replace(dataset, train_images=dataset.train_images[:limit],
                               train_labels=dataset.train_labels[:limit])


class Validation(NamedTuple):
    """Training examples held out of training (`--validation_examples`).

    Attributes:
      images: `(V, H, W, C)` uint8 images.
      labels: `(V,)` labels.
    """

    images: np.ndarray
    labels: np.ndarray


def split_validation(dataset: data.Dataset,
                     num_examples: int) -> Tuple[data.Dataset, Optional[Validation]]:
    """Holds `num_examples` training examples out of training.

    The held-out examples are the first `num_examples` of a permutation drawn
    from the public `VALIDATION_SPLIT_SEED`: the choice depends neither on
    the data nor on the run, so every run of a study holds out the same ones.
    The remaining training examples keep their order.

    Args:
      dataset: The (possibly truncated) dataset.
      num_examples: How many to hold out; 0 holds out none.

    Returns:
      The dataset without the held-out examples, and the held-out examples
      (None when `num_examples` is 0).

    Raises:
      UserError: `num_examples` leaves no training example.
    """
    if num_examples == 0:
        return dataset, None
    total = len(dataset.train_images)
    if num_examples >= total:
        raise validation.UserError(
            f"Expected validation_examples={num_examples} < {total}, the number "
            "of training examples: training needs the rest.")
    order = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(total)
    held_out = np.zeros(total, dtype=bool)
    held_out[order[:num_examples]] = True
    train = dataclasses.replace(dataset, train_images=dataset.train_images[~held_out],
                                train_labels=dataset.train_labels[~held_out])
    return train, Validation(dataset.train_images[held_out],
                             dataset.train_labels[held_out])


def _derived_seed(seed: int, purpose: int) -> int:
    """A seed in [0, 2**63) for one purpose, independent across purposes."""
    state = np.random.SeedSequence(seed, spawn_key=(purpose,)).generate_state(
        1, np.uint64)
    return int(state[0] >> np.uint64(1))


# --------------------------------------------------------------------------
# The run's secret: the root of its batch sampling and noise.
# --------------------------------------------------------------------------


class _Secret(NamedTuple):
    """What `SECRET_FILE` holds: the secret, and whether it is a --dp_seed."""

    value: int
    from_dp_seed: bool


def _parse_secret(text: str, path: str) -> _Secret:
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    from_dp_seed = False
    try:
        (value,) = lines
        if value.startswith(_DP_SEED_PREFIX):
            from_dp_seed = True
            secret = int(value[len(_DP_SEED_PREFIX):], 10)
        else:
            secret = int(value, 16)
    except ValueError:
        secret = -1
    if not 0 <= secret < _SEED_LIMIT:
        raise validation.UserError(
            f"{path} is not a secret written by tf_dpsat (expected comment lines "
            "and one hexadecimal number, or dp_seed=<decimal>, below 2**63). "
            "Restore the original file to resume the run, or start it again in a "
            "new --model_dir.")
    return _Secret(secret, from_dp_seed)


def _read_secret_file(path: str) -> _Secret:
    with open(path) as f:
        return _parse_secret(f.read(), path)


def _read_secret(path: str) -> int:
    """The secret (or --dp_seed) that `path` holds."""
    return _read_secret_file(path).value


def _create_secret(path: str, dp_seed: Optional[int] = None) -> _Secret:
    """Creates `path` (mode 0600) unless it exists; reads it.

    It holds `dp_seed` if given, else a fresh secret from OS entropy.

    Atomic: the secret is written and synced under a temporary name, then
    hard-linked to `path`, which fails if another process created it first;
    a reader never sees a partial file, and an existing secret is never
    replaced.
    """
    if dp_seed is None:
        text = f"{_SECRET_HEADER}{noise.secret_key():016x}\n"
    else:
        text = f"{_DP_SEED_HEADER}{_DP_SEED_PREFIX}{dp_seed}\n"
    temporary = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # Another process won the race: use (and check) its secret.
    finally:
        os.remove(temporary)
    return _read_secret_file(path)


def _secret_source_error(model_dir: str, run_used_dp_seed: bool) -> validation.UserError:
    """The error for a resumption that would switch between --dp_seed and OS entropy."""
    if run_used_dp_seed:
        return validation.UserError(
            f"{model_dir!r} holds a run whose batch sampling and noise come from "
            "--dp_seed, and this run has none: it would switch to other batches "
            "and noise. Pass the run's original --dp_seed, or train in a new "
            "--model_dir.")
    return validation.UserError(
        f"{model_dir!r} holds a run whose batch sampling and noise come from a "
        f"secret drawn from OS entropy ({SECRET_FILE}), and this run sets "
        "--dp_seed: it would switch to other batches and noise. Resume it without "
        "--dp_seed, or train in a new --model_dir.")


def _different_dp_seed_error(model_dir: str) -> validation.UserError:
    # Names neither seed: error messages end up in logs.
    return validation.UserError(
        f"--dp_seed differs from the one the run in {model_dir!r} started with: "
        "resuming would switch it to other batches and noise. Pass the run's "
        "original --dp_seed, or train in a new --model_dir.")


def _check_secret(config: TrainConfig, secret: _Secret) -> None:
    """Raises unless `secret` (read from SECRET_FILE) is this config's source."""
    if secret.from_dp_seed != (config.dp_seed is not None):
        raise _secret_source_error(config.model_dir, secret.from_dp_seed)
    if secret.from_dp_seed and secret.value != config.dp_seed:
        raise _different_dp_seed_error(config.model_dir)


def run_secret(config: TrainConfig, resuming: bool = False) -> int:
    """The secret of a run's batch sampling and noise; never log or save it.

    With a `model_dir`, `model_dir/SECRET_FILE` holds it: the secret drawn
    from OS entropy on the first run, or the run's `dp_seed`. A run reads
    it back and refuses to continue with another source (a `dp_seed` where
    the run drew its secret from OS entropy, or the reverse) or another
    `dp_seed`: it would switch to other batches and noise. So that nothing
    published has to hold the seed to check it, `dp_seed` is kept there too,
    and state.json and results.json only say that one was set.

    Args:
      config: The run's configuration.
      resuming: Whether `config.model_dir` holds a started run whose secret
        the file must hold.

    Returns:
      `config.dp_seed` if set, else the secret in `model_dir/SECRET_FILE`,
      created from OS entropy on the first run; without a model_dir,
      `config.dp_seed` or a fresh secret that lives in memory only.

    Raises:
      UserError: A started run whose secret file is missing or corrupt (the
        run cannot resume bitwise without it), or a `dp_seed` that is not
        the one in the secret file.
    """
    if config.model_dir is None:
        return noise.secret_key() if config.dp_seed is None else config.dp_seed
    path = os.path.join(config.model_dir, SECRET_FILE)
    if os.path.exists(path):
        secret = _read_secret_file(path)
    elif resuming:
        raise validation.UserError(
            f"{config.model_dir!r} holds a started run but not its {SECRET_FILE}, "
            "the secret (or --dp_seed) of its batch sampling and noise, so it "
            "cannot resume bitwise. Restore the file, or train in a new "
            "--model_dir.")
    else:
        os.makedirs(config.model_dir, exist_ok=True)
        secret = _create_secret(path, config.dp_seed)
    _check_secret(config, secret)
    return secret.value


def _agreed_secret(config: TrainConfig, strategy: Optional[tf.distribute.Strategy],
                   chief: bool, resuming: bool) -> int:
    """The run's secret on every worker.

    The chief's (`run_secret`), sent to the others by one collective, so that
    they sample the same global batches and key the noise alike. Only the
    chief reads or creates the secret file.
    """
    secret = run_secret(config, resuming=resuming) if chief else 0
    if config.distribution != "multi_worker":
        return secret
    return distributed.agree_on_int(strategy, secret)


def train_batches(config: TrainConfig, plan: RunPlan, images: Any, labels: Any, *,
                  secret: int, start_epoch: int = 0) -> tf.data.Dataset:
    """The physical training batches from `start_epoch` to the end of the run.

    Args:
      config: The run's configuration (dataset name, sampling).
      plan: Its plan.
      images: uint8 training images.
      labels: Training labels.
      secret: The run's secret (`run_secret`): the sampling (Poisson or
        shuffle order) is keyed by it, never by the public `config.seed`.
      start_epoch: First epoch to produce (resuming).

    Returns:
      `(x, y, sample_weight)` batches of static size `plan.physical_batch_size`,
      `plan.accumulation_steps` per logical step, `plan.steps_per_epoch`
      logical steps per epoch. Padding rows have weight 0.
    """
    preprocess = functools.partial(data.normalize, name=config.dataset)
    seed = _derived_seed(secret, _SEED_SAMPLING)
    if config.sampling == "poisson":
        return sampling.poisson_dataset(
            images, labels, expected_batch_size=config.batch_size,
            steps=plan.total_steps, padded_size=plan.logical_batch_size, seed=seed,
            start_step=start_epoch * plan.steps_per_epoch, preprocess=preprocess,
            physical_batches=plan.accumulation_steps)
    epochs = [sampling.shuffle_dataset(images, labels, batch_size=config.batch_size,
                                       seed=seed, epoch=e, preprocess=preprocess,
                                       physical_batches=plan.accumulation_steps)
              for e in range(start_epoch, config.epochs)]
    return functools.reduce(lambda a, b: a.concatenate(b), epochs)


def test_batches(config: TrainConfig, images: Any, labels: Any) -> tf.data.Dataset:
    """Sequential, normalised `(x, y)` batches of the test set."""
    preprocess = functools.partial(data.normalize, name=config.dataset)
    return sampling.test_dataset(images, labels, batch_size=config.eval_batch_size,
                             preprocess=preprocess)


# The name starts with "test_"; stop pytest collecting it if imported.
test_batches.__test__ = False


# --------------------------------------------------------------------------
# Model and optimizer.
# --------------------------------------------------------------------------


def _make_optimizer(config: TrainConfig, plan: RunPlan) -> keras.optimizers.Optimizer:
    if not config.private:
        accumulation = plan.accumulation_steps if plan.accumulation_steps > 1 else None
        return keras.optimizers.SGD(config.learning_rate, momentum=config.momentum,
                                    gradient_accumulation_steps=accumulation)
    cls = DPSAMKeras if config.method == "dpsam" else DPSATKeras
    # seed=None: nothing that get_config() or a checkpoint holds determines
    # the noise; _set_noise_key then sets the key from the run's secret.
    kwargs = dict(l2_norm_clip=config.l2_norm_clip,
                  noise_multiplier=plan.noise_multiplier, rho=config.effective_rho,
                  expected_batch_size=config.batch_size,
                  gradient_accumulation_steps=plan.accumulation_steps, seed=None)
    if config.method != "dpsam":
        kwargs["direction"] = config.direction
    return cls(config.learning_rate, config.momentum, **kwargs)


def _set_noise_key(model: keras.Model, secret: Optional[int]) -> None:
    """Keys the DP optimizer's noise by the run's secret.

    None keeps the optimizer's own fresh OS-entropy key.
    """
    if secret is not None and isinstance(model.optimizer, DPSATKeras):
        model.optimizer.set_noise_key(_derived_seed(secret, _SEED_NOISE))


def _jit(config: TrainConfig):
    return {"auto": "auto", "true": True, "false": False}[config.jit_compile]


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer,
             config: TrainConfig) -> None:
    # mean_with_sample_weight: the reported loss is the mean over the real
    # (weight-1) rows of a padded batch. For one example, as the DP step
    # computes it, it equals the plain loss, so the gradients are unchanged.
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")
    model.compile(optimizer=optimizer, loss=loss,
                  weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                      name="accuracy")],
                  jit_compile=_jit(config))


def build_model(config: TrainConfig, plan: RunPlan, image_shape: Tuple[int, ...],
                num_classes: int, *, secret: Optional[int] = None) -> keras.Model:
    """Builds and compiles the configured network and optimizer.

    Args:
      config: The run's configuration.
      plan: Its plan (sigma, accumulation).
      image_shape: `(H, W, C)`.
      num_classes: Number of classes.
      secret: The run's secret (`run_secret`), which keys the noise; None
        leaves the optimizer's fresh OS-entropy key.

    Returns:
      A compiled model: a DP model with `DPSATKeras`/`DPSAMKeras`, or a plain
      model with `keras.optimizers.SGD` for `method="nonprivate"`.

    Raises:
      ValueError: The network does not accept `image_shape`.
    """
    network = models.build_model(config.model, image_shape, num_classes,
                                 seed=_derived_seed(config.seed, _SEED_MODEL))
    model = make_private(network) if config.private else network
    _compile(model, _make_optimizer(config, plan), config)
    _set_noise_key(model, secret)
    return model


# --------------------------------------------------------------------------
# Run state: checkpoints, state.json, results.json, plot.
# --------------------------------------------------------------------------


def _write_json(path: str, value: Any) -> None:
    """Writes JSON atomically (a reader never sees a half-written file)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def _read_state(model_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    if model_dir is None:
        return None
    path = os.path.join(model_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _published_config(config: TrainConfig) -> Dict[str, Any]:
    """The config as state.json and results.json show it: a set dp_seed redacted."""
    fields = dataclasses.asdict(config)
    if fields["dp_seed"] is not None:  # The noise's seed: in SECRET_FILE only.
        fields["dp_seed"] = _REDACTED
    return fields


def _dp_seed_in_state(state: Dict[str, Any]) -> bool:
    """Whether state.json holds the run's dp_seed in clear.

    Runs started before the seed moved to SECRET_FILE: their state.json
    holds it (and they have no secret file), so it is checked there.
    """
    return isinstance(state["config"].get("dp_seed"), int)


def _check_resumable(config: TrainConfig, state: Dict[str, Any]) -> None:
    # A field added after the run started is absent from its state.json: the
    # run used that field's default.
    saved = {**dataclasses.asdict(TrainConfig()), **state["config"]}
    current = dataclasses.asdict(config)
    # Compared below without showing it: a different dp_seed must be refused,
    # but neither seed may reach an error message (and so a log).
    saved_seed, current_seed = saved.pop("dp_seed"), current.pop("dp_seed")
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
                            for k in changed)
        raise validation.UserError(
            f"model_dir {config.model_dir!r} holds a run with a different "
            f"configuration ({details}); resuming would mix two runs and break the "
            "privacy ledger. Use a new --model_dir, or the original flags.")
    # Whether a dp_seed was set is in state.json ("<redacted>" or, from older
    # versions, the seed); its value is in SECRET_FILE (run_secret checks it).
    if (saved_seed is None) != (current_seed is None):
        raise _secret_source_error(config.model_dir, saved_seed is not None)
    if _dp_seed_in_state(state) and saved_seed != current_seed:
        raise _different_dp_seed_error(config.model_dir)


def _restore(config: TrainConfig, state: Dict[str, Any],
             secret: Optional[int]) -> keras.Model:
    path = os.path.join(config.model_dir, state["checkpoint"])
    restored = keras.models.load_model(path)
    # Recompile (same loss, metrics and jit setting as a fresh run) around the
    # restored optimizer, whose variables hold the step count, momentum and
    # the DP-SAT direction; the noise key is not saved: set it from the secret.
    _compile(restored, restored.optimizer, config)
    _set_noise_key(restored, secret)
    return restored


def _plot_title(config: TrainConfig, plan: RunPlan) -> str:
    """`dataset, model, method: epsilon E` (E planned for the whole run)."""
    budget = (f"epsilon {plan.epsilon:.3g} (delta {config.delta:g})"
              if config.private and math.isfinite(plan.epsilon) else "non-private")
    return f"{config.dataset}, {config.model}, {config.method}: {budget}"


def _accuracy_epsilon_figure(history: Sequence[Dict[str, Any]], title: str,
                             planned_epsilon: Optional[float] = None) -> Any:
    """Test accuracy and spent epsilon per epoch, one figure at any run length.

    Args:
      history: Per-epoch entries with `epoch` (1-based), `test_accuracy`
        (None when not evaluated) and `epsilon` (None or inf when
        non-private).
      title: The figure's title (`_plot_title`).
      planned_epsilon: Epsilon at the end of the run, drawn as a dotted line
        so that a short run shows how much of its budget it spent.

    Returns:
      A `matplotlib.figure.Figure` with an Agg canvas.
    """
    # Lazy: matplotlib is the experiment kit's extra, needed only here.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    sharp = [(h["epoch"], h[SHARPNESS_METRIC]) for h in history
             if h.get(SHARPNESS_METRIC) is not None]
    fig = Figure(figsize=(6.4, 6.4 if sharp else 4.4))
    FigureCanvasAgg(fig)
    if sharp:  # A second panel below, on the same epochs.
        left, lower = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
        lower.plot([e for e, _ in sharp], [v for _, v in sharp], marker="D",
                   color="tab:green", linestyle="-")
        lower.set_ylabel("top Hessian eigenvalue\n(NOT private)")
        lower.set_xlabel("epoch")
    else:
        left = fig.subplots()
    epochs = [h["epoch"] for h in history]
    evaluated = [h for h in history if h.get("test_accuracy") is not None]
    lines = left.plot([h["epoch"] for h in evaluated],
                      [100 * h["test_accuracy"] for h in evaluated],
                      marker="o", linestyle="-", color="tab:blue",
                      label="test accuracy (%)")
    left.set_ylim(0, 100)
    left.set_ylabel("test accuracy (%)", color="tab:blue")
    if not sharp:
        left.set_xlabel("epoch")
    # Whole epochs only, with half an epoch of room so that a run of one or
    # two epochs does not put its points on the frame.
    left.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs:
        left.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    spent = [(h["epoch"], h["epsilon"]) for h in history
             if h.get("epsilon") is not None and math.isfinite(h["epsilon"])]
    if spent:
        right = left.twinx()
        # Hollow squares on a dashed line: visible where the series cross.
        lines += right.plot([e for e, _ in spent], [eps for _, eps in spent],
                            marker="s", markerfacecolor="none", linestyle="--",
                            color="tab:red", label="epsilon spent")
        top = max(eps for _, eps in spent)
        if planned_epsilon is not None and math.isfinite(planned_epsilon):
            lines.append(right.axhline(planned_epsilon, color="tab:red",
                                       linestyle=":", linewidth=1,
                                       label="epsilon planned for the run"))
            top = max(top, planned_epsilon)
        # From 0, so the curve reads as the share of the budget spent.
        right.set_ylim(0, 1.1 * top)
        right.set_ylabel("epsilon", color="tab:red")
    left.set_title(title)
    # Below the axes, where it cannot cover a point.
    fig.legend(handles=lines, loc="lower center", ncol=len(lines),
               frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _plot(path: str, history: List[Dict[str, Any]], title: str,
          planned_epsilon: Optional[float] = None) -> None:
    try:
        figure = _accuracy_epsilon_figure(history, title, planned_epsilon)
    except ImportError as error:  # matplotlib missing: the run still counts.
        logging.warning("No %s: matplotlib is not installed (%s); "
                        'pip install "tf_dpsat[experiments]".', PLOT_FILE, error)
        return
    figure.savefig(path, dpi=100)


class _Evaluate(keras.callbacks.Callback):
    """Adds `<split>_loss` / `<split>_accuracy` to the epoch logs.

    Every `every` epochs and after the last, for each split ("test", and
    "not_private/validation": see NOT_PRIVATE_LOG_PREFIX).
    """

    def __init__(self, splits: Dict[str, tf.data.Dataset], every: int, last_epoch: int,
                 local: bool = False):
        super().__init__()
        self._splits, self._every, self._last = splits, every, last_epoch
        # local: on this worker alone, under a tf.distribute strategy (Keras's
        # evaluate splits batches unevenly and reduces across workers wrongly).
        self._local = local

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self._every and epoch + 1 != self._last:
            return
        for split, batches in self._splits.items():
            result = (distributed.evaluate_locally(self.model, batches)._asdict()
                      if self._local else
                      self.model.evaluate(batches, verbose=0, return_dict=True))
            if logs is not None:
                logs[f"{split}_loss"] = float(result["loss"])
                logs[f"{split}_accuracy"] = float(result["accuracy"])


def sharpness_batch(config: TrainConfig, dataset: data.Dataset) -> Tuple[Any, Any]:
    """The normalised `(x, y)` on which `--sharpness_examples` measures.

    The first `config.sharpness_examples` training examples of `dataset`
    (after the validation split): the same examples at every evaluation and
    in every run of a study.

    Raises:
      UserError: More examples than the training set holds.
    """
    count = config.sharpness_examples
    if count > len(dataset.train_images):
        raise validation.UserError(
            f"Expected sharpness_examples={count} <= {len(dataset.train_images)}, "
            "the number of training examples.")
    x = data.normalize(dataset.train_images[:count], name=config.dataset)
    return x, dataset.train_labels[:count]


def top_eigenvalue(model: keras.Model, x: Any, y: Any,
                   batch_size: int) -> sharpness.EigenResult:
    """The top Hessian eigenvalue of the model's compiled loss on `(x, y)`.

    Hessian-vector products run in minibatches of at most
    SHARPNESS_BATCH_SIZE examples, whatever `batch_size` (the evaluation's)
    says: their double backward pass holds far more memory per example than
    an evaluation. The eigenvalue does not depend on the minibatch size, up
    to rounding.
    """
    return sharpness.top_hessian_eigenvalue(
        model, x, y, loss=model.loss, iterations=SHARPNESS_ITERATIONS,
        batch_size=min(batch_size, SHARPNESS_BATCH_SIZE), seed=SHARPNESS_SEED)


class _Sharpness(keras.callbacks.Callback):
    """Adds the top Hessian eigenvalue to the epoch logs at every evaluation."""

    def __init__(self, x: Any, y: Any, every: int, last_epoch: int, batch_size: int):
        super().__init__()
        self._x, self._y, self._batch_size = x, y, batch_size
        self._every, self._last = every, last_epoch

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self._every and epoch + 1 != self._last:
            return
        result = top_eigenvalue(self.model, self._x, self._y, self._batch_size)
        if logs is not None:
            logs[NOT_PRIVATE_LOG_PREFIX + SHARPNESS_METRIC] = result.eigenvalue


def _is_training_statistic(key: str) -> bool:
    """Whether a log key is a metric of the training step (not private).

    Every key the training step reports is computed from the private
    training batch without noise: the compiled loss and metrics (any a user
    adds too), and a DP model's `grad_norm_clipped_fraction` and
    `nonfinite_gradients`. Only what the binary's callbacks add is
    otherwise: the released `_RELEASED_LOG_KEYS` and the keys they label
    `not_private/` themselves.
    """
    return not (key in _RELEASED_LOG_KEYS or key.startswith(NOT_PRIVATE_LOG_PREFIX))


class _TrainingStatistics(keras.callbacks.Callback):
    """Labels or removes every training-step metric of the logs.

    In the batch and epoch logs: with `record`, each is renamed
    `not_private/<name>` (in place, in its order); without, each is removed.
    Derived from the logs rather than from a list of names, so that a metric
    a user compiles is labelled or removed as well. First in the callback
    list: Keras hands every later callback (PrivacyCallback, the evaluation,
    the recorder, TensorBoard, History, the progress bar, extra callbacks)
    the same dict, so none sees a training statistic under its plain name.
    """

    def __init__(self, record: bool):
        super().__init__()
        self._record = record

    def _relabel(self, logs):
        if not logs:
            return
        items = list(logs.items())
        logs.clear()
        for key, value in items:
            if not _is_training_statistic(key):
                logs[key] = value
            elif self._record:
                logs[NOT_PRIVATE_LOG_PREFIX + key] = value

    def on_train_batch_end(self, batch, logs=None):
        self._relabel(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._relabel(logs)


class _Recorder(keras.callbacks.Callback):
    """Per epoch: history, checkpoint, state.json, results.json and the plot."""

    def __init__(self, run: "_Run"):
        super().__init__()
        self._run = run

    def on_epoch_end(self, epoch, logs=None):
        self._run.record_epoch(self.model, epoch, dict(logs or {}))


class _Run:
    """The mutable state of one `train` call."""

    def __init__(self, config: TrainConfig, plan: RunPlan, statement: str,
                 dataset: data.Dataset, state: Optional[Dict[str, Any]],
                 deltas: Optional[accounting.DeltaBreakdown], chief: bool = True,
                 noise_replicas: int = 1):
        self.config, self.plan, self.statement = config, plan, statement
        # The most replicas any part of the run drew noise on (delta_parts).
        self.noise_replicas = noise_replicas
        # Only the chief writes to model_dir (multi-worker runs).
        self.chief = chief
        self.deltas = deltas
        self.checkpoint = state["checkpoint"] if state else None
        self.num_test = len(dataset.test_images)
        self.num_validation = config.validation_examples
        self.history: List[Dict[str, Any]] = list(state["history"]) if state else []
        if not config.record_train_diagnostics:
            # Recorded before the run was resumed with the switch off: they
            # stay out of results.json, the plot and state.json from now on.
            self.history = [{k: v for k, v in h.items()
                             if k in _PRIVATE_HISTORY_KEYS}
                            for h in self.history]
        self.epochs_done = int(state["epochs_done"]) if state else 0
        self.prior_wall_time = float(state["wall_time_s"]) if state else 0.0
        self.started = time.monotonic()
        self.last_epsilon = self.history[-1]["epsilon"] if self.history else (
            0.0 if config.private else math.inf)
        self.steps = int(state["steps"]) if state else 0

    def wall_time(self) -> float:
        return self.prior_wall_time + time.monotonic() - self.started

    def record_epoch(self, model: keras.Model, epoch: int, logs: Dict[str, Any]) -> None:
        self.steps = int(model.optimizer.iterations.numpy())
        if not self.config.private:
            self.steps = (epoch + 1) * self.plan.steps_per_epoch
        epsilon = float(logs.get("epsilon", math.inf)) if self.config.private else math.inf
        self.last_epsilon = epsilon
        entry = {"epoch": epoch + 1, "steps": self.steps, "epsilon": epsilon,
                 "wall_time_s": round(self.wall_time(), 3)}
        for key in _PRIVATE_METRICS:
            if key in logs:
                entry[key] = float(logs[key])
        # Every labelled number, under its plain name: the training-step
        # metrics (whatever the model reports), validation and sharpness.
        for key, value in logs.items():
            if key.startswith(NOT_PRIVATE_LOG_PREFIX):
                entry[key[len(NOT_PRIVATE_LOG_PREFIX):]] = float(value)
        self.history.append(entry)
        self.epochs_done = epoch + 1
        if self.config.model_dir is not None:
            self._save(model)

    def _save(self, model: keras.Model) -> None:
        model_dir = self.config.model_dir
        name = _CHECKPOINT_PATTERN.format(self.epochs_done)
        if not self.chief:
            # Every worker saves, as TensorFlow's multi-worker guide asks
            # (saving must not skip a worker), the others into a directory
            # deleted at once.
            with tempfile.TemporaryDirectory() as scratch:
                model.save(os.path.join(scratch, name))
            self.checkpoint = name
            return
        model.save(os.path.join(model_dir, name))
        self.checkpoint = name
        # state.json names the checkpoint: it is replaced only after the new
        # checkpoint is complete, so a crash at any point leaves a consistent pair.
        _write_json(os.path.join(model_dir, STATE_FILE), {
            "config": _published_config(self.config),
            "epochs_done": self.epochs_done,
            "steps": self.steps,
            "checkpoint": name,
            "history": self.history,
            "wall_time_s": self.wall_time(),
            "noise_replicas": self.noise_replicas,
        })
        for old in os.listdir(model_dir):
            if old.startswith("checkpoint-") and old.endswith(".keras") and old != name:
                os.remove(os.path.join(model_dir, old))
        self.write_outputs(completed=False)

    def results(self, completed: bool) -> Dict[str, Any]:
        evaluated = [h for h in self.history if h.get("test_accuracy") is not None]
        best = max(evaluated, key=lambda h: h["test_accuracy"], default=None)
        final = evaluated[-1] if evaluated else None
        config, plan = self.config, self.plan
        private = {
            "note": _PRIVATE_NOTE,
            "model": self.checkpoint,
            "final_test_accuracy": final["test_accuracy"] if final else None,
            "final_test_loss": final["test_loss"] if final else None,
            "final_evaluated_epoch": final["epoch"] if final else None,
            "best_test_accuracy": best["test_accuracy"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "epsilon": self.last_epsilon,
            "target_epsilon": (config.epsilon if config.private and
                               config.noise_multiplier is None else None),
            "delta": self.deltas.total if self.deltas else None,
            "delta_parts": self.deltas._asdict() if self.deltas else None,
            "adjacency": plan.adjacency,
            "history": [{k: h[k] for k in _PRIVATE_HISTORY_KEYS if k in h}
                        for h in self.history],
        }
        flags = _published_config(config)
        results = {
            "completed": completed,
            "private": private,
            "noise_multiplier": plan.noise_multiplier,
            "privacy_analysis": plan.privacy_analysis,
            "queries_per_step": plan.queries_per_step,
            "steps": self.steps,
            "planned_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "epochs_completed": self.epochs_done,
            "sampling_probability": plan.sampling_probability,
            "padding_overflow_probability": plan.overflow_probability,
            "num_train_examples": plan.num_examples,
            "num_test_examples": self.num_test,
            "logical_batch_rows": plan.logical_batch_size,
            "physical_batch_size": plan.physical_batch_size,
            "gradient_accumulation_steps": plan.accumulation_steps,
            "wall_time_s": round(self.wall_time(), 3),
            "privacy_statement": self.statement,
            "flags": flags,
            "versions": {"tf_dpsat": __version__, "tensorflow": tf.__version__,
                         "keras": keras.__version__,
                         "python": platform.python_version()},
        }
        if config.record_train_diagnostics:
            results["non_private_diagnostics"] = self._non_private_diagnostics()
        return results

    def _non_private_diagnostics(self) -> Dict[str, Any]:
        """results.json's numbers without a guarantee, each part with its note."""
        config = self.config
        diagnostics = {
            "note": accounting.NON_PRIVATE_NOTE,
            "history": [
                {"epoch": h["epoch"], **{k: v for k, v in h.items()
                                         if k not in _NOT_TRAINING_HISTORY_KEYS}}
                for h in self.history]}
        if self.num_validation:
            validated = [h for h in self.history
                         if h.get("validation_accuracy") is not None]
            diagnostics["validation"] = {
                "note": _VALIDATION_NOTE,
                "num_examples": self.num_validation,
                "final_accuracy": (validated[-1]["validation_accuracy"]
                                   if validated else None),
                "best_accuracy": max((h["validation_accuracy"] for h in validated),
                                     default=None),
                "history": [{"epoch": h["epoch"],
                             **{k: h[k] for k in _VALIDATION_METRICS if k in h}}
                            for h in validated]}
        if config.sharpness_examples:
            measured = [{"epoch": h["epoch"], SHARPNESS_METRIC: h[SHARPNESS_METRIC]}
                        for h in self.history if SHARPNESS_METRIC in h]
            diagnostics["sharpness"] = {
                "note": SHARPNESS_NOTE,
                "num_examples": config.sharpness_examples,
                "iterations": SHARPNESS_ITERATIONS,
                "final_" + SHARPNESS_METRIC: (measured[-1][SHARPNESS_METRIC]
                                              if measured else None),
                "history": measured}
        return diagnostics

    def write_outputs(self, completed: bool) -> Dict[str, Any]:
        results = self.results(completed)
        if self.config.model_dir is not None and self.chief:
            # Python's json writes epsilon = inf (non-private) as Infinity.
            _write_json(os.path.join(self.config.model_dir, RESULTS_FILE), results)
            _plot(os.path.join(self.config.model_dir, PLOT_FILE), self.history,
                  _plot_title(self.config, self.plan), self.plan.epsilon)
        return results


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def _callbacks(config: TrainConfig, plan: RunPlan, run: _Run,
               evaluation: Dict[str, tf.data.Dataset],
               extra: Sequence[keras.callbacks.Callback],
               sharpness_data: Optional[Tuple[Any, Any]] = None) -> list:
    distributed_run = config.distribution != "none"
    callbacks = []
    # First: see _TrainingStatistics.
    callbacks.append(_TrainingStatistics(record=config.record_train_diagnostics))
    if config.private:
        # First, so later callbacks (and the progress bar) see "epsilon".
        callbacks.append(PrivacyCallback(
            plan.num_examples, delta=config.delta, sampling=config.sampling,
            batch_size=config.batch_size))
    callbacks.append(_Evaluate(evaluation, config.eval_every, config.epochs,
                               local=distributed_run))
    if sharpness_data is not None:
        callbacks.append(_Sharpness(*sharpness_data, every=config.eval_every,
                                    last_epoch=config.epochs,
                                    batch_size=config.eval_batch_size))
    callbacks.append(_Recorder(run))
    if config.model_dir is not None and run.chief and _tensorboard_installed():
        callbacks.append(keras.callbacks.TensorBoard(
            os.path.join(config.model_dir, TENSORBOARD_DIR), write_graph=False,
            update_freq="epoch", profile_batch=0))
    return callbacks + list(extra)


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401  (tf.summary needs it at run time)
    except ImportError:
        logging.warning("The tensorboard package is not installed: no TensorBoard "
                        'logs (pip install "tf_dpsat[experiments]").')
        return False
    return True


def _log_plan(config: TrainConfig, plan: RunPlan, statement: str) -> None:
    if config.private:
        source = ("--noise_multiplier" if config.noise_multiplier is not None else
                  f"calibrated for epsilon={config.epsilon:g}")
        logging.info("Noise multiplier sigma = %.6g (%s), %s, delta=%g.",
                     plan.noise_multiplier, source, config.method, config.delta)
    logging.info(
        "%d logical steps (%d per epoch: %s); %d rows per logical step (%s, expected "
        "batch %d) in %d physical batch(es) of %d.", plan.total_steps,
        plan.steps_per_epoch,
        "round(N / batch_size)" if config.sampling == "poisson"
        else "floor(N / batch_size)", plan.logical_batch_size, config.sampling,
        config.batch_size, plan.accumulation_steps, plan.physical_batch_size)
    logging.info("Privacy statement:\n%s", statement)
    if config.model_dir is None:
        logging.warning("No --model_dir: nothing is saved (no checkpoints, "
                        "results.json, TensorBoard logs or plot) and the run "
                        "cannot be resumed.")
    measured = {"validation_examples": _VALIDATION_METRICS,
                "sharpness_examples": (SHARPNESS_METRIC,)}
    requested = [name for name in measured if getattr(config, name)]
    if config.record_train_diagnostics:
        recorded = tuple(
            NOT_PRIVATE_LOG_PREFIX + key for key in accounting.NON_PRIVATE_DIAGNOSTICS
            + tuple(key for name in requested for key in measured[name]))
        logging.warning("Recording the non-private training diagnostics (%s, and "
                        "any other training metric, all labelled %s); "
                        "--norecord_train_diagnostics keeps them out of "
                        "results.json, TensorBoard and the epoch log.",
                        ", ".join(recorded), NOT_PRIVATE_LOG_PREFIX)
        return
    for name in requested:
        # The user asked for them, but the switch that keeps non-private
        # numbers out of the outputs wins: say so rather than drop silently.
        plural = len(measured[name]) > 1
        logging.warning("--%s=%d is set, but --norecord_train_diagnostics keeps "
                        "non-private numbers out of the outputs: %s (NOT private) "
                        "%s not measured. Drop --norecord_train_diagnostics to "
                        "record %s.", name, getattr(config, name),
                        " and ".join(measured[name]), "are" if plural else "is",
                        "them" if plural else "it")


def train(config: TrainConfig,
          extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> Dict[str, Any]:
    """Trains, evaluates and records one run; resumes from `config.model_dir`.

    Args:
      config: The run's configuration.
      extra_callbacks: Keras callbacks run after the library's own (which
        checkpoint at each epoch end before these see it). They see the
        training-step metrics as "not_private/<name>" (or not at all without
        `record_train_diagnostics`), epsilon and the test metrics under their
        own names. Keras callbacks that monitor the training loss or
        accuracy (EarlyStopping, ReduceLROnPlateau,
        ModelCheckpoint(save_best_only=True)) steer training with un-noised
        statistics of the private data, outside the (epsilon, delta)
        guarantee: do not use them on private data, or let them monitor
        only quantities the guarantee covers (epsilon, metrics on public
        data).

    Returns:
      The results dict also written to `model_dir/results.json`. Its
      "private" section holds what the guarantee covers: the model's
      checkpoint, final and best test accuracy, epsilon spent (inf without
      privacy), the total delta and its parts, and the per-epoch epsilon and
      test metrics. "non_private_diagnostics" (only with
      `record_train_diagnostics`) holds the per-epoch training-batch loss and
      accuracy and clipping statistics, and the "validation" and "sharpness"
      measurements when requested, which are NOT private. The rest:
      sigma, steps, the plan, wall time, the statement, the flags (a set
      `dp_seed` redacted) and versions.

    Raises:
      tf_dpsat.experiments.datasets.DatasetNotAvailableError: The data is not available
        offline (the message names --raw_data_dir and --data_dir).
      ValueError: An inconsistent configuration, a `model_dir` holding a
        run with different settings, or an unfinished run whose secret file
        (`SECRET_FILE`) is missing or corrupt.
    """
    # First: a multi-worker strategy must configure TensorFlow before any op.
    strategy = distributed.make_strategy(config.distribution)
    chief = distributed.is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    state = _read_state(config.model_dir)
    if state is not None:
        _check_resumable(config, state)
    dataset, held_out = split_validation(load_data(config), config.validation_examples)
    plan = make_plan(config, len(dataset.train_images))
    if config.model_dir is not None:
        os.makedirs(config.model_dir, exist_ok=True)
    finished = state is not None and state["epochs_done"] >= config.epochs
    # A finished run draws no more batches or noise: it needs no secret (so
    # its file may be deleted once the run is done).
    # A run whose older state.json holds its dp_seed (checked above) has no
    # secret file yet: run_secret writes one, and state.json drops the seed.
    secret = None if finished else _agreed_secret(
        config, strategy, chief,
        resuming=state is not None and not _dp_seed_in_state(state))
    with distributed.scope(strategy):
        if state is not None:
            model = _restore(config, state, secret)
        else:
            model = build_model(config, plan, dataset.image_shape, dataset.num_classes,
                                secret=secret)
    num_params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    # Every replica draws its own share of the noise. A run may resume on
    # another distribution, so the sampler's tail counts the most replicas
    # of any part of the run (state.json keeps it; a run started before it
    # did is taken to have used this part's).
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if state is not None:
        replicas = max(replicas, int(state.get("noise_replicas", replicas)))
    statement = privacy_report(config, plan, num_params, replicas)
    _log_plan(config, plan, statement)
    run = _Run(config, plan, statement, dataset, state,
               delta_parts(config, plan, num_params, replicas), chief=chief,
               noise_replicas=replicas)
    if run.epochs_done < config.epochs:
        if state is not None:
            logging.info("Resuming from %s after epoch %d (%d steps).",
                         state["checkpoint"], run.epochs_done, run.steps)
        _fit(model, config, plan, dataset, held_out, run, extra_callbacks, secret,
             strategy)
    else:
        logging.info("%s already holds all %d epochs; nothing to train.",
                     config.model_dir, config.epochs)
    results = run.write_outputs(completed=run.epochs_done >= config.epochs)
    private = results["private"]
    guarantee = ("no privacy guarantee" if private["delta"] is None else
                 f"epsilon {private['epsilon']:.4f}, delta {private['delta']:.6g}")
    logging.info("Final test accuracy %s, %s after %d steps (%.1f s).",
                 private["final_test_accuracy"], guarantee, results["steps"],
                 results["wall_time_s"])
    return results


def _fit(model: keras.Model, config: TrainConfig, plan: RunPlan, dataset: data.Dataset,
         held_out: Optional[Validation], run: _Run,
         extra_callbacks: Sequence[keras.callbacks.Callback],
         secret: int, strategy: Optional[tf.distribute.Strategy] = None) -> None:
    # The validation metrics and the sharpness are not private: with
    # --norecord_train_diagnostics they would be dropped, so they are not
    # measured (_log_plan says so).
    record = config.record_train_diagnostics
    sharpness_data = (sharpness_batch(config, dataset) if config.sharpness_examples
                      else None)  # Checks the count either way.
    if not record:
        sharpness_data = None
    if config.private:
        # The optimizer refuses any noisy step beyond the plan, whose epsilon
        # is the calibrated one (<= --epsilon): the ledger cannot overrun.
        model.optimizer.set_step_budget(plan.total_steps)
    batches = train_batches(config, plan, dataset.train_images, dataset.train_labels,
                            secret=secret, start_epoch=run.epochs_done)
    evaluation = {"test": test_batches(config, dataset.test_images, dataset.test_labels)}
    if held_out is not None and record:
        evaluation[NOT_PRIVATE_LOG_PREFIX + "validation"] = test_batches(
            config, held_out.images, held_out.labels)
    callbacks = _callbacks(config, plan, run, evaluation, extra_callbacks,
                           sharpness_data)
    steps_per_epoch = plan.steps_per_epoch * plan.accumulation_steps
    if strategy is not None:
        # Every worker iterates the same global batches and trains on its
        # replicas' equal shares (tf_dpsat.distributed; Keras's fit splits a
        # batch unevenly and reduces across workers wrongly); only the chief
        # prints.
        distributed.fit(model, strategy, batches, epochs=config.epochs,
                        steps_per_epoch=steps_per_epoch, initial_epoch=run.epochs_done,
                        callbacks=callbacks,
                        verbose=config.keras_verbose if run.chief else 0)
        return
    model.fit(batches, epochs=config.epochs, initial_epoch=run.epochs_done,
              steps_per_epoch=steps_per_epoch, callbacks=callbacks,
              shuffle=False, verbose=config.keras_verbose)
