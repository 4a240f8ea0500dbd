"""What a fast rule is, the registry of rules, and helpers for writing one.

A rule computes, for one layer call, each unit's squared gradient norm and
the clipped sum of the layer's trainable variables from two tensors of a
single forward and backward pass: what the layer saw (saved by `forward`)
and d = dL/dz, the gradient at a tensor z the rule chooses (usually the
pre-activation output). See `tf_dpsat.per_example.rules` for how to write
and register one.
"""

import dataclasses
from typing import Any
from typing import Dict
from typing import Optional

import tensorflow as tf


class Unsupported(Exception):
    """The model has a part no fast rule covers exactly."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the batch splits into units (examples or microbatches).

    Attributes:
      units: number of units; a Python int or, for a dynamic batch, a tensor.
      size: examples per unit; a Python int or a tensor.
      xla: whether the step is compiled by XLA (a rule may take another
        route there; the convolution rule does).
    """
    units: Any
    size: Any
    xla: bool = False


@dataclasses.dataclass
class Record:
    """What one layer call contributes: its rule, variables and tensors.

    Attributes:
      rule: the layer's rule.
      layer: the layer.
      variables: the layer's trainable variables by their role in the rule
        ("kernel", "bias", ...); a frozen variable has no entry.
      z: the tensor whose gradient d the rule needs.
      saved: the tensors the rule's `forward` saved (inputs, ...).
    """
    rule: "Rule"
    layer: Any
    variables: Dict[str, Any]
    z: tf.Tensor
    saved: dict


class Rule:
    """A fast rule for one layer class: forward pass, norms and sums.

    Subclass it and register an instance with `register_rule`. A rule must be
    exact: `tests/test_fast_clipping.py` shows how to check one against the
    vectorized engine.
    """

    def unsupported(self, layer) -> Optional[str]:
        """Why this rule cannot compute `layer` exactly, or None if it can.

        The reason names the cause (for example "mask_zero=True"); it is
        logged when clipping="auto" falls back, and raised under "fast".
        """
        del layer  # Most rules take every configuration of their layer.
        return None

    def roles(self, layer) -> Dict[str, Any]:
        """The layer's variables by role; None for one the layer lacks."""
        raise NotImplementedError

    def forward(self, layer, x, saved: dict, watch):
        """Computes the layer in place of its `call`.

        Args:
          layer: the layer.
          x: its input.
          saved: a dict to save tensors in for `sq_norms` and `sums`.
          watch: call watch(z) on the tensor z whose gradient d the rule
            needs, before z is used further.

        Returns:
          (z, output).
        """
        raise NotImplementedError

    def sq_norms(self, record: Record, d: tf.Tensor, layout: Layout):
        """Per-unit squared gradient norms [units] and a cache for `sums`.

        Only the record's (trainable) variables count: a frozen variable's
        gradient is neither clipped nor released. Cache entries are per-unit
        tensors [units, ...]; `sums` gets them with dropped units zeroed.
        A norm must bound what `sums` adds for the unit: take it from the
        per-unit tensor `sums` reads (the cache), or, for a ghost norm, from
        `ghost_sq_norms`. A negative norm drops the unit, like a NaN.
        """
        raise NotImplementedError

    def sums(self, record: Record, d: tf.Tensor, cache: dict,
             factors: tf.Tensor, layout: Layout, keep) -> Dict[str, Any]:
        """{role: sum_u factor_u dL_u/dV} for each of the record's variables.

        `d` and the cache arrive with dropped units zeroed; a rule that reads
        saved inputs masks them with `mask_examples(t, keep, layout)`, so a
        NaN cannot leak into the sum (`keep` is None when every unit is
        finite).
        """
        raise NotImplementedError


# Rules by exact layer class: a subclass may change `call`, so it needs a
# rule of its own.
_RULES: Dict[type, Rule] = {}


def register_rule(layer_class: type, rule: Rule) -> None:
    """Makes the fast engine compute layers of exactly `layer_class` by `rule`.

    Replaces a rule registered before for the same class.

    Args:
      layer_class: a `keras.layers.Layer` subclass.
      rule: a `Rule` instance.

    Raises:
      TypeError: `rule` is not a `Rule`, or `layer_class` not a class.
    """
    if not isinstance(layer_class, type):
        raise TypeError(f"Expected a layer class, got {layer_class!r}.")
    if not isinstance(rule, Rule):
        raise TypeError(f"Expected a tf_dpsat.per_example.Rule, got "
                        f"{type(rule).__name__}.")
    _RULES[layer_class] = rule


def registered_rule(layer_class: type) -> Optional[Rule]:
    """The rule registered for exactly `layer_class`, or None."""
    return _RULES.get(layer_class)


def rule_for(layer) -> Rule:
    """The rule that computes `layer` exactly.

    Raises:
      Unsupported: naming the cause: no rule for the layer's class, or a
        configuration its rule (or any rule) cannot follow.
    """
    name = f"layer '{layer.name}' ({type(layer).__name__})"
    # A rule replaces layer.__call__, so anything __call__ adds beyond
    # call() is left to the vectorized engine.
    if layer.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise Unsupported(
            f"{name} computes in {layer.compute_dtype}; the fast rules "
            "compute in float32, bfloat16 and float16 only")
    if getattr(layer, "quantization_mode", None):
        raise Unsupported(f"no fast rule for quantized {name}")
    if getattr(layer, "lora_enabled", False):
        raise Unsupported(f"no fast rule for {name} with LoRA enabled")
    if getattr(layer, "activity_regularizer", None) is not None:
        raise Unsupported(f"no fast rule for {name} with an activity "
                          "regularizer")
    rule = _RULES.get(type(layer))
    if rule is None:
        raise Unsupported(
            f"no fast rule for {name}; register one with "
            "tf_dpsat.per_example.register_rule")
    reason = rule.unsupported(layer)
    if reason is not None:
        raise Unsupported(f"{name}: {reason}")
    return rule


