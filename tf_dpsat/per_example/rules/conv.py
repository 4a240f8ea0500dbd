"""The fast rule of convolutions: Conv1D, Conv2D and DepthwiseConv2D.

A convolution is a Dense layer applied to every receptive field (patch):
dL_u/dW = sum_t a_ut^T d_ut with a_ut the patch at position t. Depthwise
convolutions share the rule: they are grouped convolutions with one group
per input channel.
"""

import keras
import tensorflow as tf
from keras import ops

from tf_dpsat.per_example import clip
from tf_dpsat.per_example.rules import base


def _same_padding(size, kernel, stride, dilation):
    """TensorFlow's SAME padding (before, after) and output size."""
    out = -(-size // stride)
    span = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + span - size, 0)
    return (total // 2, total - total // 2), out


def _output_size(size, kernel, stride, dilation, padding):
    """(padding before, after) and output size along one spatial axis."""
    if padding == "same":
        return _same_padding(size, kernel, stride, dilation)
    return (0, 0), (size - (kernel - 1) * dilation - 1) // stride + 1


def _pad(a, ph, pw):
    """`a` [B, H, W, C] padded by ph and pw along H and W; `a` itself if both are 0."""
    if not any(ph + pw):
        return a
    return tf.pad(a, [[0, 0], list(ph), list(pw), [0, 0]])


def _shifted_inputs(a, kernel_size, strides, dilation, padding):
    """The input seen by each kernel offset: kh*kw tensors [B, Ho, Wo, C].

    Slicing the padded input once per offset gives every patch without
    materialising the [B, Ho*Wo, kh*kw*C] patch matrix at once.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    ph, h_out = _output_size(a.shape[1], kh, sh, dh, padding)
    pw, w_out = _output_size(a.shape[2], kw, sw, dw, padding)
    a = _pad(a, ph, pw)
    shifts = []
    for i in range(kh):
        for j in range(kw):
            shifts.append(a[:, i * dh: i * dh + (h_out - 1) * sh + 1: sh,
                            j * dw: j * dw + (w_out - 1) * sw + 1: sw, :])
    return shifts


def _patch_gram(a, layout, kernel_size, strides, dilation, padding):
    """[units, T, T]: the Gram matrix of each unit's patches, in float64.

    Patch t . patch s is the sum over kernel offsets o of the input at t + o
    dotted with the input at s + o. Where the padded input map has fewer
    pixels squared than the kernel offsets times the output positions
    squared (stride 1), the Gram matrix of the input map is computed once
    and its entries summed along the offsets; otherwise one Gram matrix per
    offset (`_shifted_inputs`). Both are float64 (`base.gram`).
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    ph, h_out = _output_size(a.shape[1], kh, sh, dh, padding)
    pw, w_out = _output_size(a.shape[2], kw, sw, dw, padding)
    hp, wp = a.shape[1] + sum(ph), a.shape[2] + sum(pw)
    size = layout.size
    if not isinstance(size, int) or (hp * wp) ** 2 >= kh * kw * (h_out * w_out) ** 2:
        return tf.add_n([base.gram(base.group(s, layout)) for s in
                         _shifted_inputs(a, kernel_size, strides, dilation,
                                         padding)])
    a = _pad(a, ph, pw)
    pixels = base.gram(tf.reshape(a, [layout.units, size * hp * wp, -1]))
    pixels = tf.reshape(pixels, [layout.units, size, hp, wp, size, hp, wp])
    total = None
    for i in range(kh):
        rows = slice(i * dh, i * dh + (h_out - 1) * sh + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + (w_out - 1) * sw + 1, sw)
            part = pixels[:, :, rows, cols, :, rows, cols]
            total = part if total is None else total + part
    return tf.reshape(total, [layout.units, size * h_out * w_out,
                              size * h_out * w_out])


def _fold(t: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] -> [1, H, W, B*C]: the batch folded into the channels."""
    t = tf.transpose(t, [1, 2, 0, 3])
    return tf.reshape(t, [1, t.shape[0], t.shape[1], -1])


class ConvRule(base.Rule):
    """The rule of convolutions: Conv1D, Conv2D and DepthwiseConv2D.

    Channels last, any stride, padding "same"/"valid", dilation, groups.

    Direct per-example kernel gradients come from one filter-gradient op with
    the batch folded into the channels: example b's channels form groups of
    their own, so a grouped (or depthwise) filter gradient of the folded
    tensors is the stack of the B per-example filter gradients. Under XLA,
    and for a dilated depthwise convolution, they come from one batched
    product per kernel offset instead (`_per_unit_kernel_by_shifts`).
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
        _, _, dilation = self._geometry(record.layer)
        # DepthwiseConv2dNativeBackpropFilter ignores `dilations` on CPU
        # (oneDNN, TensorFlow 2.21): wrong gradients with SAME padding, an
        # error with VALID. TensorFlow's own gradient of a dilated depthwise
        # convolution never calls it (tf.nn.depthwise_conv2d turns the
        # dilation into space_to_batch), so neither does this rule.
        if layout.xla or (self.depthwise and dilation != (1, 1)):
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
        shifts = [base.group(s, layout) for s in _shifted_inputs(
            record.saved["a"], *self._geometry(layer), layer.padding)]
        d = base.group(d, layout)
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
        return base.ghost_is_cheaper(positions, k, d_out)

    def sq_norms(self, record, d, layout):
        layer = record.layer
        grouped_d = base.group(d, layout)
        terms, cache = [], {}
        kernel = "kernel" in record.variables
        if kernel and self._use_ghost(layer, grouped_d.shape[1],
                                      grouped_d.shape[2]):
            gram = _patch_gram(record.saved["a"], layout,
                               *self._geometry(layer), layer.padding)
            terms.append(base.ghost_sq_norms(gram, base.gram(grouped_d)))
        elif kernel:
            per_unit = self._per_unit_kernel(record, d, layout)
            cache["kernel"] = per_unit
            terms.append(clip.sum_of_squares(
                tf.reshape(per_unit, [layout.units, -1]), 1))
        if "bias" in record.variables:
            bias = tf.reduce_sum(grouped_d, 1)
            cache["bias"] = bias
            terms.append(clip.sum_of_squares(bias, 1))
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
        a = base.mask_examples(record.saved["a"], keep, layout)
        d = d * tf.reshape(base.per_example(factors, d, layout),
                           [-1] + [1] * (len(d.shape) - 1))
        d = d[:, None] if layer.rank == 1 else d
        (kh, kw), _, _ = self._geometry(layer)
        return tf.reshape(self._filter_gradient(
            layer, a, d, [kh, kw, *layer.kernel.shape[-2:]]),
            layer.kernel.shape)

    def unsupported(self, layer):
        if layer.data_format != "channels_last":
            return f"data_format={layer.data_format!r} (channels_last only)"
        if layer.padding not in ("same", "valid"):
            return f"padding={layer.padding!r} (same or valid only)"
        return None


base.register_rule(keras.layers.Conv1D, ConvRule())
base.register_rule(keras.layers.Conv2D, ConvRule())
base.register_rule(keras.layers.DepthwiseConv2D, ConvRule(depthwise=True))
