"""The fast clipping path against the exact vectorized path, layer by layer."""

import logging
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_reference
import tf_dpsat
from tf_dpsat import per_example
from tf_dpsat.experiments import models

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
pytestmark = pytest.mark.filterwarnings("ignore:.*NOT differentially private")


def _compiled(model, clipping, jit=False, loss=XENT, **kwargs):
    model = tf_dpsat.make_private(model)
    opt = tf_dpsat.DPSATKeras(noise_multiplier=0.0, clipping=clipping, **kwargs)
    model.compile(optimizer=opt, loss=loss, jit_compile=jit)
    return model, opt


def _clipped(model, opt, x, y, weights, clip_quantile=None, jit=False,
             num_microbatches=None):
    """The DP step's clipped sum, stats and predictions at the weights."""
    variables = model.trainable_variables
    x, y, weights = (tf.constant(x), tf.constant(y),
                     tf.constant(weights, tf.float32))
    if not model._compile_loss.built:
        model._symbolic_build(data_batch=(x, y, weights))

    @tf.function(jit_compile=jit)
    def step(x, y, weights):
        params = [tf.convert_to_tensor(v) for v in variables]
        result = opt._clipped_sum(model, variables, params,
                                  per_example.Batch.from_keras(
                                      x, y, weights, num_microbatches))
        stats = {key: getattr(result, key) for key in
                 ("units", "examples", "clipped", "nonfinite", "norms")}
        return result.summed, stats, result.y_pred

    return step(x, y, weights)


def _compare(build, x, y, *, weights=None, clip=None, jit=False,
             num_microbatches=None, atol=1e-5, loss=XENT):
    """Fast and vectorized paths agree on clipped sums and statistics."""
    if weights is None:
        weights = np.ones(len(y), np.float32)
    results = {}
    for path in ("fast", "vectorized"):
        model, opt = _compiled(build(), path, jit, loss=loss,
                               l2_norm_clip=clip or 1.0,
                               num_microbatches=num_microbatches)
        results[path] = _clipped(model, opt, x, y, weights, jit=jit)
    (fast, fstats, fpred), (vec, vstats, vpred) = (results["fast"],
                                                  results["vectorized"])
    for a, b in zip(fast, vec):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol, rtol=1e-4)
    for key in ("examples", "clipped", "nonfinite"):
        assert float(fstats[key]) == float(vstats[key]), key
    # NaN inputs may give NaN or 0 through relu depending on the kernel;
    # compare the rows where both are finite.
    rows = np.all(np.isfinite(fpred.numpy()) & np.isfinite(vpred.numpy()), 1)
    np.testing.assert_allclose(fpred.numpy()[rows], vpred.numpy()[rows],
                               atol=1e-5)
    return fstats


def _median_clip(build, x, y):
    """A clip norm that binds on about half of the examples."""
    model, opt = _compiled(build(), "vectorized", l2_norm_clip=1e9)
    variables = model.trainable_variables
    model._symbolic_build(data_batch=(tf.constant(x), tf.constant(y)))
    norms = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            loss = XENT(y[i:i + 1], model(x[i:i + 1], training=True))
        g = tape.gradient(loss, variables)
        norms.append(np.sqrt(sum(float(tf.reduce_sum(tf.square(
            tf.convert_to_tensor(t)))) for t in g)))
    return float(np.median(norms))


def _seq(*layers, input_shape, dtype="float32", seed=0):
    def build():
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input(input_shape, dtype=dtype),
                                 *[layer() for layer in layers]])
    return build


