"""The entry point: the clipped sum of a batch at given weights.

`clipped_sum` cuts the batch into slices of whole units, has an engine clip
and sum each slice (the fast engine where every layer has a rule, else the
vectorized one), and combines the slices' sums and counts.
"""

import dataclasses
from typing import Any
from typing import List
from typing import Optional

import tensorflow as tf
from absl import logging

from tf_dpsat import _compat
from tf_dpsat import _replicas
from tf_dpsat import validation
from tf_dpsat.per_example import batch as batch_lib
from tf_dpsat.per_example import clip
from tf_dpsat.per_example import fast
from tf_dpsat.per_example import losses
from tf_dpsat.per_example import rules
from tf_dpsat.per_example import vectorized

ENGINES = ("auto", "fast", "vectorized")

# (model, cause) pairs already logged when "auto" fell back.
_FALLBACKS_LOGGED = set()


@dataclasses.dataclass(frozen=True)
class ClippedSum:
    """The clipped sum of a batch and what it took to compute it.

    Every tensor but `units` is a function of the private batch: a
    non-private diagnostic, never to be released without noise.

    Attributes:
      summed: sum over units of the clipped gradients, one tensor per
        variable.
      norms: float32 [units], each unit's gradient norm.
      y_pred: the predictions at the given weights, rows like the batch.
      units: float32 scalar, units in the batch (padding included).
      examples: float32 scalar, units with a non-zero weight.
      clipped: float32 scalar, kept units whose norm exceeded the clip norm.
      nonfinite: float32 scalar, units dropped for a NaN/Inf gradient.
      extra_loss: float32 scalar, the sum of data-dependent `add_loss` terms.
      loss: the compiled loss as Keras reports it, when an engine evaluated
        it anyway; else None.
      engine: "fast" or "vectorized" (both, joined by "+", if slices
        differed).
      slices: the number of slices the batch was cut into.
    """
    summed: List[tf.Tensor]
    norms: tf.Tensor
    y_pred: Any
    units: tf.Tensor
    examples: tf.Tensor
    clipped: tf.Tensor
    nonfinite: tf.Tensor
    extra_loss: tf.Tensor
    loss: Optional[tf.Tensor]
    engine: str
    slices: int


def slice_count(batch_slices: Optional[int] = None) -> int:
    """How many slices `clipped_sum` cuts a batch into (>= 1).

    Two independent slices let TensorFlow's executor run one slice's matrix
    products while the other waits for its clip factors; that pays only on
    CPU outside XLA and tf.distribute (benchmarks/README.md), so None means
    2 there and 1 elsewhere.

    Args:
      batch_slices: the user's choice, or None for the default.
    """
    if batch_slices is not None:
        return batch_slices
    if (_compat.compiled_by_xla() or tf.distribute.has_strategy() or
            tf.config.list_logical_devices("GPU") or
            tf.config.list_logical_devices("TPU")):
        return 1
    return 2


def clipped_sum(model, variables, params, batch: batch_lib.Batch, *,
                l2_norm_clip: float, engine: str = "auto",
                batch_slices: Optional[int] = None,
                loss_scale: float = 1.0) -> ClippedSum:
    """Clips each unit's gradient at `params` to norm C and sums them.

    Each unit's gradient g_u (of its compiled loss, plus data-dependent
    `add_loss` terms) is scaled by min(1, C / (||g_u|| + 1e-6)); units with
    zero weight (padding) or a non-finite gradient are dropped. The model's
    dropout seeds advance by one step.

    Args:
      model: a compiled Keras model.
      variables: its trainable variables.
      params: the values at which to take the gradients, one per variable.
      batch: the batch, `Batch.from_keras(x, y, sample_weight, ...)`.
      l2_norm_clip: the clip norm C > 0.
      engine: "fast" (per-layer rules; raises ValueError naming the cause
        for a model they do not cover), "vectorized" (any model) or "auto"
        (fast where it applies, else vectorized, with a warning logged once
        per model and cause).
      batch_slices: cut the batch into this many slices of whole units, each
        with its own forward and backward pass; None picks `slice_count()`.
      loss_scale: S > 0, a static loss scale for float16 passes: each unit's
        loss is multiplied by S before the backward pass and its gradient
        divided by S in float32 before its norm is taken, so norms, clip
        factors and sums are those of the true gradient. A unit whose
        scaled gradient overflows float16 is dropped like any non-finite
        one. 1 (default) scales nothing.

    Returns:
      A `ClippedSum`.

    Raises:
      ValueError: `loss_scale` is not a finite number > 0.
    """
    loss_scale = validation.check_positive("loss_scale", loss_scale)
    seeds = batch_lib.Seeds.of(model)
    parts = [_clipped_sum_of_slice(model, variables, params, part, seeds,
                                   l2_norm_clip, engine, loss_scale)
             for part in batch.slices(slice_count(batch_slices))]
    if seeds.generators:  # The next step draws fresh dropout masks.
        _replicas.assign_per_replica(
            [g.state for g in seeds.generators],
            [s + tf.constant([0, 1], s.dtype) for s in seeds.values])
    return parts[0] if len(parts) == 1 else _combine(model, parts)


