"""Tests for tf_dpsat.sampling: padded sizes, Poisson, shuffled and test batches."""

import functools
import math
import re
from fractions import Fraction

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsat
from tf_dpsat import sampling
from tf_dpsat.experiments import datasets

# ---------------------------------------------------------------------------
# padded_batch_size
# ---------------------------------------------------------------------------


def _exact_cap(n, steps, failure_probability):
    """Smallest c with steps * P(Binomial(n, 1/10) > c) <= failure_probability.

    Exact rational arithmetic, independent of scipy:
    P(X = k) = C(n, k) 9^(n-k) / 10^n.
    """
    bound = Fraction(failure_probability)
    tail = Fraction(0)  # P(X > c), built from the top down.
    for c in range(n, -1, -1):
        if steps * tail > bound:
            return c + 1
        tail += Fraction(math.comb(n, c) * 9 ** (n - c), 10 ** n)
    return 0


# Golden values (hand computation with _exact_cap, q = 0.1):
#   N=100,  E=10,  steps=1,   p=1e-6 -> 27
#   N=1000, E=100, steps=1,   p=1e-6 -> 148
#   N=1000, E=100, steps=100, p=1e-6 -> 157
#   N=1000, E=100, steps=100, p=1e-3 -> 143
@pytest.mark.parametrize("n,expected,steps,p,golden", [
    (100, 10, 1, 1e-6, 27),
    (1000, 100, 1, 1e-6, 148),
    (1000, 100, 100, 1e-6, 157),
    (1000, 100, 100, 1e-3, 143),
])
def test_padded_batch_size_golden(n, expected, steps, p, golden):
    assert _exact_cap(n, steps, p) == golden
    assert sampling.padded_batch_size(expected, n, steps, failure_probability=p) == golden


def test_padded_batch_size_monotonic_and_rounding():
    # CIFAR-10 at q = 0.04. The default failure probability is 1e-9. By a
    # log-space sum of the Binomial(50000, 0.04) pmf: 200 * P(B > 2304) =
    # 1.09e-9 > 1e-9 >= 200 * P(B > 2305) = 9.40e-10, so the cap is 2305.
    assert sampling.padded_batch_size(2000, 50000, 200, failure_probability=1e-6) == 2256
    base = sampling.padded_batch_size(2000, 50000, 200)
    assert base == sampling.padded_batch_size(
        2000, 50000, 200, failure_probability=1e-9) == 2305
    # More steps or a stricter bound never shrink the cap.
    caps = [sampling.padded_batch_size(2000, 50000, s) for s in (1, 10, 100, 1000, 10000)]
    assert caps == sorted(caps) and caps[0] < caps[-1]
    caps = [sampling.padded_batch_size(2000, 50000, 200, failure_probability=p)
            for p in (1e-2, 1e-4, 1e-6, 1e-9, 1e-12)]
    assert caps == sorted(caps) and caps[0] < caps[-1]
    rounded = sampling.padded_batch_size(2000, 50000, 200, multiple_of=512)
    assert rounded % 512 == 0 and base <= rounded < base + 512
    # q = 1 includes everything: the cap is exactly N.
    assert sampling.padded_batch_size(50, 50, 10) == 50


@pytest.mark.parametrize("kwargs", [
    dict(expected_batch_size=0, num_examples=10, steps=1),
    dict(expected_batch_size=11, num_examples=10, steps=1),
    dict(expected_batch_size=5, num_examples=10, steps=0),
    dict(expected_batch_size=5, num_examples=10, steps=1, failure_probability=0.0),
    dict(expected_batch_size=5, num_examples=10, steps=1, multiple_of=0),
])
def test_padded_batch_size_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sampling.padded_batch_size(**kwargs)


# Golden values by hand: the smallest c with c ln(c / mu) - c + mu >=
# ln(1e30) = 69.078. mu = 1: c = 28 gives 93.30 - 27 = 66.30, c = 29 gives
# 97.65 - 28 = 69.65 -> 29. mu = 25: c = 103 gives 145.84 - 78 = 67.84,
# c = 104 gives 148.25 - 79 = 69.25 -> 104.
@pytest.mark.parametrize("mu, golden", [(1, 29), (25, 104)])
def test_padded_size_bound_golden(mu, golden):
    assert sampling.padded_size_bound(mu) == golden


