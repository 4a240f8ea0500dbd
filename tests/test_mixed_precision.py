"""DP training under keras.mixed_precision policies.

Under `mixed_bfloat16` the fast engine computes the forward and backward
passes in bfloat16 and the per-example norms, clip factors, clipped sums and
noise in float32; the variables stay float32. `mixed_float16` needs loss
scaling and is refused.
"""

from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat
from tf_dpsat import per_example

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
pytestmark = pytest.mark.filterwarnings("ignore:.*NOT differentially private")


@pytest.fixture(autouse=True)
def _float32_policy_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _cnn(policy, seed=0, private=False):
    """A small CNN built under `policy`, its logits cast to float32.

    The float32 `Activation` at the end is Keras's advice for mixed
    precision: the loss is computed from float32 logits. `private` wraps it
    with `make_private` under the same policy, as a user would.
    """
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(seed)
    try:
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
            keras.layers.Activation("linear", dtype="float32")])
        return tf_dpsat.make_private(model) if private else model
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 3)).astype("float32"),
            rng.integers(0, 10, n))


def _flat(weights):
    return np.concatenate([np.ravel(w) for w in weights])


def _train(policy, initial, optimizer, x, y, private):
    model = _cnn(policy, private=private)
    model.set_weights(initial)
    model.compile(optimizer=optimizer, loss=XENT)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert all(v.dtype == "float32" for v in model.weights)
    return _flat(model.get_weights())


def _relative_gap(policy_a, policy_b, initial, make_optimizer, x, y,
                  private):
    """||w_a - w_b|| / ||w_a - w_0|| after the same training steps."""
    a = _train(policy_a, initial, make_optimizer(), x, y, private)
    b = _train(policy_b, initial, make_optimizer(), x, y, private)
    return np.linalg.norm(a - b) / np.linalg.norm(a - _flat(initial))


@pytest.mark.slow
def test_bfloat16_training_matches_float32_as_plain_training_does():
    # bfloat16 keeps 8 significant bits: every product and sum of the
    # forward and backward passes is off by up to 2^-9 relative, so four
    # steps drift by a few percent of their displacement whatever the
    # optimizer. The reference spread is that of plain (non-private) SGD
    # on the same model, data and steps; DP training must stay within twice
    # it. Clipping rescales each gradient to norm C, which does not
    # amplify relative errors. Its gap must also exceed 2^-12: a float32
    # computation (bfloat16 silently not in effect) would differ by ~1e-6.
    x, y = _data()
    initial = _cnn("float32").get_weights()
    plain = _relative_gap(
        "float32", "mixed_bfloat16", initial,
        lambda: keras.optimizers.SGD(learning_rate=0.5), x, y, False)
    private = _relative_gap(
        "float32", "mixed_bfloat16", initial,
        lambda: tf_dpsat.DPSATKeras(
            learning_rate=0.5, momentum=0.0, l2_norm_clip=0.5,
            noise_multiplier=0.0, rho=0.03, clipping="fast", seed=0),
        x, y, True)
    assert 2.0**-12 < private <= 2 * plain, (private, plain)


class _Clipped(NamedTuple):
    summed: list
    norms: tf.Tensor
    y_pred: tf.Tensor
    engine: str


def _clipped_sum(model, x, y, weights, l2_norm_clip, engine) -> _Clipped:
    """The clipped sum of one batch at the model's weights."""
    variables = model.trainable_variables
    x, y, weights = (tf.constant(x), tf.constant(y),
                     tf.constant(weights, tf.float32))
    model._symbolic_build(data_batch=(x, y, weights))
    engines = []

    @tf.function
    def step(x, y, weights):
        params = [tf.convert_to_tensor(v) for v in variables]
        result = per_example.clipped_sum(
            model, variables, params, per_example.Batch.from_keras(x, y, weights),
            l2_norm_clip=l2_norm_clip, engine=engine, batch_slices=1)
        engines.append(result.engine)
        return result.summed, result.norms, result.y_pred

    return _Clipped(*step(x, y, weights), engines[-1])


