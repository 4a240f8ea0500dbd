"""DPSATKeras / DPSAMKeras against hand-derived values and a reference loop."""

import contextlib
import io
import logging
import math
import os
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_reference
import graph_ops
import tf_dpsat
from tf_dpsat import per_example

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
pytestmark = pytest.mark.filterwarnings("ignore:.*NOT differentially private")


# ----------------------------------------------------------------- helpers

def dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(3),
    ])


def conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, activation="selu"),
        keras.layers.GroupNormalization(groups=2),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def embedding_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(20, 4),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3),
    ])


MODELS = {"dense": dense_model, "conv": conv_model, "embedding": embedding_model}


def make_data(kind, n=24, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "embedding":
        x = rng.integers(0, 20, size=(n, 5)).astype("int32")
    elif kind == "conv":
        x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    else:
        x = rng.normal(size=(n, 6)).astype("float32")
    # A few examples scaled up so that clipping binds on them only.
    if kind != "embedding":
        x[::3] *= 4.0
    y = rng.integers(0, 3, size=n)
    return x, y


def fit_private(build, x, y, *, batch_size=8, epochs=1, jit_compile=False,
                sample_weight=None, loss=XENT, **opt_kwargs):
    opt_kwargs.setdefault("learning_rate", 0.5)
    opt_kwargs.setdefault("momentum", 0.9)
    opt_kwargs.setdefault("noise_multiplier", 0.0)
    opt_kwargs.setdefault("seed", 1)
    cls = opt_kwargs.pop("cls", tf_dpsat.DPSATKeras)
    model = tf_dpsat.make_private(build())
    optimizer = cls(**opt_kwargs)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    history = model.fit(x, y, sample_weight=sample_weight, batch_size=batch_size,
                        epochs=epochs, shuffle=False, verbose=0)
    return model, optimizer, history


def batches_of(x, y, batch_size, sample_weight=None):
    if sample_weight is None:
        sample_weight = np.ones(len(y), np.float32)
    return [(x[i:i + batch_size], y[i:i + batch_size],
             sample_weight[i:i + batch_size])
            for i in range(0, len(y), batch_size)]


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(a, b))


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


# ------------------------------------------------------- golden one-step

def test_one_step_golden_values():
    # Linear model y = w * x, no bias, w0 = 1; loss (w x - y)^2 per example
    # (MeanSquaredError on one output). Batch x = (1, 2), y = (0, 0):
    #   g_1 = 2 * (1*1 - 0) * 1 = 2,  g_2 = 2 * (1*2 - 0) * 2 = 8.
    # C = 1: clipped g_1 = 2 / (2 + 1e-6), g_2 = 8 / (8 + 1e-6).
    # Step 1 (eps_1 = 0): g = (0.9999995 + 0.999999875) / 2 = 0.9999996875;
    #   lr 0.1, no momentum: w1 = 1 - 0.09999996875 = 0.90000003125.
    # Step 2: eps = rho * g / |g| = 0.1 -> gradients at w1 + 0.1 = 1.00000003:
    #   g_1 = 2.00000006 -> 0.9999995, g_2 = 8.00000025 -> 0.999999875;
    #   w2 = 0.90000003125 - 0.09999996875 = 0.8000000625.
    model = tf_dpsat.make_private(keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")]))
    opt = tf_dpsat.DPSATKeras(learning_rate=0.1, momentum=0.0, l2_norm_clip=1.0,
                              noise_multiplier=0.0, rho=0.1)
    model.compile(optimizer=opt, loss="mse")
    x = np.array([[1.0], [2.0]], np.float32)
    y = np.zeros((2, 1), np.float32)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert model.trainable_variables[0].numpy()[0, 0] == pytest.approx(
        0.90000003125, abs=1e-7)
    # The slot keeps g_1 before momentum.
    assert opt._directions[0].numpy()[0, 0] == pytest.approx(0.9999996875,
                                                              abs=1e-7)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert model.trainable_variables[0].numpy()[0, 0] == pytest.approx(
        0.8000000625, abs=1e-6)
    assert int(opt.iterations.numpy()) == 2


# ------------------------------------------------- reference comparisons

REFERENCE_CASES = {
    # name: (model, optimizer kwargs, reference kwargs)
    "dpsat": ({}, {}),
    "dpsgd": ({"rho": 0.0}, {"rho": 0.0}),
    "nesterov": ({"nesterov": True}, {"nesterov": True}),
    "microbatches": ({"num_microbatches": 4}, {"num_microbatches": 4}),
    "momentum_direction": ({"direction": "momentum", "rho": 0.1},
                           {"direction": "momentum", "rho": 0.1}),
    "dpsam": ({"cls": tf_dpsat.DPSAMKeras}, {"dpsam": True}),
    "expected_batch_size": ({"expected_batch_size": 10},
                            {"expected_batch_size": 10}),
}


# Every case on the conv model with both clipping paths; the dense and
# embedding models with "auto" (the fast path) and the cases that differ by
# model. tests/test_fast_clipping.py compares the two paths layer by layer.
REFERENCE_RUNS = sorted(
    [(case, "conv", clipping) for case in REFERENCE_CASES
     for clipping in ("auto", "vectorized")] +
    [(case, model, "auto") for case in REFERENCE_CASES
     if case not in ("nesterov", "expected_batch_size")
     for model in ("dense", "embedding")])


@pytest.mark.parametrize("case, model_name, clipping", REFERENCE_RUNS)
@pytest.mark.slow
def test_matches_reference(case, model_name, clipping):
    build = MODELS[model_name]
    x, y = make_data(model_name)
    opt_kwargs, ref_kwargs = REFERENCE_CASES[case]
    clip = dp_reference.median_norm(build(), x[:8], y[:8], XENT,
                                    ref_kwargs.get("num_microbatches"))
    common = dict(learning_rate=0.5, momentum=0.9, l2_norm_clip=clip)
    opt_kwargs = {"rho": 0.05, "clipping": clipping, **common, **opt_kwargs}
    ref_kwargs = {"rho": 0.05, **common, **ref_kwargs}
    model, opt, _ = fit_private(build, x, y, **opt_kwargs)

    reference = build()
    expected, clipped = dp_reference.train(
        reference, batches_of(x, y, 8), loss_fn=XENT, **ref_kwargs)
    assert max_diff(weights(model), expected) < 1e-5
    assert int(opt.iterations.numpy()) == 3
    # The test is only meaningful if clipping binds on some units, not all.
    units = 8 if "num_microbatches" not in ref_kwargs else 4
    assert 0 < sum(clipped) < 3 * units, clipped


def test_reference_with_regularizers_and_weight_decay():
    # Kernel regularizer: data-independent, added after clipping, unclipped.
    # Activity regularizer: data-dependent, part of each example's loss.
    def build():
        keras.utils.set_random_seed(3)
        return keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh",
                               kernel_regularizer=keras.regularizers.L2(0.05),
                               activity_regularizer=keras.regularizers.L2(0.02)),
            keras.layers.Dense(3),
        ])

    x, y = make_data("dense")
    kwargs = dict(learning_rate=0.5, momentum=0.9, l2_norm_clip=0.5, rho=0.05,
                  weight_decay=0.01)
    model, _, history = fit_private(build, x, y, **kwargs)

    reference = build()
    kernel = reference.layers[0].kernel

    def activity(m, xu):  # Keras divides the activity loss by the batch size.
        h = m.layers[0](xu)
        return 0.02 * tf.reduce_sum(tf.square(h)) / tf.cast(tf.shape(xu)[0],
                                                            tf.float32)

    def regularization_grad(w):  # d/dW 0.05 * ||W||^2 = 0.1 * W, kernel only.
        return [0.1 * t if i == 0 else np.zeros_like(t)
                for i, t in enumerate(w)]

    del kernel
    expected, _ = dp_reference.train(
        reference, batches_of(x, y, 8), loss_fn=XENT, extra_loss_fn=activity,
        regularization_grad_fn=regularization_grad, **kwargs)
    assert max_diff(weights(model), expected) < 1e-5
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size",
                                       "mean_with_sample_weight"])
