"""DP training under keras.mixed_precision policies.

Under `mixed_bfloat16` and `mixed_float16` the engines compute the forward
and backward passes in bfloat16 / float16 and the per-example norms, clip
factors, clipped sums and noise in float32; the variables stay float32.
Under float16 each example's loss is scaled by a static loss scale S and its
gradient unscaled in float32 before its norm is taken; an example whose
scaled gradient overflows is dropped.
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
@pytest.mark.parametrize("policy, floor", [("mixed_bfloat16", 2.0**-12),
                                           ("mixed_float16", 2.0**-15)])
def test_training_matches_float32_as_plain_training_does(policy, floor):
    # bfloat16 keeps 8 significant bits, float16 11: every product and sum
    # of the forward and backward passes is off by up to 2^-8 (2^-11 for
    # float16) relative, so four steps drift by a fraction of their
    # displacement whatever the optimizer. The reference spread is that of
    # plain (non-private) SGD on the same model, data and steps (under
    # mixed_float16 with Keras's own dynamic loss scaling); DP training,
    # with its static loss scale, must stay within twice it. Clipping
    # rescales each gradient to norm C, which does not amplify relative
    # errors. Its gap must also exceed `floor`, 16 times below the policy's
    # rounding unit: a float32 computation (the policy silently not in
    # effect) would differ by ~1e-6.
    x, y = _data()
    initial = _cnn("float32").get_weights()
    plain = _relative_gap(
        "float32", policy, initial,
        lambda: keras.optimizers.SGD(learning_rate=0.5), x, y, False)
    private = _relative_gap(
        "float32", policy, initial,
        lambda: tf_dpsat.DPSATKeras(
            learning_rate=0.5, momentum=0.0, l2_norm_clip=0.5,
            noise_multiplier=0.0, rho=0.03, clipping="fast", seed=0),
        x, y, True)
    assert floor < private <= 2 * plain, (private, plain)


class _Clipped(NamedTuple):
    summed: list
    norms: tf.Tensor
    y_pred: tf.Tensor
    nonfinite: tf.Tensor
    engine: str


def _clipped_sum(model, x, y, weights, l2_norm_clip, engine,
                 loss_scale=1.0, chunk_units=None) -> _Clipped:
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
            l2_norm_clip=l2_norm_clip, engine=engine, batch_slices=1,
            loss_scale=loss_scale, chunk_units=chunk_units)
        engines.append(result.engine)
        return result.summed, result.norms, result.y_pred, result.nonfinite

    return _Clipped(*step(x, y, weights), engines[-1])


@pytest.mark.parametrize("engine", ["fast", "vectorized"])
@pytest.mark.parametrize("policy, loss_scale", [
    ("mixed_bfloat16", 1.0),
    ("mixed_float16", tf_dpsat.optimizer.DEFAULT_FLOAT16_LOSS_SCALE)])
def test_clipping_bound_holds(engine, policy, loss_scale):
    # Sensitivity under add/remove: the clipped sums of a batch with and
    # without one example (its weight 1 or 0: same shapes, so every other
    # row is computed identically) differ by that example's clipped
    # gradient, whose norm is C * n / (n + 1e-6) < C in exact arithmetic.
    # Norms, factors and sums are float32, so the measured change may
    # exceed C by float32 rounding only (a few ulp of C); bfloat16 or
    # float16 norms would miss by ~2^-8 C or ~2^-11 C. The example is
    # scaled up so that clipping binds (its change is C up to 1e-6
    # relative); under float16 its gradient scaled by the default S stays
    # finite (checked: no unit is dropped).
    x, y = _data(n=8, seed=1)
    x[-1] *= 30.0
    model = _cnn(policy, private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    c = 0.05
    without = _clipped_sum(model, x, y, [1.0] * 7 + [0.0], c, engine,
                           loss_scale)
    with_it = _clipped_sum(model, x, y, [1.0] * 8, c, engine, loss_scale)
    assert without.engine == with_it.engine == engine
    assert float(with_it.nonfinite) == 0
    assert all(s.dtype == tf.float32 for s in with_it.summed)
    assert with_it.norms.dtype == tf.float32
    assert float(with_it.norms[-1]) > 100 * c
    change = np.linalg.norm(_flat([a.numpy() - b.numpy() for a, b in
                                   zip(with_it.summed, without.summed)]))
    assert c * (1 - 1e-5) <= change <= c * (1 + 1e-5), change / c


@pytest.mark.parametrize("policy, loss_scale", [
    ("mixed_bfloat16", 1.0),
    ("mixed_float16", tf_dpsat.optimizer.DEFAULT_FLOAT16_LOSS_SCALE)])
def test_chunks_keep_the_sums_and_dtypes(policy, loss_scale):
    # 8 examples in chunks of 3 (3, 3, 2): the float32 sums and norms and
    # the predictions (in the policy's output dtype) equal the whole
    # batch's up to float32 summation order.
    x, y = _data(n=8, seed=2)
    model = _cnn(policy, private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    whole, chunked = (_clipped_sum(model, x, y, [1.0] * 8, 0.05, "fast",
                                   loss_scale, chunk_units=chunk)
                      for chunk in (None, 3))
    assert all(s.dtype == tf.float32 for s in chunked.summed)
    assert chunked.y_pred.dtype == whole.y_pred.dtype
    for a, b in zip(chunked.summed, whole.summed):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-7)
    np.testing.assert_allclose(chunked.norms.numpy(), whole.norms.numpy(),
                               rtol=1e-5)
    np.testing.assert_array_equal(chunked.y_pred.numpy(),
                                  whole.y_pred.numpy())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_auto_engine_is_fast_under_mixed_precision(caplog, policy):
    x, y = _data(n=8)
    model = _cnn(policy, private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    per_example.check_supported(model)
    with caplog.at_level("WARNING", logger="absl"):
        result = _clipped_sum(model, x, y, [1.0] * 8, 0.1, "auto")
    assert result.engine == "fast"
    assert not [r for r in caplog.records if "does not apply" in r.getMessage()]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_noise_is_float32(policy):
    # All sample weights 0: the clipped sum is 0 and, with a zero kernel,
    # lr 1, no momentum, rho 0 and B = 1, the update is exactly -noise.
    # Its std must be sigma * C = 1.5 (4096 draws: standard error of the
    # std 1.5 / sqrt(2 * 4096) = 0.017, bound at 5 of them) and its values
    # float32: noise drawn in the compute dtype would be exactly
    # representable in it (a float32 normal draw is so only when the
    # mantissa bits it drops are all zero: 16 bits for bfloat16, 13 for
    # float16).
    compute = policy.split("_")[1]
    keras.mixed_precision.set_global_policy(policy)
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
    assert dense.compute_dtype == compute
    assert dense.kernel.dtype == "float32"
    noise = -dense.kernel.numpy()
    assert abs(noise.std() - 1.5) < 5 * 0.017
    assert abs(noise.mean()) < 5 * 1.5 / 64
    rounded = tf.cast(tf.cast(noise, compute), tf.float32).numpy()
    assert np.mean(rounded != noise) > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("policy, loss_scale", [("mixed_bfloat16", None),
                                                ("mixed_float16", 1024.0)])
def test_dp_model_saves_and_loads(tmp_path, policy, loss_scale):
    x, y = _data(n=16)
    model = _cnn(policy, private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        noise_multiplier=1.0, seed=3, loss_scale=loss_scale), loss=XENT)
    model.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tf_dpsat.DPFunctional)
    # Loading compiles again: still the DP optimizer itself, never Keras's
    # dynamic LossScaleOptimizer, with the same static scale.
    assert type(loaded.optimizer) is tf_dpsat.DPSATKeras
    assert loaded.optimizer.loss_scale == loss_scale
    assert loaded.layers[1].dtype_policy.name == policy
    assert loaded.layers[1].kernel.dtype == "float32"
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    before = _flat(loaded.get_weights())
    loaded.fit(x, y, batch_size=8, verbose=0)
    assert np.all(np.isfinite(_flat(loaded.get_weights())))
    assert np.any(_flat(loaded.get_weights()) != before)


def test_mixed_float16_compiles_the_dp_optimizer_unwrapped():
    # Keras would wrap any optimizer in its dynamic LossScaleOptimizer;
    # a DP model keeps the DP optimizer, whose static scale defaults to
    # 2^5 where a layer computes in float16 and to 1 elsewhere.
    model = _cnn("mixed_float16", private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    assert type(model.optimizer) is tf_dpsat.DPSATKeras
    assert model.optimizer._loss_scale(model) == 2.0**5
    plain = _cnn("float32", private=True)
    assert model.optimizer._loss_scale(plain) == 1.0
    explicit = tf_dpsat.DPSATKeras(noise_multiplier=1.0, loss_scale=64.0)
    assert explicit._loss_scale(model) == 64.0


def test_dynamic_loss_scale_optimizer_is_refused():
    # Its scale halves (and the step is skipped) whenever any gradient of
    # the batch overflows: a decision on the whole batch, without noise.
    model = _cnn("mixed_float16", private=True)
    with pytest.raises(ValueError, match=(
            r"DPSATKeras wrapped in a keras LossScaleOptimizer is refused: "
            r"its dynamic loss scale skips a step and halves the scale "
            r"whenever any gradient of the batch overflows.*not be "
            r"differentially private. Compile with the DPSATKeras itself")):
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
            tf_dpsat.DPSATKeras(noise_multiplier=1.0)), loss=XENT)


def _float32_and_float16(seed=0):
    """The small private CNN under float32 and mixed_float16, same weights."""
    models = {}
    for policy in ("float32", "mixed_float16"):
        models[policy] = _cnn(policy, seed=seed, private=True)
        models[policy].compile(
            optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0), loss=XENT)
    models["mixed_float16"].set_weights(models["float32"].get_weights())
    return models


def _sum_gap(a: _Clipped, b: _Clipped) -> float:
    a, b = (_flat([s.numpy() for s in c.summed]) for c in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("engine", ["fast", "vectorized"])
def test_float16_gradients_are_unscaled_before_clipping(engine):
    # Golden: the float32 clipped sum of the same weights and batch. With
    # S = 2^15 the float16 backward pass carries 2^15 times the gradient;
    # unscaled in float32 before the norms, the norms and the clipped sum
    # match float32 to float16 rounding: 2^-11 relative per operation, a
    # few layers deep, so within 8 units (2^-8). Forgetting to unscale
    # would be 2^15 times off, unscaling twice 2^-15 times. C = 3.5 lies
    # among the norms (between 2 and 6), so some units are clipped, some
    # not.
    models = _float32_and_float16()
    x, y = _data(n=8, seed=1)
    reference = _clipped_sum(models["float32"], x, y, [1.0] * 8, 3.5, engine)
    scaled = _clipped_sum(models["mixed_float16"], x, y, [1.0] * 8, 3.5,
                          engine, loss_scale=2.0**15)
    norms = reference.norms.numpy()
    assert np.any(norms < 3.5) and np.any(norms > 3.5)
    assert float(scaled.nonfinite) == 0
    np.testing.assert_allclose(scaled.norms.numpy(), norms, rtol=2.0**-9)
    assert _sum_gap(scaled, reference) < 2.0**-8


@pytest.mark.parametrize("engine", ["fast", "vectorized"])
def test_float16_overflowing_example_is_dropped(engine):
    # With S = 2^15, weight 4 on the last example scales its loss gradient
    # at the logits to 4 * 2^15 * (p - onehot): at initialisation the true
    # class has probability near 1/10, so the entry of the true class is
    # about -1.2e5, beyond float16's largest value 65504, and the float16
    # backward pass of that example is infinite. The example alone is
    # dropped (its norm is not finite), so sensitivity stays <= C; the sum
    # of the other seven is finite and equals the sum with the example's
    # weight 0 (a NaN leaking from inf * 0 would make it NaN).
    model = _cnn("mixed_float16", private=True)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    x, y = _data(n=8, seed=1)
    overflow = _clipped_sum(model, x, y, [1.0] * 7 + [4.0], 0.5, engine,
                            loss_scale=2.0**15)
    without = _clipped_sum(model, x, y, [1.0] * 7 + [0.0], 0.5, engine,
                           loss_scale=2.0**15)
    assert float(overflow.nonfinite) == 1
    assert not np.isfinite(overflow.norms.numpy()[-1])
    assert np.all(np.isfinite(overflow.norms.numpy()[:-1]))
    summed = _flat([s.numpy() for s in overflow.summed])
    assert np.all(np.isfinite(summed))
    np.testing.assert_allclose(summed,
                               _flat([s.numpy() for s in without.summed]),
                               rtol=1e-6, atol=0)
    # Weight 2 stays finite (about -5.9e4 at the logits): kept, not dropped.
    kept = _clipped_sum(model, x, y, [1.0] * 7 + [2.0], 0.5, engine,
                        loss_scale=2.0**15)
    assert float(kept.nonfinite) == 0


@pytest.mark.slow
def test_default_loss_scale_keeps_small_gradients():
    # Sample weights 2^-16 scale every gradient down: the Dense layer's
    # deltas (about 0.1 unweighted) fall to ~1.5e-6, below float16's
    # smallest normal number 2^-14 (6.1e-5), where its spacing 2^-24
    # (6e-8) is a few percent of them, and smaller deltas flush to zero.
    # The optimizer's default S = 2^5 lifts the largest back to where that
    # spacing is ~0.1%: its clipped sum (no unit is clipped at these norms)
    # matches float32 to float16 rounding (2^-8, as in the unscaled test
    # above), while S = 1 misses by more than 2^-6.
    models = _float32_and_float16()
    x, y = _data(n=8, seed=1)
    weights = tf.constant([2.0**-16] * 8)
    batch = per_example.Batch.from_keras(tf.constant(x), tf.constant(y),
                                         weights)

    def summed(model, optimizer):
        model._symbolic_build(data_batch=(tf.constant(x), tf.constant(y),
                                          weights))
        variables = model.trainable_variables
        params = [tf.convert_to_tensor(v) for v in variables]
        @tf.function
        def step():
            result = optimizer._clipped_sum(model, variables, params, batch)
            return result.summed, result.nonfinite

        result, nonfinite = step()
        assert float(nonfinite) == 0
        return _flat([s.numpy() for s in result])

    model = models["mixed_float16"]
    reference = summed(models["float32"], models["float32"].optimizer)
    default = summed(model, model.optimizer)
    unscaled = summed(model, tf_dpsat.DPSATKeras(noise_multiplier=1.0,
                                                 loss_scale=1.0))
    gap = lambda a: np.linalg.norm(a - reference) / np.linalg.norm(reference)
    assert gap(default) < 2.0**-8
    assert gap(unscaled) > 2.0**-6


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
@pytest.mark.parametrize("policy, loss_scale, low, high", [
    ("mixed_bfloat16", 1.0, 2.0**-16, 2.0**-4),
    ("mixed_float16", 2.0**5, 2.0**-16, 2.0**-7)])
def test_every_rule_family_runs_in_mixed_precision(policy, loss_scale, low,
                                                   high):
    # The same weights and batch under both policies: the mixed clipped
    # sum differs from the float32 one by the compute dtype's rounding
    # (2^-8 relative per operation for bfloat16, 2^-11 for float16, a few
    # layers deep), not more; and by more than float32 rounding, which
    # shows that the layers did compute in the policy's dtype. The
    # vectorized engine differentiates Keras's own passes: the engines
    # agree to that rounding, and the fast engine's forward pass is
    # Keras's, bit for bit.
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 12, (8, 6)).astype("int32")
    y = rng.integers(0, 10, 8)
    sums = {}
    for p in ("float32", policy):
        model = _layers_model(p)
        model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                      loss=XENT)
        if p == "float32":
            weights = model.get_weights()
        model.set_weights(weights)
        result = _clipped_sum(model, ids, y, [1.0] * 8, 0.1, "fast",
                              loss_scale if p == policy else 1.0)
        assert result.engine == "fast"
        sums[p] = _flat([s.numpy() for s in result.summed])
    np.testing.assert_array_equal(result.y_pred.numpy(),
                                  model(ids, training=True).numpy())
    vectorized = _clipped_sum(model, ids, y, [1.0] * 8, 0.1, "vectorized",
                              loss_scale)
    sums["vectorized"] = _flat([s.numpy() for s in vectorized.summed])

    def gap(a, b):
        return np.linalg.norm(sums[a] - sums[b]) / np.linalg.norm(sums[b])

    assert low < gap(policy, "float32") < high
    assert gap(policy, "vectorized") < high / 4
