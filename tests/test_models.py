"""Tests for tf_dpsat.experiments.models: parameter counts, structure, training steps."""

import functools
import os
import pathlib
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from tf_dpsat.experiments import models

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Expected counts, derived by hand from the authors' PyTorch definitions
# (JinseongP/DPSAT src/utils/models/{dpnas,resnet}.py, ftramer/Handcrafted-DP
# models.py).  Convs in DPNAS and ResNet have no bias; GroupNorm without affine
# (DPNAS) has no parameters, with affine (Opacus' fix, ResNet) 2 * C.
EXPECTED = {
    # DPNASNet_CIFAR = 529,434 ("0.5294M"):
    #   stem conv 3x3x3x48                                   1,296
    #   cell0 (C=48):  1x1 48->48 + 8 depthwise 3x3 (9*C)    2,304 + 3,456
    #   cell1 (C=96):  1x1 240->96 + 8 * 9 * 96             23,040 + 6,912
    #   cell2 (C=192): 1x1 480->192 + 8 * 9 * 192           92,160 + 13,824
    #   adapt 1x1 960->128                                 122,880
    #   Linear 4*4*128 -> 128 (+bias)                      262,272
    #   Linear 128 -> 10 (+bias)                             1,290
    "dpnas_cifar": 529_434,
    # DPNASNet_FMNIST = 214,570 ("0.2146M"): stem 288; cells (7 sep convs)
    # 1,024+2,016, 5,120+2,016, 10,240+4,032; adapt 40,960;
    # Linear 3*3*128->128 147,584; Linear 128->10 1,290.
    "dpnas_fmnist": 214_570,
    # Tramer & Boneh CIFAR-10 CNN: 6 biased 3x3 convs (896 + 9,248 + 18,496 +
    # 36,928 + 73,856 + 147,584) + 262,272 + 1,290.
    "tb_cnn_cifar": 550_570,
    # Tramer & Boneh MNIST CNN: 8x8 conv 1->16 (1,040), 4x4 conv 16->32
    # (8,224), Linear 512->32 (16,416), Linear 32->10 (330).
    "tb_cnn_mnist": 26_010,
    # ResNet10 ([1,1,1,1] basic blocks, 1 input channel) after Opacus' BN->GN
    # fix: 576+128 + 73,984 + 230,144 + 919,040 + 3,673,088 + 5,130 ("4.9021M").
    "resnet10_gn": 4_902_090,
    # Our MLP: 784*256+256 + 256*256+256 + 256*10+10.
    "mlp": 269_322,
}

# Keys whose paper model normalises with GroupNorm.
HAS_GROUP_NORM = {"dpnas_cifar", "dpnas_fmnist", "resnet10_gn"}


@functools.lru_cache(maxsize=None)
def _model(key):
    name, shape = models.PAPER_CONFIGS[key]
    return models.build_model(name, shape, seed=1)


def _random_batch(shape, n=4, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(shape)).astype("float32")
    y = rng.integers(0, num_classes, size=(n,)).astype("int32")
    return x, y


def test_tables_are_consistent():
    assert models.PARAMETER_COUNTS == EXPECTED
    assert set(models.PAPER_CONFIGS) == set(EXPECTED)
    for name, _ in models.PAPER_CONFIGS.values():
        assert name in models.MODEL_NAMES


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_parameter_count_and_structure(key):
    model = _model(key)
    assert isinstance(model, keras.Model)
    assert model.count_params() == EXPECTED[key]
    kinds = [type(layer) for layer in model._flatten_layers()]
    assert keras.layers.BatchNormalization not in kinds
    assert keras.layers.Dropout not in kinds
    assert (keras.layers.GroupNormalization in kinds) == (key in HAS_GROUP_NORM)

    _, shape = models.PAPER_CONFIGS[key]
    x, _ = _random_batch(shape, n=3)
    out = keras.ops.convert_to_numpy(model(x, training=False))
    assert out.shape == (3, 10)
    assert np.all(np.isfinite(out))


def test_group_norm_settings():
    for key, groups, affine in (("dpnas_cifar", 8, False),
                                ("dpnas_fmnist", 8, False),
                                ("resnet10_gn", 32, True)):
        gns = [l for l in _model(key)._flatten_layers()
               if isinstance(l, keras.layers.GroupNormalization)]
        assert gns
        for gn in gns:
            assert gn.groups == groups
            assert gn.center is affine and gn.scale is affine
            assert gn.epsilon == pytest.approx(1e-5)