def test_padded_size_bound_bounds_every_cap_down_to_1e_30():
    # The exact cap, in rational arithmetic (q = 1/10), and scipy's for
    # other sizes, at a per-step overflow probability of 1e-30.
    assert _exact_cap(100, 1, 1e-30) == 56 <= sampling.padded_size_bound(10) == 67
    for mu in (1, 2.5, 8, 25, 100, 256, 1000):
        # Larger N approach the Poisson tail, which the bound also covers;
        # scipy takes seconds per cap there.
        for n in (math.ceil(mu) + 1, 2 * math.ceil(mu) + 1, 1000, 5000):
            if n < mu:
                continue
            cap = sampling.padded_batch_size(mu, n, 1, failure_probability=1e-30)
            assert cap <= sampling.padded_size_bound(mu), (mu, n)


def test_accumulation_layouts_of_padded_batch_size_stay_below_the_bound():
    # What DPSATKeras relies on to refuse expected_batch_size under gradient
    # accumulation: the documented layout, padded_size = padded_batch_size(
    # ..., multiple_of=rows) cut into k = padded_size // rows physical
    # batches, has (k - 1) * rows < padded_size_bound(expected_batch_size),
    # whatever the physical rows (up to the cap) and run.
    for batch in (1, 3, 16, 100, 256, 1000):
        for n in (4 * batch, 60000):
            for steps, p in ((1, 1e-3), (1000, 1e-9), (10**4, 1e-12)):
                cap = sampling.padded_batch_size(batch, n, steps, failure_probability=p)
                for rows in {1, max(1, batch // 4), max(1, batch // 2), batch, cap - 1}:
                    # padded_batch_size(..., multiple_of=rows), rounded as
                    # test_padded_batch_size_monotonic_and_rounding checks.
                    k = -(-cap // rows)
                    assert (k - 1) * rows < sampling.padded_size_bound(batch), (
                        batch, n, steps, p, rows)
    # The mistake it is for, at the review's scale: expected logical batch
    # 256 of 60000, 60 epochs, k = 4 pieces of padded_size / 4 rows each,
    # and expected_batch_size given as one piece's share, 64.
    padded = sampling.padded_batch_size(256, 60000, 60 * 234, multiple_of=4)
    assert 3 * (padded // 4) >= sampling.padded_size_bound(64)


# ---------------------------------------------------------------------------
# poisson_dataset
# ---------------------------------------------------------------------------


def _index_data(n, shape=(1, 1, 1)):
    """Images whose every pixel is (index % 250) + 1, labels = index."""
    images = np.broadcast_to(((np.arange(n) % 250) + 1).astype(np.uint8).reshape(-1, 1, 1, 1),
                             (n,) + shape).copy()
    return images, np.arange(n, dtype=np.int64)


def _collect(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


def test_poisson_inclusion_rate_and_batch_size_moments():
    n, expected, steps = 200, 20, 2000
    q = expected / n
    images, labels = _index_data(n)
    ds = sampling.poisson_dataset(images, labels, expected_batch_size=expected, steps=steps,
                              padded_size=sampling.padded_batch_size(expected, n, steps), seed=7)
    counts = np.zeros(n)
    sizes = []
    for _, y, w in _collect(ds):
        sampled = y[w > 0]
        assert len(np.unique(sampled)) == len(sampled)  # No example twice in a step.
        counts[sampled] += 1
        sizes.append(len(sampled))
    sizes = np.asarray(sizes, np.float64)
    # Per-example inclusion count ~ Binomial(steps, q): std of its rate is
    # sqrt(q(1-q)/steps) = 0.0067; allow 5 sigma (0.034).
    rate_tol = 5 * math.sqrt(q * (1 - q) / steps)
    assert np.max(np.abs(counts / steps - q)) < rate_tol
    # Batch size ~ Binomial(n, q): mean 20, variance n q (1-q) = 18.
    # Std of the sample mean: sqrt(18 / steps) = 0.095 -> 5 sigma = 0.47.
    var = n * q * (1 - q)
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(var / steps)
    # Std of the sample variance ~ var * sqrt((2 + excess kurtosis) / (steps - 1))
    # with binomial excess kurtosis (1 - 6q(1-q)) / var; 5 sigma = 2.9.
    kurt = (1 - 6 * q * (1 - q)) / var
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt((2 + kurt) / (steps - 1))


def test_poisson_static_shapes_and_padding():
    n = 300
    images, labels = _index_data(n, shape=(4, 4, 3))
    preprocess = functools.partial(datasets.normalize, name="cifar10")
    ds = sampling.poisson_dataset(images, labels, expected_batch_size=30, steps=20, padded_size=64,
                              seed=3, preprocess=preprocess)
    for spec in ds.element_spec:
        assert spec.shape.is_fully_defined()
    x_spec, y_spec, w_spec = ds.element_spec
    assert x_spec.shape == (64, 4, 4, 3) and x_spec.dtype == tf.float32
    assert y_spec.shape == (64,) and w_spec.shape == (64,) and w_spec.dtype == tf.float32
    for x, y, w in _collect(ds):
        real = w > 0
        k = int(real.sum())
        assert set(np.unique(w)) <= {0.0, 1.0}
        assert real[:k].all() and not real[k:].any()  # Sampled rows first.
        # Padding is inert: zero image (not -mean/std), label 0, weight 0.
        np.testing.assert_array_equal(x[k:], 0.0)
        np.testing.assert_array_equal(y[k:], 0)
        assert np.all(np.diff(y[:k]) > 0)  # Distinct, in index order.
        np.testing.assert_allclose(x[:k], datasets.normalize(images[y[:k]], "cifar10"),
                                   rtol=1e-5, atol=1e-5)


def test_poisson_is_deterministic_and_resumable():
    images, labels = _index_data(500)
    make = functools.partial(sampling.poisson_dataset, images, labels, expected_batch_size=50,
                             steps=12, padded_size=100)
    full = _collect(make(seed=11))
    again = _collect(make(seed=11))
    resumed = _collect(make(seed=11, start_step=5))
    other = _collect(make(seed=12))
    assert len(full) == 12 and len(resumed) == 7
    for a, b in zip(full, again):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    for a, b in zip(full[5:], resumed):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(full, other))
    # Steps differ from one another too (the step is part of the RNG key).
    assert not np.array_equal(full[0][1], full[1][1])


def test_default_sampling_key_is_secret_and_fresh():
    # No seed: each dataset draws its key from OS entropy, so two of them
    # sample different batches (12 steps of ~50 of 500 examples: identical
    # samples by chance have probability far below 1e-100).
    images, labels = _index_data(500)
    make = functools.partial(sampling.poisson_dataset, images, labels, expected_batch_size=50,
                             steps=12, padded_size=100)
    a, b = _collect(make()), _collect(make())
    assert any(not np.array_equal(u[1], v[1]) for u, v in zip(a, b))
    first = [_collect(sampling.shuffle_dataset(images, labels, batch_size=50))
             for _ in range(2)]
    assert any(not np.array_equal(u[1], v[1]) for u, v in zip(*first))


def test_poisson_overflow_raises_with_clear_message():
    images, labels = _index_data(100)
    # q = 0.9 with a cap of 90: P(Binomial(100, 0.9) > 90) ~ 0.45 per step, so
    # 40 steps overflow except with probability ~1e-10 (and the seed is fixed).
    ds = sampling.poisson_dataset(images, labels, expected_batch_size=90, steps=40,
                              padded_size=90, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _collect(ds)
    match = re.search(r"overflow at step (\d+): (\d+) examples sampled but padded_size is 90",
                      info.value.message)
    assert match, info.value.message
    assert int(match.group(2)) > 90
    assert "padded_batch_size" in info.value.message


def test_poisson_physical_batches_are_the_pieces_of_the_logical_batch():
    # k = 4 pieces of 120 / 4 = 30 rows per step. About 60 of 300 examples
    # are sampled per step (sd 6.9), so the sampled rows reach into a
    # second piece at every step.
    images, labels = _index_data(300, shape=(2, 2, 3))
    make = functools.partial(
        sampling.poisson_dataset, images, labels, expected_batch_size=60, steps=8,
        padded_size=120, seed=5,
        preprocess=functools.partial(datasets.normalize, name="cifar10"))
    whole, pieces = make(), make(physical_batches=4)
    assert pieces.cardinality() == 4 * 8
    x_spec, y_spec, w_spec = pieces.element_spec
    assert x_spec.shape == (30, 2, 2, 3) and y_spec.shape == w_spec.shape == (30,)
    whole, pieces = _collect(whole), _collect(pieces)
    assert len(whole) == 8 and len(pieces) == 32
    for step, logical in enumerate(whole):
        assert logical[2].sum() > 30
        own = pieces[4 * step:4 * step + 4]
        for part, joined in enumerate(zip(*own)):
            np.testing.assert_array_equal(np.concatenate(joined), logical[part])
    # start_step counts logical steps: from step 3 on, the same pieces.
    resumed = _collect(make(physical_batches=4, start_step=3))
    assert len(resumed) == 20
    for a, b in zip(resumed, pieces[12:]):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


@pytest.mark.slow
def test_accumulating_the_pieces_trains_like_the_logical_batch():
    # DP-SAT with noise: 6 logical steps on whole padded Poisson batches of
    # 64 rows, against the same steps as 4 accumulated pieces of 16 rows.
    # Same weights up to float rounding (the clipped sum is added in another
    # order), the same 6 noise draws (the noise is keyed by the step).
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(200, 2, 2, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=200)

    def train(parts):
        keras.utils.set_random_seed(0)
        model = tf_dpsat.make_private(keras.Sequential([
            keras.Input((2, 2, 3)), keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]))
        model.compile(
            optimizer=tf_dpsat.DPSATKeras(
                learning_rate=0.5, l2_norm_clip=0.5, rho=0.1, noise_multiplier=1.0,
                seed=3, expected_batch_size=40, gradient_accumulation_steps=parts),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        batches = sampling.poisson_dataset(
            images, labels, expected_batch_size=40, steps=6, padded_size=64, seed=5,
            preprocess=lambda x: tf.cast(x, tf.float32) / 255.0,
            physical_batches=parts)
        model.fit(batches, epochs=1, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 6
        return [v.numpy() for v in model.trainable_variables]

    whole, pieces = train(1), train(4)
    for a, b in zip(whole, pieces):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_poisson_under_mirrored_strategy_and_one_hot_labels(mirrored_strategy):
    # tf.distribute splits the static padded batch evenly across replicas
    # (conftest provides 2 logical CPUs); multiple_of keeps it divisible.
    images, labels = _index_data(64)
    one_hot = np.eye(64, dtype=np.float32)
    padded = sampling.padded_batch_size(16, 64, 3, multiple_of=2)
    ds = sampling.poisson_dataset(images, one_hot, expected_batch_size=16, steps=3,
                              padded_size=padded, seed=1)
    strategy = mirrored_strategy
    for _, y, _ in strategy.experimental_distribute_dataset(ds):
        parts = strategy.experimental_local_results(y)
        assert len(parts) == 2 and all(p.shape == (padded // 2, 64) for p in parts)
    for _, y, w in _collect(ds):
        np.testing.assert_array_equal(y.sum(axis=1), w)  # Padding rows all zero.


@pytest.mark.parametrize("kwargs", [
    dict(padded_size=10),  # Below the expected batch size.
    dict(start_step=11),
    dict(seed=-1),
    dict(expected_batch_size=0),
    dict(physical_batches=0),
    dict(physical_batches=3),  # Does not divide padded_size=40.
    dict(physical_batches=2.5),
])
def test_poisson_rejects_bad_arguments(kwargs):
    images, labels = _index_data(100)
    args = dict(expected_batch_size=20, steps=10, padded_size=40, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        sampling.poisson_dataset(images, labels, **args)
    with pytest.raises(ValueError):
        sampling.poisson_dataset(images, labels[:-1], expected_batch_size=20, steps=10,
                             padded_size=40, seed=0)


@pytest.mark.parametrize("expected_batch_size", [1.4, 20.5, math.nan, math.inf, True])
def test_poisson_refuses_a_non_integer_expected_batch_size(expected_batch_size):
    # The optimizer's expected_batch_size and PrivacyCallback(batch_size=)
    # are integers: sampling at 1.4 / N while accounting for 1 / N would
    # understate q by 29%.
    images, labels = _index_data(100)
    with pytest.raises(ValueError, match=(
            rf"Expected expected_batch_size={re.escape(repr(expected_batch_size))} "
            r"to be an integer: .*Pick an integer expected batch size and pass "
            r"the same to the optimizer\.")):
        sampling.poisson_dataset(images, labels, expected_batch_size=expected_batch_size,
                                 steps=10, padded_size=40, seed=0)


def test_poisson_takes_an_integral_float_as_that_integer():
    images, labels = _index_data(100)
    batches = [_collect(sampling.poisson_dataset(
        images, labels, expected_batch_size=size, steps=5, padded_size=60, seed=4))
        for size in (20, 20.0, np.int64(20))]
    for other in batches[1:]:
        for a, b in zip(batches[0], other):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)



# ---------------------------------------------------------------------------
# shuffle_dataset / test_dataset
# ---------------------------------------------------------------------------


def test_shuffle_dataset_epochs():
    images, labels = _index_data(103)
    make = functools.partial(sampling.shuffle_dataset, images, labels, batch_size=10, seed=5)
    epoch0 = _collect(make(epoch=0))
    assert len(epoch0) == 10  # drop_remainder: 3 examples dropped.
    assert make(epoch=0).element_spec[0].shape == (10, 1, 1, 1)
    seen = np.concatenate([y for _, y, _ in epoch0])
    assert len(np.unique(seen)) == 100  # Each example at most once.
    assert all((w == 1.0).all() for _, _, w in epoch0)
    np.testing.assert_array_equal(seen, np.concatenate([y for _, y, _ in _collect(make(epoch=0))]))
    epoch1 = np.concatenate([y for _, y, _ in _collect(make(epoch=1))])
    assert not np.array_equal(seen, epoch1)
    everything = np.concatenate([y for _, y, _ in _collect(make(epoch=2, drop_remainder=False))])
    np.testing.assert_array_equal(np.sort(everything), labels)


def test_shuffle_physical_batches_are_the_pieces_of_the_logical_batch():
    # 103 examples in batches of 12: 103 // 12 = 8 logical batches (96 rows,
    # 7 dropped), each cut into k = 4 pieces of 3 rows: 32 pieces. Batching
    # all 103 rows by 3 would give 34, the last 2 from the dropped batch.
    images, labels = _index_data(103, shape=(2, 2, 3))
    make = functools.partial(
        sampling.shuffle_dataset, images, labels, batch_size=12, seed=5,
        preprocess=functools.partial(datasets.normalize, name="cifar10"))
    for epoch in (0, 1):
        whole, pieces = make(epoch=epoch), make(epoch=epoch, physical_batches=4)
        assert pieces.cardinality() == 32
        x_spec, y_spec, w_spec = pieces.element_spec
        assert x_spec.shape == (3, 2, 2, 3) and y_spec.shape == w_spec.shape == (3,)
        whole, pieces = _collect(whole), _collect(pieces)
        assert len(whole) == 8 and len(pieces) == 32
        for step, logical in enumerate(whole):
            own = pieces[4 * step:4 * step + 4]
            for part, joined in enumerate(zip(*own)):
                np.testing.assert_array_equal(np.concatenate(joined), logical[part])
        # Independently of the k = 1 path: 96 distinct examples, each row the
        # normalised image of its label, weights all 1.
        seen = np.concatenate([y for _, y, _ in pieces])
        assert len(np.unique(seen)) == 96
        x = np.concatenate([x for x, _, _ in pieces])
        np.testing.assert_allclose(x, datasets.normalize(images[seen], "cifar10"),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.concatenate([w for _, _, w in pieces]), 1.0)


@pytest.mark.parametrize("make, kwargs, message", [
    ("poisson", dict(physical_batches=0),
     "Expected physical_batches=0 to be a positive integer: the physical batches "
     "per logical batch."),
    ("poisson", dict(physical_batches=2.5), "Expected physical_batches=2.5 to be a "),
    ("poisson", dict(physical_batches=3),
     "Expected physical_batches=3 to divide padded_size=40. Take padded_size = "
     "padded_batch_size(..., multiple_of=rows) for the rows per physical batch, "
     "and physical_batches = padded_size // rows."),
    ("shuffle", dict(physical_batches=0), "Expected physical_batches=0 to be a "),
    ("shuffle", dict(physical_batches=5),
     "Expected physical_batches=5 to divide batch_size=12. Take a batch_size that "
     "is a multiple of the rows per physical batch, and physical_batches = "
     "batch_size // rows."),
    ("shuffle", dict(physical_batches=4, drop_remainder=False),
     "Expected drop_remainder=True with physical_batches=4: the last, partial "
     "batch cannot be cut into equal pieces. Pass drop_remainder=True or "
     "physical_batches=1."),
], ids=["poisson-zero", "poisson-fraction", "poisson-not-dividing", "shuffle-zero",
        "shuffle-not-dividing", "shuffle-partial-batch"])
def test_physical_batches_errors_name_the_fix(make, kwargs, message):
    images, labels = _index_data(100)
    if make == "poisson":
        make = functools.partial(sampling.poisson_dataset, expected_batch_size=20,
                                 steps=10, padded_size=40)
    else:
        make = functools.partial(sampling.shuffle_dataset, batch_size=12)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        make(images, labels, seed=0, **kwargs)


def test_test_dataset_covers_all_in_order():
    images, labels = _index_data(25)
    batches = _collect(sampling.test_dataset(images, labels, batch_size=10))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)
    np.testing.assert_array_equal(batches[0][0], images[:10].astype(np.float32))


