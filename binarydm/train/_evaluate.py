"""End-of-trial evaluation: DDIM samples, FID, held-out loss, OPs/size, grid, packed model.

Runs on Ray Train's rank 0 (so it uses that worker's GPU). Writes its artifacts
(``samples.png``, ``model.bdm``, ``eval.json``) into ``out_dir``, which becomes
part of the final checkpoint, and returns the contract's metrics plus the
settings an FID is only comparable under.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarydm.metric_contract import COST, PROXY_METRICS, PROXY_TIMINGS, timing
from binarydm.train._diffusion import ddim_sample, held_out_loss, noise_scheduler, to_uint8
from binarydm.train._progress import progress_bar
from binarydm.train.settings import TrialSettings

PROXY_TEST_LOSS, PROXY_FID = PROXY_METRICS
PROXY_TEST_LOSS_S, PROXY_FID_S = PROXY_TIMINGS


def _split_images(settings: TrialSettings, split: str, count: int, data_root, cache_dir):
    """The first ``count`` images of a split at the model's resolution (uint8 NHWC)."""
    from binarydm.data import load_images

    data = settings.data
    return load_images(
        data.source,
        split,
        data.resolution,
        data.channels,
        data_root=data_root,
        cache_dir=cache_dir,
        limit=count,
        path=data.path,
    )


def _test_images(settings: TrialSettings, data_root, cache_dir, count: int) -> torch.Tensor:
    array = _split_images(settings, "test", count, data_root, cache_dir)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def fid_reference_name(settings: TrialSettings) -> str:
    data = settings.data
    name = data.source if data.source in ("mnist", "cifar10") else f"{data.source}:{data.path}"
    return f"{name}/{settings.evaluation.reference_split}/{data.resolution}px"


#: The smallest side a sample tile is shown at in ``samples.png``: a 16 px MNIST grid of
#: 8 tiles is 146 px wide, too small to judge in MLflow's artifact view.
MIN_TILE_PX = 64