def test_dispatch_by_channels():
    assert models.build_model("dpnas", (32, 32, 3)).name == "dpnas_cifar"
    assert models.build_model("dpnas", (28, 28, 1)).name == "dpnas_fmnist"
    assert models.build_model("tb_cnn", (32, 32, 3)).name == "tb_cnn_cifar"
    assert models.build_model("tb_cnn", (28, 28, 1)).name == "tb_cnn_mnist"


def test_num_classes():
    model = models.build_model("dpnas_cifar", (32, 32, 3), num_classes=100)
    assert model.output_shape == (None, 100)
    # The authors' DPNASNet_CIFAR100 differs only in the last layer.
    assert model.count_params() == EXPECTED["dpnas_cifar"] + 90 * 129
    assert models.build_model("mlp", (5,), num_classes=3).output_shape == (None, 3)


def test_seeded_initialisation_is_reproducible():
    a = models.build_model("tb_cnn", (28, 28, 1), seed=7)
    b = models.build_model("tb_cnn", (28, 28, 1), seed=7)
    c = models.build_model("tb_cnn", (28, 28, 1), seed=8)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(wa, wc))
    # Every kernel in a model has its own seed: no two are identical.
    kernels = [w for w in wa if w.ndim > 1]
    assert not np.array_equal(kernels[0].ravel()[:16], kernels[1].ravel()[:16])


def test_dpnas_init_matches_pytorch_scale():
    # DPNAS draws conv weights from N(0, 2 / (k*k*out_channels)); for the
    # depthwise convs of cell2 (C=192) that is std sqrt(2 / 1728).
    model = _model("dpnas_cifar")
    dw = [l for l in model._flatten_layers()
          if isinstance(l, keras.layers.DepthwiseConv2D) and l.name.startswith("cell2")]
    values = np.concatenate([keras.ops.convert_to_numpy(l.weights[0]).ravel()
                             for l in dw])
    assert np.std(values) == pytest.approx(np.sqrt(2 / 1728), rel=0.1)


def test_tb_mnist_first_conv_uses_symmetric_padding():
    # PyTorch Conv2d(1, 16, 8, stride=2, padding=2): compare with a direct
    # NumPy cross-correlation over the zero-padded input.
    model = _model("tb_cnn_mnist")
    conv = model.get_layer("conv1")
    x, _ = _random_batch((28, 28, 1), n=1)
    sub = keras.Model(model.input, conv.output)
    got = keras.ops.convert_to_numpy(sub(x))
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in conv.weights)
    xp = np.pad(x[0, :, :, 0], 2)
    want = np.empty((13, 13, 16), np.float32)
    for i in range(13):
        for j in range(13):
            patch = xp[2 * i:2 * i + 8, 2 * j:2 * j + 8]
            want[i, j] = np.tensordot(patch, kernel[:, :, 0, :], axes=2) + bias
    np.testing.assert_allclose(got[0], np.tanh(want), rtol=1e-4, atol=1e-5)


