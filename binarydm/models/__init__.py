"""UNet presets (``diffusers.UNet2DModel``), pretrained-model loading, teacher cache keys
and the sha256 of a model's weights.

Imports torch and diffusers only (never ray, mlflow, optuna); FP teacher
pretraining lives with the training layer on top.
"""

from binarydm.models._loading import (
    ModelLoadError,
    load_unet,
    teacher_cache_key,
    teacher_dir,
    weights_file,
    weights_sha256,
)
from binarydm.models._presets import (
    PRESETS,
    build_unet,
    count_parameters,
    preset_config,
    resolution_levels,
)

__all__ = [
    "PRESETS",
    "ModelLoadError",
    "build_unet",
    "count_parameters",
    "load_unet",
    "preset_config",
    "resolution_levels",
    "teacher_cache_key",
    "teacher_dir",
    "weights_file",
    "weights_sha256",
]
