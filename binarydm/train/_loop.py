"""The per-worker training loop that Ray Train runs: FP teacher pretraining or BinaryDM QAT.

One loop serves both modes so they share data order, checkpoints and resume; what
differs is a ``binarydm.train._modes`` object chosen once, and the step itself is
``binarydm.train.step``. Under ``TorchTrainer`` every worker runs it with DDP (gloo on
CPU, NCCL on GPU); the progressive schedule and EBB switch are applied from the step
number on every rank. Rank 0 writes checkpoints and, at the end of QAT, evaluates. A
one-worker trial can also run it inline in its Ray Tune trial actor
(``workers.inline``); the session object (``binarydm.train._session``) is the only
difference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from binarydm.data import cache_dir as resolve_cache_dir
from binarydm.metric_contract import RUNG, RUNG_STEP, timing
from binarydm.quant import use_composed_quantizers_
from binarydm.train._batches import batch_indices
from binarydm.train._checkpoint import link_state, load_latest_valid, save_state
from binarydm.train._compile_cache import cache_folder, load_compile_cache, save_compile_cache
from binarydm.train._diffusion import noise_scheduler, noisy_batch
from binarydm.train._ema import ModelEMA
from binarydm.train._modes import training_mode
from binarydm.train._progress import progress_bar
from binarydm.train._session import report_checkpoint
from binarydm.train.job import FaultPlan, WorkerJob
from binarydm.train.settings import TrialSettings
from binarydm.train.step import NonFiniteLossError, StepParts

__all__ = ["FAULT_KEYS", "NonFiniteLossError", "run_loop", "train_loop_per_worker"]

#: The fault-injection keys of the fault-tolerance tests (``FaultPlan``'s fields).
FAULT_KEYS = FaultPlan.keys()
#: Largest training set (bytes) kept on the GPU for the whole run.
DEVICE_DATA_LIMIT = 4 << 30

CHECKPOINT_S = timing("checkpoint_s")


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def load_training_images(settings: TrialSettings, data_root: str | None, cache_dir: str | None):
    from binarydm.data import load_images

    data = settings.data
    array = load_images(
        data.source,
        "train",
        data.resolution,
        data.channels,
        data_root=data_root,
        cache_dir=cache_dir,
        limit=data.train_limit,
        path=data.path,
    )
    # Kept as uint8 (a quarter of float32's bytes, no whole-set conversion at start-up);
    # each drawn batch is scaled by ``to_unit_range``.
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] to float32 in [-1, 1], the diffusion model's data range."""
    return batch.float().div(127.5).sub(1.0)


def to_training_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Keep a small training set on the GPU (CIFAR-10 is 150 MB) so a step reads no host
    memory; a large one stays on the host as it is (pinning tens of GB could fail)."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() <= min(DEVICE_DATA_LIMIT, free // 8):
        return images.to(device)
    return images


def metrics_keys() -> tuple[str, ...]:
    return ("loss", "loss_noise", "loss_lrm", "loss_ebb")


class WorkerClock:
    """The worker's own timing, all of it here: set-up parts, training and checkpoint time.

    Perf-counter reads between phases only, nothing inside a step. The wall-clock stamp
    of entry (and of the final report) lets the driver tell Ray Train's start-up and
    shutdown from the worker's time.
    """

    def __init__(self) -> None:
        self.entered, self.entered_unix = time.perf_counter(), time.time()
        self._mark = self.entered
        self.setup_parts: dict[str, float] = {}
        self.train_start = self.entered
        self.checkpoint_s = 0.0

    def lap(self, part: str) -> None:
        """End set-up part ``part`` (``timing/setup_<part>_s``), begun at the previous lap."""
        now = time.perf_counter()
        self.setup_parts[timing(f"setup_{part}_s")] = now - self._mark
        self._mark = now

    def start_training(self) -> None:
        self.train_start = time.perf_counter()

    def metrics(self, images_seen: int, tail: dict[str, Any]) -> dict[str, float]:
        """Throughput and times so far, the previous attempts' (``tail``) added."""
        elapsed = time.perf_counter() - self.train_start
        out = {
            "train_images_per_s": images_seen / elapsed if elapsed else 0.0,
            "train_s": elapsed + tail.get("train_s", 0.0),
            # Worker start to first step (data, models, DDP, resume): trial overhead.
            timing("setup_s"): self.train_start - self.entered + tail.get(timing("setup_s"), 0.0),
        }
        for key, seconds in self.setup_parts.items():
            out[key] = seconds + tail.get(key, 0.0)
        out[CHECKPOINT_S] = self.checkpoint_s + tail.get(CHECKPOINT_S, 0.0)
        return out


