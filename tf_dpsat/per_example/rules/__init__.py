"""The fast engine's per-layer rules, one module per layer family.

Built-in rules: `dense` (Dense), `conv` (Conv1D, Conv2D, DepthwiseConv2D),
`embedding` (Embedding) and `normalization` (LayerNormalization,
GroupNormalization). Importing this package registers them.

Writing a rule for your own layer: subclass `Rule` and implement

  * `roles(layer)`: the layer's variables by name, e.g. {"scale": layer.scale};
  * `forward(layer, x, saved, watch)`: the layer's computation, with the
    layer's variables read as usual; save what the norms need in `saved`,
    call `watch(z)` on the tensor z whose gradient d = dL/dz the rule needs,
    and return (z, output);
  * `sq_norms(record, d, layout)`: each unit's squared gradient norm over
    `record.variables` ([units]) and a dict of per-unit tensors for `sums`;
  * `sums(record, d, cache, factors, layout, keep)`: for each role in
    `record.variables`, sum_u factors[u] * dL_u/dV;

then `tf_dpsat.per_example.register_rule(MyLayer, MyRule())`. `group`,
`gram`, `mask_examples` and `tf_dpsat.per_example.clip.sum_of_squares` help
with the shapes; a ghost norm must go through `ghost_sq_norms`, which keeps
it a bound on what `sums` adds for the unit under rounding. A rule is looked
up by the layer's exact class. Check it against the vectorized engine, which
is exact for any layer, as
`tests/test_fast_clipping.py::test_user_rule_matches_vectorized` does.
"""

from tf_dpsat.per_example.rules import conv  # noqa: F401  (registers)
from tf_dpsat.per_example.rules import dense  # noqa: F401
from tf_dpsat.per_example.rules import embedding  # noqa: F401
from tf_dpsat.per_example.rules import normalization  # noqa: F401
from tf_dpsat.per_example.rules.base import Layout
from tf_dpsat.per_example.rules.base import Record
from tf_dpsat.per_example.rules.base import Rule
from tf_dpsat.per_example.rules.base import Unsupported
from tf_dpsat.per_example.rules.base import ghost_is_cheaper
from tf_dpsat.per_example.rules.base import ghost_sq_norms
from tf_dpsat.per_example.rules.base import gram
from tf_dpsat.per_example.rules.base import group
from tf_dpsat.per_example.rules.base import mask_examples
from tf_dpsat.per_example.rules.base import register_rule
from tf_dpsat.per_example.rules.base import registered_rule
from tf_dpsat.per_example.rules.base import rule_for

__all__ = ["Layout", "Record", "Rule", "Unsupported", "ghost_is_cheaper",
           "ghost_sq_norms", "gram", "group", "mask_examples", "register_rule",
           "registered_rule", "rule_for"]
