"""Sharpness of a model's loss surface: top Hessian eigenvalue, 1-D slices.

DP-SAT's claim is that it finds flatter minima than DP-SGD. Two instruments
measure flatness at a model's current weights:

* `top_hessian_eigenvalue`: the largest-magnitude eigenvalue of the Hessian
  of the mean loss over given examples, by power iteration on
  Hessian-vector products (never forming the Hessian);
* `loss_slice`: the mean loss along one filter-normalised random direction
  (Li, Xu, Taylor, Studer, Goldstein. "Visualizing the Loss Landscape of
  Neural Nets". NeurIPS 2018), for 1-D landscape plots.

Both read the model in inference mode (`training=False`): a DP model made by
`tf_dpsat.make_private` is measured like its plain copy, without clipping or
noise, because what is measured is the loss surface, not a training step.

Privacy: both are exact functions of the examples they are given. Computed on
training examples they are NON-PRIVATE diagnostics, outside the (epsilon,
delta) guarantee of the trained weights; keep them out of anything published
as a private output (like the training loss, see
`tf_dpsat.accounting.NON_PRIVATE_DIAGNOSTICS`). Their random directions come
from a public `seed`: they describe the weights, they add no privacy.
"""

from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Optional
from typing import Sequence
from typing import Union

import keras
import numpy as np
import tensorflow as tf

from tf_dpsat import validation

LossLike = Union[str, keras.losses.Loss, Callable[..., Any]]

# Layers whose kernel holds one filter per (input channel, multiplier) pair,
# i.e. per entry of its last two axes, and the attribute naming that kernel.
_DEPTHWISE_KERNELS = (
    (keras.layers.DepthwiseConv1D, "kernel"),
    (keras.layers.DepthwiseConv2D, "kernel"),
    (keras.layers.SeparableConv1D, "depthwise_kernel"),
    (keras.layers.SeparableConv2D, "depthwise_kernel"),
)

# TensorFlow's second derivative of these is wrong for "same", stride 1.
_MAX_POOLING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
                keras.layers.MaxPooling3D)


class EigenResult(NamedTuple):
    """The outcome of `top_hessian_eigenvalue`.

    Attributes:
      eigenvalue: the Rayleigh quotient v^T H v of the last iterate (unit v),
        an estimate of the largest-magnitude eigenvalue of H, with its sign.
      iterations: Hessian-vector products computed (passes over the data).
      converged: whether the relative change of the estimate between the last
        two iterations fell below the tolerance.
      relative_change: |lambda_k - lambda_{k-1}| / |lambda_k| at the last
        iteration; inf after a single iteration.
    """

    eigenvalue: float
    iterations: int
    converged: bool
    relative_change: float


class LossSlice(NamedTuple):
    """The outcome of `loss_slice`: `losses[i]` is the mean loss at `radii[i]`.

    Attributes:
      radii: the step sizes alpha along the direction, in the order given.
      losses: the mean loss at weights + alpha * direction, float64.
    """

    radii: np.ndarray
    losses: np.ndarray


