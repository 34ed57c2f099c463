"""Loading pretrained FP UNets (local directory or Hugging Face Hub) and naming teacher caches.

A teacher pretrained by the platform is cached under ``<cache_dir>/teachers/<key>``,
where the key hashes everything that determines its weights, so trials of a study
(and later studies) reuse one teacher instead of each training its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel
from huggingface_hub import constants as hub_constants

from binarydm.data import cache_dir as resolve_cache_dir
from binarydm.models._presets import PRESETS

_TEACHER_KEY_VERSION = 1  # bump when teacher training changes what a key's weights are


class ModelLoadError(OSError):
    """No ``UNet2DModel`` could be loaded; the message lists every location tried and why."""


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later setting too.
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return hub_constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def _attempts(path_or_hub_id: str, subfolder: str | None) -> tuple[str, list[str | None]]:
    local = Path(path_or_hub_id).expanduser()
    if not local.exists():
        return path_or_hub_id, [subfolder] if subfolder is not None else [None, "unet"]
    if not local.is_dir():
        raise ModelLoadError(f"{local} is a file; pass the directory written by save_pretrained")
    if subfolder is not None:
        return str(local.resolve()), [subfolder]
    # A pipeline directory keeps the UNet in unet/, a saved model at the top.
    top = (local / "config.json").is_file()
    return str(local.resolve()), [None] if top else ["unet"]


def load_unet(
    path_or_hub_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    local_files_only: bool | None = None,
) -> UNet2DModel:
    """``UNet2DModel.from_pretrained`` of a local directory or hub id (or its ``unet/``).

    ``local_files_only`` defaults to offline mode (``HF_HUB_OFFLINE``), so offline a
    model missing from the local Hugging Face cache fails at once with ``ModelLoadError``.
    """
    offline = _hub_offline() if local_files_only is None else local_files_only
    target, subfolders = _attempts(str(path_or_hub_id), subfolder)
    failures, last_error = [], None
    for sub in subfolders:
        try:
            with warnings.catch_warnings():
                # diffusers itself passes hf_hub_download a deprecated argument; not actionable.
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                return UNet2DModel.from_pretrained(
                    target, subfolder=sub, local_files_only=offline, low_cpu_mem_usage=False
                )
        # Hub, HTTP-client and file errors share no base class; each is reported below.
        except Exception as error:
            location = f"{target} (subfolder {sub!r})" if sub else target
            failures.append(f"{location}: {str(error).splitlines()[0]}")
            last_error = error
    mode = "offline (HF_HUB_OFFLINE / local_files_only)" if offline else "online"
    raise ModelLoadError(
        f"could not load a UNet2DModel {mode}; tried " + "; ".join(failures) + ". Pass a "
        "directory written by save_pretrained, or a hub id already in the Hugging Face "
        "cache (HF_HOME), or run once with network access."
    ) from last_error


def _model_identity(preset_or_path: str | os.PathLike) -> str:
    name = str(preset_or_path)
    if name in PRESETS:
        return f"preset:{name}"
    local = Path(name).expanduser()
    # Absolute, because Ray Tune runs every trial in its own working directory.
    return f"path:{local.resolve()}" if local.exists() else f"hub:{name}"


def teacher_cache_key(
    preset_or_path: str | os.PathLike,
    dataset_name: str,
    dataset_hash: str,
    resolution: int,
    steps: int,
    seed: int,
    *,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """16-hex-digit key of an FP teacher: architecture/start point, data, size, steps, seed.

    ``extra`` holds any other setting that changes the teacher's weights (JSON-able).
    """
    identity = {
        "version": _TEACHER_KEY_VERSION,
        "model": _model_identity(preset_or_path),
        "dataset": dataset_name,
        "dataset_sha256": dataset_hash,
        "resolution": int(resolution),
        "steps": int(steps),
        "seed": int(seed),
        "extra": dict(extra or {}),
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def teacher_dir(cache_dir: str | os.PathLike | None, key: str) -> Path:
    """Where the teacher with ``key`` lives: ``<cache_dir>/teachers/<key>`` (not created)."""
    return resolve_cache_dir(cache_dir) / "teachers" / key