def _images(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    x[::3] *= 5.0  # clipping binds on these
    return x, rng.integers(0, 3, n)


LAYER_CASES = {
    "dense": (_seq(lambda: keras.layers.Dense(7, activation="tanh"),
                   lambda: keras.layers.Dense(3), input_shape=(5,)), (5,)),
    "dense_sequence_ghost": (_seq(
        lambda: keras.layers.Dense(40, activation="relu"),
        lambda: keras.layers.Dense(40), lambda: keras.layers.Flatten(),
        lambda: keras.layers.Dense(3), input_shape=(2, 40)), (2, 40)),
    "dense_sequence_direct": (_seq(
        lambda: keras.layers.Dense(3, activation="relu"),
        lambda: keras.layers.GlobalAveragePooling1D(),
        lambda: keras.layers.Dense(3), input_shape=(9, 4)), (9, 4)),
    "conv2d_same_strided": (_seq(
        lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                    activation="relu"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(7, 7, 2)), (7, 7, 2)),
    "conv2d_valid_dilated": (_seq(
        lambda: keras.layers.Conv2D(3, (3, 2), dilation_rate=(2, 1),
                                    padding="valid"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(8, 6, 2)), (8, 6, 2)),
    "conv2d_ghost": (_seq(  # 2x2 output, 3x3x16 -> 32: ghost is cheaper
        lambda: keras.layers.Conv2D(32, 3, padding="valid"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(4, 4, 16)), (4, 4, 16)),
    # 6x6 outputs, 3x3x16 -> 64: ghost, from the input map's Gram matrix
    # (8x8 padded pixels: 64^2 < 9 * 36^2).
    "conv2d_ghost_same": (_seq(
        lambda: keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(6, 6, 16)), (6, 6, 16)),
    "conv2d_groups": (_seq(
        lambda: keras.layers.Conv2D(6, 3, groups=2, padding="same"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(5, 5, 4)), (5, 5, 4)),
    "conv1d": (_seq(
        lambda: keras.layers.Conv1D(4, 3, strides=2, padding="same",
                                    activation="selu"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(9, 3)), (9, 3)),
    "depthwise": (_seq(
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                             padding="same"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(5, 5, 3)), (5, 5, 3)),
    # TensorFlow's depthwise filter-gradient op ignores the dilation on CPU:
    # wrong with SAME padding, an error with VALID (see rules/conv.py).
    "depthwise_dilated_same": (_seq(
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                             dilation_rate=2, padding="same"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(7, 7, 3)), (7, 7, 3)),
    "depthwise_dilated_valid": (_seq(
        lambda: keras.layers.DepthwiseConv2D((3, 2), dilation_rate=(2, 1),
                                             padding="valid"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(8, 6, 2)), (8, 6, 2)),
    "group_norm_affine": (_seq(
        lambda: keras.layers.Conv2D(4, 3),
        lambda: keras.layers.GroupNormalization(2),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(5, 5, 2)), (5, 5, 2)),
    "layer_norm": (_seq(
        lambda: keras.layers.Dense(6),
        lambda: keras.layers.LayerNormalization(),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(4, 5)), (4, 5)),
    "layer_norm_two_axes": (_seq(
        lambda: keras.layers.Dense(6),
        lambda: keras.layers.LayerNormalization(axis=[1, 2]),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(4, 5)), (4, 5)),
}


# Convolutions take another route under XLA (see per_example/rules/conv.py).
LAYER_RUNS = sorted([(case, False) for case in LAYER_CASES] +
                    [(case, True) for case in LAYER_CASES
                     if case.startswith(("conv", "depthwise"))])


@pytest.mark.parametrize("case, jit", LAYER_RUNS)
@pytest.mark.slow
def test_layer_matches_vectorized(case, jit):
    build, shape = LAYER_CASES[case]
    x, y = _images(12, shape)
    clip = _median_clip(build, x, y)
    stats = _compare(build, x, y, clip=clip, jit=jit)
    assert 0 < float(stats["clipped"]) < 12  # both branches of the clip


def test_embedding_with_repeated_ids():
    build = _seq(lambda: keras.layers.Embedding(10, 4),
                 lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
                 input_shape=(6,), dtype="int32")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(12, 6)).astype("int32")  # many repeats
    y = rng.integers(0, 3, 12)
    _compare(build, x, y, clip=_median_clip(build, x, y))


def _embedding(length):
    return _seq(lambda: keras.layers.Embedding(10, 4),
                lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
                input_shape=(length,), dtype="int32")


@pytest.mark.parametrize("length", [1, 6])  # 1: the rule's one-id shortcut
@pytest.mark.parametrize("jit", [False, True])
def test_embedding_with_negative_ids(length, jit):
    # keras.ops.take reads id -k as row 10 - k: -1 and 9 are one row, whose
    # gradients add up, and -10 is row 0. Ids drawn from [-10, 10), so every
    # row is spelled both ways.
    build = _embedding(length)
    rng = np.random.default_rng(0)
    x = rng.integers(-10, 10, size=(12, length)).astype("int32")
    x[0, :2] = [-1, 9][:length]
    y = rng.integers(0, 3, 12)
    _compare(build, x, y, clip=_median_clip(build, x, y), jit=jit)


def _clipped_sum_one_by_one(model, x, y, clip, jit):
    """Reference: each example's gradient alone (autodiff), clipped, summed."""

    @tf.function(jit_compile=jit)
    def gradient(x, y):
        with tf.GradientTape() as tape:
            loss = XENT(y, model(x, training=True))
        return [tf.convert_to_tensor(g) for g in
                tape.gradient(loss, model.trainable_variables)]

    total = [np.zeros(v.shape) for v in model.trainable_variables]
    for i in range(len(y)):
        g = [t.numpy().astype(np.float64) for t in gradient(x[i:i + 1],
                                                             y[i:i + 1])]
        norm = np.sqrt(sum(np.sum(t * t) for t in g))
        factor = min(1.0, clip / (norm + dp_reference.CLIP_EPSILON))
        total = [s + factor * t for s, t in zip(total, g)]
    return total


# Outside [-10, 10) an id reads no row: tf.gather raises on a CPU, returns
# zeros on a GPU and clamps under XLA; the gradient of one example alone
# drops it. Inside `tf.vectorized_map` TensorFlow's densification of the
# embedding gradient offsets unit u's ids by 10 u, so the vectorized engine
# dropped nothing, and added such an id's gradient to a neighbour's.
@pytest.mark.parametrize("jit", [
    True, pytest.param(False, marks=pytest.mark.skipif(
        not tf.config.list_logical_devices("GPU"),
        reason="tf.gather raises on out-of-range ids on a CPU"))])
@pytest.mark.parametrize("length", [1, 6])
def test_embedding_with_ids_outside_the_table(length, jit):
    build = _embedding(length)
    rng = np.random.default_rng(1)
    x = rng.integers(-13, 13, size=(12, length)).astype("int32")
    x[:3, 0] = [10, -11, 12]
    x[0, :length] = [10, 10, -11, 12, 3, 3][:length]  # repeated ids
    y = rng.integers(0, 3, 12)
    model, _ = _compiled(build(), "vectorized")
    expected = _clipped_sum_one_by_one(model, x, y, 0.5, jit)
    for path in ("fast", "vectorized"):
        model, opt = _compiled(build(), path, jit, l2_norm_clip=0.5)
        summed, _, _ = _clipped(model, opt, x, y, np.ones(12), jit=jit)
        for got, want in zip(summed, expected):
            np.testing.assert_allclose(got.numpy(), want, atol=1e-5,
                                       err_msg=path)


def test_ghost_sq_norms_golden():
    # a = [[1, 0], [0, 2]], d = [[3], [4]] (T = 2 positions): g = a^T d =
    # [3, 8], |g|^2 = 73; ghost: (1)(9) + (4)(16) = 73, magnitude 1*3 + 2*4 =
    # 11 and floor (1e-3 * 11)^2 = 1.21e-4, far below.
    a = tf.constant([[[1.0, 0.0], [0.0, 2.0]]])
    d = tf.constant([[[3.0], [4.0]]])
    got = per_example.rules.ghost_sq_norms(per_example.rules.gram(a),
                                           per_example.rules.gram(d))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), [73.0], rtol=1e-7)
    # Cancelling terms: a_1 = -a_2 = [M, 0], d_1 = d_2 = [1]: g = 0, but the
    # magnitude is 2M, so the norm is the floor (1e-3 * 2e4)^2 = 400.
    a = tf.constant([[[1e4, 0.0], [-1e4, 0.0]]])
    d = tf.constant([[[1.0], [1.0]]])
    got = per_example.rules.ghost_sq_norms(per_example.rules.gram(a),
                                           per_example.rules.gram(d))
    np.testing.assert_allclose(got.numpy(), [400.0], rtol=1e-6)
    # A non-finite input stays non-finite (the engine drops the unit).
    a = tf.constant([[[np.nan, 0.0], [0.0, 2.0]]])
    got = per_example.rules.ghost_sq_norms(per_example.rules.gram(a),
                                           per_example.rules.gram(d))
    assert not np.isfinite(got.numpy()[0])


@pytest.mark.parametrize("geometry", [
    # (input HxW, kernel, strides, dilation, padding, examples per unit);
    # the first four take the input map's Gram matrix, the strided one
    # (9^4 padded pixel pairs against 9 * 4^4) one per offset.
    ((6, 6), (3, 3), (1, 1), (1, 1), "same", 1),
    ((6, 6), (3, 2), (1, 1), (2, 1), "same", 1),
    ((6, 6), (3, 3), (1, 1), (1, 1), "valid", 1),
    ((5, 5), (3, 3), (1, 1), (1, 1), "same", 2),
    ((7, 7), (3, 3), (2, 2), (1, 1), "same", 1),
])
def test_patch_gram_matches_one_gram_per_offset(geometry):
    # Reference: the patches' Gram matrix as the sum of one Gram matrix per
    # kernel offset, in float64 numpy.
    from tf_dpsat.per_example.rules import conv
    (h, w), kernel, strides, dilation, padding, size = geometry
    a = np.random.default_rng(0).normal(size=(4, h, w, 3)).astype("float32")
    layout = per_example.Layout(4 // size, size)
    shifts = conv._shifted_inputs(tf.constant(a), kernel, strides, dilation,
                                  padding)
    expected = 0
    for shift in shifts:
        s = np.asarray(shift, np.float64).reshape(4 // size, -1, 3)
        expected = expected + np.einsum("mpi,mqi->mpq", s, s)
    got = conv._patch_gram(tf.constant(a), layout, kernel, strides, dilation,
                           padding)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def _cancelling_model(kind):
    """A ghost-norm layer (4 positions) whose positions a pooling averages."""
    keras.utils.set_random_seed(0)
    if kind == "dense":  # 4 * (64 + 64) < 64 * 64: ghost
        inputs = keras.Input((4, 64))
        h = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(64)(inputs))
    else:  # 2x2 outputs, 4 * (144 + 32) < 144 * 32: ghost
        inputs = keras.Input((4, 4, 16))
        h = keras.layers.GlobalAveragePooling2D()(
            keras.layers.Conv2D(32, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    model.compile(loss=XENT)
    return model


def _cancelling_example(kind, magnitude, rng):
    """Huge per-position terms that cancel: the gradient stays small.

    Dense: rows M v + u, -M v, M v / 2, -M v / 2 sum to u, and the pooling
    gives every position the same d. Conv2D: a checkerboard M (-1)^(i+j) v
    puts opposite signs on the 2x2 output positions' patches at every kernel
    offset, so the four patches sum to zero, plus u at one pixel.
    """
    if kind == "dense":
        v, u = rng.normal(size=64), rng.normal(size=64)
        x = np.stack([magnitude * v + u, -magnitude * v, magnitude * v / 2,
                      -magnitude * v / 2])
    else:
        i, j = np.indices((4, 4))
        x = magnitude * ((-1.0) ** (i + j))[:, :, None] * rng.normal(size=16)
        x[0, 0] += rng.normal(size=16)
    return x[None].astype("float32")


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e8])
def test_cancelling_example_adds_at_most_c(kind, magnitude):
    # With float32 ghost norms taken as 0 when rounding made them negative,
    # such an example went into the sum barely clipped or not at all: 5 of
    # these 6 cases failed, the worst (Dense, M = 1e4) by 35 C. Adding it to
    # a batch of 7 may move the clipped sum by at most C; float32 rounding of
    # the 8 clipped terms is below 1e-5 C, so 1e-4 C is the tolerance.
    clip = 0.1
    model = _cancelling_model(kind)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 3, 7)
    model.compute_loss(x=x[:1], y=y[:1], y_pred=model(x[:1]))
    variables = model.trainable_variables

    def summed(x, y):
        params = [tf.convert_to_tensor(v.value) for v in variables]
        batch = per_example.Batch.from_keras(tf.constant(x), tf.constant(y),
                                             None)
        result = per_example.clipped_sum(model, variables, params, batch,
                                         l2_norm_clip=clip, engine="fast")
        return [t.numpy().astype(np.float64) for t in result.summed]

    without = summed(x, y)
    for label in range(3):
        extra = _cancelling_example(kind, magnitude, rng)
        with_it = summed(np.concatenate([x, extra]), np.append(y, label))
        change = np.sqrt(sum(np.sum((a - b) ** 2)
                             for a, b in zip(with_it, without)))
        assert change <= clip * (1 + 1e-4), (label, change / clip)


def test_padding_and_nonfinite_examples_are_dropped():
    build, shape = LAYER_CASES["conv2d_same_strided"]
    x, y = _images(12, shape)
    x[2] = np.nan     # a non-finite example: dropped and counted
    x[5] = 1e6        # a padded example with garbage: weight 0
    weights = np.ones(12, np.float32)
    weights[5] = 0.0
    stats = _compare(build, x, y, weights=weights, clip=0.5)
    assert float(stats["examples"]) == 11
    assert float(stats["nonfinite"]) == 1


@pytest.mark.parametrize("case", ["dense_sequence_ghost", "dense_sequence_direct",
                                  "conv2d_same_strided",
                                  "conv2d_ghost", "group_norm_affine"])
@pytest.mark.parametrize("nonfinite", [None, "active", "padded"])
@pytest.mark.slow
def test_padding_dropped_with_and_without_nonfinite_examples(case, nonfinite):
    # Padded rows (weight 0) full of finite garbage, with no non-finite
    # example (no masking runs: zero factors remove the padding), with an Inf
    # in an example, or a NaN in a padded one (both masked: a NaN times a
    # zero factor is still NaN). On each kind of rule the sums, counts and
    # predictions equal the vectorized path's.
    build, shape = LAYER_CASES[case]
    x, y = _images(12, shape)
    x[5] = 1e3        # a padded example with (finite) garbage: weight 0
    x[9] = -7.0
    if nonfinite == "active":
        x[2] = np.inf
    elif nonfinite == "padded":
        x[9, 0] = np.nan
    weights = np.ones(12, np.float32)
    weights[[5, 9]] = 0.0
    stats = _compare(build, x, y, weights=weights, clip=0.5)
    assert float(stats["examples"]) == 10
    assert float(stats["nonfinite"]) == float(nonfinite == "active")


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.slow
def test_microbatches_match_vectorized(reduction):
    # The fast path takes the units' loss gradients from the batch loss:
    # times 4 units for a mean over the batch, times 1 for a sum.
    build, shape = LAYER_CASES["conv2d_same_strided"]
    x, y = _images(12, shape)
    weights = np.linspace(0.0, 2.0, 12).astype(np.float32)
    _compare(build, x, y, clip=0.5, num_microbatches=4, weights=weights,
             loss=keras.losses.SparseCategoricalCrossentropy(
                 from_logits=True, reduction=reduction))


def test_xla_fast_path_matches_vectorized():
    build, shape = LAYER_CASES["conv2d_ghost"]
    x, y = _images(8, shape)
    _compare(build, x, y, clip=0.5, jit=True)


@pytest.mark.parametrize("case, num_microbatches, jit", [
    ("conv2d_same_strided", None, False),
    ("conv2d_ghost", 6, False),
    ("group_norm_affine", None, False),
    ("dense_sequence_ghost", None, True),
    ("conv2d_same_strided", 6, True),
])
@pytest.mark.slow
def test_chunks_match_vectorized_whole_batch(case, num_microbatches, jit):
    # 12 examples in chunks of 5 units (5, 5, 2; 6 microbatches of 2: 5, 1),
    # each chunk in two slices, with padded rows of weight 0 full of
    # garbage (microbatch 2 all padding): the norms, sums, counts and
    # predictions of the fast and vectorized engines in chunks equal the
    # vectorized whole batch's.
    build, shape = LAYER_CASES[case]
    x, y = _images(12, shape)
    x[5] = 1e3
    weights = np.ones(12, np.float32)
    weights[[4, 5, 9]] = 0.0
    clip = _median_clip(build, x, y)
    runs = {}
    for path, chunk_units in (("vectorized", None), ("fast", 5),
                              ("vectorized", 5)):
        model, opt = _compiled(build(), path, jit, l2_norm_clip=clip,
                               num_microbatches=num_microbatches,
                               batch_slices=2, chunk_units=chunk_units)
        runs[path, chunk_units] = _clipped(model, opt, x, y, weights,
                                           jit=jit,
                                           num_microbatches=num_microbatches)
    ref_sums, ref_stats, ref_pred = runs["vectorized", None]
    assert float(ref_stats["examples"]) == (9 if num_microbatches is None
                                            else 5)
    assert 0 < float(ref_stats["clipped"]) < float(ref_stats["examples"])
    for key in (("fast", 5), ("vectorized", 5)):
        sums, stats, pred = runs[key]
        np.testing.assert_allclose(stats["norms"].numpy(),
                                   ref_stats["norms"].numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=str(key))
        for a, b in zip(sums, ref_sums):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5,
                                       rtol=1e-4, err_msg=str(key))
        for name in ("units", "examples", "clipped", "nonfinite"):
            assert float(stats[name]) == float(ref_stats[name]), (key, name)
        np.testing.assert_allclose(pred.numpy(), ref_pred.numpy(), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("name, shape", [("tb_cnn", (32, 32, 3)),
                                         ("dpnas_cifar", (32, 32, 3)),
                                         ("dpnas_fmnist", (28, 28, 1)),
                                         ("resnet10_gn", (28, 28, 1)),
                                         ("mlp", (8, 8, 1))])
@pytest.mark.slow
def test_paper_models_match_vectorized(name, shape):
    def build():
        return models.build_model(name, shape, 10, seed=0)

    per_example.check_supported(build())  # every layer has a rule
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, *shape)).astype("float32")
    y = rng.integers(0, 10, 4)
    _compare(build, x, y, clip=0.05, atol=2e-5)


@pytest.mark.slow
def test_training_with_rho_matches_vectorized():
    # Several DP-SAT steps (norms taken at the perturbed weights), momentum.
    build, shape = LAYER_CASES["group_norm_affine"]
    x, y = _images(24, shape)
    final = {}
    for path in ("fast", "vectorized"):
        model, _ = _compiled(build(), path, learning_rate=0.5, momentum=0.9,
                             l2_norm_clip=0.5, rho=0.1, seed=1)
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        final[path] = [v.numpy() for v in model.trainable_variables]
    for a, b in zip(final["fast"], final["vectorized"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


class _Scale(keras.layers.Layer):
    """A trainable layer no fast rule covers."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],),
                                     initializer="ones")

    def call(self, x):
        return x * self.scale


def test_unsupported_layer_falls_back_or_refuses():
    build = _seq(lambda: keras.layers.Dense(4), _Scale,
                 lambda: keras.layers.Dense(3), input_shape=(5,))
    with pytest.raises(per_example.Unsupported, match="_Scale"):
        per_example.check_supported(build())
    x, y = _images(8, (5,))
    auto, opt = _compiled(build(), "auto", l2_norm_clip=0.5)
    summed, _, _ = _clipped(auto, opt, x, y, np.ones(8))
    vec, vopt = _compiled(build(), "vectorized", l2_norm_clip=0.5)
    expected, _, _ = _clipped(vec, vopt, x, y, np.ones(8))
    for a, b in zip(summed, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    forced, fopt = _compiled(build(), "fast", l2_norm_clip=0.5)
    with pytest.raises(ValueError, match="clipping='fast' cannot handle"):
        _clipped(forced, fopt, x, y, np.ones(8))


class _UserScale(keras.layers.Layer):
    """A user's layer, x * scale over the last axis, given a rule below."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],),
                                     initializer="ones")

    def call(self, x):
        return x * self.scale


class _UserScaleRule(per_example.Rule):
    """dL_u/dscale = sum over the unit's positions of x * d."""

    def roles(self, layer):
        return {"scale": layer.scale}

    def forward(self, layer, x, saved, watch):
        saved["x"] = x
        z = x * layer.scale
        watch(z)
        return z, z

    def sq_norms(self, record, d, layout):
        per_unit = tf.reduce_sum(
            per_example.group(record.saved["x"] * d, layout), 1)
        return tf.reduce_sum(tf.square(per_unit), 1), {"scale": per_unit}

    def sums(self, record, d, cache, factors, layout, keep):
        return {"scale": tf.tensordot(factors, cache["scale"], 1)}


def _user_scale_model():
    # Rows of 3 positions, so the rule sums over positions within a unit.
    return _seq(lambda: keras.layers.Dense(4), _UserScale,
                lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
                input_shape=(3, 5))


@pytest.mark.slow
def test_user_rule_matches_vectorized():
    build = _user_scale_model()
    with pytest.raises(per_example.Unsupported, match="_UserScale"):
        per_example.check_supported(build())
    per_example.register_rule(_UserScale, _UserScaleRule())
    per_example.check_supported(build())  # the rule is found
    x, y = _images(12, (3, 5))
    stats = _compare(build, x, y, clip=_median_clip(build, x, y))
    assert 0 < float(stats["clipped"]) < 12  # both branches of the clip
    _compare(build, x, y, clip=0.5, num_microbatches=4)
    _assert_exact(build, x, y, paths=("auto", "fast"))


def test_register_rule_refuses_what_is_not_a_rule():
    with pytest.raises(TypeError, match="Expected a tf_dpsat.per_example.Rule"):
        per_example.register_rule(_UserScale, lambda layer: None)
    with pytest.raises(TypeError, match="Expected a layer class"):
        per_example.register_rule(keras.layers.Dense(3), _UserScaleRule())


def _masked_embedding():
    return _seq(lambda: keras.layers.Embedding(6, 4, mask_zero=True),
                lambda: keras.layers.GlobalAveragePooling1D(),
                lambda: keras.layers.Dense(3), input_shape=(5,),
                dtype="int32")


def _float64_dense():
    return _seq(lambda: keras.layers.Dense(4, dtype="float64"),
                lambda: keras.layers.Dense(3), input_shape=(5,))


def _lstm():
    return _seq(lambda: keras.layers.LSTM(3), lambda: keras.layers.Dense(3),
                input_shape=(2, 5))


# (model, its input shape and dtype, the cause the fallback must name).
FALLBACK_CASES = {
    "unregistered": (_seq(lambda: keras.layers.Dense(4), _Scale,
                          lambda: keras.layers.Dense(3), input_shape=(5,)),
                     (5,), "float32",
                     r"no fast rule for layer '\w+' \(_Scale\)"),
    "mask_zero": (_masked_embedding(), (5,), "int32",
                  r"\(Embedding\): mask_zero=True"),
    "float64": (_float64_dense(), (5,), "float32",
                r"\(Dense\) computes in float64; the fast rules compute in "
                r"float32, bfloat16 and float16 only"),
    "lstm": (_lstm(), (2, 5), "float32", r"no fast rule for layer '\w+' \(LSTM\)"),
}


@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
@pytest.mark.slow
def test_fallback_warns_once_and_fast_names_the_cause(case, caplog):
    build, shape, dtype, cause = FALLBACK_CASES[case]
    rng = np.random.default_rng(0)
    if dtype == "int32":
        x = rng.integers(0, 6, (8, *shape)).astype(dtype)
        x[:, -2:] = 0  # masked positions
    else:
        x = rng.normal(size=(8, *shape)).astype(dtype)
    y = rng.integers(0, 3, 8)
    with pytest.raises(per_example.Unsupported, match=cause):
        per_example.check_supported(build())
    model, opt = _compiled(build(), "auto", l2_norm_clip=0.5)
    with caplog.at_level(logging.WARNING, logger="absl"):
        _clipped(model, opt, x, y, np.ones(8))
        _clipped(model, opt, x, y, np.ones(8))  # traced again: no new line
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING and
                 "Fast per-example clipping does not apply" in r.getMessage()]
    assert len(warnings_) == 1
    assert re.search(cause, warnings_[0].getMessage())
    assert f"model '{model.name}'" in warnings_[0].getMessage()
    forced, fopt = _compiled(build(), "fast", l2_norm_clip=0.5)
    with pytest.raises(ValueError, match="clipping='fast' cannot handle.*" +
                       cause):
        _clipped(forced, fopt, x, y, np.ones(8))


def test_shared_layer_and_activity_regularizer_fall_back():
    shared = keras.layers.Dense(5)
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3)(shared(shared(inputs)))
    with pytest.raises(per_example.Unsupported, match="shared"):
        with tf.GradientTape() as tape:
            per_example.fast.forward(keras.Model(inputs, outputs),
                                  keras.Model(inputs, outputs).trainable_variables,
                                  tf.ones((2, 5)), tape)
    regularized = _seq(lambda: keras.layers.Dense(
        4, activity_regularizer=keras.regularizers.L2(0.1)),
        lambda: keras.layers.Dense(3), input_shape=(5,))
    with pytest.raises(per_example.Unsupported, match="no fast rule"):
        per_example.check_supported(regularized())


