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
to `DPSATKeras.private_train_step`; the whole algorithm lives in this module.
The weights are never modified to w_t + eps_t: the perturbed forward pass runs
under a `keras.StatelessScope` that maps each variable to its perturbed value,
so evaluation, checkpoints and an exception mid-step always see w_t.

Per-example norms come from one of two paths, which give the same result:
`tf_dpsat.fast_clipping` (per-layer rules: ghost norms or direct per-example
gradients, then the clipped sum by book-keeping; one forward and one backward
pass) for networks of Dense, Conv, Embedding and normalization layers, and
`tf.vectorized_map` over per-example backward passes for anything else.
Either runs on independent slices of the batch (`batch_slices`), whose
clipped sums are added before the noise.

References:
  Park, Kim, Choi, Lee. "Differentially Private Sharpness-Aware Training".
  ICML 2023. https://arxiv.org/abs/2306.05651
  Abadi et al. "Deep Learning with Differential Privacy". CCS 2016.
"""

import math
import warnings
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras.src.backend.common.stateless_scope import StatelessScope
from keras.src.losses import losses as keras_losses

from tf_dpsat import batch_independence
from tf_dpsat import clipping
from tf_dpsat import fast_clipping
from tf_dpsat import noise
from tf_dpsat import validation

DIRECTIONS = ("gradient", "momentum")
CLIPPING_PATHS = ("auto", "fast", "vectorized")
# Reductions after which Keras divides by the number of replicas; the per
# example losses must not carry that factor (it would change what is clipped).
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
# Keras's built-in losses whose value for an example is a function of that
# example's row alone (reduced over the last axis at most); see _row_wise.
_ROW_WISE_LOSS_FNS = tuple(getattr(keras.losses, name) for name in (
    "binary_crossentropy", "binary_focal_crossentropy",
    "categorical_crossentropy", "categorical_focal_crossentropy",
    "categorical_hinge", "cosine_similarity", "hinge", "huber",
    "kl_divergence", "log_cosh", "mean_absolute_error",
    "mean_absolute_percentage_error", "mean_squared_error",
    "mean_squared_logarithmic_error", "poisson",
    "sparse_categorical_crossentropy", "squared_hinge"))
# Offset between the dropout seeds of consecutive examples (see _seed_mapping).
_SEED_STRIDE = 2**32
# (model, reason) pairs already logged when falling back to vectorized clipping.
_FALLBACKS_LOGGED = set()


def _strategy():
    return tf.distribute.get_strategy()


def _num_replicas() -> int:
    return _strategy().num_replicas_in_sync


def _replica_id():
    ctx = tf.distribute.get_replica_context()
    return 0 if ctx is None else ctx.replica_id_in_sync_group


def _all_reduce_sum(value):
    """Sums `value` (a tensor or list) over replicas; identity on one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _assign_per_replica(variables, values):
    """Assigns each replica's own value to its copy of each variable.

    Mirrored variables without an aggregation cannot be assigned in a replica
    context; like Keras' gradient accumulation, route through a merge call.
    """

    def update(distribution, variables, values):
        for var, value in zip(variables, values):
            distribution.extended.update(
                var, lambda v, x: v.assign(x), args=(value,), group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        update, _strategy(), [v.value for v in variables], values)


def _unit_loss_gradients(model, y, y_pred, sample_weight, units):
    """d(loss of its unit)/d(prediction) for every prediction, like y_pred.

    Each unit's (example's or microbatch's) compiled loss is differentiated
    with respect to its own predictions inside `tf.vectorized_map`. Taking
    the gradient inside the map, rather than of the mapped losses, keeps XLA
    from compiling the batch in as a constant (and recompiling every step).
    """
    n = _batch_size(y_pred)

    def group(t):
        return tf.reshape(t, tf.concat([[units, -1], tf.shape(t)[1:]], 0))

    def unit_gradient(args):
        y_u, p_u, w_u = args
        with tf.GradientTape() as tape:
            tape.watch(p_u)
            loss = _compiled_loss_value(model, y_u, p_u, w_u)
        return tape.gradient(loss, p_u)

    grads = tf.vectorized_map(unit_gradient, tf.nest.map_structure(
        group, (y, tf.nest.map_structure(tf.stop_gradient, y_pred),
                sample_weight)))
    return tf.nest.map_structure(
        lambda g: tf.reshape(g, tf.concat([[n], tf.shape(g)[2:]], 0)), grads)


