"""Per-example clipping without per-example backward passes.

The vectorized path (`tf.vectorized_map` of a per-example gradient) is exact
but slow: TensorFlow has no vectorized rule for the convolution filter
gradient, and it materialises B x parameters of memory. For the layers that
make up most networks, each example's weight gradient is a simple function of
what the layer saw and what came back:

  Dense       z = a W + b:   dL_i/dW = sum_t a_it^T d_it,  dL_i/db = sum_t d_it
  Conv        the same, with a_it the receptive field (patch) at position t
  Embedding   dL_i/dE[v] = sum_{t: id_it = v} d_it
  Layer/GroupNormalization  z = xhat * gamma + beta

where a is the layer input and d = dL/dz the gradient at its (pre-activation)
output. One forward pass and one backward pass to the z's give every a and d;
then, per layer, either

  * the ghost norm (Goodfellow 2015; Li et al. 2022; Bu et al. 2022):
    ||dL_i/dW||^2 = sum_{t,s} (a_it . a_is)(d_it . d_is), cost T^2 (d_in + d_out)
    per example and no B x |W| memory, or
  * the direct per-example gradient, cost T d_in d_out,

whichever is cheaper for the layer's shapes (mixed ghost clipping, Bu et al.
2022). With the per-example norms known, the clip factors c_i give the clipped
sum per layer directly, sum_i c_i dL_i/dW, from the same a and d ("book-keeping",
Bu et al. 2023), so no second backward pass is needed.

Models are interpreted layer by layer (Sequential and functional graphs,
nested too); a model with any trainable layer outside these rules, a shared
layer, a weight used outside its own layer (tied weights, a `Lambda` or
`keras.ops` call reading a layer's kernel), masking, data-dependent
`add_loss` terms, or anything else the interpreter cannot follow raises
`Unsupported`, and the optimizer falls back to the exact vectorized path.
Each rule computes norms and sums for its layer's trainable variables only,
matched by identity, so partly frozen layers are exact too.

References:
  Goodfellow. "Efficient Per-Example Gradient Computations". arXiv:1510.01799.
  Li, Tramer, Liang, Hashimoto. "Large Language Models Can Be Strong
  Differentially Private Learners". ICLR 2022.
  Bu, Mao, Xu. "Scalable and Efficient Training of Large Convolutional Neural
  Networks with Differential Privacy". NeurIPS 2022.
  Bu, Wang, Zha, Karypis. "Differentially Private Optimization on Large
  Model at Small Cost" (book-keeping). ICML 2023.
"""

import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional

import keras
import tensorflow as tf
from keras import ops
from keras.src.models import functional as keras_functional

from tf_dpsat import clipping


class Unsupported(Exception):
    """The model has a part no fast rule covers; use the vectorized path."""


