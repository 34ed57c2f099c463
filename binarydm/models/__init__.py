"""UNet presets (``diffusers.UNet2DModel``), pretrained-model loading and teacher cache keys.

Imports torch and diffusers only (never ray, mlflow, optuna); FP teacher
pretraining lives with the training layer on top.
"""

from binarydm.models._loading import ModelLoadError, load_unet, teacher_cache_key, teacher_dir
from binarydm.models._presets import PRESETS, build_unet, count_parameters, preset_config

__all__ = [
    "PRESETS",
    "ModelLoadError",
    "build_unet",
    "count_parameters",
    "load_unet",
    "preset_config",
    "teacher_cache_key",
    "teacher_dir",
]