def top_hessian_eigenvalue(model: keras.Model, x: Any, y: Any, *,
                           loss: LossLike, iterations: int = 20,
                           batch_size: int = 256, seed: int = 0,
                           tolerance: float = 1e-3) -> EigenResult:
    """The largest-magnitude eigenvalue of the Hessian of the mean loss.

    H is the Hessian, w.r.t. `model.trainable_variables`, of
    (1/N) sum_i loss(y_i, model(x_i)) over the N examples given. Power
    iteration from a random unit vector: v <- Hv / |Hv|, the estimate being
    the Rayleigh quotient v^T H v. Each Hessian-vector product is one pass
    over the examples in minibatches of `batch_size` (a double backward pass
    per minibatch, summed with weights n_b / N), so memory is that of one
    minibatch whatever N is, and the result does not depend on `batch_size`
    up to rounding.

    This is a function of `x` and `y`: computed on training examples it is a
    non-private diagnostic, not an output covered by the DP guarantee.

    Args:
      model: a built Keras model, plain or made private by
        `tf_dpsat.make_private`; called with `training=False`. Its weights
        are not changed. A model built under a `tf.distribute` strategy can
        be measured in that strategy's scope (as in a Keras callback): each
        minibatch then runs in replica context and the first local
        replica's result is kept, without collectives: each worker measures
        on its own.
      x: inputs, an array (or a nest of arrays) with N examples on axis 0.
      y: targets, N on axis 0.
      loss: a Keras loss object, a loss name such as
        "sparse_categorical_crossentropy", or a function
        `fn(y_true, y_pred)` returning one loss per example. A loss object's
        own reduction is not used: per-example losses are averaged over all
        N examples (regularisation losses of the model are not included).
      iterations: the most Hessian-vector products to compute.
      batch_size: examples per minibatch.
      seed: seed of the random start vector (public).
      tolerance: stop once the relative change of the estimate between two
        iterations is below this.

    Returns:
      An `EigenResult`.

    Raises:
      ValueError: for invalid arguments, a model without trainable weights,
        a model with a max pooling layer TensorFlow differentiates twice
        wrongly that cannot be rewritten (see below), or a non-finite
        Hessian-vector product.

    TensorFlow's second derivative of max pooling with padding="same" and a
    stride of 1 (the gradient of MaxPoolGrad) is wrong for some input and
    batch sizes: its Hessian-vector products are then not even symmetric
    (u.Hv != v.Hu). Valid padding is exact.
    So such a layer among `model.layers` is measured through a copy of the
    model that shares its weights and pads explicitly (with the dtype's
    lowest value, which a window's max never picks) before a valid pooling:
    the same outputs, exact second derivatives. A model where such a layer
    sits deeper (in a nested model or a custom layer) is refused.
    """
    validation.check_int("iterations", iterations)
    validation.check_non_negative("tolerance", tolerance)
    surface = _LossSurface(_second_order_model(model), x, y, loss,
                           batch_size)
    rng = np.random.default_rng(validation.check_int("seed", seed, 0))
    v = _normalized([tf.constant(rng.standard_normal(w.shape), w.dtype)
                     for w in surface.weights])
    estimate, change = None, float("inf")
    for step in range(1, iterations + 1):
        hv = surface.hessian_vector_product(v)
        new_estimate = _dot(v, hv)
        hv_norm = np.sqrt(_dot(hv, hv))
        if not np.isfinite(hv_norm):
            raise ValueError(
                f"Expected a finite Hessian-vector product, got norm {hv_norm} "
                f"at iteration {step}; is the loss finite at these weights?")
        if hv_norm == 0.0:
            # Hv = 0 for a random v: H is zero (almost surely).
            return EigenResult(0.0, step, True, 0.0)
        if estimate is not None:
            change = abs(new_estimate - estimate) / max(abs(new_estimate),
                                                        np.finfo(float).tiny)
        estimate = new_estimate
        if change < tolerance:
            return EigenResult(float(estimate), step, True, float(change))
        v = [h / tf.cast(hv_norm, h.dtype) for h in hv]
    return EigenResult(float(estimate), iterations, False, float(change))


