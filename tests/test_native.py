"""The fused CPU noise kernel (tf_dpsat/native): generator, transform, use.

Its Philox words are compared bit for bit with TensorFlow's Philox, its
normals with an independent NumPy implementation of the documented layout
(tests/dp_reference.py), and its distribution by the checks of
tests/test_noise.py, which run for every sampler.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_reference
import graph_ops
import tf_dpsat
from tf_dpsat import clipping, native


def tf_philox(key, counter_hi, first, blocks):
    """TensorFlow's own Philox4x32-10 words for key, counter (first, hi)."""
    as_u64 = lambda *v: tf.bitcast(tf.constant(v, tf.int64), tf.uint64)
    return tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[4 * blocks], key=as_u64(key), counter=as_u64(first, counter_hi),
        alg=1, dtype=tf.uint32).numpy()


@pytest.mark.parametrize("key,counter_hi,first,blocks", [
    (0, 0, 0, 1),
    (-1234567890123, 987654321987, 5, 600),
    # The low counter word wraps: the carry must reach the second word.
    (7, -1, 2**32 - 100, 300),
    (2**62 + 3, 11, 2**40, 257),
])
def test_philox_words_are_tensorflows(native_kernel, key, counter_hi, first,
                                      blocks):
    words = native_kernel.dpsat_philox_words(
        np.int64(key), np.int64(counter_hi), np.int64(first), blocks=blocks)
    np.testing.assert_array_equal(words.numpy(),
                                  tf_philox(key, counter_hi, first, blocks))


def test_philox_known_answer(native_kernel):
    # Random123's published known-answer vector for Philox4x32-10 with a
    # zero counter and key.
    words = native_kernel.dpsat_philox_words(np.int64(0), np.int64(0),
                                             np.int64(0), blocks=1).numpy()
    assert [f"{w:08x}" for w in words] == ["6627e8d5", "e169c58d",
                                           "bc57ac4c", "9b00dbd8"]
    counters = np.zeros([1, 4], np.uint32)
    np.testing.assert_array_equal(
        dp_reference.philox4x32_10(counters, (0, 0))[0], words)


SHAPES = [(3, 5), (1024,), (2049,), (1,), (300, 7)]


@pytest.mark.parametrize("seed,stream", [((3, 4), 0), ((-5, 2**40 + 1), 1),
                                         ((3, 4), 2**32 - 1)])
def test_noisy_mean_matches_the_numpy_reference(native_kernel, seed, stream):
    rng = np.random.default_rng(0)
    sums = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    stddev, divisor = 0.7, 3.0
    got = native_kernel.dpsat_noisy_mean(
        [tf.constant(s) for s in sums], tf.constant(seed, tf.int64),
        stream, stddev, divisor)
    want = dp_reference.native_noise([s.size for s in sums], seed, stream)
    for g, s, z in zip(got, sums, want):
        assert g.shape == s.shape and g.dtype == tf.float32
        # float32 log/cos/sin against float64: |z| <= 5.8, ~1e-6 relative.
        np.testing.assert_allclose(g.numpy().ravel(),
                                   (s.ravel() + stddev * z) / divisor,
                                   rtol=0, atol=1e-5)


def test_zero_stddev_is_the_exact_mean(native_kernel):
    sums = [tf.constant(np.arange(10, dtype=np.float32)), tf.ones([3, 3])]
    got = native_kernel.dpsat_noisy_mean(sums, tf.constant([1, 2], tf.int64),
                                         0, 0.0, 4.0)
    for g, s in zip(got, sums):
        np.testing.assert_array_equal(g.numpy(), s.numpy() / 4.0)


def test_streams_are_different_draws(native_kernel):
    seed = tf.constant([1, 2], tf.int64)
    a, b = (native_kernel.dpsat_noisy_mean([tf.zeros([5000])], seed, s, 1.0,
                                           1.0)[0].numpy() for s in (0, 1))
    # Independent N(0, 1) vectors: correlation within 5 standard errors.
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


def test_empty_tensor_and_bad_inputs(native_kernel):
    seed = tf.constant([1, 2], tf.int64)
    got = native_kernel.dpsat_noisy_mean([tf.zeros([0]), tf.zeros([4])], seed,
                                         0, 1.0, 1.0)
    assert got[0].shape == (0,) and got[1].shape == (4,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="seed of 2"):
        native_kernel.dpsat_noisy_mean([tf.zeros([4])],
                                       tf.constant([1, 2, 3], tf.int64), 0,
                                       1.0, 1.0)
    for stream in (-1, 2**32):
        with pytest.raises(tf.errors.InvalidArgumentError, match="stream"):
            native_kernel.dpsat_noisy_mean([tf.zeros([4])], seed, stream, 1.0,
                                           1.0)


