"""Privacy accounting for DP-SGD, DP-SAT and DP-SAM training.

What: epsilon for a given noise multiplier and training length, the smallest
noise multiplier for a target epsilon, and a plain-text privacy statement (also
as a command line tool, see `main`).

Why these analyses: every noisy step of DP-SGD / DP-SAT (Park et al., "Differentially
Private Sharpness-Aware Training", ICML 2023) releases the sum of clipped
per-example gradients plus Gaussian noise of standard deviation
`noise_multiplier * C`. DP-SAT's sharpness-aware perturbation reuses the previous
step's noisy gradient, so it costs no extra privacy; DP-SAM queries the same batch
twice per step (`queries_per_step=2`).

* Poisson sampling (each example joins each batch independently with probability
  q): a step is the Poisson-subsampled Gaussian mechanism, whose Renyi DP
  (Mironov, "Renyi Differential Privacy", CSF 2017) is computed exactly by
  Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019. RDP composes additively over steps and is converted to
  (epsilon, delta)-DP with the improved bound of Balle et al., "Hypothesis
  Testing Interpretations and Renyi Differential Privacy", AISTATS 2020.
  `accountant="pld"` instead uses privacy loss distributions (tighter).
* Each example once per epoch (fixed-size batches from a shuffled pass, the usual
  input pipeline): no amplification by sampling is claimed, so each epoch is one
  unsubsampled Gaussian mechanism on every example. Amplification by shuffling
  is real but has no tight accountant here. Fixed-size batches only admit
  replace-one neighbours (adding an example changes the batch size), and
  replacing one example moves one clipped term by up to 2C: this analysis
  uses sensitivity 2C, i.e. the effective noise multiplier sigma / 2
  (`REPLACE_ONE_SENSITIVITY`).

Queries per step: k noisy queries of sensitivity C on the same sample inside one
step compose to exactly a Gaussian mechanism with noise multiplier sigma/sqrt(k)
(the k noisy sums are jointly a sufficient statistic for their mean), and that
composite is what gets subsampled. Counting them as k separately subsampled steps
would under-count the privacy cost.

Microbatching: when a microbatch holds more than one example and its *average*
gradient is clipped, adding or removing one example can move that clipped
gradient by up to 2C, so the effective noise multiplier halves (see
tensorflow-privacy's `used_microbatching` and Ponomareva et al., "How to DP-fy
ML", 2023, Sec. 5.6). Under Poisson sampling that assumes the added or removed
example changes its own microbatch only. Microbatches cut from a Poisson batch
by position (tf_dpsat's, and tensorflow-privacy's) do not satisfy it: one
example shifts every later row into another microbatch, sensitivity up to
num_microbatches * C. `DPSATKeras` and `PrivacyCallback` therefore refuse
microbatches with Poisson sampling; with microbatches use fixed-size shuffled
batches and the once-per-epoch analysis, which already uses 2C.

All guarantees are example-level (add/remove-one adjacency for Poisson sampling,
replace-one for fixed-size batches) and cover every intermediate model, not only
the final one. They do not cover the training diagnostics (`NON_PRIVATE_DIAGNOSTICS`).

Extra delta: a run that differs from the analysed mechanism M with probability
(total variation) at most eta is (epsilon, delta + (1 + e^epsilon) eta)-DP if M is
(epsilon, delta)-DP (`total_variation_delta`). Two such events are counted: the
noise sampler's truncated Gaussian tail (`sampler_tail_delta`) and the overflow
of a padded Poisson batch (`padding_overflow_delta`).

Command line (prints the statement; with --epsilon first the calibrated sigma;
with --num_microbatches the once-per-epoch analysis only):

  python -m tf_dpsat.accounting --num_examples=50000 --batch_size=256 \
      --epochs=30 (--noise_multiplier=1.1 | --epsilon=3) [--delta=1e-5] \
      [--accountant=rdp|pld] [--num_microbatches=N] [--queries_per_step=K] \
      [--num_params=P]
"""

import argparse
import contextlib
import functools
import logging
import math
import sys
import textwrap
from typing import Callable
from typing import NamedTuple
from typing import Optional
from typing import Sequence

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from tf_dpsat import validation

# RDP orders: the fractional grid 1.1, 1.2, ..., 10.9 that Opacus and
# tensorflow-privacy use for the small orders that matter at moderate epsilon,
# then every integer 11..63, then a few large orders for the high-noise / tiny
# epsilon regime. Epsilon is a minimum over orders, so extra orders only tighten
# the (always valid) bound; this list reproduces Opacus' and tensorflow-privacy's
# reported values to 1e-4 (the optimum for DP training sits between 4 and 20).
RDP_ORDERS: tuple = tuple(
    [1 + x / 10 for x in range(1, 100)] + list(range(11, 64))
    + [128, 256, 512, 1024])

# PLD discretization of the privacy loss. dp_accounting's pessimistic PLD is an
# upper bound for any interval; 1e-4 is within 1e-3 of the exact value at DP
# training scales (2.6879 for the CIFAR-10 tensorflow-privacy setting, where 1e-3
# gives 2.6911) and costs ~0.4 s for 6000 steps.
PLD_VALUE_DISCRETIZATION_INTERVAL: float = 1e-4

