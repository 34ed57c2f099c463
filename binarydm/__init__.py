"""binarydm: BinaryDM 1-bit weight QAT for diffusers UNets, and the platform that searches it.

The method (``binarize_``, ``BinaryDMConfig``) imports torch and diffusers only;
the platform layers (train, search, tracking, cli) sit on top and import Ray,
Optuna and MLflow lazily.
"""

from binarydm.quant import BinaryDMConfig, binarize_

__version__ = "0.1.0"
__all__ = ["BinaryDMConfig", "__version__", "binarize_"]