def test_clipping_noisy_mean_chooses_the_kernel(native_kernel):
    sums = [tf.zeros([5, 4]), tf.zeros([4])]
    seed = tf.constant([8, 9], tf.int64)
    want = dp_reference.native_noise([20, 4], (8, 9), stream=3)
    got = clipping.noisy_mean(sums, 2.0, seed, 3, 2.0)
    np.testing.assert_allclose(got[0].numpy().ravel(), want[0], atol=1e-5)
    with native.enabled(False):
        stock = clipping.noisy_mean(sums, 2.0, seed, 3, 2.0)
    # TensorFlow's ops: the stream is folded into the seed.
    expected = clipping.gaussian_noise(
        sums, 2.0, tf.random.experimental.stateless_fold_in(
            seed, tf.constant(3, tf.int64), alg="philox"))
    for s, z in zip(stock, expected):
        np.testing.assert_array_equal(s.numpy(), z.numpy() / 2.0)
    # Under XLA the kernel (CPU, no XLA lowering) is never used.
    xla = tf.function(lambda: clipping.noisy_mean(sums, 2.0, seed, 3, 2.0),
                      jit_compile=True)()
    assert not np.allclose(xla[0].numpy().ravel(), want[0], atol=1e-3)
    assert abs(float(tf.math.reduce_std(xla[0])) - 1.0) < 0.5


def test_not_float32_falls_back(native_kernel):
    assert native.noisy_mean([tf.zeros([4], tf.float16)], 1.0,
                             tf.constant([1, 2], tf.int64), 0, 1.0) is None
    assert native.perturb([tf.zeros([4], tf.float16)],
                          [tf.zeros([4], tf.float16)], 0.1) is None


def test_perturb_matches_tensorflow_ops(native_kernel):
    rng = np.random.default_rng(1)
    shapes = [(784, 256), (256,), (70_000,), (3,)]  # spans of 16384 and less
    params = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    dirs = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    got = clipping.perturbed(params, dirs, 0.05)
    with native.enabled(False):
        want = clipping.perturbed(params, dirs, 0.05)
    # The NumPy value in float64: the step has length rho exactly.
    d = np.concatenate([t.numpy().ravel() for t in dirs]).astype(np.float64)
    step = np.concatenate([(g.numpy() - p.numpy()).ravel().astype(np.float64)
                           for g, p in zip(got, params)])
    assert abs(np.linalg.norm(step) - 0.05) < 1e-4 * 0.05 + 1e-6
    np.testing.assert_allclose(step, 0.05 * d / np.linalg.norm(d), atol=1e-6)
    for g, w in zip(got, want):  # float32 roundings of one formula
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-6)
    # A zero direction (DP-SAT's first step) leaves the weights exact.
    zero = clipping.perturbed(params, [tf.zeros_like(p) for p in params], 0.05)
    for z, p in zip(zero, params):
        np.testing.assert_array_equal(z.numpy(), p.numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="equal shapes"):
        native_kernel.dpsat_perturb([tf.zeros([4])], [tf.zeros([5])], 0.1)


def _dense_model_ops(x, y, use_kernel, **optimizer_kwargs):
    with native.enabled(use_kernel):
        model = tf_dpsat.DPSequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0,
            rho=0.1, seed=1, **optimizer_kwargs),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return graph_ops.train_graph_ops(model, x, y)


def test_optimizer_step_uses_the_kernels_when_built(native_kernel):
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 4)), tf.float32)
    y = tf.constant(np.arange(8) % 3)
    ops = {use: _dense_model_ops(x, y, use) for use in (True, False)}
    # With the kernels: one fused noisy update per variable (kernel, bias).
    assert ops[True]["DpsatNoisySgd"] == 2 and ops[True]["DpsatNoisyMean"] == 0
    assert ops[True]["DpsatPerturb"] == 1
    assert ops[True]["StatelessRandomUniformV2"] == 0
    assert not any(k.startswith("Dpsat") for k in ops[False])
    assert ops[False]["StatelessRandomUniformV2"] > 0
    # Without the kernel, the direction's global norm takes one
    # EuclideanNorm per variable (kernel and bias) on top of the clipping's.
    assert ops[False]["EuclideanNorm"] == ops[True]["EuclideanNorm"] + 2
    # Weight decay acts between the noisy mean and the update: the noisy
    # mean is then the kernel's alone, the update TensorFlow's.
    decayed = _dense_model_ops(x, y, True, weight_decay=0.01)
    assert decayed["DpsatNoisyMean"] == 1 and decayed["DpsatNoisySgd"] == 0