@dataclasses.dataclass
class _Record:
    """What one layer call contributes: its rule, variables and tensors."""
    rule: "_Rule"
    layer: Any
    # The layer's trainable Keras variables by their role in the rule
    # ("kernel", "bias", ...); a frozen variable has no entry.
    variables: Dict[str, Any]
    z: tf.Tensor           # the tensor whose gradient d the rule needs
    saved: dict            # tensors saved by the forward pass (inputs, ...)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the batch splits into units (examples or microbatches).

    Attributes:
      units: number of units; a Python int or, for a dynamic batch, a tensor.
      size: examples per unit; a Python int or a tensor.
      xla: whether the step is compiled by XLA, whose CPU backend runs the
        grouped convolutions of the batch-folding trick very slowly.
    """
    units: Any
    size: Any
    xla: bool = False


def _group(t: tf.Tensor, layout: Layout) -> tf.Tensor:
    """[B, ..., C] -> [units, positions per unit, C].

    The positions dimension stays static whenever it can be known, since the
    ghost-versus-direct choice is made from static shapes.
    """
    positions = layout.size if isinstance(layout.size, int) else None
    for dim in t.shape[1:-1]:
        positions = None if positions is None or dim is None else positions * dim
    return tf.reshape(t, [layout.units, -1 if positions is None else positions,
                          t.shape[-1]])


def _ghost_is_cheaper(positions: Optional[int], d_in: int, d_out: int) -> bool:
    """Ghost norm, T^2 (d_in + d_out) per unit, against direct, T d_in d_out.

    Unknown T (a dynamic microbatch size) takes the direct gradient, whose
    cost grows only linearly in T.
    """
    return positions is not None and positions * (d_in + d_out) < d_in * d_out


def _gram(u: tf.Tensor) -> tf.Tensor:
    return tf.einsum("mpi,mqi->mpq", u, u)


class _Rule:
    """Per-layer fast rule: forward pass, per-unit squared norms, sums."""

    def roles(self, layer) -> Dict[str, Any]:
        """The layer's variables by role; None for one the layer lacks."""
        raise NotImplementedError

    def forward(self, layer, x, saved, watch):
        """Returns (z, output); calls watch(z) before z is used further."""
        raise NotImplementedError

    def sq_norms(self, record, d, layout):
        """Per-unit squared gradient norms [units] and a cache for `sums`.

        Only the record's (trainable) variables count: a frozen variable's
        gradient is neither clipped nor released.
        """
        raise NotImplementedError

    def sums(self, record, d, cache, factors, layout, keep):
        """{role: sum_u factor_u dL_u/dV} for each of the record's variables.

        `d` and the per-unit tensors of `cache` arrive with dropped units
        zeroed; a rule that reads saved inputs masks them with
        `_mask_examples`, so a NaN cannot leak into the sum.
        """
        raise NotImplementedError


# --------------------------------------------------------------------- Dense