ACCOUNTANTS: tuple = ("rdp", "pld")

# Calibration: bisection tolerance (under the promised 1e-3, leaving room for
# rounding the result up to 6 significant digits) and search bounds.
_CALIBRATION_RTOL = 9e-4
_MIN_SIGMA, _MAX_SIGMA = 1e-4, 1e6
# Replace-one adjacency (fixed-size batches): replacing one example moves one
# clipped term by up to this many clip norms (its old and new gradient, each of
# norm <= C, in opposite directions).
REPLACE_ONE_SENSITIVITY = 2.0
# Per pair of normals, the probability that the noise sampler's radius
# sqrt(-2 ln u1) is truncated relative to the ideal Gaussian: u1 is a 64-bit
# uniform >= 2^-65 built from two 32-bit Philox words (tf_dpsat.noise).
SAMPLER_TAIL_PROBABILITY = 2.0**-64
# What the DP model logs beside epsilon that is an exact function of private
# training batches, with no noise: these carry no privacy guarantee.
NON_PRIVATE_DIAGNOSTICS: tuple = (
    "loss", "accuracy", "grad_norm_clipped_fraction", "nonfinite_gradients")
NON_PRIVATE_NOTE = (
    "Not private: the training-batch loss and accuracy, "
    "grad_norm_clipped_fraction and nonfinite_gradients are exact functions of "
    "the private training batches with no noise (a NaN canary example shows in "
    "nonfinite_gradients: certain membership inference). They carry no DP "
    "guarantee; do not publish them.")

# Step counts within this distance of an integer are that integer: it absorbs the
# float error in epochs * num_examples / batch_size (e.g. 0.1 * 5000 / 50).
_INTEGER_SLACK = 1e-9


def _check_accountant(accountant: str) -> str:
    return validation.check_one_of("accountant", accountant, ACCOUNTANTS)


# -------------------------------------------------------------- core analyses
def _step_noise_multiplier(noise_multiplier: float, queries_per_step: int) -> float:
    """Noise multiplier of one step's k Gaussian queries composed (exact)."""
    return noise_multiplier / math.sqrt(queries_per_step)


