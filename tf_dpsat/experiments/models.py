"""Networks used by DP-SAT and its baselines, as plain Keras 3 models.

Every builder returns an ordinary, already-built `keras.Model` (functional or
`keras.Sequential`) that maps images to **logits**; pair it with a loss
created with `from_logits=True`.  Nothing here depends on the privacy
wrapper: `tf_dpsat.make_private(model)` is applied afterwards.

Models:
  `dpnas_cifar` / `dpnas_fmnist`: DPNASNet, the architectures found by
    neural architecture search under DP-SGD in Cheng et al., "DPNAS: Neural
    Architecture Search for Deep Learning with Differential Privacy" (AAAI
    2022), as used for CIFAR-10 and
    Fashion-MNIST by Park, Kim, Choi and Lee, "Differentially Private
    Sharpness-Aware Training" (ICML 2023).  529,434 and 214,570 parameters.
  `tb_cnn`: The end-to-end tanh CNNs of Tramer and Boneh, "Differentially
    Private Learning Needs Better Features (or Much More Data)" (ICLR 2021): 550,570
    parameters for CIFAR-10 and 26,010 for (Fashion-)MNIST.
  `resnet10_gn`: The ResNet-10 (one basic block per stage) that Park et al.
    train on MNIST, with every BatchNorm replaced by GroupNorm the way Opacus'
    `ModuleValidator.fix` does it.  4,902,090 parameters.
  `mlp`: A small Dense-only baseline for benchmarks (not from a paper).

Why GroupNorm:
  DP-SGD clips and noises per-example gradients, which requires every example's
  output to depend on that example alone.  BatchNormalization normalises with
  statistics of the whole batch, so one example's gradient would depend on the
  others (and batch statistics would leak through the running averages).
  GroupNormalization normalises each example over groups of its own channels,
  so it is compatible with per-example clipping.  No model here contains
  BatchNormalization or Dropout.

Conventions:
  * Layouts are NHWC.  Where PyTorch pads a strided convolution symmetrically,
    the Keras version pads explicitly with `ZeroPadding2D` and uses
    `padding="valid"` (Keras' `"same"` pads asymmetrically for even inputs).
  * `Flatten` runs over (H, W, C) instead of PyTorch's (C, H, W); this only
    permutes the rows of the following Dense kernel.
  * GroupNorm uses PyTorch's epsilon, 1e-5.
  * Initialisers follow the PyTorch sources (DPNAS' He-normal fan-out
    convolutions, PyTorch's default uniform(+-1/sqrt(fan_in)) elsewhere).  With
    `seed` given, every initialiser gets its own seed derived from it, so two
    builds with the same seed have identical weights.
"""

from __future__ import annotations

import math
import operator
from typing import Callable
from typing import Sequence

import keras
from keras import layers

__all__ = [
    "MODEL_NAMES",
    "PARAMETER_COUNTS",
    "PAPER_CONFIGS",
    "build_model",
]

MODEL_NAMES: tuple[str, ...] = (
    "dpnas",
    "dpnas_cifar",
    "dpnas_fmnist",
    "tb_cnn",
    "resnet10_gn",
    "mlp",
)

# Configuration key -> (model name, input shape) of the shape used in the papers.
PAPER_CONFIGS: dict[str, tuple[str, tuple[int, ...]]] = {
    "dpnas_cifar": ("dpnas_cifar", (32, 32, 3)),
    "dpnas_fmnist": ("dpnas_fmnist", (28, 28, 1)),
    "tb_cnn_cifar": ("tb_cnn", (32, 32, 3)),
    "tb_cnn_mnist": ("tb_cnn", (28, 28, 1)),
    "resnet10_gn": ("resnet10_gn", (28, 28, 1)),
    "mlp": ("mlp", (28, 28, 1)),
}

# Configuration key (see PAPER_CONFIGS) -> trainable parameter count with
# num_classes=10.  The derivations are in the docstrings of the builders.
PARAMETER_COUNTS: dict[str, int] = {
    "dpnas_cifar": 529_434,  # "0.5294M" in the DP-SAT notebooks
    "dpnas_fmnist": 214_570,  # "0.2146M"
    "tb_cnn_cifar": 550_570,  # Tramer & Boneh, Table 9
    "tb_cnn_mnist": 26_010,  # Tramer & Boneh, Table 9
    "resnet10_gn": 4_902_090,  # "4.9021M" in the DP-SAT MNIST notebook
    "mlp": 269_322,  # ours: 784-256-256-10
}