class _DenseRule(_Rule):
    """keras.layers.Dense on inputs of any rank."""

    def roles(self, layer):
        return {"kernel": layer.kernel, "bias": layer.bias}

    def forward(self, layer, x, saved, watch):
        x = tf.cast(x, layer.compute_dtype)
        saved["a"] = x
        z = ops.matmul(x, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        watch(z)
        return z, (layer.activation(z) if layer.activation else z)

    def sq_norms(self, record, d, layout):
        a = _group(record.saved["a"], layout)
        d = _group(d, layout)
        positions, d_in, d_out = a.shape[1], a.shape[2], d.shape[2]
        trainable = record.variables
        terms, cache = [], {}
        if positions == 1:
            d_sq = clipping.sum_of_squares(d, [1, 2])
            if "kernel" in trainable:
                terms.append(clipping.sum_of_squares(a, [1, 2]) * d_sq)
            if "bias" in trainable:  # the bias gradient is d itself
                cache["bias"] = d[:, 0]
                terms.append(d_sq)
            return tf.add_n(terms), cache
        if "kernel" in trainable and _ghost_is_cheaper(positions, d_in, d_out):
            terms.append(tf.reduce_sum(_gram(a) * _gram(d), [1, 2]))
        elif "kernel" in trainable:
            per_unit = tf.einsum("mpi,mpo->mio", a, d)
            cache["kernel"] = per_unit
            terms.append(clipping.sum_of_squares(per_unit, [1, 2]))
        if "bias" in trainable:
            bias = tf.reduce_sum(d, 1)
            cache["bias"] = bias
            terms.append(clipping.sum_of_squares(bias, 1))
        return tf.add_n(terms), cache

    def sums(self, record, d, cache, factors, layout, keep):
        grads = {}
        if "kernel" in record.variables:
            grads["kernel"] = self._kernel_sum(record, d, cache, factors,
                                               layout, keep)
        if "bias" in record.variables:
            # A matrix-vector product: ~0.06 ms less per layer than the
            # equivalent einsum at batch 256 (oneDNN's einsum setup).
            grads["bias"] = tf.linalg.matvec(cache["bias"], factors,
                                             transpose_a=True)
        return grads

    @staticmethod
    def _kernel_sum(record, d, cache, factors, layout, keep):
        if "kernel" in cache:
            return tf.einsum("m,mio->io", factors, cache["kernel"])
        if layout.size == 1 and len(d.shape) == 2:  # one row per unit
            a = _mask_examples(record.saved["a"], keep, layout)
            return tf.matmul(a, d * factors[:, None], transpose_a=True)
        a = _group(_mask_examples(record.saved["a"], keep, layout), layout)
        return tf.einsum("mpi,mpo->io", a, _group(d, layout)
                         * factors[:, None, None])


# ---------------------------------------------------------------------- Conv

def _same_padding(size, kernel, stride, dilation):
    """TensorFlow's SAME padding (before, after) and output size."""
    out = -(-size // stride)
    span = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + span - size, 0)
    return (total // 2, total - total // 2), out


def _shifted_inputs(a, kernel_size, strides, dilation, padding):
    """The input seen by each kernel offset: kh*kw tensors [B, Ho, Wo, C].

    Slicing the padded input once per offset gives every patch without
    materialising the [B, Ho*Wo, kh*kw*C] patch matrix at once.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    h, w = a.shape[1], a.shape[2]
    if padding == "same":
        (ph, h_out), (pw, w_out) = (_same_padding(h, kh, sh, dh),
                                    _same_padding(w, kw, sw, dw))
        a = tf.pad(a, [[0, 0], list(ph), list(pw), [0, 0]])
    else:
        h_out = (h - (kh - 1) * dh - 1) // sh + 1
        w_out = (w - (kw - 1) * dw - 1) // sw + 1
    shifts = []
    for i in range(kh):
        for j in range(kw):
            shifts.append(a[:, i * dh: i * dh + (h_out - 1) * sh + 1: sh,
                            j * dw: j * dw + (w_out - 1) * sw + 1: sw, :])
    return shifts


def _fold(t: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] -> [1, H, W, B*C]: the batch folded into the channels."""
    t = tf.transpose(t, [1, 2, 0, 3])
    return tf.reshape(t, [1, t.shape[0], t.shape[1], -1])


class _ConvRule(_Rule):
    """keras.layers.Conv1D / Conv2D (channels_last, any stride, padding
    "same"/"valid", dilation, groups) and DepthwiseConv2D.

    Direct per-example kernel gradients come from one filter-gradient op with
    the batch folded into the channels: example b's channels form groups of
    their own, so a grouped (or depthwise) filter gradient of the folded
    tensors is the stack of the B per-example filter gradients.
    """

    def __init__(self, depthwise: bool = False):
        self.depthwise = depthwise

    def roles(self, layer):
        return {"kernel": layer.kernel,
                "bias": layer.bias if layer.use_bias else None}

    def _geometry(self, layer):
        """(kernel size, strides, dilation) as 2-D tuples."""
        if layer.rank == 1:
            return ((1,) + tuple(layer.kernel_size), (1,) + tuple(layer.strides),
                    (1,) + tuple(layer.dilation_rate))
        return (tuple(layer.kernel_size), tuple(layer.strides),
                tuple(layer.dilation_rate))

    def forward(self, layer, x, saved, watch):
        x = tf.cast(x, layer.compute_dtype)
        saved["a"] = x[:, None] if layer.rank == 1 else x
        if self.depthwise:
            z = ops.depthwise_conv(x, layer.kernel, strides=layer.strides,
                                   padding=layer.padding,
                                   dilation_rate=layer.dilation_rate,
                                   data_format=layer.data_format)
        else:
            z = layer.convolution_op(x, layer.kernel)
        if layer.use_bias:
            z = ops.add(z, ops.reshape(layer.bias, (1,) * (layer.rank + 1) +
                                       (z.shape[-1],)))
        watch(z)
        return z, (layer.activation(z) if layer.activation else z)

    def _filter_gradient(self, layer, a, d, filter_shape):
        """The summed filter gradient of a convolution of `a` giving `d`."""
        (_, _), (sh, sw), (dh, dw) = self._geometry(layer)
        op = (tf.raw_ops.DepthwiseConv2dNativeBackpropFilter if self.depthwise
              else tf.raw_ops.Conv2DBackpropFilter)
        return op(input=a, filter_sizes=filter_shape, out_backprop=d,
                  strides=[1, sh, sw, 1], padding=layer.padding.upper(),
                  dilations=[1, dh, dw, 1])

    def _per_unit_kernel(self, record, d, layout):
        """[units, *kernel.shape] per-unit kernel gradients (direct)."""
        if layout.xla:
            return self._per_unit_kernel_by_shifts(record, d, layout)
        layer = record.layer
        a = record.saved["a"]
        d = d[:, None] if layer.rank == 1 else d
        (kh, kw), _, _ = self._geometry(layer)
        c_in, c_out = layer.kernel.shape[-2], layer.kernel.shape[-1]
        batch = tf.shape(a)[0]
        if self.depthwise:  # [kh, kw, C, mult] -> [kh, kw, B*C, mult]
            shape = tf.stack([kh, kw, batch * c_in, c_out])
        else:               # [kh, kw, C/g, O] -> [kh, kw, C/g, B*O]
            shape = tf.stack([kh, kw, c_in, batch * c_out])
        g = self._filter_gradient(layer, _fold(a), _fold(d), shape)
        if self.depthwise:
            g = tf.reshape(g, [kh, kw, layout.units, -1, c_in, c_out])
            g = tf.transpose(g, [2, 3, 0, 1, 4, 5])
        else:
            g = tf.reshape(g, [kh, kw, c_in, layout.units, -1, c_out])
            g = tf.transpose(g, [3, 4, 0, 1, 2, 5])
        return tf.reshape(tf.reduce_sum(g, 1), [-1, *layer.kernel.shape])

    def _per_unit_kernel_by_shifts(self, record, d, layout):
        """The same, as one batched matmul per kernel offset (for XLA)."""
        layer = record.layer
        shifts = [_group(s, layout) for s in _shifted_inputs(
            record.saved["a"], *self._geometry(layer), layer.padding)]
        d = _group(d, layout)
        c_in, c_out = layer.kernel.shape[-2], layer.kernel.shape[-1]
        groups = getattr(layer, "groups", 1)
        per = []
        for s in shifts:
            if self.depthwise:  # [m, p, C] x [m, p, C, mult] -> [m, C, mult]
                per.append(tf.einsum("mpc,mpcj->mcj", s, tf.reshape(
                    d, [layout.units, -1, c_in, c_out])))
            else:               # per group: [m, p, C/g] x [m, p, O/g]
                s = tf.reshape(s, [layout.units, -1, groups, c_in])
                o = tf.reshape(d, [layout.units, -1, groups, c_out // groups])
                g = tf.einsum("mpgc,mpgo->mcgo", s, o)
                per.append(tf.reshape(g, [layout.units, c_in, c_out]))
        return tf.reshape(tf.stack(per, 1), [-1, *layer.kernel.shape])

    def _use_ghost(self, layer, positions, d_out):
        if self.depthwise or getattr(layer, "groups", 1) != 1:
            return False
        k = 1
        for size in layer.kernel.shape[:-1]:
            k *= size
        return _ghost_is_cheaper(positions, k, d_out)

    def sq_norms(self, record, d, layout):
        layer = record.layer
        grouped_d = _group(d, layout)
        terms, cache = [], {}
        kernel = "kernel" in record.variables
        if kernel and self._use_ghost(layer, grouped_d.shape[1],
                                      grouped_d.shape[2]):
            shifts = _shifted_inputs(record.saved["a"], *self._geometry(layer),
                                     layer.padding)
            gram = tf.add_n([_gram(_group(s, layout)) for s in shifts])
            terms.append(tf.reduce_sum(gram * _gram(grouped_d), [1, 2]))
        elif kernel:
            per_unit = self._per_unit_kernel(record, d, layout)
            cache["kernel"] = per_unit
            terms.append(clipping.sum_of_squares(
                tf.reshape(per_unit, [layout.units, -1]), 1))
        if "bias" in record.variables:
            bias = tf.reduce_sum(grouped_d, 1)
            cache["bias"] = bias
            terms.append(clipping.sum_of_squares(bias, 1))
        return tf.add_n(terms), cache

    def sums(self, record, d, cache, factors, layout, keep):
        grads = {}
        if "kernel" in record.variables:
            grads["kernel"] = self._kernel_sum(record, d, cache, factors,
                                               layout, keep)
        if "bias" in record.variables:
            grads["bias"] = tf.tensordot(factors, cache["bias"], 1)
        return grads

    def _kernel_sum(self, record, d, cache, factors, layout, keep):
        if "kernel" in cache:
            return tf.tensordot(factors, cache["kernel"], 1)
        # Ghost norms: one ordinary filter gradient of the scaled d.
        layer = record.layer
        a = _mask_examples(record.saved["a"], keep, layout)
        d = d * tf.reshape(_per_example(factors, d, layout),
                           [-1] + [1] * (len(d.shape) - 1))
        d = d[:, None] if layer.rank == 1 else d
        (kh, kw), _, _ = self._geometry(layer)
        return tf.reshape(self._filter_gradient(
            layer, a, d, [kh, kw, *layer.kernel.shape[-2:]]),
            layer.kernel.shape)


# ----------------------------------------------------------------- Embedding

class _EmbeddingRule(_Rule):
    """keras.layers.Embedding (without mask_zero)."""

    def roles(self, layer):
        return {"embeddings": layer.embeddings}

    def forward(self, layer, x, saved, watch):
        ids = tf.cast(x, "int32")
        saved["ids"] = ids
        z = ops.take(layer.embeddings, ids, axis=0)
        watch(z)
        return z, z

    def sq_norms(self, record, d, layout):
        ids = tf.reshape(record.saved["ids"], [layout.units, -1])
        d = _group(d, layout)
        if ids.shape[1] == 1:
            return clipping.sum_of_squares(d, [1, 2]), {}
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), d.dtype)
        return tf.reduce_sum(same * _gram(d), [1, 2]), {}

    def sums(self, record, d, cache, factors, layout, keep):
        ids = tf.reshape(record.saved["ids"], [layout.units, -1])
        d = _group(d, layout) * factors[:, None, None]
        table = record.layer.embeddings
        return {"embeddings": tf.math.unsorted_segment_sum(
            tf.reshape(d, [-1, d.shape[-1]]), tf.reshape(ids, [-1]),
            table.shape[0])}


# ------------------------------------------------------------- normalization

class _AffineNormRule(_Rule):
    """LayerNormalization / GroupNormalization: z = xhat * gamma + beta."""

    def _normalize(self, layer, x):
        raise NotImplementedError

    def _param_shape(self, layer, rank):
        raise NotImplementedError

    def roles(self, layer):
        return {"gamma": getattr(layer, "gamma", None),
                "beta": getattr(layer, "beta", None)}

    def forward(self, layer, x, saved, watch):
        x = tf.cast(x, "float32")
        xhat = self._normalize(layer, x)
        saved["xhat"] = xhat
        shape = self._param_shape(layer, len(x.shape))
        z = xhat
        if getattr(layer, "gamma", None) is not None:
            z = z * tf.reshape(tf.cast(layer.gamma, z.dtype), shape)
        if getattr(layer, "beta", None) is not None:
            z = z + tf.reshape(tf.cast(layer.beta, z.dtype), shape)
        watch(z)
        return z, tf.cast(z, layer.compute_dtype)

    def _per_unit(self, record, d, layout):
        """{role: [units, *param.shape]}: the per-unit gradients of the
        record's trainable gamma and beta."""
        shape = self._param_shape(record.layer, len(d.shape))
        keep = [i for i, s in enumerate(shape) if s != 1 and i > 0]
        perm = [0] + [i for i in range(1, len(shape)) if i not in keep] + keep
        param = [d.shape[i] for i in keep]
        out = {}
        for name, variable in record.variables.items():
            t = record.saved["xhat"] * d if name == "gamma" else d
            t = tf.reshape(tf.transpose(t, perm), [layout.units, -1, *param])
            out[name] = tf.reshape(tf.reduce_sum(t, 1),
                                   [layout.units, *variable.shape])
        return out

    def sq_norms(self, record, d, layout):
        per_unit = self._per_unit(record, d, layout)
        sq = tf.add_n([clipping.sum_of_squares(
            tf.reshape(g, [layout.units, -1]), 1) for g in per_unit.values()])
        return sq, per_unit

    def sums(self, record, d, cache, factors, layout, keep):
        return {name: tf.tensordot(factors, g, 1) for name, g in cache.items()}


class _LayerNormRule(_AffineNormRule):

    def _normalize(self, layer, x):
        return ops.layer_normalization(x, None, None, layer.axis, layer.epsilon,
                                       rms_scaling=layer.rms_scaling)

    def _param_shape(self, layer, rank):
        axes = [a % rank for a in (layer.axis if isinstance(
            layer.axis, (list, tuple)) else [layer.axis])]
        gamma = layer.gamma if layer.gamma is not None else layer.beta
        shape = [1] * rank
        for a, size in zip(sorted(axes), gamma.shape):
            shape[a] = size
        return shape


class _GroupNormRule(_AffineNormRule):

    def _normalize(self, layer, x):
        shape = tf.shape(x)
        groups = layer.groups
        grouped = tf.reshape(x, tf.concat([shape[:-1], [groups, -1]], 0))
        axes = list(range(1, len(x.shape) - 1)) + [len(x.shape)]
        mean, variance = tf.nn.moments(grouped, axes, keepdims=True)
        xhat = (grouped - mean) * tf.math.rsqrt(variance + layer.epsilon)
        return tf.reshape(xhat, shape)

    def _param_shape(self, layer, rank):
        return [1] * (rank - 1) + [layer.gamma.shape[0] if layer.gamma
                                   is not None else layer.beta.shape[0]]


# ------------------------------------------------------------ interpretation

def _rule_for(layer) -> Optional[_Rule]:
    # The rules replace layer.__call__, so anything __call__ adds beyond
    # call() (activity regularization, quantized or LoRA kernels, mixed
    # precision) is left to the vectorized path.
    if (getattr(layer, "quantization_mode", None) or
            getattr(layer, "lora_enabled", False) or
            getattr(layer, "activity_regularizer", None) is not None or
            layer.compute_dtype != "float32"):
        return None
    if type(layer) is keras.layers.Dense:
        return _DenseRule()
    if type(layer) is keras.layers.DepthwiseConv2D:
        if layer.data_format == "channels_last" and layer.padding in (
                "same", "valid"):
            return _ConvRule(depthwise=True)
        return None
    if type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D):
        if layer.data_format == "channels_last" and layer.padding in (
                "same", "valid"):
            return _ConvRule()
        return None
    if type(layer) is keras.layers.Embedding:
        return None if layer.mask_zero else _EmbeddingRule()
    if type(layer) is keras.layers.LayerNormalization:
        return _LayerNormRule()
    if type(layer) is keras.layers.GroupNormalization:
        return _GroupNormRule() if layer.axis in (-1,) else None
    return None


def _has_trainable_weights(layer) -> bool:
    # A functional graph also holds bare operations (`keras.ops` calls),
    # which have no weights of their own; a variable they read is a weight
    # used outside its layer, which `forward` detects.
    return bool(getattr(layer, "trainable_weights", None))


def run_layers(model, x, call_for: Callable):
    """Runs a Sequential or functional model one operation at a time.

    Args:
      model: a `keras.Sequential` or functional model.
      x: its inputs.
      call_for: maps each operation of the model (layer or `keras.ops` node)
        to the callable that computes it in its place.

    Returns:
      The model's outputs.

    Raises:
      Unsupported: for a subclassed model, whose call() cannot be followed
        operation by operation.
    """
    if isinstance(model, keras.Sequential):
        for layer in model.layers:
            x = call_for(layer)(x)
        return x
    if isinstance(model, keras_functional.Functional):
        inputs = model._standardize_inputs(x)
        outputs = model._run_through_graph(inputs, operation_fn=call_for)
        return keras_functional.unpack_singleton(outputs)
    raise Unsupported(
        f"subclassed model {type(model).__name__} (its call() cannot be "
        "traced layer by layer)")


def is_graph_model(layer) -> bool:
    """Whether `run_layers` can follow `layer` operation by operation."""
    return isinstance(layer, (keras.Sequential, keras_functional.Functional))


def training_call(operation) -> Callable:
    """`operation` as a functional model calls it in training mode."""
    return keras_functional.operation_fn(operation, training=True)


class _Interpreter:
    """Runs a model layer by layer, recording what the fast rules need.

    Each rule reads its layer's trainable variables from copies made for
    that call alone and cut off from the gradient (`tf.stop_gradient`); the
    rest of the model reads the step's values. The model's outputs then
    depend on a step value only through a use outside the owning layer,
    which no rule accounts for; `forward` checks that there is none.
    """

    def __init__(self, variables: list, mapping: list, tape: tf.GradientTape):
        self.records: List[_Record] = []
        self._tape = tape
        self._mapping = mapping
        self._trainable_ids = {id(v) for v in variables}
        self._seen_variables: set = set()

    def run(self, model, x):
        return run_layers(model, x, self._call)

    def _call(self, layer) -> Callable:
        if not _has_trainable_weights(layer):
            return training_call(layer)
        if is_graph_model(layer):
            def call_model(x, **kwargs):
                if kwargs.get("mask") is not None:
                    raise Unsupported(f"masked input to model '{layer.name}'")
                return self.run(layer, x)
            return call_model
        rule = _rule_for(layer)
        if rule is None:
            raise Unsupported(f"no fast rule for layer '{layer.name}' "
                              f"({type(layer).__name__})")
        variables = self._trainable_roles(layer, rule)
        for v in variables.values():
            if id(v) in self._seen_variables:
                raise Unsupported(f"layer '{layer.name}' is shared (called "
                                  "more than once)")
            self._seen_variables.add(id(v))
        own = {id(v) for v in variables.values()}
        # The whole step's mapping (perturbed weights, dropout seeds): nested
        # stateless scopes do not fall back to the enclosing one.
        mapping = [(v, tf.stop_gradient(value) if id(v) in own else value)
                   for v, value in self._mapping]

        def call(x, **kwargs):
            if kwargs.get("mask") is not None or getattr(x, "_keras_mask",
                                                         None) is not None:
                raise Unsupported(f"masked input to layer '{layer.name}'")
            saved = {}
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True) as scope:
                z, out = rule.forward(layer, x, saved, self._tape.watch)
            if scope.losses:
                raise Unsupported(f"layer '{layer.name}' adds losses")
            if variables:
                self.records.append(_Record(rule, layer, variables, z, saved))
            return out

        return call

    def _trainable_roles(self, layer, rule) -> Dict[str, Any]:
        """The layer's trainable variables by role, matched by identity.

        Matching by position would hand one variable's gradient to another
        as soon as a layer is partly frozen (a frozen kernel, a frozen
        gamma), since `trainable_weights` then skips it.
        """
        roles = {name: v for name, v in rule.roles(layer).items()
                 if v is not None and id(v) in self._trainable_ids}
        known = {id(v) for v in roles.values()}
        unknown = [v.path for v in layer.trainable_weights
                   if id(v) in self._trainable_ids and id(v) not in known]
        if unknown:
            raise Unsupported(f"layer '{layer.name}' has trainable variables "
                              f"its fast rule does not cover: {unknown}")
        return roles


