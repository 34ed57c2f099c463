"""Loading pretrained FP UNets (local directory or Hugging Face Hub), naming teacher caches
and identifying a teacher by its weights.

A teacher pretrained by the platform is cached under ``<cache_dir>/teachers/<key>``,
where the key hashes everything that determines its weights, so trials of a study
(and later studies) reuse one teacher instead of each training its own.
``weights_sha256`` is what runs log as ``teacher.sha256``: the same bytes give the
same hash wherever the folder lives or whatever the hub id is called.
"""

from __future__ import annotations

import functools
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

# Bump when teacher training changes what a key's weights are. 2: the EMA of the weights.
_TEACHER_KEY_VERSION = 2
#: The weights file of a diffusers model, in the order ``from_pretrained`` prefers them.
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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


def weights_file(
    path_or_hub_id: str | os.PathLike, *, hf_cache_dir: str | os.PathLike | None = None
) -> Path:
    """The weights file ``load_unet`` reads: a local folder's, or a hub id's in the HF cache.

    Looked for at the top and in ``unet/`` (a pipeline's), safetensors before ``.bin``.
    A hub id is never downloaded here: only the local Hugging Face cache is read
    (``hf_cache_dir``, default ``HF_HUB_CACHE``). ``ModelLoadError`` says what was tried.
    """
    name = str(path_or_hub_id)
    local = Path(name).expanduser()
    if local.is_dir():
        # Like load_unet: a saved model keeps its files at the top, a pipeline in unet/.
        folder = local if (local / "config.json").is_file() else local / "unet"
        for weights in WEIGHTS_NAMES:
            if (folder / weights).is_file():
                return folder.resolve() / weights
        raise ModelLoadError(
            f"{local.resolve()} has no weights file: looked for {' or '.join(WEIGHTS_NAMES)} "
            f"in {folder.resolve()} (a sharded or variant-only model has no single file)"
        )
    if local.exists() or name.startswith(("/", ".", "~")):
        raise ModelLoadError(f"{name} is not a model folder; pass the folder of save_pretrained")
    from huggingface_hub import try_to_load_from_cache

    tried = []
    for subfolder in ("", "unet/"):
        for weights in WEIGHTS_NAMES:
            found = try_to_load_from_cache(name, subfolder + weights, cache_dir=hf_cache_dir)
            if isinstance(found, str):  # else None (unknown) or a cached "does not exist"
                return Path(found)
            tried.append(subfolder + weights)
    where = hf_cache_dir or hub_constants.HF_HUB_CACHE
    raise ModelLoadError(
        f"hub model {name!r} has none of {', '.join(tried)} in the Hugging Face cache {where}; "
        "load it once (load_unet) so its files are cached, or pass a local folder"
    )


def weights_sha256(
    path_or_hub_id: str | os.PathLike, *, hf_cache_dir: str | os.PathLike | None = None
) -> str:
    """sha256 of a diffusers model's weights file (``weights_file``): the teacher's identity."""
    file = weights_file(path_or_hub_id, hf_cache_dir=hf_cache_dir).resolve()
    stat = file.stat()
    return _file_sha256(str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Size and mtime in the cache key: every trial of a study hashes the same teacher, and a
    # file rewritten in place must not keep its old hash.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
