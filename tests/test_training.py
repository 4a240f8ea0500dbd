"""Tests for tf_dpsat.experiments.training and examples/train_cifar.py.

Flags and configuration, the run plan (sigma, padding, accumulation), the
Poisson training pipeline at the library level, padded == unpadded steps,
whole runs on tfds mock data and on scikit-learn's digits, resuming, the
binary, and one end-to-end run on the real Fashion-MNIST.
"""

import gzip
import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import file_trees
from tf_dpsat import accounting
from tf_dpsat import sampling
from tf_dpsat import sharpness
from tf_dpsat.experiments import datasets
from tf_dpsat.experiments import training

REPO = pathlib.Path(__file__).resolve().parent.parent
BINARY = REPO / "examples" / "train_cifar.py"
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# A fixed run secret (sampling and noise) where tests compare two pipelines.
SECRET = 12345
# A --dp_seed with many digits, so that finding its value in a file is no
# coincidence (< 2**63).
LONG_DP_SEED = 7_905_342_118_627_365_487


def small_config(**overrides) -> training.TrainConfig:
    """A run on digits with the MLP: a few seconds on CPU.

    dp_seed: tests are reproducible; those of the secret set dp_seed=None.
    """
    base = dict(dataset="digits", model="mlp", epochs=1, batch_size=100,
                eval_batch_size=300, keras_verbose=0, seed=1, dp_seed=1)
    base.update(overrides)
    return training.TrainConfig(**base)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def weights_of(model):
    return [np.asarray(v) for v in model.weights]


# ---------------------------------------------------------------------------
# Flags and configuration.
# ---------------------------------------------------------------------------


def parse(argv):
    flag_values = flags.FlagValues()
    training.define_flags(flag_values)
    flag_values(["train_cifar"] + list(argv))
    return training.config_from_flags(flag_values)


def test_flag_defaults_are_the_authors_cifar10_setup():
    config = parse([])
    expected = dict(dataset="cifar10", model="dpnas", method="dpsat", epsilon=3.0,
                    delta=1e-5, epochs=30, batch_size=2000, learning_rate=2.0,
                    momentum=0.9, l2_norm_clip=0.1, rho=0.03, sampling="poisson",
                    noise_multiplier=None, physical_batch_size=None,
                    jit_compile="auto", max_train_examples=None, model_dir=None,
                    download=True, dp_seed=None, record_train_diagnostics=True)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert config == training.TrainConfig()


def test_flags_parse_every_field():
    config = parse([
        "--dataset=fashion_mnist", "--model=tb_cnn", "--method=dpsam",
        "--epsilon=2", "--delta=1e-6", "--noise_multiplier=1.5", "--epochs=3",
        "--batch_size=256", "--learning_rate=0.5", "--momentum=0", "--l2_norm_clip=1",
        "--rho=0.05", "--sampling=shuffle", "--physical_batch_size=128",
        "--jit_compile=false", "--seed=7", "--eval_every=2", "--eval_batch_size=50",
        "--max_train_examples=1000", "--data_dir=/d", "--raw_data_dir=/r",
        "--model_dir=/m", "--keras_verbose=2", "--direction=gradient",
        "--nodownload", "--dp_seed=11", "--norecord_train_diagnostics",
        "--distribution=mirrored"])
    assert config == training.TrainConfig(
        dataset="fashion_mnist", model="tb_cnn", method="dpsam", epsilon=2.0,
        delta=1e-6, noise_multiplier=1.5, epochs=3, batch_size=256,
        learning_rate=0.5, momentum=0.0, l2_norm_clip=1.0, rho=0.05,
        sampling="shuffle", physical_batch_size=128, jit_compile="false", seed=7,
        eval_every=2, eval_batch_size=50, max_train_examples=1000, data_dir="/d",
        raw_data_dir="/r", model_dir="/m", keras_verbose=2, download=False,
        dp_seed=11, record_train_diagnostics=False, distribution="mirrored")
    assert config.queries_per_step == 2


def test_flags_reject_unknown_choices():
    with pytest.raises(flags.IllegalFlagValueError):
        parse(["--method=dpsgdd"])
    with pytest.raises(flags.IllegalFlagValueError):
        parse(["--sampling=uniform"])


@pytest.mark.parametrize("overrides,message", [
    (dict(epsilon=0.0), "epsilon"),
    (dict(delta=1.0), "delta"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(momentum=1.5), "momentum"),
    (dict(l2_norm_clip=0.0), "l2_norm_clip"),
    (dict(rho=-0.1), "rho"),
    (dict(download="yes"), "download"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(physical_batch_size=0), "physical_batch_size"),
    (dict(seed=-1), "seed"),
    (dict(dp_seed=-1), "dp_seed"),
    (dict(dp_seed=2**63), "dp_seed"),
    (dict(record_train_diagnostics=1), "record_train_diagnostics"),
    (dict(eval_every=0), "eval_every"),
    (dict(max_train_examples=0), "max_train_examples"),
    (dict(method="dpsam", rho=0.0), "dpsgd"),
    (dict(dataset="imagenet"), "dataset"),
    (dict(model="vgg"), "model"),
    (dict(jit_compile="yes"), "jit_compile"),
    (dict(keras_verbose=3), "keras_verbose"),
])
def test_config_rejects_bad_values_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        training.TrainConfig(**overrides)


def test_bad_flag_value_reaches_the_user_as_value_error():
    with pytest.raises(ValueError, match="l2_norm_clip"):
        parse(["--l2_norm_clip=-1"])


# ---------------------------------------------------------------------------
# Run plan: sigma, padding, accumulation.
# ---------------------------------------------------------------------------


def test_plan_for_the_authors_cifar10_setup():
    plan = training.make_plan(training.TrainConfig(), 50000)
    assert (plan.steps_per_epoch, plan.total_steps) == (25, 750)
    assert plan.sampling_probability == 0.04
    # Overflow bound 1e-3 * delta = 1e-8 for the whole run.
    assert plan.overflow_probability == 1e-8
    assert plan.logical_batch_size == sampling.padded_batch_size(
        2000, 50000, 750, failure_probability=1e-8) == 2299
    assert plan.accumulation_steps == 1 and plan.physical_batch_size == 2299
    # The authors' Opacus calibration gave 1.8408203125 (tolerance 0.01 in
    # epsilon); our RDP orders are finer, so sigma is slightly smaller.
    assert plan.noise_multiplier == pytest.approx(1.8408, abs=0.01)
    assert plan.noise_multiplier <= 1.8408203125
    assert 2.99 <= plan.epsilon <= 3.0
    assert plan.privacy_analysis == "poisson" and plan.queries_per_step == 1


def test_plan_methods_and_overrides():
    n = 60000
    dpsat = training.make_plan(small_config(batch_size=256, epochs=2), n)
    dpsgd = training.make_plan(small_config(batch_size=256, epochs=2, method="dpsgd"), n)
    dpsam = training.make_plan(small_config(batch_size=256, epochs=2, method="dpsam"), n)
    # round(60000 / 256) = 234 steps per epoch.
    assert dpsat.total_steps == 468 and dpsat.steps_per_epoch == 234
    expected = accounting.calibrate_noise_multiplier(
        target_epsilon=3.0, sampling_probability=256 / n, steps=468, delta=1e-5)
    assert dpsat.noise_multiplier == expected == dpsgd.noise_multiplier
    # Two queries per step: sigma per query grows by about sqrt(2).
    assert dpsam.queries_per_step == 2
    assert dpsam.noise_multiplier == pytest.approx(math.sqrt(2) * expected, rel=0.01)
    assert dpsam.epsilon <= 3.0
    fixed = training.make_plan(small_config(batch_size=256, noise_multiplier=1.0), n)
    assert fixed.noise_multiplier == 1.0
    assert fixed.epsilon == pytest.approx(accounting.compute_epsilon(
        noise_multiplier=1.0, sampling_probability=256 / n, steps=234, delta=1e-5))
    nonprivate = training.make_plan(small_config(method="nonprivate"), n)
    assert nonprivate.noise_multiplier is None and nonprivate.epsilon == math.inf
    assert small_config(method="dpsgd", rho=0.5).effective_rho == 0.0


