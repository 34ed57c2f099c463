"""Packed 1-bit checkpoints: ``save_packed`` writes a binarized UNet in one file, ``load_packed``
rebuilds it. Imports torch, diffusers and safetensors only."""

from binarydm.export.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    latent_from_signs,
    load_packed,
    pack_bits,
    save_packed,
    unpack_bits,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "latent_from_signs",
    "load_packed",
    "pack_bits",
    "save_packed",
    "unpack_bits",
]
