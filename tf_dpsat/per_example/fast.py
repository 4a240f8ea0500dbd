"""The fast engine: per-unit norms from per-layer rules, then book-keeping.

The vectorized engine is exact but slow: TensorFlow has no vectorized rule
for the convolution filter gradient, and it materialises units x parameters
of memory. For the layers that make up most networks, each unit's weight
gradient is a simple function of what the layer saw and of d = dL/dz, the
gradient at its (pre-activation) output z. One forward pass and one backward
pass to the z's give every input and d; each layer's rule
(`tf_dpsat.per_example.rules`) then computes the per-unit squared norms,
either as ghost norms (Goodfellow 2015; Li et al. 2022; Bu et al. 2022) or
from direct per-unit gradients, whichever is cheaper for the layer's shapes.
With the norms known, the clip factors give each layer's clipped sum from
the same tensors ("book-keeping", Bu et al. 2023): no second backward pass.

Models are interpreted layer by layer (Sequential and functional graphs,
nested too); a model with any trainable layer without a registered rule, a
shared layer, a weight used outside its own layer (tied weights, a `Lambda`
or `keras.ops` call reading a layer's kernel), masking, data-dependent
`add_loss` terms, or anything else the interpreter cannot follow raises
`Unsupported` naming the cause. Each rule computes norms and sums for its
layer's trainable variables only, matched by identity, so partly frozen
layers are exact too.

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
from typing import Any
from typing import Callable
from typing import Dict
from typing import List

import keras
import tensorflow as tf

from tf_dpsat import _compat
from tf_dpsat.per_example import batch as batch_lib
from tf_dpsat.per_example import clip
from tf_dpsat.per_example import losses
from tf_dpsat.per_example import rules


def _has_trainable_weights(layer) -> bool:
    # A functional graph also holds bare operations (`keras.ops` calls),
    # which have no weights of their own; a variable they read is a weight
    # used outside its layer, which `forward` detects.
    return bool(getattr(layer, "trainable_weights", None))


def is_graph_model(layer) -> bool:
    """Whether `run_layers` can follow `layer` operation by operation."""
    return isinstance(layer, (keras.Sequential, _compat.Functional))


def training_call(operation):
    """`operation` as a functional model calls it in training mode.

    The same injection of call-context arguments as Keras's functional
    models (`training` only where the operation takes it).
    """

    def call(*args, **kwargs):
        if "training" in getattr(operation, "_call_context_args", {}):
            kwargs["training"] = True
        return operation(*args, **kwargs)

    return call


def run_layers(model, x, call_for):
    """Runs a Sequential or functional model one operation at a time.

    Keras has no public API to run a functional graph with each operation
    replaced; `Functional._run_through_graph` is the one it uses itself.

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
    if isinstance(model, _compat.Functional):
        inputs = model._standardize_inputs(x)
        outputs = model._run_through_graph(inputs, operation_fn=call_for)
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            return outputs[0]
        return outputs
    raise rules.Unsupported(f"subclassed model {type(model).__name__} (its "
                            "call() cannot be traced layer by layer)")


