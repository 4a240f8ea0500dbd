"""Refuses models whose layers mix examples across the batch.

The privacy of DP-SGD (and of DP-SAT) rests on one fact: each example acts
on the update only through its own gradient, clipped to norm C, so adding or
removing an example moves the clipped sum by at most C, and Gaussian noise of
standard deviation sigma * C hides that move. It holds only while example j's
gradient does not depend on example i. A layer that mixes examples breaks it
without any error: batch statistics (BatchNormalization in training mode),
`x - mean(x, axis=0)` in a `Lambda`, attention across the batch axis.
Removing one example then changes every other example's clipped gradient as
well, the clipped sum moves by more than C, and the noise no longer covers
it: per-example clipping bounds nothing.

Layers with weights are interpreted by the clipping paths, but a weightless
layer (a `Lambda`, a `keras.ops` call in a functional graph, a custom layer)
can compute anything, and no structural rule can tell. So this module tests
it, once per model before its first private step: on random inputs built
from the model's input specs (never from data), it runs the model in
training mode on a reference batch, then once more for each of the first,
a middle and the last example with that one example replaced, and checks
that no layer's output for the other examples changed. Replacing examples
at both ends matters: a layer in which each row reads only the rows after
it (a reverse cumulative sum) ignores a change of the first example. Every
pass runs in a fresh `keras.StatelessScope`, which starts from the same
dropout seed states (so dropout masks are the same) and keeps every update
(seeds, statistics) out of the model, so the probe changes no state.

The backward pass is probed the same way: each pass also backpropagates
random output gradients, and replacing one example changes that example's
output gradient too; no other example's gradient at any operation's output
(or at the inputs) may change. The fast clipping engine reads each
example's gradients from one backward pass of the whole batch, so a layer
whose forward pass is per-example but whose gradient couples examples (a
`tf.custom_gradient` normalised by batch statistics) would let one example
move the others' clipped gradients.

A subclassed model has no input specs; it is probed at its first private
step instead, on random inputs shaped like that step's batch (its outputs
and its inputs' gradients only: its layers cannot be followed one by one).

A probe can be inconclusive: for a model it cannot build inputs for
(string, sparse or ragged inputs; a fixed batch size of 1), that fails on
them or turns them into NaN or infinities (a logarithm of features: the
probe tries standard normal inputs, then positive ones), whose passes
differ without any change to the inputs (randomness outside Keras's seed
generators), or in which replacing an example never changes its own
outputs. `check` then returns a `Verdict` that says why, and the fast
clipping engine refuses the model: `clipping="auto"` uses the vectorized
engine, which runs each example's forward and backward pass alone, so no
layer can mix examples there; `clipping="fast"` raises.
"""

import concurrent.futures
import functools
import weakref
from typing import List
from typing import NamedTuple
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tf_dpsat.per_example import fast

# Examples per probe batch: each is perturbed in turn, the others watched.
_BATCH = 3
# Size of an input dimension the model leaves unknown (a sequence length).
_UNKNOWN_DIM = 8
# The probe's float inputs, tried in turn until one is conclusive: standard
# normal, then positive (for models that take a logarithm or a square root
# of their features).
_INPUT_KINDS = ("normal", "positive")
# `_first_nonfinite` when every value is finite.
_FINITE = object()
# Verdicts of the models already probed.
_VERDICTS = weakref.WeakKeyDictionary()


class Verdict(NamedTuple):
    """What the probe established about a model it did not refuse.

    Attributes:
      checked: True when the probe was conclusive and no layer mixed
        examples, forward or backward; False when it could not tell.
      reason: why it could not tell ("" when checked).
    """
    checked: bool
    reason: str = ""


class _Pass(NamedTuple):
    """One probe pass: [(operation, value)] forward and backward.

    forward: each operation's output, the model's outputs last.
    backward: the gradient at each operation's float outputs (a list per
      operation), then (None, the gradients at the model's float inputs).
    """
    forward: List[tuple]
    backward: List[tuple]


