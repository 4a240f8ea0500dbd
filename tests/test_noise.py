"""The Gaussian noise samplers that carry the DP guarantee.

`clipping.normal_samples` (TensorFlow ops) and the fused kernel of
`tf_dpsat.native` are our own Box-Muller transforms of Philox uniforms, so
their distributions are tested here rather than trusted; every check runs
for both. Every bound is a
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
CHUNK = 1024  # values per chunk of the native kernel


class Sampler:
    """One way of drawing N(0, stddev^2) samples, and where its pairs are."""

    def __init__(self, name, kernel=None):
        self.name, self.kernel = name, kernel
        # Uniform bits behind u1: |z| <= sqrt(2 ln 2^bits).
        self.bits = 23 if kernel is None else 24

    def draw(self, size, stddev=1.0, seed=(3, 4)):
        seed = tf.constant(seed, tf.int64)
        if self.kernel is None:
            return clipping.normal_samples(size, tf.constant(stddev),
                                           seed).numpy()
        return self.kernel.dpsat_noisy_mean([tf.zeros([size])], seed, 0,
                                            stddev, 1.0)[0].numpy()

    def pairs(self, z):
        """(r cos theta, r sin theta) of each (u1, u2), as two arrays."""
        if self.kernel is None:
            half = z.size // 2
            return z[:half], z[half:2 * half]
        chunks = z[:z.size // CHUNK * CHUNK].reshape(-1, 2, CHUNK // 2)
        return chunks[:, 0].ravel(), chunks[:, 1].ravel()


@pytest.fixture(scope="module", params=["ops", "native"])
def sampler(request):
    if request.param == "ops":
        return Sampler("ops")
    return Sampler("native", request.getfixturevalue("native_kernel"))


@pytest.fixture(scope="module")
def z(sampler):
    return sampler.draw(N).astype(np.float64)


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


def test_bounded_like_tensorflows_sampler(sampler, z):
    # b-bit uniforms: u1 >= 2^-b, so |z| <= sqrt(2 ln 2^b): 5.6462 for the
    # ops' 23 bits, 5.7683 for the kernel's 24; tf.random.stateless_normal
    # (u1 >= 1e-7) is bounded by 5.6777.
    bound = math.sqrt(2 * sampler.bits * math.log(2))
    assert np.max(np.abs(z)) <= bound * (1 + 1e-6)


def test_pairs_and_neighbours_are_uncorrelated(sampler, z):
    # The two samples of one (u1, u2) pair (cos and sin) and their squares
    # must be uncorrelated, as must neighbours. Each correlation has
    # standard error ~ 1/sqrt(m) for m pairs.
    cos, sin = sampler.pairs(z)
    pairs = [(cos, sin), (cos ** 2, sin ** 2),
             (z[:-1], z[1:]), (cos[:-1], sin[1:])]
    for a, b in pairs:
        r = np.corrcoef(a, b)[0, 1]
        assert abs(r) < 5 / math.sqrt(a.size)


def test_matches_tensorflows_sampler_in_distribution(z):
    # Two-sample KS against tf.random.stateless_normal: the critical value
    # scales as sqrt((n + m) / (n m)); 2.2 is again a < 1e-4 tail.
    reference = tf.random.stateless_normal([N], [5, 6], alg="philox").numpy()
    d = stats.ks_2samp(z, reference.astype(np.float64)).statistic
    assert d < 2.2 * math.sqrt(2 / N)


def test_stddev_scales_and_seed_determines_the_draw(sampler):
    a = sampler.draw(1001, stddev=0.25, seed=(1, 2))
    b = sampler.draw(1001, stddev=1.0, seed=(1, 2))
    c = sampler.draw(1001, stddev=1.0, seed=(1, 3))
    d = sampler.draw(1001, stddev=1.0, seed=(2, 2))
    assert a.shape == (1001,) and a.dtype == np.float32
    np.testing.assert_allclose(a, 0.25 * b, rtol=1e-6)
    np.testing.assert_array_equal(b, sampler.draw(1001, seed=(1, 2)))
    assert not np.any(b == c) and not np.any(b == d)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_tiny_sizes(sampler, size):
    assert sampler.draw(size).shape == (size,)


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
