r"""Trains an image classifier with DP-SAT (or DP-SGD, DP-SAM, non-private SGD).

The defaults reproduce the DP-SAT authors' CIFAR-10 setup (Park et al., ICML
2023): DPNASNet, epsilon 3, delta 1e-5, 30 epochs, Poisson sampling with
expected batch 2000, SGD lr 2 momentum 0.9, clip norm 0.1, rho 0.03.

  python examples/train_cifar.py --epsilon=3 --model_dir=/tmp/dpsat_cifar
  python examples/train_cifar.py --dataset=fashion_mnist \
      --raw_data_dir=/usr/share/datasets/fashion-mnist --epsilon=2 --epochs=40
  python examples/train_cifar.py --dataset=digits --model=mlp --epochs=2 \
      --batch_size=100                                   # 10-second smoke run

All logic lives in `tf_dpsat.experiments.training`; this file only parses flags.
Needs the experiment kit's extra: `pip install "tf_dpsat[experiments]"`.
"""

import contextlib
import os
import re
import sys
import tempfile

from absl import app
from absl import flags

# What TensorFlow's native libraries print while they load: absl's notice that
# logging is not initialised yet, and INFO lines ("I0000 00:00:... port.cc:153]").
_NATIVE_START_UP_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} \S+ +\d+ \S+:\d+\] ")


@contextlib.contextmanager
def _quiet_native_start_up():
    """Keeps TensorFlow's native start-up INFO lines off the console.

    TF_CPP_MIN_LOG_LEVEL filters TensorFlow's C++ logging once it runs, so it
    is set here, before TensorFlow is first imported. Level 2 hides INFO and
    WARNING (the CPU-feature banner); on a machine without an NVIDIA driver,
    level 3 also hides the CUDA platform's failed cuInit, an ERROR line that
    only says there is no GPU. But while they load, TensorFlow's shared
    libraries log through absl before absl logging is initialised, which
    writes everything to stderr whatever the level says, once per library:
    inside this block stderr goes to a file, and on leaving it everything but
    those INFO lines is written back. A user's own TF_CPP_MIN_LOG_LEVEL wins
    and disables both.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        yield
        return
    has_nvidia_driver = os.path.exists("/proc/driver/nvidia")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if has_nvidia_driver else "3"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            sys.stderr.writelines(line for line in text.splitlines(keepends=True)
                                  if not _NATIVE_START_UP_LINE.match(line))
            sys.stderr.flush()


with _quiet_native_start_up():
    try:
        from tf_dpsat import validation
        from tf_dpsat.experiments import datasets
        from tf_dpsat.experiments import training
    except ImportError:  # Run from a source checkout without `pip install -e .`.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tf_dpsat import validation
        from tf_dpsat.experiments import datasets
        from tf_dpsat.experiments import training

training.define_flags()
# The flags are defined in tf_dpsat.experiments.training: make them this binary's key flags
# so that --help lists them (not only --helpfull).
flags.adopt_module_key_flags(training)

# Exit status of a user error (a bad flag, a model_dir of another run, a
# corrupt data file), printed as one `error: ...` line without a traceback.
USER_ERROR_STATUS = 2


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)


def main(argv):
    if len(argv) > 1:
        _fail(f"Unexpected arguments: {' '.join(argv[1:])}; every option is a "
              "--flag (see --help).")
    try:
        config = training.config_from_flags(flags.FLAGS)
    except ValueError as error:  # Flag values only: all user errors.
        _fail(str(error))
    try:
        training.train(config)
    except (validation.UserError, datasets.DatasetNotAvailableError) as error:
        _fail(str(error))


if __name__ == "__main__":
    app.run(main)
