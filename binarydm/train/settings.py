"""Typed settings of one trial: data, teacher, QAT, evaluation and Ray Train workers.

A study file's fixed part is exactly a ``TrialSettings``; a search space addresses
its fields by dotted keys (``training.lr``, ``method.lrm.weight``). Everything is
a frozen dataclass built strictly by ``binarydm._typed.build`` so bad values fail
with one line naming the key, before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from binarydm._typed import FrozenConfig, require
from binarydm.quant.config import BinaryDMConfig

DataSource = Literal["mnist", "cifar10", "npz", "image-folder"]
FID_DIMS = (64, 192, 768, 2048)
#: How sampling runs its denoising step (``binarydm.train._denoiser``).
SampleCompile = Literal["none", "default", "reduce-overhead"]
#: Images per Inception forward of the FID when ``evaluation.fid_batch_size`` is unset.
FID_BATCH_CPU, FID_BATCH_CUDA = 100, 500


@dataclass(frozen=True)
class DataSettings:
    """Which images, at which resolution. ``root`` overrides BINARYDM_DATA_ROOT."""

    source: DataSource = "mnist"
    path: str | None = None  # the file/folder for npz and image-folder
    root: str | None = None
    resolution: int = 16
    channels: int = 1
    train_limit: int | None = None  # use the first N (shuffled) training images

    def __post_init__(self) -> None:
        require(
            self.resolution in (8, 16, 32, 64, 128, 256),
            "data.resolution",
            self.resolution,
            "a power of two in 8..256",
        )
        require(self.channels in (1, 3), "data.channels", self.channels, "1 or 3")
        if self.source in ("npz", "image-folder"):
            require(
                self.path is not None,
                "data.path",
                self.path,
                f"a file or folder path when data.source is {self.source!r}",
            )


@dataclass(frozen=True)
class TeacherSettings:
    """The FP teacher: a preset pretrained here (cached) or a diffusers model to load."""

    preset: str = "tiny"
    pretrained: str | None = None  # a diffusers model directory or hub id; skips pretraining
    seed: int = 0  # its own seed: every QAT seed of a study distils the same teacher
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4
    # The pretrained teacher is the EMA of its weights (DDPM's standard), with the decay
    # warmed up as min(ema_decay, (1 + s) / (10 + s)); 0 = the raw weights.
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        require(self.steps >= 1, "teacher.steps", self.steps, "an integer >= 1")
        require(0 <= self.ema_decay < 1, "teacher.ema_decay", self.ema_decay, "a float in [0, 1)")
        require(self.batch_size >= 1, "teacher.batch_size", self.batch_size, "an integer >= 1")
        require(self.lr > 0, "teacher.lr", self.lr, "a float > 0")


@dataclass(frozen=True)
class TrainingSettings:
    """QAT optimisation. ``batch_size`` is per worker; steps count optimizer updates."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = no EMA
    # Warm the EMA decay up as min(ema_decay, (1 + n) / (10 + n)) over its n updates, so a
    # short run's average is not dominated by the freshly binarized start.
    ema_warmup: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 2
    num_train_timesteps: int = 1000
    log_every: int = 50
    # torch.compile the student's and the teacher's training forward from the second step:
    # pays off over long runs (compiling takes minutes on a GPU, each progressive stage
    # recompiles once); evaluation stays eager.
    compile: bool = False
    # torch.compile's mode. "reduce-overhead" replays each compiled forward and backward as
    # CUDA graphs: a step of this UNet at batch 128 is host-bound without them (on a CPU
    # it is the same as "default").
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # torch.compile's backend. "aot_eager" traces the same graphs (dynamo and AOTAutograd,
    # the same guards and recompiles) and runs them without inductor's code generation:
    # for finding a compile problem, and for CPU tests, where inductor's C++ build takes
    # minutes a graph. Only "inductor" is faster than eager; compile_mode applies to it.
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    # With training.compile: hot-load the compiled graphs that earlier trials saved under
    # <cache dir>/compile before compiling, and save this trial's there after its first
    # compiled step and after its last (binarydm.train._compile_cache): a fresh machine
    # given that folder starts warm (an H200's BinaryDM step: 21.7 s instead of 212 s).
    # A file is about 160 MB on ddpm-cifar10.
    compile_cache: bool = True

    def compile_options(self) -> dict[str, str]:
        """``torch.compile`` keyword arguments of this training (mode: inductor only)."""
        if self.compile_backend == "inductor":
            return {"backend": "inductor", "mode": self.compile_mode}
        return {"backend": self.compile_backend}

    def __post_init__(self) -> None:
        require(self.steps >= 1, "training.steps", self.steps, "an integer >= 1")
        require(self.batch_size >= 1, "training.batch_size", self.batch_size, "an integer >= 1")
        require(self.lr > 0, "training.lr", self.lr, "a float > 0")
        require(
            self.compile or self.compile_mode == "default",
            "training.compile_mode",
            self.compile_mode,
            "'default' unless training.compile is true (nothing is compiled otherwise)",
        )
        require(
            self.compile_backend == "inductor" or self.compile_mode == "default",
            "training.compile_mode",
            self.compile_mode,
            f"'default' with training.compile_backend={self.compile_backend!r} (modes are "
            "inductor's)",
        )
        require(0 <= self.ema_decay < 1, "training.ema_decay", self.ema_decay, "a float in [0, 1)")
        require(
            self.checkpoint_every >= 1,
            "training.checkpoint_every",
            self.checkpoint_every,
            "an integer >= 1",
        )
        require(
            self.keep_checkpoints >= 2,
            "training.keep_checkpoints",
            self.keep_checkpoints,
            "an integer >= 2 (a corrupt newest checkpoint falls back to the previous)",
        )
        require(
            self.max_failures >= -1,
            "training.max_failures",
            self.max_failures,
            "an integer >= -1 (-1 = retry forever)",
        )
        require(self.grad_clip >= 0, "training.grad_clip", self.grad_clip, "a float >= 0")


