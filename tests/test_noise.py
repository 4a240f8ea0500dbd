"""The Gaussian noise sampler that carries the DP guarantee.

`tf_dpsat.noise` is our own Box-Muller transform of Philox bits, so its
distribution is tested here rather than trusted: its tails (the sampler must
reach at least 8 standard deviations), its moments, distribution function and
independence. Every bound is a number of standard errors of the statistic at
the sample size used, chosen so that a correct sampler fails with
probability < 1e-6 per check (5 standard errors for normal-approximation
statistics); the seeds are fixed, so the outcome is deterministic.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import special
from scipy import stats

from tf_dpsat import noise

N = 2**21  # samples per distribution check
ALL_ONES = 2**32 - 1


def draw(size, stddev=1.0, seed=(3, 4)):
    return noise.normal_samples(size, tf.constant(stddev),
                                tf.constant(seed, tf.int64)).numpy()


def pairs(z):
    """(r cos theta, r sin theta) of each pair, as two arrays."""
    half = z.size // 2
    return z[:half], z[half:2 * half]


def from_bits(high, low, angle):
    bits = tf.constant(np.array([high, low, angle], np.uint32).reshape(3, -1))
    return noise.normals_from_bits(bits).numpy()


@pytest.fixture(scope="module")
def z():
    return draw(N).astype(np.float64)


def test_extreme_bits_reach_the_tails():
    # All-zero radius words: u1 = 2^-65, r = sqrt(-2 ln 2^-65) = sqrt(130 ln 2)
    # = 9.4926; angle 0 puts it all on the cosine sample. An angle word of
    # 2^30 (top 24 bits 2^22: theta = 2 pi / 4) puts it on the sine sample.
    r = math.sqrt(130 * math.log(2))
    np.testing.assert_allclose(from_bits(0, 0, 0), [r, 0.0], rtol=1e-6)
    np.testing.assert_allclose(from_bits(0, 0, 2**30), [0.0, r],
                               rtol=1e-6, atol=1e-5)
    assert r >= 8 and noise.MAX_RADIUS == pytest.approx(r)
    # One set low bit: u1 = 1.5 * 2^-64, r = sqrt(-2 ln(1.5 * 2^-64)) = 9.3767.
    np.testing.assert_allclose(
        from_bits(0, 1, 0)[0], math.sqrt(-2 * math.log(1.5 * 2.0**-64)),
        rtol=1e-6)
    # A high word of 1: u1 ~ 2^-32, r = sqrt(64 ln 2) = 6.6604.
    np.testing.assert_allclose(from_bits(1, 0, 0)[0],
                               math.sqrt(64 * math.log(2)), rtol=1e-6)


def test_all_ones_is_finite_and_zero():
    # u1 = (2^64 - 1/2) / 2^64 rounds to 1 in float32 (and would round above
    # 1 without the cap): radius 0, never NaN.
    out = from_bits([ALL_ONES, ALL_ONES - 100], [ALL_ONES, 0],
                    [ALL_ONES, ALL_ONES])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 0.0, atol=1e-3)


def test_radius_is_monotone_in_the_bits():
    # Smaller uniforms give larger radii, across the high/low word boundary.
    highs = [0, 0, 0, 1, 2**8, 2**20, 2**31]
    lows = [0, 2**16, 2**31, 0, 0, 0, 0]
    radii = from_bits(highs, lows, [0] * 7)[:7]
    assert np.all(np.diff(radii) < 0)


def test_moments(z):
    # Standard errors of the sample mean, variance, skewness and excess
    # kurtosis of N(0, 1): 1/sqrt(n), sqrt(2/n), sqrt(6/n), sqrt(24/n).
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)


def test_distribution_function(z):
    # Kolmogorov-Smirnov: P(sqrt(n) D_n > 2.2) ~ 2 exp(-2 * 2.2^2) < 1e-4
    # (the asymptotic tail; at n = 2^21 it is exact to many digits).
    d = stats.kstest(z, "norm").statistic
    assert d < 2.2 / math.sqrt(z.size)


@pytest.mark.parametrize("t", [1.0, 2.0, 3.0, 4.0, 4.5, 5.0])
def test_tail_frequencies(z, t):
    # #{|z| > t} ~ Binomial(n, p), p = erfc(t / sqrt 2): within 5 standard
    # deviations (+1 for the discreteness at small n p; t = 4.5: n p ~ 14).
    p = special.erfc(t / math.sqrt(2))
    count = int(np.sum(np.abs(z) > t))
    assert abs(count - z.size * p) < 5 * math.sqrt(z.size * p * (1 - p)) + 1


def test_bounded_by_the_largest_radius(z):
    assert np.max(np.abs(z)) <= noise.MAX_RADIUS * (1 + 1e-6)


def test_pairs_and_neighbours_are_uncorrelated(z):
    # The two samples of one (u1, u2) pair (cos and sin) and their squares
    # must be uncorrelated, as must neighbours. Each correlation has
    # standard error ~ 1/sqrt(m) for m pairs.
    cos, sin = pairs(z)
    for a, b in [(cos, sin), (cos ** 2, sin ** 2),
                 (z[:-1], z[1:]), (cos[:-1], sin[1:])]:
        r = np.corrcoef(a, b)[0, 1]
        assert abs(r) < 5 / math.sqrt(a.size)


def test_matches_tensorflows_sampler_in_distribution(z):
    # Two-sample KS against tf.random.stateless_normal: the critical value
    # scales as sqrt((n + m) / (n m)); 2.2 is again a < 1e-4 tail.
    reference = tf.random.stateless_normal([N], [5, 6], alg="philox").numpy()
    d = stats.ks_2samp(z, reference.astype(np.float64)).statistic
    assert d < 2.2 * math.sqrt(2 / N)


def test_stddev_scales_and_seed_determines_the_draw():
    a = draw(1001, stddev=0.25, seed=(1, 2))
    b = draw(1001, stddev=1.0, seed=(1, 2))
    c = draw(1001, stddev=1.0, seed=(1, 3))
    d = draw(1001, stddev=1.0, seed=(2, 2))
    assert a.shape == (1001,) and a.dtype == np.float32
    np.testing.assert_allclose(a, 0.25 * b, rtol=1e-6)
    np.testing.assert_array_equal(b, draw(1001, seed=(1, 2)))
    assert not np.any(b == c) and not np.any(b == d)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_tiny_sizes(size):
    assert draw(size).shape == (size,)


@pytest.mark.parametrize("xla", [False, True])
def test_gaussian_noise_shapes_scale_and_independence(xla):
    like = [tf.zeros([300, 200]), tf.zeros([7]), tf.zeros([200, 300], tf.float16)]

    @tf.function(jit_compile=xla)
    def sample(seed):
        return noise.gaussian_noise(like, 0.5, seed)

    out = [t.numpy() for t in sample(tf.constant([8, 9], tf.int64))]
    assert [t.shape for t in out] == [(300, 200), (7,), (200, 300)]
    assert [t.dtype for t in out] == [np.float32, np.float32, np.float16]
    a, c = out[0].ravel().astype(np.float64), out[2].ravel().astype(np.float64)
    # 60,000 samples each: std within 5 x sqrt(1/(2n)) ~ 1.4% (float16
    # rounding adds < 0.05%); the two tensors' noise is uncorrelated.
    for t in (a, c):
        assert abs(t.std() / 0.5 - 1) < 5 * math.sqrt(1 / (2 * t.size)) + 1e-3
    assert abs(np.corrcoef(a, c)[0, 1]) < 5 / math.sqrt(a.size)


def test_one_sampler_whatever_the_compiler():
    # Graph mode, XLA and eager draw the same Philox bits and apply the same
    # transform; only the last bit of log/cos/sin may differ (float32 ulp
    # at |z| < 10 is < 1e-6).
    seed = tf.constant([11, 12], tf.int64)
    sample = lambda s: noise.normal_samples(4097, 1.0, s)  # noqa: E731
    eager = sample(seed).numpy()
    graph = tf.function(sample)(seed).numpy()
    xla = tf.function(sample, jit_compile=True)(seed).numpy()
    np.testing.assert_array_equal(eager, graph)
    np.testing.assert_allclose(xla, graph, rtol=0, atol=2e-6)
    assert np.std(graph) > 0.9


def test_streams_are_independent():
    seed = tf.constant([5, 6], tf.int64)
    like = [tf.zeros([50000])]
    a = noise.gaussian_noise(like, 1.0, noise.stream_seed(seed, 0))[0].numpy()
    b = noise.gaussian_noise(like, 1.0, noise.stream_seed(seed, 1))[0].numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)
