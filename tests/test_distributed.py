"""Tests for tf_dpsat.distributed and `--distribution=multi_worker`.

The pieces in process (each replica's rows, the chief, the evaluation
without collectives), then the binary on loopback: two worker processes with
`TF_CONFIG` on 127.0.0.1, scikit-learn's digits and the MLP, against one
process training on the same global batches.
"""

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import file_trees
import tf_dpsat
from tf_dpsat import distributed
from tf_dpsat.experiments import training

REPO = pathlib.Path(__file__).resolve().parent.parent
BINARY = REPO / "examples" / "train_cifar.py"
# Seconds a worker may take; the loopback runs below train for a few steps.
WORKER_TIMEOUT_S = 420

# The loopback runs: 400 digits, expected batch 100, 4 Poisson steps an epoch.
RUN = dict(dataset="digits", model="mlp", batch_size=100, max_train_examples=400,
           eval_batch_size=300, keras_verbose=2, seed=1)


def flags_of(**values):
    return [f"--{k}={v}" for k, v in values.items()]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def weights_of(model_dir, epoch):
    model = keras.models.load_model(
        pathlib.Path(model_dir) / f"checkpoint-{epoch:04d}.keras")
    return [np.asarray(v) for v in model.weights]


# ---------------------------------------------------------------------------
# Each replica's rows.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows, replicas", [(7, 3), (8, 2), (5, 1), (2, 4)])
def test_replica_rows_partition_the_global_batch_in_order(rows, replicas):
    x = tf.reshape(tf.range(1, rows * 2 + 1, dtype=tf.float32), [rows, 2])
    y = tf.range(10, 10 + rows, dtype=tf.int64)
    w = tf.ones([rows])
    shares = [distributed.replica_rows((x, y, w), replicas, r) for r in range(replicas)]
    # ceil(rows / replicas) rows each, a static shape.
    size = -(-rows // replicas)
    assert distributed.share_size(rows, replicas) == size
    for share in shares:
        assert [t.shape[0] for t in share] == [size] * 3
    # In order, the shares are the global batch followed by zero rows of
    # weight 0: every real row on exactly one replica.
    joined = [np.concatenate([s[i] for s in shares]) for i in range(3)]
    padding = size * replicas - rows
    np.testing.assert_array_equal(joined[0], np.concatenate([x, np.zeros((padding, 2))]))
    np.testing.assert_array_equal(joined[1], np.concatenate([y, np.zeros(padding)]))
    np.testing.assert_array_equal(joined[2], [1.0] * rows + [0.0] * padding)


def test_replica_rows_takes_a_tensor_replica_id():
    x = tf.reshape(tf.range(12.0), [6, 2])
    (share,) = tf.function(lambda r: distributed.replica_rows((x,), 3, r))(
        tf.constant(2))
    np.testing.assert_array_equal(share, [[8.0, 9.0], [10.0, 11.0]])


# ---------------------------------------------------------------------------
# The chief, the agreement, the strategies.
# ---------------------------------------------------------------------------


def fake_strategy(cluster, task_type, task_id):
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
    return types.SimpleNamespace(cluster_resolver=resolver)


def test_the_chief_is_the_chief_task_else_worker_0():
    workers = {"worker": ["a:1", "b:2"]}
    assert distributed.is_chief(None)
    assert distributed.is_chief(fake_strategy(workers, "worker", 0))
    assert not distributed.is_chief(fake_strategy(workers, "worker", 1))
    with_chief = {"chief": ["c:3"], **workers}
    assert distributed.is_chief(fake_strategy(with_chief, "chief", 0))
    assert not distributed.is_chief(fake_strategy(with_chief, "worker", 0))


def test_agree_on_int_without_a_strategy_and_its_range():
    assert distributed.agree_on_int(None, 2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 1.0, True):
        with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
            distributed.agree_on_int(None, bad)


def test_make_strategy_names_and_needs_tf_config(monkeypatch):
    assert distributed.make_strategy("none") is None
    with pytest.raises(ValueError, match="one of"):
        distributed.make_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distributed.make_strategy("multi_worker")
    with pytest.raises(ValueError, match="distribution"):
        training.TrainConfig(distribution="horovod")
    with pytest.raises(ValueError, match="DP methods only"):
        training.TrainConfig(distribution="mirrored", method="nonprivate")


def test_evaluate_locally_matches_keras_evaluate():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype("float32")
    y = rng.integers(0, 4, 50)
    # Batches of 20, 20 and 10: the means weigh examples, not batches.
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    local = distributed.evaluate_locally(model, batches)
    expected = model.evaluate(batches, verbose=0, return_dict=True)
    assert local.loss == pytest.approx(expected["loss"], rel=1e-6)
    # Keras keeps its accuracy in float32; count the hits exactly here.
    hits = np.argmax(model.predict(x, verbose=0), axis=-1) == y
    assert local.accuracy == hits.sum() / 50
    assert local.accuracy == pytest.approx(expected["accuracy"], abs=1e-7)


def test_fit_probes_a_dp_model_for_batch_mixing_before_any_step(mirrored_strategy):
    # Keras's fit probes a DP model in make_train_function; distributed.fit
    # does not use Keras's fit and must probe it as well.
    with mirrored_strategy.scope():
        inputs = keras.Input((4,))
        mixing = keras.layers.BatchNormalization(name="mixing")(inputs)
        model = tf_dpsat.make_private(
            keras.Model(inputs, keras.layers.Dense(2)(mixing)))
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            learning_rate=1.0, l2_norm_clip=1.0, noise_multiplier=1.0, rho=0.0,
            expected_batch_size=4), loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
    before = [np.asarray(v).copy() for v in model.weights]
    batch = (tf.ones([4, 4]), tf.zeros([4], tf.int64), tf.ones([4]))
    with pytest.raises(ValueError, match="'mixing'.*mixes examples across the batch"):
        distributed.fit(model, mirrored_strategy, [batch], epochs=1, steps_per_epoch=1)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, np.asarray(b))


