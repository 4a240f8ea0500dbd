"""Tests for tf_dpsat.sharpness: top Hessian eigenvalue and loss slices."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat
from tf_dpsat import sharpness


def _tiny_mlp(seed: int = 0) -> keras.Model:
    """5 -> Dense(3, tanh) -> Dense(2), float64: 5*3+3 + 3*2+2 = 26 weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(5,), dtype="float64")
    hidden = keras.layers.Dense(3, activation="tanh", dtype="float64",
                                bias_initializer="random_normal")(inputs)
    outputs = keras.layers.Dense(2, dtype="float64",
                                 bias_initializer="random_normal")(hidden)
    return keras.Model(inputs, outputs)


def _tiny_data(n: int = 50, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)), rng.integers(0, 2, n)


def _exact_hessian(model: keras.Model, x: np.ndarray, y: np.ndarray):
    """The full Hessian of the mean cross-entropy of `_tiny_mlp`, written out.

    An independent forward pass (tanh(x W1 + b1) W2 + b2, cross-entropy as
    logsumexp(logits) - logits[y]) on one flat float64 parameter vector, and
    the Jacobian of its gradient: no Keras and no Hessian-vector products.
    """
    shapes = [tuple(w.shape) for w in model.trainable_variables]
    sizes = [int(np.prod(s)) for s in shapes]
    theta = tf.Variable(np.concatenate(
        [w.numpy().ravel() for w in model.trainable_variables]))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            w1, b1, w2, b2 = [tf.reshape(p, s) for p, s in
                              zip(tf.split(theta, sizes), shapes)]
            logits = tf.tanh(x @ w1 + b1) @ w2 + b2
            picked = tf.gather(logits, y, axis=1, batch_dims=1)
            loss = tf.reduce_mean(tf.reduce_logsumexp(logits, axis=1) - picked)
        grad = inner.gradient(loss, theta)
    return outer.jacobian(grad, theta).numpy()


def _largest_magnitude_eigenvalue(matrix: np.ndarray) -> float:
    eigenvalues = np.linalg.eigh(matrix)[0]
    return float(eigenvalues[np.argmax(np.abs(eigenvalues))])


_XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_top_eigenvalue_matches_the_exact_hessian():
    model = _tiny_mlp()
    x, y = _tiny_data()
    hessian = _exact_hessian(model, x, y)
    expected = _largest_magnitude_eigenvalue(hessian)
    eigenvalues = np.sort(np.abs(np.linalg.eigvalsh(hessian)))
    # The test means something only if power iteration can separate the top
    # eigenvalue from the next within the iterations allowed.
    assert eigenvalues[-2] < 0.9 * eigenvalues[-1]
    result = sharpness.top_hessian_eigenvalue(
        model, x, y, loss=_XENT, iterations=1000, batch_size=64,
        tolerance=1e-12)
    # float64 throughout; the Rayleigh quotient's error is about the square
    # of the iterate's, far below 1e-9 once the change is under 1e-12.
    assert result.converged
    assert result.iterations < 1000
    assert result.relative_change < 1e-12
    np.testing.assert_allclose(result.eigenvalue, expected, rtol=1e-9)


def test_minibatches_give_the_same_eigenvalue():
    # N = 50 in batches of 16: 16 + 16 + 16 + 2, an uneven last batch; the
    # Hessian of the mean is the n_b / N weighted sum of the batch Hessians.
    model = _tiny_mlp(seed=3)
    x, y = _tiny_data(seed=4)
    full = sharpness.top_hessian_eigenvalue(
        model, x, y, loss=_XENT, iterations=30, batch_size=50, tolerance=0.0)
    batched = sharpness.top_hessian_eigenvalue(
        model, x, y, loss=_XENT, iterations=30, batch_size=16, tolerance=0.0)
    assert full.iterations == batched.iterations == 30
    # Same start vector, same iterates up to float64 rounding of the sums.
    np.testing.assert_allclose(batched.eigenvalue, full.eigenvalue,
                               rtol=1e-12)


def _linear_regression() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """Dense(2) on 2 features and 4 examples whose Hessian is known by hand.

    Keras' MSE of one example averages over the m = 2 outputs, so the mean
    loss is L = 1/(N m) sum_i sum_j (x_i . W_j + b_j - y_ij)^2, a quadratic
    in (W, b). With a_i = (x_i, 1), its Hessian is block diagonal, one block
    2/(N m) sum_i a_i a_i^T = 2/(N m) A^T A per output. The rows of
    X = [[3, 1], [3, -1], [-3, 1], [-3, -1]] make the columns of A = [X, 1]
    orthogonal with squared norms 36, 4, 4, so A^T A = diag(36, 4, 4) and the
    eigenvalues of H are 2/8 * 36 = 9 (twice) and 2/8 * 4 = 1 (four times),
    whatever the weights and targets.
    """
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Dense(2)])
    x = np.array([[3, 1], [3, -1], [-3, 1], [-3, -1]], np.float32)
    y = np.random.default_rng(6).standard_normal((4, 2)).astype(np.float32)
    return model, x, y


