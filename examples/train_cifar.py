r"""Trains an image classifier with DP-SAT (or DP-SGD, DP-SAM, non-private SGD).

The defaults reproduce the DP-SAT authors' CIFAR-10 setup (Park et al., ICML
2023): DPNASNet, epsilon 3, delta 1e-5, 30 epochs, Poisson sampling with
expected batch 2000, SGD lr 2 momentum 0.9, clip norm 0.1, rho 0.03.

  python examples/train_cifar.py --epsilon=3 --model_dir=/tmp/dpsat_cifar
  python examples/train_cifar.py --dataset=fashion_mnist \
      --raw_data_dir=/usr/share/datasets/fashion-mnist --epsilon=2 --epochs=40
  python examples/train_cifar.py --dataset=digits --model=mlp --epochs=2 \
      --batch_size=100                                   # 10-second smoke run

All logic lives in `tf_dpsat.training`; this file only parses flags.
"""

import os
import sys

from absl import app
from absl import flags

try:
    from tf_dpsat import data
    from tf_dpsat import training
    from tf_dpsat import validation
except ImportError:  # Run from a source checkout without `pip install -e .`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_dpsat import data
    from tf_dpsat import training
    from tf_dpsat import validation

training.define_flags()
# The flags are defined in tf_dpsat.training: make them this binary's key flags
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
    except (validation.UserError, data.DatasetNotAvailableError) as error:
        _fail(str(error))


if __name__ == "__main__":
    app.run(main)
