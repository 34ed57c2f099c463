"""Weight binarizers, LSQ and LSQ+ quantizers, quantized layers and the ``binarize_`` verb.

Imports torch and diffusers only (never ray, mlflow, optuna).
"""

from binarydm._typed import ConfigError
from binarydm.quant.apply import (
    binarize_,
    ebb_penalty,
    level_of,
    num_levels,
    stage_of,
    use_composed_quantizers_,
)
from binarydm.quant.attention import QuantAttnProcessor
from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.config import (
    ActivationQuantConfig,
    BinaryDMConfig,
    EBBConfig,
    LRMConfig,
    ProgressiveConfig,
    WeightQuantConfig,
)
from binarydm.quant.layers import QuantConv2d, QuantLinear, QuantMixin, quant_layers
from binarydm.quant.lsq import LSQQuantizer
from binarydm.quant.lsq_plus import LSQPlusQuantizer
from binarydm.quant.ste import sign_pm1, sign_ste

__all__ = [
    "ActivationQuantConfig",
    "BinaryDMConfig",
    "ConfigError",
    "EBBConfig",
    "LRMConfig",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "MultiBasisBinarizer",
    "ProgressiveConfig",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLinear",
    "QuantMixin",
    "WeightQuantConfig",
    "binarize_",
    "ebb_penalty",
    "level_of",
    "num_levels",
    "quant_layers",
    "sign_pm1",
    "sign_ste",
    "stage_of",
    "use_composed_quantizers_",
]
