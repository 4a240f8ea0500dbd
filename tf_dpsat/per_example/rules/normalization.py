"""The fast rules of LayerNormalization and GroupNormalization.

Both compute z = xhat * gamma + beta with xhat normalised within each
example, so dL_u/dgamma = sum xhat * d and dL_u/dbeta = sum d over the
unit's positions; the per-unit gradients are small and taken directly.
"""

import keras
import tensorflow as tf
from keras import ops

from tf_dpsat.per_example import clip
from tf_dpsat.per_example.rules import base


class AffineNormRule(base.Rule):
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
        """The per-unit gradients of the record's trainable gamma and beta.

        Returns:
          {role: [units, *param.shape]}.
        """
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
        sq = tf.add_n([clip.sum_of_squares(
            tf.reshape(g, [layout.units, -1]), 1) for g in per_unit.values()])
        return sq, per_unit

    def sums(self, record, d, cache, factors, layout, keep):
        return {name: tf.tensordot(factors, g, 1) for name, g in cache.items()}


class LayerNormRule(AffineNormRule):

    def unsupported(self, layer):
        # Normalising over the batch axis mixes examples; the batch-mixing
        # probe refuses it too, this refuses it without running the model.
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [
            layer.axis]
        try:
            rank = len(layer.input.shape)
        except (AttributeError, ValueError):
            rank = None  # never called on a symbolic input
        if any(a == 0 or (rank is not None and a == -rank) for a in axes):
            return f"axis={layer.axis} includes the batch axis"
        return None

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


class GroupNormRule(AffineNormRule):

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

    def unsupported(self, layer):
        if layer.axis not in (-1,):
            return f"axis={layer.axis} (the channels axis -1 only)"
        return None


base.register_rule(keras.layers.LayerNormalization, LayerNormRule())
base.register_rule(keras.layers.GroupNormalization, GroupNormRule())
