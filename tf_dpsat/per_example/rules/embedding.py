"""The fast rule of keras.layers.Embedding.

dL_u/dE[v] = sum_{t: id_ut = v} d_ut: the squared norm is
sum_{t,s: id_ut = id_us} d_ut . d_us.
"""

import keras
import tensorflow as tf
from keras import ops

from tf_dpsat.per_example import clip
from tf_dpsat.per_example.rules import base


class EmbeddingRule(base.Rule):
    """keras.layers.Embedding (without mask_zero)."""

    def roles(self, layer):
        return {"embeddings": layer.embeddings}

    def forward(self, layer, x, saved, watch):
        ids = tf.cast(x, "int32")
        saved["ids"] = ids
        z = ops.take(layer.embeddings, ids, axis=0)
        watch(z)
        return z, ops.cast(z, layer.compute_dtype)  # as Embedding.call

    def sq_norms(self, record, d, layout):
        ids = tf.reshape(record.saved["ids"], [layout.units, -1])
        d = base.group(d, layout)
        if ids.shape[1] == 1:
            return clip.sum_of_squares(d, [1, 2]), {}
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), d.dtype)
        return tf.reduce_sum(same * base.gram(d), [1, 2]), {}

    def sums(self, record, d, cache, factors, layout, keep):
        ids = tf.reshape(record.saved["ids"], [layout.units, -1])
        d = base.group(d, layout) * factors[:, None, None]
        table = record.layer.embeddings
        return {"embeddings": tf.math.unsorted_segment_sum(
            tf.reshape(d, [-1, d.shape[-1]]), tf.reshape(ids, [-1]),
            table.shape[0])}

    def unsupported(self, layer):
        if layer.mask_zero:
            return ("mask_zero=True: the fast engine does not follow masks "
                    "(the mask changes what the layers after it compute)")
        return None


base.register_rule(keras.layers.Embedding, EmbeddingRule())
