"""Shared pytest setup: quiet TensorFlow, 2 logical CPUs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over 2 logical CPUs for the whole session.

    Several strategy instances in one process can reuse collective instance
    keys and abort each other's all-reduces, so tests share this one.
    """
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs 2 logical CPU devices (configured in conftest.py)")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def pytest_collection_modifyitems(config, items):
    """Marks every test not marked `slow` as `quick` (`pytest -m quick`)."""
    del config
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)