def test_dpnas_all_primitives():
    # A cell using every primitive of the DPNAS search space, including a node
    # fed only by 'none' edges, on a small input.
    genotype = [(4, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 3), (2, 1, 3), (3, 2, 3),
                (5, 0, 4), (6, 1, 4), (7, 2, 4), (8, 3, 4), (9, 0, 5), (3, 4, 5)]
    model = models._dpnas_network(
        (16, 16, 1), 4, genotype, stem_channels=8, doubling_cells=(1,),
        classifier_activation="selu", seeds=models._Seeds(0), name="toy")
    # Params: stem 72; cells 8*8+6*9*8, 40*16+6*9*16, 80*16+6*9*16; adapt
    # 80*128; Dense 2*2*128*128+128; Dense 128*4+4.
    assert model.count_params() == (72 + 496 + 1504 + 2144 + 10240
                                    + 65664 + 516)
    out = keras.ops.convert_to_numpy(model(_random_batch((16, 16, 1), n=2)[0]))
    assert out.shape == (2, 4) and np.all(np.isfinite(out))
    # Node 2 of every cell is exactly zero, as PyTorch's Zero op gives.
    zero = keras.Model(model.input, model.get_layer("cell0_n2_zero").output)
    assert not np.any(keras.ops.convert_to_numpy(zero(np.ones((1, 16, 16, 1)))))
    # avg_pool_3x3 counts the zero padding (count_include_pad=True): on ones,
    # a corner averages 4 of 9 cells.
    avg = model.get_layer("cell0_e13_avg_pool_3x3")
    ones = keras.ops.convert_to_numpy(
        keras.Sequential([keras.Input((16, 16, 8)),
                          model.get_layer("cell0_e13_avg_pool_3x3_pad"), avg])(
            np.ones((1, 16, 16, 8), np.float32)))
    assert ones[0, 0, 0, 0] == pytest.approx(4 / 9)
    assert ones[0, 5, 5, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("key", sorted(EXPECTED))
@pytest.mark.slow
def test_train_on_batch(key):
    model = _model(key)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _, shape = models.PAPER_CONFIGS[key]
    x, y = _random_batch(shape)
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def _xla_train_step(model, x, y):
    """One SGD step compiled with XLA; returns (logits, loss) as NumPy."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = keras.optimizers.SGD(learning_rate=0.01)
    opt.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return logits, loss

    logits, loss = step(tf.constant(x), tf.constant(y))
    return logits.numpy(), float(loss)


def test_compile_jit_compile_true():
    model = models.build_model("tb_cnn", (28, 28, 1), seed=3)
    assert all(layer.supports_jit for layer in model._flatten_layers())
    # With TF op determinism on (tests/conftest.py sets TF_DETERMINISTIC_OPS)
    # Keras falls back to jit_compile=False with a warning; the XLA tests
    # below compile the step explicitly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Model doesn't support `jit_compile")
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True)
    x, y = _random_batch((28, 28, 1))
    assert np.isfinite(float(model.train_on_batch(x, y)))


@pytest.mark.slow
def test_xla_train_step_in_process():
    # Under op determinism XLA has no MaxPool gradient, so only pooling-free
    # models can be checked here; see the subprocess test for the others.
    for name in ("mlp", "resnet10_gn"):
        model = models.build_model(name, (28, 28, 1), seed=3)
        x, y = _random_batch((28, 28, 1))
        expected = keras.ops.convert_to_numpy(model(x, training=False))
        logits, loss = _xla_train_step(model, x, y)
        assert np.isfinite(loss)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


_XLA_SCRIPT = """
import numpy as np, keras
from tf_dpsat.experiments import models
from tests.test_models import _random_batch, _xla_train_step
for name, shape in [("tb_cnn", (28, 28, 1)), ("dpnas", (28, 28, 1))]:
    model = models.build_model(name, shape, seed=3)
    x, y = _random_batch(shape)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    logits, loss = _xla_train_step(model, x, y)
    assert np.isfinite(loss), name
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    print("XLA-OK", name)
"""


@pytest.mark.slow
def test_xla_train_step_with_max_pooling():
    # Max-pooling models under XLA, in a fresh interpreter without
    # TF_DETERMINISTIC_OPS (TensorFlow reads it once, at start-up).
    env = {k: v for k, v in os.environ.items() if k != "TF_DETERMINISTIC_OPS"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    result = subprocess.run([sys.executable, "-c", _XLA_SCRIPT], cwd=_REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("XLA-OK") == 2


@pytest.mark.parametrize("name, shape", [
    ("vgg16", (32, 32, 3)),
    ("DPNAS", (32, 32, 3)),
    ("dpnas", (32, 32, 2)),
    ("dpnas", (28, 28, 3)),
    ("dpnas_cifar", (28, 28, 1)),
    ("dpnas_fmnist", (32, 32, 3)),
    ("tb_cnn", (64, 64, 3)),
    ("resnet10_gn", (28, 28)),
    ("mlp", ()),
    ("mlp", (0, 3)),
])
def test_bad_arguments_raise(name, shape):
    with pytest.raises(ValueError) as err:
        models.build_model(name, shape)
    if name not in models.MODEL_NAMES:
        for accepted in models.MODEL_NAMES:
            assert accepted in str(err.value)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, None, True])
def test_bad_num_classes_raises(num_classes):
    with pytest.raises(ValueError):
        models.build_model("mlp", (4,), num_classes=num_classes)