def check_supported(model) -> None:
    """Raises `Unsupported` unless every trainable layer has a fast rule.

    A structural check (no tensors are computed); `clipped_sum` also raises
    when it meets something this check cannot see (masks, add_loss).
    """

    def visit(layer):
        if not _has_trainable_weights(layer):
            return
        if is_graph_model(layer):
            for sub in layer.layers:
                visit(sub)
            return
        if _rule_for(layer) is None:
            raise Unsupported(f"no fast rule for layer '{layer.name}' "
                              f"({type(layer).__name__})")

    if not is_graph_model(model):
        raise Unsupported(f"subclassed model {type(model).__name__}")
    for layer in model.layers:
        visit(layer)


def forward(model, variables, x, tape: tf.GradientTape, mapping=None):
    """Runs `model` on `x`, returning (outputs, records).

    Call it inside the `keras.StatelessScope` that maps the variables to the
    point where gradients are taken, and inside `tape`, which is made to
    watch each recorded z (and nothing else: no weight gradient is needed).

    Args:
      model: a Sequential or functional model.
      variables: the trainable variables whose gradients are wanted.
      x: the model's inputs.
      tape: the tape of the step's backward pass.
      mapping: the enclosing scope's `state_mapping`, (variable, value)
        pairs, which must map each of `variables` to the step's value. None
        (no enclosing scope) runs in a scope of its own that maps
        `variables` to their current values.

    Raises:
      Unsupported: for anything the rules do not cover exactly: a layer
        without a rule, a shared layer, a variable read outside its own
        layer (tied weights, a `Lambda` or `keras.ops` call reading a
        kernel), masks, or a model the interpreter cannot follow.
    """
    scope = contextlib.nullcontext()
    if mapping is None:
        mapping = [(v, tf.convert_to_tensor(v.value)) for v in variables]
        scope = keras.StatelessScope(state_mapping=mapping)
    values = {id(v): value for v, value in mapping}
    params = [values[id(v)] for v in variables]
    interpreter = _Interpreter(variables, mapping, tape)
    with scope, tf.GradientTape(watch_accessed_variables=False) as uses:
        uses.watch(params)
        try:
            outputs = interpreter.run(model, x)
        except (AttributeError, KeyError, NotImplementedError,
                TypeError) as error:
            # Keras internals the interpreter relies on (functional graph
            # nodes, layer attributes) may not hold for every model.
            raise Unsupported(f"the layer-by-layer interpretation failed "
                              f"({type(error).__name__}: {error})") from error
    # A trace-time, data-independent check: each rule computed its layer
    # from copies cut off from `params`, so any remaining path from the
    # outputs to a parameter is a use outside its layer, whose gradient the
    # rules would silently drop.
    targets = [t for t in tf.nest.flatten(outputs) if t.dtype.is_floating]
    reached = uses.gradient(targets, params,
                            unconnected_gradients=tf.UnconnectedGradients.NONE)
    shared = [v.path for v, g in zip(variables, reached) if g is not None]
    if shared:
        raise Unsupported(f"variables used outside their own layer (tied "
                          f"weights, or read by a Lambda or keras.ops call): "
                          f"{shared}")
    covered = {id(v) for r in interpreter.records
               for v in r.variables.values()}
    missing = [v.path for v in variables if id(v) not in covered]
    if missing:
        raise Unsupported(f"variables used outside the fast rules: {missing}")
    return outputs, interpreter.records