def loss_slice(model: keras.Model, x: Any, y: Any, *, loss: LossLike,
               radii: Sequence[float], seed: int = 0,
               batch_size: int = 256) -> LossSlice:
    """The mean loss along a filter-normalised random direction.

    The direction d is `filter_normalized_direction` of the model's trainable
    weights w (biases and normalisation parameters are not moved); the loss
    is evaluated at w + alpha * d for each alpha in `radii`, with
    `training=False`. The weights are restored exactly afterwards, also when
    an evaluation raises.

    This is a function of `x` and `y`: computed on training examples it is a
    non-private diagnostic, not an output covered by the DP guarantee.

    Args:
      model: a built Keras model, plain or made private.
      x: inputs, N examples on axis 0.
      y: targets, N on axis 0.
      loss: as in `top_hessian_eigenvalue`.
      radii: the values of alpha (include 0.0 for the loss at w itself).
      seed: seed of the random direction (public).
      batch_size: examples per minibatch.

    Returns:
      A `LossSlice`.
    """
    radii = np.asarray([validation.check_real("radius", r) for r in radii],
                       dtype=np.float64)
    surface = _LossSurface(model, x, y, loss, batch_size)
    originals = [w.numpy() for w in surface.weights]
    direction = filter_normalized_direction(
        originals, validation.check_int("seed", seed, 0),
        filter_axes=filter_axes(model))
    losses = np.empty(len(radii))
    try:
        for i, radius in enumerate(radii):
            for w, w0, d in zip(surface.weights, originals, direction):
                w.assign(w0 + np.asarray(radius, w0.dtype) * d)
            losses[i] = surface.mean_loss()
    finally:
        for w, w0 in zip(surface.weights, originals):
            w.assign(w0)
    return LossSlice(radii, losses)


def filter_normalized_direction(
        weights: Sequence[np.ndarray], seed: int, *,
        filter_axes: Optional[Sequence[tuple[int, ...]]] = None
) -> list[np.ndarray]:
    """A Gaussian direction rescaled filter by filter to the weights' norms.

    Li et al.'s convention: for each filter (the weights of one output unit
    or output channel), the direction's entries are rescaled so that their
    L2 norm equals that of the filter's weights; a tensor with at most one
    axis (bias, normalisation scale or offset) gets a zero direction. A
    direction of this kind moves every filter in proportion to its size, so
    slices are comparable across models whose layers differ in scale.

    Args:
      weights: the weight arrays.
      seed: seed of the Gaussian draw.
      filter_axes: for each weight with two axes or more, the axes that index
        its filters (entries sharing those indices form one filter). None:
        the last axis (Dense, Conv kernels: one filter per output unit or
        channel). `filter_axes(model)` gives the right axes for a model.

    Returns:
      One array per weight, of its shape and dtype.
    """
    rng = np.random.default_rng(seed)
    if filter_axes is None:
        filter_axes = [(np.ndim(w) - 1,) for w in weights]
    if len(filter_axes) != len(weights):
        raise ValueError(f"Expected one filter_axes entry per weight "
                         f"({len(weights)}), got {len(filter_axes)}.")
    direction = []
    for w, axes in zip(weights, filter_axes):
        w = np.asarray(w)
        if w.ndim <= 1:
            direction.append(np.zeros_like(w))
            continue
        d = rng.standard_normal(w.shape)
        filters = {a % w.ndim for a in axes}
        within = tuple(a for a in range(w.ndim) if a not in filters)
        w_norm = np.sqrt(np.sum(np.square(w, dtype=np.float64), axis=within,
                                keepdims=True))
        d_norm = np.sqrt(np.sum(np.square(d), axis=within, keepdims=True))
        direction.append((d * (w_norm / d_norm)).astype(w.dtype))
    return direction


def filter_axes(model: keras.Model) -> list[tuple[int, ...]]:
    """The filter axes of each of `model.trainable_variables`.

    The last axis for Dense and Conv kernels; the last two for depthwise
    kernels (one filter per input channel and multiplier, as a PyTorch
    grouped conv has one per output channel). Depthwise layers are found
    among `model.layers`, recursively through nested models.
    """
    depthwise = set()
    for layer in _all_layers(model):
        for cls, attribute in _DEPTHWISE_KERNELS:
            kernel = getattr(layer, attribute, None)
            if isinstance(layer, cls) and kernel is not None:
                depthwise.add(id(kernel))
    return [(len(w.shape) - 2, len(w.shape) - 1) if id(w) in depthwise
            else (len(w.shape) - 1,) for w in model.trainable_variables]


