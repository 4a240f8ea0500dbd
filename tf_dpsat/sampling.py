"""Private batch sampling: Poisson-sampled batches with one static shape.

The privacy guarantee of DP-SGD style training holds only for the sampling it
was proven for, so this module is part of the core: `poisson_dataset` and
`padded_batch_size` for private training, `shuffle_dataset` for the
"each example once per epoch" analysis and non-private baselines, and
`test_dataset` for evaluation.

Sampling scheme:
  DP-SGD's privacy analysis for subsampled Gaussian mechanisms (Abadi et al.
  2016, "Deep Learning with Differential Privacy"; Mironov, Talwar and Zhang
  2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism")
  assumes *Poisson* subsampling: at every step each of the `N` training
  examples joins the batch independently with probability
  `q = expected_batch_size / N`. The batch size is therefore random,
  `Binomial(N, q)`.

  XLA compiles one program per input shape, so `poisson_dataset` pads every
  batch to a fixed `padded_size` with rows whose sample weight is 0 (and whose
  image and label are zeros). A weight-0 row contributes exactly nothing to
  the clipped-gradient sum. The optimizer must divide the noisy sum by the
  *expected* batch size `q * N` -- not by the realised batch size, and not by
  `padded_size` -- because the realised size depends on whether a particular
  example was sampled, so dividing by it would leak information that the
  sampled-Gaussian analysis does not account for; the expected size is a
  public constant.

Overflow:
  If a step samples more than `padded_size` examples the pipeline *raises*
  (`tf.errors.InvalidArgumentError`) instead of dropping examples or
  resampling. Dropping examples or redrawing until the batch fits both
  condition the sample on its size, which changes the sampling distribution
  away from the independent Bernoulli(q) inclusions the privacy accountant
  assumes; the reported epsilon would then be wrong. `padded_batch_size` picks
  a cap whose overflow probability over the whole run is below a chosen bound
  (1e-6 by default), so the error is a rare, loud event with a clear fix.

Gradient accumulation:
  A logical step accumulated over k physical batches must draw ONE Poisson
  sample and cut it into k pieces (`poisson_dataset(..., physical_batches=k)`),
  never draw k samples: with k independent draws an example can join one
  noisy step several times, a sensitivity the accountant does not price.
  `shuffle_dataset(..., physical_batches=k)` likewise cuts each fixed-size
  batch into k pieces.

Reproducibility:
  Step `t`'s sample is a function of `(seed, t)` only (stateless Philox RNG),
  so a run resumed at `start_step=k` sees exactly the batches an uninterrupted
  run sees from step `k` on. That is for a new process, whose optimizer
  replays the same noise at those steps. After a restore to an earlier step
  in the same process the optimizer draws fresh noise, and epsilon counts
  the replayed steps as fresh ones: draw their batches with a new key, since
  the same batches queried again cost more.
"""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import Callable
from typing import Optional

import scipy.stats
import tensorflow as tf
from absl import logging

from tf_dpsat import noise

__all__ = [
    "Preprocess",
    "padded_batch_size",
    "padded_size_bound",
    "poisson_dataset",
    "shuffle_dataset",
    "test_dataset",
]

# Maps a batch of images (typically uint8) to float32, e.g. a normalisation.
Preprocess = Callable[[tf.Tensor], tf.Tensor]


# --------------------------------------------------------------------------
# Poisson sampling with static shapes.
# --------------------------------------------------------------------------


