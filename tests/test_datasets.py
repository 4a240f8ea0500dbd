"""Tests for tf_dpsat.data: loaders, normalisation and the Poisson pipeline."""

import functools
import gzip
import math
import os
import pickle
import re
import struct
import time
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from tf_dpsat import data


# ---------------------------------------------------------------------------
# padded_batch_size
# ---------------------------------------------------------------------------


def _exact_cap(n, steps, failure_probability):
    """Smallest c with steps * P(Binomial(n, 1/10) > c) <= failure_probability.

    Exact rational arithmetic, independent of scipy:
    P(X = k) = C(n, k) 9^(n-k) / 10^n.
    """
    bound = Fraction(failure_probability)
    tail = Fraction(0)  # P(X > c), built from the top down.
    for c in range(n, -1, -1):
        if steps * tail > bound:
            return c + 1
        tail += Fraction(math.comb(n, c) * 9 ** (n - c), 10 ** n)
    return 0


# Golden values (hand computation with _exact_cap, q = 0.1):
#   N=100,  E=10,  steps=1,   p=1e-6 -> 27
#   N=1000, E=100, steps=1,   p=1e-6 -> 148
#   N=1000, E=100, steps=100, p=1e-6 -> 157
#   N=1000, E=100, steps=100, p=1e-3 -> 143
@pytest.mark.parametrize("n,expected,steps,p,golden", [
    (100, 10, 1, 1e-6, 27),
    (1000, 100, 1, 1e-6, 148),
    (1000, 100, 100, 1e-6, 157),
    (1000, 100, 100, 1e-3, 143),
])
def test_padded_batch_size_golden(n, expected, steps, p, golden):
    assert _exact_cap(n, steps, p) == golden
    assert data.padded_batch_size(expected, n, steps, failure_probability=p) == golden


def test_padded_batch_size_monotonic_and_rounding():
    base = data.padded_batch_size(2000, 50000, 200)
    assert base == 2256  # scipy-based; CIFAR-10 at q = 0.04.
    # More steps or a stricter bound never shrink the cap.
    caps = [data.padded_batch_size(2000, 50000, s) for s in (1, 10, 100, 1000, 10000)]
    assert caps == sorted(caps) and caps[0] < caps[-1]
    caps = [data.padded_batch_size(2000, 50000, 200, failure_probability=p)
            for p in (1e-2, 1e-4, 1e-6, 1e-9, 1e-12)]
    assert caps == sorted(caps) and caps[0] < caps[-1]
    rounded = data.padded_batch_size(2000, 50000, 200, multiple_of=512)
    assert rounded % 512 == 0 and base <= rounded < base + 512
    # q = 1 includes everything: the cap is exactly N.
    assert data.padded_batch_size(50, 50, 10) == 50


@pytest.mark.parametrize("kwargs", [
    dict(expected_batch_size=0, num_examples=10, steps=1),
    dict(expected_batch_size=11, num_examples=10, steps=1),
    dict(expected_batch_size=5, num_examples=10, steps=0),
    dict(expected_batch_size=5, num_examples=10, steps=1, failure_probability=0.0),
    dict(expected_batch_size=5, num_examples=10, steps=1, multiple_of=0),
])
def test_padded_batch_size_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        data.padded_batch_size(**kwargs)


# ---------------------------------------------------------------------------
# poisson_dataset
# ---------------------------------------------------------------------------


def _index_data(n, shape=(1, 1, 1)):
    """Images whose every pixel is (index % 250) + 1, labels = index."""
    images = np.broadcast_to(((np.arange(n) % 250) + 1).astype(np.uint8).reshape(-1, 1, 1, 1),
                             (n,) + shape).copy()
    return images, np.arange(n, dtype=np.int64)