@dataclasses.dataclass
class _Run:
    """One worker's run once set up: what the step loop, reports and the end read."""

    job: WorkerJob
    mode: Any  # TeacherMode | QATMode
    session: Any
    clock: WorkerClock
    images: torch.Tensor
    parts: StepParts
    ddp_model: torch.nn.Module
    start_step: int = 0
    resume_notes: list[str] = dataclasses.field(default_factory=list)
    curve_tail: dict[str, Any] = dataclasses.field(default_factory=dict)
    saved_step: int | None = None  # the step last saved by this process

    @property
    def recipe(self):
        return self.mode.recipe

    def state(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds to resume training at ``step``."""
        parts = self.parts
        return {
            "step": step,
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "lr_scheduler": parts.lr_scheduler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "lrm": parts.lrm.state_dict() if parts.lrm is not None else None,
            "metrics": metrics,
        }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds the ``WorkerJob`` (``job.JOB_KEY``)."""
    from binarydm.train._session import RayTrainSession

    run_loop(WorkerJob.from_train_loop_config(config), RayTrainSession())


def run_loop(job: WorkerJob, session) -> None:
    """The loop of one worker in ``session`` (``binarydm.train._session``)."""
    clock = WorkerClock()
    job.faults.on_start(session.rank)
    run = _set_up(job, session, clock)
    try:
        metrics = _train(run)
    except NonFiniteLossError as exc:
        # Stop without raising: Ray Train would retry a deterministic failure. Every rank
        # saw the same all-reduced flag, so all report once and return.
        _report_error(session, exc, job.mode)
        return
    _finish(run, metrics)


def _set_up(job: WorkerJob, session, clock: WorkerClock) -> _Run:
    """Data, models, optimizer, resume state and DDP: everything before the first step."""
    mode, device = training_mode(job), session.device
    if device.type == "cuda":
        # The CUDA context, if selecting the device did not make it yet: timed on its own,
        # not in the set-up parts below.
        torch.cuda.synchronize(device)
        # Shapes are fixed for the whole run: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True
    clock.lap("device")
    images = load_training_images(job.settings, job.data_root, job.cache_dir)
    images = to_training_device(images, device)
    clock.lap("data")
    # Loaded (first use imports diffusers' UNet), copied, binarised, on the device.
    model, teacher = mode.build(device)
    clock.lap("build")
    lrm = mode.make_lrm(model, teacher, device)
    clock.lap("lrm")
    parts = _step_parts(mode, model, lrm, device)
    run = _Run(job, mode, session, clock, images, parts, ddp_model=model)
    _resume(run)
    run.ddp_model = session.prepare_model(model, find_unused=mode.may_leave_unused(model))
    parts.forward_model = run.ddp_model
    return run


def _step_parts(mode, model, lrm, device: torch.device) -> StepParts:
    recipe = mode.recipe
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    scheduler_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(
            s, warmup=recipe.warmup_steps, total=recipe.steps, schedule=recipe.lr_schedule
        ),
    )
    return StepParts(
        model,
        optimizer,
        scheduler_lr,
        lrm=lrm,
        ema_decay=recipe.ema_decay,
        ema_warmup=recipe.ema_warmup,
        tau=mode.tau,
        grad_clip=recipe.grad_clip,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
    )


def _resume(run: _Run) -> None:
    """Load the session's checkpoint (or the newest valid one before it), if any."""
    checkpoint = run.session.checkpoint_path()
    if checkpoint is None:
        return
    state, run.resume_notes = load_latest_valid(checkpoint)
    print(f"[binarydm] rank {run.session.rank}: resuming from {checkpoint}", flush=True)
    if state is None:
        return
    parts = run.parts
    run.start_step = state["step"]
    run.mode.restore_schedule(parts.model, run.start_step)
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if parts.lrm is not None and state.get("lrm") is not None:
        parts.lrm.load_state_dict(state["lrm"])
    if parts.ema_decay and state.get("ema") is not None:
        parts.ema = ModelEMA(parts.model, parts.ema_decay, warmup=parts.ema_warmup)
        parts.ema.load_state_dict(state["ema"])
    run.curve_tail = state.get("metrics", {})


def _compile(run: _Run) -> None:
    """Compile the forward after the first step, whose eager forward initialised the
    quantizers: compiling that pass would trace the initialisation, then recompile the
    whole UNet when the flags flip. Evaluation and checkpoints use the eager modules."""
    # The student's quantizers as plain ops: no custom autograd.Function in the graph
    # (Dynamo dropped one's input gradient on the GPU build, and AOTAutograd's cache skips
    # them by default: binarydm.quant.use_composed_quantizers_). The EMA and evaluation
    # read the same values either way.
    use_composed_quantizers_(run.parts.model)
    folder = _compile_cache_folder(run)
    if folder is not None:
        loaded = load_compile_cache(folder)
        if loaded["files"] or loaded["skipped"]:
            print(
                f"[binarydm] rank {run.session.rank}: compile cache {folder}: "
                f"{loaded['entries']} entries from {loaded['files']} file(s) in "
                f"{loaded['load_s']:.1f} s, {loaded['skipped']} unreadable skipped",
                flush=True,
            )
    options = run.recipe.compile_options
    run.parts.forward_model = torch.compile(run.ddp_model, **options)
    if run.parts.lrm is not None:
        run.parts.lrm.compile_teacher(**options)
    run.parts.graph_steps = options.get("mode") == "reduce-overhead"


