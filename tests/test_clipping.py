"""Small pure functions of tf_dpsat.per_example.clip not covered elsewhere."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dpsat import _compat
from tf_dpsat.per_example import clip


@pytest.mark.parametrize("jit", [False, True])
def test_sum_of_squares_and_nonfinite_propagation(jit):
    # Rows: (3, 4) -> 25; zeros -> 0; Inf -> Inf; NaN -> NaN; Inf next to
    # a zero row stays Inf. Graph mode uses the EuclideanNorm kernel, XLA a
    # square and a sum; the fast path's masking shortcut relies on every
    # non-finite value reaching the norm.
    x = np.array([[3, 4, 0], [0, 0, 0], [1, np.inf, 2], [np.nan, 1, 1],
                  [0, 0, -np.inf]], np.float32)

    @tf.function(jit_compile=jit)
    def f(t):
        assert _compat.compiled_by_xla() == jit
        return clip.sum_of_squares(t, 1), clip.sum_of_squares(t[:2])

    rows, total = f(tf.constant(x))
    np.testing.assert_array_equal(rows.numpy()[:2], [25.0, 0.0])
    assert np.isposinf(rows.numpy()[2]) and np.isnan(rows.numpy()[3])
    assert np.isposinf(rows.numpy()[4])
    assert float(total) == 25.0


def test_global_norm_golden():
    # ||(3, 4)|| combined with ||(12,)||: sqrt(9 + 16 + 144) = 13.
    assert float(clip.global_norm([tf.constant([3.0, 4.0]),
                                       tf.constant([[12.0]])])) == 13.0
