"""The batch the engines clip, and what an engine hands back.

A batch splits into units: examples, or equal microbatches. The engines
work on a `Batch` (or a slice of one: whole units, `Batch.first` being the
index of the slice's first unit in the step's batch) and return
an `EngineResult`: the clipped sum, the norms and the clipping, from which
`tf_dpsat.per_example.clipped_sum` forms its counts.
"""

import dataclasses
from typing import Any
from typing import List
from typing import Optional

import tensorflow as tf

# Offset between the dropout seeds of consecutive units (see Seeds.mapping).
_SEED_STRIDE = 2**32


def batch_size(x):
    """The number of rows of `x` (a tensor or a nest): static when known."""
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


def example_weights(x, sample_weight) -> tf.Tensor:
    """Per-example float32 weights [n]; per-timestep weights -> max.

    Negative weights are refused: a weight of -1 flips that example's
    gradient; the clipping bound still holds, but such a weight is almost
    surely a bug in the caller's weights. The check is a runtime assertion
    op, so under `jit_compile=True` (where XLA compiles assertions to
    nothing) only eager and graph steps raise.

    Raises:
      ValueError: Per-output sample weights.
      tf.errors.InvalidArgumentError: A negative sample weight.
    """
    n = batch_size(x)
    if sample_weight is None:
        return tf.ones([n], tf.float32)
    weights = tf.nest.flatten(sample_weight)
    if len(weights) != 1:
        raise ValueError("Per-output sample weights are not supported by "
                         "the DP train step; pass one weight per example.")
    w = tf.cast(weights[0], tf.float32)
    check = tf.debugging.assert_non_negative(
        w, message="Expected sample weights >= 0: a negative weight flips "
        "the gradient of its example. Pass weights >= 0 (0 drops an "
        "example)")
    with tf.control_dependencies([check]):
        w = tf.identity(w)
    if len(w.shape) > 1:
        w = tf.reduce_max(tf.abs(tf.reshape(w, [n, -1])), axis=1)
    return tf.reshape(w, [n])


def microbatch_layout(n, num_microbatches: Optional[int]):
    """(number of units, examples per unit) for a batch of n examples."""
    if num_microbatches is None:
        return n, 1
    m = num_microbatches
    if isinstance(n, int):
        if n % m:
            raise ValueError(
                f"num_microbatches={m} does not divide the batch size {n}. "
                "Choose a batch size that is a multiple of it (and drop or "
                "pad the last partial batch) or set num_microbatches=None.")
        return m, n // m
    check = tf.debugging.assert_equal(
        n % m, 0, message=f"num_microbatches={m} does not divide the "
        "batch size; pad or drop the last partial batch.")
    with tf.control_dependencies([check]):
        return m, tf.identity(n // m)


@dataclasses.dataclass(frozen=True)
class Batch:
    """A training batch split into units.

    Attributes:
      x, y: the inputs and targets, as unpacked by Keras.
      sample_weight: the weights the compiled loss sees (the per-example
        `weights` when the caller passed none).
      weights: float32 [n] per-example weights; a unit whose weights are all
        zero (padding) is dropped.
      units: number of units (a Python int or, for a dynamic batch, a tensor).
      size: examples per unit.
      first: index of the first unit within the step's whole batch (a slice
        of it starts later); it picks the units' dropout seeds.
    """
    x: Any
    y: Any
    sample_weight: Any
    weights: tf.Tensor
    units: Any
    size: Any
    first: Any = 0

    @classmethod
    def from_keras(cls, x, y, sample_weight,
                   num_microbatches: Optional[int] = None) -> "Batch":
        """The batch of a train step.

        Args:
          x, y, sample_weight: as `keras.utils.unpack_x_y_sample_weight`
            returns them.
          num_microbatches: None for one unit per example; otherwise the
            number of equal microbatches (it must divide the batch size).

        Raises:
          ValueError: no targets, per-output weights, or a batch size that
            `num_microbatches` does not divide.
        """
        if y is None:
            raise ValueError("The DP train step needs targets `y`.")
        weights = example_weights(x, sample_weight)
        units, size = microbatch_layout(batch_size(x), num_microbatches)
        return cls(x, y, weights if sample_weight is None else sample_weight,
                   weights, units, size)

    def unit_weights(self) -> tf.Tensor:
        """The largest |weight| in each unit, float32 [units]."""
        return tf.reduce_max(tf.abs(tf.reshape(self.weights, [self.units, -1])),
                             axis=1)

    def slices(self, count: int) -> List["Batch"]:
        """`count` slices of whole units, in order (fewer for a small batch).

        Some slices of a dynamic batch smaller than `count` units are empty.
        """
        if count == 1:
            return [self]
        if isinstance(self.units, int):
            count = min(count, max(self.units, 1))
        bounds = [self.units * k // count for k in range(count + 1)]
        out = []
        for first, last in zip(bounds, bounds[1:]):
            a, b = first * self.size, last * self.size
            rows = lambda t, a=a, b=b: None if t is None else t[a:b]
            x, y, sample_weight, weights = tf.nest.map_structure(
                rows, (self.x, self.y, self.sample_weight, self.weights))
            out.append(Batch(x, y, sample_weight, weights, last - first,
                             self.size, self.first + first))
        return out

    def take(self, first, units: int) -> "Batch":
        """Units [first, first + units) of this batch, with static shapes.

        Args:
          first: the first unit (a Python int, or a tensor inside a loop).
          units: how many units (a Python int).
        """
        start, rows = first * self.size, units * self.size

        def take_rows(t):
            if t is None:
                return None
            rest = len(t.shape) - 1
            return tf.slice(t, tf.stack([start] + [0] * rest),
                            [rows] + [-1] * rest)

        x, y, sample_weight, weights = tf.nest.map_structure(
            take_rows, (self.x, self.y, self.sample_weight, self.weights))
        return Batch(x, y, sample_weight, weights, units, self.size,
                     self.first + first)


@dataclasses.dataclass(frozen=True)
class Seeds:
    """The model's dropout seed generators and their values for this step.

    Unit u of the step's batch draws its masks from the step's seeds offset
    by (u + 1) * 2^32, so that slicing a batch changes no unit's masks.
    """
    generators: list
    values: list

    @classmethod
    def of(cls, model) -> "Seeds":
        generators = []
        for layer in model._flatten_layers():
            generators.extend(getattr(layer, "_seed_generators", []))
        return cls(generators,
                   [tf.convert_to_tensor(g.state.value) for g in generators])

    def mapping(self, unit) -> list:
        """(state variable, value) pairs for unit `unit`'s masks."""
        offset = tf.stack([tf.constant(0, tf.int64),
                           (tf.cast(unit, tf.int64) + 1) * _SEED_STRIDE])
        return [(g.state, tf.cast(s, tf.int64) + offset)
                for g, s in zip(self.generators, self.values)]


@dataclasses.dataclass(frozen=True)
class EngineResult:
    """What an engine computes for a batch (or a slice of one).

    Attributes:
      summed: the clipped sum, one tensor per variable.
      norms: float32 [units], each unit's gradient norm (NaN/Inf when the
        unit's gradient is not finite).
      clipping: the units' `clip.Clipping` (factors, kept and active units).
      y_pred: the predictions, rows like the batch.
      extra_loss: float32 [units], data-dependent `add_loss` terms.
      loss: the compiled loss as Keras reports it, when the engine
        evaluated it anyway; else None.
    """
    summed: List[tf.Tensor]
    norms: tf.Tensor
    clipping: Any
    y_pred: Any
    extra_loss: tf.Tensor
    loss: Optional[tf.Tensor] = None