_GN_EPSILON = 1e-5  # PyTorch's GroupNorm default.
_MAX_SEED = 2**31 - 1


# --------------------------------------------------------------------------
# Initialisation helpers
# --------------------------------------------------------------------------


class _Seeds:
    """Hands out a distinct seed for every initialiser (or None when unseeded).

    Keras initialisers with an integer seed return the same values on every
    call, so each layer needs its own seed.
    """

    def __init__(self, seed: int | None):
        self._seed = seed
        self._count = 0

    def next(self) -> int | None:
        if self._seed is None:
            return None
        self._count += 1
        return (int(self._seed) * 1_000_003 + self._count * 7_919) % _MAX_SEED


def _torch_default_kernel(seeds: _Seeds) -> keras.initializers.Initializer:
    """PyTorch's default Conv/Linear weight init: U(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform",
        seed=seeds.next())


def _torch_default_bias(fan_in: int, seeds: _Seeds) -> keras.initializers.Initializer:
    """PyTorch's default Conv/Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seeds.next())


def _he_fan_out_normal(seeds: _Seeds) -> keras.initializers.Initializer:
    """DPNAS' conv init: N(0, 2 / (k_h * k_w * out_channels))."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal",
        seed=seeds.next())


def _torch_dense(units: int, fan_in: int, seeds: _Seeds, name: str,
                 activation: str | None = None) -> layers.Dense:
    return layers.Dense(
        units, activation=activation,
        kernel_initializer=_torch_default_kernel(seeds),
        bias_initializer=_torch_default_bias(fan_in, seeds),
        name=name)


def _group_norm(groups: int, affine: bool, name: str) -> layers.GroupNormalization:
    return layers.GroupNormalization(
        groups=groups, center=affine, scale=affine, epsilon=_GN_EPSILON,
        name=name)


# --------------------------------------------------------------------------
# DPNAS (Cheng et al. 2022), as used by Park et al. 2023
# --------------------------------------------------------------------------

# The DPNAS search space, in the order the genotypes index it.  Every op keeps
# the spatial size (all cell edges have stride 1) and the channel count.
_DPNAS_PRIMITIVES: tuple[str, ...] = (
    "none",                 # 0: zero
    "max_pool_3x3",         # 1: 3x3 max pool, stride 1, pad 1
    "avg_pool_3x3",         # 2: 3x3 avg pool, stride 1, pad 1 (pad counted)
    "skip_connect",         # 3: identity
    "sep_conv_3x3_relu",    # 4: 3x3 depthwise conv -> GN(8) -> act
    "sep_conv_3x3_selu",    # 5
    "sep_conv_3x3_tanh",    # 6
    "sep_conv_3x3_linear",  # 7
    "sep_conv_3x3_htanh",   # 8
    "sep_conv_3x3_sigmoid",  # 9
)

_SEP_ACTIVATIONS: dict[int, str] = {
    4: "relu", 5: "selu", 6: "tanh", 7: "linear", 8: "hard_tanh", 9: "sigmoid",
}

# Cell genotypes: (primitive index, source node, target node).  Node 0 is the
# 1x1-projected cell input; the cell output concatenates nodes 1..5.
_DPNAS_CIFAR_GENOTYPE: tuple[tuple[int, int, int], ...] = (
    (5, 0, 1),
    (1, 0, 2), (5, 1, 2),
    (6, 0, 3), (1, 1, 3), (0, 2, 3),
    (5, 0, 4), (0, 1, 4), (0, 2, 4), (3, 3, 4),
    (5, 0, 5), (5, 1, 5), (6, 2, 5), (1, 3, 5), (6, 4, 5),
)
_DPNAS_FMNIST_GENOTYPE: tuple[tuple[int, int, int], ...] = (
    (3, 0, 1),
    (0, 0, 2), (5, 1, 2),
    (4, 0, 3), (5, 1, 3), (3, 2, 3),
    (0, 0, 4), (0, 1, 4), (6, 2, 4), (3, 3, 4),
    (5, 0, 5), (6, 1, 5), (1, 2, 5), (4, 3, 5), (1, 4, 5),
)
_DPNAS_STEPS = 5   # intermediate nodes per cell ("multiplier")
_DPNAS_GROUPS = 8  # GroupNorm(8, affine=False) everywhere


def _dpnas_edge(x, op: int, channels: int, seeds: _Seeds, name: str):
    """Applies DPNAS primitive `op` (stride 1) to `x`; None for 'none'."""
    if op == 0:
        return None
    if op == 1:
        # PyTorch pads max pooling with -inf; TF's SAME pooling ignores the
        # padding as well, and the padding is symmetric for a 3x3 stride-1 window.
        return layers.MaxPooling2D(3, strides=1, padding="same", name=name)(x)
    if op == 2:
        # nn.AvgPool2d(3, 1, padding=1) counts the zero padding in the mean;
        # TF's SAME average pooling would not, so pad explicitly.
        x = layers.ZeroPadding2D(1, name=name + "_pad")(x)
        return layers.AveragePooling2D(3, strides=1, padding="valid", name=name)(x)
    if op == 3:
        return x
    if op in _SEP_ACTIVATIONS:
        # PrivSepConv: Conv2d(C, C, 3, padding=1, groups=C, bias=False), i.e. a
        # depthwise conv.  The DPNAS init uses n = 3*3*out_channels = 9*C, but
        # Keras' fan_out of a depthwise kernel is 9 * depth_multiplier, so the
        # standard deviation is set explicitly.
        std = math.sqrt(2.0 / (9 * channels))
        x = layers.DepthwiseConv2D(
            3, strides=1, padding="same", use_bias=False,
            depthwise_initializer=keras.initializers.RandomNormal(
                0.0, std, seed=seeds.next()),
            name=name + "_dwconv")(x)
        x = _group_norm(_DPNAS_GROUPS, False, name + "_gn")(x)
        return layers.Activation(_SEP_ACTIVATIONS[op], name=name + "_act")(x)
    raise ValueError(f"unknown DPNAS primitive index {op}")


def _dpnas_cell(x, genotype: Sequence[tuple[int, int, int]], channels: int,
                seeds: _Seeds, name: str):
    """One DPBlock: 1x1 conv + GN, a DAG of primitives, concat of nodes 1..5."""
    s0 = layers.Conv2D(channels, 1, use_bias=False,
                       kernel_initializer=_he_fan_out_normal(seeds),
                       name=name + "_pre_conv")(x)
    s0 = _group_norm(_DPNAS_GROUPS, False, name + "_pre_gn")(s0)
    incoming: dict[int, list] = {}
    states = {0: s0}
    # Edges are ordered by target node and every source precedes its target,
    # so a node is complete before any edge reads it.
    for op, src, dst in genotype:
        if src not in states:
            # First edge leaving a node: all its inputs are known now.
            states[src] = _dpnas_merge(incoming.pop(src), channels, name, src)
        out = _dpnas_edge(states[src], op, channels, seeds,
                          f"{name}_e{src}{dst}_{_DPNAS_PRIMITIVES[op]}")
        # A 'none' edge adds src * 0; drop it but remember the node exists.
        incoming.setdefault(dst, []).append(
            out if out is not None else ("zero", states[src]))
    for node in range(1, _DPNAS_STEPS + 1):
        if node not in states:
            states[node] = _dpnas_merge(incoming.pop(node), channels, name, node)
    return layers.Concatenate(axis=-1, name=name + "_concat")(
        [states[i] for i in range(1, _DPNAS_STEPS + 1)])


def _dpnas_merge(inputs: list, channels: int, name: str, node: int):
    """Sums a node's incoming edges; 'none' edges contribute exact zeros."""
    real = [t for t in inputs if not isinstance(t, tuple)]
    if not real:
        # Only zero edges: the node is x * 0, as in the PyTorch Zero op.
        return layers.Rescaling(0.0, name=f"{name}_n{node}_zero")(inputs[0][1])
    if len(real) == 1:
        return real[0]
    return layers.Add(name=f"{name}_n{node}_sum")(real)


