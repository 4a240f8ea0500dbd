"""Keras callback that reports the privacy spent by DP training and enforces a budget.

What: `PrivacyCallback` adds `logs["epsilon"]` at every epoch end (so epsilon
shows in the progress bar, `History` and TensorBoard) and, given
`target_epsilon`, stops training at the last step that keeps epsilon within it.

Why this way: epsilon is computed from the optimizer's count of logical noisy
steps (`released_steps` where it has one, else `iterations`), not from counting
batches, so it stays right after resuming from a checkpoint or
`keras.models.load_model`, and after a restore to an earlier step in the same
process (the steps moved back over stay released, counted as steps on fresh
batches: the sampler needs a new key after such a restore). The budget is also handed to the
optimizer (`set_step_budget`), because Keras runs a batch before it looks at
`stop_training`; the optimizer's own refusal is what makes overrunning the budget
impossible. The analyses are those of `tf_dpsat.accounting` (RDP; Mironov 2017,
Mironov, Talwar and Zhang 2019, Balle et al. 2020) for DP-SGD / DP-SAT (Park et
al., ICML 2023).

The callback reads these attributes of `model.optimizer`: `noise_multiplier`,
`queries_per_step`, `iterations` (`released_steps` if present),
`expected_batch_size`, `num_microbatches` (read-only in tf_dpsat's optimizers,
whose traced step bakes them in), and, for "shuffle" sampling, the
`gradient_accumulation_steps` of its `get_config()`; it calls
`set_step_budget(max_steps)` if present. List it before a TensorBoard or
CSVLogger callback so they see `epsilon` in the epoch logs.

Epsilon covers the noisy steps only. The other epoch logs of a DP model, the
training-batch `loss` and `accuracy`, `grad_norm_clipped_fraction` and
`nonfinite_gradients` (`tf_dpsat.accounting.NON_PRIVATE_DIAGNOSTICS`), are exact
functions of the private batches and carry no privacy guarantee.
"""

import dataclasses
import math
from typing import Callable
from typing import Optional

import keras
from absl import logging

from tf_dpsat import accounting

# Package-internal argument checks shared with the accounting module.
from tf_dpsat import validation

SAMPLINGS = ("poisson", "shuffle")
# What the callback reads from model.optimizer (set_step_budget is optional).
_DP_ATTRIBUTES = ("noise_multiplier", "queries_per_step", "iterations",
                  "expected_batch_size", "num_microbatches")
