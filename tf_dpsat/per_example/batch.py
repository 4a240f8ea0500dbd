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

from tf_dpsat import _compat
from tf_dpsat import noise

# Keras's TensorFlow backend reduces each word of a seed modulo 2^31 - 2
# before its stateless ops read it (`_cast_seed` in
# keras/src/backend/tensorflow/random.py), so a word carries about 31 bits:
# the seeds handed to the layers are drawn below it, where the reduction is
# the identity and distinct seeds stay distinct.
_KERAS_SEED_MODULUS = 2**31 - 2
# The key of `Seeds.of(model)` without a secret: public, like the states.
_PUBLIC_KEY = (0, 0)


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
        of it starts later); it picks the units' seeds (`Seeds`).
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
    """The seeds of the model's stochastic layers for one clipped sum.

    Every layer that draws from a Keras `SeedGenerator` (Dropout,
    GaussianNoise, GaussianDropout, ...) draws, for unit u of the step's
    batch, from the seed [a + u mod M, b] (M = 2^31 - 2), where (a, b) is a
    pseudo-random function of the key, the generator's position in the model
    and its state. On the vectorized engine unit u's draws thus depend on its
    index in the whole batch only, so slicing or chunking a batch changes no
    unit's draws; the fast engine draws one tensor for a whole slice, from the
    seed of the slice's first unit, each row its own part of it.

    Why the key must be secret (the DP step passes one derived from the
    optimizer's noise key). Poisson batches list the sampled examples in
    index order, so removing one example moves every later example up a row,
    onto another row's randomness. With draws that an adversary can compute
    (the generator states are public: `keras.utils.set_random_seed`,
    `Dropout(seed=...)`, saved models) the neighbouring datasets' clipped sums
    then differ by the clipped gradients of every moved example, far more
    than C. With a secret key the rows' draws are independent and identically
    distributed (pseudo-random), and independent of the data, of the batch
    sampling and of the noise (another stream of the optimizer's key). The
    step is then distributed exactly as if each example of the dataset
    carried draws of its own, made before the sampling. Given those draws,
    the step is the subsampled Gaussian mechanism on clipped gradients of
    sensitivity C that the accountant analyses; the released gradient's
    distribution is a mixture of these mechanisms over the draws, and
    neighbouring datasets share the draws of their common examples. By the
    joint convexity of the hockey-stick divergence (and the quasi-convexity
    of the Renyi divergence) the mixtures are then at least as close as the
    mechanisms for any fixed draws: the row positions no longer matter. This
    needs draws that are independent across rows, as Keras's layers make
    them unless a `noise_shape` shares one draw between rows.

    Keras's global seed generator, from which `keras.random` ops without a
    seed draw, is keyed likewise; its state is left as the DP step finds it
    (as any state change in a `keras.StatelessScope`), the key alone makes
    its draws fresh. Under tf.distribute it is keyed only if the replica's
    thread already has one (Keras keeps it per thread, and cannot create it
    inside a replicated step). An op given an integer seed draws the same
    values at every call, out of any key's reach. Stochastic layers should
    draw from a `SeedGenerator` of their own, as Keras's layers do.

    Attributes:
      generators: the model's seed generators, then Keras's global one.
      values: their public states before this clipped sum.
      bases: int64 [2] per generator, the (a, b) of the docstring.
      owned: how many of `generators` are the model's, whose states
        advance after each clipped sum.
    """
    generators: list
    values: list
    bases: list
    owned: int

    @classmethod
    def of(cls, model, secret=None) -> "Seeds":
        """The seeds of `model`'s stochastic layers under key `secret`.

        Args:
          model: the model.
          secret: int64 [2], the key of the layers' draws; None takes a
            public constant, so that the draws follow from the generator
            states alone, which anyone may know (not for a DP release).

        Raises:
          ValueError: `secret` is not of shape [2].
        """
        key = tf.cast(_PUBLIC_KEY if secret is None else secret, tf.int64)
        if key.shape != [2]:
            raise ValueError(f"Expected a seed of shape [2], got {key.shape}.")
        generators = []
        for layer in model._flatten_layers():
            generators.extend(getattr(layer, "_seed_generators", []))
        owned = len(generators)
        common = _compat.global_seed_generator(
            create=not tf.distribute.has_strategy())
        if common is not None and all(g is not common for g in generators):
            generators.append(common)
        values = [tf.convert_to_tensor(g.state.value) for g in generators]
        return cls(generators, values,
                   [_base(key, i, v) for i, v in enumerate(values)], owned)

    def mapping(self, unit) -> list:
        """(state variable, value) pairs for unit `unit`'s draws."""
        unit = tf.cast(unit, tf.int64)
        return [(g.state, tf.cast(tf.stack([
            tf.math.floormod(b[0] + unit, _KERAS_SEED_MODULUS), b[1]]),
            g.state.dtype)) for g, b in zip(self.generators, self.bases)]

    def advanced(self) -> list:
        """The model's generators' next states, (state variable, value) pairs.

        The public states advanced by one call; the key never enters them:
        they are saved with the model.
        """
        return [(g.state, s + tf.constant([0, 1], s.dtype)) for g, s in
                zip(self.generators[:self.owned], self.values)]


def _base(key, index: int, state) -> tf.Tensor:
    """(a, b) of `Seeds`: int64 [2] in [0, 2^31 - 2), a function of all three.

    Folding in the generator's index keeps two generators with the same state
    (two `Dropout(seed=1)`) apart; folding in its state gives each clipped
    sum of a step (DP-SAM's two, accumulated batches) draws of its own.
    """
    seed = noise.stream_seed(key, index)
    state = tf.cast(state, tf.int64)
    seed = noise.stream_seed(noise.stream_seed(seed, state[0]), state[1])
    return tf.random.stateless_uniform(
        [2], seed, minval=0, maxval=_KERAS_SEED_MODULUS, dtype=tf.int64,
        alg=noise.RNG_ALGORITHM)


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
