"""One trial's QAT: settings, the worker job, one step, the loop under Ray Train or inline.

Public names are re-exported here and load their module on first use (``settings``
alone is what ``binarydm.spec`` needs; the loop, sessions and evaluation import torch,
the runner Ray). ``step``, ``job`` and ``settings`` are public modules; the ``_``
modules are internals: import their names from ``binarydm.train``.
"""

from binarydm._lazy import by_module, lazy_exports

_EXPORTS = by_module(
    {
        "settings": (
            "DataSettings", "EvalSettings", "TeacherSettings", "TrainingSettings",
            "TrialSettings", "WorkerSettings",
        ),
        "step": ("NonFiniteLossError", "StepLosses", "StepParts", "qat_step", "teacher_step"),
        "job": ("FaultPlan", "RungPlan", "WorkerJob"),
        "_runner": (
            "DivergedTrialError", "TrialError", "cached_teacher_dir", "dataset_sha256",
            "ensure_teacher",
            "final_metrics", "fit_qat", "make_trainer", "worker_job",
        ),
        "_diffusion": (
            "ddim_sample", "held_out_loss", "noise_scheduler", "noisy_batch", "to_uint8",
        ),
        "_evaluate": ("evaluate", "fid_reference_name", "save_grid"),
        "_session": ("CheckpointStore", "InlineSession", "RayTrainSession", "inline_device"),
        "_loop": (
            "FAULT_KEYS", "load_training_images", "run_loop", "to_training_device",
            "to_unit_range", "train_loop_per_worker",
        ),
        "_ema": ("ModelEMA",),
    }
)  # fmt: skip
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
