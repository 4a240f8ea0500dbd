"""The optimizer's noise key is secret: never saved, serialized or derivable.

An attacker who can recompute a step's noise from a released checkpoint
subtracts it from the released update and recovers the un-noised clipped sum
(tf_dpsat.optimizer: the noise of a step is a function of (key, iterations,
query, replica)). These tests check that no saved file and no config holds the
key, that a loaded optimizer draws fresh noise, and that `set_noise_key` is the
only way to continue a noise stream.
"""

import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# One noisy step on one batch: sigma C / B = 2 * 0.5 / 16 = 1/16 per weight.
SIGMA, CLIP, BATCH = 2.0, 0.5, 16
# A key that the tests set, and whose encodings they look for in saved files.
KEY = 0x1234_5678_9ABC_DEF1


def dense_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(40),
                             keras.layers.Dense(3)])


def batch():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(BATCH, 6)).astype("float32"),
            rng.integers(0, 3, size=BATCH))


def private_model(**opt_kwargs):
    opt_kwargs = dict(dict(learning_rate=1.0, momentum=0.0, rho=0.0,
                           l2_norm_clip=CLIP, noise_multiplier=SIGMA,
                           expected_batch_size=BATCH), **opt_kwargs)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(**opt_kwargs), loss=XENT)
    return model


def fit_steps(model, steps=1):
    x, y = batch()
    model.fit(np.tile(x, (steps, 1)), np.tile(y, steps), batch_size=BATCH,
              epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def key_encodings(key):
    """The byte strings that would betray `key` in a file."""
    return [key.to_bytes(8, "little"), key.to_bytes(8, "big"),
            str(key).encode(), f"{key:x}".encode(), f"{key:X}".encode()]


def assert_key_absent(blob: bytes, key: int, where: str):
    for encoding in key_encodings(key):
        assert encoding not in blob, f"{where} holds the noise key ({encoding!r})"


def test_noise_key_is_in_no_saved_file_nor_config(tmp_path):
    model = private_model()
    model.optimizer.set_noise_key(KEY)
    fit_steps(model)
    optimizer = model.optimizer
    assert optimizer.get_config()["seed"] is None
    assert_key_absent(repr(optimizer.get_config()).encode(), KEY, "get_config()")
    assert all(int(np.ravel(v.numpy())[0]) != KEY for v in optimizer.variables
               if v.dtype == "int64")

    keras_path = tmp_path / "m.keras"
    model.save(keras_path)
    with zipfile.ZipFile(keras_path) as archive:  # members may be compressed
        for name in archive.namelist():
            assert_key_absent(archive.read(name), KEY, f"m.keras:{name}")
    assert_key_absent(keras_path.read_bytes(), KEY, "m.keras")

    weights_path = tmp_path / "m.weights.h5"
    model.save_weights(weights_path)
    assert_key_absent(weights_path.read_bytes(), KEY, "m.weights.h5")
    values = []
    with h5py.File(weights_path) as f:
        f.visititems(lambda name, item: values.append(item[()])
                     if isinstance(item, h5py.Dataset) else None)
    assert values and not any(np.any(np.asarray(v) == KEY) for v in values)

    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).write(
        str(tmp_path / "ckpt" / "c"))
    listed = tf.train.list_variables(prefix)
    assert listed
    for name, _ in listed:
        assert "noise" not in name.lower(), name
        value = tf.train.load_variable(prefix, name)
        if np.issubdtype(np.asarray(value).dtype, np.integer):
            assert not np.any(np.asarray(value) == KEY), name
    for path in (tmp_path / "ckpt").iterdir():
        assert_key_absent(path.read_bytes(), KEY, path.name)


@pytest.mark.slow
def test_unseeded_optimizers_draw_fresh_noise_and_set_noise_key_aligns_them():
    clean = flat(fit_steps(private_model(noise_multiplier=0.0)))
    a, b = (flat(fit_steps(private_model())) for _ in range(2))
    # Each update carries noise of std sigma C / B = 1/16 per weight.
    assert 0.8 < np.std(a - clean) * BATCH / (SIGMA * CLIP) < 1.2
    assert np.std(a - b) > 0.05  # two fresh keys: independent noise
    aligned = []
    for _ in range(2):
        model = private_model()
        model.optimizer.set_noise_key(KEY)
        aligned.append(flat(fit_steps(model)))
    np.testing.assert_array_equal(*aligned)
    seeded = flat(fit_steps(private_model(seed=KEY)))
    np.testing.assert_array_equal(aligned[0], seeded)  # the seed is the key


@pytest.mark.slow
def test_set_noise_key_takes_effect_after_tracing():
    def run(first_key, second_key):
        model = private_model()
        model.optimizer.set_noise_key(first_key)
        fit_steps(model)  # traces the step with the first key
        model.optimizer.set_noise_key(second_key)
        return flat(fit_steps(model))

    switched, again, kept = run(1, 2), run(1, 2), run(1, 1)
    np.testing.assert_array_equal(switched, again)
    assert np.std(switched - kept) > 0.05


@pytest.mark.parametrize("key, error", [(-1, ValueError), (2**63, ValueError),
                                        (1.0, TypeError), (True, TypeError),
                                        ("7", TypeError)])
