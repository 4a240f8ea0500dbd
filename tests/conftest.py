"""Shared pytest setup: quiet TensorFlow, deterministic ops, 2 logical CPUs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import tensorflow as tf  # noqa: E402

# Two logical CPU devices so tf.distribute tests can run on one CPU. This must
# happen before TensorFlow initialises its devices, i.e. before any test runs.
_cpus = tf.config.list_physical_devices("CPU")
if _cpus:
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:  # Devices already initialised by an earlier import.
        pass