def _collect(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


def test_poisson_inclusion_rate_and_batch_size_moments():
    n, expected, steps = 200, 20, 2000
    q = expected / n
    images, labels = _index_data(n)
    ds = data.poisson_dataset(images, labels, expected_batch_size=expected, steps=steps,
                              padded_size=data.padded_batch_size(expected, n, steps), seed=7)
    counts = np.zeros(n)
    sizes = []
    for _, y, w in _collect(ds):
        sampled = y[w > 0]
        assert len(np.unique(sampled)) == len(sampled)  # No example twice in a step.
        counts[sampled] += 1
        sizes.append(len(sampled))
    sizes = np.asarray(sizes, np.float64)
    # Per-example inclusion count ~ Binomial(steps, q): std of its rate is
    # sqrt(q(1-q)/steps) = 0.0067; allow 5 sigma (0.034).
    rate_tol = 5 * math.sqrt(q * (1 - q) / steps)
    assert np.max(np.abs(counts / steps - q)) < rate_tol
    # Batch size ~ Binomial(n, q): mean 20, variance n q (1-q) = 18.
    # Std of the sample mean: sqrt(18 / steps) = 0.095 -> 5 sigma = 0.47.
    var = n * q * (1 - q)
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(var / steps)
    # Std of the sample variance ~ var * sqrt((2 + excess kurtosis) / (steps - 1))
    # with binomial excess kurtosis (1 - 6q(1-q)) / var; 5 sigma = 2.9.
    kurt = (1 - 6 * q * (1 - q)) / var
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt((2 + kurt) / (steps - 1))


def test_poisson_static_shapes_and_padding():
    n = 300
    images, labels = _index_data(n, shape=(4, 4, 3))
    preprocess = functools.partial(data.normalize, name="cifar10")
    ds = data.poisson_dataset(images, labels, expected_batch_size=30, steps=20, padded_size=64,
                              seed=3, preprocess=preprocess)
    for spec in ds.element_spec:
        assert spec.shape.is_fully_defined()
    x_spec, y_spec, w_spec = ds.element_spec
    assert x_spec.shape == (64, 4, 4, 3) and x_spec.dtype == tf.float32
    assert y_spec.shape == (64,) and w_spec.shape == (64,) and w_spec.dtype == tf.float32
    for x, y, w in _collect(ds):
        real = w > 0
        k = int(real.sum())
        assert set(np.unique(w)) <= {0.0, 1.0}
        assert real[:k].all() and not real[k:].any()  # Sampled rows first.
        # Padding is inert: zero image (not -mean/std), label 0, weight 0.
        np.testing.assert_array_equal(x[k:], 0.0)
        np.testing.assert_array_equal(y[k:], 0)
        assert np.all(np.diff(y[:k]) > 0)  # Distinct, in index order.
        np.testing.assert_allclose(x[:k], data.normalize(images[y[:k]], "cifar10"),
                                   rtol=1e-5, atol=1e-5)


def test_poisson_is_deterministic_and_resumable():
    images, labels = _index_data(500)
    make = functools.partial(data.poisson_dataset, images, labels, expected_batch_size=50,
                             steps=12, padded_size=100)
    full = _collect(make(seed=11))
    again = _collect(make(seed=11))
    resumed = _collect(make(seed=11, start_step=5))
    other = _collect(make(seed=12))
    assert len(full) == 12 and len(resumed) == 7
    for a, b in zip(full, again):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    for a, b in zip(full[5:], resumed):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(full, other))
    # Steps differ from one another too (the step is part of the RNG key).
    assert not np.array_equal(full[0][1], full[1][1])


def test_default_sampling_key_is_secret_and_fresh():
    # No seed: each dataset draws its key from OS entropy, so two of them
    # sample different batches (12 steps of ~50 of 500 examples: identical
    # samples by chance have probability far below 1e-100).
    images, labels = _index_data(500)
    make = functools.partial(data.poisson_dataset, images, labels, expected_batch_size=50,
                             steps=12, padded_size=100)
    a, b = _collect(make()), _collect(make())
    assert any(not np.array_equal(u[1], v[1]) for u, v in zip(a, b))
    first = [_collect(data.shuffle_dataset(images, labels, batch_size=50))
             for _ in range(2)]
    assert any(not np.array_equal(u[1], v[1]) for u, v in zip(*first))


