"""DP-SAT (and DP-SGD, DP-SAM) as Keras 3 optimizers for the TensorFlow backend.

DP-SAT (Park, Kim, Choi, Lee, ICML 2023) is differentially private SGD that
takes each gradient at a point perturbed towards higher loss, which steers
training to flatter minima. Per logical step t, with clip norm C, noise
multiplier sigma, radius rho and expected batch size B:

  1. eps_t = rho * g_{t-1} / (||g_{t-1}|| + 1e-16), global L2 norm over all
     variables, where g_{t-1} is the previous step's private gradient; eps_1 = 0.
  2. At w_t + eps_t compute per-example gradients g_i and clip each:
     g_i * min(1, C / (||g_i|| + 1e-6)).
  3. g_t = (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / B, noise once per step.
  4. Apply the base update, SGD with momentum, to w_t (never to w_t + eps_t)
     with g_t, and keep g_t (before momentum) in an optimizer slot.

The perturbation is post-processing of an already-private gradient, so DP-SAT
spends no extra privacy and one forward/backward pass per step; rho = 0 is
DP-SGD. `DPSAMKeras` is the paper's naive baseline that privatises a second,
fresh ascent gradient (two noisy queries per step).

Keras 3 hands optimizers summed gradients only, so per-example work starts in
the train step of a DP model (`tf_dpsat.make_private`), which hands the batch
to `DPSATKeras.private_train_step`. That step reads as the list above:
`perturb` (step 1), `tf_dpsat.per_example.clipped_sum` (step 2), the noisy
mean of `tf_dpsat.noise` (step 3) and the base update (step 4). The weights
are never modified to w_t + eps_t: the clipped sum is taken at given values
of the variables, so evaluation, checkpoints and an exception mid-step
always see w_t.

References:
  Park, Kim, Choi, Lee. "Differentially Private Sharpness-Aware Training".
  ICML 2023. https://arxiv.org/abs/2306.05651
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
"""

import math
import warnings
from typing import Any
from typing import List
from typing import NamedTuple
from typing import Optional
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_dpsat import _replicas
from tf_dpsat import noise
from tf_dpsat import per_example
from tf_dpsat import sampling
from tf_dpsat import validation
from tf_dpsat.per_example import batch_independence

DIRECTIONS = ("gradient", "momentum")
CLIPPING_PATHS = per_example.ENGINES
# Added to the perturbation direction's norm (the authors' value).
PERTURBATION_EPSILON = 1e-16
# The static loss scale where a layer computes in float16 and the user set
# none. The scaled loss is one unit's, not the batch mean that Keras scales
# (Keras's initial dynamic scale, 2**15, is meant for gradients B times
# smaller), and a unit whose scaled gradient overflows float16 (largest
# value 65504) is dropped from the sum. Before clipping an example's
# gradient entries can reach the hundreds, so the scale stays small; 2**5
# still lifts per-example deltas down to 2**-14 / 2**5 (float16's smallest
# normal number, unscaled) to full float16 precision.
DEFAULT_FLOAT16_LOSS_SCALE = 2.0**5


def perturb(params: Sequence[tf.Tensor], direction: Sequence[tf.Tensor],
            rho: float) -> List[tf.Tensor]:
    """Params + rho * d / (||d|| + 1e-16): where DP-SAT takes gradients.

    A zero direction (the first step) leaves the params unchanged.

    Args:
      params: the weights, one tensor per variable.
      direction: the direction d, shaped like `params`.
      rho: the radius.

    Returns:
      One tensor per variable.
    """
    scale = rho / (per_example.clip.global_norm(direction) +
                   PERTURBATION_EPSILON)
    return [p + tf.cast(scale, d.dtype) * d for p, d in zip(params, direction)]


class StepResult(NamedTuple):
    """What `DPSATKeras.private_train_step` hands back to the DP model.

    Attributes:
      y_pred: the predictions at the perturbed point (for the metrics).
      sums: the batch's `tf_dpsat.per_example.ClippedSum`; its counts and
        loss are non-private diagnostics.
      refused: boolean scalar, True when the step budget refused the batch
        (no weight changed; the DP model then updates no metric either).
    """
    y_pred: Any
    sums: per_example.ClippedSum
    refused: tf.Tensor


class _Step(NamedTuple):
    """A private step's inputs, as the ascent direction may need them."""
    model: keras.Model
    variables: list
    params: list
    batch: per_example.Batch


def _find_batch_normalization(model) -> Optional[str]:
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer.name
    return None


# Noise keys are int64 seeds of the stateless sampler: [0, 2**63).
_NOISE_KEY_LIMIT = 2**63
# A step's streams of its (noise key, step) seed: the noise of query q on
# replica r is stream q * 2^16 + r, the stochastic layers' draws of that
# query's clipped sum stream _LAYER_STREAM + q * 2^16 + r. Queries stay
# below 2^15, so no two streams meet and none is correlated with another.
# After `iterations` moved back g > 0 times in one process (`_Releases`), the
# seed is stream _GENERATION_STREAM + g of (noise key, step), beyond them all.
_REPLICA_STREAMS = 2**16
_LAYER_STREAM = 2**31
_GENERATION_STREAM = 2**32


def _check_noise_key(key) -> int:
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"Expected the noise key to be an int in [0, 2**63), "
                        f"got {type(key).__name__}.")
    if not 0 <= key < _NOISE_KEY_LIMIT:
        # The value itself stays out of the message: it may be a secret.
        raise ValueError("Expected the noise key in [0, 2**63); pass e.g. "
                         "tf_dpsat.noise.secret_key().")
    return key


