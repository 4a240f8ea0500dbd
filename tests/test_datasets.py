"""Tests for tf_dpsat.experiments.datasets: loaders and normalisation."""

import gzip
import os
import pickle
import struct
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_dpsat.experiments import datasets

# ---------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------


def test_normalize_golden_values():
    # (0 - 0.4914) / 0.2023 = -2.4290657, (1 - 0.4914) / 0.2023 = 2.5140880,
    # (128/255 - 0.4465) / 0.2010 = 0.2759243; MNIST 255 -> (1 - 0.1307) / 0.3081
    # = 2.8214865, 0 -> -0.4242129.
    cifar = np.array([[[[0, 255, 128]]]], np.uint8)
    expected = np.array([-2.4290657, (1 - 0.4822) / 0.1994, 0.2759243], np.float32)
    from_tf = datasets.normalize(tf.constant(cifar), "cifar10").numpy()
    for out in (datasets.normalize(cifar, "cifar10"), from_tf):
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-6)
    mnist = np.array([[[[255]], [[0]]]], np.uint8)
    np.testing.assert_allclose(datasets.normalize(mnist, "mnist").reshape(-1),
                               [2.8214865, -0.4242129], rtol=1e-6)
    # Float input is taken as already in [0, 1].
    np.testing.assert_allclose(datasets.normalize(np.ones((1, 1), np.float32), "digits"), [[1.0]])
    with pytest.raises(ValueError):
        datasets.normalize(cifar, "mnist")  # 3 channels vs 1.
    assert datasets.NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert datasets.NORMALIZATION["fashion_mnist"] == ((0.1307,), (0.3081,))


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
    ds = datasets.load_dataset("mnist", raw_data_dir=str(tmp_path))
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
    np.testing.assert_array_equal(datasets.read_idx(path), good)
    wide = np.arange(6, dtype=">i4").reshape(2, 3)  # Big-endian int32 values.
    _write_idx(path, wide)
    out = datasets.read_idx(path)
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
            datasets.read_idx(bad)


def test_idx_missing_file_and_count_mismatch(tmp_path):
    with pytest.raises(datasets.DatasetNotAvailableError, match="--raw_data_dir"):
        datasets.load_dataset("fashion_mnist", raw_data_dir=str(tmp_path))
    _write_mnist_like(str(tmp_path))
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        datasets.load_dataset("mnist", raw_data_dir=str(tmp_path))


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
    ds = datasets.load_dataset("cifar10", raw_data_dir=str(tmp_path))
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
        datasets.load_dataset("cifar10", raw_data_dir=str(tmp_path))
    os.remove(tmp_path / "test_batch")
    with pytest.raises(datasets.DatasetNotAvailableError, match="test_batch"):
        datasets.load_dataset("cifar10", raw_data_dir=str(tmp_path))


def test_load_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    for split, n in (("train", 4), ("test", 2)):
        x = np.arange(32 * 32 * 3 * n, dtype=np.int64).reshape(32, 32, 3, n) % 256
        scipy_io.savemat(str(tmp_path / f"{split}_32x32.mat"),
                         {"X": x.astype(np.uint8), "y": np.array([[10], [1], [9], [10]][:n])})
    ds = datasets.load_dataset("svhn_cropped", raw_data_dir=str(tmp_path))
    assert ds.train_images.shape == (4, 32, 32, 3)
    assert ds.train_images[2, 1, 0, 1] == (((1 * 32 + 0) * 3 + 1) * 4 + 2) % 256
    np.testing.assert_array_equal(ds.train_labels, [0, 1, 9, 0])


_FASHION = datasets.DEBIAN_FASHION_MNIST_DIR


@pytest.mark.skipif(not os.path.isfile(os.path.join(_FASHION, "train-images-idx3-ubyte.gz")),
                    reason=f"Fashion-MNIST not installed in {_FASHION} "
                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    ds = datasets.load_dataset("fashion_mnist", raw_data_dir=_FASHION)
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    np.testing.assert_array_equal(np.unique(ds.train_labels), np.arange(10))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)  # Balanced.


def test_digits():
    from sklearn.datasets import load_digits

    ds = datasets.load_dataset("digits")
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
        ds = datasets.load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.train_images.shape == (5, 28, 28, 1) and ds.test_images.shape == (5, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_tfds_unprepared_fails_fast(tmp_path, name, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    # No network (as on our machines); also keeps a networked CI from downloading.
    monkeypatch.setattr(datasets, "_reachable", lambda host, port: False)
    start = time.monotonic()
    with pytest.raises(datasets.DatasetNotAvailableError) as info:
        datasets.load_dataset(name, data_dir=str(tmp_path))
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
    with pytest.raises(datasets.DatasetNotAvailableError,
                       match="downloading is off.*--raw_data_dir"):
        datasets.load_dataset("mnist", data_dir=str(tmp_path), download=False)


def test_tfds_downloads_when_the_host_answers(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def fake_download_and_prepare(builder, *args, **kwargs):
        calls.append((builder.name, builder.data_dir))
        raise RuntimeError("download stubbed")

    monkeypatch.setattr(datasets, "_reachable", lambda host, port: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        fake_download_and_prepare)
    with pytest.raises(RuntimeError, match="download stubbed"):
        datasets.load_dataset("mnist", data_dir=str(tmp_path))
    assert len(calls) == 1 and calls[0][0] == "mnist"
    assert calls[0][1].startswith(str(tmp_path))


def test_reachable_on_real_local_sockets():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert datasets._reachable("127.0.0.1", server.getsockname()[1], timeout=2)
    # The same port once closed: connection refused.
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert not datasets._reachable("127.0.0.1", port, timeout=2)
    assert not datasets._reachable("no-such-host.invalid", 80, timeout=2)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown dataset"):
        datasets.load_dataset("imagenet")


@pytest.mark.parametrize("content, cause", [
    (gzip.compress(bytes(range(256)) * 4)[:100], "Compressed file ended before"),
    (b"plain bytes", "Not a gzipped file"),
])
def test_read_idx_names_a_corrupt_gzip_file_and_the_fix(tmp_path, content, cause):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(datasets.validation.UserError) as error:
        datasets.read_idx(str(path))
    assert str(error.value).startswith(f"{path}: not a complete gzip file ({cause}")
    assert str(error.value).endswith("); download it again or delete it.")
