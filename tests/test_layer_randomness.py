"""The draws of stochastic layers (Dropout, ...) in the DP step are secret.

Poisson batches list the sampled examples in index order, so removing one
moves every later example onto another row's dropout mask; masks that an
adversary can recompute from the public Keras seed state then let the
clipped sum move by far more than C (`tf_dpsat.per_example.Seeds`). The DP
step keys the masks by the optimizer's secret noise key.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat
from tf_dpsat import noise
from tf_dpsat import per_example
from tf_dpsat.per_example import batch as batch_lib

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
pytestmark = pytest.mark.filterwarnings("ignore:.*NOT differentially private")

# Keras's TensorFlow backend reads each seed word modulo 2^31 - 2.
KERAS_SEED_MODULUS = 2**31 - 2

class _UnseededDropout(keras.layers.Layer):
    """Draws from Keras's global seed generator (a keras.random op, no seed)."""

    def call(self, x, training=False):
        return keras.random.dropout(x, 0.5) if training else x


STOCHASTIC_LAYERS = {
    "dropout": lambda: keras.layers.Dropout(0.5),
    "gaussian_noise": lambda: keras.layers.GaussianNoise(0.5),
    "gaussian_dropout": lambda: keras.layers.GaussianDropout(0.5),
    "unseeded_op": _UnseededDropout,
}