@pytest.mark.slow
def test_any_loss_reduction_gives_per_example_losses(reduction):
    # For one example all three reductions give that example's loss (times
    # its weight), so the DP step must match the reference with the
    # default-reduction loss in every case.
    x, y = make_data("dense")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction=reduction)
    model, _, _ = fit_private(dense_model, x, y, l2_norm_clip=0.5, rho=0.05,
                              loss=loss)
    expected, _ = dp_reference.train(
        dense_model(), batches_of(x, y, 8), loss_fn=XENT, learning_rate=0.5,
        momentum=0.9, l2_norm_clip=0.5, rho=0.05)
    assert max_diff(weights(model), expected) < 1e-5


def test_function_loss_and_string_loss():
    x, y = make_data("dense")

    def my_loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True)

    model, _, _ = fit_private(dense_model, x, y, l2_norm_clip=0.5, loss=my_loss)
    expected, _ = dp_reference.train(
        dense_model(), batches_of(x, y, 8), loss_fn=XENT, learning_rate=0.5,
        momentum=0.9, l2_norm_clip=0.5, rho=0.03)
    assert max_diff(weights(model), expected) < 1e-5


def _flat_loss(loss):
    """The loss object Keras's CompileLoss calls for `loss`."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    model.compile(loss=loss)
    model._compile_loss.build(tf.zeros([1]), tf.zeros([1, 3]))
    return model._compile_loss._flat_losses[0][1]


class _CallOverridden(keras.losses.SparseCategoricalCrossentropy):
    def call(self, y_true, y_pred):
        return super().call(y_true, y_pred) / tf.reduce_mean(y_pred ** 2)


def _coupled_loss(y_true, y_pred):
    # Cross-entropy over the mean squared logit of the batch it is given:
    # for a batch of one, a function of that example alone.
    xent = keras.losses.sparse_categorical_crossentropy(y_true, y_pred,
                                                        from_logits=True)
    return xent / tf.reduce_mean(tf.square(y_pred))


def test_row_wise_losses_are_only_keras_own():
    row_wise = [XENT, "sparse_categorical_crossentropy", "mse",
                keras.losses.Huber(), keras.losses.CategoricalCrossentropy(),
                keras.losses.BinaryCrossentropy(from_logits=True)]
    others = [keras.losses.SparseCategoricalCrossentropy(ignore_class=0),
              keras.losses.CategoricalCrossentropy(axis=0),
              keras.losses.Circle(), _coupled_loss, _CallOverridden()]
    from tf_dpsat.per_example import losses
    assert [losses.row_wise(_flat_loss(l)) for l in row_wise] == (
        [True] * len(row_wise))
    assert [losses.row_wise(_flat_loss(l)) for l in others] == (
        [False] * len(others))


@pytest.mark.parametrize("loss", [_coupled_loss, _CallOverridden()])
@pytest.mark.slow
def test_loss_coupling_examples_is_differentiated_per_example(loss):
    # Differentiating this loss over the batch would give each example a
    # gradient that depends on the others; the fast path must take it per
    # example, as the reference does.
    x, y = make_data("dense")
    model, _, _ = fit_private(dense_model, x, y, l2_norm_clip=0.5, rho=0.05,
                              loss=loss, clipping="fast")
    expected, _ = dp_reference.train(
        dense_model(), batches_of(x, y, 8), loss_fn=_flat_loss(loss),
        learning_rate=0.5, momentum=0.9, l2_norm_clip=0.5, rho=0.05)
    assert max_diff(weights(model), expected) < 1e-5


@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.slow
def test_reported_loss_is_the_compiled_loss(clipping, reduction):
    # rho = 0: the step's predictions are at the current weights, so the
    # loss it reports is Keras's compiled loss of the batch there.
    x, y = make_data("dense", n=12)
    sw = np.linspace(0.5, 1.5, 12).astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction=reduction)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        l2_norm_clip=0.5, noise_multiplier=0.0, rho=0.0, clipping=clipping),
        loss=loss)
    expected = float(loss(y, model(x), sample_weight=sw))
    logs = model.train_on_batch(x, y, sample_weight=sw, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("slices", [1, 2])
@pytest.mark.slow
def test_fast_step_evaluates_a_row_wise_loss_once(slices):
    x, y = make_data("dense", n=8)
    counts = {}
    for name, loss in (("keras", XENT), ("coupled", _coupled_loss)):
        model = tf_dpsat.make_private(dense_model())
        model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0,
                                                    batch_slices=slices),
                      loss=loss)
        ops = graph_ops.train_graph_ops(model, tf.constant(x), tf.constant(y))
        counts[name] = ops["SparseSoftmaxCrossEntropyWithLogits"]
    # Keras's loss: one evaluation per slice gives the reported loss and
    # every example's gradient. Any other: per example (in the vectorized
    # map) and again for the reported loss.
    assert counts["keras"] == slices
    assert counts["coupled"] >= slices + 1


# ------------------------------------------------------------ sample weights

@pytest.mark.slow
def test_zero_weight_examples_contribute_nothing():
    # Padding rows: weight 0 and garbage (even NaN) inputs. With
    # expected_batch_size fixed, training on the padded batches must equal
    # training on the real rows alone.
    x, y = make_data("dense", n=16)
    xp = np.concatenate([x[:8], np.full((4, 6), np.nan, np.float32),
                         x[8:], np.full((4, 6), 1e3, np.float32)])
    yp = np.concatenate([y[:8], [0] * 4, y[8:], [1] * 4])
    wp = np.concatenate([np.ones(8), np.zeros(4), np.ones(8), np.zeros(4)])
    kwargs = dict(l2_norm_clip=0.5, rho=0.05, expected_batch_size=8)
    padded, _, hist = fit_private(dense_model, xp, yp, batch_size=12,
                                  sample_weight=wp.astype("float32"), **kwargs)
    plain, _, _ = fit_private(dense_model, x, y, batch_size=8, **kwargs)
    assert max_diff(weights(padded), weights(plain)) < 1e-6
    assert hist.history["nonfinite_gradients"] == [0.0]


def test_sample_weights_scale_per_example_losses():
    x, y = make_data("dense")
    sw = np.linspace(0.0, 2.0, len(y)).astype("float32")
    model, _, _ = fit_private(dense_model, x, y, sample_weight=sw,
                              l2_norm_clip=0.5, rho=0.05)
    expected, _ = dp_reference.train(
        dense_model(), batches_of(x, y, 8, sw), loss_fn=XENT, learning_rate=0.5,
        momentum=0.9, l2_norm_clip=0.5, rho=0.05)
    assert max_diff(weights(model), expected) < 1e-5


@pytest.mark.slow
def test_nonfinite_example_is_dropped_and_counted():
    x, y = make_data("dense", n=8)
    x_bad = x.copy()
    x_bad[3] = np.inf
    kwargs = dict(l2_norm_clip=0.5, rho=0.05, expected_batch_size=8)
    model, _, hist = fit_private(dense_model, x_bad, y, **kwargs)
    assert hist.history["nonfinite_gradients"] == [1.0]
    assert all(np.all(np.isfinite(w)) for w in weights(model))
    # Same as a batch where that example has weight 0.
    w = np.ones(8, np.float32)
    w[3] = 0.0
    clean, _, _ = fit_private(dense_model, x, y, sample_weight=w, **kwargs)
    assert max_diff(weights(model), weights(clean)) < 1e-6


def _clip_fraction_model():
    """One dense weight w = 1, no bias, mse to 0: |g_i| = 2 x_i^2; C = 0.5."""
    model = tf_dpsat.make_private(keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")]))
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        learning_rate=0.0, momentum=0.0, l2_norm_clip=0.5, noise_multiplier=0.0),
        loss="mse")
    return model


def test_clipped_fraction_metric():
    # x = (0.1, 0.2, 1, 2): norms 0.02, 0.08, 2, 8 -> 2 of 4 above C = 0.5.
    model = _clip_fraction_model()
    x = np.array([[0.1], [0.2], [1.0], [2.0]], np.float32)
    hist = model.fit(x, np.zeros((4, 1)), batch_size=4, verbose=0)
    assert hist.history["grad_norm_clipped_fraction"] == [0.5]


@pytest.mark.parametrize("distributed", [False, True])
def test_clipped_fraction_resets_between_train_on_batch_calls(
        mirrored_strategy, distributed):
    # Batch a clips 2 of 4 (as above), batch b (x >= 1) all 4. Keras resets
    # the metrics on each train_on_batch call, so b reports 1.0 (6 / 8 = 0.75
    # if the DP totals carried over), then a 0.5, for a plain and for a
    # distributed metric variable.
    with mirrored_strategy.scope() if distributed else contextlib.nullcontext():
        model = _clip_fraction_model()
    a = np.array([[0.1], [0.2], [1.0], [2.0]], np.float32)
    b = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    fractions = [model.train_on_batch(x, np.zeros((4, 1)), return_dict=True)[
        "grad_norm_clipped_fraction"] for x in (a, b, a)]
    assert fractions == [0.5, 1.0, 0.5]
    # The metric's own reset, eagerly and traced, zeroes all three totals.
    stats = model._dp_stats
    for reset in (stats.reset_state, tf.function(stats.reset_state)):
        stats.update_state(1.0, 2.0, 3.0)
        reset()
        np.testing.assert_array_equal(stats.totals.numpy(), [0.0, 0.0, 0.0])


# ------------------------------------------------------------------- noise

# The noise tests: one step, lr 1, no momentum, rho 0, on a 100,100-weight
# model, so the update difference between sigma > 0 and sigma = 0 is exactly
# the noise / B, i.i.d. N(0, (sigma C / B)^2) over >= 1e5 coordinates. The
# sample std's relative standard error is 1/sqrt(2N) ~ 0.22%, so 3% is > 10
# standard errors; the mean's standard error is std / sqrt(N), so
# |mean| < 5 std / sqrt(N) fails with probability < 1e-6.
NOISE_SIGMA, NOISE_CLIP, NOISE_BATCH = 2.0, 0.3, 16


def wide_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((100,)), keras.layers.Dense(1000)])


def noise_data(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(NOISE_BATCH, 100)).astype("float32"),
            rng.normal(size=(NOISE_BATCH, 1000)).astype("float32"))


def assert_update_noise(noisy, clean):
    diff = np.concatenate([(a - b).ravel() for a, b in
                           zip(weights(noisy), weights(clean))])
    assert diff.size >= 100_000
    expected = NOISE_SIGMA * NOISE_CLIP / NOISE_BATCH
    assert abs(diff.std() / expected - 1) < 0.03
    assert abs(diff.mean()) < 5 * expected / math.sqrt(diff.size)


NOISE_STEP = dict(learning_rate=1.0, momentum=0.0, l2_norm_clip=NOISE_CLIP,
                  rho=0.0, loss="mse")


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.slow
def test_noise_statistics(jit_compile):
    x, y = noise_data(0)
    kwargs = dict(batch_size=NOISE_BATCH, **NOISE_STEP)
    noisy, _, _ = fit_private(wide_model, x, y, noise_multiplier=NOISE_SIGMA,
                              seed=7, jit_compile=jit_compile, **kwargs)
    clean, _, _ = fit_private(wide_model, x, y, noise_multiplier=0.0, **kwargs)
    assert_update_noise(noisy, clean)


def test_one_sampler_in_graph_mode_and_xla():
    # The same seed gives the same noise whether the step is compiled by XLA
    # or not (tf_dpsat.noise): the updates agree to float rounding, far
    # below the noise's own scale (sigma C / B = 2 * 0.3 / 16 = 0.0375).
    x, y = noise_data(1)
    kwargs = dict(batch_size=NOISE_BATCH, noise_multiplier=NOISE_SIGMA, seed=7,
                  **NOISE_STEP)
    graph, _, _ = fit_private(wide_model, x, y, jit_compile=False, **kwargs)
    xla, _, _ = fit_private(wide_model, x, y, jit_compile=True, **kwargs)
    assert max_diff(weights(graph), weights(xla)) < 1e-5


@pytest.mark.slow
def test_same_seed_is_bitwise_reproducible_and_none_is_fresh():
    x, y = make_data("conv", n=16)
    runs = [fit_private(conv_model, x, y, noise_multiplier=1.0, seed=s)[0]
            for s in (5, 5, None, None)]
    a, b, c, d = (weights(m) for m in runs)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(c, d))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


@pytest.mark.slow
def test_dataset_of_unknown_length_counts_only_real_steps():
    # Keras starts one more step function when a dataset of unknown length
    # runs out; that must neither count a step nor touch the weights.
    x, y = make_data("dense", n=32)
    results = []
    for unknown in (False, True):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        if unknown:
            ds = ds.filter(lambda *_: True)
        model = tf_dpsat.make_private(dense_model())
        opt = tf_dpsat.DPSATKeras(learning_rate=0.5, noise_multiplier=1.0,
                                  seed=3)
        model.compile(optimizer=opt, loss=XENT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Your input ran out of data"
            model.fit(ds, epochs=1, verbose=0)
        assert int(opt.iterations.numpy()) == 4
        results.append(weights(model))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- XLA, accumulation

@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
@pytest.mark.slow
def test_xla_matches_graph_mode(clipping):
    x, y = make_data("conv")
    graph, _, _ = fit_private(conv_model, x, y, l2_norm_clip=0.5,
                              jit_compile=False, clipping=clipping)
    xla, _, _ = fit_private(conv_model, x, y, l2_norm_clip=0.5,
                            jit_compile=True, clipping=clipping)
    assert max_diff(weights(graph), weights(xla)) < 1e-5


@pytest.mark.parametrize("cls_kwargs", [{}, {"direction": "momentum"}])
@pytest.mark.slow
def test_accumulation_equals_large_batch(cls_kwargs):
    # k = 3 physical batches of 4 make one logical step of 12; the
    # perturbation is computed once per logical step (the authors' code
    # re-applies it per physical batch and drifts).
    x, y = make_data("conv", n=36)
    kwargs = dict(l2_norm_clip=0.5, rho=0.1, **cls_kwargs)
    big, big_opt, _ = fit_private(conv_model, x, y, batch_size=12, **kwargs)
    acc, acc_opt, _ = fit_private(conv_model, x, y, batch_size=4,
                                  gradient_accumulation_steps=3, **kwargs)
    assert int(acc_opt.iterations.numpy()) == int(big_opt.iterations.numpy()) == 3
    assert max_diff(weights(big), weights(acc)) < 1e-5


@pytest.mark.slow
def test_accumulation_adds_noise_once_per_logical_step():
    # k = 2 physical batches of 8 must carry the noise of one step of 16
    # (std sigma C / B on the update), not sqrt(2) times more.
    x, y = noise_data(1)
    kwargs = dict(batch_size=NOISE_BATCH // 2, gradient_accumulation_steps=2,
                  expected_batch_size=NOISE_BATCH, **NOISE_STEP)
    noisy, _, _ = fit_private(wide_model, x, y, noise_multiplier=NOISE_SIGMA,
                              **kwargs)
    clean, _, _ = fit_private(wide_model, x, y, noise_multiplier=0.0, **kwargs)
    assert_update_noise(noisy, clean)


# ----------------------------------------------------------- tf.distribute

@pytest.mark.parametrize("clipping, chunk_units", [("fast", None),
                                                   ("vectorized", None),
                                                   ("fast", 3)])
@pytest.mark.slow
def test_mirrored_strategy_matches_one_device(mirrored_strategy, clipping,
                                              chunk_units, monkeypatch):
    # With chunk_units=3 each replica's 4 examples run as chunks of 3 and 1.
    x, y = make_data("conv")
    kwargs = dict(l2_norm_clip=0.5, rho=0.05, clipping=clipping,
                  chunk_units=chunk_units)
    single, _, _ = fit_private(conv_model, x, y, **kwargs)
    chunked = []
    in_chunks = per_example.engine._clipped_sum_in_chunks
    monkeypatch.setattr(per_example.engine, "_clipped_sum_in_chunks",
                        lambda model, batch, *args: chunked.append(
                            batch.units) or in_chunks(model, batch, *args))
    with mirrored_strategy.scope():
        model = tf_dpsat.make_private(conv_model())
        opt = tf_dpsat.DPSATKeras(learning_rate=0.5, momentum=0.9,
                                  noise_multiplier=0.0, seed=1, **kwargs)
        model.compile(optimizer=opt, loss=XENT)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert max_diff(weights(single), weights(model)) < 1e-5
    assert set(chunked) == ({4} if chunk_units else set())


def _mirrored_fit(strategy, x, y, *, batch_size, budget=None, **kwargs):
    with strategy.scope():
        model = tf_dpsat.make_private(conv_model())
        opt = tf_dpsat.DPSATKeras(learning_rate=0.5, momentum=0.9,
                                  noise_multiplier=0.0, seed=1, **kwargs)
        model.compile(optimizer=opt, loss=XENT)
    if budget is not None:
        opt.set_step_budget(budget)
    model.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0)
    return model, opt


@pytest.mark.slow
def test_mirrored_strategy_batches_without_a_step_change_nothing(
        mirrored_strategy):
    # Under tf.distribute the update runs on every physical batch and is
    # undone unless the batch ends a logical step within the budget: weights,
    # momentum, DP-SAT direction and iterations must then be as on one
    # device, where the update sits in a tf.cond.
    x, y = make_data("conv", n=36)
    kwargs = dict(l2_norm_clip=0.5, rho=0.1)
    big, big_opt, _ = fit_private(conv_model, x, y, batch_size=12, **kwargs)
    acc, acc_opt = _mirrored_fit(mirrored_strategy, x, y, batch_size=4,
                                 gradient_accumulation_steps=3, **kwargs)
    assert int(acc_opt.iterations.numpy()) == 3
    assert max_diff(weights(big), weights(acc)) < 1e-5
    assert max_diff([v.numpy() for v in big_opt.momentums],
                    [v.numpy() for v in acc_opt.momentums]) < 1e-5
    # A budget of 2 steps over 3 batches: the third batch changes nothing.
    two, _, _ = fit_private(conv_model, x[:16], y[:16], **kwargs)
    budgeted, opt = _mirrored_fit(mirrored_strategy, x[:24], y[:24],
                                  batch_size=8, budget=2, **kwargs)
    assert int(opt.iterations.numpy()) == 2
    assert max_diff(weights(two), weights(budgeted)) < 1e-5


@pytest.mark.slow
def test_mirrored_strategy_noise_scale(mirrored_strategy):
    # Each replica adds its share; the aggregated noise std is sigma C / B.
    x, y = noise_data(2)
    results = []
    for sigma in (NOISE_SIGMA, 0.0):
        with mirrored_strategy.scope():
            model = tf_dpsat.make_private(wide_model())
            opt_kwargs = {k: v for k, v in NOISE_STEP.items() if k != "loss"}
            model.compile(optimizer=tf_dpsat.DPSATKeras(
                noise_multiplier=sigma, seed=3, **opt_kwargs), loss="mse")
        model.fit(x, y, batch_size=NOISE_BATCH, verbose=0)
        results.append(model)
    assert_update_noise(*results)


# -------------------------------------------------------------- save/load

def test_config_round_trip_holds_every_argument():
    opt = tf_dpsat.DPSATKeras(
        learning_rate=0.3, momentum=0.5, nesterov=True, l2_norm_clip=0.7,
        noise_multiplier=1.3, rho=0.02, num_microbatches=4,
        gradient_accumulation_steps=2, seed=11,
        direction="momentum", clipping="vectorized", batch_slices=3,
        chunk_units=64, loss_scale=1024.0, weight_decay=0.001, name="dp")
    config = opt.get_config()
    for key, value in dict(learning_rate=0.3, momentum=0.5, nesterov=True,
                           l2_norm_clip=0.7, noise_multiplier=1.3, rho=0.02,
                           num_microbatches=4, expected_batch_size=None,
                           gradient_accumulation_steps=2, seed=11,
                           direction="momentum", clipping="vectorized",
                           batch_slices=3, chunk_units=64, loss_scale=1024.0,
                           weight_decay=0.001, name="dp").items():
        assert config[key] == pytest.approx(value) if isinstance(
            value, float) else config[key] == value, key
    clone = tf_dpsat.DPSATKeras.from_config(config)
    assert clone.get_config() == config
    sam = tf_dpsat.DPSAMKeras(noise_multiplier=1.0, rho=0.05)
    assert tf_dpsat.DPSAMKeras.from_config(sam.get_config()).queries_per_step == 2


@pytest.mark.slow
def test_save_load_resume_is_bitwise(tmp_path):
    x, y = make_data("conv", n=32)
    kwargs = dict(l2_norm_clip=0.5, rho=0.05, noise_multiplier=1.0, seed=9)

    straight, _, _ = fit_private(conv_model, x, y, epochs=2, **kwargs)

    first, opt, _ = fit_private(conv_model, x, y, epochs=1, **kwargs)
    path = str(tmp_path / "m.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tf_dpsat.DPFunctional)
    assert isinstance(loaded.optimizer, tf_dpsat.DPSATKeras)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(weights(straight), weights(loaded)):
        np.testing.assert_array_equal(a, b)


# Gradient accumulation and saving: k = 2 physical batches of 8 per step.
ACCUMULATION = dict(learning_rate=0.5, momentum=0.9, l2_norm_clip=0.5, rho=0.1,
                    noise_multiplier=1.0, seed=9, gradient_accumulation_steps=2)


def accumulating_model():
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(**ACCUMULATION), loss=XENT)
    return model


def fit_rows(model, x, y):
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


def saved_optimizer_state(source):
    """The optimizer's arrays in a .weights.h5 file (path or bytes), in order."""
    with h5py.File(io.BytesIO(source) if isinstance(source, bytes) else source,
                   "r") as f:
        saved = f["optimizer"]["vars"]
        return [saved[str(i)][()] for i in range(len(saved))]


