"""The Gaussian noise sampler that carries the DP guarantee.

`clipping.normal_samples` is our own Box-Muller transform of Philox uniforms,
so its distribution is tested here rather than trusted. Every bound is a
number of standard errors of the statistic at the sample size used, chosen
so that a correct sampler fails with probability < 1e-6 per check (5
standard errors for normal-approximation statistics); the seeds are fixed,
so the outcome is deterministic.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import special, stats

from tf_dpsat import clipping

N = 2**21  # samples per distribution check


def draw(size, stddev=1.0, seed=(3, 4)):
    return clipping.normal_samples(
        size, tf.constant(stddev), tf.constant(seed, tf.int64)).numpy()


@pytest.fixture(scope="module")
def z():
    return draw(N).astype(np.float64)


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


@pytest.mark.parametrize("t", [1.0, 2.0, 3.0, 4.0, 4.5])
def test_tail_frequencies(z, t):
    # #{|z| > t} ~ Binomial(n, p), p = erfc(t / sqrt 2): within 5 standard
    # deviations (+1 for the discreteness at small n p; t = 4.5: n p ~ 14).
    p = special.erfc(t / math.sqrt(2))
    count = int(np.sum(np.abs(z) > t))
    assert abs(count - z.size * p) < 5 * math.sqrt(z.size * p * (1 - p)) + 1


def test_bounded_like_tensorflows_sampler(z):
    # 23-bit uniforms: u1 >= 2^-23, so |z| <= sqrt(2 ln 2^23) = 5.6462;
    # tf.random.stateless_normal (u1 >= 1e-7) is bounded by 5.6777.
    assert np.max(np.abs(z)) <= math.sqrt(2 * 23 * math.log(2)) * (1 + 1e-6)


def test_pairs_and_neighbours_are_uncorrelated(z):
    # Sample i and i + n/2 come from one (u1, u2) pair (cos and sin); they
    # and their squares must be uncorrelated, as must neighbours. Each
    # correlation has standard error ~ 1/sqrt(m) for m pairs.
    half = z.size // 2
    pairs = [(z[:half], z[half:]), (z[:half] ** 2, z[half:] ** 2),
             (z[:-1], z[1:]), (z[:half - 1], z[half + 1:])]
    for a, b in pairs:
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
    assert a.shape == (1001,) and a.dtype == np.float32
    np.testing.assert_allclose(a, 0.25 * b, rtol=1e-6)
    np.testing.assert_array_equal(b, draw(1001, seed=(1, 2)))
    assert not np.any(b == c)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_tiny_sizes(size):
    assert draw(size).shape == (size,)


@pytest.mark.parametrize("xla", [False, True])
def test_gaussian_noise_shapes_scale_and_independence(xla):
    like = [tf.zeros([300, 200]), tf.zeros([7]), tf.zeros([200, 300], tf.float16)]

    @tf.function(jit_compile=xla)
    def noise(seed):
        assert clipping.compiled_by_xla() == xla  # picks the sampler
        return clipping.gaussian_noise(like, 0.5, seed)

    out = [t.numpy() for t in noise(tf.constant([8, 9], tf.int64))]
    assert [t.shape for t in out] == [(300, 200), (7,), (200, 300)]
    assert [t.dtype for t in out] == [np.float32, np.float32, np.float16]
    a, c = out[0].ravel().astype(np.float64), out[2].ravel().astype(np.float64)
    # 60,000 samples each: std within 5 x sqrt(1/(2n)) ~ 1.4% (float16
    # rounding adds < 0.05%); the two tensors' noise is uncorrelated.
    for t in (a, c):
        assert abs(t.std() / 0.5 - 1) < 5 * math.sqrt(1 / (2 * t.size)) + 1e-3
    assert abs(np.corrcoef(a, c)[0, 1]) < 5 / math.sqrt(a.size)