def _dpnas_network(input_shape: tuple[int, ...], num_classes: int,
                   genotype: Sequence[tuple[int, int, int]],
                   stem_channels: int, doubling_cells: Sequence[int],
                   classifier_activation: str, seeds: _Seeds,
                   name: str) -> keras.Model:
    """DPNASNet skeleton shared by the CIFAR and (F)MNIST variants.

    stem (3x3 conv + GN) -> [cell, maxpool 2x2] x 3 -> 1x1 conv to 128 + GN ->
    flatten -> Dense(128) -> activation -> Dense(num_classes).
    """
    inputs = keras.Input(shape=input_shape, name="images")
    channels = stem_channels
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False,
                      kernel_initializer=_he_fan_out_normal(seeds),
                      name="stem_conv")(inputs)
    x = _group_norm(_DPNAS_GROUPS, False, "stem_gn")(x)
    for cell in range(3):
        if cell in doubling_cells:
            channels *= 2
        x = _dpnas_cell(x, genotype, channels, seeds, f"cell{cell}")
        # nn.MaxPool2d(2, 2) floors odd sizes, like Keras' "valid".
        x = layers.MaxPooling2D(2, strides=2, padding="valid",
                                name=f"cell{cell}_pool")(x)
    x = layers.Conv2D(128, 1, use_bias=False,
                      kernel_initializer=_he_fan_out_normal(seeds),
                      name="adapt_conv")(x)
    x = _group_norm(_DPNAS_GROUPS, False, "adapt_gn")(x)
    x = layers.Flatten(name="flatten")(x)
    fan_in = x.shape[-1]
    x = _torch_dense(128, fan_in, seeds, "fc1", activation=classifier_activation)(x)
    outputs = _torch_dense(num_classes, 128, seeds, "logits")(x)
    return keras.Model(inputs, outputs, name=name)