def test_nested_functional_model():
    def build():
        keras.utils.set_random_seed(0)
        inner_in = keras.Input((6,))
        inner = keras.Model(inner_in, keras.layers.Dense(4, activation="tanh")(
            inner_in))
        inputs = keras.Input((6,))
        a = inner(inputs)
        b = keras.layers.Dense(4)(inputs)
        merged = keras.layers.Concatenate()([a, b])
        return keras.Model(inputs, keras.layers.Dense(3)(merged))

    x, y = _images(10, (6,))
    _compare(build, x, y, clip=_median_clip(build, x, y))


_XLA_STEPS_SCRIPT = """
import numpy as np, keras, tf_dpsat
keras.utils.set_random_seed(0)
model = tf_dpsat.make_private(keras.Sequential([
    keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3), keras.layers.Flatten(),
    keras.layers.Dense(3)]))
model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.0,
                                            clipping="fast", seed=0),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              jit_compile=True)
rng = np.random.default_rng(0)
for _ in range(4):
    model.train_on_batch(rng.normal(size=(8, 6, 6, 2)).astype("float32"),
                         rng.integers(0, 3, 8))
"""


@pytest.mark.slow
def test_xla_compiles_the_fast_step_once(tmp_path):
    # XLA writes one file per compilation into its persistent cache. Four
    # steps on new data must compile once: an op that needs a compile-time
    # constant derived from the batch would recompile on every step.
    cache = tmp_path / "xla"
    cache.mkdir()
    env = dict(os.environ,
               TF_XLA_FLAGS=f"--tf_xla_persistent_cache_directory={cache}",
               PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", _XLA_STEPS_SCRIPT], env=env,
                   check=True, capture_output=True, timeout=300)
    assert len(list(cache.iterdir())) == 1