def padded_batch_size(expected_batch_size: float, num_examples: int, steps: int, *,
                      failure_probability: float = 1e-9, multiple_of: int = 1) -> int:
    """Smallest static batch size that Poisson batches overflow only rarely.

    Each step's batch size is `B ~ Binomial(N, q)` with
    `q = expected_batch_size / N`. By the union bound over `steps` steps,
    `P(any B > cap) <= steps * P(B > cap)`; the cap is the smallest integer
    making that bound `<= failure_probability`, rounded up to a multiple of
    `multiple_of`.

    Args:
      expected_batch_size: Expected (logical) batch size `q * N`; it may be
        fractional here (`poisson_dataset` takes integers only).
      num_examples: Training-set size `N`.
      steps: Number of steps of the whole run.
      failure_probability: Allowed probability that any step overflows. An
        overflow stops the run, an event that depends on the data: it adds
        `(1 + e^epsilon) * failure_probability` to the run's delta
        (`tf_dpsat.accounting.padding_overflow_delta`). The default, 1e-9,
        keeps that below 1e-6 up to epsilon 6.9; keep it far below delta.
      multiple_of: Round up to a multiple of this, e.g. the physical batch
        size when gradient accumulation splits each logical batch.

    Returns:
      The padded batch size.

    Raises:
      ValueError: Arguments out of range.
    """
    _check_sampling_args(expected_batch_size, num_examples, steps)
    if not 0.0 < failure_probability < 1.0:
        raise ValueError(f"failure_probability must be in (0, 1), got {failure_probability}.")
    if int(multiple_of) != multiple_of or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of}.")
    n, q = int(num_examples), expected_batch_size / num_examples
    cap = _binomial_tail_cap(n, q, failure_probability / steps)
    cap = -(-cap // multiple_of) * multiple_of
    overflow = min(1.0, steps * float(scipy.stats.binom.sf(cap, n, q)))
    logging.info(
        "Poisson sampling: q=%.6g (expected batch %g of N=%d), %d steps -> padded "
        "batch size %d; P(any step overflows) <= %.3g (union bound).",
        q, expected_batch_size, n, steps, cap, overflow)
    return int(cap)


def _binomial_tail_cap(n: int, q: float, tail: float) -> int:
    """Smallest integer `c` with `P(Binomial(n, q) > c) <= tail`."""
    binom = scipy.stats.binom
    cap = int(min(max(binom.isf(tail, n, q), 0), n))
    # isf is a floating-point inversion; settle the exact boundary by hand.
    while cap < n and binom.sf(cap, n, q) > tail:
        cap += 1
    while cap > 0 and binom.sf(cap - 1, n, q) <= tail:
        cap -= 1
    return cap


# The smallest per-step overflow probability `padded_size_bound` covers:
# `padded_batch_size`'s failure_probability / steps is far above it (1e-9 over
# a billion steps is 1e-18).
SMALLEST_OVERFLOW_TAIL = 1e-30


def padded_size_bound(expected_batch_size: float) -> int:
    """An upper bound on every `padded_batch_size(expected_batch_size, ...)`.

    Whatever the training-set size N and the number of steps, as long as
    `failure_probability / steps >= SMALLEST_OVERFLOW_TAIL` (1e-30), and before
    the rounding up to `multiple_of`. The Chernoff bound for
    `B ~ Binomial(N, mu / N)` with mean `mu = expected_batch_size`,
    `P(B >= c) <= exp(-(c ln(c / mu) - c + mu))` for `c > mu`, holds for
    every N; its smallest `c` with a right side `<= 1e-30` bounds the cap
    `padded_batch_size` computes exactly. A padded Poisson batch needs more
    rows than this only if it was padded far beyond any overflow bound:
    `tf_dpsat.DPSATKeras` reads a logical batch of more rows as a sign that
    its `expected_batch_size` is not the logical batch's.

    Args:
      expected_batch_size: The expected (logical) batch size `mu > 0`.

    Returns:
      The bound, an integer > `expected_batch_size`.

    Raises:
      ValueError: `expected_batch_size <= 0`.
    """
    mu = float(expected_batch_size)
    if not mu > 0:
        raise ValueError(f"Expected expected_batch_size={expected_batch_size} > 0.")
    target = math.log(1 / SMALLEST_OVERFLOW_TAIL)

    def fits(c: int) -> bool:  # Increasing in c for c > mu.
        return c * math.log(c / mu) - c + mu >= target

    lo, hi = math.floor(mu), math.floor(mu) + 1
    while not fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # fits(hi), and lo <= mu or not fits(lo).
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _check_sampling_args(expected_batch_size: int, num_examples: int, steps: int) -> None:
    if num_examples < 1:
        raise ValueError(f"num_examples must be positive, got {num_examples}.")
    if not 0 < expected_batch_size <= num_examples:
        raise ValueError(f"expected_batch_size must be in (0, {num_examples}], got "
                         f"{expected_batch_size}.")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}.")


