"""Moving `iterations` back in one process never reuses released noise.

A step's noise is a function of (key, iterations), so that a run resumed in a
new process replays bitwise (tests/test_noise_key.py). In one process a
restore to an earlier step (`tf.train.Checkpoint.restore`, `load_weights`,
assigning `iterations`) would otherwise draw the same noise again on the next
batches: two releases with the same noise differ by a noise-free amount. The
steps moved back over also stay released: the step budget and
`PrivacyCallback` count them (`released_steps`). A restore part-way through
an accumulated step drops the running sum of the step it interrupted.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# One noisy step on one batch adds N(0, (sigma C / B)^2) = N(0, (1/16)^2) per
# weight (learning rate 1, no momentum).
SIGMA, CLIP, BATCH = 2.0, 0.5, 16
KEY = 0x0FED_CBA9_8765_4321
RESTORES = ("checkpoint", "load_weights", "assign")


def private_model(**opt_kwargs):
    keras.utils.set_random_seed(0)
    model = tf_dpsat.make_private(keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(40), keras.layers.Dense(3)]))
    opt_kwargs = dict(dict(learning_rate=1.0, momentum=0.0, rho=0.0,
                           l2_norm_clip=CLIP, noise_multiplier=SIGMA,
                           expected_batch_size=BATCH, seed=KEY), **opt_kwargs)
    model.compile(optimizer=tf_dpsat.DPSATKeras(**opt_kwargs), loss=XENT)
    model.optimizer.build(model.trainable_variables)
    return model


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6)).astype("float32"),
            rng.integers(0, 3, size=n))


def fit(model, x, y, **kwargs):
    # A dataset, not arrays: a DP model's fit refuses arrays when a
    # PrivacyCallback accounts for Poisson batches.
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
              epochs=1, verbose=0, **kwargs)
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


class Snapshot:
    """Saves a model's state one way and restores it the same way."""

    def __init__(self, model, how, tmp_path):
        self.model, self.how = model, how
        if how == "checkpoint":
            self.checkpoint = tf.train.Checkpoint(model=model,
                                                  optimizer=model.optimizer)
            self.path = self.checkpoint.write(str(tmp_path / "ckpt"))
        elif how == "load_weights":
            self.path = tmp_path / "state.weights.h5"
            model.save_weights(self.path)
        else:  # Every saved variable, assigned back by hand.
            self.weights = model.get_weights()
            self.slots = [v.numpy() for v in model.optimizer.variables]

    def restore(self):
        if self.how == "checkpoint":
            self.checkpoint.read(self.path).assert_consumed()
        elif self.how == "load_weights":
            self.model.load_weights(self.path)
        else:
            self.model.set_weights(self.weights)
            for variable, value in zip(self.model.optimizer.variables,
                                       self.slots):
                variable.assign(value)


@pytest.mark.parametrize("how", RESTORES)
def test_a_step_after_moving_back_draws_fresh_noise(how, tmp_path):
    # Step 2 on the same batch from the same weights, before and after a
    # restore to step 1: the clean parts are equal, so the difference of the
    # two updates is the difference of their noises. The same noise again
    # would make it 0 (what a replay of the key gave before); fresh noise
    # makes it N(0, 2) per weight in units of sigma C / B.
    x, y = rows(BATCH)
    model = private_model()
    fit(model, x, y)
    snapshot = Snapshot(model, how, tmp_path)
    first = fit(model, x, y)
    snapshot.restore()
    assert int(model.optimizer.iterations.numpy()) == 1
    assert model.optimizer.released_steps == 2
    second = fit(model, x, y)
    residual = (first - second) * BATCH / (SIGMA * CLIP)
    # 403 weights: the sample std of N(0, 2) is sqrt(2) = 1.414 within
    # sqrt(2) / sqrt(2 * 403) = 0.05 (1 sd); [1.2, 1.65] is over 4 sd.
    assert 1.2 < np.std(residual) < 1.65, np.std(residual)
    assert int(model.optimizer.iterations.numpy()) == 2
    # Steps released: 1, 2, then 2 again after moving back to 1.
    assert model.optimizer.released_steps == 3