@pytest.mark.slow
def test_state_saved_mid_step_holds_no_clipped_sum(tmp_path):
    # Three physical batches: one logical step, then half of the next. The
    # running sum then is the un-noised clipped sum of batch 3; no saved file
    # may hold it, in any format that reaches the optimizer.
    x, y = make_data("dense", n=24)
    model = fit_rows(accumulating_model(), x, y)
    optimizer = model.optimizer
    assert int(optimizer.iterations.numpy()) == 1
    running = [s.numpy() for s in optimizer._accumulation.sums]
    assert int(optimizer._accumulation.step.numpy()) == 1
    assert min(np.linalg.norm(s) for s in running) > 1e-3

    def holds_running_sum(arrays):
        return any(np.shape(a) == r.shape and np.allclose(a, r, atol=1e-6)
                   for a in arrays for r in running)

    # The saved state: iterations, learning rate, step budget, then one
    # momentum and one DP-SAT direction slot per variable (4 each): 11
    # arrays, those of optimizer.variables, and nothing more.
    expected = [v.numpy() for v in optimizer.variables]
    assert len(expected) == 3 + 4 + 4
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        in_keras = saved_optimizer_state(archive.read("model.weights.h5"))
    model.save_weights(tmp_path / "m.weights.h5")
    in_weights = saved_optimizer_state(str(tmp_path / "m.weights.h5"))
    for arrays in (in_keras, in_weights):
        assert len(arrays) == 11 and not holds_running_sum(arrays)
        for saved, value in zip(arrays, expected):
            np.testing.assert_array_equal(saved, value)
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer).write(
        str(tmp_path / "ckpt" / "c"))
    tf.saved_model.save(model, str(tmp_path / "saved_model"))
    for checkpoint in (prefix, str(tmp_path / "saved_model" / "variables" /
                                   "variables")):
        names = [n for n, _ in tf.train.list_variables(checkpoint)
                 if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
        assert not any("accumul" in n for n in names), names
        assert not holds_running_sum(
            [tf.train.load_variable(checkpoint, n) for n in names])


@pytest.mark.slow
def test_model_saved_mid_step_resumes_with_a_fresh_step(tmp_path):
    # Reference: step 1 on batches 1-2, step 2 on batches 4-5. A model saved
    # after batch 3 (half of a step) and restored must take the same step 2:
    # batch 3 was summed but never released, and the restored optimizer
    # starts a fresh logical step (same weights, slots, iterations and
    # seeded noise as the reference).
    x, y = make_data("dense", n=40)
    reference = fit_rows(fit_rows(accumulating_model(), x[:16], y[:16]),
                         x[24:], y[24:])
    interrupted = fit_rows(accumulating_model(), x[:24], y[:24])
    interrupted.save(tmp_path / "mid.keras")
    interrupted.save_weights(tmp_path / "mid.weights.h5")
    loaded = fit_rows(keras.models.load_model(tmp_path / "mid.keras"),
                      x[24:], y[24:])
    # load_weights into the very optimizer that holds batch 3's sum (as
    # keras.callbacks.BackupAndRestore does) drops it too.
    interrupted.load_weights(tmp_path / "mid.weights.h5")
    reloaded = fit_rows(interrupted, x[24:], y[24:])
    for model in (loaded, reloaded):
        assert int(model.optimizer.iterations.numpy()) == 2
        for a, b in zip(weights(reference), weights(model)):
            np.testing.assert_array_equal(a, b)
    # Batch 3 would have moved the step: the test can tell the difference.
    with_batch_3 = fit_rows(fit_rows(accumulating_model(), x[:24], y[:24]),
                            x[24:32], y[24:32])
    assert max_diff(weights(reference), weights(with_batch_3)) > 1e-3


@pytest.mark.slow
def test_model_saved_between_steps_resumes_bitwise(tmp_path):
    x, y = make_data("dense", n=32)
    straight = fit_rows(accumulating_model(), x, y)
    first = fit_rows(accumulating_model(), x[:16], y[:16])
    first.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for a, b in zip(first.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fit_rows(loaded, x[16:], y[16:])
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(weights(straight), weights(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("with_key", [False, True])
def test_legacy_state_with_a_running_sum_loads_without_it(with_key):
    # tf_dpsat 0.2.0 saved the running sum after every other variable: one
    # slot per trainable variable, the unit count and the physical step (and
    # 0.1 also a noise key before step_budget). The rest loads; the sum and
    # the key do not, and the optimizer starts a fresh logical step.
    model = tf_dpsat.make_private(dense_model())
    optimizer = tf_dpsat.DPSATKeras(**ACCUMULATION)
    optimizer.build(model.trainable_variables)
    acc = optimizer._accumulation
    for s in acc.sums:
        s.assign(np.full(s.shape, 5.0, np.float32))
    acc.step.assign(1)
    values = [np.full(tuple(v.shape), 10 + i, dtype=v.dtype)
              for i, v in enumerate(optimizer.variables)]
    stored = list(values)
    if with_key:
        at = optimizer.variables.index(optimizer._step_budget)
        stored.insert(at, np.array(123456789, np.int64))
    stored += [np.full(tuple(v.shape), 7.0, np.float32)
               for v in model.trainable_variables]
    stored += [np.array(16.0, np.float32), np.array(1, np.int64)]
    optimizer.load_own_variables({str(i): v for i, v in enumerate(stored)})
    for variable, value in zip(optimizer.variables, values):
        np.testing.assert_array_equal(np.asarray(variable.numpy()), value)
    assert all(not np.any(s.numpy()) for s in acc.sums)
    assert int(acc.step.numpy()) == 0 and float(acc.units.numpy()) == 0.0


@pytest.mark.slow
def test_weights_are_never_left_perturbed():
    # After fit the weights are w_T (the update of w_{T-1}), never
    # w_T + eps: evaluate/predict/save see what the reference computes.
    x, y = make_data("dense")
    model, _, _ = fit_private(dense_model, x, y, rho=0.5, l2_norm_clip=0.5)
    expected, _ = dp_reference.train(
        dense_model(), batches_of(x, y, 8), loss_fn=XENT, learning_rate=0.5,
        momentum=0.9, l2_norm_clip=0.5, rho=0.5)
    assert max_diff(weights(model), expected) < 1e-5
    reference = dense_model()
    for v, w in zip(reference.trainable_variables, expected):
        v.assign(w.astype(np.float32))
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               reference.predict(x, verbose=0), atol=1e-5)


# -------------------------------------------------------------- refusals

@pytest.mark.parametrize("kwargs, message", [
    ({"l2_norm_clip": 0.0}, "Expected l2_norm_clip=0.0 > 0."),
    ({"l2_norm_clip": -1.0}, "Expected l2_norm_clip=-1.0 > 0."),
    ({"l2_norm_clip": float("nan")}, "l2_norm_clip=nan to be finite"),
    ({"noise_multiplier": -0.5}, "Expected noise_multiplier=-0.5 >= 0."),
    ({"noise_multiplier": float("inf")}, "noise_multiplier=inf to be finite"),
    ({"rho": -0.1}, "Expected rho=-0.1 >= 0."),
    ({"num_microbatches": 0}, "Expected num_microbatches=0 >= 1."),
    ({"expected_batch_size": -4}, "Expected expected_batch_size=-4 >= 1."),
    ({"direction": "sideways"}, "direction"),
    ({"clipping": "ghostly"}, "clipping"),
    ({"batch_slices": 0}, "Expected batch_slices=0 >= 1."),
    ({"chunk_units": 0}, "Expected chunk_units=0 >= 1."),
    ({"clipnorm": 1.0}, "clipnorm=1.0"),
    ({"clipvalue": 1.0}, "clipvalue=1.0"),
    ({"global_clipnorm": 1.0}, "global_clipnorm=1.0"),
    ({"loss_scale": 0.0}, "Expected loss_scale=0.0 > 0."),
    ({"loss_scale": float("inf")}, "loss_scale=inf to be finite"),
    ({"loss_scale_factor": 128.0}, "does not accept loss_scale_factor=128.0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    kwargs = {"noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message.replace(".", r"\.")
                       .replace("(", r"\(")):
        tf_dpsat.DPSATKeras(**kwargs)


def test_noise_multiplier_is_required():
    with pytest.raises(TypeError, match="noise_multiplier"):
        tf_dpsat.DPSATKeras(learning_rate=0.1)


def test_dpsam_refusals():
    with pytest.raises(ValueError, match="rho=0"):
        tf_dpsat.DPSAMKeras(noise_multiplier=1.0, rho=0.0)
    with pytest.raises(ValueError, match="accumulation"):
        tf_dpsat.DPSAMKeras(noise_multiplier=1.0, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="direction"):
        tf_dpsat.DPSAMKeras(noise_multiplier=1.0, direction="momentum")


def _assert_refused_without_weight_change(model, x, y, error, match):
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(error, match=match):
        model.fit(x, y, batch_size=8, verbose=0)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_plain_model_with_dp_optimizer_is_refused():
    x, y = make_data("dense", n=8)
    model = dense_model()
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    _assert_refused_without_weight_change(model, x, y, TypeError,
                                          "make_private")


def test_dp_model_with_plain_optimizer_is_refused():
    x, y = make_data("dense", n=8)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=keras.optimizers.SGD(), loss=XENT)
    _assert_refused_without_weight_change(model, x, y, TypeError,
                                          "DPSATKeras")


def test_dp_optimizer_in_loss_scale_optimizer_is_refused():
    # Keras's dynamic loss scaling skips a step when any gradient of the
    # batch overflows: an un-noised decision on the whole batch. Set on the
    # model after compile, it is refused before any weight changes.
    x, y = make_data("dense", n=8)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    model.optimizer = keras.optimizers.LossScaleOptimizer(model.optimizer)
    _assert_refused_without_weight_change(
        model, x, y, ValueError,
        r"DPSATKeras wrapped in a keras LossScaleOptimizer is refused: its "
        r"dynamic loss scale.*not be differentially private")


def test_nested_batch_normalization_is_refused():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization()])
    outer = keras.Sequential([keras.Input((6,)), inner, keras.layers.Dense(3)])
    model = tf_dpsat.make_private(outer)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0),
                  loss=XENT)
    x, y = make_data("dense", n=8)
    _assert_refused_without_weight_change(model, x, y, ValueError,
                                          "GroupNormalization")


