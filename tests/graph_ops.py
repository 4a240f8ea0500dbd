"""Op counts of a DP model's traced train step (structural tests)."""

import collections

import tensorflow as tf


def train_graph_ops(model, x, y) -> collections.Counter:
    """Op types and counts of `model.train_step`, tf.cond branches included.

    Trains one step on (x, y) first, which builds the optimizer.
    """
    model.train_on_batch(x, y)
    graph = tf.function(model.train_step).get_concrete_function((x, y)).graph
    ops = collections.Counter(op.type for op in graph.get_operations())
    for f in graph._functions.values():  # branches of tf.cond
        ops.update(op.type for op in f.graph.get_operations())
    return ops
