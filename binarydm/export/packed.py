"""Packed checkpoint of a binarized UNet: 1 bit per binary weight, one safetensors file.

Format ``binarydm-packed`` version 2, a single ``.safetensors`` file (version 1, before
``BinaryDMConfig`` carried a ``config_version``, is refused with a message to re-export):

- metadata (strings): ``format``, ``format_version``, ``diffusers_config`` (the
  model's ``to_json_string()``, with ``_class_name``), ``binarydm_config``
  (``BinaryDMConfig.to_json()``) and ``layers``, a JSON manifest
  ``{name: {"kind": "binary", "shape": [...], "bases": k}}`` or
  ``{name: {"kind": "lsq", "shape": [...], "bits": b}}`` of every quantized layer;
- ``{name}.weight.signs.{i}``: the signs of binary basis ``i`` as uint8, 8 per byte,
  element ``j`` of each group of 8 in bit ``j`` (LSB first), bit 1 = +1 (sign(0) = +1);
- ``{name}.weight_quantizer.scales``: the scales of the ``k`` active bases only
  (an EBB model after its switch stores one basis), as deployed: a second basis'
  EBB anneal gain is multiplied in and stored as 1;
- ``{name}.weight.codes``: LSQ weight integers ``q - qn`` packed ``8/bits`` per byte
  the same way (2/4/8-bit weights, incl. int8 first/last layers);
- every other state-dict tensor as is: biases, norms, FP layers, LSQ steps, LSQ+
  offsets (``{name}.act_quantizer.offset``), init flags and basis counts.

``load_packed`` rebuilds the diffusers model from its config, applies
``binarize_`` with the stored config and loads the tensors. The latent FP weight
of a binary layer is not stored; it is rebuilt as the deployed weight
``sum_i s_i b_i`` where that re-binarizes to the stored signs, else as the
weight whose residual signs are the stored ones with the largest margin (see
``latent_from_signs``). So re-binarizing reproduces signs and scales exactly and
the outputs equal the original fake-quant model's bit for bit. LSQ layers get
``codes * step``, which re-quantizes to the same codes. Every layer of the reloaded model is active:
it is the deployed model, whatever the progressive schedule was at save time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import diffusers
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from binarydm.quant.apply import binarize_
from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.config import BinaryDMConfig
from binarydm.quant.layers import QuantMixin, quant_layers
from binarydm.quant.lsq import LSQQuantizer, compute_dtype
from binarydm.quant.lsq_plus import LSQPlusQuantizer
from binarydm.quant.ste import sign_pm1

FORMAT_NAME = "binarydm-packed"
FORMAT_VERSION = 2


def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Write the binarized ``model`` to ``path`` in the packed format; returns the path.

    Raises ``ValueError`` for a model without ``binarize_`` or with a weight
    quantizer that has not been initialised yet (run one forward first).
    """
    config = getattr(model, "binarydm_config", None)
    if config is None:
        raise ValueError("model is not binarized: call binarydm.binarize_(model, config) first")
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    manifest = {}
    for name, layer in quant_layers(model):
        del tensors[f"{name}.weight"]
        manifest[name] = _pack_layer(name, layer, tensors)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "diffusers_config": model.to_json_string(),
        "binarydm_config": config.to_json(),
        "layers": json.dumps(manifest, sort_keys=True),
    }
    path = Path(path)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def load_packed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the binarized diffusers model saved by ``save_packed`` (on ``device``)."""
    # Built on CPU and moved at the end: binarize_ creates quantizers on the default device.
    with safe_open(str(path), framework="pt", device="cpu") as reader:
        metadata = reader.metadata() or {}
        _check_format(path, metadata)
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    diffusers_config = json.loads(metadata["diffusers_config"])
    model_class = getattr(diffusers, diffusers_config["_class_name"])
    model = model_class.from_config(diffusers_config)
    binarize_(model, BinaryDMConfig.from_json(metadata["binarydm_config"]))
    manifest = json.loads(metadata["layers"])
    packed = {key: tensors.pop(key) for key in list(tensors) if _is_packed_key(key)}
    layers = dict(quant_layers(model))
    for name, entry in manifest.items():
        _unpack_layer(name, entry, layers[name], packed, tensors)
    model.load_state_dict(tensors, strict=True)
    return model.to(device)


def _is_packed_key(key: str) -> bool:
    return ".weight.signs." in key or key.endswith(".weight.codes")


def _check_format(path: str | Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} file (format={metadata.get('format')!r})")
    version = int(metadata["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has {FORMAT_NAME} format version {version}, this binarydm reads up to "
            f"{FORMAT_VERSION}: upgrade binarydm to load it"
        )
    if version < FORMAT_VERSION:
        raise ValueError(
            f"{path} has {FORMAT_NAME} format version {version}, written before the current "
            f"quantization config (version {FORMAT_VERSION}); export it again from its "
            "training checkpoint with this binarydm"
        )


# -- per-layer packing --------------------------------------------------------------
def _pack_layer(name: str, layer: QuantMixin, tensors: dict[str, torch.Tensor]) -> dict:
    quantizer = layer.weight_quantizer
    if not bool(quantizer.initialized):
        raise ValueError(
            f"{name}: weight quantizer never initialised, so its scales are placeholders: "
            "run one forward of the model before save_packed"
        )
    weight = layer.weight.detach()
    shape = list(weight.shape)
    if isinstance(quantizer, MultiBasisBinarizer):
        signs = quantizer.signs(weight)
        for i, sign in enumerate(signs):
            tensors[f"{name}.weight.signs.{i}"] = pack_bits((sign > 0).to(torch.uint8), 1)
        scales_key = f"{name}.weight_quantizer.scales"
        deployed = tensors[scales_key][: len(signs)].clone()
        gain_key = f"{name}.weight_quantizer.second_basis_gain"
        if gain_key in tensors:
            # The latent weight is rebuilt from the scales the forward multiplies by.
            if len(signs) > 1:
                deployed[1] = deployed[1] * tensors[gain_key]
            tensors[gain_key] = torch.ones_like(tensors[gain_key])
        tensors[scales_key] = deployed
        return {"kind": "binary", "shape": shape, "bases": len(signs)}
    if isinstance(quantizer, LSQQuantizer) and not isinstance(quantizer, LSQPlusQuantizer):
        # (LSQ+ quantizes activations only: codes without its offset would not rebuild.)
        codes = _lsq_codes(weight, quantizer)
        tensors[f"{name}.weight.codes"] = pack_bits(codes, quantizer.bits)
        return {"kind": "lsq", "shape": shape, "bits": quantizer.bits}
    raise TypeError(f"{name}: cannot pack weight quantizer {type(quantizer).__name__}")


@torch.no_grad()
def _lsq_codes(weight: torch.Tensor, quantizer: LSQQuantizer) -> torch.Tensor:
    """Unsigned codes ``q - qn`` of the integers LSQ's forward multiplies by the step."""
    work = compute_dtype(weight)  # LSQ's arithmetic, so a bf16 weight gets the same codes
    step = quantizer.step.detach().to(work)
    q = torch.round(torch.clamp(weight.to(work) / step, quantizer.qn, quantizer.qp))
    return (q - quantizer.qn).to(torch.uint8)


