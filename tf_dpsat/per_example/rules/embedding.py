"""The fast rule of keras.layers.Embedding.

dL_u/dE[v] = sum_{t: id_ut = v} d_ut: the squared norm is
sum_{t,s: id_ut = id_us} d_ut . d_us.

The ids are the rows the layer reads: `keras.ops.take` (TensorFlow backend)
reads a negative id i as i + V, once, for a table of V rows. An id still
outside [0, V) reads no row whose gradient it could change: `tf.gather`
raises on a CPU, returns zeros on a GPU and clamps under XLA, and the
gradient of the gather (a segment sum) drops such an id everywhere. The rule
drops it too.
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
        ids = x
        if ids.dtype not in (tf.int32, tf.int64):  # as Embedding.call
            ids = tf.cast(ids, "int32")
        z = ops.take(layer.embeddings, ids, axis=0)
        saved["ids"] = _rows_read(ids, layer.embeddings.shape[0])
        watch(z)
        return z, ops.cast(z, layer.compute_dtype)  # as Embedding.call

    def sq_norms(self, record, d, layout):
        ids = tf.reshape(record.saved["ids"], [layout.units, -1])
        d = base.group(d, layout)
        if ids.shape[1] == 1:
            d = tf.where(ids[:, :, None] >= 0, d, tf.zeros_like(d))
            return clip.sum_of_squares(d, [1, 2]), {}
        same = tf.equal(ids[:, :, None], ids[:, None, :]) & (
            ids[:, :, None] >= 0)
        return base.ghost_sq_norms(tf.cast(same, tf.float64),
                                   base.gram(d)), {}

    def sums(self, record, d, cache, factors, layout, keep):
        ids = tf.reshape(record.saved["ids"], [layout.units, -1])
        d = base.group(d, layout) * factors[:, None, None]
        table = record.layer.embeddings
        # The segment sum drops the -1 of an id that reads no row.
        return {"embeddings": tf.math.unsorted_segment_sum(
            tf.reshape(d, [-1, d.shape[-1]]), tf.reshape(ids, [-1]),
            table.shape[0])}

    def unsupported(self, layer):
        if layer.mask_zero:
            return ("mask_zero=True: the fast engine does not follow masks "
                    "(the mask changes what the layers after it compute)")
        return None


def _rows_read(ids: tf.Tensor, rows: int) -> tf.Tensor:
    """The table row each id reads (see the module docstring), -1 for none."""
    ids = tf.where(ids < 0, ids + tf.cast(rows, ids.dtype), ids)
    return tf.where((ids >= 0) & (ids < rows), ids, -tf.ones_like(ids))


base.register_rule(keras.layers.Embedding, EmbeddingRule())
