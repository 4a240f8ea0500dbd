"""Datasets of the experiment kit: loading into memory, and normalisation.

Loading:
  `load_dataset` returns a whole dataset as numpy arrays in memory (every
  dataset of the DP-SAT paper fits). Three routes, tried in this order:

  * `digits`: scikit-learn's bundled 8x8 digits, no files needed.
  * `raw_data_dir`: offline files (MNIST / Fashion-MNIST IDX files, the
    extracted CIFAR-10 python pickles, SVHN `*_32x32.mat` files). Debian's
    `dataset-fashion-mnist` package installs Fashion-MNIST under
    `/usr/share/datasets/fashion-mnist`.
  * tensorflow-datasets with `data_dir`: read a prepared dataset, or prepare
    it first (`download=True`, the default) when the dataset's download host
    answers within seconds. Without a network (or with `download=False`) an
    unprepared dataset fails within seconds with
    `DatasetNotAvailableError`, instead of tfds' minutes of retries.

Private batch sampling (Poisson sampling with padding, shuffled and
evaluation batches) is part of the core: `tf_dpsat.sampling`.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import socket
import threading
import zlib
from typing import Any
from typing import Optional
from typing import Sequence
from typing import Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from tf_dpsat import validation

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "Dataset",
    "DatasetNotAvailableError",
    "NORMALIZATION",
    "load_dataset",
    "normalize",
    "read_idx",
]

DATASETS: Tuple[str, ...] = ("cifar10", "fashion_mnist", "mnist", "svhn_cropped", "digits")

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Per-channel (mean, std) of images scaled to [0, 1].
# CIFAR-10, MNIST and Fashion-MNIST use the DP-SAT authors' constants.
# SVHN and digits use the data-independent (0.5, 0.5), which maps [0, 1] to
# [-1, 1]: statistics computed from a private training set would themselves
# need a privacy budget, and SVHN cannot be inspected offline here.
NORMALIZATION: dict = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.1307,), (0.3081,)),
    "svhn_cropped": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "digits": ((0.5,), (0.5,)),
}

_NUM_CLASSES = {name: 10 for name in DATASETS}

# scikit-learn's digits come in a fixed order; the first 1,500 are the train
# split and the remaining 297 the test split.
DIGITS_NUM_TRAIN = 1500

class DatasetNotAvailableError(FileNotFoundError):
    """A dataset is neither in `raw_data_dir` nor prepared in `data_dir`."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory.

    Attributes:
      name: One of `DATASETS`.
      train_images: `(N, H, W, C)` uint8 array with values 0..255.
      train_labels: `(N,)` int64 array of class ids.
      test_images: `(M, H, W, C)` uint8 array.
      test_labels: `(M,)` int64 array.
      num_classes: Number of classes.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """`(H, W, C)` of one image."""
        return tuple(self.train_images.shape[1:])


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def load_dataset(name: str, *, data_dir: Optional[str] = None,
                 raw_data_dir: Optional[str] = None,
                 download: bool = True) -> Dataset:
    """Loads a dataset into memory as uint8 images and int64 labels.

    Args:
      name: One of `DATASETS`.
      data_dir: tensorflow-datasets directory holding an already prepared
        copy (`None`: tfds' default). Used when `raw_data_dir` is None.
      raw_data_dir: Directory with the original files: the four MNIST-style
        `*-ubyte.gz` IDX files, the extracted CIFAR-10 pickles (directly or
        in `cifar-10-batches-py/`), or SVHN's `train_32x32.mat` and
        `test_32x32.mat`. Takes precedence over `data_dir`.
      download: Let tensorflow-datasets download and prepare a dataset that
        is not prepared in `data_dir`, provided its download host answers
        within seconds.

    Returns:
      A `Dataset`.

    Raises:
      ValueError: Unknown name, or files whose contents are malformed.
      DatasetNotAvailableError: The files are missing, or the tfds dataset
        is not prepared and cannot be downloaded (within seconds).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")
    if name == "digits":
        dataset = _load_digits()
    elif raw_data_dir is not None:
        dataset = _load_raw(name, raw_data_dir)
    else:
        dataset = _load_tfds(name, data_dir, download)
    _validate_dataset(dataset)
    logging.info("Loaded %s: train %s, test %s.", name,
                 dataset.train_images.shape, dataset.test_images.shape)
    return dataset


def _make_dataset(name: str, train: Tuple[np.ndarray, np.ndarray],
                  test: Tuple[np.ndarray, np.ndarray]) -> Dataset:
    return Dataset(name=name,
                   train_images=np.asarray(train[0], np.uint8),
                   train_labels=np.asarray(train[1], np.int64),
                   test_images=np.asarray(test[0], np.uint8),
                   test_labels=np.asarray(test[1], np.int64),
                   num_classes=_NUM_CLASSES[name])


def _validate_dataset(ds: Dataset) -> None:
    for split in ("train", "test"):
        images = getattr(ds, f"{split}_images")
        labels = getattr(ds, f"{split}_labels")
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{ds.name} {split}: expected images (N, H, W, C) and labels (N,), "
                f"got {images.shape} and {labels.shape}.")
        if labels.size and (labels.min() < 0 or labels.max() >= ds.num_classes):
            raise ValueError(
                f"{ds.name} {split}: labels must lie in [0, {ds.num_classes}), got "
                f"[{labels.min()}, {labels.max()}].")


def _load_digits() -> Dataset:
    # Imported lazily: scikit-learn is only needed for this toy dataset.
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            f"The digits dataset needs scikit-learn ({error}): "
            'pip install "tf_dpsat[experiments]".') from error

    bunch = load_digits()
    # Pixel values are 0..16; rescale to 0..255 so every dataset is uint8
    # and normalize() treats them alike (16 -> 255, 8 -> 128, 0 -> 0).
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    n = DIGITS_NUM_TRAIN
    return _make_dataset("digits", (images[:n], labels[:n]), (images[n:], labels[n:]))


def _load_raw(name: str, raw_data_dir: str) -> Dataset:
    if not os.path.isdir(raw_data_dir):
        raise DatasetNotAvailableError(
            f"--raw_data_dir {raw_data_dir!r} is not a directory.{_hint(name)}")
    if name in ("mnist", "fashion_mnist"):
        return _load_idx_dataset(name, raw_data_dir)
    if name == "cifar10":
        return _load_cifar10(raw_data_dir)
    return _load_svhn_mat(raw_data_dir)


def _hint(name: str) -> str:
    hint = (f" Pass --raw_data_dir pointing at the original files of {name!r}, or "
            f"--data_dir pointing at a tensorflow-datasets directory where {name!r} "
            "is already prepared.")
    if name == "fashion_mnist":
        hint += (" For Fashion-MNIST on Debian/Ubuntu: `apt-get install "
                 f"dataset-fashion-mnist`, then --raw_data_dir {DEBIAN_FASHION_MNIST_DIR}.")
    return hint


# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type code, the number of dimensions `d`, then
    `d` big-endian uint32 sizes, then the values in row-major order.

    Args:
      path: File path; a `.gz` suffix means gzip compression.

    Returns:
      The array, in native byte order.

    Raises:
      tf_dpsat.validation.UserError: A truncated or corrupt gzip file, a bad
        magic number, an unknown type code, or a size mismatch.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise validation.UserError(
            f"{path}: not a complete gzip file ({error}); download it again or "
            "delete it.") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise validation.UserError(f"{path}: not an IDX file (magic number must start with "
                         f"two zero bytes, got {raw[:4].hex() or 'empty file'}).")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise validation.UserError(f"{path}: unknown IDX type code 0x{type_code:02x}.")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise validation.UserError(f"{path}: truncated IDX header ({len(raw)} bytes).")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise validation.UserError(f"{path}: header promises dims {dims} ({expected} bytes of "
                         f"data) but the file has {len(raw) - header_len}.")
    data = np.frombuffer(raw, dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(directory: str, base: str, name: str) -> str:
    # Accept both the distributed .gz files and already gunzipped ones.
    for candidate in (base + ".gz", base):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DatasetNotAvailableError(
        f"{name}: {base}.gz not found in --raw_data_dir {directory!r}.{_hint(name)}")


def _load_idx_split(name: str, directory: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    image_base, label_base = _IDX_FILES[split]
    images = read_idx(_find_file(directory, image_base, name))
    labels = read_idx(_find_file(directory, label_base, name))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} {split} images: expected 3-D uint8 IDX data, got "
                         f"{images.ndim}-D {images.dtype}.")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{name} {split} labels: expected 1-D uint8 IDX data, got "
                         f"{labels.ndim}-D {labels.dtype}.")
    if len(images) != len(labels):
        raise ValueError(f"{name} {split}: {len(images)} images but {len(labels)} labels.")
    return images[..., None], labels


def _load_idx_dataset(name: str, directory: str) -> Dataset:
    return _make_dataset(name, _load_idx_split(name, directory, "train"),
                         _load_idx_split(name, directory, "test"))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, not run arbitrary code.

    CIFAR-10's batches are pickles; a plain `pickle.load` of a tampered file
    in `raw_data_dir` would execute whatever it names.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"CIFAR-10 pickle refers to {module}.{name}; only numpy arrays are allowed.")
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        # encoding="bytes": the files were written by Python 2.
        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise validation.UserError(f"{path}: expected a dict with b'data' and b'labels'.")
    data = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise validation.UserError(f"{path}: expected data (n, 3072) and n labels, got "
                         f"{data.shape} and {labels.shape}.")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue); make NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _load_cifar10(raw_data_dir: str) -> Dataset:
    directory = raw_data_dir
    nested = os.path.join(raw_data_dir, "cifar-10-batches-py")
    if not os.path.isfile(os.path.join(directory, "test_batch")) and os.path.isdir(nested):
        directory = nested
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise DatasetNotAvailableError(
            f"cifar10: {missing} not found in --raw_data_dir {raw_data_dir!r} (or its "
            "cifar-10-batches-py/); extract cifar-10-python.tar.gz there."
            f"{_hint('cifar10')}")
    parts = [_read_cifar_batch(os.path.join(directory, n)) for n in names]
    train_images = np.concatenate([p[0] for p in parts[:5]])
    train_labels = np.concatenate([p[1] for p in parts[:5]])
    return _make_dataset("cifar10", (train_images, train_labels), parts[5])


def _load_svhn_mat(raw_data_dir: str) -> Dataset:
    import scipy.io  # Lazy: only this route needs it.

    splits = []
    for split in ("train", "test"):
        path = os.path.join(raw_data_dir, f"{split}_32x32.mat")
        if not os.path.isfile(path):
            raise DatasetNotAvailableError(
                f"svhn_cropped: {path} not found.{_hint('svhn_cropped')}")
        mat = scipy.io.loadmat(path)
        images = np.asarray(mat["X"], np.uint8).transpose(3, 0, 1, 2)  # HWCN -> NHWC
        # The .mat files label the digit 0 as 10.
        labels = np.asarray(mat["y"], np.int64).reshape(-1) % 10
        splits.append((images, labels))
    return _make_dataset("svhn_cropped", splits[0], splits[1])


# Where tensorflow-datasets downloads each dataset from (its builders' URLs).
_DOWNLOAD_HOSTS = {
    "cifar10": ("www.cs.toronto.edu", 443),
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "svhn_cropped": ("ufldl.stanford.edu", 80),
}
_REACHABLE_TIMEOUT_S = 5.0


def _reachable(host: str, port: int, timeout: float = _REACHABLE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within about `timeout` s.

    Runs in a daemon thread so that a hanging DNS lookup (which has no
    timeout of its own) cannot hold the caller longer.
    """
    result = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(2 * timeout)
    return bool(result and result[0])