def save_grid(images_uint8, path: Path, nrow: int = 8) -> None:
    """The first images as a grid PNG, tiles enlarged by whole pixels (nearest neighbour,
    so no detail is invented) to at least ``MIN_TILE_PX``."""
    from PIL import Image
    from torchvision.utils import make_grid

    tensor = torch.from_numpy(images_uint8).permute(0, 3, 1, 2)
    scale = max(1, math.ceil(MIN_TILE_PX / tensor.shape[-1]))
    if scale > 1:
        tensor = tensor.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(tensor, nrow=nrow, padding=2 * scale, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    Image.fromarray(array).save(path)


def score_fid(
    samples_uint8, settings: TrialSettings, *, data_root, cache_dir, device
) -> dict[str, float]:
    """FID of generated uint8 NHWC samples against cached statistics of the reference split,
    improved precision/recall (Kynkaanniemi et al. 2019) from the same features, and the
    seconds of the samples' Inception pass (``timing/fid_features_s``; the reference's,
    until cached, and the statistics make up the rest of the FID's time)."""
    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.metrics.fid import (
        FIDScorer,
        feature_statistics,
        frechet_distance,
        reference_statistics_and_features,
    )
    from binarydm.metrics.precision_recall import improved_precision_recall

    evaluation, data = settings.evaluation, settings.data
    count = evaluation.fid_samples
    batch = evaluation.fid_batch(torch.device(device).type)
    scorer = FIDScorer(evaluation.fid_dims, device=device, batch_size=batch)

    def reference_images():
        images = _split_images(settings, evaluation.reference_split, count, data_root, cache_dir)
        if len(images) < count:
            raise ValueError(
                f"evaluation.fid_samples={count} exceeds the {len(images)} images of the "
                f"{evaluation.reference_split!r} split of {data.source!r}"
            )
        return images

    reference, reference_features = reference_statistics_and_features(
        fid_reference_name(settings),
        reference_images,
        evaluation.fid_dims,
        resolve_cache_dir(cache_dir),
        count=count,
        scorer=scorer,
    )
    t_features = time.perf_counter()
    features = scorer.features(samples_uint8)  # one pass serves the FID and P/R
    features_s = time.perf_counter() - t_features
    scores = {
        "fid": frechet_distance(*feature_statistics(features), *reference),
        timing("fid_features_s"): features_s,
    }
    k = evaluation.precision_recall_k
    if k:
        precision, recall = improved_precision_recall(
            reference_features, features, k=k, device=device
        )
        scores.update(precision=precision, recall=recall)
    return scores


@torch.no_grad()
def evaluate(
    model: nn.Module, settings: TrialSettings, out_dir: Path, *, data_root=None, cache_dir=None
) -> dict[str, Any]:
    from binarydm.export import save_packed
    from binarydm.metrics.efficiency import efficiency_report
    from binarydm.schedule import apply_schedule

    evaluation, data = settings.evaluation, settings.data
    device = next(model.parameters()).device
    model.eval()
    if getattr(model, "binarydm_config", None) is not None:
        # The model as trained at its last step (steps - 1): every stage on (validated),
        # EBB's second basis dropped.
        steps = settings.training.steps
        apply_schedule(model, steps - 1, steps, model.binarydm_config)
    t0 = time.perf_counter()
    test_images = _test_images(settings, data_root, cache_dir, evaluation.test_loss_images)
    test_loss = held_out_loss(
        model, test_images, noise_scheduler(settings.training.num_train_timesteps), seed=1234
    )
    example = (
        torch.zeros(1, data.channels, data.resolution, data.resolution, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
    )
    report = efficiency_report(model, example).to_dict()

    _freeze(model, True)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    t_sample = time.perf_counter()
    batches = math.ceil(evaluation.fid_samples / evaluation.sample_batch_size)
    bar = progress_bar(
        f"sampling {evaluation.fid_samples} images", batches * evaluation.sampling_steps,
        unit="step",
    )  # fmt: skip
    sampling: dict[str, float] = {}
    samples = ddim_sample(
        model,
        evaluation.fid_samples,
        steps=evaluation.sampling_steps,
        seed=settings.seed,
        batch_size=evaluation.sample_batch_size,
        autocast_dtype=autocast,
        num_train_timesteps=settings.training.num_train_timesteps,
        compile=evaluation.sample_compile,
        on_step=lambda: bar.update(1),
        timings=sampling,
    )
    bar.close()
    sample_s = time.perf_counter() - t_sample
    _freeze(model, False)
    samples_uint8 = to_uint8(samples)
    save_grid(samples_uint8[: evaluation.grid_images], out_dir / "samples.png")
    t_fid = time.perf_counter()
    scores = score_fid(
        samples_uint8, settings, data_root=data_root, cache_dir=cache_dir, device=device
    )
    fid_s = time.perf_counter() - t_fid
    if getattr(model, "binarydm_config", None) is not None:
        save_packed(model, out_dir / "model.bdm")
    metrics = {
        **scores,
        "test_loss": test_loss,
        **{k: report[k] for k in ("ops_g", "bops_g", "flops_g", "size_mib", "weight_bits")},
        **{k: report[k] for k in ("ops_saving", "size_saving")},
        # Where evaluation time goes: sampling (of which compiling its step), FID (Inception
        # features of the samples and, until cached, of the reference), the rest (test
        # loss, OPs report, export).
        "eval_s": time.perf_counter() - t0,
        timing("sample_s"): sample_s,
        timing("sample_compile_s"): sampling["compile_s"],
        timing("fid_s"): fid_s,
        "sample_images_per_s": evaluation.fid_samples / sample_s,
        "fid_dims": evaluation.fid_dims,
        "fid_samples": evaluation.fid_samples,
        "sampling_steps": evaluation.sampling_steps,
        "fid_reference": fid_reference_name(settings),
    }
    (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def rung_proxy(
    model: nn.Module,
    settings: TrialSettings,
    *,
    data_root=None,
    cache_dir=None,
    fid: tuple[int, int] | None = None,
) -> dict[str, float]:
    """The early-stopping proxy at a rung: held-out ``test_loss`` and the costs (``COST``),
    and with ``fid = (samples, sampling_steps)`` a small FID (``proxy/fid``): that many
    DDIM samples of that many steps, the trial's Inception features (``fid_dims``) against
    the first ``samples`` reference images, the trial's sampling seed.

    ``model`` is the one the final evaluation scores (the EMA model under
    ``evaluation.use_ema``). It is scored as it would be deployed: on a copy with the
    schedule of the last step applied (every progressive stage on, EBB switched to one
    basis), because that is what the final FID measures; a half-binarised model would
    look better the later its stages switch on. The copy leaves training's own schedule
    state, quantizers and EMA untouched. Same test images, noise and timesteps as the
    final ``test_loss`` (seed 1234), so a rung's value and the final one are comparable.
    Each proxy's seconds come with it (``PROXY_TIMINGS``): the copy and held-out loss,
    and the small FID's sampling and Inception.
    """
    from binarydm.metrics.efficiency import efficiency_report
    from binarydm.schedule import apply_schedule

    data = settings.data
    started = time.perf_counter()
    deployed = copy.deepcopy(model).eval()
    config = getattr(deployed, "binarydm_config", None)
    if config is not None:
        steps = settings.training.steps
        apply_schedule(deployed, steps - 1, steps, config)
    device = next(deployed.parameters()).device
    images = _test_images(settings, data_root, cache_dir, settings.evaluation.test_loss_images)
    scheduler = noise_scheduler(settings.training.num_train_timesteps)
    scores = {PROXY_TEST_LOSS: held_out_loss(deployed, images, scheduler, seed=1234)}
    # held_out_loss returns a Python float: on a GPU its work is done by now.
    scores[PROXY_TEST_LOSS_S] = time.perf_counter() - started
    if fid is not None:
        started = time.perf_counter()
        samples, steps = fid
        small = settings.replace(
            **{"evaluation.fid_samples": samples, "evaluation.sampling_steps": steps,
               "evaluation.precision_recall_k": 0}  # the FID alone: P/R is not a proxy
        )  # fmt: skip
        _freeze(deployed, True)
        drawn = ddim_sample(
            deployed,
            samples,
            steps=steps,
            seed=settings.seed,
            batch_size=settings.evaluation.sample_batch_size,
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
            num_train_timesteps=settings.training.num_train_timesteps,
            compile=settings.evaluation.sample_compile,
        )
        scored = score_fid(
            to_uint8(drawn), small, data_root=data_root, cache_dir=cache_dir, device=device
        )
        scores[PROXY_FID] = scored["fid"]
        scores[PROXY_FID_S] = time.perf_counter() - started
    example = (
        torch.zeros(1, data.channels, data.resolution, data.resolution, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
    )
    report = efficiency_report(deployed, example).to_dict()
    return {**scores, **{k: float(report[k]) for k in COST}}


def _freeze(model: nn.Module, frozen: bool) -> None:
    """Binarize weights once for sampling rather than on every denoising step."""
    from binarydm.quant import QuantMixin

    for module in model.modules():
        if isinstance(module, QuantMixin):
            if frozen:
                module.freeze_weights()
            else:
                module.unfreeze_weights()