def test_microbatches_must_divide_the_batch():
    x, y = make_data("dense", n=8)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0,
                                                num_microbatches=3), loss=XENT)
    _assert_refused_without_weight_change(model, x, y, ValueError,
                                          "num_microbatches=3 does not divide")


def test_make_private_refuses_subclassed_models():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(TypeError, match="Subclass tf_dpsat.DPModel"):
        tf_dpsat.make_private(Net())


def test_subclassed_dp_model_trains_privately():
    class Net(tf_dpsat.DPModel):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(5, activation="tanh")
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    x, y = make_data("dense")
    keras.utils.set_random_seed(0)
    model = Net()
    model(x[:1])
    reference = dense_model()
    for v, w in zip(reference.trainable_variables, model.trainable_variables):
        v.assign(w)
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        learning_rate=0.5, momentum=0.9, l2_norm_clip=0.5, noise_multiplier=0.0,
        rho=0.05), loss=XENT)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    expected, _ = dp_reference.train(
        reference, batches_of(x, y, 8), loss_fn=XENT, learning_rate=0.5,
        momentum=0.9, l2_norm_clip=0.5, rho=0.05)
    assert max_diff(weights(model), expected) < 1e-5


def test_dp_sequential_and_make_private_share_weights():
    base = dense_model()
    private = tf_dpsat.make_private(base)
    assert private.trainable_variables[0] is base.trainable_variables[0]
    seq = tf_dpsat.DPSequential([keras.Input((6,)), keras.layers.Dense(3)])
    seq.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=0.5), loss=XENT)
    x, y = make_data("dense", n=8)
    hist = seq.fit(x, y, batch_size=8, verbose=0)
    assert set(hist.history) == {"loss", "grad_norm_clipped_fraction",
                                 "nonfinite_gradients"}
    assert "grad_norm_clipped_fraction" not in seq.evaluate(
        x, y, verbose=0, return_dict=True)


