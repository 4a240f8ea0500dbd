r"""Times the per-parameter work of a DP step alone: noise, update, perturbation.

Each variant is one `tf.function` over the variables of a benchmark model
(default: the Dense MLP, 269,322 weights in six tensors), called repeatedly;
the median wall time per call includes the call's overhead (~0.1 ms), which
every variant pays once. Variants:

  tf_ops_noisy_mean         (sum + noise) / B with TensorFlow's ops
  native_noisy_mean         the same with the DpsatNoisyMean kernel
  native_noisy_mean+sgd_ops that, then SGD with momentum by TensorFlow ops
                            (what update_step does without the fused kernel)
  native_noisy_sgd          DpsatNoisySgd: noise and SGD update, one op per
                            variable
  tf_ops_perturb            w + rho d / (||d|| + 1e-16) with TensorFlow's ops
  native_perturb            the same with the DpsatPerturb kernel

Usage (after `python -m tf_dpsat.native`):

  python -m benchmarks.noise_kernels --output_json=/tmp/kernels.json
"""

import json
import statistics
import time
from typing import Callable, Dict

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from benchmarks import step_time
from tf_dpsat import clipping
from tf_dpsat import native

_MODEL = flags.DEFINE_string("model", "mlp", "A model of benchmarks.step_time.")
_CALLS = flags.DEFINE_integer("calls", 500, "Timed calls per variant.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the report.")

SEED = tf.constant([1, 2], tf.int64)
STDDEV, DIVISOR, LEARNING_RATE, MOMENTUM, RHO = 0.1, 256.0, 0.1, 0.9, 0.05


def _sgd_ops(grads, params, velocities):
    """update_step's momentum SGD with TensorFlow's ops."""
    new_v = [v * MOMENTUM - g * LEARNING_RATE for g, v in zip(grads, velocities)]
    return [p + v for p, v in zip(params, new_v)], new_v


def variants(shapes) -> Dict[str, Callable]:
    """The timed functions, each traced with or without the kernels."""
    rng = np.random.default_rng(0)
    sums, params, velocities = (
        [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
        for _ in range(3))
    offsets = native.chunk_offsets([int(np.prod(s)) for s in shapes])

    def noisy_mean():
        return clipping.noisy_mean(sums, STDDEV, SEED, 0, DIVISOR)

    def noisy_mean_then_sgd():
        return _sgd_ops(noisy_mean(), params, velocities)

    def noisy_sgd():
        return [native.noisy_sgd(s, p, v, seed=SEED, stream=0, first_chunk=o,
                                 stddev=STDDEV, divisor=DIVISOR,
                                 learning_rate=LEARNING_RATE,
                                 momentum=MOMENTUM, nesterov=False)
                for s, p, v, o in zip(sums, params, velocities, offsets)]

    def perturb():
        return clipping.perturbed(params, velocities, RHO)

    table = {}
    for name, fn, use_kernels in (
            ("tf_ops_noisy_mean", noisy_mean, False),
            ("native_noisy_mean", noisy_mean, True),
            ("native_noisy_mean+sgd_ops", noisy_mean_then_sgd, True),
            ("native_noisy_sgd", noisy_sgd, True),
            ("tf_ops_perturb", perturb, False),
            ("native_perturb", perturb, True)):
        with native.enabled(use_kernels):
            traced = tf.function(fn).get_concrete_function()
        ops = {op.type for op in traced.graph.get_operations()}
        if use_kernels != any(op.startswith("Dpsat") for op in ops):
            raise RuntimeError(f"{name}: the native kernels were "
                               f"{'not ' if use_kernels else ''}used; build "
                               "them with `python -m tf_dpsat.native`.")
        table[name] = traced
    return table


def time_calls(fn: Callable, calls: int) -> float:
    """Median wall time of one call, in ms (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn()
        tf.nest.flatten(out)[0].numpy()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv):
    del argv
    model = step_time.MODEL_SPECS[_MODEL.value].build(0)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    size = sum(int(np.prod(s)) for s in shapes)
    logging.info("%s: %d weights in %d tensors", _MODEL.value, size,
                 len(shapes))
    report = {"model": _MODEL.value, "weights": size, "calls": _CALLS.value,
              "library": str(native.find_library()), "median_ms": {}}
    for name, fn in variants(shapes).items():
        report["median_ms"][name] = round(time_calls(fn, _CALLS.value), 4)
        print(f"{name:28s} {report['median_ms'][name]:.3f} ms/call")
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(report, f, indent=1)
        logging.info("wrote %s", _OUTPUT.value)


if __name__ == "__main__":
    app.run(main)