def _load_tfds(name: str, data_dir: Optional[str], download: bool) -> Dataset:
    # Imported lazily: tensorflow-datasets is slow to import, logs on import,
    # and the digits and raw-file routes do not need it.
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Dataset {name!r} without --raw_data_dir needs tensorflow-datasets "
            f'({error}): pip install "tf_dpsat[experiments]".') from error

    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    where = f"tensorflow-datasets --data_dir {data_dir or '(tfds default)'!r}"
    try:
        splits = [_tfds_split_to_numpy(tfds, builder, s) for s in ("train", "test")]
    except AssertionError as e:
        # tfds signals "not prepared in data_dir" with an AssertionError.
        if not download:
            raise DatasetNotAvailableError(
                f"{name} is not prepared in {where} and downloading is off."
                f"{_hint(name)}") from e
        host, port = _DOWNLOAD_HOSTS[name]
        # tfds would retry an unreachable host for minutes; fail in seconds.
        if not _reachable(host, port):
            raise DatasetNotAvailableError(
                f"{name} is not prepared in {where}, and its download host "
                f"{host}:{port} cannot be reached.{_hint(name)}") from e
        logging.info("Downloading and preparing %s into %s.", name, where)
        builder.download_and_prepare()
        splits = [_tfds_split_to_numpy(tfds, builder, s) for s in ("train", "test")]
    return _make_dataset(name, splits[0], splits[1])


