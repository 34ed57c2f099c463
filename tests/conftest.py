"""Shared fixtures: offline data roots, small UNets, and one session-scoped local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bdm_support import LRM_STUDY, TINY_STUDY, tiny_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = Path(os.environ.get("BINARYDM_DATA_ROOT", SHARED_DATA))
    if not (root / "mnist_uint8.npz").exists():
        pytest.skip(f"offline datasets not found under {root} (set BINARYDM_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, shared_data) -> dict:
    """Session-wide data root, cache (teachers, FID stats and weights) and Ray storage."""
    root = tmp_path_factory.mktemp("bdm")
    cache = Path(os.environ.get("BINARYDM_CACHE_DIR", root / "cache"))
    os.environ["BINARYDM_DATA_ROOT"] = str(shared_data)
    os.environ["BINARYDM_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TORCH_HOME", str(cache / "torch"))
    return {"data_root": str(shared_data), "cache_dir": str(cache), "storage": str(root / "ray")}


@pytest.fixture(scope="session")
def tiny_teacher(ray_cluster, workspace) -> Path:
    from binarydm.train._runner import ensure_teacher

    return ensure_teacher(
        tiny_settings(),
        storage_path=workspace["storage"],
        data_root=workspace["data_root"],
        cache_dir=workspace["cache_dir"],
    )


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory, ray_cluster, tiny_teacher):
    """(workdir, output) of one finished two-trial lrm_rank study through the CLI, with
    sqlite MLflow and Optuna stores in workdir; shared by the tests that read a study back."""
    from typer.testing import CliRunner

    from binarydm.cli import app

    workdir = tmp_path_factory.mktemp("study")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(app, [LRM_STUDY, *TINY_STUDY, "--trials", "2"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return workdir, result.output
