"""tf_dpsat: differentially private sharpness-aware training (DP-SAT) for Keras 3."""

from tf_dpsat.version import __version__
