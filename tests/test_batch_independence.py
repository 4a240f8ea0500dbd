"""Models that mix examples across the batch are refused on every path."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat
from tf_dpsat import batch_independence

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CLIP = 0.5
pytestmark = pytest.mark.filterwarnings("ignore:.*NOT differentially private")


def _centering_model():
    """Subtracts the batch mean: each example's output depends on all."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
        keras.layers.Lambda(
            lambda t: t - keras.ops.mean(t, axis=0, keepdims=True),
            name="center"),
        keras.layers.Dense(3)])


def _data(n=8):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 5)).astype("float32"),
            rng.integers(0, 3, n).astype("int64"))


def _clipped_sum_in_one_batch(model, x, y):
    """sum_i clip_C(dL_i/dw), the forward pass run on the whole batch.

    This is what a DP step computes when it clips per example but runs the
    model on the batch, as the fast path does.
    """
    with tf.GradientTape(persistent=True) as tape:
        logits = model(x, training=True)
        losses = [XENT(y[i:i + 1], logits[i:i + 1]) for i in range(len(y))]
    total = 0.0
    for loss in losses:
        grads = tape.gradient(loss, model.trainable_variables)
        flat = np.concatenate([np.ravel(g) for g in grads])
        total = total + flat * min(1.0, CLIP / (np.linalg.norm(flat) + 1e-6))
    return total


def _compiled(model, clipping):
    model = tf_dpsat.make_private(model)
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        learning_rate=1.0, momentum=0.0, l2_norm_clip=CLIP,
        noise_multiplier=0.0, rho=0.0, seed=0, clipping=clipping), loss=XENT)
    return model


def _assert_refused(model, x, y, match, train=None):
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(ValueError, match=match):
        (train or model.train_on_batch)(x, y)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_centering_layer_has_unbounded_sensitivity_and_is_refused():
    x, y = _data()
    model = _centering_model()
    # Adding one adversarial example moves the clipped sum by much more
    # than C: it shifts the batch mean, hence every other example's clipped
    # gradient. Per-example clipping bounds nothing here.
    base = _clipped_sum_in_one_batch(model, x, y)
    sensitivity = 0.0
    for scale in (1.0, 10.0, 100.0):
        for sign in (1.0, -1.0):
            z = np.full((1, 5), sign * scale, np.float32)
            added = _clipped_sum_in_one_batch(
                model, np.concatenate([x, z]), np.concatenate([y, [0]]))
            sensitivity = max(sensitivity, np.linalg.norm(added - base))
    assert sensitivity > 1.5 * CLIP
    for clipping in ("auto", "fast", "vectorized"):
        _assert_refused(_compiled(_centering_model(), clipping), x, y,
                        r"Layer 'center' \(Lambda\) mixes examples across "
                        r"the batch: .* Remove it")


class _ReadsLaterRows(keras.layers.Layer):
    """Row i adds the sum of the rows after it.

    A change of example 0 moves no other row; a change of the last example
    moves every other row.
    """

    def call(self, x):
        return 0.1 * x + tf.cumsum(x, axis=0, reverse=True, exclusive=True)


def _later_rows_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((5,)), _ReadsLaterRows(name="later_rows"),
        keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])


def test_a_layer_reading_later_rows_is_refused():
    x, y = _data()
    model = _later_rows_model()
    # Adding one example at the end of the batch moves every other
    # example's clipped gradient: the clipped sum moves by far more than C.
    base = _clipped_sum_in_one_batch(model, x, y)
    sensitivity = max(
        np.linalg.norm(_clipped_sum_in_one_batch(
            model, np.concatenate([x, np.full((1, 5), v, np.float32)]),
            np.concatenate([y, [0]])) - base)
        for v in (-10.0, 10.0))
    assert sensitivity > 1.5 * CLIP
    for clipping in ("auto", "fast", "vectorized"):
        _assert_refused(_compiled(_later_rows_model(), clipping), x, y,
                        r"Layer 'later_rows' \(_ReadsLaterRows\) mixes "
                        r"examples across the batch")


