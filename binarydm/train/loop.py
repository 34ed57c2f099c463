"""The per-worker training loop that Ray Train runs: FP teacher pretraining or BinaryDM QAT.

One function serves both modes so they share data order, checkpoints and
resume. Under ``TorchTrainer`` every worker runs it with DDP (gloo on CPU, NCCL on
GPU); the progressive schedule and EBB switch are applied from the step number on
every rank. Rank 0 writes checkpoints and, at the end of QAT, evaluates. A one-worker
trial can also run it inline in its Ray Tune trial actor (``workers.inline``); the
session object (``binarydm.train.session``) is the only difference.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from binarydm.train.batches import batch_indices
from binarydm.train.checkpoint import link_state, load_latest_valid, save_state
from binarydm.train.diffusion import noise_scheduler, noisy_batch
from binarydm.train.ema import ModelEMA
from binarydm.train.settings import TrialSettings

#: Worker-config keys that inject faults, for the fault-tolerance tests (tests/fault): a NaN
#: loss at a step, rank 0's PID written to a file (to kill it), a simulated OOM at a step while
#: a counter file allows, and a hold after the report of a step while a file exists.
FAULT_KEYS = (
    "nan_at_step", "pid_file", "pid_rank", "fail_at_step", "fail_marker", "hold_at_step",
    "hold_file",
)  # fmt: skip
HOLD_LIMIT_S = 600.0
#: Largest training set (bytes) kept on the GPU for the whole run.
DEVICE_DATA_LIMIT = 4 << 30


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the trial stops and is recorded FAILED with this reason."""


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _load_training_images(settings: TrialSettings, data_root: str | None, cache_dir: str | None):
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


def _build_models(
    settings: TrialSettings, mode: str, teacher_dir: str | None, device: torch.device
):
    """The model to train and, for QAT, the frozen teacher, both on ``device``."""
    from binarydm.models import build_unet, load_unet

    if mode == "teacher":
        torch.manual_seed(settings.teacher.seed)
        model = build_unet(
            settings.teacher.preset,
            in_channels=settings.data.channels,
            sample_size=settings.data.resolution,
        )
        return model.to(device), None
    from binarydm.quant import binarize_

    # Moved first, then copied and binarised on the device, not by the host's cores, which
    # the trials of a wave share while they all start (benchmarks/results/gpu_perf.md,
    # session 6: the start-up probe).
    student = load_unet(teacher_dir).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    binarize_(student, settings.method)  # its layers stay on the weights' device
    return student, teacher


def may_leave_unused(model: torch.nn.Module, method) -> bool:
    """Whether some parameter can get no gradient in a step, so DDP must look for them.

    Inactive progressive stages and the steps of disabled (32-bit) quantizers get none
    (the basis EBB drops does: all bases' scales are one tensor). Searching costs DDP an
    autograd-graph walk every step, so it is asked for only then: never for FP teacher
    training, not for a plain W1A4 run.
    """
    if method is None:
        return False
    from binarydm.quant import LSQQuantizer

    if method.progressive.stage_steps > 0:
        return True
    return any(isinstance(m, LSQQuantizer) and not m.enabled for m in model.modules())


def _step_values(*losses: torch.Tensor) -> tuple[bool, list[float]]:
    """Whether every rank's losses are finite, and this rank's values: ONE host sync a step.

    The finite flag is all-reduced so every rank stops at the same step; reading it and
    the logged values together keeps the CPU from waiting on the GPU more than once.
    """
    values = torch.stack([loss.detach().float().reshape(()) for loss in losses])
    flag = torch.isfinite(values).all().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    host = torch.cat([flag, values]).tolist()
    return host[0] > 0, host[1:]