def test_the_variables_updates_do_not_wait_for_each_other(native_kernel):
    # The kernels are pure functions of their inputs (the noise of (seed,
    # stream)), not stateful ops: tf.function chains stateful ops in program
    # order, which made each variable's update wait for the previous
    # variable's update and assignments (~0.05x of an MLP step at batch 256).
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 4)), tf.float32)
    y = tf.constant(np.arange(8) % 3)
    with native.enabled(True):
        model = tf_dpsat.DPSequential([keras.Input((4,)),
                                       keras.layers.Dense(5),
                                       keras.layers.Dense(3)])
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0,
            rho=0.1, seed=1), loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
        graphs = graph_ops.train_graphs(model, x, y)
    updates = [op for g in graphs for op in g.get_operations()
               if op.type == "DpsatNoisySgd"]
    assert len(updates) == 4  # two kernels, two biases
    names = {op.name for op in updates}
    for op in updates:
        assert not graph_ops.ancestors(op) & names, op.name
    assert not any(op.op_def.is_stateful for op in updates)


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.9, True),
                                                (0.0, False)])
def test_noisy_sgd_matches_the_numpy_reference(native_kernel, momentum,
                                               nesterov):
    rng = np.random.default_rng(2)
    sums, params, velocities = ([rng.normal(size=s).astype(np.float32)
                                 for s in SHAPES] for _ in range(3))
    seed, stream, stddev, divisor, lr = (3, -4), 5, 0.7, 3.0, 0.25
    z = dp_reference.native_noise([s.size for s in sums], seed, stream)
    offsets = native.chunk_offsets([s.size for s in sums])
    assert offsets == [0, 1, 2, 5, 6]  # SHAPES take 1, 1, 3, 1, 3 chunks
    for s, w, v, noise, first in zip(sums, params, velocities, z, offsets):
        got = native.noisy_sgd(
            tf.constant(s), tf.constant(w),
            tf.constant(v) if momentum else None,
            seed=tf.constant(seed, tf.int64), stream=stream, first_chunk=first,
            stddev=stddev, divisor=divisor, learning_rate=lr,
            momentum=momentum, nesterov=nesterov)
        g = (s.ravel() + stddev * noise) / divisor
        if momentum:  # keras.optimizers.SGD's update
            v_new = v.ravel() * momentum - g * lr
            w_new = w.ravel() + (v_new * momentum - g * lr if nesterov
                                 else v_new)
            np.testing.assert_allclose(got[1].numpy().ravel(), v_new,
                                       rtol=0, atol=1e-5)
        else:
            assert got[1] is None
            w_new = w.ravel() - g * lr
        np.testing.assert_allclose(got[2].numpy().ravel(), g, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[0].numpy().ravel(), w_new, rtol=0,
                                   atol=1e-5)
        assert got[0].shape == s.shape


def test_noisy_sgd_draws_the_noisy_means_noise(native_kernel):
    # Tensor by tensor at its chunk offset, the fused kernel adds exactly
    # what DpsatNoisyMean adds to the list (the same float32 operations).
    rng = np.random.default_rng(3)
    sums = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in SHAPES]
    seed = tf.constant([11, 12], tf.int64)
    means = native_kernel.dpsat_noisy_mean(sums, seed, 7, 0.5, 4.0)
    for s, mean, first in zip(sums, means, native.chunk_offsets(
            [int(tf.size(s)) for s in sums])):
        _, _, g = native.noisy_sgd(s, s, s, seed=seed, stream=7,
                                   first_chunk=first, stddev=0.5, divisor=4.0,
                                   learning_rate=0.1, momentum=0.9,
                                   nesterov=False)
        np.testing.assert_array_equal(g.numpy(), mean.numpy())