def poisson_dataset(images: Any, labels: Any, *, expected_batch_size: int, steps: int,
                    padded_size: int, seed: Optional[int] = None, start_step: int = 0,
                    preprocess: Optional[Preprocess] = None,
                    physical_batches: int = 1) -> tf.data.Dataset:
    """Poisson-sampled batches, padded to one static shape, for DP training.

    At step `t` each example is included independently with probability
    `q = expected_batch_size / N`, drawn from a stateless RNG keyed by
    `(seed, t)`. Sampled examples come first (in index order), then padding
    rows with zero image, zero label and weight 0.

    Gradient accumulation: with `physical_batches=k` each step's padded
    batch (the logical batch) is cut, in order, into k consecutive physical
    batches of `padded_size / k` rows, for
    `DPSATKeras(gradient_accumulation_steps=k,
    expected_batch_size=expected_batch_size)`: the k pieces concatenated are
    exactly the logical batch that `physical_batches=1` gives for the same
    seed and step, so every example is in at most one piece of a step.
    Feeding the optimizer k independently sampled Poisson batches instead
    would let an example join one noisy step several times (sensitivity up
    to k C) and make the accountant's epsilon too small. To bound the rows
    per pass by P, take `padded_size = padded_batch_size(...,
    multiple_of=P)` and `k = padded_size // P`.

    Args:
      images: `(N, H, W, C)` array or tensor (typically uint8).
      labels: `(N, ...)` labels.
      expected_batch_size: `q * N`, an integer: the optimizer's
        `expected_batch_size` and `tf_dpsat.PrivacyCallback(batch_size=)`
        are integers, and the accountant's q must be the sampler's (a
        rounded-down q would undercount epsilon).
      steps: Total number of steps of the run; the dataset yields steps
        `start_step .. steps - 1`.
      padded_size: Static batch size, e.g. from `padded_batch_size`.
      seed: The sampling key (`0 <= seed < 2**63`). Privacy amplification by
        subsampling assumes nobody knows the batches, so the key must be
        secret: `None` (default) draws one from OS entropy
        (`tf_dpsat.noise.secret_key`). Pass a key only to resume a
        run (keep it as private as the data) or, knowingly, to reproduce one.
      start_step: First (logical) step to yield, for resuming.
      preprocess: Maps a uint8 `(rows, H, W, C)` batch to float32, e.g.
        `functools.partial(tf_dpsat.experiments.datasets.normalize,
        name="cifar10")`. `None` casts to float32 unchanged (for images
        normalised beforehand).
      physical_batches: k >= 1 physical batches per logical step (see
        above); it must divide `padded_size`.

    Returns:
      A `tf.data.Dataset` of `(x, y, sample_weight)`, `k * (steps -
      start_step)` elements of `rows = padded_size / k` rows, the k pieces
      of each step in order: `x` float32 `(rows, ...)`, `y` `(rows, ...)`,
      `sample_weight` float32 `(rows,)` with 1.0 for sampled rows and 0.0
      for padding. Padding rows of `x` are zeroed by multiplying with the
      weight, so a negative preprocessed value becomes -0.0 (equal to 0.0).

    Raises:
      ValueError: Inconsistent arguments, a non-integer `expected_batch_size`
        among them (checked eagerly).
      tf.errors.InvalidArgumentError: While iterating, if a step samples more
        than `padded_size` examples (see the module docstring for why this
        raises rather than drops or resamples).
    """
    if (isinstance(expected_batch_size, bool) or
            not isinstance(expected_batch_size, numbers.Real) or
            not math.isfinite(expected_batch_size) or
            int(expected_batch_size) != expected_batch_size):
        raise ValueError(
            f"Expected expected_batch_size={expected_batch_size!r} to be an integer: "
            "the optimizer's expected_batch_size and PrivacyCallback(batch_size=) are "
            "integers, and a q = expected_batch_size / N rounded for them would differ "
            "from the one sampled here (rounded down, epsilon is undercounted). Pick an "
            "integer expected batch size and pass the same to the optimizer.")
    return _poisson_dataset(
        images, labels, expected_batch_size=int(expected_batch_size), steps=steps,
        padded_size=padded_size, seed=seed, start_step=start_step, preprocess=preprocess,
        physical_batches=physical_batches)