# Upper end of the step-budget search: a budget this large is unlimited.
_MAX_BUDGET_STEPS = 2**40


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What epsilon depends on besides the step count (a cache key)."""

    # The optimizer's, per query.
    noise_multiplier: float
    queries_per_step: int
    sampling_probability: float
    steps_per_epoch: int  # Steps in one pass over the data ("shuffle").


def _largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """Largest n in [0, limit] with fits(n), for fits(0) True and fits monotone."""
    lo, hi = 0, 1
    while fits(hi):  # Exponential search keeps the accountant calls at O(log n).
        lo, hi = hi, 2 * hi
        if hi > limit:
            return limit if fits(limit) else _bisect(fits, lo, limit)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi) with fits(n), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class PrivacyCallback(keras.callbacks.Callback):
    """Logs epsilon per epoch and optionally stops training at a privacy budget.

    Example:
        model.fit(..., callbacks=[PrivacyCallback(len(x_train), target_epsilon=3)])

    Attributes:
        epsilon: Epsilon after the latest epoch (or at the start of training).
        max_steps: Noisy steps the budget allows (None without target_epsilon).
    """

    def __init__(self, num_examples: int, delta: float = 1e-5,
                 target_epsilon: Optional[float] = None,
                 sampling: str = "poisson", batch_size: Optional[int] = None):
        """Creates the callback.

        Args:
            num_examples: Training set size.
            delta: Target delta.
            target_epsilon: Privacy budget; None to only report epsilon.
            sampling: "poisson" if each batch includes each example independently
                with probability q = batch_size / num_examples (the optimizer
                must then set `expected_batch_size` and leave
                `num_microbatches` unset, or training is refused at its start,
                before any step); "shuffle" for
                fixed-size batches from shuffled passes over the data (each example
                at most once per epoch, no amplification, replace-one adjacency
                with sensitivity 2C; a pass is taken to be
                floor(num_examples / batch_size) steps, which is exact with
                drop_remainder=True and conservative otherwise). Each Keras
                epoch must then be one or more passes: training is refused
                when an epoch has fewer steps than a pass (for example with
                fit's validation_split, when num_examples is len(x) rather
                than the examples trained on), since its passes would be
                undercounted. With "poisson", a DP model's `fit` refuses
                inputs other than a `tf.data.Dataset` (see
                `tf_dpsat.sampling.poisson_dataset`).
            batch_size: (Expected) examples per logical step, counting every
                example of every microbatch and accumulated batch; defaults to
                the optimizer's `expected_batch_size`.

        Raises:
            ValueError: If an argument is out of range.
        """
        super().__init__()
        self.num_examples = validation.check_int("num_examples", num_examples, 1)
        self.delta = validation.check_delta(delta)
        self.target_epsilon = (None if target_epsilon is None else
                               validation.check_positive("target_epsilon", target_epsilon))
        if sampling not in SAMPLINGS:
            raise ValueError(
                f"Expected sampling={sampling!r} to be one of {SAMPLINGS}.")
        self.sampling = sampling
        self.batch_size = (None if batch_size is None else
                           self._check_batch_size(batch_size))
        self.epsilon: Optional[float] = None
        self.max_steps: Optional[int] = None
        self._cache: dict = {}
        self._stop_logged = False
        self._epoch_start = 0  # Noisy steps released when the epoch began.

    # ------------------------------------------------------------- public API
    def epsilon_at(self, steps: int) -> float:
        """Epsilon after `steps` noisy steps with the attached model's optimizer.

        Raises:
            ValueError: If steps < 0, the batch size is unknown, or the
                optimizer's settings break the Poisson analysis
                (`num_microbatches` set, or `expected_batch_size` unset).
            RuntimeError: If the callback is not attached to a compiled model.
            TypeError: If the optimizer lacks a DP attribute.
        """
        return self._epsilon(self._setup(), validation.check_int("steps", steps, 0))

    # ---------------------------------------------------------- Keras hooks
    def on_train_begin(self, logs=None):
        setup = self._setup()
        self._check_epochs_are_passes(setup)
        steps = self._iterations()
        self.epsilon = self._epsilon(setup, steps)
        self._stop_logged = False
        if self.target_epsilon is None:
            return
        self.max_steps = self._max_steps(setup)
        optimizer = self._optimizer()
        if hasattr(optimizer, "set_step_budget"):
            optimizer.set_step_budget(self.max_steps)
        else:
            logging.warning(
                "%s has no set_step_budget(): a batch that Keras runs after "
                "stop_training is set could exceed the privacy budget.",
                type(optimizer).__name__)
        logging.info(
            "Privacy budget epsilon=%g at delta=%g (%s sampling) allows %d noisy "
            "steps; %d already taken.", self.target_epsilon, self.delta,
            self.sampling, self.max_steps, steps)
        if steps >= self.max_steps:
            self._stop(steps)

    def on_train_batch_end(self, batch, logs=None):
        if self.max_steps is None:
            return
        steps = self._iterations()
        if steps >= self.max_steps:
            self._stop(steps)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._iterations()

    def on_epoch_end(self, epoch, logs=None):
        setup, steps = self._setup(), self._iterations()
        self.epsilon = self._epsilon(setup, steps)
        if logs is not None:
            logs["epsilon"] = self.epsilon
        if (self.sampling == "shuffle" and self._keras_epoch_steps() is None
                and not self.model.stop_training):
            # An epoch of unknown length ran until the data ran out: one
            # iteration over the data, which must be a whole pass.
            taken = steps - self._epoch_start
            if 0 < taken < setup.steps_per_epoch:
                raise self._short_epoch_error(
                    setup, f"this epoch ended after {taken} logical steps")

    # -------------------------------------------------------------- helpers
    def _check_batch_size(self, batch_size) -> int:
        batch_size = validation.check_int("batch_size", batch_size, 1)
        if batch_size > self.num_examples:
            raise ValueError(f"Expected batch_size={batch_size} <= "
                             f"num_examples={self.num_examples}.")
        return batch_size

    def _optimizer(self):
        if self.model is None:
            raise RuntimeError(
                "PrivacyCallback is not attached to a model: pass it to "
                "model.fit(callbacks=[...]) or call set_model().")
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise RuntimeError(
                "PrivacyCallback needs the model compiled with a DP optimizer, "
                "but model.optimizer is None (was the model compiled, or "
                "restored compiled by keras.models.load_model?).")
        return optimizer

    def _attribute(self, name: str):
        optimizer = self._optimizer()
        missing = [a for a in _DP_ATTRIBUTES if not hasattr(optimizer, a)]
        if missing:
            raise TypeError(
                f"PrivacyCallback needs a DP optimizer, but "
                f"{type(optimizer).__name__} lacks {', '.join(missing)}; compile "
                "the model with a tf_dpsat DP optimizer.")
        return getattr(optimizer, name)

    def _iterations(self) -> int:
        """The noisy steps released so far."""
        steps = self._attribute("iterations")
        if hasattr(self._optimizer(), "released_steps"):
            steps = self._optimizer().released_steps
        # convert_to_numpy: int() of a Keras variable fails when it wraps a
        # tf.distribute (mirrored) variable.
        return int(keras.ops.convert_to_numpy(steps))

    def _setup(self) -> _Setup:
        """Reads the optimizer's DP settings (cheap; done at each use).

        Raises:
            ValueError: If the optimizer's settings break the analysis of
                `sampling` (see `_check_poisson_optimizer`).
        """
        num_microbatches = self._attribute("num_microbatches")
        expected_batch_size = self._attribute("expected_batch_size")
        if self.sampling == "poisson":
            self._check_poisson_optimizer(num_microbatches, expected_batch_size)
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = expected_batch_size
            if batch_size is None:
                raise ValueError(
                    "PrivacyCallback needs the batch size to compute the sampling "
                    "probability: pass batch_size= to PrivacyCallback or set "
                    "expected_batch_size on the optimizer.")
            batch_size = self._check_batch_size(batch_size)
        # Poisson: no microbatches (refused above), sensitivity C. The shuffle
        # analysis (replace-one) uses 2C, which covers microbatches too.
        return _Setup(
            noise_multiplier=float(self._attribute("noise_multiplier")),
            queries_per_step=validation.check_int(
                "queries_per_step", self._attribute("queries_per_step"), 1),
            sampling_probability=batch_size / self.num_examples,
            steps_per_epoch=self.num_examples // batch_size)

    def _keras_epoch_steps(self) -> Optional[int]:
        """The batches of a Keras epoch, as fit tells callbacks; None if unknown."""
        return (self.params or {}).get("steps")

    def _check_epochs_are_passes(self, setup: _Setup) -> None:
        """Refuses, before any step, epochs shorter than a pass ("shuffle").

        The shuffle analysis counts a pass every `setup.steps_per_epoch`
        logical steps (num_examples // batch_size). A Keras epoch of fewer
        steps is either
        a whole pass over fewer examples (fit's `validation_split` trains on
        part of `x`; a dataset smaller than num_examples), whose passes that
        count would undercount, or part of a longer pass (`steps_per_epoch`
        over a repeated dataset), which would be counted right: the callback
        cannot tell them apart, so it refuses both, naming the fixes. Epochs
        of a pass or more are counted soundly by steps. Where Keras does not
        know an epoch's length, `on_epoch_end` checks the steps it took.

        Raises:
          ValueError: A Keras epoch has fewer logical steps than a pass.
        """
        batches = self._keras_epoch_steps()
        if self.sampling != "shuffle" or batches is None:
            return
        # Keras counts physical batches; under gradient accumulation a
        # logical (noisy) step takes k of them.
        k = self._optimizer().get_config().get("gradient_accumulation_steps") or 1
        if batches < k * setup.steps_per_epoch:
            per_step = f" ({k} batches per logical step)" if k > 1 else ""
            raise self._short_epoch_error(
                setup, f"a Keras epoch has {batches} batches{per_step}")

    def _short_epoch_error(self, setup: _Setup, epoch: str) -> ValueError:
        return ValueError(
            "PrivacyCallback(sampling='shuffle') counts a pass over the "
            f"num_examples={self.num_examples} examples every "
            f"{setup.steps_per_epoch} logical steps (num_examples // "
            f"batch_size), but {epoch}. An epoch shorter than a pass is a "
            "whole pass over fewer examples (fit's validation_split, or a "
            f"dataset of fewer than {self.num_examples} examples), and its "
            "passes would be undercounted. Pass num_examples= the examples "
            "one epoch trains on (with validation_split=v, int(len(x) * (1 - "
            "v))); for epochs that cut one long pass of a repeated dataset, "
            "make each epoch whole passes (steps_per_epoch a multiple of a "
            "pass).")

    def _check_poisson_optimizer(self, num_microbatches, expected_batch_size):
        """Refuses optimizer settings that the Poisson analysis does not cover.

        The Poisson analysis bounds one example's effect on a step's clipped
        sum by C, and needs the sum divided by a constant. Microbatches of a
        Poisson batch are cut by position, so adding or removing an example
        shifts every later row into another microbatch (sensitivity up to
        num_microbatches * C); without `expected_batch_size` the optimizer
        divides by the rows of each batch, which for an unpadded Poisson
        batch is the sampled count, a function of the data.
        """
        optimizer = type(self._optimizer()).__name__
        if num_microbatches is not None:
            raise ValueError(
                f"PrivacyCallback(sampling='poisson') refuses {optimizer}("
                f"num_microbatches={num_microbatches}): the microbatches of a "
                "Poisson batch are cut by position, so adding or removing one "
                "example shifts every later row into another microbatch and "
                "can change every microbatch's clipped gradient (sensitivity "
                f"up to {num_microbatches} C, not the C of the Poisson "
                "analysis). Use num_microbatches=None (per-example clipping) "
                "with Poisson batches, or fixed-size shuffled batches with "
                "PrivacyCallback(sampling='shuffle').")
        if expected_batch_size is None:
            raise ValueError(
                f"PrivacyCallback(sampling='poisson') needs {optimizer}("
                "expected_batch_size=...), got None: the Poisson analysis "
                "assumes the noisy sum is divided by a fixed number, and "
                "without expected_batch_size the optimizer divides by the "
                "rows of each batch, which for Poisson batches that are not "
                "padded to one size is the number of sampled examples, a "
                "function of the data. Set expected_batch_size to the "
                "expected (logical) batch size q * num_examples.")

    def _epsilon(self, setup: _Setup, steps: int) -> float:
        """Epsilon after `steps` steps, each computed once per setup."""
        if steps == 0:
            return 0.0
        key = (setup, steps)
        if key not in self._cache:
            self._cache[key] = self._compute_epsilon(setup, steps)
        return self._cache[key]

    def _compute_epsilon(self, setup: _Setup, steps: int) -> float:
        if self.sampling == "poisson":
            return accounting.compute_epsilon(
                noise_multiplier=setup.noise_multiplier,
                sampling_probability=setup.sampling_probability, steps=steps,
                delta=self.delta, queries_per_step=setup.queries_per_step)
        # Every started pass over the data may use each example once.
        return accounting.compute_epsilon_once_per_epoch(
            noise_multiplier=setup.noise_multiplier,
            epochs=math.ceil(steps / setup.steps_per_epoch), delta=self.delta,
            queries_per_step=setup.queries_per_step)

    def _max_steps(self, setup: _Setup) -> int:
        """Largest step count whose epsilon is within target_epsilon."""
        def fits(steps: int) -> bool:
            return self._epsilon(setup, steps) <= self.target_epsilon

        if self.sampling == "poisson":
            return _largest_fitting(fits, _MAX_BUDGET_STEPS)
        # Epsilon only grows when a new pass starts: search whole passes.
        passes = _largest_fitting(
            lambda n: fits(n * setup.steps_per_epoch),
            _MAX_BUDGET_STEPS // setup.steps_per_epoch)
        return passes * setup.steps_per_epoch

    def _stop(self, steps: int) -> None:
        self.model.stop_training = True
        if self._stop_logged:
            return
        self._stop_logged = True
        logging.warning(
            "Privacy budget reached: training stopped after %d noisy steps "
            "(budget %d), epsilon=%.4f for target_epsilon=%g at delta=%g (%s "
            "sampling).",
            steps, self.max_steps, self._epsilon(self._setup(), steps),
            self.target_epsilon, self.delta, self.sampling)
