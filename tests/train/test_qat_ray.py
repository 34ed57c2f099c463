"""QAT on a real local Ray cluster: one trial end to end, worker death, NaN loss, resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from bdm_support import fit_tiny, tiny_settings

from binarydm.train._compile_cache import SUFFIX, cache_folder
from binarydm.train._runner import TrialError, final_metrics


def test_teacher_is_cached_and_loadable(tiny_teacher, workspace):
    from binarydm.models import load_unet
    from binarydm.train._runner import ensure_teacher

    assert (tiny_teacher / "config.json").exists()
    again = ensure_teacher(
        tiny_settings(),
        storage_path=workspace["storage"],
        data_root=workspace["data_root"],
        cache_dir=workspace["cache_dir"],
    )
    assert again == tiny_teacher  # cached: no second pretraining
    model = load_unet(tiny_teacher)
    assert model.config.sample_size == 16 and model.config.in_channels == 1


def test_qat_trial_end_to_end(tiny_teacher, workspace):
    settings = tiny_settings(**{"method.progressive.stage_steps": 2, "training.ema_decay": 0.9})
    result = fit_tiny(settings, "e2e", workspace, tiny_teacher)
    metrics = final_metrics(result)
    for key in ("fid", "test_loss", "ops_g", "bops_g", "flops_g", "size_mib"):
        assert metrics[key] > 0, key
    assert metrics["ops_saving"] > 4 and metrics["size_saving"] > 4
    assert metrics["fid_dims"] == 64 and metrics["fid_samples"] == 100
    assert metrics["fid_reference"] == "mnist/test/16px"
    assert metrics["step"] == 20 and metrics["loss_lrm"] > 0
    # The default recipe is paper v5: its deployed model has one basis everywhere and the
    # 1-bit baseline's size, whatever it trained with before the EBB switch.
    assert settings.method.ebb.enabled and metrics["weight_bits"] == 1.0
    assert metrics["size_mib"] == pytest.approx(_baseline_size_mib(tiny_teacher), rel=1e-12)
    with result.checkpoint.as_directory() as ckpt:
        files = set(os.listdir(ckpt))
        assert {"samples.png", "model.bdm", "eval.json", "state.pt", "manifest.json"} <= files
        layers = _packed_layers(Path(ckpt) / "model.bdm")
        assert {entry["bases"] for entry in layers.values()} == {1}
        assert Path(ckpt, "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads(Path(ckpt, "eval.json").read_text())["fid"] == metrics["fid"]
    # keep_checkpoints=2: older checkpoints were deleted.
    kept = [
        p for p in Path(result.path).iterdir() if p.is_dir() and p.name.startswith("checkpoint_")
    ]
    assert len(kept) == 2


def _baseline_size_mib(teacher_dir) -> float:
    """size_mib of the teacher binarized with the 1-bit baseline recipe."""
    import torch

    from binarydm import BinaryDMConfig, binarize_
    from binarydm.metrics.efficiency import efficiency_report
    from binarydm.models import load_unet

    model = binarize_(load_unet(teacher_dir), BinaryDMConfig.baseline())
    config = model.config
    example = (
        torch.zeros(1, config.in_channels, config.sample_size, config.sample_size),
        torch.zeros(1, dtype=torch.long),
    )
    return efficiency_report(model, example).size_mib


def _packed_layers(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reader:
        return json.loads(reader.metadata()["layers"])


# The progressive case (DDP with find_unused_parameters, the v5 default's path) runs in
# CI; the all-active one (find_unused off) differs in that flag alone and adds 40 s.
@pytest.mark.parametrize(
    "stage_steps",
    [pytest.param(0, marks=pytest.mark.slow), 3],
    ids=["all-active", "progressive"],
)
def test_two_ddp_workers_train_with_and_without_unused_parameters(
    tiny_teacher, workspace, stage_steps
):
    """DDP over two gloo workers: a plain W1A4 run skips DDP's unused-parameter search,
    a progressive one (inactive stages get no gradient) needs it; both must train."""
    settings = tiny_settings(
        **{
            "workers.num_workers": 2,
            "method.progressive.stage_steps": stage_steps,
            # The last stage begins at step 9: EBB switches after it, at step 10 of 12.
            "method.ebb.switch_at": 0.8,
            "training.steps": 12,
            "training.checkpoint_every": 12,
            "training.log_every": 4,
        }
    )
    result = fit_tiny(settings, f"ddp2-{stage_steps}", workspace, tiny_teacher, evaluate=False)
    assert result.error is None, result.error
    assert result.metrics["step"] == 12 and result.metrics["final"] is True
    assert 0 < result.metrics["loss"] < 10 and result.metrics["timing/setup_s"] > 0
    assert "fid" not in result.metrics  # evaluate=False: training alone


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_compiled_qat_trains_and_evaluates(tiny_teacher, workspace, backend):
    """``training.compile``: the student's and teacher's training forward compiled after the
    first step; the EBB switch recompiles the student (a layer's traced attributes change,
    as at a progressive stage switch, which the inductor variant adds); LRM hooks,
    checkpoints and the eager evaluation still work. ``aot_eager`` traces, guards and
    differentiates exactly as ``inductor`` does, without its code generation; still, each
    graph of the tiny UNet costs about 40 s of tracing on a 2-core CPU, so the fast variant
    has two student graphs. ``reduce-overhead`` (CUDA graphs on a GPU) compiles like
    ``default`` on a CPU; the slow inductor variant checks its step marking and the
    teacher-first order run."""
    options = {"training.compile_backend": backend, "method.progressive.stage_steps": 0}
    if backend == "inductor":
        options["training.compile_mode"] = "reduce-overhead"
        options["method.progressive.stage_steps"] = 2  # stages at steps 0, 2, 4, 6
    settings = tiny_settings(
        **{
            "training.compile": True,
            **options,
            "method.ebb.switch_at": 0.8,  # at step 8, after the last stage
            "training.steps": 10,
            "training.checkpoint_every": 5,
            "training.log_every": 5,
        }
    )
    folder = cache_folder(workspace["cache_dir"])
    before = set(folder.glob(f"*{SUFFIX}"))
    metrics = final_metrics(fit_tiny(settings, f"compiled-{backend}", workspace, tiny_teacher))
    after = set(folder.glob(f"*{SUFFIX}"))
    assert metrics["step"] == 10 and 0 < metrics["loss"] < 10 and metrics["loss_lrm"] > 0
    assert metrics["fid"] > 0 and metrics["size_saving"] > 4
    assert metrics["weight_bits"] == 1.0  # switched while compiled
    # training.compile_cache (on by default): inductor's graphs are saved for a fresh
    # machine (where an earlier run saved them, this one loads them and writes nothing
    # new); aot_eager generates no code, so there is nothing to save.
    if backend == "inductor" and not before:
        assert after
    if backend == "aot_eager":
        assert after == before


# CI holds this through the study: tests/fault/test_trial_faults.py kills a trial's worker
# after a registered checkpoint and asserts the run resumed past it, training and logging
# no step twice. This Ray-Train-level variant (80 steps) adds 80 s to a 2-core CI.
@pytest.mark.slow
def test_worker_killed_mid_run_resumes_from_checkpoint(tiny_teacher, workspace, tmp_path):
    settings = tiny_settings(**{"training.steps": 80, "training.max_failures": 2})
    pid_file = tmp_path / "worker.pid"
    run_dir = Path(workspace["storage"]) / "killed"
    outcome = {}

    def run():
        outcome["result"] = fit_tiny(
            settings, "killed", workspace, tiny_teacher, pid_file=str(pid_file)
        )

    thread = threading.Thread(target=run)
    thread.start()
    # Kill only once the controller has registered a checkpoint: Ray Train resumes from
    # registered checkpoints, and it registers them a moment after they are uploaded.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and _registered_step(snapshot) < 20:
        time.sleep(0.2)
    assert _registered_step(snapshot) >= 20, "no checkpoint was registered"
    killed_pid = int(pid_file.read_text())
    os.kill(killed_pid, signal.SIGKILL)
    thread.join(timeout=400)
    metrics = final_metrics(outcome["result"])
    assert metrics["step"] == 80
    assert int(pid_file.read_text()) != killed_pid  # a new worker process finished the run
    assert metrics["resumed_from_step"] >= 20  # resumed from its checkpoint, not step 0


def _registered_step(snapshot: Path) -> int:
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return -1
    return max((r["metrics"].get("step", -1) for r in results), default=-1)


# CI holds this through the study: tests/fault/test_trial_faults.py's faulty study has a
# NaN trial, recorded FAILED in MLflow and Optuna with this reason.
@pytest.mark.slow
def test_nan_loss_stops_trial_with_reason(tiny_teacher, workspace):
    result = fit_tiny(tiny_settings(), "nan", workspace, tiny_teacher, nan_at_step=3)
    with pytest.raises(TrialError, match="non-finite loss .* at step 3"):
        final_metrics(result)
