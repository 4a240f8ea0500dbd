"""Per-example (or per-microbatch) clipped gradient sums.

One entry point, `clipped_sum(model, variables, params, batch, ...)`,
returns a `ClippedSum`: the sum of the clipped per-unit gradients at the
given weights, the norms and the counts. Two engines compute the norms:

  * `fast`: one forward and one backward pass, then per-layer rules (ghost
    norms or direct per-unit gradients, and book-keeping for the sum); one
    module per layer family under `rules/`, behind a public registry
    (`register_rule`) to which users add rules for their own layers;
  * `vectorized`: `tf.vectorized_map` over per-unit backward passes, exact
    for any model.

Both give the same result; `engine="auto"` takes the fast engine where its
rules cover the whole model. The draws of stochastic layers (dropout masks)
are keyed by `secret_seed`, which a DP release must keep secret (`Seeds`).
Writing a rule is described in `tf_dpsat.per_example.rules`.

Example (a rule for a user's layer computing x * scale over the last axis):

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],),
                                         initializer="ones")
        def call(self, x):
            return x * self.scale

    class ScaleRule(tf_dpsat.per_example.Rule):
        def roles(self, layer):
            return {"scale": layer.scale}
        def forward(self, layer, x, saved, watch):
            saved["x"] = x
            z = x * layer.scale
            watch(z)
            return z, z
        def sq_norms(self, record, d, layout):
            g = tf.reduce_sum(
                tf_dpsat.per_example.group(record.saved["x"] * d, layout), 1)
            return tf.reduce_sum(tf.square(g), 1), {"scale": g}
        def sums(self, record, d, cache, factors, layout, keep):
            return {"scale": tf.tensordot(factors, cache["scale"], 1)}

    tf_dpsat.per_example.register_rule(Scale, ScaleRule())

A model using `Scale` then clips on the fast engine (`clipping="fast"`);
`tests/test_fast_clipping.py` checks this rule against the vectorized engine.
"""

from tf_dpsat.per_example import clip
from tf_dpsat.per_example import rules
from tf_dpsat.per_example.batch import Batch
from tf_dpsat.per_example.batch import Seeds
from tf_dpsat.per_example.engine import DEFAULT_CHUNK_UNITS
from tf_dpsat.per_example.engine import ENGINES
from tf_dpsat.per_example.engine import ClippedSum
from tf_dpsat.per_example.engine import chunk_count
from tf_dpsat.per_example.engine import clipped_sum
from tf_dpsat.per_example.engine import slice_count
from tf_dpsat.per_example.fast import check_supported
from tf_dpsat.per_example.rules import Layout
from tf_dpsat.per_example.rules import Record
from tf_dpsat.per_example.rules import Rule
from tf_dpsat.per_example.rules import Unsupported
from tf_dpsat.per_example.rules import group
from tf_dpsat.per_example.rules import mask_examples
from tf_dpsat.per_example.rules import register_rule

__all__ = ["Batch", "ClippedSum", "DEFAULT_CHUNK_UNITS", "ENGINES", "Layout",
           "Record", "Rule", "Unsupported", "check_supported", "chunk_count",
           "clip", "clipped_sum", "group",
           "mask_examples", "register_rule", "rules", "Seeds", "slice_count"]
