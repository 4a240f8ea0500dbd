"""Differentially private training over several workers with tf.distribute.

What: the pieces a DP training loop needs on several replicas (local GPUs,
or worker processes on several machines with
`tf.distribute.MultiWorkerMirroredStrategy`):

* `make_strategy`: the strategy named by a flag ("none", "mirrored",
  "multi_worker" from `TF_CONFIG`, "tpu").
* `agree_on_int`: every worker gets the chief's value of an int (the run's
  secret), through one collective at start-up.
* `replica_rows` / `distribute_global_batch`: each replica's contiguous share
  of one global batch.
* `fit`: a training loop over `strategy.run(model.train_step)` driving
  Keras callbacks, and `evaluate_locally`, an evaluation without collectives.
* `check_same_batch` / `any_worker_stops`: what `fit`'s workers agree on at
  every step: the same global batch, and whether to stop.

Why this way (DP semantics across workers):

* One global Poisson sample per step, the same whatever the cluster: every
  worker draws the global padded batch from the shared sampling key (the
  whole inclusion mask is cheap) and keeps its replicas' rows. Which examples
  a step trains on therefore depends on the secret and the step only, so the
  accountant's Poisson analysis, and epsilon, are those of one process.
* Each replica gets ceil(P / R) rows of the P-row padded batch, the last ones
  padded with zero-weight rows, so every replica has one static shape and
  padding contributes nothing to the clipped sum.
* Noise is added once globally: the DP optimizers already draw, on each of
  the R replicas, noise of variance sigma^2 C^2 / R from a stream of their
  own (keyed by the replica id), so the all-reduced sum carries exactly
  sigma^2 C^2. Their noise key must be the same on every worker: set it from
  the agreed secret.
* Keras 3's `Model.fit` reduces per-replica batches and logs across workers
  wrongly under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
  `fit` here runs its own loop, and `evaluate_locally` evaluates on each
  worker alone (the weights are identical on every replica).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any
from typing import Dict
from typing import Iterable
from typing import NamedTuple
from typing import Optional
from typing import Sequence
from typing import Tuple

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "DISTRIBUTIONS",
    "Evaluation",
    "agree_on_int",
    "any_worker_stops",
    "check_same_batch",
    "distribute_global_batch",
    "evaluate_locally",
    "fit",
    "is_chief",
    "make_strategy",
    "replica_rows",
    "scope",
    "share_size",
]

DISTRIBUTIONS: Tuple[str, ...] = ("none", "mirrored", "multi_worker", "tpu")

# agree_on_int sends a value in [0, 2**63) as two 32-bit halves in float64,
# which holds every integer below 2**53 exactly: a sum of one half and zeros
# is exact. (An int64 all-reduce is refused by the collective implementation.)
_HALF_BITS = 32
_INT_LIMIT = 2**63
# A global batch's fingerprint: two parts of this many bits of its SHA-256.
# Summed over up to 2^12 replicas, the parts and their squares stay exact
# in float64 (2^(2*20+12) < 2^53).
_FINGERPRINT_BITS = 20
_FINGERPRINT_MAX_REPLICAS = 2**12


def make_strategy(name: str) -> Optional[tf.distribute.Strategy]:
    """The strategy of `--distribution`.

    Create it first in the program: MultiWorkerMirroredStrategy configures
    TensorFlow's collectives, which must happen before TensorFlow runs any op.

    Args:
      name: "none" (no strategy), "mirrored" (MirroredStrategy over this
        machine's GPUs, or its CPU), "multi_worker" (MultiWorkerMirroredStrategy
        over the cluster described by the `TF_CONFIG` environment variable) or
        "tpu" (TPUStrategy over the TPU found by TPUClusterResolver).

    Returns:
      The strategy; None for "none".

    Raises:
      ValueError: An unknown name, or "multi_worker" without `TF_CONFIG`.
    """
    if name not in DISTRIBUTIONS:
        raise ValueError(f"Expected distribution={name!r} to be one of {DISTRIBUTIONS}.")
    if name == "none":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "distribution='multi_worker' reads the cluster from the TF_CONFIG "
                "environment variable, which is not set (see the README: "
                "multi-worker training).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def scope(strategy: Optional[tf.distribute.Strategy]):
    """`strategy.scope()`, or a no-op context without a strategy."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """Whether this process is the chief: the one that writes a run's files.

    The chief is the task of type "chief" if the cluster has one, else worker
    0; a process outside any cluster (no strategy, or one without a cluster
    resolver) is its own chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    jobs = resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and "chief" not in jobs