def _poisson_dataset(images: Any, labels: Any, *, expected_batch_size: float, steps: int,
                     padded_size: int, seed: Optional[int] = None, start_step: int = 0,
                     preprocess: Optional[Preprocess] = None,
                     physical_batches: int = 1) -> tf.data.Dataset:
    """`poisson_dataset` for an expected batch size that may be fractional.

    Only for callers that account for q = expected_batch_size / N
    themselves, such as the privacy audit (`tf_dpsat.audit`), whose q must
    not depend on the drawn training-set size.
    """
    num_examples = _check_arrays(images, labels)
    _check_sampling_args(expected_batch_size, num_examples, steps)
    seed = noise.secret_key() if seed is None else _check_seed(seed)
    if int(padded_size) != padded_size or padded_size < expected_batch_size:
        raise ValueError(f"padded_size must be an integer >= expected_batch_size "
                         f"({expected_batch_size}), got {padded_size}; use padded_batch_size().")
    if int(start_step) != start_step or not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, steps={steps}], got {start_step}.")
    parts = _check_physical_batches(physical_batches)
    if padded_size % parts:
        raise ValueError(
            f"Expected physical_batches={parts} to divide padded_size="
            f"{padded_size}. Take padded_size = padded_batch_size(..., "
            f"multiple_of=rows) for the rows per physical batch, and "
            f"physical_batches = padded_size // rows.")
    images_t, labels_t = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)
    q = float(expected_batch_size) / num_examples
    padded_size = int(padded_size)
    rows = padded_size // parts

    def make_batch(index: tf.Tensor):
        # Each piece redraws its step's whole sample (the same one: the draw
        # is a function of (seed, step)) and keeps its rows: the pieces are
        # the logical batch, and the dataset keeps a known length.
        step, piece = index // parts, index % parts
        indices = _poisson_indices(step, seed, num_examples, q)
        count = tf.size(indices, out_type=tf.int64)
        check = tf.debugging.Assert(count <= padded_size,
                                    [_overflow_message(step, count, padded_size)])
        with tf.control_dependencies([check]):
            padding = tf.cast(padded_size, tf.int64) - count
        padded = tf.ensure_shape(tf.pad(indices, [[0, padding]]), [padded_size])
        position = piece * rows + tf.range(rows, dtype=tf.int64)
        return _gather_batch(images_t, labels_t, tf.gather(padded, position),
                             position < count, preprocess)

    ds = tf.data.Dataset.range(int(start_step) * parts, int(steps) * parts)
    # deterministic=True keeps step order; each batch depends only on its step.
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _poisson_indices(step: tf.Tensor, seed: int, num_examples: int, q: float) -> tf.Tensor:
    """Sorted int64 indices of the examples included at `step`."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    # float64 uniforms so P(u < q) equals q to ~1e-16 even for tiny q; Philox
    # named explicitly so the sample is the same on every device type.
    u = tf.random.stateless_uniform([num_examples], seed=key, dtype=tf.float64, alg="philox")
    return tf.where(u < q)[:, 0]


def _overflow_message(step: tf.Tensor, count: tf.Tensor, padded_size: int) -> tf.Tensor:
    return tf.strings.format(
        "Poisson sampling overflow at step {}: {} examples sampled but padded_size is "
        + str(padded_size) + ". Examples are never dropped or resampled (that would "
        "change the sampling distribution the privacy accountant assumes). Fix: use a "
        "larger padded size, e.g. padded_batch_size(...) with a smaller "
        "failure_probability.", [step, count])


def _gather_batch(images: tf.Tensor, labels: tf.Tensor, indices: tf.Tensor, weight: tf.Tensor,
                  preprocess: Optional[Preprocess]):
    """Gathers rows; zeroes x and y where `weight` is False."""
    x = tf.gather(images, indices)
    x = preprocess(x) if preprocess is not None else tf.cast(x, tf.float32)
    weight = tf.cast(weight, tf.float32)
    # Zero after preprocessing: normalising a zero image gives -mean/std, and
    # padding must be inert whatever the preprocessing. A multiply rather than
    # tf.where with a (B, 1, 1, 1) mask, which is slower on CPU; padding rows
    # repeat example 0, so they are finite whenever the real data is.
    x = tf.cast(x, tf.float32) * _expand_like(weight, x)
    y = tf.gather(labels, indices)
    y = tf.where(_expand_like(weight > 0, y), y, tf.zeros_like(y))
    return x, y, weight


def _expand_like(mask: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes a `(B,)` mask to broadcast against `like` `(B, ...)`."""
    rank = like.shape.rank
    if rank is None:
        ones = tf.ones([tf.rank(like) - 1], tf.int32)
        return tf.reshape(mask, tf.concat([tf.shape(mask), ones], 0))
    return tf.reshape(mask, [-1] + [1] * (rank - 1))


def _check_arrays(images: Any, labels: Any) -> int:
    n_images, n_labels = int(images.shape[0]), int(labels.shape[0])
    if n_images != n_labels:
        raise ValueError(f"{n_images} images but {n_labels} labels.")
    if n_images < 1:
        raise ValueError("No examples.")
    return n_images


def _check_physical_batches(physical_batches: int) -> int:
    if int(physical_batches) != physical_batches or physical_batches < 1:
        raise ValueError(f"Expected physical_batches={physical_batches} to be a positive "
                         "integer: the physical batches per logical batch.")
    return int(physical_batches)


def _check_seed(seed: int) -> int:
    if int(seed) != seed or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}.")
    return int(seed)


# --------------------------------------------------------------------------
# Non-private and evaluation pipelines.
# --------------------------------------------------------------------------


