"""Keras models whose train step is differentially private.

Keras 3 computes one summed gradient in `Model.train_step` and hands it to the
optimizer, which is too late for per-example clipping. A DP model's
`train_step` is a thin hook instead: it hands the batch to the DP optimizer
(`tf_dpsat.DPSATKeras.private_train_step`), which computes, clips, noises and
applies the gradients, then updates the loss and the compiled metrics from the
per-example predictions, as plain Keras would.

Besides the compiled metrics, training logs report
`grad_norm_clipped_fraction` (the share of examples whose gradient norm
exceeded the clip norm, the number to watch when tuning C) and
`nonfinite_gradients` (examples dropped for a NaN/Inf gradient).

These two and the training loss and accuracy are NOT private: they are exact
functions of the private batches, without noise (one NaN canary example shows
in `nonfinite_gradients`). Keep them out of anything published beside epsilon
(`tf_dpsat.accounting.NON_PRIVATE_DIAGNOSTICS`).

Before its first training step a DP model is probed once for layers that mix
examples across the batch (`tf_dpsat.per_example.batch_independence`), which would void
the privacy guarantee; such a model is refused.
"""

import inspect

import keras
import tensorflow as tf

from tf_dpsat import _compat
from tf_dpsat import _replicas
from tf_dpsat import callbacks
from tf_dpsat import validation
from tf_dpsat.per_example import batch_independence

_DP_METRIC_NAMES = ("grad_norm_clipped_fraction", "nonfinite_gradients")


class _DPStats(keras.metrics.Metric):
    """Both DP metrics in one variable: [clipped, examples, non-finite].

    One metric, not a Mean and a Sum: `train_on_batch` resets every metric
    variable on each call, and one variable is reset once.
    """

    def __init__(self, name="dp_stats", **kwargs):
        super().__init__(name=name, **kwargs)
        self.totals = self.add_variable(shape=(3,), initializer="zeros",
                                        name="totals")

    def update_state(self, clipped, examples, nonfinite):
        self.totals.assign_add(tf.cast(tf.stack([clipped, examples, nonfinite]),
                                       self.totals.dtype))

    def result(self):
        totals = tf.convert_to_tensor(self.totals)
        return {_DP_METRIC_NAMES[0]: tf.math.divide_no_nan(totals[0], totals[1]),
                _DP_METRIC_NAMES[1]: totals[2]}