class StopAtBatch(keras.callbacks.Callback):
    """Sets stop_training at the end of batch `batch`; logs the hooks it sees."""

    def __init__(self, batch):
        super().__init__()
        self.batch, self.calls = batch, []

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch", batch))
        if batch == self.batch:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch", epoch))

    def on_train_end(self, logs=None):
        self.calls.append(("end", None))


def test_fit_stops_after_the_batch_that_set_stop_training(mirrored_strategy):
    # Keras's fit: a callback's stop_training ends the epoch after that batch
    # (on_epoch_end still runs) and no later epoch starts. Stopping at batch
    # 1 of 4 in 3 epochs runs 2 steps, not 4 (the epoch's end) or 12.
    with mirrored_strategy.scope():
        model = tf_dpsat.make_private(keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(2)]))
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            learning_rate=1.0, l2_norm_clip=1.0, noise_multiplier=1.0, rho=0.0,
            expected_batch_size=4), loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
    batch = (tf.ones([4, 4]), tf.zeros([4], tf.int64), tf.ones([4]))
    stopper = StopAtBatch(1)
    distributed.fit(model, mirrored_strategy, [batch] * 12, epochs=3,
                    steps_per_epoch=4, callbacks=[stopper])
    assert int(model.optimizer.iterations.numpy()) == 2
    assert stopper.calls == [("batch", 0), ("batch", 1), ("epoch", 0), ("end", None)]
    assert model.stop_training


def test_any_worker_stops_in_one_process_is_the_local_decision(mirrored_strategy):
    # Not MultiWorkerMirroredStrategy: one process, nothing to agree with,
    # no collective.
    for stop in (True, False):
        assert distributed.any_worker_stops(mirrored_strategy, stop) is stop
        assert distributed.any_worker_stops(None, stop) is stop