@pytest.mark.slow
def test_step_budget_stops_updates():
    x, y = make_data("dense", n=40)
    budgeted = tf_dpsat.make_private(dense_model())
    opt = tf_dpsat.DPSATKeras(learning_rate=0.5, noise_multiplier=0.0, seed=1)
    budgeted.compile(optimizer=opt, loss=XENT)
    opt.build(budgeted.trainable_variables)
    opt.set_step_budget(2)
    budgeted.fit(x, y, batch_size=8, shuffle=False, verbose=0)  # 5 batches
    assert int(opt.iterations.numpy()) == 2
    two_steps, _, _ = fit_private(dense_model, x[:16], y[:16], learning_rate=0.5)
    assert max_diff(weights(budgeted), weights(two_steps)) == 0.0


def test_dropout_trains_with_distinct_masks():
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                                 keras.layers.Dropout(0.5), keras.layers.Dense(3)])

    x = np.ones((8, 6), np.float32)  # identical examples
    y = np.zeros(8, np.int64)
    model = tf_dpsat.make_private(build())
    opt = tf_dpsat.DPSATKeras(learning_rate=0.1, noise_multiplier=0.0,
                              l2_norm_clip=100.0, rho=0.0, num_microbatches=None,
                              seed=1)
    model.compile(optimizer=opt, loss=XENT)
    seed_state = model.layers[2].seed_generator.state
    before = seed_state.numpy().copy()
    model.fit(x, y, batch_size=8, verbose=0)
    assert not np.array_equal(before, seed_state.numpy())  # advances per step
    # Identical examples get different masks: their per-example gradients
    # differ, so the per-example norms are not all equal.
    variables = model.trainable_variables
    params = [tf.convert_to_tensor(v) for v in variables]
    preds = opt._clipped_sum(model, variables, params,
                             per_example.Batch.from_keras(
                                 tf.constant(x), tf.constant(y), None)).y_pred
    assert len(np.unique(np.round(preds.numpy(), 5), axis=0)) > 1