def _wrong_second_derivative(layer) -> bool:
    return (isinstance(layer, _MAX_POOLING) and layer.padding == "same" and
            1 in tuple(layer.strides))


def _second_order_model(model: keras.Model) -> keras.Model:
    """`model`, or a copy sharing its weights with exact second derivatives.

    The copy replaces each max pooling layer that TensorFlow differentiates
    twice wrongly by `_ExplicitlyPaddedMaxPooling`; every other layer is the
    model's own object, so the copy's trainable variables are the model's.
    """
    if not any(_wrong_second_derivative(l) for l in _all_layers(model)):
        return model
    refusal = ValueError(
        f"Expected every max pooling layer with padding='same' and stride 1 "
        f"of '{model.name}' among its top-level layers of a functional or "
        "Sequential model: TensorFlow's second derivative of that pooling is "
        "wrong (asymmetric Hessian-vector products), and only top-level "
        "layers can be replaced by an explicitly padded equivalent. "
        "loss_slice, which needs no second derivatives, still works.")
    try:
        copy = keras.models.clone_model(
            model, clone_function=lambda layer: (
                _ExplicitlyPaddedMaxPooling(layer)
                if _wrong_second_derivative(layer) else layer))
    except (TypeError, ValueError) as error:
        raise refusal from error
    shared = [a is b for a, b in zip(copy.trainable_variables,
                                     model.trainable_variables)]
    if (len(copy.trainable_variables) != len(model.trainable_variables) or
            not all(shared) or
            any(_wrong_second_derivative(l) for l in _all_layers(copy))):
        raise refusal
    return copy