# ------------------------------------------- exact or refused (public API)

def _one_step(build, clipping, x, y, clip):
    """Weight changes of one DP-SGD step with lr 1 and no noise.

    -lr * clipped sum / divisor, through `make_private`, `compile` and
    `train_on_batch` only.
    """
    model = tf_dpsat.make_private(build())
    model.compile(optimizer=tf_dpsat.DPSATKeras(
        learning_rate=1.0, momentum=0.0, l2_norm_clip=clip,
        noise_multiplier=0.0, rho=0.0, seed=0, clipping=clipping), loss=XENT)
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.train_on_batch(x, y)
    return [v.numpy() - b for b, v in zip(before, model.trainable_variables)]


def _assert_exact(build, x, y, paths=("auto",)):
    """Each of `paths` changes the weights as the vectorized path does.

    The clip norm is the median per-example norm, so clipping binds on
    some examples only: a wrong norm or a misplaced gradient shows.
    """
    model = build()
    clip = dp_reference.median_norm(model, x, y, XENT)
    expected = _one_step(build, "vectorized", x, y, clip)
    assert min(np.abs(e).max() for e in expected) > 1e-4  # every one moves
    for path in paths:
        got = _one_step(build, path, x, y, clip)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-5, err_msg=path)


def _functional(body, input_shape=(5,), seed=0):
    """A functional model: Input -> body(tensor) -> Dense(3)."""
    def build():
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(input_shape)
        return keras.Model(inputs, keras.layers.Dense(3)(body(inputs)))
    return build