# ------------------------------------------------------------ batch slices

@pytest.mark.parametrize("model_name, clipping, extra", [
    ("dense", "fast", {}),
    ("conv", "fast", {}),
    ("conv", "vectorized", {}),
    ("dense", "fast", {"num_microbatches": 3}),  # slices of 1 and 2 units
    ("dense", "vectorized", {"num_microbatches": 3}),
    ("dense", "fast", {"cls": tf_dpsat.DPSAMKeras}),
])
@pytest.mark.slow
def test_batch_slices_give_the_same_training(model_name, clipping, extra):
    # Noise on (the same seed), clipping binding on some examples, rho > 0:
    # 1, 2 and 3 slices take the same steps and report the same metrics.
    build = MODELS[model_name]
    x, y = make_data(model_name, n=24)
    clip = dp_reference.median_norm(build(), x[:12], y[:12], XENT,
                                    extra.get("num_microbatches"))
    results = {}
    for slices in (1, 2, 3):
        kwargs = dict(l2_norm_clip=clip, rho=0.05, noise_multiplier=0.3,
                      clipping=clipping, batch_slices=slices, **extra)
        model, _, hist = fit_private(build, x, y, batch_size=12, epochs=2,
                                     **kwargs)
        results[slices] = (weights(model), hist.history)
    ref_weights, ref_history = results[1]
    assert 0 < ref_history["grad_norm_clipped_fraction"][0] < 1
    for slices in (2, 3):
        got_weights, history = results[slices]
        assert max_diff(got_weights, ref_weights) < 1e-5, slices
        for key, values in ref_history.items():
            np.testing.assert_allclose(history[key], values, rtol=1e-5,
                                       err_msg=f"{key}, {slices} slices")


@pytest.mark.parametrize("clipping", ["fast", "vectorized"])
@pytest.mark.slow
def test_batch_slices_with_fewer_examples_than_slices(clipping):
    # 9 examples in batches of 8: the last batch has one example, so two of
    # its three slices are empty (the batch size is only known at run time).
    x, y = make_data("dense", n=9)
    results = []
    for slices in (1, 3):
        model, _, hist = fit_private(dense_model, x, y, l2_norm_clip=0.5,
                                     rho=0.05, clipping=clipping,
                                     batch_slices=slices)
        results.append((weights(model), hist.history["loss"]))
    assert max_diff(results[0][0], results[1][0]) < 1e-6
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-6)


@pytest.mark.parametrize("model_name, clipping, extra", [
    ("conv", "fast", {}),
    ("conv", "vectorized", {}),
    ("dense", "fast", {"num_microbatches": 6}),  # chunks of 5 and 1 units
    ("dense", "fast", {"cls": tf_dpsat.DPSAMKeras, "batch_slices": 2}),
])
@pytest.mark.slow
def test_chunks_give_the_same_training(model_name, clipping, extra):
    # Batches of 12 units in chunks of 5 (5, 5 and 2: a loop over two full
    # chunks and a remainder), with noise (the same seed), clipping binding
    # on some examples and rho > 0: the same steps and metrics as the whole
    # batch at once, up to float32 summation order.
    build = MODELS[model_name]
    x, y = make_data(model_name, n=24)
    units = extra.get("num_microbatches")
    clip = dp_reference.median_norm(build(), x[:12], y[:12], XENT, units)
    results = {}
    for chunk_units in (None, 5):
        kwargs = dict(l2_norm_clip=clip, rho=0.05, noise_multiplier=0.3,
                      clipping=clipping, chunk_units=chunk_units, **extra)
        model, opt, hist = fit_private(build, x, y, batch_size=12, epochs=2,
                                       **kwargs)
        results[chunk_units] = (weights(model), hist.history)
    ref_weights, ref_history = results[None]
    assert 0 < ref_history["grad_norm_clipped_fraction"][0] < 1
    got_weights, history = results[5]
    assert max_diff(got_weights, ref_weights) < 1e-5
    for key, values in ref_history.items():
        np.testing.assert_allclose(history[key], values, rtol=1e-5,
                                   err_msg=key)


def test_chunk_count():
    # ceil(units / chunk_units); one chunk without a bound or for a batch
    # whose size is only known at run time.
    assert per_example.chunk_count(12, 5) == 3
    assert per_example.chunk_count(256, 256) == 1
    assert per_example.chunk_count(257, 256) == 2
    assert per_example.chunk_count(2048, 256) == 8
    assert per_example.chunk_count(12, None) == 1
    assert per_example.chunk_count(tf.constant(12), 5) == 1
    assert tf_dpsat.DPSATKeras(noise_multiplier=1.0).chunk_units == 512