def _to_training_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Keep a small training set on the GPU (CIFAR-10 is 150 MB) so a step reads no host
    memory; a large one stays on the host as it is (pinning tens of GB could fail)."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() <= min(DEVICE_DATA_LIMIT, free // 8):
        return images.to(device)
    return images


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config``: settings, mode, teacher_dir, data_root, cache_dir."""
    from binarydm.train.session import RayTrainSession

    run_loop(config, RayTrainSession())


def run_loop(config: dict[str, Any], session) -> None:
    """The loop of one worker in ``session`` (``binarydm.train.session``)."""
    entered, entered_unix = time.perf_counter(), time.time()
    settings = TrialSettings.from_dict(config["settings"])
    mode = config["mode"]
    # The teacher's data order and noise follow the teacher's seed, QAT's the trial's.
    seed = settings.teacher.seed if mode == "teacher" else settings.seed
    rank, world = session.rank, session.world_size
    device = session.device
    if config.get("pid_file") and rank == config.get("pid_rank", 0):
        Path(config["pid_file"]).write_text(str(os.getpid()))
    if device.type == "cuda":
        # The CUDA context, if selecting the device did not make it yet: timed on its own,
        # not in the set-up parts below.
        torch.cuda.synchronize(device)
        # Shapes are fixed for the whole run: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True
    setup_parts = {"setup_device_s": time.perf_counter() - entered}
    mark = time.perf_counter()
    images = _load_training_images(settings, config.get("data_root"), config.get("cache_dir"))
    images = _to_training_device(images, device)
    setup_parts["setup_data_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # Loaded (first use imports diffusers' UNet), copied, binarised, on the device.
    model, teacher = _build_models(settings, mode, config.get("teacher_dir"), device)
    setup_parts["setup_build_s"] = time.perf_counter() - mark
    mark = time.perf_counter()

    train = settings.training if mode == "qat" else None
    steps = train.steps if train else settings.teacher.steps
    batch_size = train.batch_size if train else settings.teacher.batch_size
    lr = train.lr if train else settings.teacher.lr
    method = settings.method if mode == "qat" else None

    ebb_switch = None
    if method is not None:
        from binarydm.quant import num_levels
        from binarydm.schedule import check_schedule

        # The settings checked this for presets and local folders; a hub model's levels
        # are known only now.
        check_schedule(num_levels(model), method, steps, prefix="method.")
        ebb_switch = method.ebb.switch_step(steps) if method.ebb.enabled else None

    lrm = None
    if method is not None and method.lrm.enabled:
        from binarydm.distill import LowRankMimicking

        lrm = LowRankMimicking(model, teacher, method.lrm).to(device)
    setup_parts["setup_lrm_s"] = time.perf_counter() - mark

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=train.weight_decay if train else 0.0
    )
    scheduler_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(
            s,
            warmup=train.warmup_steps if train else 0,
            total=steps,
            schedule=train.lr_schedule if train else "constant",
        ),
    )
    # The teacher keeps DDPM's warmed-up EMA and is saved as it; QAT's is configurable.
    ema_decay = train.ema_decay if train else settings.teacher.ema_decay
    ema_warmup = train.ema_warmup if train else True
    ema = None
    start_step, resume_notes, curve_tail = 0, [], {}
    checkpoint = session.checkpoint_path()
    state = None
    if checkpoint is not None:
        state, resume_notes = load_latest_valid(checkpoint)
        print(f"[binarydm] rank {rank}: resuming from {checkpoint}", flush=True)
    if state is not None:
        start_step = state["step"]
        if method is not None:
            from binarydm.schedule import apply_schedule

            # Quantizer on/off and basis count must match the saved step before loading.
            apply_schedule(model, max(0, start_step - 1), steps, method)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler_lr.load_state_dict(state["lr_scheduler"])
        if lrm is not None and state.get("lrm") is not None:
            lrm.load_state_dict(state["lrm"])
        if ema_decay and state.get("ema") is not None:
            ema = ModelEMA(model, ema_decay, warmup=ema_warmup)
            ema.load_state_dict(state["ema"])
        curve_tail = state.get("metrics", {})

    ddp_model = session.prepare_model(model, find_unused=may_leave_unused(model, method))
    noise_sched = noise_scheduler(train.num_train_timesteps if train else 1000)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    log_every = train.log_every if train else 100
    checkpoint_every = train.checkpoint_every if train else max(1, steps // 4)
    tau = method.ebb.tau if method is not None and method.ebb.enabled else 0.0

    progress = _progress_bar(mode, start_step, steps) if rank == 0 else None
    model.train()
    forward_model, graph_steps = ddp_model, False
    window = dict.fromkeys(metrics_keys(), 0.0) | {"n": 0}
    t_start, images_seen = time.perf_counter(), 0
    checkpoint_s, saved_step = 0.0, None  # time spent saving; the step last saved here
    metrics: dict[str, Any] = dict(curve_tail)
    for step in range(start_step, steps):
        if train is not None and train.compile and step == start_step + 1:
            # After the first step, whose eager forward initialised the quantizers:
            # compiling that pass would trace the initialisation, then recompile the whole
            # UNet when the flags flip. Evaluation and checkpoints use the eager modules.
            options = train.compile_options()
            forward_model = torch.compile(ddp_model, **options)
            if lrm is not None:
                lrm.compile_teacher(**options)
            graph_steps = options.get("mode") == "reduce-overhead"
        if graph_steps:
            # CUDA graph trees: a new step begins, the last step's graph outputs are dead.
            torch.compiler.cudagraph_mark_step_begin()
        if method is not None:
            from binarydm.quant import ebb_penalty
            from binarydm.schedule import apply_schedule

            apply_schedule(model, step, steps, method)
            if step == ebb_switch and ema is not None:
                # The deployed model has one basis: its average must not include the
                # two-basis weights of the first stage.
                ema.reset(model)
        idx = batch_indices(
            step,
            rank=rank,
            world_size=world,
            batch_size=batch_size,
            num_items=images.shape[0],
            seed=seed,
        )
        if step == config.get("fail_at_step") and rank == 0 and _take_failure(config):
            raise torch.OutOfMemoryError(
                f"CUDA out of memory at step {step} (simulated by fault injection)"
            )
        clean = to_unit_range(images[idx.to(images.device)].to(device, non_blocking=True))
        # Noise drawn on the training device: a host-side draw would be copied from pageable
        # memory every step. Still a pure function of (seed, step, rank) for resume.
        generator = torch.Generator(device=device).manual_seed((seed * 7919 + step) * 131 + rank)
        x_t, t, noise = noisy_batch(clean, noise_sched, generator)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            # The frozen teacher first: graph-replayed, it then never runs while the
            # student's backward is pending (which CUDA graph trees handle worse).
            if lrm is not None:
                lrm.teacher_forward(x_t, t)
            pred = forward_model(x_t, t).sample
        loss_noise = F.mse_loss(pred.float(), noise.float())
        if step == config.get("nan_at_step"):  # fault injection for the failure tests
            loss_noise = loss_noise * float("nan")
        loss = loss_noise
        loss_lrm = torch.zeros((), device=device)  # logged unweighted, trained weighted
        if lrm is not None:
            terms = lrm.loss(step)
            loss_lrm = terms.unweighted.detach()
            loss = loss + terms.weighted
        loss_ebb = torch.zeros((), device=device)
        if tau:
            loss_ebb = tau * ebb_penalty(model)
            loss = loss + loss_ebb
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The host waits for the GPU once a step, after backward has been queued (waiting
        # before it would leave the GPU idle while the host queues the whole backward);
        # still before the optimizer step, so a non-finite loss never updates the weights.
        finite, values = _step_values(loss, loss_noise, loss_lrm, loss_ebb)
        if not finite:
            # Stop without raising: Ray Train would retry a deterministic failure. Every
            # rank saw the same all-reduced flag, so all report once and return.
            reason = f"{NonFiniteLossError.__name__}: non-finite loss ({values[0]}) at step {step}"
            _report_error(session, reason, step, mode)
            return
        if train is None or train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip if train else 1.0)
        optimizer.step()
        scheduler_lr.step()
        if ema_decay:
            ema = ema or ModelEMA(model, ema_decay, warmup=ema_warmup)
            ema.update(model)
        images_seen += clean.shape[0] * world
        if progress is not None:
            progress.update(1)
        for key, value in zip(metrics_keys(), values, strict=True):
            window[key] += value
        window["n"] += 1
        done = step + 1
        is_ckpt = done % checkpoint_every == 0 or done == steps
        if done % log_every == 0 or is_ckpt:
            n = window.pop("n")
            metrics = {k: v / n for k, v in window.items()}
            metrics.update(step=done, lr=scheduler_lr.get_last_lr()[0], mode=mode)
            metrics["resumed_from_step"] = start_step
            elapsed = time.perf_counter() - t_start
            metrics["train_images_per_s"] = images_seen / elapsed if elapsed else 0.0
            metrics["train_s"] = elapsed + curve_tail.get("train_s", 0.0)
            # Worker start to first step (data, models, DDP, resume): trial overhead.
            metrics["setup_s"] = t_start - entered + curve_tail.get("setup_s", 0.0)
            for key, seconds in setup_parts.items():
                metrics[key] = seconds + curve_tail.get(key, 0.0)
            metrics["checkpoint_s"] = checkpoint_s + curve_tail.get("checkpoint_s", 0.0)
            window = dict.fromkeys(metrics_keys(), 0.0) | {"n": 0}
            if resume_notes:
                metrics["resume_note"] = "; ".join(resume_notes)
        if is_ckpt:
            # After a fallback the steps since the older checkpoint are trained again; their
            # checkpoints get new names, or Ray Train, evicting the old result of the same
            # name, would delete the new folder.
            name = f"checkpoint_{done:08d}" + (f"-refit{start_step:08d}" if resume_notes else "")
            mark = time.perf_counter()
            parts = (model, optimizer, scheduler_lr, ema, lrm)
            _report_checkpoint(session, parts, metrics, name)
            checkpoint_s += time.perf_counter() - mark
            saved_step = done
        elif done % log_every == 0:
            session.report(metrics, None, None)
        if done == config.get("hold_at_step") and start_step < done and rank == 0:
            _hold(config.get("hold_file"))
    if progress is not None:
        progress.close()
    # Wall-clock stamps in the final report let the driver tell Ray Train's own start-up
    # and shutdown from the worker's time (the curve callback skips final reports).
    metrics = {**metrics, "worker_entered_unix": entered_unix}
    metrics["checkpoint_s"] = checkpoint_s + curve_tail.get("checkpoint_s", 0.0)
    parts = (model, optimizer, scheduler_lr, ema, lrm)
    # The last step's checkpoint, persisted by this process, already holds the final state.
    reuse = session.last_checkpoint if saved_step == steps else None
    _finish(session, config, settings, mode, parts, steps, metrics, reuse=reuse)


def _take_failure(config: dict[str, Any]) -> bool:
    """Consume one failure from the ``fail_marker`` counter file (fault injection)."""
    marker = Path(config["fail_marker"]) if config.get("fail_marker") else None
    if marker is None or not marker.exists():
        return False
    left = int(marker.read_text().strip() or 0)
    if left <= 0:
        return False
    marker.write_text(str(left - 1))
    return True


def _hold(hold_file: str | None) -> None:
    """Wait while ``hold_file`` exists (fault injection): the test kills or corrupts meanwhile.

    Bounded, so a test that never releases the hold cannot hang a run forever.
    """
    deadline = time.monotonic() + HOLD_LIMIT_S
    while hold_file and Path(hold_file).exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _finish(session, config, settings, mode, parts, steps, metrics, *, reuse=None):
    """Final report: the teacher's diffusers folder, or the QAT evaluation (rank 0).

    ``reuse``: a checkpoint of step ``steps`` whose state the final checkpoint links
    instead of saving the same 570 MB (ddpm-cifar10) again.
    """
    model, _, _, ema, _ = parts
    with session.checkpoint_dir() as tmp:
        ckpt = None
        final = dict(metrics)
        if session.rank == 0:
            if mode == "teacher":
                # DDPM's teacher is its EMA (the shared CIFAR-10 teacher is too).
                (ema.module if ema is not None else model).save_pretrained(Path(tmp) / "unet")
            elif config.get("evaluate", True):  # False: benchmarks time training alone
                from binarydm.train.evaluate import evaluate

                eval_model = (
                    ema.module if ema is not None and settings.evaluation.use_ema else model
                )
                final.update(
                    evaluate(
                        eval_model,
                        settings,
                        Path(tmp),
                        data_root=config.get("data_root"),
                        cache_dir=config.get("cache_dir"),
                    )
                )
            mark = time.perf_counter()
            # A linked state keeps the training metrics of its step (what a resume reads);
            # the evaluation's are in this report.
            if reuse is None or not link_state(reuse, tmp):
                save_state(tmp, _training_state(steps, parts, final), step=steps)
            final["checkpoint_s"] = final.get("checkpoint_s", 0.0) + time.perf_counter() - mark
            ckpt = tmp
        final["final"] = True
        final["final_report_unix"] = time.time()
        session.report(final, ckpt, "checkpoint_final")


def _report_error(session, reason: str, step: int, mode: str) -> None:
    """Report a terminal error with a marker checkpoint: Ray Train's Result keeps only the
    metrics that came with a checkpoint, and the driver must see why the run stopped."""
    import json

    metrics = {"error": reason, "step": step, "final": False, "mode": mode}
    with session.checkpoint_dir() as tmp:
        ckpt = None
        if session.rank == 0:
            Path(tmp, "error.json").write_text(json.dumps(metrics))
            ckpt = tmp
        session.report(metrics, ckpt, f"error_{step:08d}")


def _progress_bar(mode: str, start: int, total: int):
    """A progress bar that Ray forwards from the worker to the driver's terminal."""
    from ray.experimental.tqdm_ray import tqdm

    label = "FP teacher pretraining" if mode == "teacher" else "BinaryDM QAT"
    bar = tqdm(total=total, desc=label)
    bar.update(start)
    return bar


def metrics_keys() -> tuple[str, ...]:
    return ("loss", "loss_noise", "loss_lrm", "loss_ebb")


def _training_state(step: int, parts, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds to resume training at ``step``."""
    model, optimizer, scheduler_lr, ema, lrm = parts
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler_lr.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "lrm": lrm.state_dict() if lrm is not None else None,
        "metrics": metrics,
    }


def _report_checkpoint(session, parts, metrics, name) -> None:
    with session.checkpoint_dir() as tmp:
        ckpt = None
        if session.rank == 0:
            save_state(tmp, _training_state(metrics["step"], parts, metrics), step=metrics["step"])
            ckpt = tmp
        session.report(metrics, ckpt, name)
