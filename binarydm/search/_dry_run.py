"""What ``--dry-run`` prints: the space table of a study and a rough estimate of its cost."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from binarydm.spec import Dimension, StudySpec


def _range_text(dimension: Dimension) -> str:
    if dimension.kind == "choice":
        return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in dimension.choices)
    text = f"[{dimension.low:g}, {dimension.high:g}]"
    text += f" step {dimension.step}" if dimension.kind == "int" and dimension.step != 1 else ""
    return text + (" log" if dimension.kind == "int" and dimension.log else "")


def describe_space(spec: StudySpec) -> Table:
    """A rich table of the searched keys, their ranges, conditions and fixed values."""
    from rich.table import Table

    search = spec.search
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in search.objectives)
    table = Table(
        title=f"{spec.name}: {search.algorithm}, {search.trials} trials x "
        f"{len(search.seeds)} seed(s), profile {spec.profile or 'none'}",
        caption=f"objectives: {objectives}",
    )
    for column in ("key", "kind", "values", "when", "fixed value"):
        table.add_column(column)
    fixed = spec.settings.flat()
    for dimension in search.space.values():
        when = "; ".join(f"{k} in {list(v)}" for k, v in dimension.when.items())
        if dimension.kind == "cases":  # a row per case: what it sets, and the fixed values
            for name, settings in dimension.cases.items():
                values = ", ".join(f"{k}={v!r}" for k, v in settings.items())
                before = ", ".join(repr(fixed[k]) for k in settings)
                table.add_row(f"{dimension.key}={name}", "case", values, when, before)
            continue
        kind = "logfloat" if dimension.kind == "float" and dimension.log else dimension.kind
        table.add_row(dimension.key, kind, _range_text(dimension), when, repr(fixed[dimension.key]))
    return table


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work for one trial worker: an estimate to size a study, not a
    measurement. Image costs are at ``reference_resolution`` and scale with pixel count."""

    name: str
    train_image_s: float  # one image through a QAT step: student fwd+bwd, teacher fwd, LRM
    teacher_image_s: float  # one image through an FP pretraining step of the teacher
    sample_image_step_s: float  # one image through one denoising step of the quantized UNet
    feature_image_s: float  # one image through the FID feature extractor
    trial_overhead_s: float  # worker start, model build, checkpoints, logging
    reference_resolution: int


#: One CPU core, tiny preset at 16 px: a 0.7M-parameter UNet2DModel takes ~0.25 s per FP
#: step at batch 64 on this project's CPU; fake quantization and the teacher's forward
#: roughly double that. FID features at 64-d run at ~40 images/s.
CPU_COST = CostModel("cpu", 7.8e-3, 4.7e-3, 3e-3, 1 / 40, 20.0, 16)
#: One H100-class GPU, ddpm-cifar10 preset at 32 px (35.7M parameters), fp32.
GPU_COST = CostModel("gpu", 2e-3, 1.2e-3, 2e-4, 5e-4, 60.0, 32)


def _typical(spec: StudySpec, key: str) -> float:
    """The fixed value of ``key``, or the middle of its dimension if it is searched."""
    dimension = spec.search.space.get(key)
    cases = [d for d in spec.search.space.values() if d.kind == "cases"]
    if dimension is None:
        values = [c[key] for d in cases for c in d.cases.values() if key in c]
        if values:
            return statistics.fmean(float(v) for v in values)
        return float(spec.settings.flat()[key])
    if dimension.kind == "choice":
        return statistics.fmean(float(v) for v in dimension.choices)
    if dimension.log:
        return math.sqrt(dimension.low * dimension.high)
    return (dimension.low + dimension.high) / 2


def estimate_cost(
    spec: StudySpec,
    *,
    cost: CostModel | None = None,
    cluster_cpus: float | None = None,
    cluster_gpus: float = 0,
    teacher_cached: bool = False,
) -> dict[str, Any]:
    """Rough run time of a study: an estimate from step counts and ``cost`` constants.

    Searched step counts and sizes count at the middle of their range. Seeds of one
    configuration run one after another inside its trial; the teacher is pretrained
    once and cached (0 s if ``teacher.pretrained`` is set or ``teacher_cached``). Seconds
    are rounded to a tenth: they are an estimate.
    """
    settings = spec.settings
    cost = cost or (GPU_COST if settings.workers.use_gpu else CPU_COST)
    pixels = (_typical(spec, "data.resolution") / cost.reference_resolution) ** 2
    samples = _typical(spec, "evaluation.fid_samples")
    train_s = (
        _typical(spec, "training.steps")
        * _typical(spec, "training.batch_size")
        * cost.train_image_s
    )
    sample_s = samples * _typical(spec, "evaluation.sampling_steps") * cost.sample_image_step_s
    test_loss_s = _typical(spec, "evaluation.test_loss_images") * cost.sample_image_step_s
    run_s = (train_s + sample_s + test_loss_s) * pixels
    run_s += samples * cost.feature_image_s + cost.trial_overhead_s
    teacher = settings.teacher
    teacher_s = 0.0
    if teacher.pretrained is None and not teacher_cached:
        teacher_s = teacher.steps * teacher.batch_size * cost.teacher_image_s * pixels
    cpus = (os.cpu_count() or 1) if cluster_cpus is None else cluster_cpus
    concurrent = spec.max_concurrent_trials(cluster_cpus=cpus, cluster_gpus=cluster_gpus)
    trials, seeds = spec.search.trials, len(spec.search.seeds)
    return {
        "cost_model": cost.name,
        "trials": trials,
        "seeds": seeds,
        "runs": trials * seeds,
        "concurrent_trials": concurrent,
        "seconds_per_run": round(run_s, 1),
        "teacher_seconds": round(teacher_s, 1),
        "wall_seconds": round(teacher_s + math.ceil(trials / concurrent) * seeds * run_s, 1),
    }