def shuffle_dataset(images: Any, labels: Any, *, batch_size: int,
                    seed: Optional[int] = None, epoch: int = 0,
                    drop_remainder: bool = True,
                    preprocess: Optional[Preprocess] = None,
                    physical_batches: int = 1) -> tf.data.Dataset:
    """One epoch of shuffled fixed-size batches (non-private baselines).

    The permutation depends only on `(seed, epoch)`. Keras re-iterating the
    returned dataset replays the same order, so build one per epoch.

    Gradient accumulation: with `physical_batches=k` each fixed-size batch of
    `batch_size` rows (the logical batch) is cut, in order, into k
    consecutive physical batches of `batch_size / k` rows, for an optimizer
    with `gradient_accumulation_steps=k`: the k pieces concatenated are
    exactly the batch that `physical_batches=1` gives for the same seed and
    epoch, so each logical step still uses every example at most once, as
    the once-per-epoch analysis assumes.

    Args:
      images: `(N, H, W, C)` array or tensor.
      labels: `(N, ...)` labels.
      batch_size: Examples per batch.
      seed: The shuffling key (`0 <= seed < 2**63`); `None` (default)
        draws a secret one from OS entropy. For DP training keep it secret,
        like the noise; to shuffle every epoch of a run alike, pass the same
        key to each epoch's call.
      epoch: Epoch number selecting the permutation.
      drop_remainder: Drop the last partial batch, keeping shapes static.
        With False the last batch is smaller and the batch dimension is None.
      preprocess: As in `poisson_dataset`.
      physical_batches: k >= 1 physical batches per logical batch (see
        above); it must divide `batch_size`, and k > 1 needs
        `drop_remainder=True` (a partial last batch has no k equal pieces).

    Returns:
      A `tf.data.Dataset` of `(x, y, sample_weight)`, weights all 1.0:
      `k * (N // batch_size)` batches of `batch_size / k` rows with
      `drop_remainder`, the k pieces of each logical batch in order.

    Raises:
      ValueError: Bad arguments.
    """
    num_examples = _check_arrays(images, labels)
    seed = noise.secret_key() if seed is None else _check_seed(seed)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if drop_remainder and batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} > {num_examples} examples with "
                         "drop_remainder=True would yield no batches.")
    parts = _check_physical_batches(physical_batches)
    if batch_size % parts:
        raise ValueError(
            f"Expected physical_batches={parts} to divide batch_size={batch_size}. "
            "Take a batch_size that is a multiple of the rows per physical batch, "
            "and physical_batches = batch_size // rows.")
    if parts > 1 and not drop_remainder:
        raise ValueError(
            f"Expected drop_remainder=True with physical_batches={parts}: the last, "
            "partial batch cannot be cut into equal pieces. Pass drop_remainder=True "
            "or physical_batches=1.")
    key = tf.constant([seed, int(epoch)], tf.int64)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=key, alg="philox")
    if parts > 1:
        # Batching the rows of the whole logical batches by batch_size / k
        # cuts each into its k pieces. The rows of the partial batch are cut
        # off here: batched by the smaller size they would fill pieces of
        # their own that no logical batch has.
        order = order[:num_examples // batch_size * batch_size]
    return _indexed_batches(images, labels, order, batch_size // parts, drop_remainder,
                            preprocess, with_weight=True)


def test_dataset(images: Any, labels: Any, *, batch_size: int,
                 preprocess: Optional[Preprocess] = None) -> tf.data.Dataset:
    """Sequential batches covering every example once (the last may be smaller).

    Args:
      images: `(N, H, W, C)` array or tensor.
      labels: `(N, ...)` labels.
      batch_size: Examples per batch.
      preprocess: As in `poisson_dataset`.

    Returns:
      A `tf.data.Dataset` of `(x, y)`.

    Raises:
      ValueError: Bad arguments.
    """
    num_examples = _check_arrays(images, labels)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    order = tf.range(num_examples, dtype=tf.int64)
    return _indexed_batches(images, labels, order, batch_size, False, preprocess,
                            with_weight=False)


# The name starts with "test_"; stop pytest collecting it if a test module
# imports it directly.
test_dataset.__test__ = False


def _indexed_batches(images: Any, labels: Any, order: tf.Tensor, batch_size: int,
                     drop_remainder: bool, preprocess: Optional[Preprocess],
                     with_weight: bool) -> tf.data.Dataset:
    images_t, labels_t = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)

    def gather(indices: tf.Tensor):
        x = tf.gather(images_t, indices)
        x = tf.cast(preprocess(x) if preprocess is not None else x, tf.float32)
        y = tf.gather(labels_t, indices)
        if not with_weight:
            return x, y
        return x, y, tf.ones(tf.shape(indices), tf.float32)

    ds = tf.data.Dataset.from_tensor_slices(order).batch(int(batch_size), drop_remainder)
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
