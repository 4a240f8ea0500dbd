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

A subclassed model has no input specs; it is probed at its first private
step instead, on random inputs shaped like that step's batch (its outputs
only: its layers cannot be followed one by one). A model it cannot build
inputs for (string, sparse or ragged inputs; a fixed batch size of 1), that
fails on such inputs, or whose passes differ without any change to the
inputs (randomness outside Keras's seed generators) is not probed, and a
warning says so.
"""

import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_dpsat.per_example import fast

# Examples per probe batch: each is perturbed in turn, the others watched.
_BATCH = 3
# Size of an input dimension the model leaves unknown (a sequence length).
_UNKNOWN_DIM = 8
# Models already probed (passed or skipped with a warning).
_PROBED = weakref.WeakSet()


def check(model, like=None) -> None:
    """Raises ValueError if a layer of `model` mixes examples across the batch.

    The probe runs once per model (eagerly, also when called while a step is
    traced); later calls return at once.

    Args:
      model: the DP model about to be trained.
      like: a batch of the model's inputs (tensors, symbolic or not), whose
        structure, shapes and dtypes stand in for the input specs a
        subclassed model lacks; its values are never read. Without specs
        and without `like`, the call decides nothing and a later call
        probes.

    Raises:
      ValueError: naming the first layer (or operation) whose output for
        one example depends on another example of the batch.
    """
    if model in _PROBED:
        return
    specs = _input_specs(model)
    if specs is None and like is None:
        return  # Probed at the first step, where a batch gives the shapes.
    with tf.init_scope():  # eager even inside a traced train step
        _probe(model, like if specs is None else specs,
               fixed_batch=specs is not None)
    _PROBED.add(model)


def _probe(model, specs, fixed_batch: bool) -> None:
    inputs = _probe_inputs(specs, fixed_batch)
    if isinstance(inputs, str):
        return _skip(model, inputs)
    reference, perturbations = inputs
    try:
        first = _run(model, reference)
        again = _run(model, reference)
        changed = [(row, _run(model, x)) for row, x in perturbations]
    except Exception as error:  # pylint: disable=broad-except
        # Inputs built from specs alone may be invalid for the model (ids
        # beyond a table, sizes a layer rejects); training may still work,
        # so say that the model went unchecked instead of failing here.
        return _skip(model, f"it fails on the probe inputs ({error})")
    if any(_differs(a, b, row=None, batch=0)
           for (_, a), (_, b) in zip(first, again)):
        return _skip(model, "two passes on the same inputs differ (randomness "
                     "outside Keras's seed generators)")
    batch = _batch_size(reference)
    for row, outputs in changed:
        for (operation, a), (_, b) in zip(first, outputs):
            if _differs(a, b, row=row, batch=batch):
                raise ValueError(_mixing_message(operation))


def _skip(model, reason: str) -> None:
    logging.warning(
        "Model '%s' was not checked for layers that mix examples across the "
        "batch: %s. Such a layer would void the privacy guarantee; make "
        "sure the model has none.", model.name, reason)


def _mixing_message(operation) -> str:
    kind = "Layer" if isinstance(operation, keras.layers.Layer) else "Operation"
    return (
        f"{kind} '{operation.name}' ({type(operation).__name__}) mixes "
        "examples across the batch: in training mode its output for one "
        "example changed when only another example of the batch changed "
        "(probed on random inputs). Each example's gradient then depends on "
        "the other examples, so per-example clipping no longer bounds any "
        "example's influence and the noise does not give the stated "
        "privacy. Remove it, or make it act on each example alone: reduce "
        "over an example's own axes, never axis 0, and normalise with "
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


def _probe_inputs(specs, fixed_batch: bool):
    """(reference, [(row, perturbed)]) input structures, or why there are none.

    Each perturbed structure differs from the reference in one example (row)
    only: the first, a middle and the last example in turn. With
    `fixed_batch`, a static batch size of the specs is kept (a model built
    for it may need it); otherwise the probe batch has _BATCH rows.
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
        reference.append(tf.constant(a.astype(dtype.as_numpy_dtype)))
        for row in rows:
            b = a.copy()
            if dtype.is_floating:
                b[row] = 3.0 * rng.normal(size=shape[1:]) + 1.0
            else:
                b[row] = 1 - a[row]
            perturbed[row].append(tf.constant(b.astype(dtype.as_numpy_dtype)))
    return (tf.nest.pack_sequence_as(specs, reference),
            [(row, tf.nest.pack_sequence_as(specs, perturbed[row]))
             for row in rows])


def _name(spec) -> str:
    # An eager tensor (a batch of a step run eagerly) has no name.
    return getattr(spec, "name", None) or "input"


def _run(model, x) -> list:
    """[(operation, output)] of every operation, the model's outputs last.

    Nested Sequential and functional models are followed inside, so the
    innermost culprit is named.
    """
    recorded = []

    def call_for(operation):
        if fast.is_graph_model(operation):
            return lambda x, **kwargs: fast.run_layers(operation, x,
                                                          call_for)
        call = fast.training_call(operation)

        def record(*args, **kwargs):
            out = call(*args, **kwargs)
            recorded.append((operation, out))
            return out
        return record

    with keras.StatelessScope():
        if fast.is_graph_model(model):
            outputs = fast.run_layers(model, x, call_for)
        else:
            outputs = model(x, training=True)
    return recorded + [(model, outputs)]


def _batch_size(x) -> int:
    return int(tf.nest.flatten(x)[0].shape[0])


def _differs(a, b, row, batch: int) -> bool:
    """Whether outputs a and b differ in any row but `row` (None: any row).

    A tensor without `batch` rows is compared whole: a value shared by all
    examples must not depend on the perturbed example either.
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
        if row is not None and s.ndim and s.shape[0] == batch:
            s, t = np.delete(s, row, axis=0), np.delete(t, row, axis=0)
        if np.issubdtype(s.dtype, np.floating):
            if not np.allclose(s, t, rtol=1e-5, atol=1e-6, equal_nan=True):
                return True
        elif not np.array_equal(s, t):
            return True
    return False
