"""tf.distribute helpers shared by the optimizer and the per-example engines.

Every function works unchanged on one device (the default strategy).
"""

import tensorflow as tf


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
    ctx = tf.distribute.get_replica_context()
    return 0 if ctx is None else ctx.replica_id_in_sync_group


def all_reduce_sum(value):
    """Sums `value` (a tensor or list) over replicas; identity on one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def assign_per_replica(variables, values) -> None:
    """Assigns each replica's own value to its copy of each variable.

    Mirrored variables without an aggregation cannot be assigned in a replica
    context; like Keras's gradient accumulation, route through a merge call.

    Args:
      variables: Keras variables.
      values: one tensor per variable, this replica's value.
    """

    def update(distribution, variables, values):
        for var, value in zip(variables, values):
            distribution.extended.update(
                var, lambda v, x: v.assign(x), args=(value,), group=False)

    variables = [v.value for v in variables]
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context
        update(tf.distribute.get_strategy(), variables, values)
    else:
        ctx.merge_call(update, args=(variables, values))
