"""Tests for tf_dpsat.callbacks.PrivacyCallback with the real DP optimizers."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat
from tf_dpsat import accounting
from tf_dpsat.callbacks import PrivacyCallback

NUM_EXAMPLES, BATCH = 64, 16  # q = 1/4, 4 steps per epoch.
SIGMA = 1.0
pytestmark = pytest.mark.filterwarnings("ignore:.*NOT differentially private")


def _optimizer(cls=tf_dpsat.DPSATKeras, **kwargs):
    kwargs = {"learning_rate": 0.1, "momentum": 0.0, "noise_multiplier": SIGMA,
              "l2_norm_clip": 1.0, "expected_batch_size": BATCH, "seed": 0,
              **kwargs}
    return cls(**kwargs)


def _budget(optimizer):
    return int(optimizer._step_budget.numpy())


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, 3)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _model(optimizer=None):
    model = tf_dpsat.DPSequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer or _optimizer(), loss="mse")
    return model


def _batches(batch_size=BATCH):
    # A dataset: a DP model's fit refuses arrays with Poisson accounting (the
    # batches here stand in for sampled ones; epsilon depends on the steps).
    return tf.data.Dataset.from_tensor_slices(_data()).batch(batch_size)


def _fit(model, callback, epochs):
    # One iterator over every epoch (steps_per_epoch), as a Poisson dataset
    # needs: a DP model's fit refuses to iterate a finite dataset anew.
    return model.fit(_batches().repeat(), epochs=epochs,
                     steps_per_epoch=NUM_EXAMPLES // BATCH, verbose=0,
                     callbacks=[callback])


def _iterations(model):
    return int(keras.ops.convert_to_tensor(model.optimizer.iterations))


def _poisson_epsilon(steps, sigma=SIGMA, queries_per_step=1):
    return accounting.compute_epsilon(
        noise_multiplier=sigma, sampling_probability=BATCH / NUM_EXAMPLES,
        steps=steps, queries_per_step=queries_per_step)


def test_epsilon_logged_every_epoch():
    model, callback = _model(), PrivacyCallback(NUM_EXAMPLES)
    history = _fit(model, callback, epochs=3)
    expected = [_poisson_epsilon(4 * (epoch + 1)) for epoch in range(3)]
    np.testing.assert_allclose(history.history["epsilon"], expected, rtol=1e-12)
    assert callback.epsilon == expected[-1]
    assert callback.epsilon_at(12) == expected[-1]
    assert callback.max_steps is None and _budget(model.optimizer) == -1


def test_shuffle_sampling_counts_passes_over_the_data():
    model = _model()
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle")
    history = _fit(model, callback, epochs=2)
    expected = [accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=SIGMA, epochs=epoch) for epoch in (1, 2)]
    np.testing.assert_allclose(history.history["epsilon"], expected, rtol=1e-12)
    assert callback.epsilon_at(5) == expected[1]  # A started pass counts.


def test_shuffle_sampling_uses_replace_one_sensitivity_2c():
    # Fixed-size batches: replace-one adjacency, sensitivity 2C, so 5 steps
    # (2 started passes of 4 steps) cost two unsubsampled Gaussians at sigma/2
    # whether or not microbatches (of 4 examples) already double it.
    expected = accounting.compute_epsilon(
        noise_multiplier=SIGMA / 2, sampling_probability=1.0, steps=2)
    # Microbatches take no expected_batch_size: the batch comes from the
    # callback.
    for optimizer in (_optimizer(), _optimizer(num_microbatches=4,
                                               expected_batch_size=None)):
        callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle",
                                   batch_size=BATCH)
        callback.set_model(_model(optimizer))
        assert callback.epsilon_at(5) == pytest.approx(expected, rel=1e-12)


def test_stops_exactly_at_budget_and_refuses_to_resume(caplog):
    budget = 6
    # A target between epsilon(6) and epsilon(7) allows exactly 6 steps.
    target = (_poisson_epsilon(budget) + _poisson_epsilon(budget + 1)) / 2
    model = _model()
    callback = PrivacyCallback(NUM_EXAMPLES, target_epsilon=target)
    with caplog.at_level(logging.WARNING, logger="absl"):
        history = _fit(model, callback, epochs=5)
    assert callback.max_steps == budget == _budget(model.optimizer)
    assert _iterations(model) == budget
    assert len(history.history["epsilon"]) == 2  # Stopped in the second epoch.
    assert history.history["epsilon"][-1] == _poisson_epsilon(budget) <= target
    stops = [r for r in caplog.records if "Privacy budget reached" in r.message]
    assert len(stops) == 1 and "after 6 noisy steps" in stops[0].message

    # Keras runs one batch before it checks stop_training; the budget makes
    # the optimizer refuse it: no weight changes, no step is counted.
    weights = [w.numpy().copy() for w in model.weights]
    history = _fit(model, callback, epochs=5)
    assert model.stop_training
    assert _iterations(model) == budget
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert history.history["epsilon"] == [_poisson_epsilon(budget)]


def test_shuffle_budget_is_whole_passes():
    target = accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=SIGMA, epochs=3) + 1e-9
    callback = PrivacyCallback(NUM_EXAMPLES, target_epsilon=target,
                               sampling="shuffle")
    model = _model()
    _fit(model, callback, epochs=5)
    assert callback.max_steps == 3 * (NUM_EXAMPLES // BATCH)
    assert _iterations(model) == callback.max_steps


def test_epsilon_continues_after_save_and_load(tmp_path):
    model = _model()
    _fit(model, PrivacyCallback(NUM_EXAMPLES), epochs=2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, tf_dpsat.DPSequential)
    assert isinstance(restored.optimizer, tf_dpsat.DPSATKeras)
    assert _iterations(restored) == 8
    callback = PrivacyCallback(NUM_EXAMPLES)
    history = _fit(restored, callback, epochs=1)
    assert history.history["epsilon"] == [_poisson_epsilon(12)]


def test_epsilon_is_cached(monkeypatch):
    calls = []
    original = accounting.compute_epsilon

    def counting(**kwargs):
        calls.append(kwargs["steps"])
        return original(**kwargs)

    monkeypatch.setattr(accounting, "compute_epsilon", counting)
    callback = PrivacyCallback(NUM_EXAMPLES)
    callback.set_model(_model())
    first = callback.epsilon_at(40)
    assert callback.epsilon_at(40) == first and calls == [40]
    assert callback.epsilon_at(0) == 0.0


def test_queries_per_step():
    optimizer = _optimizer(tf_dpsat.DPSAMKeras)
    callback = PrivacyCallback(NUM_EXAMPLES)
    callback.set_model(_model(optimizer))
    # Two queries on each Poisson batch: one subsampled Gaussian at
    # sigma / sqrt(2) per step.
    assert callback.epsilon_at(10) == pytest.approx(
        _poisson_epsilon(10, queries_per_step=2), rel=1e-12)
    assert callback.epsilon_at(10) == pytest.approx(
        _poisson_epsilon(10, sigma=SIGMA / np.sqrt(2)), rel=1e-12)


def _assert_refused_before_any_step(optimizer, callback, match):
    model = _model(optimizer)
    model.build((None, 3))
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=match):
        _fit(model, callback, epochs=1)
    assert _iterations(model) == 0
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("num_microbatches", [4, BATCH])
def test_poisson_sampling_refuses_microbatches(num_microbatches):
    # Microbatches are cut from a batch by position: with Poisson batches,
    # removing one example shifts every later row into another microbatch
    # (sensitivity up to num_microbatches * C). The optimizer alone accepts
    # them without expected_batch_size (fixed-size batches); the callback
    # knows the sampling and refuses, naming the fixes.
    optimizer = _optimizer(num_microbatches=num_microbatches,
                           expected_batch_size=None)
    callback = PrivacyCallback(NUM_EXAMPLES, batch_size=BATCH)
    _assert_refused_before_any_step(
        optimizer, callback,
        rf"num_microbatches={num_microbatches}\).*num_microbatches=None.*"
        r"sampling='shuffle'")
    with pytest.raises(ValueError, match="num_microbatches"):
        callback.epsilon_at(1)
    # Fixed-size batches (replace-one, 2C) take them.
    shuffled = PrivacyCallback(NUM_EXAMPLES, batch_size=BATCH,
                               sampling="shuffle")
    shuffled.set_model(_model(_optimizer(num_microbatches=num_microbatches,
                                         expected_batch_size=None)))
    # 4 steps are one pass over the data: one unsubsampled Gaussian at 2C.
    assert shuffled.epsilon_at(4) == accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=SIGMA, epochs=1)


def test_poisson_sampling_refuses_optimizer_without_expected_batch_size():
    # Without expected_batch_size the optimizer divides by each batch's row
    # count, data-dependent for unpadded Poisson batches; a batch_size given
    # to the callback does not change what the optimizer divides by.
    callback = PrivacyCallback(NUM_EXAMPLES, batch_size=BATCH,
                               target_epsilon=10.0)
    _assert_refused_before_any_step(
        _optimizer(expected_batch_size=None), callback,
        r"needs DPSATKeras\(expected_batch_size=\.\.\.\), got None.*Set "
        r"expected_batch_size to the expected \(logical\) batch size")


def test_batch_size_from_callback_overrides_optimizer():
    callback = PrivacyCallback(NUM_EXAMPLES, batch_size=32)
    callback.set_model(_model())
    assert callback.epsilon_at(5) == accounting.compute_epsilon(
        noise_multiplier=SIGMA, sampling_probability=0.5, steps=5)


def test_missing_batch_size_is_explained():
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle")
    callback.set_model(_model(_optimizer(expected_batch_size=None)))
    with pytest.raises(ValueError, match="expected_batch_size"):
        callback.epsilon_at(1)


def test_non_dp_optimizer_is_rejected():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    with pytest.raises(TypeError, match="noise_multiplier"):
        _fit(model, PrivacyCallback(NUM_EXAMPLES), epochs=1)


def test_unattached_callback_is_rejected():
    with pytest.raises(RuntimeError, match="not attached"):
        PrivacyCallback(NUM_EXAMPLES).epsilon_at(1)


def test_uncompiled_model_is_rejected():
    callback = PrivacyCallback(NUM_EXAMPLES)
    callback.set_model(keras.Sequential([keras.Input((3,)),
                                         keras.layers.Dense(1)]))
    with pytest.raises(RuntimeError, match="compiled"):
        callback.epsilon_at(1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_examples=0), "num_examples=0"),
    (dict(delta=0.0), "Expected delta=0.0 > 0."),
    (dict(target_epsilon=0.0), "Expected target_epsilon=0.0 > 0."),
    (dict(target_epsilon=-1.0), "target_epsilon=-1.0"),
    (dict(sampling="uniform"), "sampling='uniform'"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=NUM_EXAMPLES + 1), "batch_size=65"),
])
def test_rejects_bad_arguments(kwargs, message):
    args = dict(num_examples=NUM_EXAMPLES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        PrivacyCallback(**args)


class _Batches(keras.utils.PyDataset):
    """The batches of `_batches()` as a keras PyDataset."""

    def __init__(self):
        super().__init__()
        self.x, self.y = _data()

    def __len__(self):
        return NUM_EXAMPLES // BATCH

    def __getitem__(self, index):
        rows = slice(index * BATCH, (index + 1) * BATCH)
        return self.x[rows], self.y[rows]


def _generator():
    x, y = _data()
    while True:
        for start in range(0, NUM_EXAMPLES, BATCH):
            yield x[start:start + BATCH], y[start:start + BATCH]


@pytest.mark.parametrize("inputs", ["arrays", "tensors", "generator", "pydataset"])
@pytest.mark.parametrize("positional", [False, True])
def test_poisson_sampling_refuses_inputs_that_keras_batches_itself(inputs, positional):
    # Keras cuts arrays, tensors, generators and PyDatasets into fixed-size
    # batches (arrays shuffled every epoch), not Poisson samples: epsilon
    # from the Poisson analysis would be too small, so the DP model's fit
    # refuses them before any step, naming both fixes.
    x, y = _data()
    fit_args = {"arrays": (x, y), "tensors": (tf.constant(x), tf.constant(y)),
                "generator": (_generator(), None), "pydataset": (_Batches(), None)}
    model = _model()
    model.build((None, 3))
    before = [w.numpy().copy() for w in model.weights]
    callback = PrivacyCallback(NUM_EXAMPLES)
    kwargs = {"steps_per_epoch": 4} if inputs == "generator" else {}
    batch_size = BATCH if inputs in ("arrays", "tensors") else None
    with pytest.raises(ValueError, match=(
            r"PrivacyCallback\(sampling='poisson'\) accounts for Poisson-sampled "
            r"batches, but fit got x as a \w+, .*poisson_dataset\(\.\.\.\), or "
            r"account for shuffled fixed-size batches with PrivacyCallback\("
            r"num_examples, sampling='shuffle', batch_size=\.\.\.\)\.")):
        if positional:  # fit(x, y, batch_size, epochs, verbose, callbacks)
            model.fit(*fit_args[inputs], batch_size, 1, 0, [callback], **kwargs)
        else:
            model.fit(*fit_args[inputs], batch_size=batch_size, epochs=1,
                      verbose=0, callbacks=[callback], **kwargs)
    assert _iterations(model) == 0
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_poisson_sampling_refuses_a_dataset_iterated_anew_every_epoch():
    # A Poisson dataset is keyed by (key, step): iterated anew, it yields
    # the same batches again, which fresh Poisson steps would undercount.
    # Keras iterates a finite dataset anew every epoch unless
    # steps_per_epoch is given, so the DP model's fit refuses before a step.
    x, y = _data()
    batches = tf_dpsat.sampling.poisson_dataset(
        x, y, expected_batch_size=BATCH, steps=4, padded_size=NUM_EXAMPLES,
        seed=0)
    model = _model()
    with pytest.raises(ValueError, match=(
            r"fit\(epochs=2\) without steps_per_epoch iterates the dataset "
            r"anew every epoch.*pass fit\(steps_per_epoch=\.\.\.\)")):
        model.fit(batches, epochs=2, verbose=0,
                  callbacks=[PrivacyCallback(NUM_EXAMPLES)])
    assert _iterations(model) == 0
    # One epoch, or one iterator over the run's 2 x 2 steps: 4 steps,
    # epsilon of 4 Poisson steps at q = 1/4.
    model.fit(batches, epochs=1, verbose=0,
              callbacks=[PrivacyCallback(NUM_EXAMPLES)])
    assert _iterations(model) == 4
    model = _model()
    history = model.fit(batches, epochs=2, steps_per_epoch=2, verbose=0,
                        callbacks=[PrivacyCallback(NUM_EXAMPLES)])
    assert _iterations(model) == 4
    assert history.history["epsilon"][-1] == pytest.approx(_poisson_epsilon(4))


def test_arrays_train_with_shuffle_sampling_or_without_a_callback():
    # Only the Poisson analysis needs sampled batches: Keras's own batches
    # are the fixed-size batches of the shuffle analysis. 2 epochs of 4
    # steps are 2 passes over the data.
    x, y = _data()
    model = _model()
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle")
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                        callbacks=[callback])
    assert history.history["epsilon"][-1] == (
        accounting.compute_epsilon_once_per_epoch(noise_multiplier=SIGMA, epochs=2))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert _iterations(model) == 12


def test_shuffle_sampling_refuses_epochs_shorter_than_a_pass():
    # validation_split=0.5 trains on 32 of the 64 examples: 2 steps of 16
    # per epoch, one pass over those 32. Counting a pass every 64 // 16 = 4
    # steps would report 3 epochs (6 steps) as ceil(6 / 4) = 2 passes
    # instead of 3, so the callback refuses before any step.
    x, y = _data()
    model = _model()
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle")
    with pytest.raises(ValueError, match=(
            r"counts a pass over the num_examples=64 examples every 4 logical "
            r"steps \(num_examples // batch_size\), but a Keras epoch has 2 "
            r"batches\..*Pass num_examples= the examples one epoch trains on")):
        model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0,
                  validation_split=0.5, callbacks=[callback])
    assert _iterations(model) == 0
    # The examples trained on, int(64 * (1 - 0.5)) = 32: a pass is 2 steps,
    # and the 3 epochs are 3 passes.
    callback = PrivacyCallback(32, sampling="shuffle", batch_size=BATCH)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0,
                        validation_split=0.5, callbacks=[callback])
    assert _iterations(model) == 6
    np.testing.assert_allclose(history.history["epsilon"], [
        accounting.compute_epsilon_once_per_epoch(noise_multiplier=SIGMA, epochs=e)
        for e in (1, 2, 3)], rtol=1e-12)


def test_shuffle_sampling_counts_logical_steps_per_epoch_under_accumulation():
    # Two physical batches of 8 rows per logical step of 16: a pass over the
    # 64 examples is 4 logical steps, 8 Keras batches. An epoch of 4 Keras
    # batches (the first 32 examples) is 2 logical steps, half a pass.
    optimizer = _optimizer(gradient_accumulation_steps=2, expected_batch_size=None)
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle", batch_size=BATCH)
    with pytest.raises(ValueError, match=(
            r"but a Keras epoch has 4 batches \(2 batches per logical step\)")):
        _model(optimizer).fit(_batches(BATCH // 2).take(4), epochs=2, verbose=0,
                              callbacks=[callback])
    model = _model(_optimizer(gradient_accumulation_steps=2,
                              expected_batch_size=None))
    history = model.fit(_batches(BATCH // 2), epochs=2, verbose=0,
                        callbacks=[callback])
    assert _iterations(model) == 8
    assert history.history["epsilon"] == [
        accounting.compute_epsilon_once_per_epoch(noise_multiplier=SIGMA, epochs=e)
        for e in (1, 2)]


def test_shuffle_sampling_checks_epochs_of_unknown_length_when_they_end():
    # filter() hides the dataset's length from Keras: the first epoch runs
    # until the 32 examples run out (2 steps, half a pass over 64), then
    # the callback refuses to go on; the epsilon of that one pass stands.
    x, y = _data()
    half = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(BATCH)
    unknown = half.filter(lambda x, y: True)
    assert unknown.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model = _model()
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle")
    with pytest.raises(ValueError, match=r"but this epoch ended after 2 logical steps"):
        model.fit(unknown, epochs=3, verbose=0, callbacks=[callback])
    assert _iterations(model) == 2
    assert callback.epsilon == accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=SIGMA, epochs=1)
    # Whole passes of unknown length train on.
    whole = _batches().filter(lambda x, y: True)
    callback = PrivacyCallback(NUM_EXAMPLES, sampling="shuffle")
    model.fit(whole, epochs=2, verbose=0, callbacks=[callback])
    assert _iterations(model) == 10
    assert callback.epsilon == accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=SIGMA, epochs=3)