def test_moving_back_twice_draws_a_third_noise(tmp_path):
    x, y = rows(BATCH)
    model = private_model()
    fit(model, x, y)
    snapshot = Snapshot(model, "checkpoint", tmp_path)
    updates = []
    for _ in range(3):
        updates.append(fit(model, x, y))
        snapshot.restore()
    # Each pair of the three differs by two independent noises (see above).
    for a, b in ((0, 1), (0, 2), (1, 2)):
        residual = (updates[a] - updates[b]) * BATCH / (SIGMA * CLIP)
        assert 1.2 < np.std(residual) < 1.65, (a, b, np.std(residual))
    assert model.optimizer.released_steps == 4


def test_a_new_optimizer_restored_from_a_checkpoint_replays_bitwise(tmp_path):
    # Resuming in a new process (here: a new model and optimizer) starts at
    # generation 0: the same key continues the same noise stream.
    x, y = rows(2 * BATCH)
    straight = private_model()
    fit(straight, x[:BATCH], y[:BATCH])
    tf.train.Checkpoint(model=straight, optimizer=straight.optimizer).write(
        str(tmp_path / "ckpt"))
    expected = fit(straight, x[BATCH:], y[BATCH:])
    resumed = private_model()
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(
        str(tmp_path / "ckpt")).assert_consumed()
    np.testing.assert_array_equal(fit(resumed, x[BATCH:], y[BATCH:]),
                                  expected)
    assert resumed.optimizer.released_steps == 2


def test_steps_moved_back_over_count_against_the_budget_and_epsilon(tmp_path):
    # Budget 3 steps. Two steps, back to step 0, two more batches: the first
    # is released step 3, the second is refused (weights and iterations
    # unchanged), and epsilon counts 3 steps, not iterations = 1.
    x, y = rows(2 * BATCH)
    model = private_model()
    snapshot = Snapshot(model, "checkpoint", tmp_path)
    callback = tf_dpsat.PrivacyCallback(num_examples=1000, delta=1e-5,
                                        sampling="poisson")
    fit(model, x, y, callbacks=[callback])
    assert callback.epsilon == callback.epsilon_at(2)
    snapshot.restore()
    model.optimizer.set_step_budget(3)
    fit(model, x[:BATCH], y[:BATCH])
    after_one = [v.numpy() for v in model.trainable_variables]
    fit(model, x[BATCH:], y[BATCH:], callbacks=[callback])
    for variable, value in zip(model.trainable_variables, after_one):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert int(model.optimizer.iterations.numpy()) == 1
    assert model.optimizer.released_steps == 3
    assert callback.epsilon == callback.epsilon_at(3) > callback.epsilon_at(1)


@pytest.mark.parametrize("how", RESTORES)
def test_a_restore_part_way_through_a_step_drops_its_running_sum(how, tmp_path):
    # Two physical batches per logical step, no noise (the comparison is then
    # exact up to float rounding). Batches 1-2 make step 1, batch 3 starts
    # step 2; a restore to step 0 and batches 4-5 must make one step from
    # batches 4-5 alone, as a model restored afresh does. Without the drop,
    # batch 4 would end a step made of batches 3 and 4.
    kwargs = dict(noise_multiplier=0.0, momentum=0.9,
                  gradient_accumulation_steps=2, expected_batch_size=2 * BATCH)
    x, y = rows(5 * BATCH)
    model = private_model(**kwargs)
    snapshot = Snapshot(model, how, tmp_path)
    fit(model, x[:3 * BATCH], y[:3 * BATCH])
    assert int(model.optimizer._accumulation.step.numpy()) == 1
    snapshot.restore()
    got = fit(model, x[3 * BATCH:], y[3 * BATCH:])

    reference = private_model(**kwargs)  # At step 0, like the snapshot.
    expected = fit(reference, x[3 * BATCH:], y[3 * BATCH:])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == 1


@pytest.mark.slow
def test_moving_back_under_mirrored_strategy_draws_fresh_noise(
        mirrored_strategy, tmp_path):
    x, y = rows(BATCH)
    with mirrored_strategy.scope():
        model = private_model()
    fit(model, x, y)
    snapshot = Snapshot(model, "checkpoint", tmp_path)
    first = fit(model, x, y)
    snapshot.restore()
    second = fit(model, x, y)
    residual = (first - second) * BATCH / (SIGMA * CLIP)
    assert 1.2 < np.std(residual) < 1.65, np.std(residual)
    assert model.optimizer.released_steps == 3