def dpnas_cifar(input_shape=(32, 32, 3), num_classes: int = 10,
                seed: int | None = None) -> keras.Model:
    """DPNASNet for CIFAR-10 (`DPNASNet_CIFAR` in the DP-SAT code), 32x32x3.

    Structure (GN = GroupNorm(8 groups, no affine), all convs without bias)::

        stem     3x3 conv 3->48, GN                          32x32x48
        cell0    C=48:  1x1 conv 48->48, GN, DAG, concat     32x32x240
        pool     maxpool 2x2                                 16x16x240
        cell1    C=96:  1x1 conv 240->96, GN, DAG, concat    16x16x480
        pool                                                  8x8x480
        cell2    C=192: 1x1 conv 480->192, GN, DAG, concat    8x8x960
        pool                                                  4x4x960
        adapt    1x1 conv 960->128, GN                        4x4x128
        flatten, Dense 2048->128, SELU, Dense 128->10

    Cell DAG (node 0 = projected input; edges "op(src)")::

        n1 = sep_selu(n0)
        n2 = maxpool(n0) + sep_selu(n1)
        n3 = sep_tanh(n0) + maxpool(n1) + zero(n2)
        n4 = sep_selu(n0) + zero(n1) + zero(n2) + n3
        n5 = sep_selu(n0) + sep_selu(n1) + sep_tanh(n2) + maxpool(n3)
             + sep_tanh(n4)

    where sep_<act> is a 3x3 depthwise conv (C*9 weights), GN, activation.

    Parameter count (529,434): stem 3*48*9 = 1,296; each cell has C_in*C
    (projection) + 8 sep convs * 9*C: 48*48 + 72*48 = 5,760; 240*96 + 72*96 =
    29,952; 480*192 + 72*192 = 105,984; adapt 960*128 = 122,880; Dense
    2048*128 + 128 = 262,272; logits 128*10 + 10 = 1,290.  With
    num_classes=100 this is the authors' `DPNASNet_CIFAR100`.
    """
    input_shape = tuple(input_shape)
    if input_shape != (32, 32, 3):
        raise ValueError(
            f"dpnas_cifar expects input_shape (32, 32, 3); got {input_shape}")
    return _dpnas_network(
        input_shape, num_classes, _DPNAS_CIFAR_GENOTYPE, stem_channels=48,
        doubling_cells=(1, 2), classifier_activation="selu",
        seeds=_Seeds(seed), name="dpnas_cifar")