def _compile_cache_folder(run: _Run) -> Path | None:
    """Where this run's compile artifacts are loaded from and saved (None: not carried)."""
    if not run.job.settings.training.compile_cache:
        return None
    return cache_folder(resolve_cache_dir(run.job.cache_dir))


def _save_compile_cache(run: _Run) -> None:
    """What this process compiled, for the next machine: after the first compiled step
    (a trial cut off later still leaves it) and after the last step, with the graphs of
    every later stage. One rank writes (the ranks compile the same graphs)."""
    folder = _compile_cache_folder(run)
    if folder is None or run.session.rank != 0:
        return
    saved = save_compile_cache(folder)
    if saved is not None:
        size = saved.stat().st_size / 2**20
        print(f"[binarydm] compile cache saved: {saved} ({size:.1f} MiB)", flush=True)


def _batch(run: _Run, step: int, noise_sched):
    """The step's noisy batch: a pure function of (seed, step, rank), so resume repeats it."""
    recipe, session = run.recipe, run.session
    idx = batch_indices(
        step,
        rank=session.rank,
        world_size=session.world_size,
        batch_size=recipe.batch_size,
        num_items=run.images.shape[0],
        seed=recipe.seed,
    )
    device = session.device
    clean = to_unit_range(run.images[idx.to(run.images.device)].to(device, non_blocking=True))
    # Noise drawn on the training device: a host-side draw would be copied from pageable
    # memory every step.
    generator = torch.Generator(device=device).manual_seed(
        (recipe.seed * 7919 + step) * 131 + session.rank
    )
    return noisy_batch(clean, noise_sched, generator)


def _train(run: _Run) -> dict[str, Any]:
    """Steps ``start_step`` to the end, with reports and checkpoints on their cadence;
    returns the last report's metrics."""
    recipe, mode, session, faults = run.recipe, run.mode, run.session, run.job.faults
    noise_sched = noise_scheduler(recipe.num_train_timesteps)
    progress = progress_bar(mode.label, recipe.steps, run.start_step) if session.rank == 0 else None
    run.parts.model.train()
    window = _Window()
    run.clock.start_training()
    images_seen, metrics = 0, dict(run.curve_tail)
    # The step compiled from: the second of this process's (see _compile); None: eager.
    first_compiled = run.start_step + 1 if recipe.compile_options is not None else None
    for step in range(run.start_step, recipe.steps):
        if step == first_compiled:
            _compile(run)
        mode.before_step(run.parts, step)
        x_t, t, noise = _batch(run, step, noise_sched)
        faults.before_step(step, session.rank)
        losses = mode.step(run.parts, x_t, t, faults.poison(step, noise), step=step)
        if step == first_compiled:
            _save_compile_cache(run)
        images_seen += x_t.shape[0] * session.world_size
        if progress is not None:
            progress.update(1)
        window.add(losses.values())
        done = step + 1
        metrics = _after_step(run, window, done, images_seen, metrics)
        faults.after_report(done, run.start_step, session.rank)
    if progress is not None:
        progress.close()
    if first_compiled is not None and first_compiled < recipe.steps:
        # The graphs compiled later (progressive stages, the EBB switch, rungs) too.
        _save_compile_cache(run)
    return metrics


def _after_step(run: _Run, window, done: int, images_seen: int, metrics: dict[str, Any]):
    """Report step ``done`` on its cadence (a checkpoint, a log line, an early-stopping
    rung); returns the training metrics of the latest report (without the rung's)."""
    recipe = run.recipe
    is_ckpt = done % recipe.checkpoint_every == 0 or done == recipe.steps
    is_log = done % recipe.log_every == 0
    is_rung = done in run.job.rungs.steps
    if is_log or is_ckpt or is_rung:
        metrics = _window_metrics(run, window.take(), done, images_seen)
    rung = _rung_metrics(run, done) if is_rung else {}
    if is_ckpt:
        _save_checkpoint(run, metrics, done, rung)
    elif is_log or is_rung:
        run.session.report({**metrics, **rung}, None, None)
    return metrics