def agree_on_int(strategy: Optional[tf.distribute.Strategy], value: int) -> int:
    """Every worker gets replica 0's `value`: the chief's.

    Every worker must call it, at the same point of the program (it is a
    collective). Replica 0 runs on the chief (MultiWorkerMirroredStrategy
    numbers the chief's replicas first), so the other workers may pass any
    placeholder, e.g. 0. Nothing is logged or written, but the value crosses
    the cluster's gRPC connections, which TensorFlow does not encrypt: for a
    secret, keep the workers on a private network.

    Args:
      strategy: The strategy; None (one process) returns `value`.
      value: An int in [0, 2**63).

    Returns:
      The chief's value.

    Raises:
      ValueError: `value` is outside [0, 2**63).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            0 <= int(value) < _INT_LIMIT):
        raise ValueError("Expected an int in [0, 2**63) to agree on.")  # not echoed
    if strategy is None:
        return int(value)
    value = int(value)
    halves = np.array([value >> _HALF_BITS, value & (2**_HALF_BITS - 1)], np.float64)

    def contribution():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        keep = tf.cast(tf.equal(replica, 0), tf.float64)
        return tf.constant(halves) * keep

    summed = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribution),
                             axis=None).numpy()
    high, low = (int(h) for h in summed)
    return (high << _HALF_BITS) + low


def _fingerprint(batch: Sequence[Any]) -> np.ndarray:
    """Two `_FINGERPRINT_BITS`-bit parts of a SHA-256 of the batch."""
    digest = hashlib.sha256()
    for tensor in batch:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(tensor))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    value = int.from_bytes(digest.digest()[:8], "little")
    mask = 2**_FINGERPRINT_BITS - 1
    return np.array([value & mask, (value >> _FINGERPRINT_BITS) & mask],
                    np.float64)


def check_same_batch(strategy: Optional[tf.distribute.Strategy],
                     batch: Sequence[Any]) -> None:
    """Raises unless every worker holds the same global batch.

    The DP semantics of `fit` need one global Poisson sample per step, cut
    into the replicas' shares (module docstring). Workers that draw their
    batches with keys of their own (`tf_dpsat.sampling.poisson_dataset`
    with `seed=None` in each worker process) would each keep their share of
    another sample: the weights stay in sync, but an example can then enter
    one step on two workers (sensitivity 2C, not the C the accountant
    assumes), and which examples a worker keeps depends on the others. Each
    replica contributes its worker's fingerprint of the batch (a SHA-256 of
    its values, dtypes and shapes) h and h^2; the parts agree everywhere
    exactly when R * sum(h^2) == sum(h)^2 (Cauchy-Schwarz), a test that
    every worker computes from the same sums, so all raise together. It is
    a collective: every worker calls it at the same point of the program.
    The fingerprints cross the cluster's connections, like `agree_on_int`'s
    value: keep the workers on a private network.

    Args:
      strategy: The strategy. Only MultiWorkerMirroredStrategy spans
        processes; any other, or None, checks nothing (one process: every
        replica's rows come from the same batch; TPUStrategy has one client
        for all its hosts).
      batch: This worker's global batch, e.g. `(x, y, sample_weight)`.

    Raises:
      ValueError: the workers' batches differ.
    """
    if not _spans_processes(strategy):
        return
    replicas = strategy.num_replicas_in_sync
    if replicas > _FINGERPRINT_MAX_REPLICAS:
        raise ValueError(f"Expected at most {_FINGERPRINT_MAX_REPLICAS} replicas "
                         f"to compare batches, got {replicas}.")
    parts = _fingerprint(batch)
    contribution = tf.constant(np.concatenate([parts, parts**2]))
    summed = strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        strategy.run(lambda: tf.identity(contribution)), axis=None).numpy()
    sums = [int(v) for v in summed[:2]]
    squares = [int(v) for v in summed[2:]]
    if any(replicas * q != h * h for h, q in zip(sums, squares)):
        raise ValueError(
            "Expected the same global batch on every worker, got different "
            "ones: each worker would train on its share of another sample, "
            "and an example could enter one step twice (sensitivity 2C, not "
            "C). Draw the batches on every worker from the agreed secret: "
            "`sampling.poisson_dataset(..., seed=agree_on_int(strategy, "
            "secret))`, with the chief's `tf_dpsat.noise.secret_key()` as "
            "secret.")


def _spans_processes(strategy: Optional[tf.distribute.Strategy]) -> bool:
    """Whether the strategy's replicas live in several processes (workers)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def share_size(rows: int, num_replicas: int) -> int:
    """Rows of each replica's share of a `rows`-row batch: ceil(rows / R)."""
    if num_replicas < 1:
        raise ValueError(f"Expected num_replicas={num_replicas} >= 1.")
    return -(-int(rows) // int(num_replicas))


def replica_rows(batch: Sequence[tf.Tensor], num_replicas: int,
                 replica_id) -> Tuple[tf.Tensor, ...]:
    """One replica's contiguous share of a global batch.

    The batch is padded with zero rows (zero image, label and weight: padding
    is inert in a DP step) to R * ceil(P / R) rows and cut into R contiguous
    shares, replica r taking the r-th: every row lands on exactly one replica,
    in order, and every share has the same static size.

    Args:
      batch: Tensors with the same static leading size P, e.g.
        `(x, y, sample_weight)`.
      num_replicas: R, the replicas in sync.
      replica_id: r in [0, R) (an int or a scalar tensor).

    Returns:
      The share of each tensor, with static leading size ceil(P / R).
    """
    rows = int(batch[0].shape[0])
    size = share_size(rows, num_replicas)
    start = tf.cast(replica_id, tf.int32) * size
    shares = []
    for tensor in batch:
        tensor = tf.convert_to_tensor(tensor)
        padding = [[0, size * num_replicas - rows]] + [[0, 0]] * (tensor.shape.rank - 1)
        padded = tf.pad(tensor, padding)
        share = tf.slice(padded, tf.concat([[start], tf.zeros(
            [tensor.shape.rank - 1], tf.int32)], 0), [size] + tensor.shape[1:].as_list())
        shares.append(tf.ensure_shape(share, [size] + tensor.shape[1:].as_list()))
    return tuple(shares)


def distribute_global_batch(strategy: tf.distribute.Strategy,
                            batch: Sequence[tf.Tensor]):
    """Gives each local replica its `replica_rows` of a global batch.

    Args:
      strategy: The strategy.
      batch: The same global batch on every worker.

    Returns:
      A distributed value for `strategy.run`.
    """
    return strategy.experimental_distribute_values_from_function(
        lambda context: replica_rows(batch, context.num_replicas_in_sync,
                                     context.replica_id_in_sync_group))


class Evaluation(NamedTuple):
    """Mean loss and accuracy over every example of an evaluation set."""

    loss: float
    accuracy: float


def evaluate_locally(model: keras.Model, batches: Iterable) -> Evaluation:
    """Evaluates a classifier on this worker alone, without collectives.

    Under MultiWorkerMirroredStrategy each worker holds identical weights,
    so each can evaluate on its own (Keras's `evaluate` would reduce across
    workers). Loss: the model's compiled loss, averaged over examples;
    accuracy: argmax of the prediction against integer labels.

    Args:
      model: A compiled model predicting class scores.
      batches: `(x, y)` batches.

    Returns:
      The `Evaluation`.
    """
    loss_fn = model.loss
    # Keras losses divide by the replicas in sync inside a strategy's scope
    # (each replica's share of a summed loss); this loss is not summed.
    replicas = (tf.distribute.get_strategy().num_replicas_in_sync
                if tf.distribute.has_strategy() else 1)
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        predictions = model(x, training=False)
        rows = int(tf.shape(y)[0])
        total_loss += float(loss_fn(y, predictions)) * replicas * rows
        hits = tf.equal(tf.argmax(predictions, axis=-1), tf.cast(y, tf.int64))
        correct += int(tf.reduce_sum(tf.cast(hits, tf.int32)))
        count += rows
    if count == 0:
        raise ValueError("Expected at least one example to evaluate on.")
    return Evaluation(total_loss / count, correct / count)


def fit(model: keras.Model, strategy: tf.distribute.Strategy,
        batches: Iterable, *, epochs: int, steps_per_epoch: int,
        initial_epoch: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        verbose: int = 0) -> None:
    """Trains `model` on global batches with `strategy.run(model.train_step)`.

    Every worker runs it with the same global batches (see the module
    docstring), which it checks before each step (`check_same_batch`); each
    replica trains on its `replica_rows`. Callbacks get
    Keras's hooks (train, epoch and batch begin/end); the epoch logs are the
    last step's metrics (Keras's running means over the epoch), averaged over
    the replicas. As in Keras's fit, `model.stop_training` set by a callback
    ends the epoch after that batch (then `on_epoch_end` runs) and the
    training; set on any worker, it stops every worker at the same step
    (`any_worker_stops`).

    Args:
      model: A model compiled under `strategy.scope()`.
      strategy: The strategy.
      batches: Global `(x, y, sample_weight)` batches, `steps_per_epoch` per
        epoch from `initial_epoch` on; the same on every worker.
      epochs: The epoch to stop after.
      steps_per_epoch: Batches per epoch.
      initial_epoch: The first epoch to train (resuming).
      callbacks: Keras callbacks.
      verbose: 0 silent, 1 progress bar, 2 one line per epoch.

    Raises:
      ValueError: the workers' batches of a step differ (`check_same_batch`);
        that step and the later ones do not run.
    """
    # As Keras's fit does before the first step: a DP model probes its layers
    # for batch mixing there (tf_dpsat.per_example.batch_independence). The function
    # itself is not used.
    model.make_train_function()
    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, model=model,
        verbose=verbose, epochs=epochs, steps=steps_per_epoch)

    @tf.function
    def train_step(distributed_batch):
        return strategy.run(model.train_step, args=(distributed_batch,))

    iterator = iter(batches)
    model.stop_training = False
    # In the scope, as in Keras's fit: callbacks read distributed variables.
    with strategy.scope():
        if not model.optimizer.built:
            # Before tracing: the step would create the slots inside a
            # tf.cond, which mirrored variables of several local replicas
            # cannot be initialised from.
            model.optimizer.build(model.trainable_variables)
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            logs = {}
            for step in range(steps_per_epoch):
                callback_list.on_train_batch_begin(step)
                batch = next(iterator)
                check_same_batch(strategy, batch)
                logs = train_step(distribute_global_batch(strategy, batch))
                callback_list.on_train_batch_end(step, _local_logs(strategy, logs))
                model.stop_training = any_worker_stops(strategy, model.stop_training)
                if model.stop_training:
                    break
            callback_list.on_epoch_end(epoch, _mean_over_replicas(strategy, logs))
            model.stop_training = any_worker_stops(strategy, model.stop_training)
            if model.stop_training:
                break
        callback_list.on_train_end()


