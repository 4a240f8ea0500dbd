"""The vectorized engine: per-unit gradients by `tf.vectorized_map`.

Exact for any model: each unit's forward and backward pass runs inside
`tf.vectorized_map`, at the given weights (a `keras.StatelessScope` maps
each variable to its value) and with the unit's own seeds (`Seeds`). It
materialises units x parameters of memory, and TensorFlow has no vectorized
rule for the convolution filter gradient, so the fast engine is preferred
where it applies.
"""

import keras
import tensorflow as tf

from tf_dpsat.per_example import batch as batch_lib
from tf_dpsat.per_example import clip
from tf_dpsat.per_example import losses


def _unscale(gradient, loss_scale: float):
    """The gradient divided by S, in float32 (the dtype of the norms)."""
    if isinstance(gradient, tf.IndexedSlices):  # an embedding's gradient
        return tf.IndexedSlices(tf.cast(gradient.values, tf.float32) /
                                loss_scale, gradient.indices,
                                gradient.dense_shape)
    return tf.cast(gradient, tf.float32) / loss_scale


def _dense(gradient, rows: int):
    """A unit's gradient as a dense tensor; rows outside [0, rows) dropped.

    An embedding's gradient is an `tf.IndexedSlices`; densified by
    TensorFlow inside `tf.vectorized_map`, it becomes one segment sum over
    all units with unit u's ids offset by u * rows, so an id outside the
    table (which `tf.gather` reads under XLA and on a GPU without raising)
    would land in a neighbouring unit's gradient. Alone, such an id adds
    nothing to the gradient (the segment sum of one example drops it): it is
    dropped here before the offset.

    Args:
      gradient: a tensor or an `tf.IndexedSlices`.
      rows: the variable's static number of rows.
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    ids = gradient.indices
    inside = (ids >= 0) & (ids < rows)
    values = tf.where(tf.reshape(inside, [-1] + [1] * (
        len(gradient.values.shape) - 1)), gradient.values,
        tf.zeros_like(gradient.values))
    return tf.math.unsorted_segment_sum(
        values, tf.where(inside, ids, tf.zeros_like(ids)), rows)


def clipped_sum(model, variables, params, batch: batch_lib.Batch,
                seeds: batch_lib.Seeds, l2_norm_clip: float,
                loss_scale: float = 1.0) -> batch_lib.EngineResult:
    """The clipped sum of `batch` at `params`, from stacked per-unit gradients.

    Args:
      model: the DP model.
      variables: its trainable variables.
      params: their values where gradients are taken, one tensor each.
      batch: the batch (or a slice of whole units of it).
      seeds: the seeds of the stochastic layers; unit u of the slice draws
        as unit `batch.first + u` of the step's batch.
      l2_norm_clip: the clip norm C.
      loss_scale: the static loss scale S of float16 passes (1: none): each
        unit's loss is multiplied by S and its float32 gradient divided by S
        before its norm is taken.
    """
    units, size = batch.units, batch.size

    def group(t):
        return tf.reshape(t, tf.concat([[units, size], tf.shape(t)[1:]], 0))

    def unit_gradient(args):
        (x_u, y_u, w_u), index = args
        mapping = list(zip(variables, params)) + seeds.mapping(index)
        with tf.GradientTape() as tape:
            tape.watch(params)
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True) as scope:
                y_pred = model(x_u, training=True)
            loss = losses.compiled_loss_value(model, y_u, y_pred, w_u)
            extra = tf.constant(0.0)
            if scope.losses:
                extra = tf.add_n([tf.reduce_sum(tf.cast(l, tf.float32))
                                  for l in scope.losses])
                loss = loss + extra
            if loss_scale != 1:
                loss = loss * loss_scale
        grads = tape.gradient(
            loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if loss_scale != 1:
            grads = [_unscale(g, loss_scale) for g in grads]
        grads = [_dense(g, p.shape[0]) for g, p in zip(grads, params)]
        return grads, y_pred, extra

    grads, y_pred, extra = tf.vectorized_map(
        unit_gradient,
        (tf.nest.map_structure(group, (batch.x, batch.y, batch.sample_weight)),
         # A range from 0: XLA needs its bounds constant inside a loop
         # over chunks, where `batch.first` is the loop's index.
         tf.range(units) + batch.first))
    n = batch_lib.batch_size(batch.x)
    y_pred = tf.nest.map_structure(
        lambda t: tf.reshape(t, tf.concat([[n], tf.shape(t)[2:]], 0)), y_pred)
    norms = clip.per_unit_norms(grads)
    clipping = clip.clip_units(norms, batch.unit_weights(), l2_norm_clip)
    return batch_lib.EngineResult(
        summed=clip.weighted_sum(grads, clipping.factors, clipping.keep),
        norms=norms, clipping=clipping, y_pred=y_pred, extra_loss=extra)