def _kernel_in_lambda(inputs):
    dense = keras.layers.Dense(5)
    return keras.layers.Lambda(lambda t: t @ dense.kernel)(dense(inputs))


def _kernel_in_op(inputs):
    # The graph holds the variable itself (not a constant copy of it).
    dense = keras.layers.Dense(5, activation="tanh")
    return keras.ops.matmul(dense(inputs), dense.kernel)


def _tied_embedding(inputs):
    # An output projection tied to the embedding table.
    embedding = keras.layers.Embedding(6, 4)
    h = keras.layers.Flatten()(embedding(inputs))
    h = keras.layers.Dense(4)(h)
    return keras.layers.Lambda(lambda t: t @ keras.ops.transpose(
        embedding.embeddings))(h)


TIED_CASES = {
    "kernel_in_lambda": (_functional(_kernel_in_lambda), (5,), "float32"),
    "kernel_in_keras_op": (_functional(_kernel_in_op), (5,), "float32"),
    "tied_embedding": (_functional(_tied_embedding, (3,)), (3,), "int32"),
}


@pytest.mark.parametrize("case", sorted(TIED_CASES))
@pytest.mark.slow
def test_weight_used_outside_its_layer_falls_back_or_refuses(case):
    # The fast rules see a layer's weights only inside the layer; a use
    # elsewhere (here 72-93% of the gradient before the check) must send
    # "auto" to the exact vectorized path and make "fast" refuse.
    build, shape, dtype = TIED_CASES[case]
    rng = np.random.default_rng(0)
    if dtype == "int32":
        x = rng.integers(0, 6, (8, *shape)).astype(dtype)
    else:
        x, _ = _images(8, shape)
    y = rng.integers(0, 3, 8)
    _assert_exact(build, x, y)
    with pytest.raises(per_example.Unsupported, match="outside their own"):
        model = build()
        with tf.GradientTape() as tape:
            per_example.fast.forward(model, model.trainable_variables,
                                  tf.constant(x), tape)
    with pytest.raises(ValueError, match="clipping='fast' cannot handle.*"
                                         "outside their own layer"):
        _one_step(build, "fast", x, y, 1.0)


