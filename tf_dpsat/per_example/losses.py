"""The compiled loss per unit, and its gradient with respect to predictions.

Both engines need each unit's own loss: the vectorized engine differentiates
it per unit, the fast engine needs its gradient at the predictions. Keras
computes one batch loss (and updates its loss metrics while doing so), so
the compiled loss's terms are applied here directly.
"""

from typing import Optional

import keras
import tensorflow as tf

from tf_dpsat import _compat
from tf_dpsat import _replicas
from tf_dpsat.per_example import batch as batch_lib

# Reductions after which Keras divides by the number of replicas; the per
# unit losses must not carry that factor (it would change what is clipped).
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
# Keras's built-in losses whose value for an example is a function of that
# example's row alone (reduced over the last axis at most); see row_wise.
_ROW_WISE_LOSS_FNS = tuple(getattr(keras.losses, name) for name in (
    "binary_crossentropy", "binary_focal_crossentropy",
    "categorical_crossentropy", "categorical_focal_crossentropy",
    "categorical_hinge", "cosine_similarity", "hinge", "huber",
    "kl_divergence", "log_cosh", "mean_absolute_error",
    "mean_absolute_percentage_error", "mean_squared_error",
    "mean_squared_logarithmic_error", "poisson",
    "sparse_categorical_crossentropy", "squared_hinge"))


def _compile_loss(model):
    compile_loss = model._compile_loss
    if compile_loss is None:
        raise ValueError("The DP model was compiled without a loss; pass "
                         "`loss=` to `model.compile`.")
    return compile_loss


def unscale_mean_loss(value, loss_fn):
    """Undoes the 1/num_replicas factor Keras puts on mean-reduced losses."""
    replicas = _replicas.num_replicas()
    if replicas > 1 and getattr(loss_fn, "reduction", None) in _MEAN_REDUCTIONS:
        value = value * tf.cast(replicas, value.dtype)
    return value


def compiled_loss_value(model, y_true, y_pred, sample_weight) -> tf.Tensor:
    """The compiled loss of the model on one unit, without side effects.

    The result is what Keras would report for this unit alone (for a single
    example: the example's weighted loss), whatever reduction each loss uses.
    """
    compile_loss = _compile_loss(model)
    if tf.nest.is_nested(y_pred) and tf.nest.is_nested(y_true):
        try:
            tf.nest.assert_same_structure(y_true, y_pred)
        except (ValueError, TypeError):
            y_true = tf.nest.pack_sequence_as(y_pred, tf.nest.flatten(y_true))
    total = None
    for path, loss_fn, loss_weight, _ in compile_loss._flat_losses:
        y_t, y_p = y_true, y_pred
        for key in path:
            y_t, y_p = y_t[key], y_p[key]
        weight = sample_weight
        if weight is not None and tf.nest.is_nested(weight):
            for key in path:
                weight = weight[key]
        value = tf.cast(loss_fn(y_t, y_p, weight), tf.float32)
        value = tf.reduce_mean(unscale_mean_loss(value, loss_fn))
        if loss_weight is not None:
            value = value * loss_weight
        total = value if total is None else total + value
    if total is None:
        raise ValueError("The DP model's compiled loss has no terms.")
    return total


def row_wise(loss_fn) -> bool:
    """Whether `loss_fn`'s value for an example depends on that example only.

    Only Keras's own row-wise losses qualify, as the built-in class or the
    wrapper of a loss given by name, and only without `ignore_class` (its
    masked mean divides by a count over the whole batch) or an `axis` other
    than the last. A user's loss may couple examples (normalise over the
    batch, say); differentiating its batch value would give each example a
    gradient that depends on the others, which clipping does not bound.
    """
    wrapper = _compat.LossFunctionWrapper
    if not isinstance(loss_fn, wrapper):
        return False
    cls = type(loss_fn)
    if (cls.__module__ != wrapper.__module__ or cls.call is not wrapper.call or
            cls.__call__ is not keras.losses.Loss.__call__):
        return False
    kwargs = getattr(loss_fn, "_fn_kwargs", {})
    return (any(loss_fn.fn is fn for fn in _ROW_WISE_LOSS_FNS) and
            kwargs.get("ignore_class") is None and
            kwargs.get("axis", -1) == -1)


def unit_loss_gradients(model, y, y_pred, sample_weight, units):
    """d(loss of its unit)/d(prediction) for every prediction, like y_pred.

    Each unit's compiled loss is differentiated with respect to its own
    predictions inside `tf.vectorized_map`. Taking the gradient inside the
    map, rather than of the mapped losses, keeps XLA from compiling the
    batch in as a constant (and recompiling every step).
    """
    n = batch_lib.batch_size(y_pred)

    def group(t):
        return tf.reshape(t, tf.concat([[units, -1], tf.shape(t)[1:]], 0))

    def unit_gradient(args):
        y_u, p_u, w_u = args
        with tf.GradientTape() as tape:
            tape.watch(p_u)
            loss = compiled_loss_value(model, y_u, p_u, w_u)
        return tape.gradient(loss, p_u)

    grads = tf.vectorized_map(unit_gradient, tf.nest.map_structure(
        group, (y, tf.nest.map_structure(tf.stop_gradient, y_pred),
                sample_weight)))
    return tf.nest.map_structure(
        lambda g: tf.reshape(g, tf.concat([[n], tf.shape(g)[2:]], 0)), grads)


def batch_loss_gradients(model, y, y_pred, sample_weight,
                         units) -> Optional[tuple]:
    """Every unit's loss gradient from one batch loss, where that is exact.

    For a row-wise loss reduced by a sum, or by a mean over the batch's
    elements ("sum_over_batch_size"), the per-unit losses add up to the batch
    loss times `units` (times 1 for a sum); its gradient with respect to the
    predictions then holds, row by row, each unit's own loss gradient. One
    loss evaluation instead of one per unit, and its value is the loss Keras
    reports.

    Returns:
      (gradients like y_pred, the compiled loss as `CompileLoss` returns it),
      or None for anything else (several outputs, masks, other losses and
      reductions); `unit_loss_gradients` then differentiates each unit.
    """
    if (tf.nest.is_nested(y) or tf.nest.is_nested(y_pred) or
            getattr(y_pred, "_keras_mask", None) is not None):
        return None
    compile_loss = _compile_loss(model)
    if len(compile_loss._flat_losses) != 1:
        return None
    path, loss_fn, loss_weight, _ = compile_loss._flat_losses[0]
    if path or not row_wise(loss_fn) or loss_fn.reduction not in (
            "sum_over_batch_size", "mean", "sum"):
        return None
    y_pred = tf.stop_gradient(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        # As CompileLoss computes it for a single output.
        reported = tf.cast(loss_fn(y, y_pred, sample_weight), compile_loss.dtype)
        if loss_weight is not None:
            reported = reported * loss_weight
        total = unscale_mean_loss(tf.cast(reported, tf.float32), loss_fn)
        if loss_fn.reduction != "sum":
            total = total * tf.cast(units, total.dtype)
    return tape.gradient(total, y_pred), reported


def loss_reduction_is_sum(model) -> bool:
    """Whether the (single) compiled loss is reduced by a sum."""
    return _compile_loss(model)._flat_losses[0][1].reduction == "sum"