@dataclass(frozen=True)
class EvalSettings:
    """Sampling and scoring. FIDs are comparable only at equal settings (logged with each)."""

    fid_samples: int = 1000
    fid_dims: int = 192
    sampling_steps: int = 100
    sample_batch_size: int = 250
    reference_split: Literal["train", "test"] = "test"
    test_loss_images: int = 512
    grid_images: int = 64
    use_ema: bool = True
    # Improved precision/recall (Kynkaanniemi et al. 2019) from the FID features: the k of
    # its k-NN manifolds (the paper's 3); 0 = not computed.
    precision_recall_k: int = 3
    # The sampling step: "none" runs the model eagerly; "default" compiles it with
    # torch.compile (inductor) at the batch sample_batch_size, the last batch padded;
    # "reduce-overhead" also replays it as a CUDA graph (the eager step of this UNet is
    # host-bound on a GPU). Compiling takes minutes on a CPU: for GPU studies.
    sample_compile: SampleCompile = "none"
    # Images per Inception forward of the FID (the last batch padded to it, so features
    # do not depend on it); None = FID_BATCH_CPU on a CPU, FID_BATCH_CUDA on a GPU.
    fid_batch_size: int | None = None

    def fid_batch(self, device_type: str) -> int:
        """The FID's Inception batch on a device of ``device_type`` ("cpu", "cuda")."""
        if self.fid_batch_size is not None:
            return self.fid_batch_size
        return FID_BATCH_CUDA if device_type == "cuda" else FID_BATCH_CPU

    def __post_init__(self) -> None:
        require(
            self.fid_dims in FID_DIMS, "evaluation.fid_dims", self.fid_dims, f"one of {FID_DIMS}"
        )
        require(
            self.fid_samples > self.fid_dims,
            "evaluation.fid_samples",
            self.fid_samples,
            f"more samples than fid_dims={self.fid_dims} (else the covariance is singular)",
        )
        require(
            self.sampling_steps >= 1,
            "evaluation.sampling_steps",
            self.sampling_steps,
            "an integer >= 1",
        )
        require(
            0 <= self.precision_recall_k < self.fid_samples,
            "evaluation.precision_recall_k",
            self.precision_recall_k,
            f"an integer in [0, fid_samples={self.fid_samples}) (0 = off; the paper's 3)",
        )
        require(
            self.test_loss_images >= 1,
            "evaluation.test_loss_images",
            self.test_loss_images,
            "an integer >= 1",
        )
        require(
            self.fid_batch_size is None or self.fid_batch_size >= 1,
            "evaluation.fid_batch_size",
            self.fid_batch_size,
            "an integer >= 1, or null for the device's default",
        )


@dataclass(frozen=True)
class WorkerSettings:
    """Ray Train workers of one trial (DDP): gloo on CPU, NCCL on GPU."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # fractional GPUs let small trials share a card
    # One worker run in the trial's own process instead of a Ray Train fit: saves the
    # fit's start-up and shutdown around every trial (binarydm.train._session).
    inline: bool = False

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "workers.num_workers", self.num_workers, "an integer >= 1")
        require(
            not self.inline or self.num_workers == 1,
            "workers.inline",
            self.inline,
            "false when workers.num_workers > 1 (an inline run has one worker)",
        )
        require(
            self.cpus_per_worker > 0,
            "workers.cpus_per_worker",
            self.cpus_per_worker,
            "a number > 0",
        )
        require(
            0 < self.gpus_per_worker <= 8,
            "workers.gpus_per_worker",
            self.gpus_per_worker,
            "a number in (0, 8]",
        )


@dataclass(frozen=True)
class TrialSettings(FrozenConfig):
    """Everything one trial needs: FP teacher -> BinaryDM QAT -> samples -> FID/OPs/size."""

    #: Version of this schema (FrozenConfig), written with the settings into each run's
    #: ``config.json`` and the worker's checkpoints; the method's own is ``method``'s.
    CONFIG_VERSION: ClassVar[int] = 1

    data: DataSettings = field(default_factory=DataSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    method: BinaryDMConfig = field(default_factory=BinaryDMConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        from binarydm.models import resolution_levels
        from binarydm.schedule import check_schedule

        # The student has the teacher's architecture; a hub id's is known only once loaded,
        # and the trial checks it there.
        levels = resolution_levels(self.teacher.pretrained or self.teacher.preset)
        if levels is not None:
            check_schedule(levels, self.method, self.training.steps, prefix="method.")