def _frozen(build, *names):
    """`build` with the named variables (layer index, attribute) frozen."""
    def frozen():
        model = build()
        rng = np.random.default_rng(3)
        for index, attr in names:
            variable = getattr(model.layers[index], attr)
            # Values away from the initialisation (ones, zeros), so that a
            # gradient given to the wrong variable shows.
            variable.assign(rng.uniform(0.5, 2.0, variable.shape))
            variable.trainable = False
        return model
    return frozen


FROZEN_CASES = {
    "dense_kernel": (_frozen(LAYER_CASES["dense"][0], (0, "kernel")), (5,)),
    "dense_bias": (_frozen(LAYER_CASES["dense"][0], (1, "bias")), (5,)),
    "dense_sequence_kernel": (_frozen(LAYER_CASES["dense_sequence_ghost"][0],
                                      (1, "kernel")), (2, 40)),
    "conv2d_kernel": (_frozen(LAYER_CASES["conv2d_same_strided"][0],
                              (0, "kernel")), (7, 7, 2)),
    "conv2d_ghost_bias": (_frozen(LAYER_CASES["conv2d_ghost"][0],
                                  (0, "bias")), (4, 4, 16)),
    "depthwise_kernel": (_frozen(_seq(
        lambda: keras.layers.DepthwiseConv2D(3, padding="same"),
        lambda: keras.layers.Flatten(), lambda: keras.layers.Dense(3),
        input_shape=(5, 5, 3)), (0, "kernel")), (5, 5, 3)),
    "layer_norm_gamma": (_frozen(LAYER_CASES["layer_norm"][0],
                                 (1, "gamma")), (4, 5)),
    "layer_norm_beta": (_frozen(LAYER_CASES["layer_norm"][0],
                                (1, "beta")), (4, 5)),
    "group_norm_gamma": (_frozen(LAYER_CASES["group_norm_affine"][0],
                                 (1, "gamma")), (5, 5, 2)),
}