def _engine_result(model, variables, params, batch, seeds, l2_norm_clip,
                   engine, loss_scale):
    """(engine name, EngineResult) of the engine that applies."""
    if engine != "vectorized":
        try:
            return "fast", fast.clipped_sum(model, variables, params, batch,
                                            seeds, l2_norm_clip,
                                            _compat.compiled_by_xla(),
                                            loss_scale)
        except rules.Unsupported as error:
            _fast_engine_refused(model, error, engine)
    return "vectorized", vectorized.clipped_sum(model, variables, params,
                                                batch, seeds, l2_norm_clip,
                                                loss_scale)


def _fast_engine_refused(model, error, engine) -> None:
    if engine == "fast":
        raise ValueError(
            f"clipping='fast' cannot handle model '{model.name}': {error}. "
            "Use clipping='auto' (falls back to the vectorized path) or "
            "clipping='vectorized'.") from error
    key = (id(model), str(error))
    if key not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(key)
        logging.warning("Fast per-example clipping does not apply to model "
                        "'%s': %s. Using the vectorized engine (exact, "
                        "slower).", model.name, error)


def _clipped_sum_of_slice(model, variables, params, batch, seeds,
                          l2_norm_clip, engine, loss_scale) -> ClippedSum:
    name, result = _engine_result(model, variables, params, batch, seeds,
                                  l2_norm_clip, engine, loss_scale)
    norms, clipping = result.norms, result.clipping
    count = lambda mask: tf.reduce_sum(tf.cast(mask, tf.float32))
    return ClippedSum(
        summed=result.summed,
        norms=norms,
        y_pred=result.y_pred,
        units=tf.cast(batch.units, tf.float32),
        examples=count(clipping.active),
        clipped=count(clipping.keep &
                      (norms + clip.CLIP_EPSILON > l2_norm_clip)),
        # Active and not kept: dropped for a non-finite norm.
        nonfinite=count(clipping.active & ~clipping.keep),
        extra_loss=tf.reduce_sum(tf.where(clipping.active, result.extra_loss,
                                          0.0)),
        loss=result.loss,
        engine=name,
        slices=1)


def _combine(model, parts: List[ClippedSum]) -> ClippedSum:
    """One ClippedSum from those of the batch's slices."""
    total = lambda field: tf.add_n([getattr(p, field) for p in parts])
    loss = None
    if all(p.loss is not None for p in parts):
        # Only the fast engine's one batch loss reports a loss: a row-wise
        # loss reduced by a sum, or by a mean over all its elements, which
        # the slices' means give weighted by their rows.
        if losses.loss_reduction_is_sum(model):
            loss = total("loss")
        else:
            rows = [tf.cast(tf.shape(tf.nest.flatten(p.y_pred)[0])[0],
                            p.loss.dtype) for p in parts]
            loss = tf.math.divide_no_nan(
                tf.add_n([p.loss * r for p, r in zip(parts, rows)]),
                tf.add_n(rows))
    engines = sorted({p.engine for p in parts})
    return ClippedSum(
        summed=[tf.add_n(list(g)) for g in zip(*(p.summed for p in parts))],
        norms=tf.concat([p.norms for p in parts], 0),
        y_pred=tf.nest.map_structure(lambda *t: tf.concat(t, 0),
                                     *(p.y_pred for p in parts)),
        units=total("units"), examples=total("examples"),
        clipped=total("clipped"), nonfinite=total("nonfinite"),
        extra_loss=total("extra_loss"), loss=loss,
        engine="+".join(engines), slices=len(parts))