class _PrivateTrainStep:
    """Mixin: the DP train step shared by DPModel and DPSequential."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Created before the model is built (Keras locks a built layer's
        # state) and outside the traced train step.
        self._dp_stats = _DPStats()

    def save(self, filepath, *args, **kwargs):
        """Saves to `.keras`; refuses the legacy `.h5` / `.hdf5` format.

        Keras' HDF5 format does not record registered custom classes, so a DP
        model saved to `.h5` cannot be loaded back ("Unknown layer:
        'DPFunctional'"). `keras.saving.save_model` called directly is not
        covered by this check.

        Raises:
          tf_dpsat.validation.UserError: For a `.h5` / `.hdf5` path.
        """
        path = str(filepath)
        if path.lower().endswith((".h5", ".hdf5")):
            stem = path.rsplit(".", 1)[0]
            raise validation.UserError(
                f"Cannot save {type(self).__name__} to {path!r}: the HDF5 format "
                "cannot load a DP model back (Unknown layer). Save to "
                f"'{stem}.keras' instead.")
        return super().save(filepath, *args, **kwargs)

    def fit(self, x=None, y=None, *args, shuffle=None, **kwargs):
        """Keras's `fit`; `shuffle` defaults to False for a `tf.data.Dataset`.

        A DP model's batches come from a sampler (`tf_dpsat.sampling`) whose
        order the accountant assumes: Keras does not shuffle a dataset anyway,
        and its default `shuffle=True` only warns that it is ignored.

        Raises:
          tf_dpsat.validation.UserError: A `tf_dpsat.PrivacyCallback` with
            Poisson sampling among the callbacks, and `x` not a
            `tf.data.Dataset`: Keras cuts arrays, tensors, generators and
            PyDatasets into batches of its own, never Poisson-sampled ones;
            or a finite dataset, more than one epoch and no
            `steps_per_epoch`: Keras would iterate it anew every epoch,
            replaying a Poisson dataset's batches.
        """
        bound = inspect.signature(keras.Model.fit).bind_partial(
            self, x, y, *args, **kwargs)
        arguments = bound.arguments
        if _accounts_poisson(arguments.get("callbacks")):
            _refuse_unsampled_input(x)
            _refuse_replayed_dataset(x, arguments.get("epochs", 1),
                                     arguments.get("steps_per_epoch"))
        if shuffle is None:
            shuffle = not isinstance(x, tf.data.Dataset)
        return super().fit(x, y, *args, shuffle=shuffle, **kwargs)

    def make_train_function(self, force=False):
        # Keras builds the train function eagerly before the first step: the
        # place to probe the model (once) before any weight can change.
        batch_independence.check(self)
        return super().make_train_function(force)

    def train_step(self, data):
        optimizer = self._private_optimizer()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._compile_loss is not None and not self._compile_loss.built:
            # Without a distribution strategy Keras defers building the
            # compiled loss to the first train step; the DP step needs it now.
            self._symbolic_build(data_batch=data)
        step = optimizer.private_train_step(self, x, y, sample_weight)
        if self._compile_metrics is not None and not self._compile_metrics.built:
            # Built here, not inside the branch below: variables cannot be
            # created inside a traced tf.cond.
            self._compile_metrics.build(y, step.y_pred)

        def update_metrics():
            self._track_loss(x, y, step.y_pred, sample_weight, step.sums)
            self._dp_stats.update_state(step.sums.clipped, step.sums.examples,
                                        step.sums.nonfinite)
            if self._compile_metrics is not None:
                self._compile_metrics.update_state(y, step.y_pred,
                                                   sample_weight)
            return tf.constant(True)

        # Every metric is a function of the batch; a batch the step budget
        # refused was never used, so nothing about it may be reported.
        tf.cond(step.refused, lambda: tf.constant(False), update_metrics)
        return self.get_metrics_result()

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        """Keras's `compile`; a DP optimizer is never wrapped for loss scaling.

        Under `mixed_float16` Keras wraps the optimizer in a dynamic
        `LossScaleOptimizer` (`auto_scale_loss=True`); a DP optimizer scales
        each example's loss by its own static `loss_scale` instead, so it is
        compiled unwrapped.

        Raises:
          ValueError: for a DP optimizer wrapped in a LossScaleOptimizer.
        """
        _refuse_loss_scale_optimizer(optimizer)
        if hasattr(optimizer, "private_train_step"):
            kwargs["auto_scale_loss"] = False
        return super().compile(optimizer, *args, **kwargs)

    def compile_from_config(self, config):
        """Compiles a loaded model as it was compiled, through `compile`.

        Keras skips compiling a loaded model whose class overrides
        `compile`; this is what it does otherwise.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built and self.optimizer is not None:
            # Creates the optimizer's variables, to load the saved ones into.
            self.optimizer.build(self.trainable_variables)

    def _private_optimizer(self):
        """The DP optimizer, or an error naming why training would not be DP."""
        optimizer = self.optimizer
        _refuse_loss_scale_optimizer(optimizer)
        if not hasattr(optimizer, "private_train_step"):
            raise TypeError(
                f"{type(self).__name__} is a differentially private model but "
                f"was compiled with {type(optimizer).__name__}, which would "
                "train it without privacy. Compile it with "
                "tf_dpsat.DPSATKeras (or DPSAMKeras).")
        return optimizer

    def _track_loss(self, x, y, y_pred, sample_weight, sums):
        """Updates the loss tracker with the loss plain Keras would report.

        The predictions come from the perturbed point. The layers' own `losses`
        may hold stale values (the step's forward passes ran in stateless
        scopes), so the pieces are summed here explicitly.
        """
        loss = sums.loss  # the fast engine's own loss evaluation, if any
        if loss is None:
            loss = self._compile_loss(y, y_pred, sample_weight)
        # CompileLoss divides by the number of replicas; report the loss of
        # this replica's batch, as Keras does.
        replicas = _replicas.num_replicas()
        if replicas > 1:
            loss = loss * tf.cast(replicas, loss.dtype)
        regularization = self._get_regularization_losses()
        if regularization:
            loss += tf.add_n([tf.cast(r, loss.dtype) for r in regularization])
        loss += tf.cast(sums.extra_loss / tf.maximum(sums.examples, 1.0),
                        loss.dtype)
        batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        self._loss_tracker.update_state(loss, sample_weight=batch)

    def get_metrics_result(self):
        logs = super().get_metrics_result()
        if getattr(self, "_dp_evaluating", False):
            # Evaluation never touches the DP metrics; keep them out of its logs.
            logs = {k: v for k, v in logs.items() if k not in _DP_METRIC_NAMES}
        return logs

    def evaluate(self, *args, **kwargs):
        self._dp_evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._dp_evaluating = False


def _accounts_poisson(fit_callbacks) -> bool:
    """Whether a `PrivacyCallback(sampling="poisson")` is among the callbacks."""
    if isinstance(fit_callbacks, keras.callbacks.CallbackList):
        fit_callbacks = fit_callbacks.callbacks
    return any(isinstance(callback, callbacks.PrivacyCallback) and
               callback.sampling == "poisson" for callback in fit_callbacks or ())


def _refuse_unsampled_input(x) -> None:
    """Refuses inputs Keras batches itself when epsilon assumes Poisson batches.

    From arrays, tensors, lists or dicts of them, generators or a
    `keras.utils.PyDataset`, Keras makes fixed-size batches (shuffled each
    epoch for arrays), which `PrivacyCallback(sampling="poisson")` would
    account for as Poisson-sampled ones: its epsilon would be too small (5.9
    instead of the 30.1 of shuffled passes for 5 epochs of 10 batches at
    sigma = 1). Whether a `tf.data.Dataset` holds Poisson batches cannot be
    checked: it is the user's to build with
    `tf_dpsat.sampling.poisson_dataset`.
    """
    if x is None or isinstance(x, (tf.data.Dataset,
                                   tf.distribute.DistributedDataset)):
        return
    raise validation.UserError(
        f"PrivacyCallback(sampling='poisson') accounts for "
        f"Poisson-sampled batches, but fit got x as a "
        f"{type(x).__name__}, which Keras cuts into fixed-size batches "
        "of its own: epsilon would be too small. Feed fit the "
        "tf.data.Dataset of tf_dpsat.sampling.poisson_dataset(...), "
        "or account for shuffled fixed-size batches with "
        "PrivacyCallback(num_examples, sampling='shuffle', "
        "batch_size=...).")


def _refuse_replayed_dataset(x, epochs, steps_per_epoch) -> None:
    """Refuses a finite dataset that Keras would iterate anew every epoch.

    Without `steps_per_epoch`, Keras's fit starts a new iteration of a finite
    dataset each epoch. A Poisson dataset is keyed by (secret key, step): a
    new iteration yields the very batches of the first one again, queried
    with fresh noise, while the accountant counts each step as a fresh
    Poisson sample, so epsilon would be too small. With `steps_per_epoch`
    Keras keeps one iterator across epochs, as the sampler assumes.
    """
    if (not isinstance(x, tf.data.Dataset) or steps_per_epoch is not None or
            epochs is None or epochs <= 1):
        return
    cardinality = int(x.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        return
    raise validation.UserError(
        f"fit(epochs={epochs}) without steps_per_epoch iterates the dataset "
        "anew every epoch, and a Poisson dataset "
        "(tf_dpsat.sampling.poisson_dataset) yields the same batches every "
        "time: they would be queried again with fresh noise while "
        "PrivacyCallback(sampling='poisson') counts each step as a fresh "
        "sample, so epsilon would be too small. Build the dataset for every "
        "step of the run (steps=epochs * steps_per_epoch) and pass "
        "fit(steps_per_epoch=...), or train one epoch per dataset.")


def _refuse_loss_scale_optimizer(optimizer) -> None:
    """Raises for a DP optimizer inside Keras's dynamic LossScaleOptimizer."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if (isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and
            hasattr(inner, "private_train_step")):
        raise ValueError(
            f"{type(inner).__name__} wrapped in a keras LossScaleOptimizer is "
            "refused: its dynamic loss scale skips a step and halves the "
            "scale whenever any gradient of the batch overflows, a decision "
            "on the whole private batch without noise, so training would "
            "not be differentially private. Compile with the "
            f"{type(inner).__name__} itself: under mixed_float16 it scales "
            "each example's loss by a static loss_scale (default 2**5) and "
            "drops an example whose gradient overflows.")


@keras.saving.register_keras_serializable(package="tf_dpsat")
class DPFunctional(_PrivateTrainStep, _compat.Functional):
    """A functional model trained with differential privacy.

    Made by `make_private` and by `DPModel(inputs, outputs)`.
    """


def _functional_arguments(args, kwargs) -> bool:
    """Whether `keras.Model(*args, **kwargs)` builds a functional model."""
    return (len(args) == 2 or (len(args) == 1 and "outputs" in kwargs) or
            ("inputs" in kwargs and "outputs" in kwargs))


@keras.saving.register_keras_serializable(package="tf_dpsat")
class DPModel(_PrivateTrainStep, keras.Model):
    """A `keras.Model` trained with differential privacy.

    Use it like `keras.Model`: as a base class for subclassed models, or
    functionally, `DPModel(inputs, outputs)`, which returns a `DPFunctional`.
    Compile it with `tf_dpsat.DPSATKeras`.
    """

    def __new__(cls, *args, **kwargs):
        # Keras would turn DPModel itself into a Functional subclass (it
        # rewrites the class's bases), breaking every subclassed DPModel.
        if cls is DPModel and _functional_arguments(args, kwargs):
            return DPFunctional(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="tf_dpsat")
class DPSequential(_PrivateTrainStep, keras.Sequential):
    """A `keras.Sequential` trained with differential privacy."""


def make_private(model: keras.Model) -> keras.Model:
    """Returns a DP model sharing the layers and weights of `model`.

    Args:
      model: a built `keras.Sequential` or functional `keras.Model`.

    Returns:
      A `DPFunctional` model using the same layer objects, so training it
      trains `model`'s weights too. A model that is already private is
      returned unchanged.

    Raises:
      TypeError: for a subclassed model (subclass `tf_dpsat.DPModel` instead).
      ValueError: for a model without defined inputs.
    """
    if isinstance(model, _PrivateTrainStep):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
    is_functional = isinstance(model, keras.Sequential) or hasattr(
        model, "_nodes_by_depth")
    if not is_functional:
        raise TypeError(
            f"make_private cannot wrap the subclassed model "
            f"{type(model).__name__}: its train step is its own. Subclass "
            "tf_dpsat.DPModel instead of keras.Model.")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"make_private needs a model with defined inputs; build "
            f"'{model.name}' with a keras.Input first.") from error
    if not inputs:
        raise ValueError(f"make_private needs a model with defined inputs; "
                         f"build '{model.name}' with a keras.Input first.")
    try:
        # The model's own structure (a tensor, a list or a dict), where Keras
        # records it: the DP model then takes its inputs as the model did.
        inputs, outputs = model.input, model.output
    except (AttributeError, ValueError):
        # A Sequential model never called: one input, one output.
        (inputs,), (outputs,) = inputs, outputs
    return DPFunctional(inputs=inputs, outputs=outputs, name=model.name)