def test_noisy_sgd_bad_inputs(native_kernel):
    seed = tf.constant([1, 2], tf.int64)

    def call(s, w, v, first=0):
        return native_kernel.dpsat_noisy_sgd(s, w, v, seed, 0, first, 1.0, 1.0,
                                             0.1, 0.9)

    with pytest.raises(tf.errors.InvalidArgumentError, match="sum and param"):
        call(tf.zeros([4]), tf.zeros([5]), tf.zeros([5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="velocity"):
        call(tf.zeros([4]), tf.zeros([4]), tf.zeros([3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="first_chunk"):
        call(tf.zeros([4]), tf.zeros([4]), tf.zeros([4]), first=-1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="first_chunk"):
        call(tf.zeros([4]), tf.zeros([4]), tf.zeros([4]), first=2**24)


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.0),
    dict(momentum=0.9, direction="momentum"), dict(momentum=0.5, rho=0.0),
    dict(momentum=0.9, cls=tf_dpsat.DPSAMKeras)])
def test_fused_update_matches_the_unfused_step(native_kernel, monkeypatch,
                                               kwargs):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 20)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    kwargs = {"rho": 0.05, **kwargs}
    cls = kwargs.pop("cls", tf_dpsat.DPSATKeras)
    fused_plan = tf_dpsat.DPSATKeras._fused_noise
    results = {}
    for fused in (True, False):
        if not fused:  # the kernel's noisy mean, then TensorFlow's update
            monkeypatch.setattr(tf_dpsat.DPSATKeras, "_fused_noise",
                                lambda self, *args: None)
        keras.utils.set_random_seed(0)
        model = tf_dpsat.make_private(keras.Sequential([
            keras.Input((20,)), keras.layers.Dense(1100, activation="relu"),
            keras.layers.Dense(3)]))  # 23k + 1100 weights: several chunks
        model.compile(optimizer=cls(
            learning_rate=0.5, l2_norm_clip=1.0, noise_multiplier=1.0, seed=3,
            **kwargs), loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
        model.fit(x, y, batch_size=8, verbose=0, shuffle=False)
        ops = graph_ops.train_graph_ops(model, x[:8], y[:8])
        assert (ops["DpsatNoisySgd"] == 4) == fused
        results[fused] = [v.numpy() for v in model.optimizer.variables
                          + model.trainable_variables]
    monkeypatch.setattr(tf_dpsat.DPSATKeras, "_fused_noise", fused_plan)
    # The same float32 operations, up to fused multiply-adds (one rounding).
    for a, b in zip(results[True], results[False]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_build_tag_tracks_tensorflow_source_and_cpu(monkeypatch):
    tag = native.build_tag()
    assert len(tag) == 16 and native.library_name() == f"_noise_kernel_{tag}.so"
    monkeypatch.setattr(native, "_cpu_flags", lambda: "a different cpu")
    assert native.build_tag() != tag
    monkeypatch.setattr(tf, "__version__", "0.0")
    assert native.build_tag() != tag


def test_a_library_that_does_not_load_is_ignored(tmp_path, monkeypatch,
                                                native_kernel):
    broken = tmp_path / native.library_name()
    broken.write_bytes(b"not a shared library")
    with pytest.raises((tf.errors.OpError, OSError)):  # explicit: loud
        tf.load_op_library(str(broken))
    monkeypatch.setattr(native, "_library_path", None)
    monkeypatch.setattr(native, "_candidate_dirs", lambda: [tmp_path])
    assert native.find_library() == broken
    assert native.load() is None  # implicit: TensorFlow's ops instead
    sums = [tf.zeros([6])]
    seed = tf.constant([1, 2], tf.int64)
    assert native.noisy_mean(sums, 1.0, seed, 0, 1.0) is None
    got = clipping.noisy_mean(sums, 1.0, seed, 0, 1.0)[0].numpy()
    want = clipping.gaussian_noise(sums, 1.0, tf.random.experimental.
                                   stateless_fold_in(seed, tf.constant(
                                       0, tf.int64), alg="philox"))[0]
    np.testing.assert_array_equal(got, want.numpy())


def test_not_built_logs_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library_path", None)
    monkeypatch.setattr(native, "_candidate_dirs", lambda: [tmp_path])
    monkeypatch.setattr(native, "_fallback_logged", False)
    messages = []
    monkeypatch.setattr(native.logging, "info",
                        lambda msg, *args: messages.append(msg % args))
    assert native.noisy_mean([tf.zeros([3])], 1.0,
                             tf.constant([1, 2], tf.int64), 0, 1.0) is None
    native.noisy_mean([tf.zeros([3])], 1.0, tf.constant([1, 2], tf.int64), 0,
                      1.0)
    assert len(messages) == 1 and "-m tf_dpsat.native" in messages[0]


def test_a_build_replaces_only_this_installations_old_builds(tmp_path,
                                                            monkeypatch):
    package, cache = tmp_path / "package", tmp_path / "cache"
    for directory in (package, cache):
        directory.mkdir()
        for name in ("_noise_kernel_0123456789abcdef.so", "new.so", "other.so"):
            (directory / name).write_bytes(b"")
    monkeypatch.setattr(native, "SOURCE", package / "noise_kernel.cc")
    for directory in (package, cache):
        target = directory / "_noise_kernel_fedcba9876543210.so"
        target.write_bytes(b"")
        native._remove_old_builds(target)
    assert sorted(p.name for p in package.iterdir()) == [
        "_noise_kernel_fedcba9876543210.so", "new.so", "other.so"]
    assert len(list(cache.iterdir())) == 4