def _rung_metrics(run: _Run, done: int) -> dict[str, Any]:
    """What rung ``done`` reports: its index and step, and (rank 0) the proxy and costs.

    Scored on the model the final evaluation uses; the model is back in training mode
    after it (the proxy scores a copy).
    """
    from binarydm.train._evaluate import rung_proxy

    out: dict[str, Any] = {RUNG: run.job.rungs.steps.index(done), RUNG_STEP: done}
    if run.session.rank != 0:
        return out
    parts, settings = run.parts, run.job.settings
    use_ema = parts.ema is not None and settings.evaluation.use_ema
    model = parts.ema.module if use_ema else parts.model
    plan = run.job.rungs
    fid = None if plan.fid_samples is None else (plan.fid_samples, plan.fid_sampling_steps)
    out.update(
        rung_proxy(
            model, settings, data_root=run.job.data_root, cache_dir=run.job.cache_dir, fid=fid
        )
    )
    return out


class _Window:
    """Loss components summed over the steps since the last report."""

    def __init__(self) -> None:
        self.sums, self.n = [0.0] * len(metrics_keys()), 0

    def add(self, values) -> None:
        self.sums = [s + v for s, v in zip(self.sums, values, strict=True)]
        self.n += 1

    def take(self) -> dict[str, float]:
        means = {k: s / self.n for k, s in zip(metrics_keys(), self.sums, strict=True)}
        self.sums, self.n = [0.0] * len(metrics_keys()), 0
        return means


def _window_metrics(run: _Run, means: dict[str, float], done: int, images_seen: int):
    metrics = dict(means)
    metrics.update(step=done, lr=run.parts.lr_scheduler.get_last_lr()[0], mode=run.mode.name)
    metrics["resumed_from_step"] = run.start_step
    metrics.update(run.clock.metrics(images_seen, run.curve_tail))
    if run.resume_notes:
        metrics["resume_note"] = "; ".join(run.resume_notes)
    return metrics


def _save_checkpoint(
    run: _Run, metrics: dict[str, Any], done: int, rung: dict[str, Any] | None = None
) -> None:
    # After a fallback the steps since the older checkpoint are trained again; their
    # checkpoints get new names, or Ray Train, evicting the old result of the same name,
    # would delete the new folder.
    suffix = f"-refit{run.start_step:08d}" if run.resume_notes else ""
    mark = time.perf_counter()

    rung = rung or {}

    def write(folder: Path, reported: dict[str, Any]) -> None:
        # A resume restores the training metrics, not the rung's report.
        kept = {k: v for k, v in reported.items() if k not in rung}
        save_state(folder, run.state(done, kept), step=done)

    report_checkpoint(run.session, {**metrics, **rung}, f"checkpoint_{done:08d}{suffix}", write)
    run.clock.checkpoint_s += time.perf_counter() - mark
    run.saved_step = done


def _finish(run: _Run, metrics: dict[str, Any]) -> None:
    """Final report: the teacher's diffusers folder, or the QAT evaluation (rank 0).

    Where this process saved the last step's checkpoint, the final one links its state
    instead of saving the same 570 MB (ddpm-cifar10) again.
    """
    tail, metrics = run.curve_tail, dict(metrics)
    steps = run.recipe.steps
    # Wall-clock stamps in the final report let the driver tell Ray Train's own start-up
    # and shutdown from the worker's time (the curve callback skips final reports).
    metrics["worker_entered_unix"] = run.clock.entered_unix
    metrics[CHECKPOINT_S] = run.clock.checkpoint_s + tail.get(CHECKPOINT_S, 0.0)
    reuse = run.session.last_checkpoint if run.saved_step == steps else None

    def write(folder: Path, final: dict[str, Any]) -> None:
        run.mode.write_final(run.parts, folder, final)
        mark = time.perf_counter()
        # A linked state keeps the training metrics of its step (what a resume reads);
        # the evaluation's are in this report.
        if reuse is None or not link_state(reuse, folder):
            save_state(folder, run.state(steps, final), step=steps)
        final[CHECKPOINT_S] = final.get(CHECKPOINT_S, 0.0) + time.perf_counter() - mark
        final.update(final=True, final_report_unix=time.time())

    if run.session.rank != 0:  # rank 0 stamps its report once its checkpoint is written
        metrics.update(final=True, final_report_unix=time.time())
    report_checkpoint(run.session, metrics, "checkpoint_final", write)


def _report_error(session, error: NonFiniteLossError, mode: str) -> None:
    """Report a terminal error with a marker checkpoint: Ray Train's Result keeps only the
    metrics that came with a checkpoint, and the driver must see why the run stopped.
    ``diverged`` says, as a field, that the loss became non-finite (``runner.TrialError``
    becomes ``DivergedTrialError`` on it)."""
    import json

    metrics = {
        "error": error.reason, "diverged": True, "step": error.step, "final": False, "mode": mode,
    }  # fmt: skip

    def write(folder: Path, reported: dict[str, Any]) -> None:
        (folder / "error.json").write_text(json.dumps(reported))

    report_checkpoint(session, metrics, f"error_{error.step:08d}", write)