def test_refused_through_fit_and_a_traced_train_step():
    x, y = _data()
    model = _compiled(_centering_model(), "auto")
    _assert_refused(model, x, y, "mixes examples",
                    lambda x, y: model.fit(x, y, batch_size=8, verbose=0))
    # A step that reaches the optimizer without Keras's train function is
    # probed too, eagerly, while the step is traced.
    model = _compiled(_centering_model(), "vectorized")
    step = tf.function(lambda x, y: model.train_step((x, y)))
    _assert_refused(model, tf.constant(x), tf.constant(y), "mixes examples",
                    step)


def test_culprit_is_named_inside_nested_models_and_bare_ops():
    inner_in = keras.Input((4,))
    centered = keras.layers.Lambda(
        lambda t: t - keras.ops.mean(t, axis=0), name="inner_center")(inner_in)
    inner = keras.Model(inner_in, keras.layers.Dense(4)(centered))
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              inner, keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="Layer 'inner_center'"):
        batch_independence.check(tf_dpsat.make_private(model))

    inputs = keras.Input((5,))
    h = keras.layers.Dense(4)(inputs)
    h = h / keras.ops.max(keras.ops.abs(h))  # a bare op over the whole batch
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    with pytest.raises(ValueError, match=r"Operation '\w+' \(Max\)"):
        batch_independence.check(tf_dpsat.make_private(model))


def test_per_example_model_passes_and_the_probe_changes_nothing(caplog):
    # Dropout draws random masks; the probe's passes share seed states, so
    # they agree and the model is checked (no skip warning), and its
    # stateless passes leave weights and seeds as they were.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 5))
    h = keras.layers.Dense(8)(inputs)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.Lambda(lambda t: keras.ops.mean(t, axis=1))(h)
    h = keras.ops.tanh(h)
    model = tf_dpsat.make_private(keras.Model(inputs,
                                              keras.layers.Dense(3)(h)))
    before = [v.numpy().copy() for v in model.variables]
    with caplog.at_level(logging.WARNING):
        batch_independence.check(model)
    assert "was not checked" not in caplog.text
    for a, b in zip(before, model.variables):
        np.testing.assert_array_equal(a, b.numpy())
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=0.0,
                                                clipping="fast"), loss=XENT)
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(4, 6, 5)).astype("float32"),
                         rng.integers(0, 3, 4))


def test_models_it_cannot_probe_are_logged(caplog):
    class Net(tf_dpsat.DPModel):
        def __init__(self):
            super().__init__()
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(x)

    net = Net()
    net(np.zeros((1, 5), np.float32))
    noisy = tf_dpsat.make_private(keras.Sequential([
        keras.Input((5,)),
        keras.layers.Lambda(lambda t: t + tf.random.normal(tf.shape(t))),
        keras.layers.Dense(3)]))
    with caplog.at_level(logging.WARNING):
        # A subclassed model has no input specs: without a batch to shape
        # the probe, nothing is decided (its first private step probes it).
        batch_independence.check(net)
        batch_independence.check(noisy)
    assert f"'{net.name}' was not checked" not in caplog.text
    assert "two passes on the same inputs differ" in caplog.text


def test_subclassed_model_is_probed_with_its_first_batch():
    class Centred(tf_dpsat.DPModel):
        def __init__(self):
            super().__init__()
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(x - keras.ops.mean(x, axis=0, keepdims=True))

    class PerExample(Centred):
        def call(self, x):
            return self.out(x - keras.ops.mean(x, axis=1, keepdims=True))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    for cls, mixes in ((Centred, True), (PerExample, False)):
        model = cls()
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            learning_rate=1.0, noise_multiplier=0.0, seed=0), loss=XENT)
        model(x)  # built, so the weights exist before the step
        before = [v.numpy() for v in model.trainable_variables]
        if mixes:
            with pytest.raises(ValueError, match="mixes examples across"):
                model.train_on_batch(x, y)
            after = [v.numpy() for v in model.trainable_variables]
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
        else:
            model.train_on_batch(x, y)
            assert int(model.optimizer.iterations.numpy()) == 1
