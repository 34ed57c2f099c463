"""A teacher's identity: the sha256 of its weights file, local folders and the HF cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from binarydm.models import ModelLoadError, load_unet, weights_file, weights_sha256

SHARED_TEACHER = Path(__file__).resolve().parents[3] / "shared" / "teachers" / "ddpm-cifar10-jpeg"
SHARED_TEACHER_SHA256 = "f5f579c3a819fcb0f1ba512713008d179671296bd2c2e27c8a49480e765ec4df"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from bdm_support import small_unet

    folder = tmp_path_factory.mktemp("saved") / "model"
    small_unet(channels=1).save_pretrained(folder)
    return folder


def test_the_shared_teacher_has_its_published_sha256() -> None:
    if not (SHARED_TEACHER / "config.json").is_file():
        pytest.skip(f"the shared teacher is not at {SHARED_TEACHER}")
    assert weights_sha256(SHARED_TEACHER) == SHARED_TEACHER_SHA256


def test_local_folder_top_pipeline_unet_and_bin(saved, tmp_path) -> None:
    file = saved / "diffusion_pytorch_model.safetensors"
    assert weights_file(saved) == file.resolve()
    assert weights_sha256(saved) == weights_sha256(str(saved)) == _sha256(file)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(saved, pipeline / "unet")
    assert weights_sha256(pipeline) == _sha256(file)  # where load_unet finds it: unet/
    legacy = tmp_path / "legacy"
    load_unet(saved).save_pretrained(legacy, safe_serialization=False)
    assert weights_file(legacy).name == "diffusion_pytorch_model.bin"
    assert weights_sha256(legacy) == _sha256(legacy / "diffusion_pytorch_model.bin")


def test_a_rewritten_file_gets_its_new_hash(saved, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    before = weights_sha256(copy)
    file = copy / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0")
    assert weights_sha256(copy) == _sha256(file) != before


def test_hub_id_is_read_from_the_local_hugging_face_cache(saved, tmp_path) -> None:
    # The cache layout huggingface_hub writes: blobs, a snapshot per commit, refs/main.
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-unet"
    snapshot = repo / "snapshots" / commit / "unet"
    snapshot.mkdir(parents=True)
    shutil.copy(saved / "config.json", snapshot / "config.json")
    shutil.copy(saved / "diffusion_pytorch_model.safetensors", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cache = tmp_path / "hub"
    expected = _sha256(saved / "diffusion_pytorch_model.safetensors")
    assert weights_sha256("someone/tiny-unet", hf_cache_dir=cache) == expected
    with pytest.raises(ModelLoadError, match="'someone/absent' has none of .* in the Hugging"):
        weights_sha256("someone/absent", hf_cache_dir=cache)


def test_a_folder_without_weights_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no weights file: looked for"):
        weights_sha256(tmp_path)
    with pytest.raises(ModelLoadError, match="not a model folder"):
        weights_sha256(tmp_path / "missing")