class _SecretKey:
    """Holds the noise key's `tf.Variable` out of every saved state.

    Deliberately not a `tf.Module`/Trackable nor a Keras variable: an
    optimizer attribute of this type is invisible to Keras's variable
    tracking (`optimizer.variables`, `.keras`, `.weights.h5`) and to
    `tf.train.Checkpoint`, while traced functions still capture the variable.
    Whoever reads a saved optimizer thus cannot recompute its noise.
    """

    __slots__ = ("variable",)

    def __init__(self, key: int):
        self.variable = tf.Variable(
            _check_noise_key(key), dtype=tf.int64, trainable=False,
            name="noise_key",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def set(self, key: int) -> None:
        self.variable.assign(_check_noise_key(key))

    def __repr__(self) -> str:  # Never print the key.
        return "<secret noise key>"


class _Releases:
    """Which steps of its key's noise this optimizer object has released.

    Noise and layer draws are functions of (key, `iterations`), so that a run
    resumed in a new process from its checkpoint and its key replays them
    bitwise, batches included (the binary keys the sampling likewise). In one
    process `iterations` can move back, though: `tf.train.Checkpoint.restore`,
    `load_weights` or `iterations.assign` to an earlier step, for example to
    retrain from a saved starting point. The next steps would then draw noise
    that this object has already released, on other batches (the sampler's
    state does not move back), and the difference of two such releases is
    free of noise; an accountant reading `iterations` would also forget the
    steps moved back over. So the optimizer notes, out of every saved state
    (like `_SecretKey`), where its releases stand: a step taken at
    `iterations < next_step` starts a new generation of the noise (folded
    into every seed) and counts the steps moved back over in `rolled_back`,
    which `released_steps`, and so the step budget and
    `tf_dpsat.PrivacyCallback`, add to `iterations`. A new process starts at
    generation 0: resuming a run stays bitwise.

    Attributes:
      next_step: int64, `iterations` after the last released step; 0 before.
      generation: int64, how many times `iterations` moved back.
      rolled_back: int64, released steps that `iterations` moved back over.
    """

    __slots__ = ("next_step", "generation", "rolled_back")

    def __init__(self):
        def counter(name):
            return tf.Variable(
                0, dtype=tf.int64, trainable=False, name=name,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        self.next_step = counter("dp_next_step")
        self.generation = counter("dp_noise_generation")
        self.rolled_back = counter("dp_rolled_back_steps")

    def moved_back(self, iterations) -> tf.Tensor:
        """Whether a step at `iterations` would reuse released noise."""
        return tf.cast(iterations, tf.int64) < self.next_step

    def generation_at(self, iterations) -> tf.Tensor:
        """The noise generation a step at `iterations` draws from."""
        return self.generation + tf.cast(self.moved_back(iterations), tf.int64)

    def rolled_back_at(self, iterations) -> tf.Tensor:
        """`rolled_back` once a step at `iterations` is released."""
        iterations = tf.cast(iterations, tf.int64)
        return self.rolled_back + tf.where(self.moved_back(iterations),
                                           self.next_step - iterations,
                                           tf.zeros_like(iterations))

    def released_at(self, iterations) -> tf.Tensor:
        """The steps released before a step at `iterations`."""
        return (tf.cast(iterations, tf.int64) +
                self.rolled_back_at(iterations))

    def record(self, iterations, released) -> None:
        """Notes a step at `iterations`, if `released` (a boolean scalar)."""
        iterations = tf.cast(iterations, tf.int64)
        updates = [(self.generation, self.generation_at(iterations)),
                   (self.rolled_back, self.rolled_back_at(iterations)),
                   (self.next_step, iterations + 1)]
        values = [tf.where(released, new, tf.convert_to_tensor(v))
                  for v, new in updates]
        for (variable, _), value in zip(updates, values):
            variable.assign(value)

    def __repr__(self) -> str:
        return "<released steps>"


class _Accumulation:
    """The running state of a logical step, held out of every saved state.

    Between the physical batches of one logical step `sums` holds the exact
    clipped sum of the batches so far, with no noise: a saved copy would
    release it. Like `_SecretKey`, this holder is neither a Keras variable
    nor a `tf.Module`/Trackable, so its variables are not in
    `optimizer.variables` and neither Keras saving (`.keras`,
    `.weights.h5`, and through them `ModelCheckpoint` and
    `BackupAndRestore`) nor TensorFlow's (`tf.train.Checkpoint`,
    `tf.saved_model.save`) can reach them, while traced steps still capture
    them.

    Attributes:
      sums: one float variable per trainable variable, the clipped sum.
      units: float32 scalar, the units (padding included) summed so far.
      step: int64 scalar, the physical batches of this step done so far.
      started_at: int64 scalar, `iterations` when this step's first batch
        was summed. Where `iterations` has moved since (a restore part-way
        through a step that the Keras loader does not see, such as
        `tf.train.Checkpoint.restore`), the sum belongs to another logical
        step and is dropped: `*_at` read it as empty.
    """

    __slots__ = ("sums", "units", "step", "started_at")

    def __init__(self, sums, units, step, started_at):
        self.sums, self.units, self.step = sums, units, step
        self.started_at = started_at

    def reset(self) -> None:
        """Starts a fresh logical step, dropping the batches summed so far."""
        for s in self.sums:
            s.assign(tf.zeros(s.shape, s.dtype))
        self.units.assign(0.0)
        self.step.assign(0)

    def _stale(self, iterations) -> tf.Tensor:
        return ((self.step > 0) &
                (self.started_at != tf.cast(iterations, tf.int64)))

    def step_at(self, iterations) -> tf.Tensor:
        """The index of a physical batch at `iterations` in its logical step."""
        return tf.where(self._stale(iterations), tf.zeros_like(self.step),
                        tf.convert_to_tensor(self.step))

    def sums_at(self, iterations) -> list:
        """The clipped sums that a physical batch at `iterations` adds to."""
        stale = self._stale(iterations)
        return [tf.where(stale, tf.zeros_like(s), s)
                for s in (tf.convert_to_tensor(v.value) for v in self.sums)]

    def units_at(self, iterations) -> tf.Tensor:
        """The units that a physical batch at `iterations` adds to."""
        return tf.where(self._stale(iterations), 0.0,
                        tf.convert_to_tensor(self.units))

    def __repr__(self) -> str:
        return f"<accumulation over {len(self.sums)} variables>"


class _FixedAtConstruction:
    """A DP hyper-parameter attribute that `__init__` sets once; read-only after.

    The traced training step bakes the value in (a Python number), while
    `tf_dpsat.PrivacyCallback` reads the attribute whenever it computes
    epsilon: a later assignment would change the epsilon reported, not the
    noise or the clipping applied.
    """

    def __set_name__(self, owner, name):
        self.name, self.slot = name, "_fixed_" + name

    def __get__(self, optimizer, owner=None):
        if optimizer is None:
            return self
        try:
            return optimizer.__dict__[self.slot]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, optimizer, value):
        if self.slot in optimizer.__dict__:
            _refuse_assignment(optimizer, self.name,
                               optimizer.__dict__[self.slot], value)
        # Past Keras's attribute tracking: a number or None has no state.
        optimizer.__dict__[self.slot] = value


class _ClassConstant:
    """A class's constant that no instance can shadow (`queries_per_step`)."""

    def __init__(self, value):
        self.value = value

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, optimizer, owner=None):
        return self.value

    def __set__(self, optimizer, value):
        _refuse_assignment(optimizer, self.name, self.value, value)


