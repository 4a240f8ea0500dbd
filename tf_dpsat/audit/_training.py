"""The one training run of the audit: digits plus canaries, tf_dpsat's real path.

Kept apart from `tf_dpsat.audit` so that the bound functions import without
TensorFlow. Everything privacy-relevant goes through the library exactly as a
user's training would: `tf_dpsat.sampling.padded_batch_size` and
`poisson_dataset` (Poisson sampling, zero-weight padding), `make_private`,
`DPSATKeras` (its clipping engine and noise) and `model.fit`.

The digits come from the experiment kit's loader
(`tf_dpsat.experiments.datasets`, which imports without the kit's extra);
loading them needs scikit-learn: `pip install "tf_dpsat[experiments]"`.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_dpsat import accounting
from tf_dpsat import sampling
from tf_dpsat import validation
from tf_dpsat.dp_model import make_private
from tf_dpsat.experiments import datasets
from tf_dpsat.optimizer import DPSATKeras

DATASET = "digits"


@dataclasses.dataclass(frozen=True)
class CanaryRun:
    """What the auditors see of one training run, and its privacy claim.

    Attributes:
      white_box_scores: (m,) movement of each canary's kernel row along the
        descent direction of its initial clipped gradient.
      black_box_scores: (m,) minus the final model's loss on each canary.
      claimed_epsilon: The accountant's epsilon for `noise_multiplier`.
      noise_multiplier: sigma calibrated to the target epsilon.
      num_examples: N, real examples plus included canaries.
      sampling_probability: q = expected_batch_size / (real examples + m / 2),
        the same whichever canaries are in.
      test_accuracy: Accuracy of the final model on the digits test split.
    """

    white_box_scores: np.ndarray
    black_box_scores: np.ndarray
    claimed_epsilon: float
    noise_multiplier: float
    num_examples: int
    sampling_probability: float
    test_accuracy: float


class _Progress(keras.callbacks.Callback):
    """Logs the training loss every `every` steps (audits can run minutes)."""

    def __init__(self, every: int, steps: int):
        super().__init__()
        self._every, self._steps = every, steps

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1
        if self._every and (step % self._every == 0 or step == self._steps):
            logging.info("audit: step %d/%d, loss %.4f", step, self._steps,
                         float((logs or {}).get("loss", float("nan"))))


def _features(images: np.ndarray, width: int) -> np.ndarray:
    """Flattened normalized pixels, then zeros up to `width` (the canary features)."""
    pixels = np.asarray(datasets.normalize(tf.constant(images), DATASET))
    pixels = pixels.reshape(len(images), -1).astype(np.float32)
    return np.pad(pixels, [(0, 0), (0, width - pixels.shape[1])])


def _build_model(pixels: int, canaries: int, hidden_units: int,
                 num_classes: int, seed: int) -> keras.Model:
    """MLP (pixels + canaries) -> tanh(hidden) -> logits; canary rows start at 0.

    The pixel rows are initialized as for a pixels-wide input, so the real
    model does not depend on the canary count. Zero canary rows make all
    canaries alike at the initial weights and put a canary's gradient in its
    own row: with input s * e_{d+j}, the row gets s * W2 (p - y) * tanh'(b1)
    while no other weight's gradient grows with s (tanh(b1 + 0) = 0 feeds
    nothing to W2 at the start). tanh, not relu: relu'(0) = 0 would give the
    zero rows no gradient at all.
    """
    inputs = keras.Input((pixels + canaries,))
    first = keras.layers.Dense(hidden_units, activation="tanh", name="first")
    outputs = keras.layers.Dense(
        num_classes, name="logits",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(
            first(inputs))
    model = keras.Model(inputs, outputs, name="audit_mlp")
    pixel_rows = keras.initializers.GlorotUniform(seed=seed)(
        (pixels, hidden_units))
    first.kernel.assign(tf.concat(
        [pixel_rows, tf.zeros((canaries, hidden_units))], axis=0))
    return model


def _loss(model: keras.Model, x: np.ndarray, label: int) -> tf.Tensor:
    """Per-example cross-entropy of `model` on `x`, all labelled `label`."""
    logits = model(x, training=False)
    labels = tf.fill([tf.shape(logits)[0]], label)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def _row_gradients(model: keras.Model, x: np.ndarray, label: int,
                   rows: slice) -> np.ndarray:
    """Each canary's loss gradient restricted to its own first-kernel row.

    Canary j's input is nonzero only in feature d+j, so the gradient of the
    SUM of the canaries' losses has, in row d+j, canary j's own gradient:
    one backward pass gives all m rows.
    """
    kernel = model.get_layer("first").kernel
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(_loss(model, x, label))
    return tape.gradient(total, kernel).numpy()[rows]


def _canary_scale(model: keras.Model, pixels: int, canaries: int,
                  l2_norm_clip: float, margin: float, label: int) -> float:
    """The input scale s that makes a canary's row gradient `margin` * C.

    At the initial weights the row gradient is exactly linear in s (the row is
    0, so s does not enter the activations), so one gradient at s = 1 fixes s.
    """
    unit = np.zeros((1, pixels + canaries), np.float32)
    unit[0, pixels] = 1.0
    norm = float(np.linalg.norm(
        _row_gradients(model, unit, label, slice(pixels, pixels + 1))))
    if not norm > 0:
        raise ValueError(
            "The audit model gives the canaries no gradient at the initial "
            f"weights (norm {norm}), so no scale makes them clipped. Change "
            "the seed or hidden_units.")
    return margin * l2_norm_clip / norm


def _optimizer(control: str, sigma: float, *, l2_norm_clip: float,
               no_clipping_norm: float, **kwargs) -> DPSATKeras:
    """DPSATKeras as the release runs it: correct, or broken as `control` says."""
    if control == "no_noise":
        with warnings.catch_warnings():
            # The optimizer rightly warns that sigma = 0 is not private;
            # that is this control's point.
            warnings.simplefilter("ignore")
            return DPSATKeras(l2_norm_clip=l2_norm_clip, noise_multiplier=0.0,
                              **kwargs)
    if control == "no_clipping":
        # Clipping effectively off, noise standard deviation still sigma * C
        # (the optimizer's is noise_multiplier * l2_norm_clip).
        return DPSATKeras(l2_norm_clip=no_clipping_norm,
                          noise_multiplier=sigma * l2_norm_clip / no_clipping_norm,
                          **kwargs)
    if control == "half_noise":
        return DPSATKeras(l2_norm_clip=l2_norm_clip, noise_multiplier=sigma / 2,
                          **kwargs)
    return DPSATKeras(l2_norm_clip=l2_norm_clip, noise_multiplier=sigma,
                      **kwargs)


def train_with_canaries(*, included: np.ndarray, target_epsilon: float,
                        delta: float, control: str, seed: int, steps: int,
                        expected_batch_size: int, learning_rate: float,
                        momentum: float, rho: float, l2_norm_clip: float,
                        hidden_units: int, num_real_examples, log_every: int,
                        canary_label: int, margin: float,
                        no_clipping_norm: float) -> CanaryRun:
    """Trains once on digits plus the included canaries; scores every canary.

    Args: see `tf_dpsat.audit.one_run_audit`; `included` is the (m,) boolean
    inclusion of the canaries and `seed` seeds the weights, the sampling and
    the noise.

    Returns:
      A `CanaryRun`.
    """
    seeds = np.random.default_rng(seed).integers(2**31, size=3)
    dataset = datasets.load_dataset(DATASET)
    real_images, real_labels = dataset.train_images, dataset.train_labels
    if num_real_examples is not None:
        validation.check_int("num_real_examples", num_real_examples)
        real_images = real_images[:num_real_examples]
        real_labels = real_labels[:num_real_examples]
    canaries = len(included)
    pixels = int(np.prod(dataset.image_shape))
    width = pixels + canaries
    model = _build_model(pixels, canaries, hidden_units, dataset.num_classes,
                         int(seeds[0]))
    scale = _canary_scale(model, pixels, canaries, l2_norm_clip, margin,
                          canary_label)
    canary_x = np.zeros((canaries, width), np.float32)
    canary_x[np.arange(canaries), pixels + np.arange(canaries)] = scale
    canary_rows = slice(pixels, width)
    initial_rows = model.get_layer("first").kernel.numpy()[canary_rows]
    # Descent direction of each canary's clipped gradient at the initial
    # weights (clipping rescales, so the raw gradient's direction).
    directions = _row_gradients(model, canary_x, canary_label, canary_rows)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)

    train_x = np.concatenate([_features(real_images, width), canary_x[included]])
    train_y = np.concatenate([real_labels,
                              np.full(int(included.sum()), canary_label)])
    num_examples = len(train_x)
    # The audited mechanism must not depend on which canaries are in: q, and
    # sigma with it, come from the expected training-set size (each canary
    # is in with probability 1/2), not from N. From N, one canary would move
    # sigma as well as add its gradient, and the audit could refute a
    # correct claim.
    q = expected_batch_size / (len(real_images) + canaries / 2)
    if not 0 < q <= 1 or q * num_examples < 1:
        raise ValueError(
            f"Expected expected_batch_size={expected_batch_size} <= the "
            f"{len(real_images) + canaries / 2:g} training examples expected "
            f"(and q * N >= 1 for the {num_examples} drawn). Use a smaller batch.")
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, sampling_probability=q, steps=steps,
        delta=delta)
    claimed = accounting.compute_epsilon(
        noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta)
    logging.info(
        "audit: %d canaries (%d in), N=%d, q=%.4g, %d steps, sigma=%.4g claims "
        "epsilon=%.4g at delta=%g; control=%s; canary input scale %.3g.",
        canaries, int(included.sum()), num_examples, q, steps, sigma, claimed,
        delta, control, scale)

    # Poisson sampling of the N examples at that q: expected q * N rows (the
    # optimizer still divides by expected_batch_size, a constant). q * N is
    # fractional, which the public poisson_dataset refuses (its callers'
    # accountants take integer batch sizes); this audit accounts for q itself.
    padded = sampling.padded_batch_size(q * num_examples, num_examples, steps)
    batches = sampling._poisson_dataset(
        train_x, train_y, expected_batch_size=q * num_examples, steps=steps,
        padded_size=padded, seed=int(seeds[1]))
    private = make_private(model)
    private.compile(
        optimizer=_optimizer(
            control, sigma, l2_norm_clip=l2_norm_clip,
            no_clipping_norm=no_clipping_norm, learning_rate=learning_rate,
            momentum=momentum, rho=rho,
            expected_batch_size=expected_batch_size, seed=int(seeds[2])),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    private.fit(batches, epochs=1, verbose=0, shuffle=False,
                callbacks=[_Progress(log_every, steps)])

    final_rows = model.get_layer("first").kernel.numpy()[canary_rows]
    white_box = np.sum((initial_rows - final_rows) * directions, axis=1)
    black_box = -_loss(model, canary_x, canary_label).numpy()
    test_logits = model.predict(_features(dataset.test_images, width),
                                verbose=0)
    accuracy = float(np.mean(np.argmax(test_logits, 1) == dataset.test_labels))
    return CanaryRun(
        white_box_scores=white_box, black_box_scores=black_box,
        claimed_epsilon=float(claimed), noise_multiplier=float(sigma),
        num_examples=int(num_examples), sampling_probability=float(q),
        test_accuracy=accuracy)