def _row_wise(loss_fn) -> bool:
    """Whether `loss_fn`'s value for an example depends on that example only.

    Only Keras's own row-wise losses qualify, as the built-in class or the
    wrapper of a loss given by name, and only without `ignore_class` (its
    masked mean divides by a count over the whole batch) or an `axis` other
    than the last. A user's loss may couple examples (normalise over the
    batch, say); differentiating its batch value would give each example a
    gradient that depends on the others, which clipping does not bound.
    """
    wrapper = keras_losses.LossFunctionWrapper
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


def _batch_loss_gradients(model, y, y_pred, sample_weight, units):
    """Every unit's loss gradient from one batch loss, where that is exact.

    For a row-wise loss reduced by a sum, or by a mean over the batch's
    elements ("sum_over_batch_size"), the per-unit losses add up to the batch
    loss times `units` (times 1 for a sum); its gradient with respect to the
    predictions then holds, row by row, each unit's own loss gradient. One
    loss evaluation instead of one per unit inside `tf.vectorized_map`, and
    its value is the loss Keras reports.

    Returns:
      (gradients like y_pred, the compiled loss as `CompileLoss` returns it),
      or None for anything else (several outputs, masks, other losses and
      reductions); `_unit_loss_gradients` then differentiates each unit.
    """
    if (tf.nest.is_nested(y) or tf.nest.is_nested(y_pred) or
            getattr(y_pred, "_keras_mask", None) is not None):
        return None
    compile_loss = model._compile_loss
    if len(compile_loss._flat_losses) != 1:
        return None
    path, loss_fn, loss_weight, _ = compile_loss._flat_losses[0]
    if path or not _row_wise(loss_fn) or loss_fn.reduction not in (
            "sum_over_batch_size", "mean", "sum"):
        return None
    y_pred = tf.stop_gradient(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        # As CompileLoss computes it for a single output.
        reported = tf.cast(loss_fn(y, y_pred, sample_weight), compile_loss.dtype)
        if loss_weight is not None:
            reported = reported * loss_weight
        total = _unscale_mean_loss(tf.cast(reported, tf.float32), loss_fn)
        if loss_fn.reduction != "sum":
            total = total * tf.cast(units, total.dtype)
    return tape.gradient(total, y_pred), reported


def _find_batch_normalization(model) -> Optional[str]:
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer.name
    return None


def _seed_generators(model) -> list:
    found = []
    for layer in model._flatten_layers():
        found.extend(getattr(layer, "_seed_generators", []))
    return found


def _batch_size(x) -> tf.Tensor:
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


def _unscale_mean_loss(value, loss_fn):
    """Undoes the 1/num_replicas factor Keras puts on mean-reduced losses."""
    replicas = _num_replicas()
    if replicas > 1 and getattr(loss_fn, "reduction", None) in _MEAN_REDUCTIONS:
        value = value * tf.cast(replicas, value.dtype)
    return value


def _compiled_loss_value(model, y_true, y_pred, sample_weight):
    """The compiled loss of the model on one microbatch, without side effects.

    `CompileLoss.__call__` updates loss metrics, which must not happen inside
    the vectorized per-example computation, so its per-output losses are
    applied here directly. The result is what Keras would report for this
    microbatch alone (for a single example: the example's weighted loss),
    whatever reduction each loss uses.
    """
    compile_loss = model._compile_loss
    if compile_loss is None:
        raise ValueError("The DP model was compiled without a loss; pass "
                         "`loss=` to `model.compile`.")
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
        value = tf.reduce_mean(_unscale_mean_loss(value, loss_fn))
        if loss_weight is not None:
            value = value * loss_weight
        total = value if total is None else total + value
    if total is None:
        raise ValueError("The DP model's compiled loss has no terms.")
    return total


# Noise keys are int64 seeds of the stateless sampler: [0, 2**63).
_NOISE_KEY_LIMIT = 2**63


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


@keras.saving.register_keras_serializable(package="tf_dpsat")
class DPSATKeras(keras.optimizers.Optimizer):
    """Differentially private sharpness-aware training (DP-SAT) for Keras 3.

    Use with a DP model: `model = tf_dpsat.make_private(model)`, then
    `model.compile(optimizer=DPSATKeras(...), loss=...)` and `model.fit`.
    Every training step clips per-example (or per-microbatch) gradients taken
    at the DP-SAT perturbed point, adds Gaussian noise once per logical step
    and applies SGD with momentum. `iterations` counts logical (noisy) steps,
    the number a privacy accountant needs.

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
        together with `expected_batch_size`.
      expected_batch_size: the divisor B of the noisy sum. Set it under
        Poisson sampling, where batches are padded with zero-weight
        examples. None divides by the number of units (examples or
        microbatches) in the logical step, padding included: never by a
        count that depends on the data.
      gradient_accumulation_steps: k >= 1 physical batches form one logical
        step: their clipped sums are accumulated, then noise is added and the
        update applied once. The DP-SAT perturbation is the same for all k.
      seed: None (default) takes the noise key from OS entropy
        (`os.urandom`). The key is secret: no saved file (`.keras`,
        `.weights.h5`, `tf.train.Checkpoint`) and no `get_config()` holds it,
        so a loaded optimizer draws fresh noise. An integer seed in
        [0, 2**63) is the reproducible opt-in: it is the key and is kept in
        `get_config()`, so save/load resumes bitwise. Whoever knows the seed
        can recompute each step's noise and subtract it from a released
        checkpoint; the privacy guarantee then holds only against those who
        do not know it. `set_noise_key` sets a secret key afterwards.
      direction: "gradient" (DP-SAT) or "momentum" (the authors'
        DPSATMomentum variant: the direction is the last update reversed,
        w_{t-1} - w_t).
      clipping: how per-example gradient norms are computed. "fast" uses
        per-layer rules (ghost norms / direct per-example gradients and
        book-keeping, `tf_dpsat.fast_clipping`) for Dense, Conv1D/2D,
        DepthwiseConv2D, Embedding, LayerNormalization and
        GroupNormalization, and raises for any other trainable layer;
        "vectorized" runs `tf.vectorized_map` over per-example backward
        passes (any model); "auto" (default) is "fast" where it applies and
        "vectorized" elsewhere (logged once). All three give the same result.
      batch_slices: the batch is clipped as this many slices of whole units
        (examples or microbatches), each with its own forward and backward
        pass; their clipped sums are added before the noise, so the step is
        the same up to float rounding (the fast path draws dropout masks per
        slice). The slices are independent, so TensorFlow runs one slice's
        matrix products while another waits for its clip factors. None
        (default): 2 on a CPU outside XLA and tf.distribute, where that
        took 2-13% off the step time relative to non-private training on
        a 2-core machine (benchmarks/README.md), else 1.
      **kwargs: `name`, `weight_decay`, `use_ema`, ... of
        `keras.optimizers.Optimizer`. `clipnorm`, `clipvalue` and
        `global_clipnorm` are refused: they would act on the noisy gradient.

    References:
      Park, Kim, Choi, Lee. "Differentially Private Sharpness-Aware Training".
      ICML 2023.
    """

    queries_per_step = 1
    # DPSAMKeras overrides these.
    _supports_accumulation = True

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
            raise ValueError("loss_scale_factor is not supported: loss scaling "
                             "would change the per-example gradient norms.")
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
        validation.check_int("seed", seed, minimum=0, allow_none=True)
        self.seed = seed
        if (not self._supports_accumulation and
                self._accumulation_steps > 1):
            raise ValueError(
                f"{type(self).__name__} does not support gradient accumulation:"
                " its ascent query needs the whole logical batch before the"
                " descent pass. Use a larger physical batch.")
        if self.use_ema and self._accumulation_steps > 1:
            raise ValueError("use_ema with gradient_accumulation_steps > 1 is "
                             "not supported.")
        self._apply_mask = None
        # The slices the last traced step cut its batch into (see
        # `batch_slices`), for reports; None before the first step.
        self.traced_batch_slices = None
        # A tf.Variable, so that traced steps (XLA included) read it and
        # set_noise_key can change it after tracing; inside a plain holder,
        # so that neither Keras nor TensorFlow checkpointing tracks or saves it.
        self._noise_key = _SecretKey(
            noise.secret_key() if seed is None else seed)
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
        self._accumulators = []
        if self._accumulation_steps > 1:
            self._accumulators = self.add_optimizer_variables(
                variables, "dp_accumulator")
            self._accumulated_count = self.add_variable(
                (), dtype="float32", name="dp_accumulated_count",
                aggregation="only_first_replica")
            self._accumulation_step = self.add_variable(
                (), dtype="int64", name="dp_accumulation_step",
                aggregation="only_first_replica")

    def _keeps_direction(self) -> bool:
        return self.rho > 0

    def set_step_budget(self, max_steps: int) -> None:
        """Refuses every noisy step once `iterations >= max_steps`.

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

    def set_noise_key(self, key: int) -> None:
        """Sets the secret key of the noise, before or after tracing.

        Each step's noise is a function of (key, `iterations`, query,
        replica). The key is never saved or serialized: set it again after
        loading a model to continue a run's noise stream (a training binary
        keeps it in a private file of its own).

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
        it has.

        Raises:
          ValueError: the saved state belongs to another optimizer setup.
        """
        if not self.built:  # Keras's loader explains an unbuilt optimizer.
            return super().load_own_variables(store)
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
                "variables): it was saved with other settings (momentum, rho, "
                "gradient_accumulation_steps). Loading nothing would restart "
                "`iterations`, and with it the privacy accounting, at 0; "
                "load it with the optimizer configuration it was saved with.")
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])

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

        Also keeps the DP-SAT direction for the next step. Every assignment is
        masked by `self._apply_mask` (see `_release`).
        """
        index = self._get_variable_index(variable)
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        mask = self._apply_mask

        def put(target, value):
            if mask is not None:
                value = tf.where(mask, value, tf.convert_to_tensor(target))
            self.assign(target, value)

        old = tf.convert_to_tensor(variable)
        new = old
        if self.weight_decay is not None and self._use_weight_decay(variable):
            new = new - new * tf.cast(self.weight_decay, old.dtype) * learning_rate
        if self.momentums:
            m = self.momentums[index]
            momentum = tf.cast(self.momentum, variable.dtype)
            velocity = tf.convert_to_tensor(m) * momentum - gradient * learning_rate
            put(m, velocity)
            if self.nesterov:
                new = new + velocity * momentum - gradient * learning_rate
            else:
                new = new + velocity
        else:
            new = new - gradient * learning_rate
        put(variable, new)
        if self._directions:
            put(self._directions[index],
                gradient if self.direction == "gradient" else old - new)

    # ------------------------------------------------------- private step

    def private_train_step(self, model, x, y, sample_weight):
        """Runs one DP-SAT step on a batch; called by the DP model's train_step.

        Args:
          model: the DP model being trained.
          x, y, sample_weight: the batch, as unpacked by Keras.

        Returns:
          (y_pred, stats): the per-example predictions at the perturbed point
          (for the compiled metrics) and a dict of float32 scalars: "units"
          (units in the batch, padding included), "examples" (units with
          non-zero weight), "clipped" (units whose norm exceeded C),
          "nonfinite" (units dropped for a NaN/Inf gradient) and
          "extra_loss" (the sum of data-dependent `add_loss` terms), "loss"
          (the compiled loss as Keras reports it) when the step computed it
          anyway, and the boolean "refused": True when the step budget
          refused the batch (no weight changed; the DP model then updates no
          metric either). Every entry but "units" and "refused" is a
          function of the private batch: a non-private diagnostic.
        """
        self._check_model(model, x)
        variables = list(model.trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        self._check_variables_are_known(variables)

        weights = self._example_weights(x, sample_weight)
        params = [tf.convert_to_tensor(v.value) for v in variables]
        eval_params = params
        if self.rho > 0:
            direction = self._ascent_direction(model, variables, params, x, y,
                                               sample_weight, weights)
            eval_params = clipping.perturbed(params, direction, self.rho)
        summed, stats, y_pred = self._clipped_sum(
            model, variables, eval_params, x, y, sample_weight, weights)
        regularization = self._regularization_gradients(model, variables)
        stats["refused"] = self._release(variables, summed, stats,
                                         regularization)
        return y_pred, stats

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

    def _example_weights(self, x, sample_weight):
        """Per-example float32 weights [n]; per-timestep weights -> max.

        Negative weights are refused: a weight of -1 flips that example's
        gradient; the clipping bound still holds, but such a weight is almost
        surely a bug in the caller's weights. The
        check is a runtime assertion op, so under `jit_compile=True` (where XLA
        compiles assertions to nothing) only eager and graph steps raise.

        Raises:
          ValueError: Per-output sample weights.
          tf.errors.InvalidArgumentError: A negative sample weight.
        """
        n = _batch_size(x)
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

    def _microbatch_layout(self, n):
        """(number of units, examples per unit) for a batch of n examples."""
        if self.num_microbatches is None:
            return n, 1
        m = self.num_microbatches
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

    def _clipped_sum(self, model, variables, params, x, y, sample_weight,
                     weights):
        """Clipped per-unit gradients at `params`, summed over units.

        The batch runs as `_slices_for` independent slices of whole units
        (see `batch_slices`); their sums, counts and predictions are combined.

        Returns:
          (summed gradients, stats dict, stacked predictions [n, ...]).
        """
        n = _batch_size(x)
        units, size = self._microbatch_layout(n)
        if y is None:
            raise ValueError("The DP train step needs targets `y`.")
        if sample_weight is None:
            sample_weight = weights
        seeds = _seed_generators(model)
        seed_values = [tf.convert_to_tensor(g.state.value) for g in seeds]
        bounds = self._slice_bounds(units)
        self.traced_batch_slices = len(bounds)
        parts = []
        for first, count in bounds:
            batch = (x, y, sample_weight, weights)
            if len(bounds) > 1:
                rows = lambda t, a=first * size, b=(first + count) * size: (
                    None if t is None else t[a:b])
                batch = tf.nest.map_structure(rows, batch)
            parts.append(self._clipped_sum_of_slice(
                model, variables, params, batch, (first, count, size), seeds,
                seed_values))
        if seeds:  # The next step draws fresh dropout masks.
            _assign_per_replica(
                [g.state for g in seeds],
                [s + tf.constant([0, 1], s.dtype) for s in seed_values])
        if len(parts) == 1:
            return parts[0]
        return self._combine_slices(model, parts)

    def _slices_for(self) -> int:
        """How many slices `_clipped_sum` cuts the batch into (>= 1)."""
        if self.batch_slices is not None:
            return self.batch_slices
        # Two independent slices let TensorFlow's executor run one slice's
        # matrix products while the other waits for its clip factors; only
        # measured to pay off on CPU outside XLA (benchmarks/README.md).
        if (clipping.compiled_by_xla() or tf.distribute.has_strategy() or
                tf.config.list_logical_devices("GPU") or
                tf.config.list_logical_devices("TPU")):
            return 1
        return 2

    def _slice_bounds(self, units):
        """(first unit, number of units) of each slice of the batch."""
        slices = self._slices_for()
        if slices == 1:
            return [(0, units)]
        if isinstance(units, int):
            slices = min(slices, max(units, 1))
        bounds = [units * k // slices for k in range(slices + 1)]
        return [(a, b - a) for a, b in zip(bounds, bounds[1:])]

    @staticmethod
    def _combine_slices(model, parts):
        """One (summed, stats, y_pred) from those of the batch's slices."""
        summed = [tf.add_n(list(g)) for g in zip(*(p[0] for p in parts))]
        stats = {key: tf.add_n([p[1][key] for p in parts])
                 for key in ("units", "examples", "clipped", "nonfinite",
                             "extra_loss")}
        y_pred = tf.nest.map_structure(lambda *t: tf.concat(t, 0),
                                       *(p[2] for p in parts))
        losses = [p[1].get("loss") for p in parts]
        if all(l is not None for l in losses):
            # Only `_batch_loss_gradients` reports a loss: one row-wise loss
            # reduced by a sum, or by a mean over all its elements, which the
            # slices' means give weighted by their rows.
            if model._compile_loss._flat_losses[0][1].reduction == "sum":
                stats["loss"] = tf.add_n(losses)
            else:
                rows = [tf.cast(tf.shape(tf.nest.flatten(p[2])[0])[0],
                                losses[0].dtype) for p in parts]
                stats["loss"] = tf.math.divide_no_nan(
                    tf.add_n([l * r for l, r in zip(losses, rows)]),
                    tf.add_n(rows))
        return summed, stats, y_pred

    def _clipped_sum_of_slice(self, model, variables, params, batch, slice_,
                              seeds, seed_values):
        """`_clipped_sum` of units [first, first + count) of the batch."""
        first, units, size = slice_
        x, y, sample_weight, weights = batch
        path = None
        if self.clipping != "vectorized":
            try:
                path = self._fast_path(model, variables, params,
                                       (x, y, sample_weight),
                                       fast_clipping.Layout(
                                           units, size,
                                           xla=clipping.compiled_by_xla()),
                                       seeds, seed_values, first)
            except fast_clipping.Unsupported as error:
                self._fast_path_refused(model, error)
        if path is None:
            path = self._vectorized_path(model, variables, params,
                                         (x, y, sample_weight), units, size,
                                         seeds, seed_values, first)
        norms, sum_clipped, y_pred, extra, loss = path

        unit_weight = tf.reduce_max(tf.abs(tf.reshape(weights, [units, -1])),
                                    axis=1)
        active = unit_weight > 0
        finite = tf.math.is_finite(norms)
        keep = active & finite
        factors = clipping.clip_factors(norms, self.l2_norm_clip, keep)
        summed = sum_clipped(factors, keep)
        count = lambda mask: tf.reduce_sum(tf.cast(mask, tf.float32))
        stats = {
            "units": tf.cast(units, tf.float32),
            "examples": count(active),
            "clipped": count(keep & (norms + clipping.CLIP_EPSILON
                                     > self.l2_norm_clip)),
            "nonfinite": count(active & ~finite),
            "extra_loss": tf.reduce_sum(tf.where(active, extra, 0.0)),
        }
        if loss is not None:
            stats["loss"] = loss
        return summed, stats, y_pred

    def _fast_path_refused(self, model, error):
        if self.clipping == "fast":
            raise ValueError(
                f"clipping='fast' cannot handle model '{model.name}': {error}. "
                "Use clipping='auto' (falls back to the vectorized path) or "
                "clipping='vectorized'.") from error
        key = (id(model), str(error))
        if key not in _FALLBACKS_LOGGED:
            _FALLBACKS_LOGGED.add(key)
            logging.info("Fast per-example clipping does not apply to model "
                         "'%s' (%s); using the vectorized path.", model.name,
                         error)

    @staticmethod
    def _seed_mapping(seeds, seed_values, index):
        """Maps dropout seed states to per-unit values (see _SEED_STRIDE)."""
        offset = tf.stack([tf.constant(0, tf.int64),
                           (tf.cast(index, tf.int64) + 1) * _SEED_STRIDE])
        return [(g.state, tf.cast(s, tf.int64) + offset)
                for g, s in zip(seeds, seed_values)]

    def _vectorized_path(self, model, variables, params, batch, units, size,
                         seeds, seed_values, first):
        """Per-unit gradients by `tf.vectorized_map` (exact, any model).

        `batch` holds units [first, first + units) of the step's batch; each
        unit's dropout seeds follow from its index in the whole batch.
        """

        def group(t):
            return tf.reshape(t, tf.concat([[units, size], tf.shape(t)[1:]], 0))

        def unit_gradient(args):
            (x_u, y_u, w_u), index = args
            mapping = list(zip(variables, params))
            mapping += self._seed_mapping(seeds, seed_values, index)
            with tf.GradientTape() as tape:
                tape.watch(params)
                with StatelessScope(state_mapping=mapping,
                                    collect_losses=True) as scope:
                    y_pred = model(x_u, training=True)
                loss = _compiled_loss_value(model, y_u, y_pred, w_u)
                extra = tf.constant(0.0)
                if scope.losses:
                    extra = tf.add_n([tf.reduce_sum(tf.cast(l, tf.float32))
                                      for l in scope.losses])
                    loss = loss + extra
            grads = tape.gradient(
                loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads, y_pred, extra

        grads, y_pred, extra = tf.vectorized_map(
            unit_gradient, (tf.nest.map_structure(group, batch),
                            tf.range(first, first + units)))
        n = _batch_size(batch[0])
        y_pred = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[n], tf.shape(t)[2:]], 0)),
            y_pred)
        norms = clipping.per_example_norms(grads)
        return (norms, lambda f, keep: clipping.weighted_sum(grads, f, keep),
                y_pred, extra, None)

    def _fast_path(self, model, variables, params, batch, layout, seeds,
                   seed_values, first):
        """Per-unit norms from layer rules, one forward and one backward.

        `batch` holds units [first, first + layout.units) of the step's
        batch; its dropout masks are drawn with the seeds of unit `first`.
        """
        x, y, sample_weight = batch
        fast_clipping.check_supported(model)
        mapping = list(zip(variables, params))
        mapping += self._seed_mapping(seeds, seed_values, first)
        with tf.GradientTape() as tape:
            with StatelessScope(state_mapping=mapping,
                                collect_losses=True) as scope:
                y_pred, records = fast_clipping.forward(model, variables, x,
                                                         tape, mapping)
        if scope.losses:
            raise fast_clipping.Unsupported("data-dependent add_loss terms")
        loss = None
        from_batch = _batch_loss_gradients(model, y, y_pred, sample_weight,
                                           layout.units)
        if from_batch is None:
            loss_grads = _unit_loss_gradients(model, y, y_pred, sample_weight,
                                              layout.units)
        else:
            loss_grads, loss = from_batch
        deltas = tape.gradient(
            tf.nest.flatten(y_pred), [r.z for r in records],
            output_gradients=tf.nest.flatten(loss_grads),
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        sq, caches = fast_clipping.per_unit_sq_norms(records, deltas, layout)
        # Rounding can make a ghost norm slightly negative; NaN stays NaN.
        norms = tf.sqrt(tf.where(sq < 0, tf.zeros_like(sq), sq))

        def sums(factors, keep):
            return fast_clipping.clipped_sums(records, deltas, caches, factors,
                                              keep, variables, layout)

        def sum_clipped(factors, keep):
            # Masking every layer's tensors costs about as much as the sums'
            # own scaling in graph mode; it only matters when some unit is
            # non-finite. XLA fuses the masks into their consumers, and its
            # CPU backend runs convolutions inside a conditional ~20x slower.
            if layout.xla:
                return sums(factors, keep)
            return tf.cond(tf.reduce_all(tf.math.is_finite(norms)),
                           lambda: sums(factors, None),
                           lambda: sums(factors, keep))

        return norms, sum_clipped, y_pred, tf.zeros([layout.units]), loss

    def _ascent_direction(self, model, variables, params, x, y, sample_weight,
                          weights):
        """The DP-SAT direction: the previous private gradient (a slot)."""
        del model, params, x, y, sample_weight, weights
        return [tf.convert_to_tensor(d.value) for d in self._directions]

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
        return [g / _num_replicas() for g in grads]

    def _noise_stream(self, query: int):
        """The seed and stream of this step's noise for one query, replica.

        They depend only on the optimizer's noise key, the step, the query's
        index within the step and the replica, never on the data: (noise
        key, step) is the seed, query * 2^16 + replica the stream.
        """
        seed = tf.stack([tf.convert_to_tensor(self._noise_key.variable),
                         tf.cast(self._iterations, tf.int64)])
        if _num_replicas() > 2**16:  # streams of two queries must not meet
            raise ValueError("Expected at most 2^16 replicas, got "
                             f"{_num_replicas()}.")
        stream = query * 2**16 + tf.cast(_replica_id(), tf.int64)
        return seed, stream

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
                math.sqrt(_num_replicas()))

    def _release(self, variables, summed, stats, regularization):
        """Noise, divide and apply the update once per logical step.

        On one device the update sits in a `tf.cond`: it runs only when the
        batch ends a logical step within the step budget. Under tf.distribute
        a synchronisation point (the optimizer's all-reduce) cannot sit inside
        `tf.cond`, so there the update runs on every physical batch and
        `update_step` keeps the old values (`tf.where`) unless the batch ends
        a step within the budget; the noise of such a batch is never used.

        Returns:
          A boolean scalar, True when the step budget refused this batch.
        """
        units = stats["units"]
        if self.expected_batch_size is None:
            units = _all_reduce_sum(units)
        # Nothing below may run before the batch exists: Keras starts the step
        # function before it knows the data ran out, and a data-independent
        # `iterations += 1` would then count a step that never happened.
        with tf.control_dependencies([stats["examples"]]):
            budget = tf.identity(self._step_budget.value)
        apply_now = (budget < 0) | (tf.cast(self._iterations, tf.int64) < budget)
        refused = tf.logical_not(apply_now)
        k = self._accumulation_steps
        if k > 1:
            step = tf.convert_to_tensor(self._accumulation_step.value)
            is_last = tf.equal(step, k - 1)
            summed = [a.value + s for a, s in zip(self._accumulators, summed)]
            units = self._accumulated_count.value + units
            _assign_per_replica(
                self._accumulators,
                [tf.where(is_last, tf.zeros_like(s), s) for s in summed])
            self._accumulated_count.assign(tf.where(is_last, 0.0, units))
            self._accumulation_step.assign(
                tf.where(is_last, tf.zeros_like(step), step + 1))
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

            tf.cond(apply_now, apply, lambda: tf.constant(False))
            return refused
        self._apply_mask = apply_now
        try:
            with tf.control_dependencies([apply_now]):
                super().apply(noisy_gradients(), variables)
        finally:
            self._apply_mask = None
        # Keras counts every call to apply; count logical steps only.
        self._iterations.assign_sub(
            tf.cast(tf.logical_not(apply_now), self._iterations.dtype))
        return refused

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

    queries_per_step = 2
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

    def _ascent_direction(self, model, variables, params, x, y, sample_weight,
                          weights):
        """A private gradient at w_t, summed over replicas."""
        summed, stats, _ = self._clipped_sum(model, variables, params, x, y,
                                             sample_weight, weights)
        units = stats["units"]
        if self.expected_batch_size is None:
            units = _all_reduce_sum(units)
        grads = self._noisy_mean(summed, 1, units)
        return _all_reduce_sum(grads)