def _unpack_layer(
    name: str,
    entry: dict,
    layer: QuantMixin,
    packed: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Put the rebuilt latent weight (and full-size binarizer scales) into ``tensors``."""
    quantizer = layer.weight_quantizer
    shape = torch.Size(entry["shape"])
    dtype = layer.weight.dtype
    if entry["kind"] == "binary":
        scales_key = f"{name}.weight_quantizer.scales"
        active = tensors[scales_key].to(dtype)
        signs = [
            _unpack_signs(packed[f"{name}.weight.signs.{i}"], shape).to(dtype)
            for i in range(entry["bases"])
        ]
        # Bases dropped by EBB are never computed again; zero keeps their shape.
        full = torch.zeros_like(quantizer.scales)
        full[: entry["bases"]] = active
        tensors[scales_key] = full
        tensors[f"{name}.weight"] = latent_from_signs(signs, active, name=name)
    else:
        step = tensors[f"{name}.weight_quantizer.step"].to(dtype)
        codes = unpack_bits(packed[f"{name}.weight.codes"], entry["bits"], shape.numel())
        q = codes.to(dtype).reshape(shape) + quantizer.qn
        tensors[f"{name}.weight"] = q * step


def _unpack_signs(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = unpack_bits(packed, 1, shape.numel()).reshape(shape)
    return bits.to(torch.float32) * 2 - 1


# -- latent weight --------------------------------------------------------------------
@torch.no_grad()
def latent_from_signs(
    signs: list[torch.Tensor], scales: torch.Tensor, *, name: str = "weight"
) -> torch.Tensor:
    """A latent weight that re-binarizes to ``signs`` under ``scales`` (``(k, out, 1, ...)``).

    Mostly the deployed weight ``w_b = sum_i s_i b_i`` itself: re-binarizing it gives
    back its signs whenever each scale outweighs the later ones (always for one
    positive basis). Where it does not (scales trained out of order, or negative),
    the weight is the point with the largest margin: re-binarizing computes
    ``r_0 = w``, ``b_i = sign(r_{i-1})``, ``r_i = r_{i-1} - s_i b_i``, so
    ``r_{i-1} = r_k + T_i`` with ``T_i = sum_{j>=i} s_j b_j``, and each wanted sign
    bounds the free final residual ``r_k`` by ``-T_i`` from below (+1) or above (-1).
    The interval is not empty (the trained weight was in it); its midpoint keeps
    every residual farthest from zero. Warns if float resolution still loses a sign.
    """
    per_basis = [scales[i] for i in range(len(signs))]
    weight = _binary_weight(signs, per_basis)
    wrong = _sign_mismatch(weight, signs, per_basis)
    if not wrong.any():
        return weight
    sub_signs = [sign[wrong] for sign in signs]
    sub_scales = [scale.expand_as(weight)[wrong] for scale in per_basis]
    fallback = _max_margin_latent(sub_signs, sub_scales)
    weight[wrong] = fallback
    lost = int(_sign_mismatch(fallback, sub_signs, sub_scales).sum())
    if lost:
        warnings.warn(
            f"{name}: {lost} signs cannot be rebuilt from a latent weight because a scale is "
            "below the float resolution of the earlier bases. The deployed weight is "
            "unaffected; fine-tuning from this checkpoint starts from other signs there.",
            stacklevel=2,
        )
    return weight


def _binary_weight(signs: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    # Same operation order as MultiBasisBinarizer.forward, so w_b is bit-identical.
    weight = scales[0] * signs[0]
    for scale, sign in zip(scales[1:], signs[1:], strict=True):
        weight = weight + scale * sign
    return weight


def _sign_mismatch(
    weight: torch.Tensor, signs: list[torch.Tensor], scales: list[torch.Tensor]
) -> torch.Tensor:
    """Where re-binarizing ``weight`` (MultiBasisBinarizer.signs' arithmetic) misses ``signs``."""
    residual, wrong = weight, torch.zeros_like(weight, dtype=torch.bool)
    for scale, sign in zip(scales, signs, strict=True):
        got = sign_pm1(residual)
        wrong |= got != sign
        residual = residual - scale * got
    return wrong


def _max_margin_latent(signs: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    wide_signs = torch.stack(signs).double()
    wide_scales = torch.stack(scales).double()
    suffix = (wide_scales * wide_signs).flip(0).cumsum(0).flip(0)  # T_i
    lo = torch.where(wide_signs > 0, -suffix, -torch.inf).amax(0)
    hi = torch.where(wide_signs < 0, -suffix, torch.inf).amin(0)
    margin = wide_scales.abs().sum(0)
    margin = torch.where(margin > 0, margin, torch.ones_like(margin))
    final_residual = torch.where(
        lo.isfinite() & hi.isfinite(),
        (lo + hi) / 2,
        torch.where(lo.isfinite(), lo + margin, hi - margin),
    )
    return (final_residual + suffix[0]).to(scales[0].dtype)


# -- bit packing ----------------------------------------------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers (1, 2, 4 or 8), ``8 // bits`` per byte, LSB first."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits={bits} is invalid: allowed 1, 2, 4 or 8")
    per_byte = 8 // bits
    flat = values.flatten().to(torch.uint8)
    groups = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per_byte)).view(-1, per_byte)
    packed = groups[:, 0].clone()
    for j in range(1, per_byte):
        packed |= groups[:, j] << (j * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values as uint8."""
    shifts = torch.arange(0, 8, bits, device=packed.device)
    # One table row per byte value: a single gather unpacks every byte at once.
    table = (torch.arange(256, device=packed.device).unsqueeze(1) >> shifts) & (2**bits - 1)
    return table.to(torch.uint8).index_select(0, packed.int()).flatten()[:count]
