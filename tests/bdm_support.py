"""Builders shared by tests in several folders (importable: tests/ is on sys.path).

Kept out of conftest.py on purpose: with a conftest in tests/integration as well,
``from bdm_support import ...`` would resolve to whichever conftest was imported first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER_START_TIMEOUT_S = 120
LRM_STUDY = str(Path(__file__).resolve().parents[1] / "search_spaces" / "lrm_rank.yaml")
#: ``--set`` arguments of seconds-long trials of lrm_rank.yaml; the teacher keys match
#: ``tiny_settings`` so studies share the session's cached tiny teacher.
TINY_STUDY = [
    "--set", "teacher.steps=40", "--set", "teacher.batch_size=32",
    "--set", "training.steps=10", "--set", "training.batch_size=16",
    "--set", "training.checkpoint_every=5", "--set", "training.log_every=5",
    "--set", "evaluation.fid_samples=100", "--set", "evaluation.sampling_steps=4",
    "--set", "evaluation.test_loss_images=64", "--set", "evaluation.sample_batch_size=100",
]  # fmt: skip


def small_unet(sample_size: int = 16, channels: int = 3, seed: int = 0):
    """A 3-level diffusers UNet with attention in level 1: every binarize_ code path."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def micro_unet(sample_size: int = 8, channels: int = 1, seed: int = 0):
    """A 2-level diffusers UNet without attention (about 42k parameters binarized): the
    least a compile test can build, since inductor's CPU build costs minutes a graph."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )


def tiny_settings(**overrides):
    """A trial that runs in seconds on a CPU: tiny UNet, MNIST 16 px, 64-d FID."""
    from binarydm.train.settings import TrialSettings

    base = {
        "teacher.steps": 40,
        "teacher.batch_size": 32,
        "training.steps": 20,
        "training.batch_size": 16,
        "training.checkpoint_every": 10,
        "training.log_every": 10,
        "evaluation.fid_samples": 100,
        "evaluation.fid_dims": 64,
        "evaluation.sampling_steps": 4,
        "evaluation.sample_batch_size": 100,
        "evaluation.test_loss_images": 64,
        "evaluation.grid_images": 16,
    }
    base.update(overrides)
    return TrialSettings().replace(**base)


def fit_tiny(settings, name, workspace, teacher, callbacks=None, evaluate=True, **faults):
    """``fit_qat`` of ``settings`` in the test ``workspace``; ``faults``: the fields of a
    ``binarydm.train.job.FaultPlan``."""
    from binarydm.train._runner import fit_qat
    from binarydm.train.job import FaultPlan

    return fit_qat(
        settings,
        name=name,
        storage_path=workspace["storage"],
        teacher_dir=teacher,
        data_root=workspace["data_root"],
        cache_dir=workspace["cache_dir"],
        callbacks=callbacks,
        faults=FaultPlan.from_mapping(faults),
        evaluate=evaluate,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """An ``mlflow server`` subprocess in its own process group, so stopping it leaves nothing."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # The job runner spawns seven huey consumers and nearly doubles start-up on 2 cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # crashed: the log says why
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise AssertionError(
            f"mlflow server at {self.url} did not become healthy; log tail:\n{tail}"
        )

    def stop(self) -> None:
        """SIGKILL to the group led by the PID we started: a crash, and no straggling uvicorn."""
        if self.process is None:
            return
        # Even when the CLI parent already died, its uvicorn child may live on in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