# ---------------------------------------------------------------------------
# Two workers on loopback.
# ---------------------------------------------------------------------------


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(
                   [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


@contextlib.contextmanager
def killed_on_exit(processes):
    """Kills every process still running when the block exits (no orphans)."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_two_workers(log_dir, *args, program=BINARY):
    """Runs `program` (the binary) on two loopback workers.

    Returns:
      Their (stdout, stderr).

    Their output goes to files: a worker blocked on a full pipe would stall
    the other in a collective.
    """
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    logs = [(pathlib.Path(log_dir) / f"worker{i}.out", pathlib.Path(log_dir) / f"worker{i}.err")
            for i in range(2)]
    processes = []
    with contextlib.ExitStack() as files, killed_on_exit(processes):
        for index, (out, err) in enumerate(logs):
            processes.append(subprocess.Popen(
                [sys.executable, str(program), *args],
                cwd=REPO, stdout=files.enter_context(open(out, "w")),
                stderr=files.enter_context(open(err, "w")),
                env=worker_env({"cluster": {"worker": addresses},
                                "task": {"type": "worker", "index": index}})))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        # A worker that fails leaves the other waiting in a collective: stop
        # at the first failure.
        while any(p.poll() is None for p in processes) and not any(
                p.returncode for p in processes) and time.monotonic() < deadline:
            time.sleep(1)
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    # -9: killed after the other failed, or after WORKER_TIMEOUT_S.
    assert [p.returncode for p in processes] == [0, 0], "\n".join(
        f"worker {i} exited with {p.returncode}: {outputs[i][1][-2000:]}"
        for i, p in enumerate(processes))
    return outputs


def chief_outputs(epochs):
    """What the chief writes to model_dir (besides the secret file)."""
    return {"results.json", "state.json", f"checkpoint-{epochs:04d}.keras",
            "accuracy_epsilon.png", "tensorboard"}


@pytest.mark.slow
def test_two_workers_train_the_weights_of_one_process(tmp_path):
    run = dict(RUN, epochs=1, noise_multiplier=0.0, dp_seed=7, sharpness_examples=64)
    training.train(training.TrainConfig(**dict(run, keras_verbose=0),
                                        model_dir=str(tmp_path / "one")))
    outputs = run_two_workers(tmp_path, "--distribution=multi_worker", *flags_of(**run),
                              f"--model_dir={tmp_path / 'two'}")
    # The same 4 global Poisson batches and no noise: the same weights, up to
    # the order of the sums over the two halves.
    for a, b in zip(weights_of(tmp_path / "one", 1), weights_of(tmp_path / "two", 1)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    one_results = read_json(tmp_path / "one" / "results.json")
    two_results = read_json(tmp_path / "two" / "results.json")
    assert two_results["steps"] == one_results["steps"] == 4
    assert two_results["completed"]
    # Evaluated on each worker alone (297 test digits).
    assert (two_results["private"]["final_test_accuracy"] ==
            pytest.approx(one_results["private"]["final_test_accuracy"], abs=1 / 297))
    assert (two_results["private"]["final_test_loss"] ==
            pytest.approx(one_results["private"]["final_test_loss"], rel=1e-4))
    assert two_results["flags"]["distribution"] == "multi_worker"
    # The sharpness, measured by each worker in the strategy's scope: that of
    # the chief's final weights, measured here without a strategy, and close
    # to that of one process (weights equal to 1e-4).
    model = keras.models.load_model(tmp_path / "two" / "checkpoint-0001.keras")
    dataset = training.load_data(training.TrainConfig(**run))
    expected = training.top_eigenvalue(
        model, *training.sharpness_batch(training.TrainConfig(**run), dataset),
        batch_size=RUN["eval_batch_size"])
    two_sharpness = (two_results["non_private_diagnostics"]["sharpness"]
                     ["final_top_hessian_eigenvalue"])
    assert two_sharpness == pytest.approx(expected.eigenvalue, rel=1e-4)
    assert two_sharpness == pytest.approx(
        one_results["non_private_diagnostics"]["sharpness"]
        ["final_top_hessian_eigenvalue"], rel=1e-2)
    # The chief writes the run's files (the secret file holds the --dp_seed);
    # the other worker nothing; only the chief prints the epoch line.
    assert ({p.name for p in (tmp_path / "two").iterdir()} ==
            chief_outputs(1) | {training.SECRET_FILE})
    assert "test_accuracy:" in outputs[0][0] and "test_accuracy:" not in outputs[1][0]


class _Interrupt(Exception):
    pass


class _CrashAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise _Interrupt()


def secret_encodings(secret):
    return [str(secret).encode(), f"{secret:x}".encode(), f"{secret:016x}".encode(),
            secret.to_bytes(8, "little"), secret.to_bytes(8, "big")]


@pytest.mark.slow
def test_two_workers_resume_a_run_on_the_chiefs_secret(tmp_path):
    # No --dp_seed: the sampling key is the secret file's, which only the
    # chief reads; the other worker samples the same rows only if it received
    # the secret. An epoch of one process, then the rest on two workers.
    run = dict(RUN, epochs=2, noise_multiplier=0.0, dp_seed=None, keras_verbose=0)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    with pytest.raises(_Interrupt):
        training.train(training.TrainConfig(**run, model_dir=str(resumed)),
                       extra_callbacks=[_CrashAfterFirstEpoch()])
    straight.mkdir()
    shutil.copy(resumed / training.SECRET_FILE, straight / training.SECRET_FILE)
    expected = training.train(training.TrainConfig(**run, model_dir=str(straight)))
    outputs = run_two_workers(
        tmp_path, "--distribution=multi_worker",
        *flags_of(**{k: v for k, v in run.items() if v is not None}),
        f"--model_dir={resumed}")
    assert "Resuming from checkpoint-0001.keras after epoch 1" in outputs[1][1]
    for a, b in zip(weights_of(straight, 2), weights_of(resumed, 2)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    results = read_json(resumed / "results.json")
    assert results["steps"] == expected["steps"] == 8 and results["completed"]
    assert ({p.name for p in resumed.iterdir()} ==
            chief_outputs(2) | {training.SECRET_FILE})
    # The secret is in no written file and no worker's output.
    secret = training._read_secret(str(resumed / training.SECRET_FILE))
    files = file_trees.tree_bytes(resumed, skip=(training.SECRET_FILE,))
    for encoding in secret_encodings(secret):
        for name, blob in files.items():
            assert encoding not in blob, name
        for out, err in outputs:
            assert encoding.decode("latin-1") not in out + err


@pytest.mark.slow
def test_two_workers_add_the_noise_of_one_process(tmp_path):
    # One DP-SGD step on the whole set (q = 1: every example, whatever the
    # key): lr 1 and a first step of momentum SGD move the weights by the
    # noisy mean gradient, so the two-worker run minus the noiseless run is
    # -(noise) / B, noise ~ N(0, sigma^2 C^2) per coordinate if each replica
    # adds variance sigma^2 C^2 / 2 from its own stream (the same stream on
    # both, or sigma^2 C^2 on each, would give sqrt(2) times that).
    sigma, clip, batch = 4.0, 0.1, 200
    run = dict(RUN, epochs=1, method="dpsgd", batch_size=batch,
               max_train_examples=batch, learning_rate=1.0, l2_norm_clip=clip,
               dp_seed=3)
    noiseless = training.train(training.TrainConfig(
        **dict(run, keras_verbose=0), noise_multiplier=0.0,
        model_dir=str(tmp_path / "noiseless")))
    assert noiseless["steps"] == 1
    run_two_workers(tmp_path, "--distribution=multi_worker",
                    *flags_of(**run, noise_multiplier=sigma),
                    f"--model_dir={tmp_path / 'noisy'}")
    noise = np.concatenate([
        (b - a).ravel() for a, b in zip(weights_of(tmp_path / "noiseless", 1),
                                        weights_of(tmp_path / "noisy", 1))])
    standardized = noise / (sigma * clip / batch)
    # n = 85,002 MLP parameters: the sample std of n standard normals is 1
    # with standard error 1 / sqrt(2 n) = 0.0024, so 3% is 12 standard errors;
    # the mean's standard error is 1 / sqrt(n) = 0.0034.
    assert standardized.size == 85_002
    assert np.std(standardized) == pytest.approx(1.0, abs=0.03)
    assert abs(np.mean(standardized)) < 0.02
    # Epsilon as for one process: 1 step of sigma 4 at q = 1.
    results = read_json(tmp_path / "noisy" / "results.json")
    plan = training.make_plan(training.TrainConfig(**run, noise_multiplier=sigma), batch)
    assert results["private"]["epsilon"] == pytest.approx(plan.epsilon, rel=1e-12)


@pytest.mark.slow
def test_two_workers_stop_together_when_one_callback_stops_on_the_chief(tmp_path):
    # A callback on the chief only stops training after step 2 of 5: the
    # other worker must stop at the same step (a worker running on alone
    # would wait in the next step's collectives until killed), and the
    # weights must be those of 2 steps on both.
    outputs = run_two_workers(tmp_path, "chief_stops",
                              program=REPO / "tests" / "two_worker_batches.py")
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["steps"] for r in reports] == [2, 2]
    assert reports[0]["weights"] == reports[1]["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("keys", ["agreed", "own"])
def test_two_workers_refuse_batches_drawn_with_keys_of_their_own(keys, tmp_path):
    # Poisson batches drawn with each worker's own OS-entropy key (q = 1/4,
    # 64 examples padded to more than 16 rows) differ with probability
    # 1 - 2^-64 or so: fit must refuse before the first step, on both workers
    # (they decide from the same all-reduced sums), and change no weight.
    # With the agreed secret the same step trains.
    outputs = run_two_workers(tmp_path, keys,
                              program=REPO / "tests" / "two_worker_batches.py")
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for report in reports:
        if keys == "own":
            assert "Expected the same global batch" in report["refused"]
            assert report["weights_changed"] is False
        else:
            assert report["refused"] is None and report["weights_changed"] is True
            assert report["steps"] == 1