def _refuse_assignment(optimizer, name: str, old, new) -> None:
    cls = type(optimizer).__name__
    raise AttributeError(
        f"{cls}.{name} is fixed at construction: the training step traced "
        f"with {name}={old!r} would keep using it, while "
        f"tf_dpsat.PrivacyCallback would account for {name}={new!r}. Build a "
        f"new optimizer instead (e.g. {cls}.from_config({{**optimizer."
        f"get_config(), '{name}': {new!r}}})) and compile the model with "
        "it; the steps already taken stay spent, count their epsilon too.")


@keras.saving.register_keras_serializable(package="tf_dpsat")
class DPSATKeras(keras.optimizers.Optimizer):
    """Differentially private sharpness-aware training (DP-SAT) for Keras 3.

    Use with a DP model: `model = tf_dpsat.make_private(model)`, then
    `model.compile(optimizer=DPSATKeras(...), loss=...)` and `model.fit`.
    Every training step clips per-example (or per-microbatch) gradients taken
    at the DP-SAT perturbed point, adds Gaussian noise once per logical step
    and applies SGD with momentum. `iterations` counts logical (noisy) steps,
    the number a privacy accountant needs. The DP settings the accountant
    reads (`noise_multiplier`, `l2_norm_clip`, `expected_batch_size`,
    `num_microbatches`, `queries_per_step`) are read-only: the traced step
    keeps the values it was built with, so another value needs a new
    optimizer.

    Args:
      learning_rate: float or schedule, as for `keras.optimizers.SGD`.
      momentum: SGD momentum in [0, 1].
      nesterov: whether to use Nesterov momentum.
      l2_norm_clip: C > 0, the bound on each example's gradient norm.
      noise_multiplier: sigma >= 0; the noise on the summed clipped gradient
        has standard deviation sigma * C. sigma = 0 gives no privacy.
      rho: DP-SAT radius >= 0; 0 is exactly DP-SGD (no perturbation work).
      num_microbatches: None clips each example; otherwise the batch is split
        into this many equal groups whose mean gradients are clipped, summed,
        noised once and divided by the number of groups (tensorflow-privacy's
        convention). It must divide the batch size. Only for fixed-size
        batches (the replace-one adjacency of shuffled batches): with Poisson
        sampling, adding one example shifts every later row into another
        microbatch, so one example could move all of them; it is refused
        together with `expected_batch_size`, and by
        `tf_dpsat.PrivacyCallback(sampling="poisson")`.
      expected_batch_size: the divisor B of the noisy sum. Set it under
        Poisson sampling, where batches are padded with zero-weight
        examples (`tf_dpsat.PrivacyCallback(sampling="poisson")` refuses
        an optimizer without it). None divides by the number of units (examples or
        microbatches) in the logical step, padding included: never by a
        count that depends on the data.
      gradient_accumulation_steps: k >= 1 physical batches form one logical
        step: their clipped sums are accumulated, then noise is added and the
        update applied once. The DP-SAT perturbation is the same for all k.
        The k physical batches must be the pieces of ONE logical batch: with
        Poisson sampling, cut each sampled logical batch into k with
        `tf_dpsat.sampling.poisson_dataset(..., physical_batches=k)` and set
        `expected_batch_size` to the expected logical batch. Feeding k
        independently sampled Poisson batches instead lets one example join
        a logical step up to k times (sensitivity up to k C, not C), and
        the accountant's epsilon is then too small. Between the physical
        batches of a step the running sum is the exact, un-noised clipped
        sum of the batches so far, so it is kept out of every saved state
        (`.keras`, `.weights.h5`, hence `ModelCheckpoint` and
        `BackupAndRestore`, `tf.train.Checkpoint`, SavedModel), like the
        noise key: a model saved part-way through a logical step is saved
        as if that step had not started, and a restored optimizer (or one
        that `load_weights` reloads) starts a fresh logical step. The
        physical batches dropped that way were never released, so that
        costs no privacy. A restore that moves `iterations` part-way
        through a step (`tf.train.Checkpoint.restore` too) drops the running
        sum at the next batch. Moving `iterations` back in one process
        (restoring an earlier step) never reuses released noise, and the
        steps moved back over still count (`released_steps`), as steps on
        fresh batches: after such a restore, build the sampler with a new
        key (`tf_dpsat.sampling.poisson_dataset(seed=None)`). Its old key
        would replay the same batches, whose second query with fresh noise
        costs more privacy than a fresh step, and epsilon would not count
        it.
      seed: None (default) takes the noise key from OS entropy
        (`os.urandom`). The key is secret: no saved file (`.keras`,
        `.weights.h5`, `tf.train.Checkpoint`) and no `get_config()` holds it,
        so a loaded optimizer draws fresh noise. An integer seed in
        [0, 2**63) is the reproducible opt-in: it is the key and is kept in
        `get_config()`, so save/load resumes bitwise. Whoever knows the seed
        can recompute each step's noise and subtract it from a released
        checkpoint; the privacy guarantee then holds only against those who
        do not know it. `set_noise_key` sets a secret key afterwards. The
        key also keys the draws of the model's stochastic layers (Dropout,
        GaussianNoise, ...) in the DP step, on a stream of their own: those
        must be as secret as the noise, whatever seed Keras was given
        (`tf_dpsat.per_example.Seeds` explains why).
      direction: "gradient" (DP-SAT) or "momentum" (the authors'
        DPSATMomentum variant: the direction is the last update reversed,
        w_{t-1} - w_t).
      clipping: how per-example gradient norms are computed. "fast" uses
        per-layer rules (ghost norms / direct per-example gradients and
        book-keeping, `tf_dpsat.per_example`) for Dense, Conv1D/2D,
        DepthwiseConv2D, Embedding, LayerNormalization, GroupNormalization
        and any layer with a registered rule
        (`tf_dpsat.per_example.register_rule`), and raises naming the cause
        for anything else; "vectorized" runs `tf.vectorized_map` over
        per-example backward passes (any model); "auto" (default) is "fast"
        where it applies and "vectorized" elsewhere (a warning names the
        cause once). All three give the same result.
        Under the `mixed_bfloat16` and `mixed_float16` policies both engines
        compute the passes in bfloat16 / float16 and the norms, clip
        factors, clipped sums and noise in float32.
      batch_slices: the batch is clipped as this many slices of whole units
        (examples or microbatches), each with its own forward and backward
        pass; their clipped sums are added before the noise, so the step is
        the same up to float rounding (the fast path draws dropout masks per
        slice). The slices are independent, so TensorFlow runs one slice's
        matrix products while another waits for its clip factors. None
        (default): 2 on a CPU outside XLA and tf.distribute, where that
        pays (benchmarks/README.md), else 1
        (`tf_dpsat.per_example.slice_count`).
      chunk_units: a batch of more units (examples or microbatches) than
        this is clipped in chunks of at most this many units, one after the
        other (a `tf.while_loop`; each chunk is cut into `batch_slices`
        slices), so that the per-example work of at most `chunk_units`
        units is in memory at once (tb_cnn at batch 1024 and 2048 then
        takes less memory than its non-private step: benchmarks/README.md).
        The step is the same up to float rounding (the fast path draws
        dropout masks per slice). Default 512: a batch up to it (such as
        a Poisson batch of expected size 256, padded to about 350 rows)
        traces the same step as without chunks. None clips the whole batch at once, as
        is a batch whose size is only known when the step runs (a partial
        last batch).
      loss_scale: the static loss scale S > 0 of float16 passes (the
        `mixed_float16` policy): each unit's loss is multiplied by S before
        its backward pass, so that small gradients do not underflow float16,
        and its gradient divided by S in float32 before its norm is taken,
        so the clipping sees the true gradient. A unit whose scaled
        gradient overflows float16 is dropped (it counts in the non-private
        `nonfinite_gradients` diagnostic: lower S if it grows). The scale
        never changes: Keras's dynamic `LossScaleOptimizer` skips a step
        when any gradient of the batch overflows, an un-noised decision on
        the whole batch, so it is refused. None (default): 2**5 where a
        layer computes in float16 (`DEFAULT_FLOAT16_LOSS_SCALE`), else 1 (no
        scaling). A power of two scales and unscales exactly.
      **kwargs: `name`, `weight_decay`, `use_ema`, ... of
        `keras.optimizers.Optimizer`. `clipnorm`, `clipvalue` and
        `global_clipnorm` are refused: they would act on the noisy gradient;
        so is `loss_scale_factor` (Keras's scale of the batch loss): use
        `loss_scale`.

    References:
      Park, Kim, Choi, Lee. "Differentially Private Sharpness-Aware Training".
      ICML 2023.
    """

    # Noisy queries per step, which the accountant reads. DPSAMKeras
    # overrides these.
    queries_per_step = _ClassConstant(1)
    _supports_accumulation = True
    # Read-only once set in __init__: see _FixedAtConstruction.
    l2_norm_clip = _FixedAtConstruction()
    noise_multiplier = _FixedAtConstruction()
    num_microbatches = _FixedAtConstruction()
    expected_batch_size = _FixedAtConstruction()

    def __init__(
        self,
        learning_rate: Any = 2.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        *,
        l2_norm_clip: float = 0.1,
        noise_multiplier: float,
        rho: float = 0.03,
        num_microbatches: Optional[int] = None,
        expected_batch_size: Optional[int] = None,
        gradient_accumulation_steps: Optional[int] = 1,
        seed: Optional[int] = None,
        direction: str = "gradient",
        clipping: str = "auto",
        batch_slices: Optional[int] = None,
        chunk_units: Optional[int] = per_example.DEFAULT_CHUNK_UNITS,
        loss_scale: Optional[float] = None,
        **kwargs,
    ):
        for name in ("clipnorm", "clipvalue", "global_clipnorm"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{type(self).__name__} does not accept {name}={kwargs[name]}"
                    ": it would clip the already-noised gradient and break the"
                    " privacy analysis. Per-example clipping is set by"
                    " `l2_norm_clip`.")
            kwargs.pop(name, None)
        if kwargs.get("loss_scale_factor") is not None:
            raise ValueError(
                f"{type(self).__name__} does not accept loss_scale_factor="
                f"{kwargs['loss_scale_factor']}: Keras would unscale the "
                "summed gradient after the clipping, which would then bound "
                "the scaled per-example gradients. Pass loss_scale= instead: "
                "each example's gradient is unscaled before it is clipped.")
        kwargs.pop("loss_scale_factor", None)
        super().__init__(learning_rate=learning_rate, **kwargs)
        validation.check_non_negative("momentum", momentum)
        if momentum > 1:
            raise ValueError(f"Expected momentum={momentum} <= 1.")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.l2_norm_clip = validation.check_positive("l2_norm_clip",
                                                      l2_norm_clip)
        self.noise_multiplier = validation.check_non_negative(
            "noise_multiplier", noise_multiplier)
        if self.noise_multiplier == 0:
            message = (f"{type(self).__name__}(noise_multiplier=0) adds no noise:"
                       " training is NOT differentially private.")
            logging.warning(message)
            warnings.warn(message, stacklevel=2)
        self.rho = validation.check_non_negative("rho", rho)
        self.num_microbatches = validation.check_int(
            "num_microbatches", num_microbatches, allow_none=True)
        self.expected_batch_size = validation.check_int(
            "expected_batch_size", expected_batch_size, allow_none=True)
        if (self.num_microbatches is not None and
                self.expected_batch_size is not None):
            raise ValueError(
                f"num_microbatches={self.num_microbatches} with "
                f"expected_batch_size={self.expected_batch_size} is refused: "
                "with Poisson-sampled (padded) batches, adding one example "
                "shifts every later row into another microbatch, so one "
                "example can change every microbatch's clipped gradient "
                "(sensitivity up to num_microbatches * C, not the C the "
                "accountant assumes). Use num_microbatches=None (per-example "
                "clipping), or microbatches with fixed-size batches and "
                "expected_batch_size=None.")
        self._accumulation_steps = validation.check_int(
            "gradient_accumulation_steps", gradient_accumulation_steps or 1)
        self.direction = validation.check_one_of("direction", direction,
                                                 DIRECTIONS)
        self.clipping = validation.check_one_of("clipping", clipping,
                                                CLIPPING_PATHS)
        self.batch_slices = validation.check_int("batch_slices", batch_slices,
                                                 allow_none=True)
        self.chunk_units = validation.check_int("chunk_units", chunk_units,
                                                allow_none=True)
        validation.check_int("seed", seed, minimum=0, allow_none=True)
        self.seed = seed
        self.loss_scale = (None if loss_scale is None else
                           validation.check_positive("loss_scale", loss_scale))
        if (not self._supports_accumulation and
                self._accumulation_steps > 1):
            raise ValueError(
                f"{type(self).__name__} does not support gradient accumulation:"
                " its ascent query needs the whole logical batch before the"
                " descent pass. Use a larger physical batch.")
        if self.use_ema and self._accumulation_steps > 1:
            raise ValueError("use_ema with gradient_accumulation_steps > 1 is "
                             "not supported.")
        # The slices the last traced step cut its batch into (see
        # `batch_slices`), for reports; None before the first step.
        self.traced_batch_slices = None
        self._warned_batch = False  # See _check_logical_batch.
        # A tf.Variable, so that traced steps (XLA included) read it and
        # set_noise_key can change it after tracing; inside a plain holder,
        # so that neither Keras nor TensorFlow checkpointing tracks or saves it.
        self._noise_key = _SecretKey(
            noise.secret_key() if seed is None else seed)
        self._releases = _Releases()
        with keras.name_scope(self.name, caller=self):
            # A variable, so that save/load restores it and XLA reads it.
            self._step_budget = keras.Variable(
                -1, name="step_budget", dtype="int64", trainable=False,
                aggregation="only_first_replica")

    # ---------------------------------------------------------------- state

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._directions = []
        if self._keeps_direction():
            # g_{t-1}, or w_{t-1} - w_t for direction="momentum".
            self._directions = self.add_optimizer_variables(
                variables, "dpsat_direction")
        # Out of `self.variables` and of every saved state: see _Accumulation.
        self._accumulation = None
        if self._accumulation_steps > 1:
            self._accumulation = self._untracked_accumulation(variables)

    def _untracked_accumulation(self, variables) -> _Accumulation:
        """Zero accumulation variables, created like Keras's slots.

        `add_optimizer_variables` would track them; these are the same
        variables (zeros, each slot colocated with its model variable, under
        the optimizer's name scope) that nothing saves.
        """
        strategy = tf.distribute.get_strategy()
        sums = []
        for variable in variables:
            value = variable.value if isinstance(variable, keras.Variable) else variable
            name = getattr(variable, "path", variable.name).replace("/", "_")
            with strategy.extended.colocate_vars_with(value), \
                    keras.name_scope(self.name, caller=self):
                sums.append(keras.Variable(
                    keras.initializers.Zeros(), shape=variable.shape,
                    dtype=variable.dtype, trainable=False,
                    name=f"{name}_dp_accumulator"))
        with keras.name_scope(self.name, caller=self):
            units = keras.Variable(0.0, dtype="float32", trainable=False,
                                   aggregation="only_first_replica",
                                   name="dp_accumulated_count")
            step = keras.Variable(0, dtype="int64", trainable=False,
                                  aggregation="only_first_replica",
                                  name="dp_accumulation_step")
            started_at = keras.Variable(0, dtype="int64", trainable=False,
                                        aggregation="only_first_replica",
                                        name="dp_accumulation_started_at")
        return _Accumulation(sums, units, step, started_at)

    def _keeps_direction(self) -> bool:
        return self.rho > 0

    def set_step_budget(self, max_steps: int) -> None:
        """Refuses every noisy step once `released_steps >= max_steps`.

        `tf_dpsat.PrivacyCallback` sets this from a target epsilon; a step
        beyond the budget changes no weight and releases no gradient.

        Args:
          max_steps: the number of logical steps allowed in total.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int):
            raise TypeError(f"Expected max_steps to be an int, got {max_steps!r}.")
        if max_steps < 0:
            raise ValueError(f"Expected max_steps={max_steps} >= 0.")
        self._step_budget.assign(max_steps)

    @property
    def released_steps(self) -> int:
        """The noisy steps this optimizer has released: what epsilon counts.

        `iterations`, plus the released steps that `iterations` was moved
        back over in this process (a restore to an earlier step, see
        `_Releases`): those stay released. Equal to `iterations` unless
        `iterations` moved back. The step budget and
        `tf_dpsat.PrivacyCallback` count this.
        """
        return int(keras.ops.convert_to_numpy(self._releases.released_at(
            tf.convert_to_tensor(self._iterations))))

    def set_noise_key(self, key: int) -> None:
        """Sets the secret key of the noise, before or after tracing.

        Each step's noise is a function of (key, `iterations`, query,
        replica), and so are the draws of the model's stochastic layers (on
        another stream). The key is never saved or serialized: set it again
        after loading a model to continue a run's noise stream (a training
        binary keeps it in a private file of its own).

        Args:
          key: an int in [0, 2**63).

        Raises:
          TypeError: `key` is not an int.
          ValueError: `key` is outside [0, 2**63).
        """
        self._noise_key.set(key)

    def load_own_variables(self, store):
        """Restores the saved state, or refuses one that does not fit.

        Keras's own loader only warns and loads nothing when the saved and
        built variables differ in number; `iterations` would then restart at
        0 and a privacy accountant reading it would undercount epsilon. A
        file saved before the noise key left the saved state (it held one
        more variable, `noise_seed`, just before `step_budget`) loads
        without it: the key is secret now, and the optimizer keeps the one
        it has. Likewise a file of tf_dpsat 0.2.0 or earlier saved with
        gradient accumulation ends with the running sum of a logical step
        (one slot per trainable variable, its unit count and physical step):
        it is not loaded.

        After loading, the optimizer starts a fresh logical step, whatever
        physical batches of the current one it had summed: their sum is
        never saved (see `gradient_accumulation_steps`).

        Raises:
          ValueError: the saved state belongs to another optimizer setup.
        """
        if not self.built:  # Keras's loader explains an unbuilt optimizer.
            return super().load_own_variables(store)
        store = self._without_legacy_accumulation(store)
        saved, built = len(store.keys()), len(self.variables)
        legacy = self.variables.index(self._step_budget)
        if saved == built + 1 and np.ndim(store[str(legacy)]) == 0:
            store = {str(i): store[str(i if i < legacy else i + 1)]
                     for i in range(built)}
            saved = built
            logging.warning("%s: the saved optimizer state holds a noise key "
                            "(tf_dpsat before 0.2); it was not loaded, the "
                            "noise continues from this optimizer's own key.",
                            self.name)
        # Same count is not enough: every shape must fit, or a state saved
        # with other settings would load shifted into the wrong slots.
        if saved != built or any(np.shape(store[str(i)]) != tuple(v.shape)
                                 for i, v in enumerate(self.variables)):
            raise ValueError(
                f"The saved state of optimizer '{self.name}' ({saved} "
                f"variables) does not fit this {type(self).__name__} ({built} "
                "variables): it was saved with other settings (momentum, "
                "rho). Loading nothing would restart `iterations`, and with "
                "it the privacy accounting, at 0; load it with the optimizer "
                "configuration it was saved with.")
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])
        if self._accumulation is not None:
            self._accumulation.reset()

    def _without_legacy_accumulation(self, store):
        """`store` less the accumulation state that older files end with.

        Up to tf_dpsat 0.2.0 the running clipped sum of gradient
        accumulation was an ordinary optimizer variable, saved after every
        other one: one slot per trainable variable, then the unit count
        (float32 scalar) and the physical step (int64 scalar). It may be
        followed by nothing else, and the state before it has the built
        count, or one more (a noise key, handled by the caller).
        """
        shapes = [tuple(v.shape) for v in self._trainable_variables]
        saved, tail = len(store.keys()), len(shapes) + 2
        start = saved - tail
        if start not in (len(self.variables), len(self.variables) + 1):
            return store
        count, step = store[str(saved - 2)], store[str(saved - 1)]
        if (np.ndim(count) or np.ndim(step) or
                np.asarray(count).dtype != np.float32 or
                np.asarray(step).dtype != np.int64 or
                any(np.shape(store[str(start + i)]) != shape
                    for i, shape in enumerate(shapes))):
            return store
        logging.warning("%s: the saved optimizer state holds the running sum "
                        "of a gradient accumulation step (tf_dpsat 0.2.0 or "
                        "earlier); it was not loaded, the optimizer starts a "
                        "fresh logical step.", self.name)
        return {str(i): store[str(i)] for i in range(start)}

    # ------------------------------------------------------- base update

    def apply(self, grads, trainable_variables=None):
        """Refuses gradients from a non-private train step.

        The DP step (`private_train_step`) applies its noisy gradient through
        the base class directly; anything reaching this method comes from a
        plain Keras train step, i.e. training without privacy.
        """
        raise TypeError(
            f"{type(self).__name__} received gradients from a non-private "
            "train step, which would train without differential privacy. "
            "Wrap the model with `model = tf_dpsat.make_private(model)` "
            "(or build it with tf_dpsat.DPSequential / subclass "
            "tf_dpsat.DPModel) before compiling it.")

    def _apply_weight_decay(self, variables):
        # Applied in update_step instead, where skipped steps can be masked.
        del variables

    def update_step(self, gradient, variable, learning_rate):
        """SGD with momentum and decoupled weight decay, as keras.optimizers.SGD.

        Also keeps the DP-SAT direction for the next step.
        """
        index = self._get_variable_index(variable)
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        old = tf.convert_to_tensor(variable)
        new = old
        if self.weight_decay is not None and self._use_weight_decay(variable):
            new = new - new * tf.cast(self.weight_decay, old.dtype) * learning_rate
        if self.momentums:
            m = self.momentums[index]
            momentum = tf.cast(self.momentum, variable.dtype)
            velocity = tf.convert_to_tensor(m) * momentum - gradient * learning_rate
            self.assign(m, velocity)
            if self.nesterov:
                new = new + velocity * momentum - gradient * learning_rate
            else:
                new = new + velocity
        else:
            new = new - gradient * learning_rate
        self.assign(variable, new)
        if self._directions:
            self.assign(self._directions[index],
                        gradient if self.direction == "gradient" else old - new)

    # ------------------------------------------------------- private step

    def private_train_step(self, model, x, y, sample_weight) -> StepResult:
        """Runs one DP-SAT step on a batch; called by the DP model's train_step.

        Perturb, clipped sum, noise, update: steps 1-4 of the module
        docstring.

        Args:
          model: the DP model being trained.
          x, y, sample_weight: the batch, as unpacked by Keras.

        Returns:
          A `StepResult`.
        """
        self._check_model(model, x)
        variables = list(model.trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        self._check_variables_are_known(variables)
        batch = per_example.Batch.from_keras(x, y, sample_weight,
                                             self.num_microbatches)
        self._check_logical_batch(batch)
        params = [tf.convert_to_tensor(v.value) for v in variables]
        at = params
        if self.rho > 0:
            direction = self._ascent_direction(
                _Step(model, variables, params, batch))
            at = perturb(params, direction, self.rho)
        sums = self._clipped_sum(model, variables, at, batch)
        refused = self._release(variables, sums,
                                self._regularization_gradients(model,
                                                               variables))
        return StepResult(sums.y_pred, sums, refused)

    def _check_model(self, model, x):
        bn = _find_batch_normalization(model)
        if bn is not None:
            raise ValueError(
                f"Layer '{bn}' is a BatchNormalization layer: its batch "
                "statistics mix examples, so per-example clipping no longer "
                "bounds any example's influence. Replace it with "
                "keras.layers.GroupNormalization or LayerNormalization.")
        # A no-op after the DP model's own check (before its first step),
        # except for a subclassed model, which has no input specs: its
        # probe takes the shapes of this batch.
        batch_independence.check(model, like=x)
        if model._compile_loss is None:
            raise ValueError("The DP model was compiled without a loss; pass "
                             "`loss=` to `model.compile`.")

    def _check_logical_batch(self, batch: per_example.Batch) -> None:
        """Refuses an `expected_batch_size` that cannot be the logical batch's.

        Under gradient accumulation it must be the expected *logical* batch
        (k physical batches of `rows` rows): `PrivacyCallback` reads it for
        the sampling rate q, and a physical batch's size there undercounts
        epsilon several times. A logical batch that `poisson_dataset(...,
        physical_batches=k)` pads to `padded_size = padded_batch_size(...,
        multiple_of=rows)` (or to the cap itself, cut into any k pieces)
        has its first k - 1 physical batches below the cap, so
        `(k - 1) * rows < sampling.padded_size_bound(expected_batch_size)`,
        which bounds the cap for every N and step count down to a
        per-step overflow probability of 1e-30. A fixed-size logical batch
        of `expected_batch_size` rows satisfies it too. Breaking it is
        refused before the step runs. It catches a physical batch's expected
        size given for the logical one from about k = 3 (k = 4, expected
        batch 256 of 60000: 64 for 256 is refused).

        `expected_batch_size <= rows` short of that is only warned about
        (once): a correct layout does it too, where one physical batch
        holds the expected logical batch but not its padding (rows from the
        expected batch size up to the cap, k = 2), and with k = 2 the two
        cannot be told apart from the shapes.

        Raises:
          tf_dpsat.validation.UserError: `expected_batch_size` is too small
            for the logical batch.
        """
        k = self._accumulation_steps
        if (k == 1 or self.expected_batch_size is None or
                not isinstance(batch.units, int)):
            return
        rows = batch.units * _replicas.num_replicas()
        bound = sampling.padded_size_bound(self.expected_batch_size)
        if (k - 1) * rows >= bound:
            raise validation.UserError(
                f"Expected {type(self).__name__}(expected_batch_size="
                f"{self.expected_batch_size}) to be the expected size of the "
                f"logical batch, which gradient_accumulation_steps={k} cuts "
                f"into physical batches of {rows} rows; but a padded Poisson "
                f"batch of that expected size needs at most {bound} rows "
                f"(any padded_batch_size), and {k - 1} of these physical "
                f"batches alone hold {(k - 1) * rows}. PrivacyCallback reads "
                "expected_batch_size for the sampling rate, so epsilon would "
                "be undercounted. Set it to the expected_batch_size given to "
                f"poisson_dataset(..., physical_batches={k}), not one "
                "physical batch's; if it is that already, take padded_size "
                f"from padded_batch_size(..., multiple_of={rows}).")
        if self.expected_batch_size <= rows and not self._warned_batch:
            self._warned_batch = True
            logging.warning(
                "%s: expected_batch_size=%d is at most the %d rows of one "
                "physical batch, with gradient_accumulation_steps=%d: it must "
                "be the expected logical batch (%d physical batches), which "
                "PrivacyCallback reads for the sampling rate. Set it to the "
                "expected size of the batch that poisson_dataset(..., "
                "physical_batches=%d) cuts into pieces, or epsilon is "
                "undercounted.", self.name, self.expected_batch_size, rows,
                k, k, k)

    def _ascent_direction(self, step: _Step) -> List[tf.Tensor]:
        """The DP-SAT direction: the previous private gradient (a slot).

        DPSAMKeras computes its direction from `step` instead.
        """
        del step  # The direction is kept from the previous step.
        return [tf.convert_to_tensor(d.value) for d in self._directions]

    def _clipped_sum(self, model, variables, params,
                     batch: per_example.Batch,
                     query: int = 0) -> per_example.ClippedSum:
        """The batch's clipped per-unit gradients at `params`, summed.

        Args:
          model, variables, params, batch: as for
            `tf_dpsat.per_example.clipped_sum`.
          query: index of the noisy query within the step that this sum
            enters (keys the stochastic layers' draws, `_layer_seed`).
        """
        sums = per_example.clipped_sum(
            model, variables, params, batch, l2_norm_clip=self.l2_norm_clip,
            engine=self.clipping, batch_slices=self.batch_slices,
            chunk_units=self.chunk_units,
            loss_scale=self._loss_scale(model),
            secret_seed=self._layer_seed(query))
        self.traced_batch_slices = sums.slices
        return sums

    def _loss_scale(self, model) -> float:
        """S of `loss_scale`: the user's, else the default under float16."""
        if self.loss_scale is not None:
            return self.loss_scale
        if any(getattr(layer, "compute_dtype", None) == "float16"
               for layer in model._flatten_layers()):
            return DEFAULT_FLOAT16_LOSS_SCALE
        return 1.0

    def _regularization_gradients(self, model, variables):
        """Gradients of weight regularizers: data-independent, never clipped."""
        with tf.GradientTape() as tape:
            losses = model._get_regularization_losses()
            if not losses:
                return None
            total = tf.add_n([tf.cast(l, tf.float32) for l in losses])
        grads = tape.gradient(total, [v.value for v in variables],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # The optimizer sums gradients over replicas; count this term once.
        return [g / _replicas.num_replicas() for g in grads]

    def _step_seed(self, query: int):
        """(noise key, step), and this query's and replica's stream index.

        They depend only on the optimizer's secret noise key, the step, the
        query's index within the step and the replica, never on the data.
        """
        iterations = tf.cast(self._iterations, tf.int64)
        seed = tf.stack([tf.convert_to_tensor(self._noise_key.variable),
                         iterations])
        # Generation 0 keeps (key, step): a resumed run replays bitwise.
        generation = self._releases.generation_at(iterations)
        seed = tf.where(generation > 0,
                        noise.stream_seed(seed, _GENERATION_STREAM + generation),
                        seed)
        if _replicas.num_replicas() > _REPLICA_STREAMS:
            # Streams of two queries must not meet.
            raise ValueError(f"Expected at most {_REPLICA_STREAMS} replicas, "
                             f"got {_replicas.num_replicas()}.")
        index = (query * _REPLICA_STREAMS +
                 tf.cast(_replicas.replica_id(), tf.int64))
        return seed, index

    def _noise_stream(self, query: int):
        """The seed and stream of this step's noise for one query, replica.

        (noise key, step) is the seed, query * 2^16 + replica the stream.
        """
        return self._step_seed(query)

    def _layer_seed(self, query: int) -> tf.Tensor:
        """The secret key of the stochastic layers' draws in one clipped sum.

        Dropout masks and the like must be as secret as the noise: the seed
        generators' states are public, and draws an adversary can recompute
        break the sensitivity bound under Poisson sampling
        (`tf_dpsat.per_example.Seeds` gives the argument). The key is
        stream _LAYER_STREAM + query * 2^16 + replica of (noise key, step),
        so it is secret exactly when the noise is (OS entropy, or the
        `seed=` opt-in), fresh every step, and independent of the noise and
        of the batch sampling. Accumulated batches of one logical step also
        fold in their index.

        Args:
          query: index of the noisy query within the step.

        Returns:
          int64 [2].
        """
        seed, index = self._step_seed(query)
        seed = noise.stream_seed(seed, _LAYER_STREAM + index)
        if self._accumulation_steps > 1:
            seed = noise.stream_seed(
                seed, self._accumulation.step_at(self._iterations))
        return seed

    def _noisy_mean(self, summed, query: int, units):
        """(summed + this replica's share of N(0, sigma^2 C^2 I)) / B.

        Each replica draws variance sigma^2 C^2 / R from its own stream, so the
        sum over replicas carries exactly sigma^2 C^2 (not R times it).

        Args:
          summed: this replica's clipped sums, one tensor per variable.
          query: index of the noisy query within the step (seeds the noise).
          units: units (examples or microbatches, padding included) in the
            logical step, summed over replicas.
        """
        divisor = self._divisor(units)
        if self.noise_multiplier == 0:
            return [s / tf.cast(divisor, s.dtype) for s in summed]
        seed, stream = self._noise_stream(query)
        return noise.noisy_mean(summed, self._noise_stddev(), seed, stream,
                                divisor)

    def _divisor(self, units):
        """B of the noisy mean: the expected batch, else the batch's units.

        Never the number of non-padding units: that count depends on the
        data, and dividing by it would release it through the update's
        norm (256 and 257 examples are told apart from one step).
        """
        if self.expected_batch_size is not None:
            return float(self.expected_batch_size)
        return tf.maximum(units, 1.0)

    def _noise_stddev(self) -> float:
        """This replica's share: the replicas' noise adds up to sigma C."""
        return (self.noise_multiplier * self.l2_norm_clip /
                math.sqrt(_replicas.num_replicas()))

    def _units_in_step(self, sums: per_example.ClippedSum):
        """The units of this batch over all replicas (padding included)."""
        if self.expected_batch_size is not None:
            return sums.units  # The divisor does not read it.
        return _replicas.all_reduce_sum(sums.units)

    def _release(self, variables, sums: per_example.ClippedSum,
                 regularization) -> tf.Tensor:
        """Noise, divide and apply the update once per logical step.

        On one device the update sits in a `tf.cond`: it runs only when the
        batch ends a logical step within the step budget. Under tf.distribute
        a synchronisation point (the optimizer's all-reduce) cannot sit inside
        `tf.cond`, so there the update runs on every physical batch and
        `_apply_or_keep` restores the old values unless the batch ends a
        step within the budget; the noise of such a batch is never used.

        Returns:
          A boolean scalar, True when the step budget refused this batch.
        """
        summed, units = sums.summed, self._units_in_step(sums)
        # Nothing below may run before the batch exists: Keras starts the step
        # function before it knows the data ran out, and a data-independent
        # `iterations += 1` would then count a step that never happened.
        with tf.control_dependencies([sums.examples]):
            budget = tf.identity(self._step_budget.value)
            iterations = tf.cast(tf.identity(self._iterations), tf.int64)
        # Steps moved back over count against the budget (`_Releases`).
        apply_now = ((budget < 0) |
                     (self._releases.released_at(iterations) < budget))
        refused = tf.logical_not(apply_now)
        k = self._accumulation_steps
        if k > 1:
            acc = self._accumulation
            step = acc.step_at(iterations)
            is_last = tf.equal(step, k - 1)
            summed = [a + s for a, s in zip(acc.sums_at(iterations), summed)]
            units = acc.units_at(iterations) + units
            _replicas.assign_per_replica(
                acc.sums,
                [tf.where(is_last, tf.zeros_like(s), s) for s in summed])
            acc.units.assign(tf.where(is_last, 0.0, units))
            acc.started_at.assign(tf.where(
                tf.equal(step, 0), iterations,
                tf.convert_to_tensor(acc.started_at)))
            acc.step.assign(tf.where(is_last, tf.zeros_like(step), step + 1))
            apply_now &= is_last

        def noisy_gradients():
            grads = self._noisy_mean(summed, 0, units)
            if regularization is not None:
                grads = [g + r for g, r in zip(grads, regularization)]
            return grads

        if not tf.distribute.has_strategy():
            def apply():
                keras.optimizers.Optimizer.apply(self, noisy_gradients(),
                                                 variables)
                return tf.constant(True)

            applied = tf.cond(apply_now, apply, lambda: tf.constant(False))
            with tf.control_dependencies([applied]):
                self._releases.record(iterations, apply_now)
            return refused
        self._apply_or_keep(apply_now, noisy_gradients(), variables)
        self._releases.record(iterations, apply_now)
        return refused

    def _apply_or_keep(self, apply_now, grads, variables) -> None:
        """Applies `grads`, then restores what changed unless `apply_now`.

        Under tf.distribute the update runs on every physical batch (see
        `_release`); a batch that does not end a step within the budget
        must leave the weights, the slots and `iterations` as they were.
        """
        touched = list(variables) + self.momentums + self._directions
        if self.use_ema:
            touched += self._model_variables_moving_average
        before = [tf.convert_to_tensor(v.value) for v in touched]
        with tf.control_dependencies([apply_now] + before):
            keras.optimizers.Optimizer.apply(self, grads, variables)
        after = [tf.convert_to_tensor(v.value) for v in touched]
        _replicas.assign_per_replica(
            touched, [tf.where(apply_now, a, b) for a, b in zip(after, before)])
        # Keras counts every call to apply; count logical steps only.
        self._iterations.assign_sub(
            tf.cast(tf.logical_not(apply_now), self._iterations.dtype))

    # ------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        for name in ("clipnorm", "clipvalue", "global_clipnorm",
                     "loss_scale_factor", "gradient_accumulation_steps"):
            config.pop(name, None)
        config.update({
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "l2_norm_clip": self.l2_norm_clip,
            "noise_multiplier": self.noise_multiplier,
            "rho": self.rho,
            "num_microbatches": self.num_microbatches,
            "expected_batch_size": self.expected_batch_size,
            "gradient_accumulation_steps": self._accumulation_steps,
            "seed": self.seed,
            "direction": self.direction,
            "clipping": self.clipping,
            "batch_slices": self.batch_slices,
            "chunk_units": self.chunk_units,
            "loss_scale": self.loss_scale,
        })
        return config


@keras.saving.register_keras_serializable(package="tf_dpsat")
class DPSAMKeras(DPSATKeras):
    """DP-SAM, the naive private SAM baseline of Park et al. (2023).

    The ascent direction is a second, freshly privatised gradient at w_t (its
    own clipping and noise); the descent gradient is then taken at
    w_t + rho * g_asc / ||g_asc||. That is two noisy queries and two
    forward/backward passes per step, which `queries_per_step = 2` tells the
    accountant (`tf_dpsat.accounting`, `tf_dpsat.PrivacyCallback`).

    Takes the arguments of `DPSATKeras`; `rho` must be > 0, `direction` must be
    "gradient" and gradient accumulation is not supported.
    """

    queries_per_step = _ClassConstant(2)
    _supports_accumulation = False

    def __init__(self, *args, rho: float = 0.03, direction: str = "gradient",
                 **kwargs):
        if direction != "gradient":
            raise ValueError(f"DPSAMKeras takes no direction={direction!r}: "
                             "its ascent direction is a fresh private gradient.")
        if validation.check_non_negative("rho", rho) == 0:
            raise ValueError("Expected rho=0.0 > 0 for DPSAMKeras; rho=0 is "
                             "DP-SGD: use DPSATKeras(rho=0), which spends one "
                             "query per step instead of two.")
        super().__init__(*args, rho=rho, direction=direction, **kwargs)

    def _keeps_direction(self) -> bool:
        return False

    def _ascent_direction(self, step: _Step) -> List[tf.Tensor]:
        """A private gradient at w_t, summed over replicas."""
        sums = self._clipped_sum(step.model, step.variables, step.params,
                                 step.batch, query=1)
        grads = self._noisy_mean(sums.summed, 1, self._units_in_step(sums))
        return _replicas.all_reduce_sum(grads)