class _ExplicitlyPaddedMaxPooling(keras.layers.Layer):
    """A "same" max pooling computed as explicit padding + "valid" pooling.

    The same outputs as `pooling` (TensorFlow's "same" pads with values no
    max picks; so does this, with the dtype's lowest value), but its second
    derivative goes through MaxPoolGradGrad for valid padding, which is
    right.
    """

    def __init__(self, pooling):
        super().__init__(name=pooling.name + "_explicit_padding",
                         dtype=pooling.dtype_policy)
        self.pool_size = tuple(pooling.pool_size)
        self.strides = tuple(pooling.strides)
        self.data_format = pooling.data_format

    def call(self, inputs):
        rank = len(self.pool_size)
        first = 1 if self.data_format == "channels_last" else 2
        paddings = [[0, 0] for _ in range(rank + 2)]
        for i, (window, stride) in enumerate(zip(self.pool_size,
                                                 self.strides)):
            size = inputs.shape[first + i]
            # TensorFlow's "same": ceil(size / stride) outputs, the padding
            # split with the extra element after.
            total = max((-(-size // stride) - 1) * stride + window - size, 0)
            paddings[first + i] = [total // 2, total - total // 2]
        padded = tf.pad(inputs, paddings, constant_values=inputs.dtype.min)
        return keras.ops.max_pool(padded, self.pool_size, self.strides,
                                  "valid", self.data_format)


def _all_layers(model: keras.Model) -> list:
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        layers.extend(_all_layers(layer))
    return layers


class _LossSurface:
    """The mean loss over fixed examples as a function of a model's weights.

    Holds the minibatches and the traced per-minibatch functions of one
    measurement.
    """

    def __init__(self, model: keras.Model, x: Any, y: Any, loss: LossLike,
                 batch_size: int):
        batch_size = validation.check_int("batch_size", batch_size)
        self.weights = list(model.trainable_variables)
        if not self.weights:
            raise ValueError(f"Expected a built model with trainable weights; "
                             f"'{model.name}' has none.")
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        y = tf.convert_to_tensor(y)
        n = int(y.shape[0])
        for t in tf.nest.flatten(x):
            if int(t.shape[0]) != n:
                raise ValueError(f"Expected as many inputs as targets, got "
                                 f"{int(t.shape[0])} and {n}.")
        validation.check_int("number of examples", n)
        self.num_examples = n
        self.batches = [
            # The lambda runs at once, inside this iteration.
            (tf.nest.map_structure(lambda t: t[i:i + batch_size], x),  # noqa: B023
             y[i:i + batch_size]) for i in range(0, n, batch_size)]
        self._model = model
        self._per_example_loss = _per_example_loss_fn(loss)
        self._loss_sum = tf.function(self._loss_sum_impl,
                                     reduce_retracing=True)
        self._hvp_sum = tf.function(self._hvp_sum_impl, reduce_retracing=True)
        # A model built under a tf.distribute strategy, measured in that
        # strategy's scope (as Keras callbacks run): its variables cannot be
        # differentiated in cross-replica context, so each minibatch runs in
        # replica context. Every replica computes the same full minibatch and
        # the first local one's result is kept: no collective, so each worker
        # of a multi-worker run measures on its own, like an evaluation.
        self._strategy = (tf.distribute.get_strategy()
                          if tf.distribute.has_strategy() and
                          tf.distribute.in_cross_replica_context() else None)

    def _run(self, fn, *args):
        if self._strategy is None:
            return fn(*args)
        results = self._strategy.run(fn, args=args)
        return tf.nest.map_structure(
            lambda r: self._strategy.experimental_local_results(r)[0], results)

    def mean_loss(self) -> float:
        total = sum(float(self._run(self._loss_sum, xb, yb))
                    for xb, yb in self.batches)
        return total / self.num_examples

    def hessian_vector_product(self, v: list[tf.Tensor]) -> list[tf.Tensor]:
        """H v for the Hessian of the mean loss over all examples."""
        total = None
        for xb, yb in self.batches:
            hv = self._run(self._hvp_sum, xb, yb, v)
            total = hv if total is None else [a + b for a, b in zip(total, hv)]
        return [t / tf.cast(self.num_examples, t.dtype) for t in total]

    def _loss_sum_impl(self, x, y):
        """The sum over the minibatch of the per-example losses (float64)."""
        return tf.reduce_sum(tf.cast(self._losses(x, y), tf.float64))

    def _hvp_sum_impl(self, x, y, v):
        """H_b v for the Hessian of the minibatch's summed loss."""
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = tf.reduce_sum(self._losses(x, y))
            grads = inner.gradient(
                total, self.weights,
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grad_dot_v = tf.add_n([tf.reduce_sum(g * tf.cast(u, g.dtype))
                                   for g, u in zip(grads, v)])
        return outer.gradient(
            grad_dot_v, self.weights,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _losses(self, x, y):
        """One loss per example: the mean over any non-batch axes."""
        y_pred = self._model(x, training=False)
        if y.dtype.is_floating:
            y = tf.cast(y, y_pred.dtype)
        losses = tf.convert_to_tensor(self._per_example_loss(y, y_pred))
        if losses.shape.rank and losses.shape.rank > 1:
            losses = tf.reduce_mean(losses,
                                    axis=list(range(1, losses.shape.rank)))
        return losses


def _per_example_loss_fn(loss: LossLike) -> Callable[[Any, Any], Any]:
    """`fn(y_true, y_pred)` -> unreduced losses, from any Keras loss form."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # Loss.call is the unreduced loss; __call__ would apply the object's
        # reduction, which can be a sum or none.
        return loss.call
    if callable(loss):
        return loss
    raise TypeError(f"Expected loss to be a Keras loss, a loss name or a "
                    f"function, got {loss!r}.")


def _dot(a: list[tf.Tensor], b: list[tf.Tensor]) -> float:
    return float(tf.add_n([tf.reduce_sum(tf.cast(s, tf.float64) *
                                         tf.cast(t, tf.float64))
                           for s, t in zip(a, b)]))


def _normalized(v: list[tf.Tensor]) -> list[tf.Tensor]:
    norm = np.sqrt(_dot(v, v))
    return [t / tf.cast(norm, t.dtype) for t in v]
