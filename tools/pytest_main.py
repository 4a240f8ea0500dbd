"""Bazel entry point of every py_test: runs pytest on the files it is given.

Why: the tests are pytest modules, which do nothing when run as scripts. The
interpreter's import path (Bazel puts each pip dependency in its own
directory) is also exported as PYTHONPATH, so the tests that start a fresh
Python (`python -m tf_dpsat.accounting`, examples/train_cifar.py) can import
the same packages as the test itself.
"""

import os
import sys

import pytest


def main(argv):
    """Runs pytest quietly on argv[1:]; returns its exit status."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return int(pytest.main(["-q", "-p", "no:cacheprovider", *argv[1:]]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