def test_plan_shuffle_uses_the_once_per_epoch_analysis():
    config = small_config(sampling="shuffle", batch_size=256, epochs=3)
    plan = training.make_plan(config, 60000)
    assert plan.steps_per_epoch == 234 and plan.logical_batch_size == 256
    assert plan.privacy_analysis == "once_per_epoch"
    assert plan.epsilon <= 3.0
    assert plan.epsilon == pytest.approx(accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=plan.noise_multiplier, epochs=3, delta=1e-5))
    # Replace-one adjacency: twice the sigma that 3 unsubsampled Gaussians of
    # sensitivity C need for epsilon 3.
    assert plan.noise_multiplier == 2 * accounting.calibrate_noise_multiplier(
        target_epsilon=3.0, sampling_probability=1.0, steps=3, delta=1e-5)
    assert plan.overflow_probability == 0.0
    report = training.privacy_report(config, plan)
    assert "only the (**) value" in report
    assert "(replace-one (sensitivity 2C) adjacency)" in report
    poisson = training.TrainConfig(batch_size=256, epochs=3, dataset="fashion_mnist")
    poisson_report = training.privacy_report(
        poisson, training.make_plan(poisson, 60000))
    assert "(add/remove-one adjacency): the (*) value applies" in poisson_report


def test_plan_physical_batches_map_to_accumulation():
    config = small_config(batch_size=2000, epochs=30, physical_batch_size=500)
    plan = training.make_plan(config, 50000)
    # The padded size 2299 rounded up to a multiple of 500.
    assert plan.logical_batch_size == 2500 and plan.physical_batch_size == 500
    assert plan.accumulation_steps == 5
    shuffle = training.make_plan(small_config(sampling="shuffle", batch_size=200,
                                              physical_batch_size=50), 1000)
    assert (shuffle.logical_batch_size, shuffle.accumulation_steps) == (200, 4)
    with pytest.raises(ValueError, match="divide"):
        training.make_plan(small_config(sampling="shuffle", batch_size=200,
                                        physical_batch_size=64), 1000)
    with pytest.raises(ValueError, match="dpsam"):
        training.make_plan(small_config(method="dpsam", physical_batch_size=50), 1500)
    with pytest.raises(ValueError, match=r"Expected batch_size=2000 <= 1500 "
                       r"training examples; use a smaller --batch_size\."):
        training.make_plan(small_config(batch_size=2000), 1500)


# ---------------------------------------------------------------------------
# The Poisson training pipeline.
# ---------------------------------------------------------------------------


def id_dataset(n):
    """Random 8x8 images whose label is the example's index."""
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64)


def logical_steps(batches, plan):
    """Per logical step: (labels of real rows, all weights, all x)."""
    steps, current = [], []
    for x, y, w in batches.as_numpy_iterator():
        current.append((x, y, w))
        if len(current) == plan.accumulation_steps:
            x = np.concatenate([c[0] for c in current])
            y = np.concatenate([c[1] for c in current])
            w = np.concatenate([c[2] for c in current])
            steps.append((y[w > 0], w, x, y))
            current = []
    assert not current
    return steps


@pytest.mark.slow
def test_pipeline_static_shapes_inclusion_rate_and_inert_padding():
    n, batch, epochs = 40, 8, 200  # q = 0.2, 5 steps per epoch, 1000 steps.
    images, labels = id_dataset(n)
    config = small_config(batch_size=batch, epochs=epochs, noise_multiplier=1.0,
                          physical_batch_size=8)
    plan = training.make_plan(config, n)
    batches = training.train_batches(config, plan, images, labels, secret=SECRET)
    for spec in batches.element_spec:
        assert spec.shape[0] == 8 and spec.shape.is_fully_defined()
    steps = logical_steps(batches, plan)
    assert len(steps) == plan.total_steps == 1000
    counts = np.zeros(n)
    for real, w, x, y in steps:
        # Sampled rows first, in index order, each at most once; then padding
        # rows that are all zero with weight 0.
        k = len(real)
        assert np.all(w[:k] == 1) and np.all(w[k:] == 0)
        assert np.all(np.diff(real) > 0)
        assert np.all(x[k:] == 0) and np.all(y[k:] == 0)
        counts[real] += 1
    q = batch / n
    # Each count is Binomial(1000, 0.2): sd 12.6; 5 sd for all 40 examples
    # fails with probability ~2e-5.
    sd = math.sqrt(plan.total_steps * q * (1 - q))
    assert np.max(np.abs(counts - plan.total_steps * q)) < 5 * sd
    # The mean batch size is the expected batch size (sd of the mean ~0.06).
    assert abs(counts.sum() / plan.total_steps - batch) < 0.3


def test_pipeline_split_keeps_order_and_resume_replays_the_same_batches():
    n = 60
    images, labels = id_dataset(n)
    whole = small_config(batch_size=10, epochs=3, noise_multiplier=1.0)
    split = small_config(batch_size=10, epochs=3, noise_multiplier=1.0,
                         physical_batch_size=8)
    plan_whole, plan_split = training.make_plan(whole, n), training.make_plan(split, n)
    assert plan_split.accumulation_steps > 1
    a = logical_steps(training.train_batches(whole, plan_whole, images, labels,
                                             secret=SECRET), plan_whole)
    b = logical_steps(training.train_batches(split, plan_split, images, labels,
                                             secret=SECRET), plan_split)
    # The physical batches of a step, concatenated, are its logical batch: the
    # same sampled examples in the same order (only the padding length differs).
    assert len(a) == len(b) == 18
    for (ra, _, xa, _), (rb, _, xb, _) in zip(a, b):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(xa[:len(ra)], xb[:len(rb)])
    # Starting at epoch 1 yields exactly the steps from 6 on.
    resumed = logical_steps(training.train_batches(
        split, plan_split, images, labels, secret=SECRET, start_epoch=1), plan_split)
    assert len(resumed) == 12
    for (r1, _, x1, _), (r2, _, x2, _) in zip(resumed, b[6:]):
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(x1, x2)
    # A different secret samples differently; the public seed changes nothing.
    c = logical_steps(training.train_batches(whole, plan_whole, images, labels,
                                             secret=SECRET + 1), plan_whole)
    assert any(len(x[0]) != len(y[0]) or np.any(x[0] != y[0]) for x, y in zip(a, c))
    other_seed = small_config(batch_size=10, epochs=3, noise_multiplier=1.0, seed=2)
    d = logical_steps(training.train_batches(other_seed, plan_whole, images, labels,
                                             secret=SECRET), plan_whole)
    for x, y in zip(a, d):
        np.testing.assert_array_equal(x[0], y[0])


def test_shuffle_pipeline_covers_each_example_once_per_epoch():
    n = 50
    images, labels = id_dataset(n)
    config = small_config(sampling="shuffle", batch_size=10, epochs=2,
                          noise_multiplier=1.0, physical_batch_size=5)
    plan = training.make_plan(config, n)
    steps = logical_steps(training.train_batches(config, plan, images, labels,
                                                 secret=SECRET), plan)
    assert len(steps) == 10
    for epoch in range(2):
        seen = np.concatenate([s[0] for s in steps[5 * epoch:5 * epoch + 5]])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    # The 2 physical batches of a step, concatenated, are the batch of the
    # run without accumulation: the same examples in the same order.
    whole = small_config(sampling="shuffle", batch_size=10, epochs=2,
                         noise_multiplier=1.0)
    plan_whole = training.make_plan(whole, n)
    assert (plan.accumulation_steps, plan_whole.accumulation_steps) == (2, 1)
    unsplit = logical_steps(training.train_batches(whole, plan_whole, images, labels,
                                                   secret=SECRET), plan_whole)
    assert len(unsplit) == 10
    for (_, _, xa, ya), (_, _, xb, yb) in zip(steps, unsplit):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


# ---------------------------------------------------------------------------
# Padded steps are the unpadded steps.
# ---------------------------------------------------------------------------


def digits_rows(count):
    dataset = datasets.load_dataset("digits")
    x = datasets.normalize(dataset.train_images[:count], "digits")
    return x, dataset.train_labels[:count]


def padded(x, y, size):
    pad = size - len(x)
    return (np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
            np.concatenate([y, np.zeros(pad, y.dtype)]),
            np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)]))