def test_poisson_overflow_raises_with_clear_message():
    images, labels = _index_data(100)
    # q = 0.9 with a cap of 90: P(Binomial(100, 0.9) > 90) ~ 0.45 per step, so
    # 40 steps overflow except with probability ~1e-10 (and the seed is fixed).
    ds = data.poisson_dataset(images, labels, expected_batch_size=90, steps=40,
                              padded_size=90, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _collect(ds)
    match = re.search(r"overflow at step (\d+): (\d+) examples sampled but padded_size is 90",
                      info.value.message)
    assert match, info.value.message
    assert int(match.group(2)) > 90
    assert "padded_batch_size" in info.value.message


def test_poisson_under_mirrored_strategy_and_one_hot_labels(mirrored_strategy):
    # tf.distribute splits the static padded batch evenly across replicas
    # (conftest provides 2 logical CPUs); multiple_of keeps it divisible.
    images, labels = _index_data(64)
    one_hot = np.eye(64, dtype=np.float32)
    padded = data.padded_batch_size(16, 64, 3, multiple_of=2)
    ds = data.poisson_dataset(images, one_hot, expected_batch_size=16, steps=3,
                              padded_size=padded, seed=1)
    strategy = mirrored_strategy
    for x, y, w in strategy.experimental_distribute_dataset(ds):
        parts = strategy.experimental_local_results(y)
        assert len(parts) == 2 and all(p.shape == (padded // 2, 64) for p in parts)
    for _, y, w in _collect(ds):
        np.testing.assert_array_equal(y.sum(axis=1), w)  # Padding rows all zero.


@pytest.mark.parametrize("kwargs", [
    dict(padded_size=10),  # Below the expected batch size.
    dict(start_step=11),
    dict(seed=-1),
    dict(expected_batch_size=0),
])
def test_poisson_rejects_bad_arguments(kwargs):
    images, labels = _index_data(100)
    args = dict(expected_batch_size=20, steps=10, padded_size=40, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        data.poisson_dataset(images, labels, **args)
    with pytest.raises(ValueError):
        data.poisson_dataset(images, labels[:-1], expected_batch_size=20, steps=10,
                             padded_size=40, seed=0)


# ---------------------------------------------------------------------------
# shuffle_dataset / test_dataset
# ---------------------------------------------------------------------------


def test_shuffle_dataset_epochs():
    images, labels = _index_data(103)
    make = functools.partial(data.shuffle_dataset, images, labels, batch_size=10, seed=5)
    epoch0 = _collect(make(epoch=0))
    assert len(epoch0) == 10  # drop_remainder: 3 examples dropped.
    assert make(epoch=0).element_spec[0].shape == (10, 1, 1, 1)
    seen = np.concatenate([y for _, y, _ in epoch0])
    assert len(np.unique(seen)) == 100  # Each example at most once.
    assert all((w == 1.0).all() for _, _, w in epoch0)
    np.testing.assert_array_equal(seen, np.concatenate([y for _, y, _ in _collect(make(epoch=0))]))
    epoch1 = np.concatenate([y for _, y, _ in _collect(make(epoch=1))])
    assert not np.array_equal(seen, epoch1)
    everything = np.concatenate([y for _, y, _ in _collect(make(epoch=2, drop_remainder=False))])
    np.testing.assert_array_equal(np.sort(everything), labels)


def test_test_dataset_covers_all_in_order():
    images, labels = _index_data(25)
    batches = _collect(data.test_dataset(images, labels, batch_size=10))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)
    np.testing.assert_array_equal(batches[0][0], images[:10].astype(np.float32))


# ---------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------


def test_normalize_golden_values():
    # (0 - 0.4914) / 0.2023 = -2.4290657, (1 - 0.4914) / 0.2023 = 2.5140880,
    # (128/255 - 0.4465) / 0.2010 = 0.2759243; MNIST 255 -> (1 - 0.1307) / 0.3081
    # = 2.8214865, 0 -> -0.4242129.
    cifar = np.array([[[[0, 255, 128]]]], np.uint8)
    expected = np.array([-2.4290657, (1 - 0.4822) / 0.1994, 0.2759243], np.float32)
    from_tf = data.normalize(tf.constant(cifar), "cifar10").numpy()
    for out in (data.normalize(cifar, "cifar10"), from_tf):
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-6)
    mnist = np.array([[[[255]], [[0]]]], np.uint8)
    np.testing.assert_allclose(data.normalize(mnist, "mnist").reshape(-1),
                               [2.8214865, -0.4242129], rtol=1e-6)
    # Float input is taken as already in [0, 1].
    np.testing.assert_allclose(data.normalize(np.ones((1, 1), np.float32), "digits"), [[1.0]])
    with pytest.raises(ValueError):
        data.normalize(cifar, "mnist")  # 3 channels vs 1.
    assert data.NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert data.NORMALIZATION["fashion_mnist"] == ((0.1307,), (0.3081,))


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------


def _write_idx(path, array):
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _write_mnist_like(directory, n_train=6, n_test=4, h=3, w=5):
    def split(n, prefix, offset):
        i, r, c = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
        images = ((i + offset) * 7 + r * 3 + c).astype(np.uint8)
        labels = ((np.arange(n) + offset) % 10).astype(np.uint8)
        _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    split(n_train, "train", 0)
    split(n_test, "t10k", 100)


def test_load_idx_files(tmp_path):
    _write_mnist_like(str(tmp_path))
    ds = data.load_dataset("mnist", raw_data_dir=str(tmp_path))
    assert ds.train_images.shape == (6, 3, 5, 1) and ds.test_images.shape == (4, 3, 5, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    assert ds.num_classes == 10 and ds.name == "mnist"
    i, r, c = 4, 2, 3
    assert ds.train_images[i, r, c, 0] == i * 7 + r * 3 + c
    assert ds.test_images[1, 0, 0, 0] == (101 * 7) % 256
    np.testing.assert_array_equal(ds.train_labels, np.arange(6) % 10)
    np.testing.assert_array_equal(ds.test_labels, (np.arange(4) + 100) % 10)


def test_read_idx_validation(tmp_path):
    good = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path = str(tmp_path / "good.gz")
    _write_idx(path, good)
    np.testing.assert_array_equal(data.read_idx(path), good)
    wide = np.arange(6, dtype=">i4").reshape(2, 3)  # Big-endian int32 values.
    _write_idx(path, wide)
    out = data.read_idx(path)
    np.testing.assert_array_equal(out, wide)
    assert out.dtype.isnative
    for name, payload, pattern in [
        ("magic", b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        ("type", b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        ("short", b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00", "dims"),
    ]:
        bad = str(tmp_path / f"{name}.gz")
        with gzip.open(bad, "wb") as f:
            f.write(payload)
        with pytest.raises(ValueError, match=pattern):
            data.read_idx(bad)


def test_idx_missing_file_and_count_mismatch(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError, match="--raw_data_dir"):
        data.load_dataset("fashion_mnist", raw_data_dir=str(tmp_path))
    _write_mnist_like(str(tmp_path))
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        data.load_dataset("mnist", raw_data_dir=str(tmp_path))


def _cifar_batch(n, offset):
    rows = (np.arange(n)[:, None] + offset + np.arange(3072)[None, :]) % 256
    return {b"batch_label": b"x", b"data": rows.astype(np.uint8),
            b"labels": [int((i + offset) % 10) for i in range(n)]}


def test_load_cifar10_pickles(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for b in range(1, 6):
        with open(directory / f"data_batch_{b}", "wb") as f:
            pickle.dump(_cifar_batch(2, 10 * b), f, protocol=2)
    with open(directory / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(3, 100), f, protocol=2)
    ds = data.load_dataset("cifar10", raw_data_dir=str(tmp_path))
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int64
    # Rows are channel-major: pixel (r, c, ch) is data[ch*1024 + r*32 + c].
    i, r, c, ch = 3, 5, 7, 2  # Train image 3 is the 2nd row of data_batch_2.
    assert ds.train_images[i, r, c, ch] == (1 + 20 + ch * 1024 + r * 32 + c) % 256
    np.testing.assert_array_equal(ds.train_labels, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 1, 2])


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    for b in range(1, 6):
        with open(tmp_path / f"data_batch_{b}", "wb") as f:
            pickle.dump(_cifar_batch(1, 0), f, protocol=2)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        data.load_dataset("cifar10", raw_data_dir=str(tmp_path))
    os.remove(tmp_path / "test_batch")
    with pytest.raises(data.DatasetNotAvailableError, match="test_batch"):
        data.load_dataset("cifar10", raw_data_dir=str(tmp_path))


def test_load_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    for split, n in (("train", 4), ("test", 2)):
        x = np.arange(32 * 32 * 3 * n, dtype=np.int64).reshape(32, 32, 3, n) % 256
        scipy_io.savemat(str(tmp_path / f"{split}_32x32.mat"),
                         {"X": x.astype(np.uint8), "y": np.array([[10], [1], [9], [10]][:n])})
    ds = data.load_dataset("svhn_cropped", raw_data_dir=str(tmp_path))
    assert ds.train_images.shape == (4, 32, 32, 3)
    assert ds.train_images[2, 1, 0, 1] == (((1 * 32 + 0) * 3 + 1) * 4 + 2) % 256
    np.testing.assert_array_equal(ds.train_labels, [0, 1, 9, 0])


_FASHION = data.DEBIAN_FASHION_MNIST_DIR


@pytest.mark.skipif(not os.path.isfile(os.path.join(_FASHION, "train-images-idx3-ubyte.gz")),
                    reason=f"Fashion-MNIST not installed in {_FASHION} "
                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    ds = data.load_dataset("fashion_mnist", raw_data_dir=_FASHION)
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    np.testing.assert_array_equal(np.unique(ds.train_labels), np.arange(10))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)  # Balanced.


def test_digits():
    from sklearn.datasets import load_digits

    ds = data.load_dataset("digits")
    assert ds.train_images.shape == (1500, 8, 8, 1) and ds.test_images.shape == (297, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    raw = load_digits()
    np.testing.assert_array_equal(ds.train_labels, raw.target[:1500])
    np.testing.assert_array_equal(ds.test_labels, raw.target[1500:])
    # 0..16 scaled by 255/16 and rounded.
    np.testing.assert_array_equal(ds.test_images[..., 0], np.rint(raw.images[1500:] * 255 / 16))


def test_tfds_route_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        ds = data.load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.train_images.shape == (5, 28, 28, 1) and ds.test_images.shape == (5, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_tfds_unprepared_fails_fast(tmp_path, name, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    # No network (as on our machines); also keeps a networked CI from downloading.
    monkeypatch.setattr(data, "_reachable", lambda host, port: False)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.load_dataset(name, data_dir=str(tmp_path))
    # Behaviour check, not a benchmark: a download attempt would retry for minutes.
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "--raw_data_dir" in message and "--data_dir" in message
    assert "cannot be reached" in message
    if name == "fashion_mnist":
        assert "dataset-fashion-mnist" in message
    # Nothing was fetched into data_dir.
    assert not (tmp_path / "downloads").exists() and not list(tmp_path.rglob("*.tfrecord*"))


def test_tfds_unprepared_with_download_off_names_the_flags(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DatasetNotAvailableError,
                       match="downloading is off.*--raw_data_dir"):
        data.load_dataset("mnist", data_dir=str(tmp_path), download=False)


def test_tfds_downloads_when_the_host_answers(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def fake_download_and_prepare(builder, *args, **kwargs):
        calls.append((builder.name, builder.data_dir))
        raise RuntimeError("download stubbed")

    monkeypatch.setattr(data, "_reachable", lambda host, port: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        fake_download_and_prepare)
    with pytest.raises(RuntimeError, match="download stubbed"):
        data.load_dataset("mnist", data_dir=str(tmp_path))
    assert len(calls) == 1 and calls[0][0] == "mnist"
    assert calls[0][1].startswith(str(tmp_path))


def test_reachable_on_real_local_sockets():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert data._reachable("127.0.0.1", server.getsockname()[1], timeout=2)
    # The same port once closed: connection refused.
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert not data._reachable("127.0.0.1", port, timeout=2)
    assert not data._reachable("no-such-host.invalid", 80, timeout=2)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.load_dataset("imagenet")


@pytest.mark.parametrize("content, cause", [
    (gzip.compress(bytes(range(256)) * 4)[:100], "Compressed file ended before"),
    (b"plain bytes", "Not a gzipped file"),
])
def test_read_idx_names_a_corrupt_gzip_file_and_the_fix(tmp_path, content, cause):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(data.validation.UserError) as error:
        data.read_idx(str(path))
    assert str(error.value).startswith(f"{path}: not a complete gzip file ({cause}")
    assert str(error.value).endswith("); download it again or delete it.")
