"""Files the GPU benchmarks need on a machine that has no network and takes 64 MiB a call.

    python benchmarks/device_payload.py --data-root ../shared/data --out .bdmdata \
        --fid-weights $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \
        --fid-out .bdmfid

Writes a seeded CIFAR-10 subset in the offline copy's own format (``train_*``/``test_*``
JPEG blobs, offsets, labels; 8,000 + 1,000 images, about 8 MB) so ``data.source:
cifar10`` reads it from ``--out`` as its data root, and splits the 96 MB FID Inception
weights into two halves that travel in separate calls (``cat`` joins them). The
folders must be ignored by git (``.git/info/exclude``). See gpu_perf.md, "Rerunning".
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np


def cifar_subset(source: Path, target: Path, sizes: dict[str, int], seed: int) -> None:
    data = np.load(source)
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in sizes.items():
        blob, offsets = data[f"{split}_jpeg"], data[f"{split}_offsets"]
        labels = data[f"{split}_labels"]
        # The offline copy is sorted by class: a seeded sample keeps every class.
        keep = np.sort(rng.choice(len(labels), count, replace=False))
        images = [blob[offsets[i] : offsets[i + 1]] for i in keep]
        new_offsets = np.zeros(count + 1, dtype=np.int64)
        new_offsets[1:] = np.cumsum([len(image) for image in images])
        out[f"{split}_jpeg"] = np.concatenate(images).astype(np.uint8)
        out[f"{split}_offsets"] = new_offsets
        out[f"{split}_labels"] = labels[keep]
    target.mkdir(parents=True, exist_ok=True)
    np.savez(target / source.name, **out)


def split_in_halves(weights: Path, target: Path) -> str:
    payload = weights.read_bytes()
    target.mkdir(parents=True, exist_ok=True)
    half = len(payload) // 2
    (target / "part00").write_bytes(payload[:half])
    (target / "part01").write_bytes(payload[half:])
    return hashlib.sha256(payload).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder with cifar10_jpeg_bytes.npz")
    parser.add_argument("--out", default=".bdmdata")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fid-weights", default=None)
    parser.add_argument("--fid-out", default=".bdmfid")
    args = parser.parse_args()
    source = Path(args.data_root) / "cifar10_jpeg_bytes.npz"
    cifar_subset(source, Path(args.out), {"train": args.train, "test": args.test}, args.seed)
    print(f"{Path(args.out) / source.name}: {args.train} train + {args.test} test images")
    if args.fid_weights:
        digest = split_in_halves(Path(args.fid_weights), Path(args.fid_out))
        print(f"{args.fid_out}/part00, part01: sha256 of the joined file {digest}")


if __name__ == "__main__":
    main()