def dpnas_fmnist(input_shape=(28, 28, 1), num_classes: int = 10,
                 seed: int | None = None) -> keras.Model:
    """DPNASNet for Fashion-MNIST (`DPNASNet_FMNIST` in the DP-SAT code), 28x28x1.

    Structure (GN = GroupNorm(8 groups, no affine), all convs without bias)::

        stem     3x3 conv 1->32, GN                          28x28x32
        cell0    C=32: 1x1 conv 32->32, GN, DAG, concat      28x28x160
        pool     maxpool 2x2                                 14x14x160
        cell1    C=32: 1x1 conv 160->32, GN, DAG, concat     14x14x160
        pool                                                  7x7x160
        cell2    C=64: 1x1 conv 160->64, GN, DAG, concat      7x7x320
        pool     (floors 7 -> 3)                              3x3x320
        adapt    1x1 conv 320->128, GN                        3x3x128
        flatten, Dense 1152->128, tanh, Dense 128->10

    Note the classifier activation is tanh here (SELU in the CIFAR variant),
    as in the authors' code.

    Cell DAG::

        n1 = n0
        n2 = zero(n0) + sep_selu(n1)
        n3 = sep_relu(n0) + sep_selu(n1) + n2
        n4 = zero(n0) + zero(n1) + sep_tanh(n2) + n3
        n5 = sep_selu(n0) + sep_tanh(n1) + maxpool(n2) + sep_relu(n3)
             + maxpool(n4)

    Parameter count (214,570): stem 1*32*9 = 288; cells with 7 sep convs:
    32*32 + 63*32 = 3,040; 160*32 + 63*32 = 7,136; 160*64 + 63*64 = 14,272;
    adapt 320*128 = 40,960; Dense 1152*128 + 128 = 147,584; logits 1,290.
    """
    input_shape = tuple(input_shape)
    if input_shape != (28, 28, 1):
        raise ValueError(
            f"dpnas_fmnist expects input_shape (28, 28, 1); got {input_shape}")
    return _dpnas_network(
        input_shape, num_classes, _DPNAS_FMNIST_GENOTYPE, stem_channels=32,
        doubling_cells=(2,), classifier_activation="tanh",
        seeds=_Seeds(seed), name="dpnas_fmnist")


# --------------------------------------------------------------------------
# Tramer & Boneh (2021) end-to-end CNNs
# --------------------------------------------------------------------------


def _torch_conv(filters: int, kernel: int, stride: int, in_channels: int,
                seeds: _Seeds, name: str, activation: str | None = None):
    return layers.Conv2D(
        filters, kernel, strides=stride, padding="valid", activation=activation,
        kernel_initializer=_torch_default_kernel(seeds),
        bias_initializer=_torch_default_bias(in_channels * kernel * kernel, seeds),
        name=name)


def tb_cnn(input_shape, num_classes: int = 10,
           seed: int | None = None) -> keras.Model:
    """Tramer & Boneh's end-to-end tanh CNN; variant chosen by channels.

    CIFAR-10 (32x32x3), 550,570 parameters; all convs 3x3, stride 1, pad 1::

        conv 32, tanh, conv 32, tanh, maxpool 2
        conv 64, tanh, conv 64, tanh, maxpool 2
        conv 128, tanh, conv 128, tanh, maxpool 2      -> 4x4x128
        flatten, Dense 2048->128, tanh, Dense 128->10

    (896 + 9,248 + 18,496 + 36,928 + 73,856 + 147,584 + 262,272 + 1,290.)

    MNIST / Fashion-MNIST (28x28x1), 26,010 parameters::

        pad 2, conv 16 8x8 stride 2, tanh               -> 13x13x16
        maxpool 2 stride 1                              -> 12x12x16
        conv 32 4x4 stride 2, tanh                      -> 5x5x32
        maxpool 2 stride 1                              -> 4x4x32
        flatten, Dense 512->32, tanh, Dense 32->10

    (1,040 + 8,224 + 16,416 + 330.)  The end-to-end CNNs use no normalisation
    layer (the GroupNorm in the original code only applies to ScatterNet
    feature inputs).
    """
    input_shape = tuple(input_shape)
    seeds = _Seeds(seed)
    inputs = keras.Input(shape=input_shape, name="images")
    if input_shape == (32, 32, 3):
        x = inputs
        channels = 3
        for block, width in enumerate((32, 64, 128)):
            for j in range(2):
                x = layers.ZeroPadding2D(1, name=f"b{block}_pad{j}")(x)
                x = _torch_conv(width, 3, 1, channels, seeds,
                                f"b{block}_conv{j}", activation="tanh")(x)
                channels = width
            x = layers.MaxPooling2D(2, strides=2, name=f"b{block}_pool")(x)
        x = layers.Flatten(name="flatten")(x)
        x = _torch_dense(128, x.shape[-1], seeds, "fc1", activation="tanh")(x)
        outputs = _torch_dense(num_classes, 128, seeds, "logits")(x)
        return keras.Model(inputs, outputs, name="tb_cnn_cifar")
    if input_shape == (28, 28, 1):
        x = layers.ZeroPadding2D(2, name="pad1")(inputs)
        x = _torch_conv(16, 8, 2, 1, seeds, "conv1", activation="tanh")(x)
        x = layers.MaxPooling2D(2, strides=1, name="pool1")(x)
        x = _torch_conv(32, 4, 2, 16, seeds, "conv2", activation="tanh")(x)
        x = layers.MaxPooling2D(2, strides=1, name="pool2")(x)
        x = layers.Flatten(name="flatten")(x)
        x = _torch_dense(32, x.shape[-1], seeds, "fc1", activation="tanh")(x)
        outputs = _torch_dense(num_classes, 32, seeds, "logits")(x)
        return keras.Model(inputs, outputs, name="tb_cnn_mnist")
    raise ValueError(
        "tb_cnn expects input_shape (32, 32, 3) (CIFAR-10 variant) or "
        f"(28, 28, 1) (MNIST variant); got {input_shape}")


