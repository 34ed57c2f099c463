"""Reproducibility params logged on every run: code commit, library versions, hardware.

Call it in the process that does the work (a Ray worker sees its own GPU, the
driver may have none). The dataset hash belongs to the data layer and is logged
beside these.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

TRACKED_PACKAGES = ("torch", "ray", "diffusers", "optuna", "mlflow", "binarydm")
GIT_COMMIT_ENV = "BINARYDM_GIT_COMMIT"
UNKNOWN = "unknown"


def _git(code_dir: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            # --no-optional-locks: `status` must never take index.lock in a tree others work in.
            ["git", "--no-optional-locks", "-C", str(code_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git binary (slim images), hung filesystem
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(code_dir: str | Path | None = None) -> dict[str, str]:
    """``code.git_commit`` and ``code.git_dirty`` of the tree holding ``code_dir``.

    ``ray job submit`` uploads the working directory without ``.git``, and images are
    often built without it: there ``BINARYDM_GIT_COMMIT`` (set at build or submit
    time) names the commit, otherwise it is ``unknown``.
    """
    from_env = os.environ.get(GIT_COMMIT_ENV)
    if from_env:
        return {"code.git_commit": from_env, "code.git_dirty": UNKNOWN}
    where = Path(code_dir) if code_dir is not None else Path(__file__).resolve().parent
    commit = _git(where, "rev-parse", "HEAD")
    if commit is None:
        return {"code.git_commit": UNKNOWN, "code.git_dirty": UNKNOWN}
    changes = _git(where, "status", "--porcelain", "--untracked-files=no")
    dirty = UNKNOWN if changes is None else str(bool(changes)).lower()
    return {"code.git_commit": commit, "code.git_dirty": dirty}


#: Other distributions that install a tracked package: the GPU machines' bundle installs
#: MLflow as mlflow-skinny, which the runs recorded as "not installed".
ALSO_DISTRIBUTED_AS = {"mlflow": ("mlflow-skinny",)}


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """``version.<package>`` from installed metadata (no import: ray/optuna stay unloaded)."""
    versions = {"version.python": platform.python_version()}
    for name in packages:
        versions[f"version.{name}"] = "not installed"
        for distribution in (name, *ALSO_DISTRIBUTED_AS.get(name, ())):
            try:
                versions[f"version.{name}"] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def hardware() -> dict[str, str]:
    """CPU model and cores usable by this process; CUDA GPU model(s) and count via torch."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "hardware.cpu": _cpu_model(),
        "hardware.cpu_count": str(usable or UNKNOWN),
        "hardware.platform": platform.platform(),
        "hardware.gpu": "none",
        "hardware.gpu_count": "0",
        "version.cuda": "none",
    }
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        info.update({"hardware.gpu": ", ".join(names), "hardware.gpu_count": str(count)})
        info["version.cuda"] = str(torch.version.cuda)
    return info


def reproducibility_params(code_dir: str | Path | None = None) -> dict[str, str]:
    """Every reproducibility param (design.md "Contracts"), as MLflow param strings."""
    return {**code_version(code_dir), **package_versions(), **hardware()}