@pytest.mark.parametrize("loss", [
    "mean_squared_error",
    keras.losses.MeanSquaredError(),
    # The object's own reduction is ignored: the mean over examples is used.
    keras.losses.MeanSquaredError(reduction="sum"),
])
def test_quadratic_model_golden_eigenvalue(loss):
    model, x, y = _linear_regression()
    result = sharpness.top_hessian_eigenvalue(
        model, x, y, loss=loss, iterations=50, batch_size=3, tolerance=1e-7)
    # The second eigenvalue is 1/9 of the first: the Rayleigh quotient's
    # error shrinks by 81 per iteration, so a few iterations converge.
    assert result.converged and result.iterations <= 15
    # float32 weights and products: rounding about 1e-7 relative.
    np.testing.assert_allclose(result.eigenvalue, 9.0, rtol=1e-5)


def test_one_iteration_is_not_converged():
    model, x, y = _linear_regression()
    result = sharpness.top_hessian_eigenvalue(
        model, x, y, loss="mse", iterations=1, tolerance=1.0)
    assert result.iterations == 1 and not result.converged
    assert result.relative_change == float("inf")
    # One Rayleigh quotient of a random unit vector lies in [1, 9].
    assert 1.0 - 1e-5 <= result.eigenvalue <= 9.0 + 1e-5


def test_private_model_measures_like_its_plain_copy_and_keeps_its_weights():
    model = _tiny_mlp(seed=7)
    x, y = _tiny_data(seed=8)
    plain = sharpness.top_hessian_eigenvalue(model, x, y, loss=_XENT,
                                             iterations=10, tolerance=0.0)
    private = tf_dpsat.make_private(model)
    assert private is not model
    private.compile(optimizer=tf_dpsat.DPSATKeras(
        l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1, seed=0),
        loss=_XENT)
    before = [w.numpy().copy() for w in private.trainable_variables]
    measured = sharpness.top_hessian_eigenvalue(private, x, y, loss=_XENT,
                                                iterations=10, tolerance=0.0)
    after = [w.numpy() for w in private.trainable_variables]
    # Same layers, same weights, inference mode: no clipping, no noise.
    np.testing.assert_allclose(measured.eigenvalue, plain.eigenvalue,
                               rtol=1e-12)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_model_of_a_strategy_measures_in_its_scope_like_the_exact_hessian(
        mirrored_strategy):
    # As Keras callbacks run during a distributed fit: a DP model built in a
    # 2-replica MirroredStrategy's scope, measured in that scope (its mirrored
    # variables cannot be differentiated in cross-replica context).
    x, y = _tiny_data(seed=16)
    reference = _tiny_mlp(seed=15)
    hessian = _exact_hessian(reference, x, y)
    eigenvalues = np.sort(np.abs(np.linalg.eigvalsh(hessian)))
    assert eigenvalues[-2] < 0.9 * eigenvalues[-1]  # Power iteration converges.
    with mirrored_strategy.scope():
        model = tf_dpsat.make_private(_tiny_mlp(seed=15))
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1, seed=0),
            loss=_XENT)
        measured = sharpness.top_hessian_eigenvalue(
            model, x, y, loss=_XENT, iterations=1000, batch_size=16,
            tolerance=1e-12)
        sliced = sharpness.loss_slice(model, x, y, loss=_XENT,
                                      radii=[0.0, 0.5], seed=3)
    # float64, converged as in test_top_eigenvalue_matches_the_exact_hessian.
    assert measured.converged
    np.testing.assert_allclose(measured.eigenvalue,
                               _largest_magnitude_eigenvalue(hessian), rtol=1e-9)
    plain = sharpness.loss_slice(reference, x, y, loss=_XENT,
                                 radii=[0.0, 0.5], seed=3)
    np.testing.assert_allclose(sliced.losses, plain.losses, rtol=1e-12)
    assert sliced.losses[1] != sliced.losses[0]