# --------------------------------------------------------------------------
# ResNet-10 with GroupNorm (Park et al.'s MNIST model)
# --------------------------------------------------------------------------


def _resnet_conv(filters: int, kernel: int, stride: int, seeds: _Seeds,
                 name: str, x):
    """PyTorch Conv2d(k, stride, padding=k//2, bias=False) in NHWC."""
    pad = kernel // 2
    if pad:
        x = layers.ZeroPadding2D(pad, name=name + "_pad")(x)
    return layers.Conv2D(filters, kernel, strides=stride, padding="valid",
                         use_bias=False,
                         kernel_initializer=_torch_default_kernel(seeds),
                         name=name)(x)


def _resnet_gn(channels: int, name: str):
    # Opacus' ModuleValidator.fix: GroupNorm(gcd(32, C), C, affine=True).
    return _group_norm(math.gcd(32, channels), True, name)


def resnet10_gn(input_shape=(28, 28, 1), num_classes: int = 10,
                seed: int | None = None) -> keras.Model:
    """ResNet-10 with GroupNorm: the authors' `ResNet10` after Opacus' fix.

    The DP-SAT code builds the kuangliu-style CIFAR ResNet with one basic block
    per stage (`ResNet(ResBasicBlock, [1, 1, 1, 1], in_channels=1)`) and runs
    Opacus `ModuleValidator.fix`, which replaces each BatchNorm2d(C) by
    GroupNorm(gcd(32, C) = 32 groups, C, affine=True)::

        3x3 conv 64 (stride 1), GN, ReLU
        stage1  basic block 64->64,   stride 1 (identity shortcut)
        stage2  basic block 64->128,  stride 2 (1x1 conv + GN shortcut)
        stage3  basic block 128->256, stride 2 (1x1 conv + GN shortcut)
        stage4  basic block 256->512, stride 2 (1x1 conv + GN shortcut)
        global average pool, Dense 512->num_classes

    A basic block is conv3x3-GN-ReLU-conv3x3-GN, plus shortcut, then ReLU; all
    convs are bias-free.  28x28 inputs give 28->28->14->7->4.  The authors pool
    with a window equal to the final width, i.e. globally for square inputs.

    Parameter count (4,902,090): stem 576 + 128; stage1 2*36,864 + 2*128 =
    73,984; stage2 73,728 + 147,456 + 8,192 + 3*256 = 230,144; stage3
    294,912 + 589,824 + 32,768 + 3*512 = 919,040; stage4 1,179,648 + 2,359,296
    + 131,072 + 3*1,024 = 3,673,088; Dense 5,130.  Any (H, W, C) input works;
    the count above is for one input channel.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"resnet10_gn expects an (height, width, channels) input_shape; got {input_shape}")
    seeds = _Seeds(seed)
    inputs = keras.Input(shape=input_shape, name="images")
    x = _resnet_conv(64, 3, 1, seeds, "stem_conv", inputs)
    x = _resnet_gn(64, "stem_gn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    in_planes = 64
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)),
                                             start=1):
        name = f"stage{stage}"
        out = _resnet_conv(planes, 3, stride, seeds, name + "_conv1", x)
        out = _resnet_gn(planes, name + "_gn1")(out)
        out = layers.Activation("relu", name=name + "_relu1")(out)
        out = _resnet_conv(planes, 3, 1, seeds, name + "_conv2", out)
        out = _resnet_gn(planes, name + "_gn2")(out)
        if stride != 1 or in_planes != planes:
            shortcut = _resnet_conv(planes, 1, stride, seeds,
                                    name + "_short_conv", x)
            shortcut = _resnet_gn(planes, name + "_short_gn")(shortcut)
        else:
            shortcut = x
        x = layers.Add(name=name + "_add")([out, shortcut])
        x = layers.Activation("relu", name=name + "_relu2")(x)
        in_planes = planes
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _torch_dense(num_classes, 512, seeds, "logits")(x)
    return keras.Model(inputs, outputs, name="resnet10_gn")


# --------------------------------------------------------------------------
# MLP baseline
# --------------------------------------------------------------------------


def mlp(input_shape, num_classes: int = 10, seed: int | None = None,
        hidden: Sequence[int] = (256, 256)) -> keras.Model:
    """Flatten -> Dense 256 ReLU -> Dense 256 ReLU -> Dense num_classes.

    Not from a paper; a cheap Dense-only model for benchmarks and tests.  For
    28x28x1 inputs it has 784*256+256 + 256*256+256 + 256*10+10 = 269,322
    parameters.
    """
    input_shape = tuple(input_shape)
    seeds = _Seeds(seed)
    model = keras.Sequential(name="mlp")
    model.add(keras.Input(shape=input_shape, name="inputs"))
    model.add(layers.Flatten(name="flatten"))
    fan_in = math.prod(input_shape)
    for i, units in enumerate(hidden):
        model.add(_torch_dense(units, fan_in, seeds, f"dense{i}", activation="relu"))
        fan_in = units
    model.add(_torch_dense(num_classes, fan_in, seeds, "logits"))
    return model


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def _dpnas_by_channels(input_shape, num_classes, seed):
    channels = input_shape[-1] if input_shape else None
    if channels == 3:
        return dpnas_cifar(input_shape, num_classes, seed)
    if channels == 1:
        return dpnas_fmnist(input_shape, num_classes, seed)
    raise ValueError(
        "dpnas expects input_shape (32, 32, 3) (CIFAR variant) or (28, 28, 1) "
        f"(FMNIST variant); got {input_shape}")


_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "dpnas": _dpnas_by_channels,
    "dpnas_cifar": dpnas_cifar,
    "dpnas_fmnist": dpnas_fmnist,
    "tb_cnn": tb_cnn,
    "resnet10_gn": resnet10_gn,
    "mlp": mlp,
}
if tuple(_BUILDERS) != MODEL_NAMES:  # keep the public list in sync
    raise ImportError(f"models.MODEL_NAMES {MODEL_NAMES} does not match the "
                      f"builders {tuple(_BUILDERS)}.")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10,
                seed: int | None = None) -> keras.Model:
    """Builds model `name` for `input_shape` (H, W, C), returning logits.

    Args:
      name: one of `MODEL_NAMES`.  `"dpnas"` and `"tb_cnn"` pick the
        CIFAR variant for 3-channel inputs and the (F)MNIST variant for
        1-channel inputs.
      input_shape: shape of one example, without the batch dimension.
      num_classes: number of logits.
      seed: if given, weights are initialised deterministically from it.

    Returns:
      A built `keras.Model`; `count_params()` works immediately.

    Raises:
      ValueError: unknown `name`, or an input shape the model does not
        support, or a non-positive `num_classes`.
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown model name {name!r}; accepted names: {', '.join(MODEL_NAMES)}")
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape must be a tuple of positive ints; got {input_shape!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints; got {input_shape!r}")
    try:
        classes = operator.index(num_classes)
    except TypeError:
        classes = 0
    if isinstance(num_classes, bool) or classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    return _BUILDERS[name](shape, classes, seed)