def test_batch_up_to_chunk_units_traces_the_unchunked_step():
    # At most chunk_units units: the same ops as chunk_units=None (the
    # default keeps the step of batches up to 512 as it was); above it, a
    # loop over chunks.
    x, y = make_data("conv", n=8)

    def ops(chunk_units):
        model = tf_dpsat.make_private(conv_model())
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            noise_multiplier=1.0, chunk_units=chunk_units), loss=XENT)
        return graph_ops.train_graph_ops(model, x, y)

    unchunked = ops(None)
    assert ops(8) == unchunked
    assert "While" not in unchunked and "StatelessWhile" not in unchunked
    chunked = ops(3)
    assert chunked["While"] + chunked["StatelessWhile"] == 1


def _dropout_model(width=8):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(width),
                             keras.layers.Dropout(0.5), keras.layers.Dense(3)])


@pytest.mark.slow
def test_vectorized_slices_draw_the_masks_of_the_whole_batch():
    # Each example's dropout seed follows from its index in the whole batch,
    # so slicing changes nothing.
    x, y = make_data("dense", n=16)
    got = [weights(fit_private(_dropout_model, x, y, l2_norm_clip=0.5,
                               rho=0.05, clipping="vectorized",
                               batch_slices=slices, chunk_units=chunk)[0])
           for slices, chunk in ((1, None), (2, None), (1, 3))]
    assert max_diff(got[0], got[1]) < 1e-6
    assert max_diff(got[0], got[2]) < 1e-6


@pytest.mark.parametrize("chunk_units", [None, 3])
@pytest.mark.slow
def test_fast_path_slices_draw_distinct_masks(chunk_units):
    # Identical examples: equal predictions would mean a mask drawn twice.
    # 32 units dropped: two of 8 independent masks agree by chance with
    # probability 28 * 2^-32, not the 28 / 2^8 of 8 units.
    x = np.ones((8, 6), np.float32)
    y = np.zeros(8, np.int64)
    model = tf_dpsat.make_private(_dropout_model(width=32))
    opt = tf_dpsat.DPSATKeras(noise_multiplier=0.0, rho=0.0, batch_slices=2,
                              chunk_units=chunk_units, seed=1)
    model.compile(optimizer=opt, loss=XENT)
    model.train_on_batch(x, y)
    variables = model.trainable_variables
    params = [tf.convert_to_tensor(v) for v in variables]
    preds = opt._clipped_sum(model, variables, params,
                             per_example.Batch.from_keras(
                                 tf.constant(x), tf.constant(y), None)).y_pred
    assert len(np.unique(np.round(preds.numpy(), 5), axis=0)) == 8


def test_default_batch_slices(mirrored_strategy):
    # Two slices in graph mode on a CPU (one with an accelerator present);
    # one under XLA and tf.distribute.
    on_cpu = not (tf.config.list_logical_devices("GPU") or
                  tf.config.list_logical_devices("TPU"))
    opt = tf_dpsat.DPSATKeras(noise_multiplier=1.0)
    seen = {}

    def record(key):
        seen[key] = per_example.slice_count(opt.batch_slices)
        return tf.constant(0.0)

    tf.function(lambda: record("graph"))()
    tf.function(lambda: record("xla"), jit_compile=True)()
    with mirrored_strategy.scope():
        mirrored_strategy.run(tf.function(lambda: record("mirrored")))
    assert seen == {"graph": 2 if on_cpu else 1, "xla": 1, "mirrored": 1}
    assert per_example.slice_count(tf_dpsat.DPSATKeras(
        noise_multiplier=1.0, batch_slices=4).batch_slices) == 4


# ------------------------------------------------------ what the step releases

def _one_weight_step(x, sample_weight, **kwargs):
    """Delta w of one step of the w = 1 mse model (lr 1, sigma 0, rho 0).

    Each example's gradient is 2 x^2 (w = 1, target 0); with C = 0.5 every
    |x| >= 1 is clipped to C (1 - 1e-6 / |g|, within 1e-6 of C).
    """
    model = tf_dpsat.make_private(keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")]))
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        learning_rate=1.0, momentum=0.0, l2_norm_clip=0.5, noise_multiplier=0.0,
        rho=0.0, **kwargs), loss="mse")
    model.train_on_batch(np.asarray(x, np.float32).reshape(-1, 1),
                         np.zeros((len(x), 1), np.float32),
                         sample_weight=np.asarray(sample_weight, np.float32))
    return float(model.trainable_variables[0].numpy()[0, 0]) - 1.0


@pytest.mark.slow
def test_default_divisor_is_the_batch_not_the_count_of_examples():
    # Five real rows and three zero-weight padding rows: the clipped sum is
    # 5 C = 2.5 and the default divisor is the batch's 8 rows, so
    # delta w = -2.5 / 8 = -0.3125. Dividing by the 5 non-zero weights (the
    # count of the data) would give -0.5 and reveal that count.
    x = [1.0, 2.0, 3.0, 1.5, 2.5, 9.0, 9.0, 9.0]
    w = [1, 1, 1, 1, 1, 0, 0, 0]
    assert _one_weight_step(x, w) == pytest.approx(-2.5 / 8, abs=1e-5)
    # Adding one example (a sixth real row) moves the update by C / 8 only.
    w6 = [1, 1, 1, 1, 1, 1, 0, 0]
    assert _one_weight_step(x, w6) - _one_weight_step(x, w) == pytest.approx(
        -0.5 / 8, abs=1e-5)


def test_microbatches_with_poisson_padding_are_refused():
    # Measured on the old code: with 8 microbatches of a padded batch,
    # adding one example shifted every later row and moved the clipped sum
    # by 7 C where the accountant assumes C.
    with pytest.raises(ValueError, match="num_microbatches=8 with "
                       "expected_batch_size=64 is refused"):
        tf_dpsat.DPSATKeras(noise_multiplier=1.0, num_microbatches=8,
                            expected_batch_size=64)


def test_microbatches_of_fixed_batches_move_one_clipped_mean():
    # Replace-one adjacency of fixed-size batches: four microbatches of two
    # rows, each mean gradient clipped to C = 0.5. Replacing example 5 (in
    # microbatch 2) changes that microbatch only: the sums differ by at most
    # 2C, the divisor is the 4 microbatches, so |delta| <= 2 * 0.5 / 4.
    x = [0.1, 0.2, 0.3, 0.1, 0.2, 3.0, 0.1, 0.2]
    neighbour = list(x)
    neighbour[5] = 0.05
    a = _one_weight_step(x, [1] * 8, num_microbatches=4)
    b = _one_weight_step(neighbour, [1] * 8, num_microbatches=4)
    # Microbatch 2 = (0.2, 3.0): mean gradient (0.08 + 18) / 2 = 9.04, clipped
    # to 0.5; with 0.05 it is (0.08 + 0.005) / 2 = 0.0425.
    assert b - a == pytest.approx((0.5 - 0.0425) / 4, abs=1e-5)


@pytest.mark.slow
def test_refused_step_updates_no_metric():
    # Budget 1: of three batches only the first is used. The epoch's logs
    # must be those of that batch alone: the refused batches' loss, clipped
    # fraction and accuracy are functions of private data never used.
    x, y = make_data("dense", n=24)
    logs = []
    for n, budget in ((8, None), (24, 1)):
        model = tf_dpsat.make_private(dense_model())
        opt = tf_dpsat.DPSATKeras(learning_rate=0.5, noise_multiplier=0.0,
                                  l2_norm_clip=0.5, seed=1)
        model.compile(optimizer=opt, loss=XENT, metrics=["accuracy"])
        if budget is not None:
            opt.set_step_budget(budget)
        hist = model.fit(x[:n], y[:n], batch_size=8, shuffle=False, verbose=0)
        assert int(opt.iterations.numpy()) == 1
        logs.append({k: v[0] for k, v in hist.history.items()})
    assert set(logs[0]) == {"loss", "accuracy", "grad_norm_clipped_fraction",
                            "nonfinite_gradients"}
    for key, value in logs[0].items():
        assert logs[1][key] == pytest.approx(value, abs=1e-6), key


