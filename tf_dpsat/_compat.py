"""The few private Keras and TensorFlow APIs tf_dpsat needs, in one place.

Each name below has no public equivalent; everything else in tf_dpsat's
core uses public APIs only. Checked on Keras 3.15 with TensorFlow 2.21 (the
tested pins); when a release moves one of them, this module is the only one
to change:

  * `LossFunctionWrapper`: the class of Keras's built-in losses, which tells
    a row-wise built-in loss from a user's (`per_example.losses.row_wise`);
  * `Functional`: the base class of DP functional models, and the class
    whose graph the fast engine and the batch-independence probe run
    operation by operation (`tf_dpsat.per_example.fast.run_layers`, through
    `Functional._run_through_graph`, the only way Keras offers to run a
    functional graph with each operation replaced);
  * TensorFlow's XLA control-flow context: whether ops being built will be
    compiled by XLA, where some kernels differ;
  * Keras's global `SeedGenerator`, from which `keras.random` ops without a
    seed draw: the DP step keys its draws like those of the model's own
    generators (`tf_dpsat.per_example.Seeds`).
"""

import tensorflow as tf
from keras.src.backend import AutocastScope
from keras.src.backend.common import global_state as _global_state
from keras.src.losses.losses import LossFunctionWrapper  # noqa: F401
from keras.src.models.functional import Functional
from keras.src.random import seed_generator as _seed_generator

try:  # Read only by compiled_by_xla, which copes with its absence.
    from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:  # pragma: no cover
    _control_flow_util = None

__all__ = ["Functional", "LossFunctionWrapper", "autocast", "compiled_by_xla",
           "global_seed_generator"]


def autocast(layer) -> AutocastScope:
    """The scope in which `layer`'s variables read as its `__call__` sees them.

    Under a mixed-precision policy `Layer.__call__` reads float32 variables
    cast to the compute dtype (bfloat16 or float16); a fast rule runs in the
    layer's place, so it needs the same scope. Keras has no public API for
    it.
    """
    cast = (layer.autocast and layer.compute_dtype != layer.variable_dtype)
    return AutocastScope(layer.compute_dtype if cast else None)


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


def global_seed_generator(create: bool):
    """Keras's global `SeedGenerator`, or None where it does not exist.

    `keras.random` ops called without a seed draw from it, and create it on
    their first draw (inside a traced step: too late to key it). Keras keeps
    it per thread.

    Args:
      create: create it now, outside any function being traced, if this
        thread has none. Only on one device: a tf.distribute replica runs in
        a thread of its own, where a variable created inside the replicated
        step fails to trace.
    """
    if not create:
        return _global_state.get_global_attribute(
            _seed_generator.GLOBAL_SEED_GENERATOR)
    with tf.init_scope():
        return _seed_generator.global_seed_generator()
