"""Training checkpoints: one ``state.pt`` plus a manifest with its sha256.

A checkpoint whose bytes do not match its manifest (a crash mid-upload, a bad
disk) is detected on resume; ``load_latest_valid`` then falls back to the newest
earlier checkpoint of the same run and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_state(directory: str | Path, state: dict[str, Any], *, step: int) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    manifest = {"format": FORMAT_VERSION, "step": step, "sha256": _sha256(directory / STATE_FILE)}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def link_state(source: str | Path, directory: str | Path) -> bool:
    """Give ``directory`` the state of checkpoint ``source`` without serialising it again.

    The state file is hard-linked (same bytes, so the copied manifest still verifies) and
    survives the eviction of ``source``. False, with nothing written, where the file
    system cannot link: the caller then saves the state itself.
    """
    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source / STATE_FILE, directory / STATE_FILE)
    except OSError:
        return False
    shutil.copyfile(source / MANIFEST_FILE, directory / MANIFEST_FILE)
    return True


def load_state(directory: str | Path) -> dict[str, Any]:
    """Load a checkpoint, verifying its manifest; raises CorruptCheckpointError."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{directory}: format {manifest.get('format')}")
        if _sha256(directory / STATE_FILE) != manifest["sha256"]:
            raise CorruptCheckpointError(f"{directory}: sha256 mismatch")
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{directory}: {exc}") from exc


def checkpoint_step(directory: Path) -> int:
    try:
        return int(json.loads((directory / MANIFEST_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def load_latest_valid(latest: str | Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Load ``latest`` or, if it is corrupt, the newest valid sibling checkpoint.

    Returns (state or None, warnings). Siblings are the other checkpoint folders of
    the same Ray Train run (they sit side by side under the run's storage folder).
    """
    latest = Path(latest)
    warnings = []
    candidates = [latest]
    siblings = [p for p in latest.parent.iterdir() if p.is_dir() and p != latest]
    candidates += sorted(siblings, key=checkpoint_step, reverse=True)
    for candidate in candidates:
        if not (candidate / MANIFEST_FILE).exists() and candidate != latest:
            continue
        try:
            state = load_state(candidate)
        except CorruptCheckpointError as exc:
            warnings.append(f"checkpoint {exc}; falling back to the previous one")
            log.warning(warnings[-1])
            continue
        if candidate != latest:
            warnings.append(f"resumed from {candidate.name} (step {state['step']})")
            log.warning(warnings[-1])
        return state, warnings
    return None, warnings