def test_negative_sample_weight_is_refused():
    x, y = make_data("dense", n=8)
    sw = np.ones(8, np.float32)
    sw[3] = -1.0
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"Expected sample weights >= 0: a negative weight "
                             r"flips the gradient of its example\. Pass weights >= 0"):
        fit_private(dense_model, x, y, sample_weight=sw, l2_norm_clip=0.5)


@pytest.mark.parametrize("suffix", [".h5", ".hdf5"])
def test_saving_to_h5_is_refused_naming_keras(tmp_path, suffix):
    model = tf_dpsat.make_private(dense_model())
    path = str(tmp_path / f"m{suffix}")
    with pytest.raises(ValueError, match=(
            rf"Cannot save DPFunctional to '{path}': the HDF5 format cannot load "
            rf"a DP model back \(Unknown layer\)\. Save to '{tmp_path}/m\.keras' "
            r"instead\.")):
        model.save(path)
    assert not os.path.exists(path)


def test_fit_on_a_dataset_does_not_warn_about_shuffle():
    # Keras warns "shuffle=True was passed, but will be ignored" for every
    # tf.data.Dataset under its default shuffle=True; a DP model's batches come
    # from a sampler, so its fit defaults to shuffle=False for datasets.
    x, y = make_data("dense", n=16)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(0.1, noise_multiplier=1.0, seed=1),
                  loss=XENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)]
    assert int(model.optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("expected_batch_size, warns", [(8, True), (12, False)])
def test_a_physical_batch_size_as_expected_batch_size_is_warned_about(
        expected_batch_size, warns, caplog):
    # k = 2 physical batches of 8 rows: the logical batch has 16 rows, so an
    # expected logical batch of 8 or fewer leaves at least half the rows
    # padding, the sign that expected_batch_size was given the physical
    # batch's size (q, and epsilon, too small). 12 is plausible: no warning.
    x, y = make_data("dense", n=16)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        **dict(ACCUMULATION, expected_batch_size=expected_batch_size)), loss=XENT)
    with caplog.at_level(logging.WARNING):
        fit_rows(model, x, y)
    message = "expected_batch_size=8 is at most the 8 rows of one physical batch"
    assert (message in caplog.text) is warns
    assert ("is at most the" in caplog.text) is warns


def _accumulated_poisson_model(num_examples, expected, steps, multiple_of,
                               expected_batch_size):
    """A DP model, and Poisson batches cut into physical batches.

    Batches of `expected` of `num_examples` rows for `steps` steps, padded
    to padded_batch_size(..., multiple_of=multiple_of) rows and cut into
    k = padded / multiple_of physical batches; the optimizer divides by
    `expected_batch_size`. Returns (model, batches, padded size).
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, 6)).astype("float32")
    y = rng.integers(0, 3, num_examples)
    padded = tf_dpsat.sampling.padded_batch_size(expected, num_examples, steps,
                                                 multiple_of=multiple_of)
    k = padded // multiple_of
    batches = tf_dpsat.sampling.poisson_dataset(
        x, y, expected_batch_size=expected, steps=steps, padded_size=padded,
        seed=3, physical_batches=k)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        **dict(ACCUMULATION, gradient_accumulation_steps=k,
               expected_batch_size=expected_batch_size)), loss=XENT)
    return model, batches, padded


def test_a_physical_expected_batch_size_under_accumulation_is_refused_before_any_step():
    # expected_batch_size=25, the physical batch's share, would make the
    # callback's q 25 / 1000 instead of 100 / 1000 (epsilon 1.47 reported
    # for 3.44). A Poisson batch of expected size 25 needs at most
    # padded_size_bound(25) = 104 rows, and 3 of the 42-row pieces hold 126.
    # The review's case: expected size 100 of 1000 rows, padded to
    # padded_batch_size(100, 1000, 10, multiple_of=42) = 168 rows, cut into
    # 4 physical batches of 42, for 10 steps.
    model, batches, padded = _accumulated_poisson_model(1000, 100, 10, 42, 25)
    assert padded == 168
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(tf_dpsat.validation.UserError, match=(
            r"Expected DPSATKeras\(expected_batch_size=25\) to be the expected "
            r"size of the logical batch, which gradient_accumulation_steps=4 cuts "
            r"into physical batches of 42 rows; but a padded Poisson batch of "
            r"that expected size needs at most 104 rows \(any padded_batch_size\), "
            r"and 3 of these physical batches alone hold 126\..*Set it to the "
            r"expected_batch_size given to poisson_dataset\(\.\.\., "
            r"physical_batches=4\)")):
        model.fit(batches, epochs=1, verbose=0,
                  callbacks=[tf_dpsat.PrivacyCallback(1000)])
    assert int(model.optimizer.iterations.numpy()) == 0
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    # The logical batch's expected size trains: 40 physical batches, 10
    # noisy steps at q = 100 / 1000.
    model, batches, _ = _accumulated_poisson_model(1000, 100, 10, 42, 100)
    callback = tf_dpsat.PrivacyCallback(1000)
    model.fit(batches, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 10
    assert callback.epsilon == tf_dpsat.accounting.compute_epsilon(
        noise_multiplier=1.0, sampling_probability=0.1, steps=10)


def test_a_physical_batch_that_holds_the_expected_batch_is_not_refused(caplog):
    # Physical batches of 16 rows for an expected logical batch of 16 of 64:
    # padded_batch_size(16, 64, 4, multiple_of=16) = 48 rows, k = 3. Every
    # physical batch could hold the expected batch (the warning's sign), yet
    # this is the documented layout for a 16-row memory bound: 2 * 16 = 32
    # rows < padded_size_bound(16) = 83, so it trains, warned about only.
    model, batches, padded = _accumulated_poisson_model(64, 16, 4, 16, 16)
    assert padded == 48
    with caplog.at_level(logging.WARNING):
        model.fit(batches, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    assert "expected_batch_size=16 is at most the 16 rows" in caplog.text


@pytest.mark.parametrize("name, value", [
    ("noise_multiplier", 8.0), ("l2_norm_clip", 2.0),
    ("expected_batch_size", 256), ("num_microbatches", 4),
    ("queries_per_step", 3)])
def test_dp_hyper_parameters_are_read_only_after_construction(name, value):
    # The traced step bakes them in while PrivacyCallback reads them: after
    # one step, noise_multiplier = 8 would have left the noise at sigma = 1
    # and reported epsilon 0.0085 for 0.818. Assigning any of them raises,
    # naming the fix, and leaves the value, and epsilon, as they were.
    x, y = make_data("dense", n=16)
    model = tf_dpsat.make_private(dense_model())
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        0.1, noise_multiplier=1.0, l2_norm_clip=1.0, expected_batch_size=8,
        seed=1), loss=XENT)
    callback = tf_dpsat.PrivacyCallback(1000)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), verbose=0,
              callbacks=[callback])
    optimizer = model.optimizer
    old = getattr(optimizer, name)
    with pytest.raises(AttributeError, match=(
            rf"DPSATKeras\.{name} is fixed at construction: the training step "
            rf"traced with {name}={old!r} would keep using it, while "
            rf"tf_dpsat\.PrivacyCallback would account for {name}={value!r}\. "
            r"Build a new optimizer instead \(e\.g\. DPSATKeras\.from_config")):
        setattr(optimizer, name, value)
    assert getattr(optimizer, name) == old
    # q = 8 / 1000, 2 steps at sigma = 1.
    assert callback.epsilon_at(2) == callback.epsilon == (
        tf_dpsat.accounting.compute_epsilon(
            noise_multiplier=1.0, sampling_probability=0.008, steps=2))
    # The fix the message names: a new optimizer with the new value (4
    # microbatches with expected_batch_size is refused for a reason of its
    # own; queries_per_step belongs to the class).
    if name in ("noise_multiplier", "l2_norm_clip", "expected_batch_size"):
        rebuilt = type(optimizer).from_config({**optimizer.get_config(), name: value})
        assert getattr(rebuilt, name) == value
    assert tf_dpsat.DPSAMKeras.queries_per_step == 2
