"""The clipping math: norms, clip factors and clipped sums.

DP-SGD (Abadi et al., 2016) bounds each unit's (example's or microbatch's)
influence by scaling its gradient g_u by min(1, C / (||g_u|| + 1e-6)) before
the sum. These small pure functions work on lists of tensors, one per
variable; a leading axis of size `n` indexes units.

Norms are computed per tensor and combined as sqrt(sum(squares)) rather than
with `tf.linalg.global_norm`, which `tf.vectorized_map` cannot vectorize.

References:
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
"""

from typing import NamedTuple
from typing import Sequence

import tensorflow as tf

from tf_dpsat import _compat

# Added to per-unit norms before dividing, as in the DP-SAT authors' code
# (Opacus): it keeps the clipped norm strictly below C and the factor finite
# at norm 0.
CLIP_EPSILON = 1e-6


def sum_of_squares(t: tf.Tensor, axis=None) -> tf.Tensor:
    """sum(t^2) over `axis` (all axes when None), in float32.

    Outside XLA it is TensorFlow's one-pass EuclideanNorm kernel, squared,
    which is faster on CPU than a square followed by a sum
    (benchmarks/README.md). XLA has no EuclideanNorm kernel but fuses the
    square into the sum anyway.

    Args:
      t: a tensor.
      axis: the axes to reduce.

    Returns:
      A float32 tensor.
    """
    t = tf.cast(t, tf.float32)
    if _compat.compiled_by_xla():
        return tf.reduce_sum(tf.square(t), axis)
    return tf.square(tf.math.reduce_euclidean_norm(t, axis))


def global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """L2 norm of all entries of `tensors` taken together (float32 scalar)."""
    return tf.sqrt(tf.add_n([sum_of_squares(t) for t in tensors]))


def per_unit_norms(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """Per-unit L2 norms of stacked gradients.

    Args:
      grads: per-unit gradients, each of shape [n, *variable_shape].

    Returns:
      A float32 tensor of shape [n]: entry i is the norm of unit i's
      gradient over all variables.
    """
    return tf.sqrt(tf.add_n([
        sum_of_squares(tf.reshape(g, [tf.shape(g)[0], -1]), 1)
        for g in grads]))


def clip_factors(norms: tf.Tensor, l2_norm_clip: float,
                 keep: tf.Tensor) -> tf.Tensor:
    """Scale factors min(1, C / (norm + 1e-6)), zero where `keep` is False.

    Args:
      norms: per-unit norms, shape [n].
      l2_norm_clip: the clip norm C > 0.
      keep: boolean [n]; False drops the unit (padding, non-finite
        gradient). Dropping is a per-unit decision, so it keeps DP.

    Returns:
      A float32 tensor of shape [n].
    """
    factors = tf.minimum(1.0, l2_norm_clip / (norms + CLIP_EPSILON))
    return tf.where(keep, factors, tf.zeros_like(factors))


class Clipping(NamedTuple):
    """Which units count and by how much.

    Attributes:
      factors: float32 [units], min(1, C / (norm + 1e-6)) for kept units,
        else 0.
      keep: bool [units], the units in the sum: non-zero weight and a finite
        norm.
      active: bool [units], the units with a non-zero weight.
    """
    factors: tf.Tensor
    keep: tf.Tensor
    active: tf.Tensor


def clip_units(norms: tf.Tensor, unit_weights: tf.Tensor,
               l2_norm_clip: float) -> Clipping:
    """The clipping of units with these norms and weights.

    A unit whose weights are all zero (padding) or whose norm is not finite
    (a NaN/Inf gradient) is dropped.

    Args:
      norms: float32 [units].
      unit_weights: float32 [units], each unit's largest |weight|.
      l2_norm_clip: the clip norm C > 0.
    """
    active = unit_weights > 0
    keep = active & tf.math.is_finite(norms)
    return Clipping(clip_factors(norms, l2_norm_clip, keep), keep, active)


def weighted_sum(grads: Sequence[tf.Tensor], factors: tf.Tensor,
                 keep: tf.Tensor) -> list:
    """Sum over units of factor_u * g_u, ignoring dropped units.

    `tf.where` (not a multiplication by 0) removes dropped units, so a NaN
    or Inf gradient cannot leak into the sum.

    Args:
      grads: per-unit gradients, each of shape [n, *variable_shape].
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


def mask_units(t: tf.Tensor, keep) -> tf.Tensor:
    """Zeroes the rows of t [units, ...] whose unit is not kept (None: all)."""
    if keep is None:
        return t
    mask = tf.reshape(keep, [-1] + [1] * (len(t.shape) - 1))
    return tf.where(mask, t, tf.zeros_like(t))