def test_set_noise_key_validates_without_echoing_the_key(key, error):
    optimizer = tf_dpsat.DPSATKeras(noise_multiplier=1.0)
    with pytest.raises(error, match=r"noise key") as info:
        optimizer.set_noise_key(key)
    assert str(2**63 - 1) not in str(info.value)


@pytest.mark.slow
def test_loaded_model_trains_on_with_fresh_noise_unless_seeded(tmp_path):
    for seed in (None, 9):
        original = private_model(seed=seed)
        fit_steps(original)
        path = tmp_path / f"m{seed}.keras"
        original.save(path)
        loaded = keras.models.load_model(path)
        continued, resumed = flat(fit_steps(original)), flat(fit_steps(loaded))
        if seed is None:
            assert np.std(continued - resumed) > 0.05
        else:
            np.testing.assert_array_equal(continued, resumed)


def test_saved_file_alone_does_not_reproduce_the_noise(tmp_path):
    # The attack: from a released checkpoint after step 1, rerun step 1 from
    # the public initial weights with the optimizer as loaded (everything the
    # file holds, the key too if it held one), on the same batch, and subtract.
    # Same noise: the residual is float rounding (~1e-7) and the released
    # update minus the replay's clean part is the noise, so the clipped sum is
    # recovered. Fresh noise: residual = (Z - Z') / B, std sqrt(2) sigma C / B.
    initial = [v.numpy() for v in private_model().trainable_variables]
    victim = private_model()
    released = flat(fit_steps(victim))
    path = tmp_path / "released.keras"
    victim.save(path)

    attacker = keras.models.load_model(path)
    for variable, value in zip(attacker.trainable_variables, initial):
        variable.assign(value)
    attacker.optimizer.iterations.assign(0)
    replay = flat(fit_steps(attacker))
    residual = (released - replay) * BATCH / (SIGMA * CLIP)
    # Std 1 per weight (units of sigma C / B), sqrt(2) for the difference of
    # two independent draws; 283 weights put the sample std within 0.12.
    assert 1.2 < np.std(residual) < 1.65, np.std(residual)


@pytest.mark.slow
def test_mirrored_strategy_keeps_the_key_secret_and_settable(
        mirrored_strategy, tmp_path):
    results = []
    for _ in range(2):
        with mirrored_strategy.scope():
            model = private_model()
        model.optimizer.set_noise_key(KEY)
        results.append(flat(fit_steps(model, steps=2)))
    np.testing.assert_array_equal(*results)
    with mirrored_strategy.scope():
        fresh = private_model()
    assert np.std(flat(fit_steps(fresh, steps=2)) - results[0]) > 0.05
    prefix = tf.train.Checkpoint(optimizer=model.optimizer).write(
        str(tmp_path / "c"))
    assert not any("noise" in name.lower()
                   for name, _ in tf.train.list_variables(prefix))
    model.save(tmp_path / "m.keras")
    assert_key_absent((tmp_path / "m.keras").read_bytes(), KEY, "m.keras")


def _built_optimizer(**kwargs):
    model = tf_dpsat.make_private(keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(2)]))
    optimizer = tf_dpsat.DPSATKeras(noise_multiplier=1.0, **kwargs)
    optimizer.build(model.trainable_variables)
    return optimizer


def test_legacy_state_with_a_saved_key_loads_without_it():
    # tf_dpsat 0.1 saved `noise_seed` just before `step_budget`. Its file
    # must restore iterations and every slot, and leave the key alone.
    optimizer = _built_optimizer(momentum=0.9, rho=0.05)
    values = [np.full(tuple(v.shape), 10 + i, dtype=v.dtype)
              for i, v in enumerate(optimizer.variables)]
    legacy = optimizer.variables.index(optimizer._step_budget)
    stored = values[:legacy] + [np.array(123456789, np.int64)] + values[legacy:]
    optimizer.load_own_variables({str(i): v for i, v in enumerate(stored)})
    for variable, value in zip(optimizer.variables, values):
        np.testing.assert_array_equal(np.asarray(variable.numpy()), value)
    assert int(optimizer.iterations.numpy()) == 10


def test_state_of_another_setup_is_refused_not_skipped():
    # Keras alone would warn, load nothing and restart iterations at 0.
    saved = _built_optimizer(momentum=0.9, rho=0.05)
    other = _built_optimizer(momentum=0.0, rho=0.0)
    store = {str(i): v.numpy() for i, v in enumerate(saved.variables)}
    with pytest.raises(ValueError, match="restart `iterations`"):
        other.load_own_variables(store)


def test_state_off_by_one_variable_is_not_taken_for_a_legacy_file():
    # One trainable variable: momentum adds exactly one slot, so a state
    # saved with momentum has one variable more than one without. Its extra
    # entry is a slot (shape (3, 1)), not a scalar key: refused, never
    # loaded shifted.
    def built(momentum):
        model = tf_dpsat.make_private(keras.Sequential([
            keras.Input((3,)), keras.layers.Dense(1, use_bias=False)]))
        optimizer = tf_dpsat.DPSATKeras(noise_multiplier=1.0, rho=0.0,
                                        momentum=momentum)
        optimizer.build(model.trainable_variables)
        return optimizer

    saved, other = built(0.9), built(0.0)
    assert len(saved.variables) == len(other.variables) + 1
    store = {str(i): v.numpy() for i, v in enumerate(saved.variables)}
    with pytest.raises(ValueError, match="restart `iterations`"):
        other.load_own_variables(store)