class _DropNonConvergence(logging.Filter):
    """Hides dp_accounting's warning for orders it drops at tiny sigma.

    The order's RDP becomes inf, so the bound stays valid; calibration probes
    such sigmas on purpose and would otherwise flood the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_nonconvergence():
    absl_logger, log_filter = logging.getLogger("absl"), _DropNonConvergence()
    absl_logger.addFilter(log_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(log_filter)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sampling_probability: float) -> np.ndarray:
    """RDP at `RDP_ORDERS` of one Poisson-subsampled Gaussian step (cached)."""
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    with _quiet_nonconvergence():
        accountant.compose(event)
    return accountant.rdp


def _rdp_epsilon(noise_multiplier: float, sampling_probability: float,
                 steps: int, delta: float) -> float:
    # RDP composes additively, so T steps cost T times one step.
    rdp = steps * _rdp_per_step(noise_multiplier, sampling_probability)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(
        list(RDP_ORDERS), rdp, delta)
    return float(epsilon)


def _pld_epsilon(noise_multiplier: float, sampling_probability: float,
                 steps: int, delta: float, interval: float) -> float:
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_probability < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_probability, event)
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=interval)
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def _epsilon(step_sigma: float, q: float, steps: int, delta: float,
             accountant: str,
             pld_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL) -> float:
    """Epsilon of `steps` Poisson(q)-subsampled Gaussian(step_sigma) steps."""
    if step_sigma == 0:
        return math.inf  # No noise: no privacy.
    if accountant == "rdp":
        return _rdp_epsilon(step_sigma, q, steps, delta)
    return _pld_epsilon(step_sigma, q, steps, delta, pld_interval)


def compute_epsilon(*, noise_multiplier: float, sampling_probability: float,
                    steps: int, delta: float = 1e-5, queries_per_step: int = 1,
                    accountant: str = "rdp") -> float:
    """Epsilon of DP training with Poisson-sampled batches.

    Args:
      noise_multiplier: Noise standard deviation over the clip norm, per query
        (already halved by the caller if microbatching doubles the sensitivity).
      sampling_probability: q, the probability that an example joins a batch.
      steps: Number of noisy steps.
      delta: Target delta.
      queries_per_step: Noisy gradient queries on the same batch per step (1 for
        DP-SGD / DP-SAT, 2 for DP-SAM).
      accountant: "rdp" or "pld".

    Returns:
      Epsilon such that training is (epsilon, delta)-DP; `inf` without noise.

    Raises:
      ValueError: If an argument is out of range.
      TypeError: If an argument has the wrong type.
    """
    sigma = validation.check_non_negative("noise_multiplier", noise_multiplier)
    q = validation.check_probability("sampling_probability", sampling_probability)
    steps = validation.check_int("steps", steps, 1)
    delta = validation.check_delta(delta)
    k = validation.check_int("queries_per_step", queries_per_step, 1)
    _check_accountant(accountant)
    return _epsilon(_step_noise_multiplier(sigma, k), q, steps, delta, accountant)


def compute_epsilon_once_per_epoch(*, noise_multiplier: float, epochs: float,
                                   delta: float = 1e-5,
                                   queries_per_step: int = 1,
                                   accountant: str = "rdp") -> float:
    """Epsilon when each example is used at most once per epoch (no sampling).

    This is the analysis for fixed-size batches cut from a shuffled pass over the
    data: amplification by sampling does not apply, so each (possibly partial)
    epoch is one Gaussian mechanism on every example, and epochs compose.
    Adjacency is replace-one (sensitivity 2C, `REPLACE_ONE_SENSITIVITY`), so the
    analysis uses noise_multiplier / 2. That also covers microbatches: replacing
    one example moves its microbatch's clipped mean by at most 2C as well.

    Args:
      noise_multiplier: Noise standard deviation over the clip norm C, per
        query (the optimizer's sigma, without any microbatching adjustment).
      epochs: Number of epochs; a partial epoch counts as a whole one.
      delta: Target delta.
      queries_per_step: Noisy gradient queries on the same batch per step.
      accountant: "rdp" or "pld".

    Returns:
      Epsilon such that training is (epsilon, delta)-DP; `inf` without noise.

    Raises:
      ValueError: If an argument is out of range.
      TypeError: If an argument has the wrong type.
    """
    sigma = validation.check_non_negative("noise_multiplier", noise_multiplier)
    epochs = validation.check_positive("epochs", epochs)
    delta = validation.check_delta(delta)
    k = validation.check_int("queries_per_step", queries_per_step, 1)
    _check_accountant(accountant)
    return _epsilon(_step_noise_multiplier(sigma / REPLACE_ONE_SENSITIVITY, k), 1.0,
                    _participations(epochs), delta, accountant)


def _participations(epochs: float) -> int:
    """Passes over the data in `epochs` epochs; a started pass counts."""
    return math.ceil(epochs - _INTEGER_SLACK)


def poisson_steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Steps per epoch at q = batch_size / num_examples: round(N / B), half up.

    The one rule of the library: the trainer runs this many Poisson steps per
    epoch, so an epoch draws N examples in expectation (to within half a batch),
    and the command line tool counts the same steps.

    Raises:
      ValueError: If an argument is out of range.
    """
    num_examples = validation.check_int("num_examples", num_examples, 1)
    batch_size = validation.check_int("batch_size", batch_size, 1)
    return max(1, math.floor(num_examples / batch_size + 0.5))


def poisson_steps(*, num_examples: int, batch_size: int, epochs: float) -> int:
    """Steps for `epochs` epochs at q = batch_size / num_examples.

    epochs * `poisson_steps_per_epoch` (round(N / B) per epoch, as the trainer
    runs), rounded up for a fractional epoch: a partial last step is a full
    noisy step.

    Raises:
      ValueError: If an argument is out of range.
    """
    per_epoch = poisson_steps_per_epoch(num_examples=num_examples,
                                        batch_size=batch_size)
    epochs = validation.check_positive("epochs", epochs)
    return max(1, math.ceil(epochs * per_epoch - _INTEGER_SLACK))


def uses_microbatching(batch_size: float, num_microbatches: Optional[int]) -> bool:
    """Whether microbatches hold more than one example (sensitivity doubles)."""
    return num_microbatches is not None and batch_size / num_microbatches > 1


def effective_noise_multiplier(noise_multiplier: float, *, batch_size: float,
                               num_microbatches: Optional[int] = None) -> float:
    """The noise multiplier to account with: halved if microbatches hold > 1 example.

    Args:
      noise_multiplier: The optimizer's noise multiplier.
      batch_size: Examples per batch (expected batch size under Poisson sampling).
      num_microbatches: Microbatches per batch, or None for per-example clipping.

    Returns:
      noise_multiplier / 2 with microbatching, else noise_multiplier.

    Raises:
      ValueError: If an argument is out of range.
    """
    sigma = validation.check_non_negative("noise_multiplier", noise_multiplier)
    batch_size = validation.check_positive("batch_size", batch_size)
    if num_microbatches is not None:
        validation.check_int("num_microbatches", num_microbatches, 1)
    return sigma / 2 if uses_microbatching(batch_size, num_microbatches) else sigma


# ---------------------------------------------------------------- calibration
def _smallest_sigma(fits: Callable[[float], bool], guess: float = 1.0,
                    factor: float = 2.0) -> float:
    """Smallest sigma with fits(sigma), for fits monotone (False then True).

    Brackets the answer by stepping from `guess` by `factor`, then bisects
    geometrically; the result always fits.
    """
    hi = guess
    while not fits(hi):
        hi *= factor
        if hi > _MAX_SIGMA:
            raise validation.UserError("Expected a target reachable with "
                             f"noise_multiplier <= {_MAX_SIGMA:g}.")
    lo = hi / factor
    while fits(lo):
        hi, lo = lo, lo / factor
        if lo < _MIN_SIGMA:
            return hi
    # Invariant: fits(hi) and not fits(lo).
    while (hi - lo) / hi > _CALIBRATION_RTOL:
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    # Round up to 6 significant digits so the printed value is itself safe.
    scale = 10.0 ** (5 - math.floor(math.log10(hi)))
    rounded = math.ceil(hi * scale) / scale
    return rounded if fits(rounded) else hi


def smallest_target_epsilon(delta: float = 1e-5, accountant: str = "rdp") -> float:
    """The smallest target epsilon that calibration resolves.

    RDP: as sigma grows, the converted epsilon falls to the floor
    min over orders a of log(1 - 1/a) - log(delta * a) / (a - 1) (zero Renyi
    divergence at `RDP_ORDERS`, about 0.0036 at delta 1e-5), then drops straight
    to 0 once the total divergence is below delta^2. A target under the floor
    would calibrate to that jump: a sigma in the thousands, fitted to no real
    trade-off. PLD: the coarse calibration grid, 10 * the discretization
    interval. The floor is rounded up to two significant digits.

    Args:
      delta: Target delta.
      accountant: "rdp" or "pld".

    Returns:
      The smallest target epsilon `calibrate_noise_multiplier` accepts.

    Raises:
      ValueError: If an argument is out of range.
    """
    delta = validation.check_delta(delta)
    if _check_accountant(accountant) == "pld":
        return 10 * PLD_VALUE_DISCRETIZATION_INTERVAL
    floor = min(math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                for a in RDP_ORDERS if a > 1.01)
    scale = 10.0 ** (1 - math.floor(math.log10(floor)))
    return math.ceil(floor * scale) / scale


def calibrate_noise_multiplier(*, target_epsilon: float,
                               sampling_probability: float, steps: int,
                               delta: float = 1e-5, queries_per_step: int = 1,
                               accountant: str = "rdp") -> float:
    """Smallest noise multiplier whose Poisson-sampling epsilon is <= target.

    Bisection on sigma (epsilon decreases in sigma) to relative tolerance 1e-3;
    the returned sigma always satisfies epsilon(sigma) <= target_epsilon.

    Args:
      target_epsilon: The privacy budget.
      sampling_probability: q, the probability that an example joins a batch.
      steps: Number of noisy steps.
      delta: Target delta.
      queries_per_step: Noisy gradient queries on the same batch per step; the
        result is the per-query noise multiplier.
      accountant: "rdp" or "pld".

    Returns:
      The noise multiplier (per query, before any microbatching adjustment).

    Raises:
      ValueError: If an argument is out of range, the target is below
        `smallest_target_epsilon(delta, accountant)`, or it needs sigma > 1e6.
      TypeError: If an argument has the wrong type.
    """
    target = validation.check_positive("target_epsilon", target_epsilon)
    q = validation.check_probability("sampling_probability", sampling_probability)
    steps = validation.check_int("steps", steps, 1)
    delta = validation.check_delta(delta)
    k = validation.check_int("queries_per_step", queries_per_step, 1)
    floor = smallest_target_epsilon(delta, accountant)
    if target < floor:
        raise validation.UserError(
            f"Expected target epsilon={target:g} >= {floor:g}, the smallest "
            f"epsilon the {accountant.upper()} accountant calibrates at "
            f"delta={delta:g}; ask for epsilon >= {floor:g} (or a larger delta).")

    def fits_with(pld_interval: float) -> Callable[[float], bool]:
        def fits(sigma: float) -> bool:
            step_sigma = _step_noise_multiplier(sigma, k)
            return _epsilon(step_sigma, q, steps, delta, accountant,
                            pld_interval) <= target
        return fits

    if accountant == "rdp":
        return _smallest_sigma(fits_with(PLD_VALUE_DISCRETIZATION_INTERVAL))
    # A PLD evaluation at the reporting resolution takes ~0.4 s: locate sigma
    # with a 10x coarser (cheap, slightly pessimistic) grid, then refine.
    coarse = _smallest_sigma(fits_with(10 * PLD_VALUE_DISCRETIZATION_INTERVAL))
    return _smallest_sigma(fits_with(PLD_VALUE_DISCRETIZATION_INTERVAL),
                           guess=coarse, factor=1.005)


def calibrate_noise_multiplier_once_per_epoch(
        *, target_epsilon: float, epochs: float, delta: float = 1e-5,
        queries_per_step: int = 1, accountant: str = "rdp") -> float:
    """Smallest noise multiplier whose once-per-epoch epsilon is <= target.

    The calibration for fixed-size shuffled batches, under replace-one
    adjacency (sensitivity 2C): twice the sigma that an unsubsampled Gaussian
    of sensitivity C needs over ceil(epochs) compositions.

    Args:
      target_epsilon: The privacy budget.
      epochs: Number of epochs; a partial epoch counts as a whole one.
      delta: Target delta.
      queries_per_step: Noisy gradient queries on the same batch per step.
      accountant: "rdp" or "pld".

    Returns:
      The optimizer's noise multiplier (per query), with
      `compute_epsilon_once_per_epoch(...) <= target_epsilon`.

    Raises:
      ValueError: If an argument is out of range or the target needs sigma > 1e6.
      TypeError: If an argument has the wrong type.
    """
    epochs = validation.check_positive("epochs", epochs)
    # Scaling by the sensitivity is exact in floating point (a power of two),
    # so the returned sigma fits exactly when the sensitivity-C one does.
    return REPLACE_ONE_SENSITIVITY * calibrate_noise_multiplier(
        target_epsilon=target_epsilon, sampling_probability=1.0,
        steps=_participations(epochs), delta=delta,
        queries_per_step=queries_per_step, accountant=accountant)


# ---------------------------------------------------------------- extra delta
def total_variation_delta(epsilon: float, eta: float) -> float:
    """Delta added by running a mechanism within total variation eta of M.

    If M is (epsilon, delta)-DP and the mechanism actually run, on every input,
    is within total variation eta of M, it is (epsilon, delta + (1 + e^epsilon)
    eta)-DP: P[M'(D) in S] <= P[M(D) in S] + eta <= e^epsilon P[M(D') in S] +
    delta + eta <= e^epsilon (P[M'(D') in S] + eta) + delta + eta.

    Args:
      epsilon: The run's epsilon (inf gives inf for any eta > 0).
      eta: The total variation bound, in [0, 1].

    Returns:
      (1 + e^epsilon) * eta (inf if that overflows).

    Raises:
      ValueError: If an argument is out of range.
    """
    eta = validation.check_non_negative("eta", eta)
    if eta > 1:
        raise ValueError(f"Expected eta={eta} <= 1 (a probability).")
    if eta == 0:
        return 0.0
    if epsilon == math.inf:  # No noise: no guarantee to add to.
        return math.inf
    epsilon = validation.check_non_negative("epsilon", epsilon)
    try:
        return (1.0 + math.exp(epsilon)) * eta
    except OverflowError:
        return math.inf


def sampler_tail_delta(epsilon: float, steps: int, queries_per_step: int,
                       num_params: int) -> float:
    """Delta added by the noise sampler's truncated Gaussian tail.

    The sampler turns two 32-bit Philox words per pair of normals into a
    float64 uniform u1 >= 2^-65 and the radius sqrt(-2 ln u1), so each pair's
    radius is truncated with probability at most 2^-64 relative to the ideal
    Gaussian. A run draws steps * queries_per_step * ceil(num_params / 2)
    pairs; by the union bound it is within total variation
    eta = steps * queries_per_step * ceil(num_params / 2) * 2^-64 of the ideal
    mechanism, which costs (1 + e^epsilon) * eta (`total_variation_delta`).

    Args:
      epsilon: The run's epsilon.
      steps: Noisy steps of the run.
      queries_per_step: Noisy queries per step.
      num_params: Noise coordinates drawn per query: the model's trainable
        parameters (times the replicas when each replica draws its own share).

    Returns:
      (1 + e^epsilon) * steps * queries_per_step * ceil(num_params / 2) * 2^-64.

    Raises:
      ValueError: If an argument is out of range.
    """
    pairs = (validation.check_int("steps", steps, 0)
             * validation.check_int("queries_per_step", queries_per_step, 1)
             * math.ceil(validation.check_int("num_params", num_params, 1) / 2))
    return total_variation_delta(epsilon, min(1.0, pairs * SAMPLER_TAIL_PROBABILITY))


def padding_overflow_delta(epsilon: float, overflow_probability: float) -> float:
    """Delta added by a padded Poisson batch that may overflow (and stop the run).

    Args:
      epsilon: The run's epsilon.
      overflow_probability: Bound on the probability that any batch of the run
        exceeds the padded size (`tf_dpsat.sampling.padded_batch_size`); 0 without
        padding.

    Returns:
      (1 + e^epsilon) * overflow_probability (`total_variation_delta`).
    """
    return total_variation_delta(epsilon, overflow_probability)


class DeltaBreakdown(NamedTuple):
    """The parts of a run's delta (`delta_breakdown`).

    Attributes:
      accountant: The accountant's delta, for which it computed epsilon.
      noise_tail: The noise sampler's truncated tail (`sampler_tail_delta`).
      padding_overflow: A padded Poisson batch's overflow
        (`padding_overflow_delta`); 0 without padding.
      total: Their sum: the run's delta. At least 1 bounds nothing.
    """
    accountant: float
    noise_tail: float
    padding_overflow: float
    total: float


def delta_breakdown(*, epsilon: float, delta: float, steps: int,
                    queries_per_step: int, num_params: int,
                    overflow_probability: float = 0.0) -> DeltaBreakdown:
    """The parts of a run's delta and their sum.

    Args:
      epsilon: The run's epsilon (of the analysis that applies).
      delta: The accountant's delta.
      steps, queries_per_step, num_params: As for `sampler_tail_delta`.
      overflow_probability: As for `padding_overflow_delta`.

    Returns:
      The parts and their total. `._asdict()` gives the JSON form that the
      training binary writes to results.json ("delta_parts").
    """
    accountant = validation.check_delta(delta)
    noise_tail = sampler_tail_delta(epsilon, steps, queries_per_step, num_params)
    padding_overflow = padding_overflow_delta(epsilon, overflow_probability)
    return DeltaBreakdown(accountant, noise_tail, padding_overflow,
                          total=accountant + noise_tail + padding_overflow)


def format_delta_breakdown(parts: DeltaBreakdown) -> str:
    """`accountant + noise tail + padding overflow = total`, in one line.

    A total of 1 or more (or inf) bounds nothing: the line says so.
    """
    line = (f"{parts.accountant:.6g} + {parts.noise_tail:.3g} + "
            f"{parts.padding_overflow:.3g} = {parts.total:.6g}")
    if not parts.total < 1:
        line += " (at least 1: no guarantee at this epsilon)"
    return line


# ------------------------------------------------------------------ statement
def _fill(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=80)


def privacy_statement(*, num_examples: int, batch_size: int,
                      noise_multiplier: float, epochs: float,
                      delta: float = 1e-5, num_microbatches: Optional[int] = None,
                      queries_per_step: int = 1, accountant: str = "rdp",
                      num_params: Optional[int] = None,
                      overflow_probability: float = 0.0) -> str:
    """A plain-text report of the example-level DP guarantee of a training run.

    Like tensorflow-privacy's `compute_dp_sgd_privacy_statement`: epsilon under
    Poisson sampling with q = batch_size / num_examples for `poisson_steps`
    (round(num_examples / batch_size) per epoch, the trainer's count; not
    tensorflow-privacy's ceil(epochs * num_examples / batch_size)), and under "each example once
    per epoch" for ceil(epochs) epochs, saying which applies to which pipeline
    and under which adjacency (add/remove-one for Poisson sampling, replace-one
    with sensitivity 2C for fixed-size batches), the parts of the total delta
    (with `num_params`), and which logged values are not private.

    With `num_microbatches` only the fixed-size analysis is stated, over
    floor(num_examples / batch_size) steps per epoch: tf_dpsat takes
    microbatches with fixed-size batches only (`DPSATKeras` refuses them with
    `expected_batch_size`, and `PrivacyCallback(sampling="poisson")` refuses
    them), because microbatches cut by position from a Poisson batch give one
    example a sensitivity of up to num_microbatches * C; the fixed-size
    analysis's 2C covers them.

    Args:
      num_examples: Training set size.
      batch_size: Examples per batch (expected size under Poisson sampling),
        regardless of microbatching.
      noise_multiplier: The optimizer's noise multiplier.
      epochs: Epochs of training; may be fractional.
      delta: Target delta.
      num_microbatches: Microbatches per batch, or None for per-example clipping.
      queries_per_step: Noisy gradient queries on the same batch per step.
      accountant: "rdp" or "pld".
      num_params: Noise coordinates per query (`sampler_tail_delta`); given,
        the statement adds the total delta of each analysis.
      overflow_probability: Bound on a padded Poisson batch overflowing
        (`padding_overflow_delta`); counted for the Poisson analysis only.

    Returns:
      The statement, paragraphs separated by blank lines, ending in a newline.

    Raises:
      ValueError: If an argument is out of range.
      TypeError: If an argument has the wrong type.
    """
    num_examples = validation.check_int("num_examples", num_examples, 1)
    batch_size = validation.check_int("batch_size", batch_size, 1)
    q = validation.check_probability("batch_size / num_examples", batch_size / num_examples)
    k = validation.check_int("queries_per_step", queries_per_step, 1)
    _check_accountant(accountant)
    if num_microbatches is not None:
        num_microbatches = validation.check_int("num_microbatches", num_microbatches, 1)
    # Replace-one adjacency bounds a microbatch's change by 2C as well: the
    # optimizer's sigma, not a microbatch-adjusted one.
    eps_epoch = compute_epsilon_once_per_epoch(
        noise_multiplier=noise_multiplier, epochs=epochs, delta=delta,
        queries_per_step=k, accountant=accountant)
    common = dict(num_examples=num_examples, batch_size=batch_size,
                  noise_multiplier=noise_multiplier, epochs=epochs, delta=delta,
                  k=k, accountant=accountant, num_params=num_params,
                  eps_epoch=eps_epoch)
    if num_microbatches is not None:
        return _fixed_size_statement(num_microbatches=num_microbatches, **common)
    return _poisson_and_fixed_size_statement(
        q=q, overflow_probability=overflow_probability, **common)


def _fixed_size_steps(num_examples: int, batch_size: int, epochs: float) -> int:
    """Steps for `epochs` epochs of fixed-size batches (arguments checked).

    floor(N / B) full batches per epoch, the trainer's count with
    sampling="shuffle" and `PrivacyCallback(sampling="shuffle")`'s, rounded
    up for a fractional epoch as in `poisson_steps`.
    """
    return max(1, math.ceil(epochs * (num_examples // batch_size) - _INTEGER_SLACK))


def _queries_paragraph(sigma: float, k: int, where: str) -> str:
    return _fill(f"""
        The {k} queries of each step use the same batch; together they are one
        Gaussian mechanism with noise multiplier {sigma:.10g} / sqrt({k}) =
        {_step_noise_multiplier(sigma, k):.4g}, {where}.""")


_GUARANTEE_COVERS_EVERY_MODEL = """
    The guarantee covers every intermediate model (all checkpoints), not only
    the final one."""

_FIXED_SIZE_FOOTNOTE = """
    (**) Replace-one adjacency (sensitivity 2C): replacing one example moves
    one clipped term by up to twice the clip norm, so the analysis uses
    noise multiplier sigma / 2. Applies to fixed-size batches from a shuffled
    pass over the data (the usual input pipeline), or any order in which each
    example is used at most once per epoch. No amplification by sampling is
    claimed."""


def _total_delta_paragraph(num_params: int, delta: float, steps: int, k: int,
                           analyses: Sequence[tuple]) -> str:
    """The total delta of each (label, epsilon, overflow probability)."""
    totals = [(label, delta_breakdown(epsilon=eps, delta=delta, steps=steps,
                                      queries_per_step=k, num_params=num_params,
                                      overflow_probability=overflow))
              for label, eps, overflow in analyses]
    return (_fill(f"""Total delta = accountant delta + noise sampler tail
                  ({num_params} noise coordinates per query) + padding overflow
                  (Poisson batches only); each extra term is (1 + e^epsilon) times
                  the probability of its event:""")
            + "".join(f"\n    {label:5}{format_delta_breakdown(parts)}"
                      for label, parts in totals))


def _poisson_and_fixed_size_statement(
        *, num_examples: int, batch_size: int, noise_multiplier: float,
        epochs: float, delta: float, k: int, accountant: str,
        num_params: Optional[int], eps_epoch: float, q: float,
        overflow_probability: float) -> str:
    """`privacy_statement` for per-example clipping: both analyses."""
    steps = poisson_steps(num_examples=num_examples, batch_size=batch_size,
                          epochs=epochs)
    eps_poisson = compute_epsilon(
        noise_multiplier=noise_multiplier, sampling_probability=q, steps=steps,
        delta=delta, queries_per_step=k, accountant=accountant)
    paragraphs = [_fill(f"""
        DP training over {num_examples} examples with {batch_size} examples per
        step (sampling probability q = {q:.4g}), noise multiplier
        {noise_multiplier:.10g}, {epochs:g} epochs = {steps} steps
        (round(num_examples / batch_size) per epoch, as the trainer runs), {k}
        noisy gradient
        quer{'y' if k == 1 else 'ies'} per step,
        without microbatching.""")]
    if k > 1:
        paragraphs.append(_queries_paragraph(noise_multiplier, k,
                                             "subsampled once per step"))
    paragraphs.append(_fill(_GUARANTEE_COVERS_EVERY_MODEL))
    paragraphs.append(
        _fill(f"""Example-level DP, delta = {delta:g} (accountant),
              {accountant.upper()} accounting:""")
        + f"\n    {'Epsilon with Poisson sampling (*):':48}{eps_poisson:10.3f}"
        + f"\n    {'Epsilon with each example once per epoch (**):':48}"
        + f"{eps_epoch:10.3f}")
    paragraphs.append(_fill("""
        (*) Add/remove-one adjacency. Applies only if every step forms its batch by
        including each example independently with probability q (variable batch
        size)."""))
    paragraphs.append(_fill(_FIXED_SIZE_FOOTNOTE))
    if num_params is not None:
        paragraphs.append(_total_delta_paragraph(
            num_params, delta, steps, k,
            (("(*)", eps_poisson, overflow_probability), ("(**)", eps_epoch, 0.0))))
    # Always: the shuffle analysis's sensitivity 2C alone makes it roughly 2x
    # (up to 4x) the Poisson value, even when the batch is the whole dataset.
    ratio = (f"a factor of {eps_epoch / eps_poisson:.1f}" if eps_poisson > 0
             else "epsilon 0 (the RDP-to-DP conversion's total-variation bound) "
                  f"against {eps_epoch:.3g}")
    paragraphs.append(_fill(f"""
        WARNING: the two analyses differ by {ratio}. Report the Poisson value only if the
        batches really were Poisson-sampled; for shuffled fixed-size batches it
        is not a proven guarantee."""))
    paragraphs.append(_fill(NON_PRIVATE_NOTE))
    return "\n\n".join(paragraphs) + "\n"


def _fixed_size_statement(
        *, num_examples: int, batch_size: int, noise_multiplier: float,
        epochs: float, delta: float, k: int, accountant: str,
        num_params: Optional[int], eps_epoch: float,
        num_microbatches: int) -> str:
    """`privacy_statement` with microbatches: the fixed-size analysis only."""
    steps = _fixed_size_steps(num_examples, batch_size, epochs)
    half = noise_multiplier / REPLACE_ONE_SENSITIVITY
    paragraphs = [_fill(f"""
        DP training over {num_examples} examples with fixed-size batches of
        {batch_size} examples, noise multiplier {noise_multiplier:.10g},
        {epochs:g} epochs = {steps} steps (floor(num_examples / batch_size) per
        epoch, as the trainer runs), {k} noisy gradient
        quer{'y' if k == 1 else 'ies'} per step, with {num_microbatches}
        microbatches of {batch_size / num_microbatches:g} examples per
        batch.""")]
    paragraphs.append(_fill(f"""
        Microbatches: no epsilon with Poisson sampling is stated, since
        tf_dpsat takes microbatches with fixed-size batches only (DPSATKeras
        refuses num_microbatches with expected_batch_size, and
        PrivacyCallback(sampling="poisson") refuses it): cut by position from
        a Poisson batch, one added or removed example shifts every later row
        into another microbatch (sensitivity up to {num_microbatches} C).
        Replacing one example moves its own microbatch's clipped gradient by at
        most twice the clip norm, the sensitivity the (**) analysis already
        uses: noise multiplier {noise_multiplier:.10g} / 2 = {half:.10g}."""))
    if k > 1:
        paragraphs.append(_queries_paragraph(
            half, k, "once per epoch for each example"))
    paragraphs.append(_fill(_GUARANTEE_COVERS_EVERY_MODEL))
    paragraphs.append(
        _fill(f"""Example-level DP, delta = {delta:g} (accountant),
              {accountant.upper()} accounting:""")
        + f"\n    {'Epsilon with each example once per epoch (**):':48}"
        + f"{eps_epoch:10.3f}")
    paragraphs.append(_fill(_FIXED_SIZE_FOOTNOTE))
    if num_params is not None:
        paragraphs.append(_total_delta_paragraph(num_params, delta, steps, k,
                                                 (("(**)", eps_epoch, 0.0),)))
    paragraphs.append(_fill(NON_PRIVATE_NOTE))
    return "\n\n".join(paragraphs) + "\n"


# ------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tf_dpsat.accounting",
        description="Privacy statement for DP-SGD / DP-SAT / DP-SAM training, or "
                    "the noise multiplier for a target epsilon.")
    parser.add_argument("--num_examples", type=int, required=True,
                        help="training set size N")
    parser.add_argument("--batch_size", type=int, required=True,
                        help="examples per step B (expected size under Poisson "
                             "sampling), regardless of microbatching")
    parser.add_argument("--epochs", type=float, required=True,
                        help="epochs of training; each epoch is round(N / B) "
                             "steps, as in the trainer (may be fractional)")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--noise_multiplier", type=float,
                      help="the optimizer's noise multiplier: print the "
                           "statement for it")
    goal.add_argument("--epsilon", type=float,
                      help="target epsilon: calibrate the noise multiplier "
                           "(Poisson sampling analysis; with --num_microbatches "
                           "the once-per-epoch one)")
    parser.add_argument("--delta", type=float, default=1e-5,
                        help="target delta (default: %(default)g)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp",
                        help="rdp (Renyi DP) or pld (privacy loss distributions, "
                             "tighter, slower); default: %(default)s")
    parser.add_argument("--num_microbatches", type=int, default=None,
                        help="microbatches per batch: tf_dpsat takes them with "
                             "fixed-size batches only, so only the once-per-epoch "
                             "analysis (sensitivity 2C) is stated (default: "
                             "per-example clipping, both analyses)")
    parser.add_argument("--queries_per_step", type=int, default=1,
                        help="noisy gradient queries on the same batch per step: "
                             "1 for DP-SGD / DP-SAT, 2 for DP-SAM (default: "
                             "%(default)s)")
    parser.add_argument("--num_params", type=int, default=None,
                        help="trainable parameters: adds the total delta "
                             "(accountant + noise sampler tail)")
    return parser


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _calibrate_for_cli(args: argparse.Namespace) -> float:
    """The optimizer's noise multiplier for --epsilon, under the analysis that applies.

    Poisson sampling for per-example clipping. With --num_microbatches the
    fixed-size (once per epoch) analysis, the only one `privacy_statement`
    states for microbatches; its sensitivity 2C already covers them, so the
    calibrated sigma is the optimizer's as it is.
    """
    if args.num_microbatches is not None:
        sigma = calibrate_noise_multiplier_once_per_epoch(
            target_epsilon=args.epsilon, epochs=args.epochs, delta=args.delta,
            queries_per_step=args.queries_per_step, accountant=args.accountant)
        analysis = (f"with each example once per epoch over "
                    f"{_participations(args.epochs)} epochs (fixed-size batches, "
                    f"as --num_microbatches needs)")
    else:
        steps = poisson_steps(num_examples=args.num_examples,
                              batch_size=args.batch_size, epochs=args.epochs)
        q = validation.check_probability("batch_size / num_examples",
                                         args.batch_size / args.num_examples)
        sigma = calibrate_noise_multiplier(
            target_epsilon=args.epsilon, sampling_probability=q, steps=steps,
            delta=args.delta, queries_per_step=args.queries_per_step,
            accountant=args.accountant)
        analysis = f"with Poisson sampling over {steps} steps"
    print(f"Calibrated noise multiplier: {sigma:.10g} (epsilon <= {args.epsilon:g} "
          f"at delta = {args.delta:g} {analysis}, "
          f"{args.accountant.upper()} accounting)\n")
    return sigma


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the process exit status."""
    args = _parse_args(argv)
    try:
        sigma = args.noise_multiplier
        if args.epsilon is not None:
            sigma = _calibrate_for_cli(args)
        print(privacy_statement(
            num_examples=args.num_examples, batch_size=args.batch_size,
            noise_multiplier=sigma, epochs=args.epochs, delta=args.delta,
            num_microbatches=args.num_microbatches,
            queries_per_step=args.queries_per_step, accountant=args.accountant,
            num_params=args.num_params), end="")
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