def check(model, like=None) -> Optional[Verdict]:
    """Raises ValueError if a layer of `model` mixes examples across the batch.

    The probe runs once per model (eagerly, also when called while a step is
    traced); later calls return its verdict at once.

    Args:
      model: the DP model about to be trained.
      like: a batch of the model's inputs (tensors, symbolic or not), whose
        structure, shapes and dtypes stand in for the input specs a
        subclassed model lacks; its values are never read. Without specs
        and without `like`, the call decides nothing and a later call
        probes.

    Returns:
      The `Verdict`, or None when nothing was decided (no specs, no `like`).

    Raises:
      ValueError: naming the first layer (or operation) whose output for
        one example depends on another example of the batch, or whose
        gradient does.
    """
    verdict = _VERDICTS.get(model)
    if verdict is not None:
        return verdict
    specs = _input_specs(model)
    if specs is None and like is None:
        return None  # Probed at the first step, where a batch gives the shapes.
    probe = functools.partial(_probe, model, like if specs is None else specs,
                              fixed_batch=specs is not None)
    if tf.inside_function():
        # Eager even inside a traced train step: in a thread of its own,
        # whose context is eager. (`tf.init_scope` is eager too, but its
        # gradient tapes do not record custom gradients.)
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            verdict = executor.submit(probe).result()
    else:
        verdict = probe()
    _VERDICTS[model] = verdict
    return verdict


def _probe(model, specs, fixed_batch: bool) -> Verdict:
    reasons = []
    for kind in _INPUT_KINDS:
        inputs = _probe_inputs(specs, fixed_batch, kind)
        if isinstance(inputs, str):
            return Verdict(False, inputs)  # no other inputs would do
        reason = _probe_with(model, *inputs)
        if reason is None:
            return Verdict(True)
        reasons.append(f"{kind} inputs: {reason}")
    return Verdict(False, "; ".join(reasons))


def _probe_with(model, reference, perturbations) -> Optional[str]:
    """None if no layer mixes examples; why the probe cannot tell otherwise.

    Raises:
      ValueError: a layer mixes examples.
    """
    try:
        first = _run(model, reference, row=None)
        again = _run(model, reference, row=None)
        changed = [(row, _run(model, x, row)) for row, x in perturbations]
    except Exception as error:  # pylint: disable=broad-except
        # Inputs built from specs alone may be invalid for the model (ids
        # beyond a table, sizes a layer rejects); training may still work.
        return f"the model fails on them ({error})"
    culprit = _first_nonfinite(first)
    if culprit is not _FINITE:
        # NaN rows compare equal to NaN rows: nothing could be seen.
        return (f"{_described(culprit)} turns them into NaN or infinities "
                "(forward or backward)")
    if (any(_differs(a, b, row=None, batch=0)
            for (_, a), (_, b) in zip(first.forward, again.forward)) or
            any(_differs(a, b, row=None, batch=0)
                for (_, a), (_, b) in zip(first.backward, again.backward))):
        return ("two passes on the same inputs differ (randomness outside "
                "Keras's seed generators)")
    batch = _batch_size(reference)
    for row, outputs in changed:
        for (operation, a), (_, b) in zip(first.forward, outputs.forward):
            if _differs(a, b, row=row, batch=batch):
                raise ValueError(_mixing_message(operation, backward=False))
    # A layer that mixes forward mixes backward too: name it by its output
    # first (above), then look for mixing in the backward pass alone.
    for row, outputs in changed:
        # Walked from the outputs back to the inputs: the first gradient
        # that changed is at the input of the operation that mixes.
        for (operation, a), (_, b) in zip(_outputs_back(first.backward),
                                          _outputs_back(outputs.backward)):
            if _differs(a, b, row=row, batch=batch, rows_only=True):
                raise ValueError(_mixing_message(operation, backward=True))
    if not any(_row_changed(first.forward[-1][1], outputs.forward[-1][1],
                            row, batch) for row, outputs in changed):
        return ("replacing an example did not change its own outputs, so no "
                "change could be followed")
    return None


def _outputs_back(backward: list) -> list:
    """The operations' gradients from the last operation back, then the inputs'."""
    return backward[-2::-1] + backward[-1:]