@pytest.mark.parametrize("case", sorted(FROZEN_CASES))
@pytest.mark.slow
def test_partly_frozen_layer_is_exact(case):
    # Norms and sums cover the trainable variables only, matched to them
    # by identity: a frozen kernel used to crash (bias given the kernel's
    # sum), a frozen gamma gave beta gamma's gradient (error 0.46).
    build, shape = FROZEN_CASES[case]
    x, y = _images(12, shape)
    per_example.check_supported(build())  # the fast path applies
    _assert_exact(build, x, y, paths=("auto", "fast"))


def test_raw_keras_op_in_a_functional_model():
    # Bare keras.ops calls are operations of the graph, not layers; they
    # used to raise AttributeError. They are followed exactly.
    build = _functional(lambda t: keras.ops.tanh(keras.layers.Dense(4)(t)))
    x, y = _images(8, (5,))
    _assert_exact(build, x, y, paths=("auto", "fast"))


def test_interpretation_failure_falls_back(monkeypatch):
    # Whatever the layer-by-layer interpretation trips on becomes
    # Unsupported: "auto" falls back, "fast" says why.
    build = LAYER_CASES["dense"][0]
    x, y = _images(8, (5,))

    def broken(*args, **kwargs):
        raise AttributeError("no such node attribute")

    monkeypatch.setattr(per_example.fast._Interpreter, "run", broken)
    _assert_exact(build, x, y)
    with pytest.raises(ValueError, match="interpretation failed.*"
                                         "no such node attribute"):
        _one_step(build, "fast", x, y, 1.0)
