"""The entry point: the clipped sum of a batch at given weights.

`clipped_sum` cuts a large batch into chunks of whole units, clipped one
after the other, and each chunk (or the whole batch) into slices of whole
units, clipped side by side; an engine clips and sums each slice (the fast
engine where every layer has a rule and the batch-mixing probe cleared the
model, else the vectorized one), and the slices' and chunks' sums and counts
are combined.
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
from tf_dpsat.per_example import batch_independence
from tf_dpsat.per_example import clip
from tf_dpsat.per_example import fast
from tf_dpsat.per_example import losses
from tf_dpsat.per_example import rules
from tf_dpsat.per_example import vectorized

ENGINES = ("auto", "fast", "vectorized")

# The default most units per chunk (`DPSATKeras(chunk_units=...)`): a batch
# up to it is clipped whole, as the step-time benchmarks measure it; a
# larger one holds the per-example work of this many units at a time, so
# its memory grows with the batch only through the model's inputs, outputs
# and sums (benchmarks/README.md). 512 rather than 256: Poisson batches of
# expected size 256 are padded to about 350 rows, which stay whole.
DEFAULT_CHUNK_UNITS = 512

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
      slices: the number of slices the batch (or each chunk) was cut into.
      chunks: the number of chunks clipped one after the other (1: the
        whole batch at once).
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
    chunks: int = 1


def chunk_count(units, chunk_units: Optional[int]) -> int:
    """How many chunks `clipped_sum` clips a batch of `units` units in.

    1 (the whole batch at once) when `chunk_units` is None, when the batch
    has at most `chunk_units` units, or when its size is only known when the
    step runs (a loop over chunks needs static shapes).

    Args:
      units: the batch's units (a Python int, or a tensor for a dynamic
        batch).
      chunk_units: the most units per chunk, or None.
    """
    if chunk_units is None or not isinstance(units, int):
        return 1
    return -(-units // chunk_units)


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
                chunk_units: Optional[int] = None,
                loss_scale: float = 1.0,
                secret_seed=None) -> ClippedSum:
    """Clips each unit's gradient at `params` to norm C and sums them.

    Each unit's gradient g_u (of its compiled loss, plus data-dependent
    `add_loss` terms) is scaled by min(1, C / (||g_u|| + 1e-6)); units with
    zero weight (padding) or a non-finite gradient are dropped. The states
    of the model's seed generators (dropout and other stochastic layers)
    advance by one step.

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
      chunk_units: clip a batch of more units than this in chunks of at
        most this many units, one after the other (`chunk_count`), each cut
        into `batch_slices` slices; None clips the whole batch at once.
      loss_scale: S > 0, a static loss scale for float16 passes: each unit's
        loss is multiplied by S before the backward pass and its gradient
        divided by S in float32 before its norm is taken, so norms, clip
        factors and sums are those of the true gradient. A unit whose
        scaled gradient overflows float16 is dropped like any non-finite
        one. 1 (default) scales nothing.
      secret_seed: int64 [2], the secret key of the stochastic layers'
        draws (dropout masks, Gaussian noise layers) in this call, mixed
        with the seed generators' states (`Seeds`). A DP release needs one
        that nobody else knows, fresh for every call: the generator states
        are public, and draws that an adversary can recompute break the
        sensitivity bound under Poisson sampling (`Seeds` explains why).
        The DP optimizers derive it from their noise key. None: the draws
        are a public function of the generator states.

    Returns:
      A `ClippedSum`.

    Raises:
      ValueError: `loss_scale` is not a finite number > 0, or `secret_seed`
        is not of shape [2].
    """
    loss_scale = validation.check_positive("loss_scale", loss_scale)
    seeds = batch_lib.Seeds.of(model, secret_seed)
    count = slice_count(batch_slices)

    def clip_chunk(chunk: batch_lib.Batch) -> ClippedSum:
        parts = [_clipped_sum_of_slice(model, variables, params, part, seeds,
                                       l2_norm_clip, engine, loss_scale)
                 for part in chunk.slices(count)]
        return parts[0] if len(parts) == 1 else _combine(model, parts)

    if chunk_count(batch.units, chunk_units) == 1:
        result = clip_chunk(batch)
    else:
        result = _clipped_sum_in_chunks(model, batch, chunk_units, clip_chunk)
    advanced = seeds.advanced()
    if advanced:  # The next call draws afresh.
        _replicas.assign_per_replica(*zip(*advanced))
    return result


def _clipped_sum_in_chunks(model, batch: batch_lib.Batch, chunk: int,
                           clip_chunk) -> ClippedSum:
    """The clipped sum of a static batch, `chunk` units at a time.

    The full chunks run in a `tf.while_loop` without parallel iterations,
    so each chunk's forward and backward pass, norms and sums are freed
    before the next chunk starts. The first chunk runs before the loop (it
    fixes the shapes and dtypes that the loop carries) and the remainder
    after it, each held back by a dependency. The clipped sums are
    accumulated in float32.
    """
    full, rest = divmod(batch.units, chunk)
    head = clip_chunk(batch.take(0, chunk))
    sums = _ChunkSums.of(head, full)
    if full > 1:
        # The loop starts from an index computed from chunk 0's sums, not a
        # constant: XLA inlines a loop whose trip count it knows (one
        # iteration for two chunks), and a control dependency would then no
        # longer keep the two chunks apart.
        start = 1 + _zero_after(sums.flat())

        def body(i, *carried):
            part = clip_chunk(batch.take(i * chunk, chunk))
            return (i + 1,) + _ChunkSums(*carried).add(i, part).carried()

        _, *carried = tf.while_loop(lambda i, *_: i < full, body,
                                    (start,) + sums.carried(),
                                    parallel_iterations=1)
        sums = _ChunkSums(*carried)
    part = sums.result(model, head, full)
    if not rest:
        return part
    # The remainder is sliced from an offset computed from the sums so far.
    tail = batch.take(full * chunk + _zero_after(sums.flat()), rest)
    return _combine(model, [part, clip_chunk(tail)], chunks=full + 1)


def _zero_after(tensors) -> tf.Tensor:
    """An int32 zero that XLA cannot fold, computed from `tensors`.

    Whatever reads it runs after them, under XLA too (a data dependency,
    which XLA keeps; a control dependency it may drop). It is 0 for any
    values, NaN included.
    """
    nan = tf.math.is_nan(tf.add_n([tf.reduce_sum(t) for t in tensors]))
    return tf.minimum(tf.cast(nan, tf.int32), 0)


@dataclasses.dataclass(frozen=True)
class _ChunkSums:
    """What the loop over chunks carries: sums, counts, norms, predictions.

    Attributes:
      summed: float32 sums of the clipped gradients, one per variable.
      counts: float32 scalars: units, examples, clipped, nonfinite,
        extra_loss and the sum of the chunks' losses (0 without one).
      norms: a TensorArray of the chunks' norms.
      y_pred: TensorArrays of the chunks' predictions, one per leaf.
    """
    summed: list
    counts: list
    norms: tf.TensorArray
    y_pred: list

    _COUNTS = ("units", "examples", "clipped", "nonfinite", "extra_loss")

    @classmethod
    def of(cls, head: ClippedSum, chunks: int) -> "_ChunkSums":
        """The sums of the first chunk, in arrays for `chunks` chunks."""
        array = lambda t: tf.TensorArray(t.dtype, size=chunks,
                                         element_shape=t.shape).write(0, t)
        return cls([tf.cast(g, tf.float32) for g in head.summed],
                   cls._counts(head), array(head.norms),
                   [array(t) for t in tf.nest.flatten(head.y_pred)])

    @classmethod
    def _counts(cls, part: ClippedSum) -> list:
        loss = (tf.constant(0.0) if part.loss is None
                else tf.cast(part.loss, tf.float32))
        return [getattr(part, f) for f in cls._COUNTS] + [loss]

    def add(self, index, part: ClippedSum) -> "_ChunkSums":
        """These sums and those of chunk `index`."""
        return _ChunkSums(
            [s + tf.cast(g, tf.float32)
             for s, g in zip(self.summed, part.summed)],
            [c + v for c, v in zip(self.counts, self._counts(part))],
            self.norms.write(index, part.norms),
            [a.write(index, t) for a, t in
             zip(self.y_pred, tf.nest.flatten(part.y_pred))])

    def carried(self) -> tuple:
        return self.summed, self.counts, self.norms, self.y_pred

    def flat(self) -> list:
        return self.summed + self.counts

    def result(self, model, head: ClippedSum, chunks: int) -> ClippedSum:
        """The ClippedSum of `chunks` equal chunks, like `head` in form."""
        units, examples, clipped, nonfinite, extra_loss, loss = self.counts
        if head.loss is None:
            loss = None
        else:
            # A mean loss over equal chunks is the mean of their means.
            if not losses.loss_reduction_is_sum(model):
                loss = loss / chunks
            loss = tf.cast(loss, head.loss.dtype)
        return ClippedSum(
            summed=[tf.cast(s, g.dtype)
                    for s, g in zip(self.summed, head.summed)],
            norms=self.norms.concat(),
            y_pred=tf.nest.pack_sequence_as(
                head.y_pred, [a.concat() for a in self.y_pred]),
            units=units, examples=examples, clipped=clipped,
            nonfinite=nonfinite, extra_loss=extra_loss, loss=loss,
            engine=head.engine, slices=head.slices, chunks=chunks)


def _engine_result(model, variables, params, batch, seeds, l2_norm_clip,
                   engine, loss_scale):
    """(engine name, EngineResult) of the engine that applies."""
    if engine != "vectorized":
        try:
            _check_probed(model, batch)
            return "fast", fast.clipped_sum(model, variables, params, batch,
                                            seeds, l2_norm_clip,
                                            _compat.compiled_by_xla(),
                                            loss_scale)
        except rules.Unsupported as error:
            _fast_engine_refused(model, error, engine)
    return "vectorized", vectorized.clipped_sum(model, variables, params,
                                                batch, seeds, l2_norm_clip,
                                                loss_scale)


def _check_probed(model, batch: batch_lib.Batch) -> None:
    """Refuses a model the batch-mixing probe could not clear.

    The fast engine takes every unit's gradients from one forward and
    backward pass of the whole batch, so it is exact only for models in
    which no layer mixes examples; the vectorized engine runs each unit
    alone and needs no such check.

    Raises:
      ValueError: a layer mixes examples (`batch_independence.check`).
      rules.Unsupported: the probe was inconclusive.
    """
    fast.check_supported(model)  # its structural reasons first: cheaper
    verdict = batch_independence.check(model, like=batch.x)
    if not verdict.checked:
        raise rules.Unsupported(
            "it could not be checked for layers that mix examples across the "
            f"batch ({verdict.reason})")


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


def _combine(model, parts: List[ClippedSum], chunks: int = 1) -> ClippedSum:
    """One ClippedSum from those of consecutive slices (or chunks)."""
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
        engine="+".join(engines),
        slices=len(parts) if chunks == 1 else parts[0].slices, chunks=chunks)