def _described(operation) -> str:
    if operation is None:
        return "the model's inputs"
    kind = "Layer" if isinstance(operation, keras.layers.Layer) else "Operation"
    return f"{kind} '{operation.name}' ({type(operation).__name__})"


def _mixing_message(operation, backward: bool) -> str:
    if backward:
        where = ("the model's inputs" if operation is None else
                 f"the output of {_described(operation)}")
        what = (f"The gradient at {where} for one example changed when "
                "only another example of the batch (its inputs and its output "
                "gradient) changed: an operation after it mixes examples in "
                "its backward pass (a custom gradient computed from the whole "
                "batch).")
    else:
        what = (f"{_described(operation)} mixes "
                "examples across the batch: in training mode its output for "
                "one example changed when only another example of the batch "
                "changed.")
    return (
        f"{what} (Probed on random inputs.) Each example's gradient then "
        "depends on the other examples, so per-example clipping no longer "
        "bounds any example's influence and the noise does not give the "
        "stated privacy. Remove it, or make it act on each example alone: "
        "reduce over an example's own axes, never axis 0, and normalise with "
        "keras.layers.GroupNormalization or LayerNormalization instead of "
        "batch statistics.")


def _input_specs(model):
    """The model's input KerasTensors, in the structure its call takes.

    None for a model without them (a subclassed model).
    """
    try:
        if isinstance(model, keras.Sequential):
            return model.inputs[0]
        return model.input
    except (AttributeError, IndexError, ValueError, TypeError):
        return None


