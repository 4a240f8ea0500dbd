"""tf_dpsat: differentially private sharpness-aware training (DP-SAT) for Keras 3."""

from tf_dpsat.version import __version__
from tf_dpsat.dp_model import DPFunctional
from tf_dpsat.dp_model import DPModel
from tf_dpsat.dp_model import DPSequential
from tf_dpsat.dp_model import make_private
from tf_dpsat.optimizer import DPSAMKeras
from tf_dpsat.optimizer import DPSATKeras
