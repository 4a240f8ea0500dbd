"""The few private Keras and TensorFlow APIs tf_dpsat needs, in one place.

Each name below has no public equivalent; everything else in tf_dpsat's
core uses public APIs only. Checked on Keras 3.15 with TensorFlow 2.21 (the
tested pins); when a release moves one of them, this module is the only one
to change:

  * `LossFunctionWrapper`: the class of Keras's built-in losses, which tells
    a row-wise built-in loss from a user's (`per_example.losses.row_wise`);
  * `Functional` and its `_run_through_graph`: the base class of DP
    functional models, and the only way to run a functional graph with each
    operation replaced (the fast engine and the batch-independence probe);
  * TensorFlow's XLA control-flow context: whether ops being built will be
    compiled by XLA, where some kernels differ.
"""

import keras
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper  # noqa: F401
from keras.src.models.functional import Functional

try:  # Read only by compiled_by_xla, which copes with its absence.
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:  # pragma: no cover
    _control_flow_util = None

__all__ = ["Functional", "LossFunctionWrapper", "compiled_by_xla",
           "is_graph_model", "run_layers", "training_call"]


def compiled_by_xla() -> bool:
    """Whether the ops being built now will be compiled by XLA.

    True inside `tf.function(jit_compile=True)` (Keras' `jit_compile=True`).
    TensorFlow offers no public way to ask: this reads its XLA control-flow
    context. Should that fail, it answers True, whose kernels are correct
    everywhere.
    """
    try:
        return bool(_control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))
    except Exception:  # pylint: disable=broad-except
        return True


def is_graph_model(layer) -> bool:
    """Whether `run_layers` can follow `layer` operation by operation."""
    return isinstance(layer, (keras.Sequential, Functional))


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
      TypeError: for a subclassed model, whose call() cannot be followed
        operation by operation.
    """
    if isinstance(model, keras.Sequential):
        for layer in model.layers:
            x = call_for(layer)(x)
        return x
    if isinstance(model, Functional):
        inputs = model._standardize_inputs(x)
        outputs = model._run_through_graph(inputs, operation_fn=call_for)
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            return outputs[0]
        return outputs
    raise TypeError(f"subclassed model {type(model).__name__} (its call() "
                    "cannot be traced layer by layer)")