def _probe_inputs(specs, fixed_batch: bool, kind: str):
    """(reference, [(row, perturbed)]) input structures, or why there are none.

    Each perturbed structure differs from the reference in one example (row)
    only: the first, a middle and the last example in turn. With
    `fixed_batch`, a static batch size of the specs is kept (a model built
    for it may need it); otherwise the probe batch has _BATCH rows. Float
    inputs are standard normal (`kind` "normal") or in [0.5, 4) ("positive").
    """
    rng = np.random.default_rng(0)
    flat = tf.nest.flatten(specs)
    batch = _BATCH
    if fixed_batch:
        batch = next((s.shape[0] for s in flat if s.shape[0] is not None),
                     _BATCH)
    rows = sorted({0, batch // 2, batch - 1})
    reference, perturbed = [], {row: [] for row in rows}
    for spec in flat:
        if batch < 2 or getattr(spec, "sparse", False) or getattr(
                spec, "ragged", False) or isinstance(spec, tf.RaggedTensor):
            return f"input '{_name(spec)}' cannot hold a probe batch"
        shape = (batch,) + tuple(_UNKNOWN_DIM if d is None else d
                                 for d in spec.shape[1:])
        dtype = tf.as_dtype(spec.dtype)
        if dtype.is_floating:
            a = rng.normal(size=shape)
        elif dtype.is_integer or dtype.is_bool:
            # 0 and 1 are valid ids for any embedding table.
            a = rng.integers(0, 2, size=shape)
        else:
            return f"input '{_name(spec)}' has dtype {spec.dtype}"
        if dtype.is_floating and kind == "positive":
            a = 0.5 + np.abs(a)
        reference.append(tf.constant(a.astype(dtype.as_numpy_dtype)))
        for row in rows:
            b = a.copy()
            if dtype.is_floating:
                b[row] = 3.0 * rng.normal(size=shape[1:]) + 1.0
                if kind == "positive":
                    b[row] = 0.5 + np.abs(b[row])
            else:
                b[row] = 1 - a[row]
            perturbed[row].append(tf.constant(b.astype(dtype.as_numpy_dtype)))
    return (tf.nest.pack_sequence_as(specs, reference),
            [(row, tf.nest.pack_sequence_as(specs, perturbed[row]))
             for row in rows])


def _name(spec) -> str:
    # An eager tensor (a batch of a step run eagerly) has no name.
    return getattr(spec, "name", None) or "input"


def _floats(structure) -> list:
    return [t for t in tf.nest.flatten(structure)
            if tf.is_tensor(t) and t.dtype.is_floating]


def _output_gradients(outputs, row, batch: int) -> list:
    """Seeded random gradients for the float outputs; `row`'s replaced.

    Both values are drawn for every row whether replaced or not, so the
    other rows are the same in every pass.
    """
    rng = np.random.default_rng(1)
    result = []
    for t in outputs:
        g = rng.normal(size=t.shape)
        other = 3.0 * rng.normal(size=t.shape[1:]) + 1.0 if t.shape.rank else 0
        if row is not None and t.shape.rank and t.shape[0] == batch:
            g[row] = other
        result.append(tf.constant(g, t.dtype))
    return result


def _run(model, x, row: Optional[int]) -> _Pass:
    """One pass of `model` on `x`, forward and backward.

    The backward pass takes random output gradients, with `row`'s replaced
    (None: none). Nested Sequential and functional models are followed
    inside, so the innermost culprit is named.
    """
    recorded = []
    inputs = _floats(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)

        def call_for(operation):
            if fast.is_graph_model(operation):
                return lambda x, **kwargs: fast.run_layers(operation, x,
                                                              call_for)
            call = fast.training_call(operation)

            def record(*args, **kwargs):
                out = call(*args, **kwargs)
                # Watched so that its gradient exists even where nothing
                # upstream is (integer inputs, weights read as constants).
                tape.watch(_floats(out))
                recorded.append((operation, out))
                return out
            return record

        with keras.StatelessScope():
            if fast.is_graph_model(model):
                outputs = fast.run_layers(model, x, call_for)
            else:
                outputs = model(x, training=True)
    targets = _floats(outputs)
    sources = [_floats(out) for _, out in recorded]
    flat_sources = [t for ts in sources for t in ts] + inputs
    gradients = tape.gradient(
        targets, flat_sources,
        output_gradients=_output_gradients(targets, row, _batch_size(x)),
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    backward, start = [], 0
    for (operation, _), ts in zip(recorded, sources):
        backward.append((operation, gradients[start:start + len(ts)]))
        start += len(ts)
    backward.append((None, gradients[start:]))
    return _Pass(forward=recorded + [(model, outputs)], backward=backward)


def _first_nonfinite(probe: _Pass):
    """The first operation with a non-finite output or gradient, or _FINITE.

    None stands for the model's inputs (their gradient).
    """
    for operation, value in probe.forward + probe.backward:
        for t in _floats(value):
            if not np.all(np.isfinite(np.asarray(t))):
                return operation
    return _FINITE


def _batch_size(x) -> int:
    return int(tf.nest.flatten(x)[0].shape[0])


def _row_changed(a, b, row: int, batch: int) -> bool:
    """Whether any float output with `batch` rows changed in `row`."""
    for s, t in zip(_floats(a), _floats(b)):
        s, t = np.asarray(s), np.asarray(t)
        if s.ndim and s.shape[0] == batch and not np.allclose(
                s[row], t[row], rtol=1e-5, atol=1e-6):
            return True
    return False


def _differs(a, b, row, batch: int, rows_only: bool = False) -> bool:
    """Whether outputs a and b differ in any row but `row` (None: any row).

    A tensor without `batch` rows is compared whole: a value shared by all
    examples must not depend on the perturbed example either. With
    `rows_only` it is skipped (the gradient at a value shared by all
    examples sums over them).
    """
    a, b = tf.nest.flatten(a), tf.nest.flatten(b)
    if len(a) != len(b):
        return True
    for s, t in zip(a, b):
        if not tf.is_tensor(s):
            continue
        s, t = np.asarray(s), np.asarray(t)
        if s.shape != t.shape:
            return True
        has_rows = s.ndim and s.shape[0] == batch
        if rows_only and row is not None and not has_rows:
            continue
        if row is not None and has_rows:
            s, t = np.delete(s, row, axis=0), np.delete(t, row, axis=0)
        if np.issubdtype(s.dtype, np.floating):
            if not np.allclose(s, t, rtol=1e-5, atol=1e-6):
                return True
        elif not np.array_equal(s, t):
            return True
    return False