def _pooling_model(strides: int, padding: str) -> keras.Model:
    keras.utils.set_random_seed(14)
    inputs = keras.Input(shape=(7, 7, 2), dtype="float64")
    h = keras.layers.Conv2D(3, 3, padding="same", activation="tanh",
                            dtype="float64")(inputs)
    h = keras.layers.MaxPooling2D(3, strides, padding, dtype="float64",
                                  name="pool")(h)
    h = keras.layers.Flatten(dtype="float64")(h)
    return keras.Model(inputs, keras.layers.Dense(2, dtype="float64")(h))


def _finite_difference_hessian(model, x, y, step=1e-6):
    """Central differences of the float64 gradient, one weight at a time.

    Independent of TensorFlow's second derivatives (first-order gradients
    only); max pooling is piecewise linear, and a step of 1e-6 crosses no
    switch of argmax with these random inputs, so the truncation error is
    O(step^2) and the rounding error about 1e-16 / step.
    """
    weights = model.trainable_variables

    @tf.function
    def flat_gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(_XENT.call(y, model(x, training=False)))
        return tf.concat([tf.reshape(g, [-1])
                          for g in tape.gradient(loss, weights)], 0)

    columns = []
    for w in weights:
        original = w.numpy()
        for i in range(original.size):
            values = []
            for sign in (1.0, -1.0):
                moved = original.copy()
                moved.flat[i] += sign * step
                w.assign(moved)
                values.append(flat_gradient().numpy())
            columns.append((values[0] - values[1]) / (2 * step))
        w.assign(original)
    return np.stack(columns, axis=1)


# (1, "same") is measured through explicit padding (TensorFlow's own second
# derivative of it is wrong, which this test catches without the rewrite).
@pytest.mark.parametrize("strides, padding",
                         [(1, "valid"), (2, "same"), (1, "same")])
@pytest.mark.slow
def test_max_pooling_model_matches_finite_differences(strides, padding):
    model = _pooling_model(strides, padding)
    _, y = _tiny_data(n=30, seed=15)
    x = np.random.default_rng(16).standard_normal((30, 7, 7, 2))
    hessian = _finite_difference_hessian(model, x, y)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-7)
    expected = _largest_magnitude_eigenvalue((hessian + hessian.T) / 2)
    result = sharpness.top_hessian_eigenvalue(
        model, x, y, loss=_XENT, iterations=2000, tolerance=1e-12)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalue, expected, rtol=1e-6)


def test_refuses_deep_same_padded_stride_one_max_pooling():
    # TensorFlow's double backward through it is wrong; only a top-level
    # layer is replaced by explicit padding, so a nested one is refused.
    inner = _pooling_model(1, "same")
    outer = keras.Sequential([keras.Input(shape=(7, 7, 2), dtype="float64"),
                              inner])
    x = np.zeros((4, 7, 7, 2))
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="top-level layers"):
        sharpness.top_hessian_eigenvalue(outer, x, y, loss=_XENT)
    # The loss slice needs first-order evaluations only.
    result = sharpness.loss_slice(outer, x, y, loss=_XENT, radii=[0.0])
    assert np.isfinite(result.losses[0])


def test_explicit_padding_computes_the_same_pooling():
    for strides, size in ((1, 7), (1, 8), (2, 7), (3, 8)):
        pooling = keras.layers.MaxPooling2D(3, strides, "same")
        x = np.random.default_rng(size).standard_normal((2, size, size, 3))
        explicit = sharpness._ExplicitlyPaddedMaxPooling(pooling)
        assert np.array_equal(explicit(x).numpy(), pooling(x).numpy())


def test_arguments_are_checked():
    model, x, y = _linear_regression()
    with pytest.raises(ValueError, match=r"Expected iterations=0 >= 1\."):
        sharpness.top_hessian_eigenvalue(model, x, y, loss="mse", iterations=0)
    with pytest.raises(ValueError, match=r"Expected batch_size=0 >= 1\."):
        sharpness.top_hessian_eigenvalue(model, x, y, loss="mse", batch_size=0)
    with pytest.raises(ValueError, match="as many inputs as targets"):
        sharpness.top_hessian_eigenvalue(model, x, y[:3], loss="mse")
    with pytest.raises(TypeError, match="Expected loss"):
        sharpness.loss_slice(model, x, y, loss=3, radii=[0.0])