class _Interpreter:
    """Runs a model layer by layer, recording what the fast rules need.

    Each rule reads its layer's trainable variables from copies made for
    that call alone and cut off from the gradient (`tf.stop_gradient`); the
    rest of the model reads the step's values. The model's outputs then
    depend on a step value only through a use outside the owning layer,
    which no rule accounts for; `forward` checks that there is none.
    """

    def __init__(self, variables: list, mapping: list, tape: tf.GradientTape):
        self.records: List[rules.Record] = []
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
                    raise rules.Unsupported(f"masked input to model '{layer.name}'")
                return self.run(layer, x)
            return call_model
        rule = rules.rule_for(layer)
        variables = self._trainable_roles(layer, rule)
        for v in variables.values():
            if id(v) in self._seen_variables:
                raise rules.Unsupported(f"layer '{layer.name}' is shared (called "
                                  "more than once)")
            self._seen_variables.add(id(v))
        own = {id(v) for v in variables.values()}
        # The whole step's mapping (perturbed weights, layers' seeds): nested
        # stateless scopes do not fall back to the enclosing one.
        mapping = [(v, tf.stop_gradient(value) if id(v) in own else value)
                   for v, value in self._mapping]

        def call(x, **kwargs):
            if kwargs.get("mask") is not None or getattr(x, "_keras_mask",
                                                         None) is not None:
                raise rules.Unsupported(f"masked input to layer '{layer.name}'")
            saved = {}
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True) as scope, \
                    _compat.autocast(layer):
                z, out = rule.forward(layer, x, saved, self._tape.watch)
            if scope.losses:
                raise rules.Unsupported(f"layer '{layer.name}' adds losses")
            if variables:
                self.records.append(rules.Record(rule, layer, variables, z, saved))
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
            raise rules.Unsupported(f"layer '{layer.name}' has trainable variables "
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
        rules.rule_for(layer)

    if not is_graph_model(model):
        raise rules.Unsupported(f"subclassed model {type(model).__name__}")
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
            raise rules.Unsupported(f"the layer-by-layer interpretation failed "
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
        raise rules.Unsupported(f"variables used outside their own layer (tied "
                          f"weights, or read by a Lambda or keras.ops call): "
                          f"{shared}")
    covered = {id(v) for r in interpreter.records
               for v in r.variables.values()}
    missing = [v.path for v in variables if id(v) not in covered]
    if missing:
        raise rules.Unsupported(f"variables used outside the fast rules: {missing}")
    return outputs, interpreter.records


def in_float32(records, deltas, loss_scale: float = 1.0):
    """The records' saved tensors and the true deltas, in float32.

    Under a mixed-precision policy the forward and backward passes compute in
    bfloat16 or float16. The norms, the clip factors and the clipped sums are
    taken from the same float32 copies (the cast is exact), so each unit's
    clipped gradient has norm <= C up to float32 rounding, not to the
    rounding of the passes. Under float16 the backward pass carried the
    loss scaled by `loss_scale`: the deltas are divided by it here, before
    any norm, so what is clipped is the true gradient (a power of two
    divides exactly).
    """
    as_float32 = lambda t: (tf.cast(t, tf.float32) if t.dtype.is_floating
                            else t)
    records = [dataclasses.replace(
        r, saved={k: as_float32(v) for k, v in r.saved.items()})
        for r in records]
    deltas = [as_float32(d) for d in deltas]
    if loss_scale != 1:
        deltas = [d / loss_scale for d in deltas]
    return records, deltas


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
        d = rules.mask_examples(tf.cast(d, tf.float32), keep, layout)
        cache = {k: clip.mask_units(v, keep) for k, v in cache.items()}
        grads = record.rule.sums(record, d, cache, factors, layout, keep)
        for name, g in grads.items():
            v = record.variables[name]
            by_id[id(v)] = tf.cast(g, v.dtype)
    return [by_id[id(v)] for v in variables]


def clipped_sum(model, variables, params, batch: batch_lib.Batch,
                seeds: batch_lib.Seeds, l2_norm_clip: float,
                xla: bool, loss_scale: float = 1.0) -> batch_lib.EngineResult:
    """The clipped sum of `batch` at `params`: one forward, one backward pass.

    Args:
      model: the DP model.
      variables: its trainable variables.
      params: their values where gradients are taken, one tensor each.
      batch: the batch (or a slice of whole units of it); its stochastic
        layers draw for the whole slice with the seeds of unit `batch.first`.
      seeds: the seeds of the stochastic layers.
      l2_norm_clip: the clip norm C.
      xla: whether the step is compiled by XLA.
      loss_scale: the static loss scale S of float16 passes (1: none); the
        backward pass starts from S times each unit's loss gradient.

    Raises:
      Unsupported: naming the part of the model no rule covers exactly.
    """
    layout = rules.Layout(batch.units, batch.size, xla=xla)
    check_supported(model)
    mapping = list(zip(variables, params)) + seeds.mapping(batch.first)
    with tf.GradientTape() as tape:
        with keras.StatelessScope(state_mapping=mapping,
                                  collect_losses=True) as scope:
            y_pred, records = forward(model, variables, batch.x, tape, mapping)
    if scope.losses:
        raise rules.Unsupported("data-dependent add_loss terms")
    loss = None
    from_batch = losses.batch_loss_gradients(model, batch.y, y_pred,
                                             batch.sample_weight, batch.units)
    if from_batch is None:
        loss_grads = losses.unit_loss_gradients(model, batch.y, y_pred,
                                                batch.sample_weight,
                                                batch.units)
    else:
        loss_grads, loss = from_batch
    if loss_scale != 1:
        loss_grads = tf.nest.map_structure(
            lambda g: tf.cast(tf.cast(g, tf.float32) * loss_scale, g.dtype),
            loss_grads)
    deltas = tape.gradient(
        tf.nest.flatten(y_pred), [r.z for r in records],
        output_gradients=tf.nest.flatten(loss_grads),
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    records, deltas = in_float32(records, deltas, loss_scale)
    sq, caches = per_unit_sq_norms(records, deltas, layout)
    # No rule returns a negative squared norm (`rules.ghost_sq_norms`). One
    # from a user's rule would be cancellation, not a small gradient: taking
    # it as 0 would add the unit unclipped, so the unit is dropped like a
    # non-finite one.
    norms = tf.sqrt(tf.where(sq < 0, tf.fill(tf.shape(sq), float("nan")), sq))

    clipping = clip.clip_units(norms, batch.unit_weights(), l2_norm_clip)

    def sums(keep):
        return clipped_sums(records, deltas, caches, clipping.factors, keep,
                            variables, layout)

    # Masking every layer's tensors costs about as much as the sums' own
    # scaling in graph mode, and is only needed when some unit is
    # non-finite. XLA fuses the masks into their consumers, and its CPU
    # backend runs convolutions inside a conditional very slowly.
    if xla:
        summed = sums(clipping.keep)
    else:
        summed = tf.cond(tf.reduce_all(tf.math.is_finite(norms)),
                         lambda: sums(None), lambda: sums(clipping.keep))
    return batch_lib.EngineResult(summed=summed, norms=norms,
                                  clipping=clipping, y_pred=y_pred,
                                  extra_loss=tf.zeros([batch.units]),
                                  loss=loss)