def _tfds_split_to_numpy(tfds: Any, builder: Any, split: str) -> Tuple[np.ndarray, np.ndarray]:
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    # Batched reads rather than batch_size=-1: the latter needs the split's
    # cardinality, which tfds' mock_data cannot provide.
    images, labels = [], []
    for x, y in tfds.as_numpy(ds.batch(10_000)):
        images.append(x)
        labels.append(y)
    if not images:
        raise ValueError(f"tfds split {builder.name}/{split} is empty.")
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------
# Normalisation.
# --------------------------------------------------------------------------


def normalize(images: Any, name: str) -> Any:
    """Scales images to [0, 1], then applies `(x - mean) / std` per channel.

    Integer images are divided by 255; floating images are assumed to be in
    [0, 1] already.

    Args:
      images: `(..., C)` numpy array or tf.Tensor.
      name: Dataset name selecting `NORMALIZATION`'s constants.

    Returns:
      float32 array of the same shape; a tf.Tensor if `images` is one.

    Raises:
      ValueError: Unknown name or channel-count mismatch.
    """
    if name not in NORMALIZATION:
        raise ValueError(f"No normalization constants for {name!r}.")
    mean, std = NORMALIZATION[name]
    channels = images.shape[-1]
    if channels is not None and channels != len(mean):
        raise ValueError(f"{name} normalization expects {len(mean)} channels, "
                         f"images have {channels}.")
    if isinstance(images, (tf.Tensor, tf.Variable)):
        return _normalize_tensor(images, mean, std)
    images = np.asarray(images)
    scale = 1.0 / 255.0 if np.issubdtype(images.dtype, np.integer) else 1.0
    x = images.astype(np.float32) * np.float32(scale)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _normalize_tensor(images: tf.Tensor, mean: Sequence[float],
                      std: Sequence[float]) -> tf.Tensor:
    """TF version of `normalize` as one fused multiply-add."""
    to_unit = 1.0 / 255.0 if images.dtype.is_integer else 1.0
    scale = np.asarray([to_unit / s for s in std], np.float32)
    offset = np.asarray([-m / s for m, s in zip(mean, std)], np.float32)
    image_shape = images.shape[1:]
    if images.shape.rank and images.shape.rank > 1 and image_shape.is_fully_defined():
        # Constants shaped like one whole image so TF broadcasts only over the
        # batch axis, which CPU kernels do faster than broadcasting a
        # length-C vector over the innermost axis.
        scale = np.broadcast_to(scale, image_shape).copy()
        offset = np.broadcast_to(offset, image_shape).copy()
    return tf.cast(images, tf.float32) * scale + offset
