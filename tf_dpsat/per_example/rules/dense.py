"""The fast rule of keras.layers.Dense.

z = a W + b on inputs of any rank: dL_u/dW = sum_t a_ut^T d_ut and
dL_u/db = sum_t d_ut over the positions t of unit u. The squared norm is the
ghost norm sum_{t,s} (a_ut . a_us)(d_ut . d_us) (Goodfellow 2015; Li et al.
2022), or that of the direct per-unit gradient, whichever is cheaper.
"""

import keras
import tensorflow as tf
from keras import ops

from tf_dpsat.per_example import clip
from tf_dpsat.per_example.rules import base


class DenseRule(base.Rule):
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
        a = base.group(record.saved["a"], layout)
        d = base.group(d, layout)
        positions, d_in, d_out = a.shape[1], a.shape[2], d.shape[2]
        trainable = record.variables
        terms, cache = [], {}
        if positions == 1:
            d_sq = clip.sum_of_squares(d, [1, 2])
            if "kernel" in trainable:
                terms.append(clip.sum_of_squares(a, [1, 2]) * d_sq)
            if "bias" in trainable:  # the bias gradient is d itself
                cache["bias"] = d[:, 0]
                terms.append(d_sq)
            return tf.add_n(terms), cache
        if "kernel" in trainable and base.ghost_is_cheaper(positions, d_in, d_out):
            terms.append(base.ghost_sq_norms(base.gram(a), base.gram(d)))
        elif "kernel" in trainable:
            per_unit = tf.einsum("mpi,mpo->mio", a, d)
            cache["kernel"] = per_unit
            terms.append(clip.sum_of_squares(per_unit, [1, 2]))
        if "bias" in trainable:
            bias = tf.reduce_sum(d, 1)
            cache["bias"] = bias
            terms.append(clip.sum_of_squares(bias, 1))
        return tf.add_n(terms), cache

    def sums(self, record, d, cache, factors, layout, keep):
        grads = {}
        if "kernel" in record.variables:
            grads["kernel"] = self._kernel_sum(record, d, cache, factors,
                                               layout, keep)
        if "bias" in record.variables:
            # A matrix-vector product rather than an einsum: oneDNN's einsum
            # setup costs more than the product at this size.
            grads["bias"] = tf.linalg.matvec(cache["bias"], factors,
                                             transpose_a=True)
        return grads

    @staticmethod
    def _kernel_sum(record, d, cache, factors, layout, keep):
        if "kernel" in cache:
            return tf.einsum("m,mio->io", factors, cache["kernel"])
        if layout.size == 1 and len(d.shape) == 2:  # one row per unit
            a = base.mask_examples(record.saved["a"], keep, layout)
            return tf.matmul(a, d * factors[:, None], transpose_a=True)
        a = base.group(base.mask_examples(record.saved["a"], keep, layout), layout)
        return tf.einsum("mpi,mpo->io", a, base.group(d, layout)
                         * factors[:, None, None])


base.register_rule(keras.layers.Dense, DenseRule())
