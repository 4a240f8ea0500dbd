"""The Gaussian noise of the DP mechanism: one sampler for every mode.

DP-SGD's guarantee is that of the Gaussian mechanism, so the noise must
follow N(0, sigma^2 C^2) closely in the tails too: a sampler whose support
ends at k standard deviations gives an output that one dataset can produce
and its neighbour cannot, with probability about P(|z| > k - 1/sigma) per
step, which lands directly in delta. TensorFlow's float32 normal sampler
ends at about 5.7 standard deviations. This one ends at 9.49:

  * Philox (stateless, keyed by the optimizer's secret key) gives three
    32-bit words per pair of normals;
  * two of them form a 64-bit uniform u1 = (w + 1/2) / 2^64, so
    2^-65 <= u1 <= 1. It is held in float32, whose 24 significant bits at
    any exponent keep the small values that make the tails, and the
    Box-Muller radius r = sqrt(-2 ln u1) reaches sqrt(130 ln 2) = 9.49;
  * the third gives the angle theta (24 bits); the pair is
    (r cos theta, r sin theta).

Relative to the ideal Gaussian, a pair is cut off only when its radius
exceeds 9.49, an event of probability exp(-9.49^2 / 2) = 2^-65 (at most
2^-64 allowing for the rounding of u1); `tf_dpsat.accounting` adds that mass
to delta. (TensorFlow's sampler spends two words per pair; the third is the
price of the tails.) The same ops run in graph mode, under XLA and on every
replica of a tf.distribute strategy (Philox bits are identical across them;
the transcendental functions may differ in the last bit), so a run's noise
does not depend on how it was compiled.

The noise is a pure function of a stateless seed: reproducible when the seed
is known, which is why the optimizer keeps its key secret (see
`tf_dpsat.DPSATKeras`).

Reference: Box and Muller, "A Note on the Generation of Random Normal
Deviates", Ann. Math. Statist. 29(2), 1958. Floating-point samplers are not
exact Gaussians (Mironov, "On significance of the least significant bits for
differential privacy", CCS 2012); see the README's privacy model.
"""

import math
import os
from typing import Sequence

import tensorflow as tf

# Philox, named explicitly: "auto_select" picks ThreeFry under XLA on CPU,
# a different stream (and a slower one there).
RNG_ALGORITHM = "philox"
# The largest radius the sampler can produce, sqrt(-2 ln 2^-65), in
# standard deviations; a pair's radius exceeds it with probability 2^-65.
MAX_RADIUS = math.sqrt(130.0 * math.log(2.0))
# Upper bound on the probability, under the ideal Gaussian, that one pair of
# samples falls beyond the sampler's support (see the module docstring).
TAIL_MASS_PER_PAIR = 2.0**-64


def secret_key() -> int:
    """A fresh secret from OS entropy, uniform on [0, 2**63).

    The default key of everything the guarantee relies on (the noise, the
    batch sampling): never derived from a seed anyone could know.
    """
    return int.from_bytes(os.urandom(8), "little") >> 1


def normals_from_bits(bits: tf.Tensor) -> tf.Tensor:
    """Standard normals from uniform random bits, by Box-Muller.

    Args:
      bits: uint32 [3, m]: rows 0 and 1 are the high and low words of the
        64-bit uniform behind each radius, row 2 gives the angles.

    Returns:
      float32 [2 * m]: the m cosine samples, then the m sine samples.
    """
    high, low = tf.cast(bits[0], tf.float32), tf.cast(bits[1], tf.float32)
    # u1 = (high * 2^32 + low + 1/2) / 2^64. float32 keeps 24 significant
    # bits at any magnitude, so the smallest u1, 2^-65, and with it the
    # largest radius survive, and the logarithm keeps float32's relative
    # precision. Rounding can carry u1 just above 1 (high words within 2^7
    # of 2^32); capped at 1, their radius is 0, never NaN.
    u1 = tf.minimum((high + (low + 0.5) * 2.0**-32) * 2.0**-32, 1.0)
    radius = tf.sqrt(-2.0 * tf.math.log(u1))
    # The top 24 bits of the third word fill a float32 in [0, 1) exactly.
    top = tf.bitwise.right_shift(bits[2], tf.constant(8, tf.uint32))
    angle = tf.cast(top, tf.float32) * (2.0 * math.pi * 2.0**-24)
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)


def normal_samples(size: int, stddev, seed: tf.Tensor) -> tf.Tensor:
    """`size` independent N(0, stddev^2) float32 samples.

    Args:
      size: number of samples (a Python int).
      stddev: scalar standard deviation.
      seed: int64 [2] stateless Philox seed; the samples are a pure function
        of it.

    Returns:
      A float32 vector of length `size`.
    """
    half = max((size + 1) // 2, 1)
    bits = tf.random.stateless_uniform([3, half], seed, minval=None,
                                       maxval=None, dtype=tf.uint32,
                                       alg=RNG_ALGORITHM)
    samples = normals_from_bits(bits) * tf.cast(stddev, tf.float32)
    return samples[:size] if size != 2 * half else samples


def gaussian_noise(like: Sequence[tf.Tensor], stddev,
                   seed: tf.Tensor) -> list:
    """Independent N(0, stddev^2) noise shaped like each tensor of `like`.

    One draw covers all tensors and is split among them: fewer, larger ops
    (on CPU the per-op cost of many small draws adds up).

    Args:
      like: tensors with static shapes, giving shapes and dtypes.
      stddev: scalar standard deviation.
      seed: int64 [2] stateless seed.

    Returns:
      A list of noise tensors.
    """
    sizes = [int(t.shape.num_elements()) for t in like]
    flat = tf.split(normal_samples(sum(sizes), stddev, seed), sizes)
    return [tf.cast(tf.reshape(z, t.shape), t.dtype)
            for z, t in zip(flat, like)]


def stream_seed(seed: tf.Tensor, stream) -> tf.Tensor:
    """The seed of one stream of `seed`; distinct streams are independent.

    Args:
      seed: int64 [2] stateless seed.
      stream: int in [0, 2^32) or an int64 scalar tensor.

    Returns:
      int64 [2].
    """
    return tf.random.experimental.stateless_fold_in(
        seed, tf.cast(stream, tf.int64), alg=RNG_ALGORITHM)


def noisy_mean(sums: Sequence[tf.Tensor], stddev, seed: tf.Tensor, stream,
               divisor) -> list:
    """(sums[i] + N(0, stddev^2 I)) / divisor: the released DP gradient.

    Args:
      sums: clipped sums, one tensor per variable (static shapes).
      stddev: scalar standard deviation of the noise (sigma * C).
      seed: int64 [2] stateless seed.
      stream: the stream of `seed` to draw from (see `stream_seed`).
      divisor: scalar, the (expected) batch size in units.

    Returns:
      One tensor per variable.
    """
    noise = gaussian_noise(sums, stddev, stream_seed(seed, stream))
    return [(s + z) / tf.cast(divisor, s.dtype) for s, z in zip(sums, noise)]
