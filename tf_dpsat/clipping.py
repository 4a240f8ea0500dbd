"""Small pure functions for clipping, noising and perturbing gradients.

DP-SGD (Abadi et al., 2016) bounds each example's influence by clipping its
gradient to L2 norm C and then adds Gaussian noise of standard deviation
sigma * C to the sum. DP-SAT (Park et al., 2023) additionally evaluates the
gradients at w + rho * g_prev / ||g_prev||, where g_prev is the previous
step's already-private gradient. The functions here implement those pieces on
lists of tensors (one per trainable variable); `optimizer.py` composes them.

A leading axis of size `n` on a gradient tensor indexes examples (or
microbatches). Norms are computed per tensor and combined as
sqrt(sum(squares)) rather than with `tf.linalg.global_norm`, which
`tf.vectorized_map` cannot vectorize.

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  Park, Kim, Choi, Lee, "Differentially Private Sharpness-Aware Training",
  ICML 2023, https://arxiv.org/abs/2306.05651.
"""

import math
from typing import Sequence

import tensorflow as tf

from tf_dpsat import native

try:  # Private; read only by compiled_by_xla, which copes with its absence.
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:
    _control_flow_util = None

# Added to per-example norms before dividing, as in the authors' code (Opacus):
# it keeps the clipped norm strictly below C and the factor finite at norm 0.
CLIP_EPSILON = 1e-6
# Added to the perturbation direction's norm (the authors' value).
PERTURBATION_EPSILON = 1e-16
# Philox, named explicitly: the default "auto_select" picks ThreeFry under
# XLA on CPU, which measured ~30x slower here.
RNG_ALGORITHM = "philox"


def compiled_by_xla() -> bool:
    """Whether the ops being built now will be compiled by XLA.

    True inside `tf.function(jit_compile=True)` (Keras' `jit_compile=True`),
    where a few kernels differ (see `sum_of_squares`, `gaussian_noise`).
    Reads TensorFlow's XLA control-flow context, a private API; should that
    fail, it answers True, whose kernels are correct everywhere.
    """
    try:
        return bool(_control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))
    except Exception:  # pylint: disable=broad-except
        return True


def sum_of_squares(t: tf.Tensor, axis=None) -> tf.Tensor:
    """sum(t^2) over `axis` (all axes when None), in float32.

    Outside XLA it is TensorFlow's one-pass EuclideanNorm kernel, squared,
    which measured 2.3x faster on CPU than a square followed by a sum. XLA
    has no EuclideanNorm kernel but fuses the square into the sum anyway.

    Args:
      t: a tensor.
      axis: the axes to reduce.

    Returns:
      A float32 tensor.
    """
    t = tf.cast(t, tf.float32)
    if compiled_by_xla():
        return tf.reduce_sum(tf.square(t), axis)
    return tf.square(tf.math.reduce_euclidean_norm(t, axis))


def global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """L2 norm of all entries of `tensors` taken together.

    Args:
      tensors: tensors of any shapes.

    Returns:
      A float32 scalar.
    """
    return tf.sqrt(tf.add_n([sum_of_squares(t) for t in tensors]))


def per_example_norms(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """Per-example L2 norms of stacked gradients.

    Args:
      grads: per-example gradients, each of shape [n, *variable_shape].

    Returns:
      A float32 tensor of shape [n]: entry i is the norm of example i's
      gradient over all variables.
    """
    return tf.sqrt(tf.add_n([
        sum_of_squares(tf.reshape(g, [tf.shape(g)[0], -1]), 1)
        for g in grads]))


def clip_factors(norms: tf.Tensor, l2_norm_clip: float,
                 keep: tf.Tensor) -> tf.Tensor:
    """Scale factors min(1, C / (norm + 1e-6)), zero where `keep` is False.

    Args:
      norms: per-example norms, shape [n].
      l2_norm_clip: the clip norm C > 0.
      keep: boolean [n]; False drops the example (padding, non-finite
        gradient). Dropping is a per-example decision, so it keeps DP.

    Returns:
      A float32 tensor of shape [n].
    """
    factors = tf.minimum(1.0, l2_norm_clip / (norms + CLIP_EPSILON))
    return tf.where(keep, factors, tf.zeros_like(factors))


def weighted_sum(grads: Sequence[tf.Tensor], factors: tf.Tensor,
                 keep: tf.Tensor) -> list:
    """Sum over examples of factor_i * g_i, ignoring dropped examples.

    `tf.where` (not a multiplication by 0) removes dropped examples, so a NaN
    or Inf gradient cannot leak into the sum.

    Args:
      grads: per-example gradients, each of shape [n, *variable_shape].
      factors: float32 [n] scale factors (from `clip_factors`).
      keep: boolean [n].

    Returns:
      One tensor of shape variable_shape per variable.
    """
    summed = []
    for g in grads:
        mask = tf.reshape(keep, [-1] + [1] * (len(g.shape) - 1))
        g = tf.where(mask, g, tf.zeros_like(g))
        summed.append(tf.tensordot(tf.cast(factors, g.dtype), g, axes=1))
    return summed


def normal_samples(size: int, stddev: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """`size` independent N(0, stddev^2) float32 samples, by Box-Muller.

    For uniforms u1 in (0, 1] and u2 in [0, 1), r = sqrt(-2 ln u1) and
    theta = 2 pi u2 give two independent standard normals r cos(theta) and
    r sin(theta) (Box and Muller, 1958). TensorFlow's own normal sampler
    applies the same transform to Philox uniforms one scalar at a time; here
    it runs as whole-tensor ops, which on CPU costs about half as much, and
    the noise for every parameter is drawn on every step. As with
    TensorFlow's sampler, the 23-bit uniforms bound |sample| / stddev by
    sqrt(2 ln 2^23) ~ 5.65. tests/test_noise.py checks the moments, the
    distribution function, tail frequencies and independence.

    Args:
      size: number of samples (a Python int).
      stddev: scalar standard deviation.
      seed: int64 [2] stateless Philox seed.

    Returns:
      A float32 vector of length `size`, a pure function of the seed.
    """
    half = max((size + 1) // 2, 1)
    u = tf.random.stateless_uniform([2, half], seed, dtype=tf.float32,
                                    alg=RNG_ALGORITHM)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0])) * tf.cast(stddev,
                                                               tf.float32)
    theta = (2.0 * math.pi) * u[1]
    samples = tf.concat([radius * tf.cos(theta), radius * tf.sin(theta)], 0)
    return samples[:size] if size != 2 * half else samples