# ------------------------------------------------------------- helpers

def group(t: tf.Tensor, layout: Layout) -> tf.Tensor:
    """[B, ..., C] -> [units, positions per unit, C].

    The positions dimension stays static whenever it can be known, since
    rules choose between ghost and direct norms from static shapes.
    """
    positions = layout.size if isinstance(layout.size, int) else None
    for dim in t.shape[1:-1]:
        positions = None if positions is None or dim is None else positions * dim
    return tf.reshape(t, [layout.units, -1 if positions is None else positions,
                          t.shape[-1]])


def gram(u: tf.Tensor) -> tf.Tensor:
    """[m, p, i] -> [m, p, p]: the Gram matrix of each unit's positions.

    In float64, for `ghost_sq_norms`: a product of two float32 numbers is
    exact in float64, and the sums keep the ghost norm's cancellation error
    far below its floor.
    """
    u = tf.cast(u, tf.float64)
    return tf.einsum("mpi,mqi->mpq", u, u)


# A ghost norm is never taken below GHOST_FLOOR times the unit's magnitude
# sum_t |a_t| |d_t| (see `ghost_sq_norms`).
GHOST_FLOOR = 1e-3


def ghost_sq_norms(a_gram: tf.Tensor, d_gram: tf.Tensor) -> tf.Tensor:
    """Squared norms of g_u = sum_t a_ut^T d_ut from Gram matrices, floored.

    The ghost norm sum_{t,s} (a_t . a_s)(d_t . d_s) (Goodfellow 2015) is exact
    in exact arithmetic. In floating point, an example whose per-position
    terms a_t^T d_t are huge and cancel gets a ghost norm far below the norm
    of what the clipped sum adds for it: the sum is computed from the terms
    (`sums` of the rule), not from a materialised g_u, so its rounding is
    relative to the magnitude M_u = sum_t |a_t| |d_t| >= |g_u|, however
    small g_u is. An attacker feeding such an example could then add far
    more than C to the sum. Two guards bound what any unit adds to C, up
    to float32 rounding:

      * the Gram matrices and their product are float64 (`gram`), so the
        cancellation error, at most float64's 1.1e-16 times the number of
        products summed times M_u^2, stays far below the floor;
      * the squared norm is at least (GHOST_FLOOR M_u)^2, so the clip factor
        is at most C / (GHOST_FLOOR M_u), and the rounding of the unit's
        share of the sum, some multiple of float32's 6e-8 times factor
        times M_u <= 1000 C, stays a small fraction of C
        (`tests/test_fast_clipping.py` adds such units to a batch and
        measures the change of the sum).

    The floor changes the norm only of a unit whose terms cancel to less
    than a thousandth of their magnitudes: ordinary data does not come near
    it (terms in independent directions cancel to 1/sqrt(T) of their
    magnitudes, and Dense and convolutions take ghost norms only for T below
    both widths; an Embedding would need about 10^6 positions).

    Args:
      a_gram: [units, T, T] float64 Gram matrices of what the layer saw at
        each position (for an Embedding, 1 where two positions read the same
        row, 0 otherwise).
      d_gram: [units, T, T] float64 Gram matrices of the output gradients.

    Returns:
      [units] float32 squared norms; non-finite where an input is.
    """
    ghost = tf.reduce_sum(a_gram * d_gram, [1, 2])
    magnitude = tf.reduce_sum(tf.sqrt(tf.linalg.diag_part(a_gram) *
                                      tf.linalg.diag_part(d_gram)), 1)
    floor = tf.square(GHOST_FLOOR * magnitude)
    # NaN compares false: a non-finite ghost norm stays non-finite.
    safe = tf.where(ghost < floor, floor, ghost)
    return tf.cast(safe, tf.float32)


def ghost_is_cheaper(positions: Optional[int], d_in: int, d_out: int) -> bool:
    """Ghost norm, T^2 (d_in + d_out) per unit, against direct, T d_in d_out.

    Unknown T (a dynamic microbatch size) takes the direct gradient, whose
    cost grows only linearly in T.
    """
    return positions is not None and positions * (d_in + d_out) < d_in * d_out


def per_example(values: tf.Tensor, t: tf.Tensor, layout: Layout) -> tf.Tensor:
    """Per-unit values [units] repeated for each example of t [B, ...]."""
    return tf.repeat(values, tf.shape(t)[0] // layout.units)


def mask_examples(t: tf.Tensor, keep, layout: Layout) -> tf.Tensor:
    """Zeroes the examples of t [B, ...] whose unit is not kept (None: all)."""
    if keep is None:
        return t
    mask = tf.reshape(per_example(keep, t, layout),
                      [-1] + [1] * (len(t.shape) - 1))
    return tf.where(mask, t, tf.zeros_like(t))