def _model(stochastic=None):
    """Dense -> [a stochastic layer] -> Dense, from a public Keras seed."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(16, activation="tanh")]
    if stochastic is not None:
        layers.append(STOCHASTIC_LAYERS[stochastic]())
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _data(n=8):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 6)).astype("float32") * 3
    return x, rng.integers(0, 3, n)


def _generators(model):
    return [g for layer in model._flatten_layers()
            for g in getattr(layer, "_seed_generators", [])]


def _flat(tensors):
    return np.concatenate([np.asarray(t).ravel() for t in tensors])


def _compiled(stochastic, **kwargs):
    model = tf_dpsat.make_private(_model(stochastic))
    kwargs.setdefault("noise_multiplier", 0.0)
    opt = tf_dpsat.DPSATKeras(learning_rate=1.0, momentum=0.0, rho=0.0,
                              l2_norm_clip=1.0, batch_slices=1, **kwargs)
    model.compile(optimizer=opt, loss=XENT)
    return model, opt


def test_seeds_are_keyed_distinct_and_leave_the_public_state_alone():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dropout(0.5, seed=5),
        keras.layers.Dropout(0.5, seed=5), keras.layers.GaussianNoise(1.0)])
    key_a = tf.constant([1, 2], tf.int64)
    a = batch_lib.Seeds.of(model, key_a)
    again = batch_lib.Seeds.of(model, key_a)
    b = batch_lib.Seeds.of(model, tf.constant([1, 3], tf.int64))
    public = batch_lib.Seeds.of(model)
    # The model's three generators, then Keras's global one.
    assert len(a.generators) == 4 and a.owned == 3
    assert all(g is h for g, h in zip(a.generators, _generators(model)))
    bases = lambda seeds: [tuple(t.numpy()) for t in seeds.bases]
    assert bases(a) == bases(again)
    # The same public state (two Dropout(seed=5)) gets distinct seeds; a
    # one-bit change of the key changes every seed.
    assert len(set(bases(a))) == 4
    assert not set(bases(a)) & set(bases(b))
    assert not set(bases(a)) & set(bases(public))
    # 100 units: distinct seeds below the modulus, which Keras thus reads
    # unchanged.
    for generator in range(4):
        seeds = {tuple(a.mapping(u)[generator][1].numpy()) for u in range(100)}
        assert len(seeds) == 100
        assert all(0 <= w < KERAS_SEED_MODULUS for s in seeds for w in s)
    # The next call's states are the model's public ones advanced: no key
    # in them.
    for seeds in (a, b, public):
        advanced = seeds.advanced()
        assert len(advanced) == 3
        assert all(v is g.state for (v, _), g in zip(advanced, a.generators))
        for state, (_, value) in zip(seeds.values, advanced):
            np.testing.assert_array_equal(value.numpy(),
                                          state.numpy() + [0, 1])
    with pytest.raises(ValueError, match=r"Expected a seed of shape \[2\]"):
        batch_lib.Seeds.of(model, tf.constant([1, 2, 3], tf.int64))


@pytest.mark.parametrize("stochastic", sorted(STOCHASTIC_LAYERS))
@pytest.mark.parametrize("engine", ["fast", "vectorized"])
def test_layer_draws_follow_the_secret_seed(stochastic, engine):
    # The same public generator states before each call: the same secret
    # gives the same clipped sum bitwise, another secret (or none) another.
    model = tf_dpsat.make_private(_model(stochastic))
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    x, y = _data()
    model._symbolic_build(data_batch=(tf.constant(x), tf.constant(y)))
    variables = model.trainable_variables
    params = [tf.convert_to_tensor(v) for v in variables]
    batch = per_example.Batch.from_keras(tf.constant(x), tf.constant(y), None)
    states = [g.state.numpy() for g in _generators(model)]

    def summed(secret):
        for g, s in zip(_generators(model), states):
            g.state.assign(s)
        seed = None if secret is None else tf.constant(secret, tf.int64)
        return _flat(per_example.clipped_sum(
            model, variables, params, batch, l2_norm_clip=1.0, engine=engine,
            batch_slices=1, secret_seed=seed).summed)

    first, again, other, public = (summed([7, 1]), summed([7, 1]),
                                   summed([7, 2]), summed(None))
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(first - other)) > 1e-3
    assert np.max(np.abs(first - public)) > 1e-3


@pytest.mark.parametrize("clipping, chunk_units", [
    ("fast", None), ("vectorized", None), ("fast", 3), ("vectorized", 3)])
@pytest.mark.slow
def test_dp_step_masks_follow_the_optimizer_key(clipping, chunk_units):
    # A public Keras seed (set_random_seed) and no noise: the optimizers'
    # secret keys change the step through the dropout masks alone.
    x, y = _data()

    def step(stochastic, seed):
        model, _ = _compiled(stochastic, seed=seed, clipping=clipping,
                             chunk_units=chunk_units)
        model.train_on_batch(x, y)
        return (_flat(model.trainable_variables),
                [g.state.numpy() for g in _generators(model)])

    (one, one_states), (again, _), (two, two_states) = (
        step("dropout", 1), step("dropout", 1), step("dropout", 2))
    np.testing.assert_array_equal(one, again)  # `seed=` reproduces the step
    assert np.max(np.abs(one - two)) > 1e-3
    # The key never reaches the generators' (saved, public) states.
    np.testing.assert_array_equal(one_states, two_states)
    plain_one, _ = step(None, 1)
    plain_two, _ = step(None, 2)
    np.testing.assert_array_equal(plain_one, plain_two)


@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
@pytest.mark.slow
def test_public_seed_state_does_not_reproduce_the_step(clipping):
    # The reviewer's attacker: noise off, so the update releases the clipped
    # sum, w1 = w0 - sum / B (learning rate 1, B = 8 units). The attacker
    # knows w0, the batch and the generators' states before the step, and
    # recomputes the clipped sum from them. With the optimizer's key the
    # recomputation matches (the comparison is faithful); from the public
    # states alone it does not.
    x, y = _data()
    model, opt = _compiled("dropout", seed=1, clipping=clipping)
    model._symbolic_build(data_batch=(tf.constant(x), tf.constant(y)))
    variables = model.trainable_variables
    w0 = [tf.constant(v.numpy()) for v in variables]
    states = [g.state.numpy() for g in _generators(model)]
    key = opt._layer_seed(0)  # iterations = 0: this step's key
    model.train_on_batch(x, y)
    released = (_flat(w0) - _flat(variables)) * len(y)

    def recomputed(secret):
        for g, s in zip(_generators(model), states):
            g.state.assign(s)
        batch = per_example.Batch.from_keras(tf.constant(x), tf.constant(y),
                                             None)
        return _flat(per_example.clipped_sum(
            model, variables, w0, batch, l2_norm_clip=1.0, engine=clipping,
            batch_slices=1, secret_seed=secret).summed)

    np.testing.assert_allclose(recomputed(key), released, atol=1e-5)
    assert np.max(np.abs(recomputed(None) - released)) > 1e-2


def test_layer_seeds_are_fresh_per_step_query_and_batch():
    # Keys of the layers' draws: one per (step, query, accumulated batch),
    # none equal to a noise seed, all a function of the optimizer's key.
    def keys(seed):
        out = []
        for accumulation in (1, 2):
            model = tf_dpsat.make_private(_model())
            opt = tf_dpsat.DPSATKeras(
                noise_multiplier=1.0, seed=seed,
                gradient_accumulation_steps=accumulation)
            opt.build(model.trainable_variables)
            for iterations in (0, 1):
                opt.iterations.assign(iterations)
                for accumulated in range(accumulation):
                    if accumulation > 1:
                        opt._accumulation.started_at.assign(iterations)
                        opt._accumulation.step.assign(accumulated)
                    out += [tuple(opt._layer_seed(q).numpy()) for q in (0, 1)]
                if accumulation == 1:  # The noise: the same for both.
                    out += [tuple(noise.stream_seed(
                        *opt._noise_stream(q)).numpy()) for q in (0, 1)]
        return out

    one, again, two = keys(1), keys(1), keys(2)
    assert one == again
    # 4 noise seeds and 4 + 8 layer keys (no accumulation, 2 batches).
    assert len(set(one)) == len(one) == 16
    assert not set(one) & set(two)


def test_layer_seeds_differ_between_replicas(mirrored_strategy):
    # Each replica clips rows of its own: their masks must not repeat.
    with mirrored_strategy.scope():
        opt = tf_dpsat.DPSATKeras(noise_multiplier=1.0, seed=1)
    keys = mirrored_strategy.run(tf.function(lambda: opt._layer_seed(0)))
    keys = [tuple(t.numpy()) for t in
            mirrored_strategy.experimental_local_results(keys)]
    assert len(keys) == 2 and keys[0] != keys[1]


@pytest.mark.slow
def test_mirrored_dp_step_masks_follow_the_optimizer_key(mirrored_strategy):
    x, y = _data()

    def step(seed):
        with mirrored_strategy.scope():
            model, _ = _compiled("dropout", seed=seed)
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        return _flat(model.trainable_variables)

    one, again, two = step(1), step(1), step(2)
    np.testing.assert_array_equal(one, again)
    assert np.max(np.abs(one - two)) > 1e-3