def per_unit_sq_norms(records, deltas, layout):
    """Squared per-unit gradient norms summed over layers, and rule caches."""
    total, caches = None, []
    for record, d in zip(records, deltas):
        sq, cache = record.rule.sq_norms(record, tf.cast(d, tf.float32), layout)
        caches.append(cache)
        total = sq if total is None else total + sq
    return total, caches


def clipped_sums(records, deltas, caches, factors, keep, variables, layout):
    """sum_u factor_u g_u for every variable, ordered like `variables`.

    Units with keep = False (padding, non-finite gradients) are removed with
    `tf.where` on the per-layer tensors, so a NaN cannot leak into the sum.
    `keep=None` skips that masking: pass it only when every unit's norm is
    finite. A unit's norm is a sum of products over all of the unit's values
    that enter its sums, so a finite norm means finite values, and a zero
    factor then removes the unit exactly.
    """
    by_id = {}
    for record, d, cache in zip(records, deltas, caches):
        d = _mask_examples(tf.cast(d, tf.float32), keep, layout)
        cache = {k: _mask_units(v, keep) for k, v in cache.items()}
        grads = record.rule.sums(record, d, cache, factors, layout, keep)
        for name, g in grads.items():
            v = record.variables[name]
            by_id[id(v)] = tf.cast(g, v.dtype)
    return [by_id[id(v)] for v in variables]


def _per_example(values, t, layout):
    """Per-unit values [units] repeated for each example of t [B, ...]."""
    return tf.repeat(values, tf.shape(t)[0] // layout.units)


def _mask_examples(t, keep, layout):
    """Zeroes the examples of t [B, ...] whose unit is not kept."""
    if keep is None:
        return t
    mask = tf.reshape(_per_example(keep, t, layout),
                      [-1] + [1] * (len(t.shape) - 1))
    return tf.where(mask, t, tf.zeros_like(t))


def _mask_units(t, keep):
    if keep is None:
        return t
    mask = tf.reshape(keep, [-1] + [1] * (len(t.shape) - 1))
    return tf.where(mask, t, tf.zeros_like(t))
