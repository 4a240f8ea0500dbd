"""Small pure functions for clipping and perturbing gradients.

DP-SGD (Abadi et al., 2016) bounds each example's influence by clipping its
gradient to L2 norm C and then adds Gaussian noise of standard deviation
sigma * C to the sum. DP-SAT (Park et al., 2023) additionally evaluates the
gradients at w + rho * g_prev / ||g_prev||, where g_prev is the previous
step's already-private gradient. The functions here implement those pieces on
lists of tensors (one per trainable variable); `optimizer.py` composes them
with the noise of `tf_dpsat.noise`.

A leading axis of size `n` on a gradient tensor indexes examples (or
microbatches). Norms are computed per tensor and combined as
sqrt(sum(squares)) rather than with `tf.linalg.global_norm`, which
`tf.vectorized_map` cannot vectorize.

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  Park, Kim, Choi, Lee, "Differentially Private Sharpness-Aware Training",
  ICML 2023, https://arxiv.org/abs/2306.05651.
"""

from typing import Sequence

import tensorflow as tf

try:  # Private; read only by compiled_by_xla, which copes with its absence.
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:
    _control_flow_util = None

# Added to per-example norms before dividing, as in the authors' code (Opacus):
# it keeps the clipped norm strictly below C and the factor finite at norm 0.
CLIP_EPSILON = 1e-6
# Added to the perturbation direction's norm (the authors' value).
PERTURBATION_EPSILON = 1e-16


def compiled_by_xla() -> bool:
    """Whether the ops being built now will be compiled by XLA.

    True inside `tf.function(jit_compile=True)` (Keras' `jit_compile=True`),
    where a few kernels differ (see `sum_of_squares`).
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

    Args:
      params: the weights, one tensor per variable.
      direction: the direction d, shaped like `params`.
      rho: the radius.

    Returns:
      One tensor per variable.
    """
    return [p + e for p, e in zip(params, perturbation(direction, rho))]