def train_steps(config, batches_per_step):
    """Builds the library's model and runs `fit` over the given batches."""
    plan = training.make_plan(config, 1500)
    model = training.build_model(config, plan, (8, 8, 1), 10, secret=SECRET)
    flat = [b for step in batches_per_step for b in step]
    # Known cardinality: Keras counts one extra optimizer iteration when it
    # exhausts a dataset of unknown length.
    ds = tf.data.Dataset.from_tensor_slices(tuple(np.stack(t) for t in zip(*flat)))
    model.fit(ds, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == len(batches_per_step)
    return weights_of(model)


@pytest.mark.parametrize("method", ["dpsat", "dpsam"])
@pytest.mark.slow
def test_padded_step_equals_unpadded_step(method):
    # Two DP steps (the second one perturbed by the first's gradient), each on
    # 70 real rows: once exactly, once padded to 128 with zero-weight rows.
    config = small_config(method=method, noise_multiplier=0.8, batch_size=64,
                          jit_compile="false")
    x, y = digits_rows(140)
    steps = [(x[:70], y[:70]), (x[70:], y[70:])]
    unpadded = train_steps(config, [[(a, b, np.ones(len(a), np.float32))]
                                    for a, b in steps])
    padded_run = train_steps(config, [[padded(a, b, 128)] for a, b in steps])
    for u, p in zip(unpadded, padded_run):
        np.testing.assert_allclose(u, p, rtol=0, atol=2e-6)
    # And the steps did something: the weights moved.
    initial = weights_of(training.build_model(
        config, training.make_plan(config, 1500), (8, 8, 1), 10))
    assert max(np.max(np.abs(u - i)) for u, i in zip(unpadded, initial)) > 1e-3


@pytest.mark.slow
def test_padded_accumulated_step_equals_unpadded_step():
    # A logical batch of 70 real rows padded to k * 32 rows and cut into k
    # physical batches of 32 gives the same update as the 70 rows at once.
    base = small_config(noise_multiplier=0.8, batch_size=64, jit_compile="false")
    split = small_config(noise_multiplier=0.8, batch_size=64, jit_compile="false",
                         physical_batch_size=32)
    k = training.make_plan(split, 1500).accumulation_steps
    assert k >= 3
    x, y = digits_rows(140)
    steps = [(x[:70], y[:70]), (x[70:], y[70:])]
    unpadded = train_steps(base, [[(a, b, np.ones(len(a), np.float32))]
                                  for a, b in steps])
    physical = []
    for a, b in steps:
        px, py, pw = padded(a, b, 32 * k)
        physical.append([(px[i:i + 32], py[i:i + 32], pw[i:i + 32])
                         for i in range(0, 32 * k, 32)])
    accumulated = train_steps(split, physical)
    for u, p in zip(unpadded, accumulated):
        np.testing.assert_allclose(u, p, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------
# Whole runs.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_train_on_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = training.TrainConfig(
        dataset="mnist", model="mlp", data_dir=str(tmp_path / "tfds"), epochs=2,
        batch_size=16, eval_batch_size=64, model_dir=str(tmp_path / "run"),
        keras_verbose=0, eval_every=2)
    with tfds.testing.mock_data(num_examples=64):
        results = training.train(config)
    run = tmp_path / "run"
    assert read_json(run / "results.json") == json.loads(json.dumps(results))
    assert results["completed"] and results["epochs_completed"] == 2
    assert results["num_train_examples"] == 64 and results["steps"] == 8
    private = results["private"]
    assert 0 < private["epsilon"] <= 3.0
    assert private["delta_parts"]["accountant"] == 1e-5
    assert private["delta"] == private["delta_parts"]["total"] > 1e-5
    assert private["model"] == "checkpoint-0002.keras"
    assert results["noise_multiplier"] > 0
    assert results["flags"]["dataset"] == "mnist"
    # eval_every=2: only epoch 2 was evaluated.
    tested = [h["epoch"] for h in private["history"] if "test_accuracy" in h]
    assert tested == [2]
    assert 0 <= private["final_test_accuracy"] <= 1
    assert [h["epsilon"] for h in private["history"]][0] < private["epsilon"]
    assert (run / "accuracy_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert [p.name for p in run.glob("checkpoint-*.keras")] == ["checkpoint-0002.keras"]


def test_unprepared_tfds_dataset_fails_fast_naming_the_flags(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(datasets, "_reachable", lambda host, port: False)  # offline
    start = time.monotonic()
    with pytest.raises(datasets.DatasetNotAvailableError) as info:
        training.train(training.TrainConfig(data_dir=str(tmp_path), keras_verbose=0))
    assert time.monotonic() - start < 30
    assert "--raw_data_dir" in str(info.value) and "--data_dir" in str(info.value)


@pytest.mark.parametrize("overrides", [
    dict(method="dpsgd"),
    dict(method="dpsam"),
    dict(method="nonprivate", learning_rate=0.05),
    dict(sampling="shuffle"),
    dict(sampling="shuffle", physical_batch_size=25),
    dict(direction="momentum", physical_batch_size=64),
])
@pytest.mark.slow
def test_methods_and_samplings_run(tmp_path, overrides):
    config = small_config(max_train_examples=400, batch_size=50,
                          model_dir=str(tmp_path), **overrides)
    results = training.train(config)
    assert results["completed"] and results["num_train_examples"] == 400
    assert results["steps"] == 8
    # Chance is 0.1 (sd 0.02 on 297 test images); 8 noisy steps get 0.27-0.8.
    assert results["private"]["final_test_accuracy"] > 0.2
    saved = read_json(tmp_path / "results.json")
    if config.method == "nonprivate":
        assert results["private"]["epsilon"] == math.inf == saved["private"]["epsilon"]
        assert results["noise_multiplier"] is None
        assert results["privacy_analysis"] == "none"
        assert saved["private"]["delta"] is None
    else:
        assert 0 < results["private"]["epsilon"] <= 3.0
        assert results["privacy_analysis"] == (
            "once_per_epoch" if config.sampling == "shuffle" else "poisson")
        assert results["queries_per_step"] == (2 if config.method == "dpsam" else 1)
    if config.physical_batch_size:
        assert results["gradient_accumulation_steps"] > 1


class _Interrupt(Exception):
    pass


class _CrashAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise _Interrupt()


def interrupted_run_of_an_older_version(model_dir, edit, **overrides):
    """A 2-epoch run stopped after epoch 1, its state.json as an older version left it.

    Args:
      model_dir: The run's directory (a `pathlib.Path`).
      edit: Changes the saved config (a dict) in place into what the older
        version saved.
      **overrides: More `small_config` arguments.

    Returns:
      The run's config, to resume it with.
    """
    config = small_config(epochs=2, model_dir=str(model_dir), **overrides)
    with pytest.raises(_Interrupt):
        training.train(config, extra_callbacks=[_CrashAfterFirstEpoch()])
    state = read_json(model_dir / "state.json")
    edit(state["config"])
    (model_dir / "state.json").write_text(json.dumps(state))
    return config


def assert_refused_without_the_seed(error_text, *seeds):
    """The refusal names the fix and no seed (error messages reach logs)."""
    assert "--dp_seed" in error_text and "new --model_dir" in error_text
    for seed in seeds:
        assert str(seed) not in error_text and f"{seed:x}" not in error_text


@pytest.mark.slow
@pytest.mark.parametrize("dp_seed", [None, LONG_DP_SEED])
def test_resume_matches_an_uninterrupted_run(tmp_path, dp_seed):
    def config(name, **overrides):
        return small_config(**{**dict(epochs=2, physical_batch_size=64,
                                      dp_seed=dp_seed,
                                      model_dir=str(tmp_path / name)), **overrides})

    straight = training.train(config("straight"))
    (tmp_path / "resumed").mkdir()
    if dp_seed is None:
        # The same secret (batch sampling and noise) as the uninterrupted run.
        shutil.copy(tmp_path / "straight" / training.SECRET_FILE,
                    tmp_path / "resumed" / training.SECRET_FILE)
    with pytest.raises(_Interrupt):
        training.train(config("resumed"), extra_callbacks=[_CrashAfterFirstEpoch()])
    state = read_json(tmp_path / "resumed" / "state.json")
    assert state["epochs_done"] == 1 and state["steps"] == 15
    assert state["config"]["dp_seed"] == (None if dp_seed is None else "<redacted>")
    assert not read_json(tmp_path / "resumed" / "results.json")["completed"]
    with pytest.raises(ValueError, match="learning_rate"):
        training.train(config("resumed", learning_rate=1.0))
    # Another source of the batches and noise is refused, in either direction,
    # and so is another --dp_seed: none would resume the same run.
    secret = training._read_secret(str(tmp_path / "resumed" / training.SECRET_FILE))
    if dp_seed is None:
        switches = {"OS entropy": LONG_DP_SEED}
    else:
        assert secret == dp_seed
        switches = {"has none": None, "differs": dp_seed + 1}
    for message, other in switches.items():
        with pytest.raises(ValueError, match=message) as refused:
            training.train(config("resumed", dp_seed=other))
        assert_refused_without_the_seed(str(refused.value), secret, LONG_DP_SEED,
                                        LONG_DP_SEED + 1)
    resumed = training.train(config("resumed", eval_every=2))
    assert resumed["steps"] == straight["steps"] == 30
    assert resumed["private"]["epsilon"] == straight["private"]["epsilon"]
    assert (resumed["private"]["final_test_accuracy"] ==
            straight["private"]["final_test_accuracy"])
    # The epoch-1 record written before the crash is kept.
    assert (resumed["private"]["history"][0]["epsilon"] ==
            straight["private"]["history"][0]["epsilon"])
    assert (resumed["non_private_diagnostics"]["history"][0]["loss"] ==
            straight["non_private_diagnostics"]["history"][0]["loss"])
    a = keras.models.load_model(tmp_path / "straight" / "checkpoint-0002.keras")
    b = keras.models.load_model(tmp_path / "resumed" / "checkpoint-0002.keras")
    for x, y in zip(weights_of(a), weights_of(b)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A finished run is not trained again, and needs no secret.
    (tmp_path / "resumed" / training.SECRET_FILE).unlink()
    again = training.train(config("resumed"))
    assert again["steps"] == 30 and again["completed"]


@pytest.mark.slow
def test_distribution_mirrored_trains_like_one_device(tmp_path, monkeypatch,
                                                     mirrored_strategy):
    # MirroredStrategy over 2 local devices (the session's, see conftest.py):
    # each replica trains on half of every physical batch of 64 (three per
    # padded batch of 192, accumulated into one step); without noise the same
    # batches give the weights of one device taking whole batches.
    monkeypatch.setattr(training.distributed, "make_strategy",
                        lambda name: mirrored_strategy if name == "mirrored" else None)
    assert mirrored_strategy.num_replicas_in_sync == 2
    runs = {name: training.train(small_config(
        noise_multiplier=0.0, distribution=name, model_dir=str(tmp_path / name),
        physical_batch_size=64 if name == "mirrored" else None))
        for name in ("none", "mirrored")}
    assert runs["mirrored"]["gradient_accumulation_steps"] == 3
    assert runs["mirrored"]["steps"] == runs["none"]["steps"] == 15
    assert runs["mirrored"]["flags"]["distribution"] == "mirrored"
    for x, y in zip(final_weights(tmp_path / "none"), final_weights(tmp_path / "mirrored")):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_noise_tail_delta_counts_the_draws_of_every_replica(tmp_path, monkeypatch,
                                                           mirrored_strategy):
    # Each of the 2 replicas draws its own noise share for every parameter.
    # The first epoch on 2 replicas, the second on one device: the run's
    # sampler tail counts the 2 replicas of its first part for all its steps.
    monkeypatch.setattr(training.distributed, "make_strategy",
                        lambda name: mirrored_strategy if name == "mirrored" else None)
    assert mirrored_strategy.num_replicas_in_sync == 2

    def config(distribution):
        return small_config(epochs=2, distribution=distribution,
                            model_dir=str(tmp_path))

    with pytest.raises(_Interrupt):
        training.train(config("mirrored"), extra_callbacks=[_CrashAfterFirstEpoch()])
    first = read_json(tmp_path / "results.json")
    assert read_json(tmp_path / "state.json")["noise_replicas"] == 2
    resumed = training.train(config("none"))
    model = keras.models.load_model(tmp_path / "checkpoint-0002.keras")
    num_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert num_params == 85_002
    # Golden value. Digits: N = 1500, batch 100, so 15 steps an epoch and 30
    # in the run (the plan's, which the delta terms use, with its epsilon);
    # DP-SAT makes 1 noisy query a step. Gaussian draws = steps x params x
    # replicas x queries per step = 30 x 85,002 x 2 x 1 = 5,100,120, in
    # 30 x 1 x 2 x ceil(85,002 / 2) = 2,550,060 Box-Muller pairs, each cut
    # off with probability at most 2^-64: noise_tail = (1 + e^eps) x
    # 2,550,060 x 2^-64 (one replica: half of it).
    plan = training.make_plan(config("none"), 1500)
    assert plan.total_steps == 30 and plan.queries_per_step == 1
    expected = (1 + math.exp(plan.epsilon)) * 2_550_060 * 2.0**-64
    for results in (first, resumed):
        parts = results["private"]["delta_parts"]
        # abs=0: approx's default absolute tolerance, 1e-12, is of the
        # order of the value itself.
        assert parts["noise_tail"] == pytest.approx(expected, rel=1e-12, abs=0)
        assert parts["total"] == pytest.approx(
            1e-5 + parts["noise_tail"] + parts["padding_overflow"], rel=1e-15, abs=0)
        assert accounting.format_delta_breakdown(
            accounting.DeltaBreakdown(**parts)) in " ".join(
            results["privacy_statement"].split())
    assert resumed["completed"] and resumed["steps"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("dp_seed", [None, LONG_DP_SEED])
def test_resume_without_the_secret_file_is_refused(tmp_path, dp_seed):
    # With --dp_seed too: without the file, nothing says which seed the run
    # started with.
    config = small_config(epochs=2, model_dir=str(tmp_path), dp_seed=dp_seed)
    with pytest.raises(_Interrupt):
        training.train(config, extra_callbacks=[_CrashAfterFirstEpoch()])
    (tmp_path / training.SECRET_FILE).unlink()
    with pytest.raises(ValueError, match=training.SECRET_FILE + ".*new --model_dir"):
        training.train(config)


def test_the_dp_seed_is_kept_in_the_private_file_and_checked_there(tmp_path):
    # A run with --dp_seed keeps the seed where an OS-entropy run keeps its
    # secret, and no run takes the other's source, even before any epoch
    # has finished (no state.json yet): a run without --dp_seed must never
    # take a known seed for a secret from OS entropy.
    seeded = tmp_path / "seeded"
    assert training.run_secret(small_config(dp_seed=LONG_DP_SEED,
                                            model_dir=str(seeded))) == LONG_DP_SEED
    path = seeded / training.SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert "NEVER PUBLISH" in path.read_text()
    assert f"dp_seed={LONG_DP_SEED}\n" in path.read_text()
    assert training.run_secret(small_config(dp_seed=LONG_DP_SEED, model_dir=str(seeded)),
                               resuming=True) == LONG_DP_SEED
    entropy = tmp_path / "entropy"
    secret = training.run_secret(small_config(dp_seed=None, model_dir=str(entropy)))
    refusals = [(seeded, None, "has none"), (seeded, LONG_DP_SEED + 1, "differs"),
                (entropy, secret, "OS entropy"), (entropy, LONG_DP_SEED, "OS entropy")]
    for model_dir, dp_seed, message in refusals:
        for resuming in (False, True):
            with pytest.raises(ValueError, match=message) as refused:
                training.run_secret(small_config(dp_seed=dp_seed, model_dir=str(model_dir)),
                                    resuming=resuming)
            assert_refused_without_the_seed(str(refused.value), LONG_DP_SEED,
                                            LONG_DP_SEED + 1, secret)
    # The files are unchanged.
    assert training._read_secret(str(path)) == LONG_DP_SEED
    assert training._read_secret(str(entropy / training.SECRET_FILE)) == secret


@pytest.mark.slow
def test_a_dp_seed_run_of_an_older_version_resumes_and_its_seed_moves(tmp_path):
    # Older versions kept the --dp_seed in clear in state.json and wrote no
    # secret file. Such a run still refuses another seed, resumes with its
    # own, and from then on keeps it in the secret file only.
    def in_clear(saved):
        saved["dp_seed"] = LONG_DP_SEED

    config = interrupted_run_of_an_older_version(tmp_path, in_clear,
                                                 dp_seed=LONG_DP_SEED)
    (tmp_path / training.SECRET_FILE).unlink()
    for other, message in ((LONG_DP_SEED + 1, "differs"), (None, "has none")):
        with pytest.raises(ValueError, match=message) as refused:
            training.train(small_config(epochs=2, model_dir=str(tmp_path),
                                        dp_seed=other))
        assert_refused_without_the_seed(str(refused.value), LONG_DP_SEED,
                                        LONG_DP_SEED + 1)
        assert not (tmp_path / training.SECRET_FILE).exists()
    assert training.train(config)["steps"] == 30
    assert training._read_secret(str(tmp_path / training.SECRET_FILE)) == LONG_DP_SEED
    assert read_json(tmp_path / "state.json")["config"]["dp_seed"] == "<redacted>"


# ---------------------------------------------------------------------------
# The binary.
# ---------------------------------------------------------------------------


def run_binary(*args, timeout=300):
    # PYTHONPATH: the binary imports this checkout's tf_dpsat, not an
    # installed copy (the script's own directory comes first on sys.path).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(
                   [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, str(BINARY), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_run_without_model_dir_says_that_nothing_is_saved(tmp_path, caplog):
    def warnings_for(config):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="absl"):
            training._log_plan(config, training.make_plan(config, 1500), "")
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]

    unsaved = warnings_for(small_config())
    assert [m for m in unsaved if m.startswith("No --model_dir: nothing is saved")]
    saved = warnings_for(small_config(model_dir=str(tmp_path)))
    assert not [m for m in saved if "--model_dir" in m]


@pytest.mark.slow
def test_binary_smoke_run_on_digits(tmp_path):
    result = run_binary("--dataset=digits", "--model=mlp", "--epochs=1",
                        "--batch_size=100", f"--model_dir={tmp_path}",
                        "--keras_verbose=2")
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_json(tmp_path / "results.json")
    assert results["completed"] and results["private"]["final_test_accuracy"] > 0.3
    assert "Noise multiplier sigma" in result.stderr
    assert "Epsilon with Poisson sampling" in result.stderr
    assert "epsilon:" in result.stdout  # The Keras epoch line shows epsilon.


@pytest.mark.slow
def test_binary_console_has_no_native_start_up_noise(tmp_path):
    # As a user runs it: no TF_CPP_MIN_LOG_LEVEL, no CUDA_VISIBLE_DEVICES.
    # -X importtime lists every import on stderr: the digits route must not
    # import tensorflow-datasets at all.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(BINARY), "--dataset=digits",
         "--model=mlp", "--epochs=1", "--batch_size=100",
         "--max_train_examples=500", f"--model_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    imports = [line for line in lines if line.startswith("import time:")]
    console = "\n".join(line for line in lines if not line.startswith("import time:"))
    assert any(" tensorflow.python" in line for line in imports)
    assert not [line for line in imports if "tensorflow_datasets" in line]
    for noise in ("cuInit", "cpu_feature_guard", "Constructing",
                  "absl::InitializeLog", "port.cc"):
        assert noise not in console, noise
    # The run's own log still reaches the console.
    assert "Noise multiplier sigma" in console


def _history(epochs, evaluated=True):
    return [{"epoch": e, "epsilon": 3.0 * math.sqrt(e / epochs),
             "test_accuracy": 0.1 + 0.7 * e / epochs if evaluated else None}
            for e in range(1, epochs + 1)]


@pytest.mark.parametrize("epochs", [1, 2, 3, 40])
@pytest.mark.slow
def test_accuracy_epsilon_plot_is_readable_at_any_length(epochs):
    config = small_config(epsilon=2.5)
    title = training._plot_title(config, training.make_plan(config, 1500))
    fig = training._accuracy_epsilon_figure(_history(epochs), title, 3.0)
    fig.canvas.draw()
    accuracy_axes, epsilon_axes = fig.axes
    # Whole epochs only, every tick inside the plotted range, and the range
    # covers every epoch.
    low, high = accuracy_axes.get_xlim()
    assert low < 1 and high > epochs
    ticks = [t for t in accuracy_axes.get_xticks() if low <= t <= high]
    assert ticks and all(t == int(t) for t in ticks)
    labels = [label.get_text() for label in accuracy_axes.get_xticklabels()
              if low <= label.get_position()[0] <= high]
    assert labels == [str(int(t)) for t in ticks]
    if epochs <= 3:
        assert ticks == list(range(1, epochs + 1))
    # Both series (and the planned budget) are in one legend, told apart by
    # marker and line style.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "test accuracy (%)", "epsilon spent", "epsilon planned for the run"]
    accuracy_line, = accuracy_axes.get_lines()
    epsilon_line, planned_line = epsilon_axes.get_lines()
    assert (accuracy_line.get_marker(), accuracy_line.get_linestyle()) == ("o", "-")
    assert (epsilon_line.get_marker(), epsilon_line.get_linestyle()) == ("s", "--")
    assert len(accuracy_line.get_xdata()) == epochs
    # Epsilon from 0 to just above the planned 3.0; accuracy 0..100 %.
    assert epsilon_axes.get_ylim() == pytest.approx((0.0, 3.3))
    assert accuracy_axes.get_ylim() == (0.0, 100.0)
    assert accuracy_axes.get_title() == "digits, mlp, dpsat: epsilon 2.5 (delta 1e-05)"


def test_accuracy_epsilon_plot_of_a_non_private_run():
    history = [{"epoch": 1, "epsilon": math.inf, "test_accuracy": 0.5},
               {"epoch": 2, "epsilon": math.inf, "test_accuracy": None}]
    config = small_config(method="nonprivate")
    title = training._plot_title(config, training.make_plan(config, 1500))
    assert title == "digits, mlp, nonprivate: non-private"
    fig = training._accuracy_epsilon_figure(history, title, math.inf)
    assert len(fig.axes) == 1  # No epsilon axis.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["test accuracy (%)"]
    # Only the evaluated epoch is drawn.
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1]


def secret_encodings(secret):
    return [str(secret).encode(), f"{secret:x}".encode(), f"{secret:X}".encode(),
            f"{secret:016x}".encode(), secret.to_bytes(8, "little"),
            secret.to_bytes(8, "big")]


def final_weights(model_dir):
    model = keras.models.load_model(pathlib.Path(model_dir) / "checkpoint-0001.keras")
    return weights_of(model)


DIGITS_RUN = ("--dataset=digits", "--model=mlp", "--epochs=1", "--batch_size=100",
              "--keras_verbose=2")


@pytest.mark.slow
def test_binary_draws_a_secret_per_run_and_keeps_it_out_of_every_output(tmp_path):
    runs = [run_binary(*DIGITS_RUN, f"--model_dir={tmp_path / name}")
            for name in ("a", "b")]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    secret_paths = [tmp_path / name / training.SECRET_FILE for name in ("a", "b")]
    secrets = [training._read_secret(str(path)) for path in secret_paths]
    assert secrets[0] != secrets[1]
    for path in secret_paths:
        assert path.stat().st_mode & 0o777 == 0o600
        assert "NEVER PUBLISH" in path.read_text()
    # Same command, same data: different batches and different weights.
    config = small_config(batch_size=100)
    dataset = training.load_data(config)
    plan = training.make_plan(config, len(dataset.train_images))
    first = [next(iter(training.train_batches(
        config, plan, dataset.train_images, dataset.train_labels, secret=s)))[0]
        for s in secrets]
    # The Poisson samples, as the images they hold (the weight masks alone
    # are equal whenever the two batch sizes happen to be).
    assert not np.array_equal(*first)
    a, b = (final_weights(tmp_path / name) for name in ("a", "b"))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    # The secret is in no other file (checkpoint, state.json, results.json,
    # TensorBoard, plot) and in no log line.
    for secret, name, result in zip(secrets, ("a", "b"), runs):
        files = file_trees.tree_bytes(tmp_path / name, skip=(training.SECRET_FILE,))
        assert {"results.json", "state.json", "checkpoint-0001.keras"} <= set(files)
        assert any(n.startswith("tensorboard") for n in files)
        for encoding in secret_encodings(secret):
            for file_name, blob in files.items():
                assert encoding not in blob, (file_name, encoding)
            assert encoding.decode("latin-1") not in result.stdout + result.stderr


@pytest.mark.slow
def test_binary_dp_seed_reproduces_bitwise_and_is_not_published(tmp_path):
    runs = [run_binary(*DIGITS_RUN, f"--dp_seed={LONG_DP_SEED}",
                       f"--model_dir={tmp_path / name}")
            for name in ("c", "d")]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "guarantee holds only against those who do not know it" in (
            " ".join(result.stderr.split()))
    c, d = (final_weights(tmp_path / name) for name in ("c", "d"))
    for x, y in zip(c, d):
        np.testing.assert_array_equal(x, y)
    # The seed is in the PRIVATE file (the one file never to publish), as the
    # OS-entropy secret is without --dp_seed ...
    secret_path = tmp_path / "c" / training.SECRET_FILE
    assert secret_path.stat().st_mode & 0o777 == 0o600
    assert "NEVER PUBLISH" in secret_path.read_text()
    assert training._read_secret(str(secret_path)) == LONG_DP_SEED
    results = read_json(tmp_path / "c" / "results.json")
    assert results["flags"]["dp_seed"] == "<redacted>"
    assert read_json(tmp_path / "c" / "state.json")["config"]["dp_seed"] == "<redacted>"
    # ... and in no other file (checkpoint, state.json, results.json,
    # TensorBoard, plot) and no log line; nor are the sampling and noise
    # seeds derived from it.
    derived = [training._derived_seed(LONG_DP_SEED, purpose) for purpose in
               (training._SEED_SAMPLING, training._SEED_NOISE)]
    for name, result in zip(("c", "d"), runs):
        files = file_trees.tree_bytes(tmp_path / name, skip=(training.SECRET_FILE,))
        assert {"results.json", "state.json", "checkpoint-0001.keras",
                "accuracy_epsilon.png"} <= set(files)
        assert any(n.startswith("tensorboard") for n in files)
        for seed in [LONG_DP_SEED] + derived:
            for encoding in secret_encodings(seed):
                for file_name, blob in files.items():
                    assert encoding not in blob, (file_name, seed, encoding)
                assert encoding.decode("latin-1") not in result.stdout + result.stderr
    # The delta's parts: Poisson, 15 steps, 1 query, the MLP's parameters.
    private = results["private"]
    num_params = sum(w.size for w in c)
    parts = private["delta_parts"]
    assert parts["accountant"] == 1e-5
    assert parts["noise_tail"] == accounting.sampler_tail_delta(
        private["epsilon"], 15, 1, num_params)
    # Overflow bound 1e-3 * delta, through the TV argument: (1 + e^eps) * 1e-8.
    assert parts["padding_overflow"] == pytest.approx(
        (1 + math.exp(private["epsilon"])) * 1e-8, rel=1e-12)
    assert private["delta"] == parts["total"] == pytest.approx(
        1e-5 + parts["noise_tail"] + parts["padding_overflow"], rel=1e-15)
    assert accounting.format_delta_breakdown(
        accounting.DeltaBreakdown(**parts)) in " ".join(
        results["privacy_statement"].split())


def tensorboard_tags(model_dir):
    return {value.tag for events in pathlib.Path(model_dir).rglob("events.out.*")
            for event in tf.compat.v1.train.summary_iterator(str(events))
            for value in event.summary.value}


# The non-private numbers a run with validation and sharpness records.
NON_PRIVATE_NUMBERS = accounting.NON_PRIVATE_DIAGNOSTICS + (
    "validation_loss", "validation_accuracy", "top_hessian_eigenvalue")


@pytest.mark.slow
def test_non_private_diagnostics_are_kept_apart_and_can_be_left_out(tmp_path, capsys,
                                                                    caplog):
    # With held-out examples and sharpness: their numbers are not private
    # either (held-out examples are outside the accounted set; the
    # eigenvalue has no noise), so they go with the other diagnostics.
    requested = dict(validation_examples=300, sharpness_examples=64, keras_verbose=2)
    with caplog.at_level(logging.WARNING, logger="absl"):
        kept = training.train(small_config(model_dir=str(tmp_path / "kept"),
                                           **requested))
    printed = capsys.readouterr().out
    diagnostics = kept["non_private_diagnostics"]
    assert set(diagnostics["history"][0]) == {
        "epoch", "loss", "accuracy", "grad_norm_clipped_fraction",
        "nonfinite_gradients"}
    assert "not private" in diagnostics["note"].lower()
    # 300 held out: an accuracy is a multiple of 1/300.
    validation = diagnostics["validation"]
    assert validation["num_examples"] == 300 and "not private" in validation["note"].lower()
    accuracy = validation["final_accuracy"]
    assert 0 < accuracy <= 1 and abs(accuracy * 300 - round(accuracy * 300)) < 1e-4
    sharp = diagnostics["sharpness"]
    assert sharp["num_examples"] == 64 and "not private" in sharp["note"].lower()
    assert sharp["final_top_hessian_eigenvalue"] > 0
    # Nowhere else in results.json: not at the top, not under "private".
    assert not {"validation", "sharpness"} & set(kept)
    for name in NON_PRIVATE_NUMBERS:
        assert f'"{name}"' not in json.dumps(kept["private"]), name
    # Labelled in the epoch line and in TensorBoard; the start-up warning
    # lists them.
    assert f"not_private/validation_accuracy: {accuracy:.4f}" in printed
    assert "not_private/top_hessian_eigenvalue:" in printed
    assert " validation_accuracy:" not in printed
    tags = tensorboard_tags(tmp_path / "kept")
    assert {"epoch_not_private/validation_accuracy", "epoch_not_private/validation_loss",
            "epoch_not_private/top_hessian_eigenvalue"} <= tags
    assert not tags & {"epoch_validation_accuracy", "epoch_top_hessian_eigenvalue"}
    recording = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("Recording the non-private")]
    assert len(recording) == 1
    assert "not_private/validation_accuracy" in recording[0]
    assert "not_private/top_hessian_eigenvalue" in recording[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="absl"):
        omitted = training.train(small_config(
            model_dir=str(tmp_path / "omitted"), record_train_diagnostics=False,
            **requested))
    printed = capsys.readouterr().out
    assert "test_accuracy:" in printed and "epsilon:" in printed
    for name in NON_PRIVATE_NUMBERS:
        assert f" {name}:" not in printed and f"/{name}:" not in printed, name
    saved = read_json(tmp_path / "omitted" / "results.json")
    assert saved == json.loads(json.dumps(omitted))
    assert not {"non_private_diagnostics", "validation", "sharpness"} & set(saved)
    # Still held out of training: the accountant sees 1200 examples.
    assert saved["num_train_examples"] == 1200
    assert saved["private"]["history"][0]["test_accuracy"] > 0
    text = json.dumps(saved) + json.dumps(read_json(tmp_path / "omitted" / "state.json"))
    for name in NON_PRIVATE_NUMBERS:
        assert f'"{name}"' not in text, name
    tags = tensorboard_tags(tmp_path / "omitted")
    assert {"epoch_epsilon", "epoch_test_accuracy"} <= tags
    assert not [t for t in tags if "not_private" in t or any(
        t == f"epoch_{n}" for n in NON_PRIVATE_NUMBERS)], tags
    # The user asked for them: a warning says why they are missing.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not [m for m in warnings if m.startswith("Recording the non-private")]
    for flag in ("--validation_examples=300", "--sharpness_examples=64"):
        assert [m for m in warnings if m.startswith(flag) and
                "--norecord_train_diagnostics" in m and "not measured" in m], flag


def tensorboard_scalars(model_dir):
    """{tag: value} of every scalar in the run's TensorBoard event files."""
    return {value.tag: float(tf.make_ndarray(value.tensor))
            for events in pathlib.Path(model_dir).rglob("events.out.*")
            for event in tf.compat.v1.train.summary_iterator(str(events))
            for value in event.summary.value}


# What a DP model's training step reports: exact functions of the private
# batches, without noise.
TRAINING_STEP_METRICS = accounting.NON_PRIVATE_DIAGNOSTICS + ("top_2",)
# What the binary releases beside them (and TensorBoard's public learning rate).
RELEASED_TAGS = {"epoch_epsilon", "epoch_test_loss", "epoch_test_accuracy",
                 "epoch_learning_rate"}


class _EpochLogKeys(keras.callbacks.Callback):
    """Keeps the epoch-log keys that a user's extra callback sees."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def on_epoch_end(self, epoch, logs=None):
        self.keys.append(set(logs))


def compile_with_a_user_metric(monkeypatch):
    """Makes the binary compile one more training metric, "top_2"."""
    compile_binary_model = training._compile

    def compile_with_top_2(model, optimizer, config):
        compile_binary_model(model, optimizer, config)
        model.compile(optimizer=optimizer, loss=model.loss, weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top_2")],
            jit_compile=False)

    monkeypatch.setattr(training, "_compile", compile_with_top_2)


@pytest.mark.parametrize("record", [True, False])
def test_every_training_step_metric_is_labelled_or_dropped(record):
    # Derived from the keys, not from a list: "auc" (a user's metric) and
    # Keras's "val_loss" go with the loss; only what the binary releases or
    # labels itself keeps its name.
    released = {"epsilon": 3.0, "test_loss": 1.5, "test_accuracy": 0.6,
                "not_private/validation_accuracy": 0.4}
    trained = {"loss": 2.0, "accuracy": 0.5, "grad_norm_clipped_fraction": 1.0,
               "nonfinite_gradients": 0.0, "auc": 0.7, "val_loss": 2.5}
    callback = training._TrainingStatistics(record=record)
    batch_logs, epoch_logs = dict(trained), {**trained, **released}
    callback.on_train_batch_end(0, batch_logs)
    callback.on_epoch_end(0, epoch_logs)
    labelled = {f"not_private/{k}": v for k, v in trained.items()} if record else {}
    assert batch_logs == labelled
    assert epoch_logs == {**labelled, **released}


@pytest.mark.slow
def test_tensorboard_shows_training_metrics_only_as_not_private(tmp_path, monkeypatch,
                                                                capsys):
    compile_with_a_user_metric(monkeypatch)
    seen = _EpochLogKeys()
    results = training.train(small_config(model_dir=str(tmp_path), keras_verbose=2),
                             extra_callbacks=[seen])
    scalars = tensorboard_scalars(tmp_path)
    labelled = {f"epoch_not_private/{name}" for name in TRAINING_STEP_METRICS}
    assert set(scalars) == RELEASED_TAGS | labelled
    # The same numbers as results.json: the training loss (and the user's
    # metric) in its non_private_diagnostics, epsilon and the test accuracy
    # in its private section.
    trained = results["non_private_diagnostics"]["history"][0]
    assert set(trained) == {"epoch", *TRAINING_STEP_METRICS}
    for name in TRAINING_STEP_METRICS:
        assert scalars[f"epoch_not_private/{name}"] == pytest.approx(trained[name],
                                                                     rel=1e-6), name
    private = results["private"]
    assert 0 < private["epsilon"] <= 3.0
    assert scalars["epoch_epsilon"] == pytest.approx(private["epsilon"], rel=1e-6)
    assert scalars["epoch_test_accuracy"] == pytest.approx(
        private["final_test_accuracy"], rel=1e-6)
    assert not {"top_2", "loss"} & set(private["history"][0])
    # What a user's callback (an EarlyStopping, say) and the epoch line see.
    assert seen.keys == [{"epsilon", "test_loss", "test_accuracy"} |
                         {f"not_private/{name}" for name in TRAINING_STEP_METRICS}]
    printed = capsys.readouterr().out
    assert "- not_private/loss: " in printed and "- not_private/top_2: " in printed
    assert "- loss: " not in printed and "- accuracy: " not in printed
    assert "- epsilon: " in printed and "- test_accuracy: " in printed


@pytest.mark.slow
def test_without_diagnostics_a_user_metric_is_dropped_too(tmp_path, monkeypatch,
                                                         capsys):
    compile_with_a_user_metric(monkeypatch)
    seen = _EpochLogKeys()
    results = training.train(small_config(model_dir=str(tmp_path), keras_verbose=2,
                                          record_train_diagnostics=False),
                             extra_callbacks=[seen])
    assert set(tensorboard_scalars(tmp_path)) == RELEASED_TAGS
    assert seen.keys == [{"epsilon", "test_loss", "test_accuracy"}]
    assert "non_private_diagnostics" not in results
    text = (json.dumps(read_json(tmp_path / "results.json")) +
            json.dumps(read_json(tmp_path / "state.json")))
    for name in TRAINING_STEP_METRICS:
        assert f'"{name}"' not in text, name
    printed = capsys.readouterr().out
    assert "top_2" not in printed and "loss: " not in printed.replace("test_loss: ", "")


@pytest.mark.slow
def test_binary_fails_fast_without_data(tmp_path):
    start = time.monotonic()
    # --nodownload: a CI machine with a network must not fetch CIFAR-10 here.
    result = run_binary("--dataset=cifar10", f"--data_dir={tmp_path}", "--nodownload")
    assert time.monotonic() - start < 60
    assert result.returncode != 0
    assert "--raw_data_dir" in result.stderr and "--data_dir" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# End to end on the real Fashion-MNIST.
# ---------------------------------------------------------------------------


@pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(datasets.DEBIAN_FASHION_MNIST_DIR, f))
            for f in FMNIST_FILES),
    reason=f"Fashion-MNIST IDX files not in {datasets.DEBIAN_FASHION_MNIST_DIR} "
           "(apt-get install dataset-fashion-mnist; .ci/run does)")
@pytest.mark.slow
def test_fashion_mnist_one_epoch_dpsat_reaches_75_percent(tmp_path):
    # One epoch of DP-SAT at epsilon 3 on all 60,000 examples, expected batch
    # 256: 234 noisy steps, sigma ~0.65. Measured 78.5-78.8% over three seeds
    # (lr 4; 77-78% at the authors' lr 2), 23-47 s on 2 CPU cores.
    config = training.TrainConfig(
        dataset="fashion_mnist", raw_data_dir=datasets.DEBIAN_FASHION_MNIST_DIR,
        model="tb_cnn", method="dpsat", epsilon=3.0, epochs=1, batch_size=256,
        learning_rate=4.0, model_dir=str(tmp_path), keras_verbose=0)
    results = training.train(config)
    saved = read_json(tmp_path / "results.json")
    assert saved["num_train_examples"] == 60000 and saved["num_test_examples"] == 10000
    assert saved["steps"] == 234 and saved["completed"]
    private = saved["private"]
    assert private["epsilon"] <= 3.0 and private["delta_parts"]["accountant"] == 1e-5
    assert private["final_test_accuracy"] >= 0.75, private["final_test_accuracy"]
    assert private["final_test_accuracy"] == results["private"]["final_test_accuracy"]


# ---------------------------------------------------------------------------
# User errors: one line, exit status 2, no traceback.
# ---------------------------------------------------------------------------


def _assert_one_line_error(result, expected):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Trains an image classifier" not in result.stdout + result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == expected


@pytest.mark.slow
def test_binary_batch_larger_than_dataset_is_one_line_error():
    _assert_one_line_error(
        run_binary("--dataset=digits", "--model=mlp", "--batch_size=5000"),
        "error: Expected batch_size=5000 <= 1500 training examples; use a smaller "
        "--batch_size.")


@pytest.mark.slow
def test_binary_usage_error_skips_the_docstring():
    result = run_binary("--dataset=digits", "--model=mlp", "extra")
    _assert_one_line_error(result, "error: Unexpected arguments: extra; every "
                           "option is a --flag (see --help).")


@pytest.mark.slow
def test_binary_model_dir_of_another_run_is_one_line_error(tmp_path):
    (tmp_path / training.STATE_FILE).write_text(json.dumps(
        {"config": {"learning_rate": 123.0}, "epochs_done": 0}))
    result = run_binary("--dataset=digits", "--model=mlp", f"--model_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"error: model_dir '{tmp_path}' holds a run with a "
                           "different configuration (")
    assert "learning_rate: 123.0 -> " in last
    assert last.endswith("Use a new --model_dir, or the original flags.")


@pytest.mark.parametrize("corrupt", ["truncated", "not_gzip"])
@pytest.mark.slow
def test_binary_corrupt_idx_gz_is_one_line_error(tmp_path, corrupt):
    for name in FMNIST_FILES:
        with open(tmp_path / name, "wb") as f:
            f.write(gzip.compress(b"\0" * 100) if name != FMNIST_FILES[0]
                    else gzip.compress(bytes(range(256)) * 4)[:100]
                    if corrupt == "truncated" else b"plain bytes")
    result = run_binary("--dataset=fashion_mnist", f"--raw_data_dir={tmp_path}")
    path = tmp_path / FMNIST_FILES[0]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"error: {path}: not a complete gzip file (")
    assert last.endswith("); download it again or delete it.")


def test_physical_batch_larger_than_the_batch_is_refused():
    # Poisson: 256 expected rows pad to 300 for 234 steps at this delta; a
    # physical batch above that would only add padding rows.
    config = training.TrainConfig(batch_size=256, physical_batch_size=512,
                                  noise_multiplier=1.0)
    padded = training.make_plan(
        training.TrainConfig(batch_size=256, noise_multiplier=1.0), 60000
    ).logical_batch_size
    with pytest.raises(ValueError, match=(
            rf"Expected physical_batch_size=512 <= {padded} rows, the padded "
            r"Poisson batch for batch_size=256: it only splits a batch into passes "
            r"to bound memory\. Lower it or leave it unset\.")):
        training.make_plan(config, 60000)
    with pytest.raises(ValueError, match=(
            r"physical_batch_size=512 must divide batch_size=256 \(so it is at "
            r"most batch_size\); pick a divisor or leave it unset\.")):
        training.make_plan(training.TrainConfig(
            batch_size=256, physical_batch_size=512, sampling="shuffle",
            noise_multiplier=1.0), 60000)


@pytest.mark.slow
def test_binary_help_lists_its_own_flags():
    result = run_binary("--help")  # absl's --help exits with status 1.
    # absl prints the main module's key flags under the script's path.
    assert "examples/train_cifar.py:\n" in result.stdout
    own = result.stdout.split("examples/train_cifar.py:\n", 1)[1]
    for flag in ("--batch_size:", "--epsilon:", "--physical_batch_size:",
                 "--model_dir:", "--dataset:"):
        assert flag in own
    assert "--tt_" not in result.stdout and "--xla_" not in result.stdout


def test_report_counts_the_same_steps_as_the_plan_and_the_cli():
    # 60000 / 256 = 234.375: the trainer, the report and
    # `python -m tf_dpsat.accounting` all count round(N / B) = 234, not 235.
    config = training.TrainConfig(dataset="digits", model="mlp", batch_size=256,
                                  epochs=1, noise_multiplier=1.0)
    plan = training.make_plan(config, 60000)
    assert plan.total_steps == 234 == accounting.poisson_steps(
        num_examples=60000, batch_size=256, epochs=1)
    report = " ".join(training.privacy_report(config, plan).split())
    assert ("1 epochs = 234 steps (round(num_examples / batch_size) per epoch, "
            "as the trainer runs)") in report


@pytest.mark.slow
def test_binary_epsilon_below_the_floor_is_one_line_error():
    _assert_one_line_error(
        run_binary("--dataset=digits", "--model=mlp", "--batch_size=100",
                   "--epsilon=1e-6"),
        "error: Expected target epsilon=1e-06 >= 0.0036, the smallest epsilon the "
        "RDP accountant calibrates at delta=1e-05; ask for epsilon >= 0.0036 (or a "
        "larger delta).")


# ---------------------------------------------------------------------------
# --validation_examples.
# ---------------------------------------------------------------------------


def test_split_validation_holds_out_a_fixed_public_choice():
    # 10 examples whose labels are their indices: the split is visible.
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    dataset = datasets.Dataset("digits", images, np.arange(10), images[:2],
                               np.arange(2), num_classes=10)
    train, held_out = training.split_validation(dataset, 3)
    expected = np.sort(np.random.default_rng(training.VALIDATION_SPLIT_SEED)
                       .permutation(10)[:3])
    np.testing.assert_array_equal(held_out.labels, expected)
    np.testing.assert_array_equal(held_out.images[:, 0, 0, 0], expected)
    # The rest, in their original order; nothing lost, nothing shared.
    np.testing.assert_array_equal(train.train_labels,
                                  np.setdiff1d(np.arange(10), expected))
    again, _ = training.split_validation(dataset, 3)
    np.testing.assert_array_equal(again.train_labels, train.train_labels)
    assert training.split_validation(dataset, 0) == (dataset, None)
    with pytest.raises(ValueError, match="validation_examples=10 < 10"):
        training.split_validation(dataset, 10)


@pytest.mark.slow
def test_validation_examples_shrink_the_accounted_set_and_are_reported(tmp_path):
    # digits: 1500 training examples (tf_dpsat.experiments.datasets); 300 held out leave
    # N = 1200, so q = 100 / 1200 and round(1200 / 100) = 12 steps (the
    # accountant sees 1200, not 1500).
    result = training.train(small_config(validation_examples=300,
                                         model_dir=str(tmp_path)))
    assert result["num_train_examples"] == 1200
    assert result["steps"] == 12
    assert result["sampling_probability"] == pytest.approx(100 / 1200)
    held_out = result["non_private_diagnostics"]["validation"]
    assert held_out["num_examples"] == 300
    assert "not private" in held_out["note"].lower()
    # An accuracy over 300 examples is a multiple of 1/300.
    accuracy = held_out["final_accuracy"]
    assert 0 < accuracy <= 1 and abs(accuracy * 300 - round(accuracy * 300)) < 1e-4
    assert held_out["history"] == [{"epoch": 1, "validation_accuracy": accuracy,
                                    "validation_loss": pytest.approx(
                                        held_out["history"][0]["validation_loss"])}]
    # Not in the private section.
    assert "validation" not in json.dumps(result["private"])
    with pytest.raises(ValueError, match="validation_examples"):
        training.train(small_config(validation_examples=0, epochs=2,
                                    model_dir=str(tmp_path)))


@pytest.mark.slow
def test_a_run_started_before_a_new_field_resumes_with_its_default(tmp_path):
    # The state of an older version: no validation_examples field.
    def without_the_field(saved):
        del saved["validation_examples"]

    config = interrupted_run_of_an_older_version(tmp_path, without_the_field,
                                                 dp_seed=None)
    assert training.train(config)["steps"] == 30


def test_hessian_minibatches_are_capped_below_the_evaluation_batch(monkeypatch):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype("float32")
    y = rng.integers(0, 3, 600)
    seen, measure = [], sharpness.top_hessian_eigenvalue

    def spy(*args, batch_size, **kwargs):
        seen.append(batch_size)
        return measure(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(sharpness, "top_hessian_eigenvalue", spy)
    capped = training.top_eigenvalue(model, x, y, batch_size=1000)
    small = training.top_eigenvalue(model, x, y, batch_size=100)
    assert seen == [training.SHARPNESS_BATCH_SIZE, 100]
    # The same eigenvalue as one pass over all 600 examples, up to rounding.
    whole = measure(model, x, y, loss=model.loss,
                    iterations=training.SHARPNESS_ITERATIONS, batch_size=600,
                    seed=training.SHARPNESS_SEED)
    assert capped.eigenvalue == pytest.approx(whole.eigenvalue, rel=1e-4)
    assert small.eigenvalue == pytest.approx(whole.eigenvalue, rel=1e-4)


@pytest.mark.slow
def test_sharpness_examples_are_measured_at_each_evaluation(tmp_path):
    config = small_config(epochs=2, sharpness_examples=64, model_dir=str(tmp_path))
    result = training.train(config)
    measured = result["non_private_diagnostics"]["sharpness"]
    assert measured["num_examples"] == 64 and "not private" in measured["note"].lower()
    assert [h["epoch"] for h in measured["history"]] == [1, 2]
    assert "top_hessian_eigenvalue" not in json.dumps(result["private"])
    # The final value is the eigenvalue of the saved model on the first 64
    # training examples, measured independently here.
    model = keras.models.load_model(tmp_path / "checkpoint-0002.keras")
    dataset = training.load_data(config)
    x = datasets.normalize(dataset.train_images[:64], name="digits")
    expected = sharpness.top_hessian_eigenvalue(
        model, x, dataset.train_labels[:64], loss=model.loss,
        iterations=training.SHARPNESS_ITERATIONS, seed=training.SHARPNESS_SEED)
    assert measured["final_top_hessian_eigenvalue"] == pytest.approx(
        expected.eigenvalue, rel=1e-4)
    assert expected.eigenvalue > 0
    with pytest.raises(ValueError, match="sharpness_examples=5000 <= 1500"):
        training.train(small_config(sharpness_examples=5000))
