"""Packaging for tf_dpsat: `pip install -e ".[experiments,test]"` for development.

`pip install tf_dpsat` installs the core only (make_private, DPSATKeras,
accounting, sampling); the "experiments" extra adds what the binary
examples/train_cifar.py and tf_dpsat.experiments need.

The version lives only in tf_dpsat/version.py; it is read here as text so that
installing does not import TensorFlow.
"""

import pathlib
import re

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent


def read_version() -> str:
    """The `__version__` string of tf_dpsat/version.py."""
    text = (HERE / "tf_dpsat" / "version.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("No __version__ in tf_dpsat/version.py.")
    return match.group(1)


# Ranges measured to work on Python 3.11. The core (tf_dpsat and its
# subpackages other than tf_dpsat.experiments) needs only these.
# tensorflow-privacy is deliberately absent: accounting uses dp-accounting
# directly. scipy: the binomial tail of tf_dpsat.sampling.padded_batch_size and
# the audit's confidence bounds.
INSTALL_REQUIRES = [
    "tensorflow>=2.16,<2.22",
    "keras>=3.5,<4",
    "dp-accounting>=0.6",
    "absl-py>=1.4",
    "numpy>=1.23",
    "scipy>=1.7",
]

EXTRAS_REQUIRE = {
    # The experiment kit, tf_dpsat.experiments: the binary
    # examples/train_cifar.py, its datasets, reference models and reports.
    "experiments": [
        "tensorflow-datasets>=4.9.4",
        # tensorflow-datasets needs it for its builders but does not declare it.
        "importlib_resources",
        # TensorBoard logs of the binary (not a dependency of tensorflow
        # itself since 2.16).
        "tensorboard>=2.16,<2.22",
        # The accuracy / epsilon plot of the binary.
        "matplotlib>=3.5",
        # The offline "digits" dataset (also what tf_dpsat.audit trains on).
        "scikit-learn>=1.0",
    ],
    "test": [
        "pytest>=7",
        # The linter .ci/run runs (rules in ruff.toml).
        "ruff>=0.15,<0.18",
    ],
}

setup(
    name="tf_dpsat",
    version=read_version(),
    description=("Differentially private sharpness-aware training (DP-SAT) for "
                 "TensorFlow 2 / Keras 3"),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_dpsat", "tf_dpsat.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
)
