"""Op counts of a DP model's traced train step (structural tests)."""

import collections

import tensorflow as tf


def train_graphs(model, x, y) -> list:
    """The graphs of `model.train_step`: its own and its tf.cond branches'.

    Trains one step on (x, y) first, which builds the optimizer.
    """
    model.train_on_batch(x, y)
    graph = tf.function(model.train_step).get_concrete_function((x, y)).graph
    return [graph] + [f.graph for f in graph._functions.values()]


def train_graph_ops(model, x, y) -> collections.Counter:
    """Op types and counts of `model.train_step`, tf.cond branches included."""
    return collections.Counter(op.type for g in train_graphs(model, x, y)
                               for op in g.get_operations())


def ancestors(op) -> set:
    """Names of the ops `op` waits for, through data and control edges."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + current.control_inputs:
            if parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return seen