def gaussian_noise(like: Sequence[tf.Tensor], stddev: tf.Tensor,
                   seed: tf.Tensor) -> list:
    """Independent N(0, stddev^2) noise shaped like each tensor of `like`.

    Without XLA, one Box-Muller draw (`normal_samples`) covers all tensors
    and is split among them: fewer, larger ops, since on CPU the per-op cost
    of many small draws adds up. XLA's CPU backend runs that transform
    slower than its own normal sampler, so under XLA each tensor gets
    `tf.random.stateless_normal` (the same Philox uniforms, the same
    transform, elementwise). The two paths draw different (equally
    distributed) noise from one seed.

    Args:
      like: tensors with static shapes, giving shapes and dtypes.
      stddev: scalar standard deviation.
      seed: int64 [2] stateless seed; the noise is a pure function of it
        (reproducible, and restored with the optimizer's state).

    Returns:
      A list of noise tensors.
    """
    stddev = tf.cast(stddev, tf.float32)
    if compiled_by_xla():
        return [tf.cast(tf.random.stateless_normal(
            t.shape, tf.random.experimental.stateless_fold_in(
                seed, j, alg=RNG_ALGORITHM), alg=RNG_ALGORITHM) * stddev,
                        t.dtype) for j, t in enumerate(like)]
    sizes = [int(t.shape.num_elements()) for t in like]
    flat = tf.split(normal_samples(sum(sizes), stddev, seed), sizes)
    return [tf.cast(tf.reshape(z, t.shape), t.dtype)
            for z, t in zip(flat, like)]


def noisy_mean(sums: Sequence[tf.Tensor], stddev, seed: tf.Tensor, stream,
               divisor) -> list:
    """(sums[i] + N(0, stddev^2 I)) / divisor: the released DP gradient.

    Outside XLA the fused CPU kernel of `tf_dpsat.native` does it in one
    pass when it is built; otherwise (and under XLA) the noise comes from
    `gaussian_noise` and is added and divided by TensorFlow ops. All three
    draw Philox-based Box-Muller normals from the seed; their streams differ.

    Args:
      sums: clipped sums, one tensor per variable (static shapes).
      stddev: scalar standard deviation of the noise (sigma * C).
      seed: int64 [2] stateless seed.
      stream: int in [0, 2^32) (or an int64 scalar tensor); the noise is a
        pure function of (seed, stream), and different streams of one seed
        are independent.
      divisor: scalar, the (expected) batch size in units.

    Returns:
      One tensor per variable.
    """
    if not compiled_by_xla():
        fused = native.noisy_mean(sums, stddev, seed, stream, divisor)
        if fused is not None:
            return list(fused)
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(stream, tf.int64), alg=RNG_ALGORITHM)
    noise = gaussian_noise(sums, stddev, seed)
    return [(s + z) / tf.cast(divisor, s.dtype) for s, z in zip(sums, noise)]


def perturbation(direction: Sequence[tf.Tensor], rho: float) -> list:
    """rho * d / (||d|| + 1e-16): the DP-SAT ascent step (zero when d is 0).

    Args:
      direction: the direction d, one tensor per variable.
      rho: the radius.

    Returns:
      One tensor per variable.
    """
    scale = rho / (global_norm(direction) + PERTURBATION_EPSILON)
    return [tf.cast(scale, d.dtype) * d for d in direction]


def perturbed(params: Sequence[tf.Tensor], direction: Sequence[tf.Tensor],
              rho: float) -> list:
    """params + perturbation(direction, rho): where DP-SAT takes gradients.

    Outside XLA the fused CPU kernel of `tf_dpsat.native` does it in two
    passes when it is built; otherwise TensorFlow ops.

    Args:
      params: the weights, one tensor per variable.
      direction: the direction d, shaped like `params`.
      rho: the radius.

    Returns:
      One tensor per variable.
    """
    if not compiled_by_xla():
        fused = native.perturb(params, direction, rho)
        if fused is not None:
            return list(fused)
    return [p + e for p, e in zip(params, perturbation(direction, rho))]