def _conv_model() -> keras.Model:
    keras.utils.set_random_seed(9)
    inputs = keras.Input(shape=(6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")(inputs)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                     name="depthwise")(h)
    h = keras.layers.GroupNormalization(2, name="gn")(h)
    h = keras.layers.Flatten()(h)
    # Measured in inference mode: with training=True the dropout would show.
    h = keras.layers.Dropout(0.5)(h)
    outputs = keras.layers.Dense(3, name="dense")(h)
    return keras.Model(inputs, outputs)


def test_direction_is_filter_normalised():
    model = _conv_model()
    names = [w.path for w in model.trainable_variables]
    assert names == ["conv/kernel", "conv/bias", "depthwise/kernel",
                     "depthwise/bias", "gn/gamma", "gn/beta", "dense/kernel",
                     "dense/bias"]
    axes = sharpness.filter_axes(model)
    assert axes == [(3,), (0,), (2, 3), (0,), (0,), (0,), (1,), (0,)]
    weights = [w.numpy() for w in model.trainable_variables]
    direction = sharpness.filter_normalized_direction(weights, 11,
                                                      filter_axes=axes)
    conv, conv_d = weights[0], direction[0]  # (3, 3, 2, 4): 4 filters
    for out in range(4):
        np.testing.assert_allclose(np.linalg.norm(conv_d[..., out]),
                                   np.linalg.norm(conv[..., out]), rtol=1e-6)
    # (3, 3, 4, 2): one filter per input channel and multiplier, as a
    # PyTorch grouped conv has one per output channel.
    dw, dw_d = weights[2], direction[2]
    for channel in range(4):
        for multiplier in range(2):
            np.testing.assert_allclose(
                np.linalg.norm(dw_d[:, :, channel, multiplier]),
                np.linalg.norm(dw[:, :, channel, multiplier]), rtol=1e-6)
    dense, dense_d = weights[6], direction[6]  # (64, 3): one per output unit
    np.testing.assert_allclose(np.linalg.norm(dense_d, axis=0),
                               np.linalg.norm(dense, axis=0), rtol=1e-6)
    # Biases and the GroupNorm scale and offset do not move.
    for i in (1, 3, 4, 5, 7):
        assert np.array_equal(direction[i], np.zeros_like(weights[i]))
    # A random direction, not the weights rescaled.
    cosine = np.sum(dense * dense_d) / (np.linalg.norm(dense) *
                                        np.linalg.norm(dense_d))
    assert abs(cosine) < 0.5
    assert all(d.dtype == w.dtype and d.shape == w.shape
               for d, w in zip(direction, weights))
    # The seed fixes the direction.
    again = sharpness.filter_normalized_direction(weights, 11,
                                                  filter_axes=axes)
    assert all(np.array_equal(a, b) for a, b in zip(direction, again))


def test_default_filters_are_the_last_axis():
    weights = [np.array([[3.0, 0.0], [4.0, 1.0]]), np.array([1.0, 2.0])]
    direction = sharpness.filter_normalized_direction(weights, 0)
    # Column norms of the kernel: 5 and 1.
    np.testing.assert_allclose(np.linalg.norm(direction[0], axis=0), [5, 1])
    assert np.array_equal(direction[1], [0.0, 0.0])


def test_loss_slice_values_and_restored_weights():
    model = _conv_model()
    rng = np.random.default_rng(12)
    x = rng.standard_normal((40, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    model.compile(loss=_XENT)
    evaluated = model.evaluate(x, y, batch_size=16, verbose=0)
    before = [w.numpy().copy() for w in model.trainable_variables]
    radii = [0.0, 0.5, -1.0]
    result = sharpness.loss_slice(model, x, y, loss=_XENT, radii=radii,
                                  seed=13, batch_size=16)
    after = [w.numpy() for w in model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    np.testing.assert_array_equal(result.radii, radii)
    # Radius 0 is the model's own loss (Keras' float32 running mean).
    np.testing.assert_allclose(result.losses[0], evaluated, rtol=1e-6)
    # Other radii: the loss at w + alpha d, d the seed's direction.
    direction = sharpness.filter_normalized_direction(
        before, 13, filter_axes=sharpness.filter_axes(model))
    for radius, measured in zip(radii[1:], result.losses[1:]):
        for w, w0, d in zip(model.trainable_variables, before, direction):
            w.assign(w0 + np.float32(radius) * d)
        expected = model.evaluate(x, y, batch_size=16, verbose=0)
        np.testing.assert_allclose(measured, expected, rtol=1e-6)
        assert abs(measured - result.losses[0]) > 1e-3


def test_loss_slice_restores_the_weights_when_the_loss_raises():
    model = _conv_model()
    x = np.zeros((4, 6, 6, 2), np.float32)
    y = np.zeros(4, np.int64)
    before = [w.numpy().copy() for w in model.trainable_variables]

    def broken_loss(y_true, y_pred):
        raise RuntimeError("broken loss")

    with pytest.raises(RuntimeError, match="broken loss"):
        sharpness.loss_slice(model, x, y, loss=broken_loss, radii=[0.5])
    after = [w.numpy() for w in model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