def any_worker_stops(strategy: Optional[tf.distribute.Strategy], stop: bool) -> bool:
    """Whether any worker's `stop` is true, decided alike on every worker.

    A callback may stop training on one worker only (one that reads that
    worker's local batch logs, or runs on the chief only); a worker that
    stopped alone would leave the others waiting in the next step's
    collectives. A collective: every worker calls it at the same point of
    the program.

    Args:
      strategy: The strategy. Any but MultiWorkerMirroredStrategy, or None
        (one process, as for `check_same_batch`), returns `stop`.
      stop: This worker's decision.

    Returns:
      True when any worker's `stop` is true.
    """
    if not _spans_processes(strategy):
        return bool(stop)
    vote = tf.constant(1.0 if stop else 0.0)
    votes = strategy.reduce(tf.distribute.ReduceOp.SUM,
                            strategy.run(lambda: tf.identity(vote)), axis=None)
    return bool(votes.numpy() > 0)


def _local_logs(strategy: tf.distribute.Strategy, logs: Dict[str, Any]) -> Dict[str, float]:
    """This worker's first replica's logs (no collective: per batch)."""
    return {k: float(strategy.experimental_local_results(v)[0]) for k, v in logs.items()}


def _mean_over_replicas(strategy: tf.distribute.Strategy,
                        logs: Dict[str, Any]) -> Dict[str, float]:
    # One collective per key, in sorted order: the same on every worker.
    return {k: float(strategy.reduce(tf.distribute.ReduceOp.MEAN, logs[k], axis=None))
            for k in sorted(logs)}