@pytest.mark.parametrize("engine", ["fast", "vectorized"])
def test_bfloat16_clipping_bound_holds(engine):
    # Sensitivity under add/remove: the clipped sums of a batch with and
    # without one example (its weight 1 or 0: same shapes, so every other
    # row is computed identically) differ by that example's clipped
    # gradient, whose norm is C * n / (n + 1e-6) < C in exact arithmetic.
    # Norms, factors and sums are float32, so the measured change may
    # exceed C by float32 rounding only (a few ulp of C); bfloat16 norms
    # would miss by ~2^-8 C. The example is scaled up so that clipping binds
    # (its change is C up to 1e-6 relative).
    x, y = _data(n=8, seed=1)
    x[-1] *= 30.0
    model = _cnn("mixed_bfloat16", private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    assert model.layers[0].compute_dtype == "bfloat16"
    c = 0.05
    without = _clipped_sum(model, x, y, [1.0] * 7 + [0.0], c, engine)
    with_it = _clipped_sum(model, x, y, [1.0] * 8, c, engine)
    assert without.engine == with_it.engine == engine
    assert all(s.dtype == tf.float32 for s in with_it.summed)
    assert with_it.norms.dtype == tf.float32
    assert float(with_it.norms[-1]) > 100 * c
    change = np.linalg.norm(_flat([a.numpy() - b.numpy() for a, b in
                                   zip(with_it.summed, without.summed)]))
    assert c * (1 - 1e-5) <= change <= c * (1 + 1e-5), change / c


def test_auto_engine_is_fast_under_bfloat16(caplog):
    x, y = _data(n=8)
    model = _cnn("mixed_bfloat16", private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    per_example.check_supported(model)
    with caplog.at_level("WARNING", logger="absl"):
        result = _clipped_sum(model, x, y, [1.0] * 8, 0.1, "auto")
    assert result.engine == "fast"
    assert not [r for r in caplog.records if "does not apply" in r.getMessage()]


def test_bfloat16_noise_is_float32():
    # All sample weights 0: the clipped sum is 0 and, with a zero kernel,
    # lr 1, no momentum, rho 0 and B = 1, the update is exactly -noise.
    # Its std must be sigma * C = 1.5 (4096 draws: standard error of the
    # std 1.5 / sqrt(2 * 4096) = 0.017, bound at 5 of them) and its values
    # float32: bfloat16 noise would be exactly representable in bfloat16.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        dense = keras.layers.Dense(64, use_bias=False,
                                   kernel_initializer="zeros")
        model = keras.Sequential([
            keras.Input((64,)), dense,
            keras.layers.Activation("linear", dtype="float32")])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model = tf_dpsat.make_private(model)
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        learning_rate=1.0, momentum=0.0, rho=0.0, l2_norm_clip=0.5,
        noise_multiplier=3.0, expected_batch_size=1, seed=7),
        loss=keras.losses.MeanSquaredError())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 64)).astype("float32")
    model.fit(x, x, sample_weight=np.zeros(8, np.float32), batch_size=8,
              verbose=0)
    assert dense.compute_dtype == "bfloat16"
    assert dense.kernel.dtype == "float32"
    noise = -dense.kernel.numpy()
    assert abs(noise.std() - 1.5) < 5 * 0.017
    assert abs(noise.mean()) < 5 * 1.5 / 64
    as_bfloat16 = tf.cast(tf.cast(noise, tf.bfloat16), tf.float32).numpy()
    assert np.mean(as_bfloat16 != noise) > 0.95


@pytest.mark.slow
def test_bfloat16_dp_model_saves_and_loads(tmp_path):
    x, y = _data(n=16)
    model = _cnn("mixed_bfloat16", private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0, seed=3),
                  loss=XENT)
    model.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "bf16.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tf_dpsat.DPFunctional)
    assert loaded.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert loaded.layers[1].kernel.dtype == "float32"
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    before = _flat(loaded.get_weights())
    loaded.fit(x, y, batch_size=8, verbose=0)
    assert np.all(np.isfinite(_flat(loaded.get_weights())))
    assert np.any(_flat(loaded.get_weights()) != before)


def test_mixed_float16_is_refused_naming_bfloat16():
    # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer,
    # which the DP step would bypass; the refusal names the fix.
    x, y = _data(n=8)
    model = _cnn("mixed_float16", private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = _flat(model.get_weights())
    with pytest.raises(ValueError, match=r"mixed_float16.*loss scaling.*"
                       r"set_global_policy\('mixed_bfloat16'\)"):
        model.fit(x, y, batch_size=8, verbose=0)
    np.testing.assert_array_equal(_flat(model.get_weights()), before)


def _layers_model(policy):
    """Every family of fast rules in one model, built under `policy`."""
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(1)
    try:
        ids = keras.Input((6,), dtype="int32")
        h = keras.layers.Embedding(12, 8)(ids)
        h = keras.layers.Conv1D(8, 3, activation="relu")(h)
        h = keras.layers.LayerNormalization()(h)
        h = keras.layers.Reshape((2, 2, 8))(h)
        h = keras.layers.DepthwiseConv2D(2, padding="same")(h)
        h = keras.layers.Conv2D(6, 2, activation="relu")(h)
        h = keras.layers.GroupNormalization(2)(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(10)(h)
        outputs = keras.layers.Activation("linear", dtype="float32")(h)
        return tf_dpsat.make_private(keras.Model(ids, outputs))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_every_rule_family_runs_in_bfloat16():
    # The same weights and batch under both policies: the bfloat16 clipped
    # sum differs from the float32 one by bfloat16 rounding (2^-9 relative
    # per operation, a few layers deep), not more; and by more than float32
    # rounding, which shows that the layers did compute in bfloat16. The
    # vectorized engine differentiates Keras's own bfloat16 passes: the
    # engines agree to bfloat16 rounding, and the fast engine's forward pass
    # is Keras's, bit for bit.
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 12, (8, 6)).astype("int32")
    y = rng.integers(0, 10, 8)
    sums = {}
    for policy in ("float32", "mixed_bfloat16"):
        model = _layers_model(policy)
        model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                      loss=XENT)
        if policy == "float32":
            weights = model.get_weights()
        model.set_weights(weights)
        result = _clipped_sum(model, ids, y, [1.0] * 8, 0.1, "fast")
        assert result.engine == "fast"
        sums[policy] = _flat([s.numpy() for s in result.summed])
    np.testing.assert_array_equal(result.y_pred.numpy(),
                                  model(ids, training=True).numpy())
    vectorized = _clipped_sum(model, ids, y, [1.0] * 8, 0.1, "vectorized")
    sums["vectorized"] = _flat([s.numpy() for s in vectorized.summed])

    def gap(a, b):
        return np.linalg.norm(sums[a] - sums[b]) / np.linalg.norm(sums[b])

    assert 2.0**-16 < gap("mixed_bfloat16", "float32") < 2.0**-4
    assert gap("mixed_bfloat16", "vectorized") < 2.0**-6
