"""Files the GPU runs need on a machine that has no network and takes 64 MiB a call.

Two ways. The first (benchmarks/gpu_session.sh, gpu_perf.md "Rerunning") writes a seeded
CIFAR-10 subset in the offline copy's own format and splits the FID Inception weights in
halves::

    python benchmarks/device_payload.py --data-root ../shared/data --out .bdmdata \
        --fid-weights $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \
        --fid-out .bdmfid

The second (benchmarks/cifar10_w1_session.sh, for 4,000-sample FIDs on the full test
split) packs whole files into one tar, checked by sha256, cut into parts that each fit
one call beside the working tree; the device joins and unpacks them (``unpack``)::

    python benchmarks/device_payload.py pack --out .bdmpayload --part-mib 62 \
        --item devbundle=.devbundle \
        --item fid=$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \
        --item teacher=../shared/teachers/ddpm-cifar10-jpeg \
        --item data=../shared/data/cifar10_jpeg_bytes.npz
    # on the device, after every part arrived in /tmp/bdmparts:
    python3 benchmarks/device_payload.py unpack --parts /tmp/bdmparts --to /tmp/bdm

The folders must be ignored by git (``.git/info/exclude``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
_MIB = 2**20


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(items: dict[str, Path], out: Path, part_mib: float) -> dict:
    """Tar ``items`` (name -> file or folder, stored under ``name``) into parts of at most
    ``part_mib`` MiB in ``out``; the manifest holds each part's and the whole tar's sha256."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("part-*"):
        stale.unlink()
    archive = out / "payload.tar"
    with tarfile.open(archive, "w") as tar:
        for name, path in items.items():
            tar.add(path, arcname=name)
    size, limit = archive.stat().st_size, int(part_mib * _MIB)
    manifest = {"sha256": _sha256(archive), "bytes": size, "items": sorted(items), "parts": []}
    with archive.open("rb") as stream:
        for index, block in enumerate(iter(lambda: stream.read(limit), b"")):
            part = out / f"part-{index:02d}"
            part.write_bytes(block)
            digest = hashlib.sha256(block).hexdigest()
            manifest["parts"].append({"name": part.name, "bytes": len(block), "sha256": digest})
    archive.unlink()
    # The manifest travels with the last part, so the device knows when it has all of them.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def unpack(parts: Path, target: Path) -> dict:
    """Join the parts in ``parts`` (checked against the manifest) and extract into ``target``."""
    manifest = json.loads((parts / MANIFEST).read_text())
    target.mkdir(parents=True, exist_ok=True)
    joined = target / "payload.tar"
    digest = hashlib.sha256()
    with joined.open("wb") as stream:
        for entry in manifest["parts"]:
            block = (parts / entry["name"]).read_bytes()
            if hashlib.sha256(block).hexdigest() != entry["sha256"]:
                raise SystemExit(f"{entry['name']}: sha256 differs from the manifest: resend it")
            digest.update(block)
            stream.write(block)
    if digest.hexdigest() != manifest["sha256"]:
        raise SystemExit("the joined payload's sha256 differs from the manifest")
    with tarfile.open(joined) as tar:
        tar.extractall(target, filter="data")
    joined.unlink()
    return manifest


def _legacy(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder with cifar10_jpeg_bytes.npz")
    parser.add_argument("--out", default=".bdmdata")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fid-weights", default=None)
    parser.add_argument("--fid-out", default=".bdmfid")
    args = parser.parse_args(argv)
    source = Path(args.data_root) / "cifar10_jpeg_bytes.npz"
    cifar_subset(source, Path(args.out), {"train": args.train, "test": args.test}, args.seed)
    print(f"{Path(args.out) / source.name}: {args.train} train + {args.test} test images")
    if args.fid_weights:
        digest = split_in_halves(Path(args.fid_weights), Path(args.fid_out))
        print(f"{args.fid_out}/part00, part01: sha256 of the joined file {digest}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("pack", "unpack"):
        _legacy(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["pack", "unpack"])
    parser.add_argument("--out", default=".bdmpayload", help="pack: folder for the parts")
    parser.add_argument("--part-mib", type=float, default=62.0)
    parser.add_argument("--item", action="append", default=[], help="NAME=PATH (pack)")
    parser.add_argument("--parts", help="unpack: folder holding every part and the manifest")
    parser.add_argument("--to", help="unpack: folder to extract into")
    args = parser.parse_args(argv)
    if args.command == "pack":
        items = {}
        for item in args.item:
            name, _, path = item.partition("=")
            if not name or not path or not Path(path).exists():
                parser.error(f"--item {item!r} is invalid: allowed NAME=EXISTING_PATH")
            items[name] = Path(path)
        manifest = pack(items, Path(args.out), args.part_mib)
        for entry in manifest["parts"]:
            print(f"{args.out}/{entry['name']}: {entry['bytes'] / _MIB:.1f} MiB")
        print(f"{len(manifest['parts'])} parts, sha256 of the whole {manifest['sha256']}")
    else:
        if not args.parts or not args.to:
            parser.error("unpack needs --parts and --to")
        manifest = unpack(Path(args.parts), Path(args.to))
        print(f"unpacked {', '.join(manifest['items'])} into {args.to}")


if __name__ == "__main__":
    main()
