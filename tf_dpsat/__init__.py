"""tf_dpsat: differentially private sharpness-aware training (DP-SAT) for Keras 3.

    model = tf_dpsat.make_private(keras_model)
    model.compile(optimizer=tf_dpsat.DPSATKeras(noise_multiplier=1.1, ...),
                  loss=..., metrics=["accuracy"])
    model.fit(train, callbacks=[tf_dpsat.PrivacyCallback(num_examples=N)])

Poisson-sampled batches for the fit come from `tf_dpsat.sampling`. The
experiment kit (the binary's pipeline, datasets, reference models, reports)
is `tf_dpsat.experiments`, with its own extra:
`pip install "tf_dpsat[experiments]"`.

Reference: Park, Kim, Choi, Lee. "Differentially Private Sharpness-Aware
Training". ICML 2023. https://arxiv.org/abs/2306.05651
"""

from tf_dpsat import accounting
from tf_dpsat import distributed
from tf_dpsat import noise
from tf_dpsat import per_example
from tf_dpsat import sampling
from tf_dpsat import sharpness
from tf_dpsat.callbacks import PrivacyCallback
from tf_dpsat.dp_model import DPFunctional
from tf_dpsat.dp_model import DPModel
from tf_dpsat.dp_model import DPSequential
from tf_dpsat.dp_model import make_private
from tf_dpsat.optimizer import DPSAMKeras
from tf_dpsat.optimizer import DPSATKeras
from tf_dpsat.version import __version__

__all__ = [
    "DPFunctional",
    "DPModel",
    "DPSAMKeras",
    "DPSATKeras",
    "DPSequential",
    "PrivacyCallback",
    "__version__",
    "accounting",
    "distributed",
    "make_private",
    "noise",
    "per_example",
    "sampling",
    "sharpness",
]
