"""The metric contract: every name a trial's run logs, and what each one means to a study.

design.md's contract metrics keep their plain names: quality (``fid``, ``precision``,
``recall``, ``test_loss``), cost (``ops_g``, ``bops_g``, ``flops_g``, ``size_mib``,
``weight_bits``, the two savings), the training losses, and the four throughput
figures design.md names (``train_s``, ``eval_s``, ``train_images_per_s``,
``sample_images_per_s``). Everything else a run records about where its time went
(the launch stamps, the set-up and evaluation breakdown, Ray's start and stop) is under
``timing/``, so a user's first view of a run (the MLflow UI sorts metrics by name and
groups them by prefix) shows what matters.

This module imports nothing: the describing package (``binarydm.spec``), the trial
loop, the trainable, the tracker and the benchmarks all read the names from here.
"""

from __future__ import annotations

from typing import Literal

Direction = Literal["minimize", "maximize"]

QUALITY = ("fid", "precision", "recall", "test_loss")
COST = (
    "ops_g", "bops_g", "flops_g", "size_mib", "weight_bits", "ops_saving", "size_saving",
)  # fmt: skip
#: The training losses, one window mean each per logged step (``loss`` is their sum).
TRAINING_LOSSES = ("loss", "loss_noise", "loss_lrm", "loss_ebb")
#: design.md's throughput metrics: how long training and evaluation took, how fast.
THROUGHPUT = ("train_s", "eval_s", "train_images_per_s", "sample_images_per_s")

#: The direction in which each metric improves: an objective's default direction, and
#: the metrics a study file may name as objectives (the JSON Schema's enum).
METRIC_DIRECTIONS: dict[str, Direction] = {
    "fid": "minimize",
    "precision": "maximize",
    "recall": "maximize",
    "ops_g": "minimize",
    "bops_g": "minimize",
    "flops_g": "minimize",
    "size_mib": "minimize",
    "weight_bits": "minimize",
    "test_loss": "minimize",
    "ops_saving": "maximize",
    "size_saving": "maximize",
    "loss": "minimize",
    "loss_lrm": "minimize",
    "loss_ebb": "minimize",
    "train_s": "minimize",
    "eval_s": "minimize",
    "train_images_per_s": "maximize",
    "sample_images_per_s": "maximize",
}

TIMING_PREFIX = "timing/"


def timing(name: str) -> str:
    """The logged name of a timing metric (``timing("fit_s")`` -> ``"timing/fit_s"``)."""
    return TIMING_PREFIX + name


#: Where a trial's wall time went, in seconds (see docs/architecture.md for the path):
#: trainable entered -> run started (``run_start_s``), trial prepared (``prepare_s``),
#: Ray Train's fit (``fit_s`` = ``ray_start_s`` + ``setup_s`` + train + eval +
#: ``ray_stop_s``), the set-up's parts, checkpoint writes, sampling (of which compiling
#: its step) and FID (of which the samples' Inception pass).
TIMINGS = tuple(
    timing(name)
    for name in (
        "run_start_s", "prepare_s", "fit_s", "ray_start_s", "ray_stop_s",
        "setup_s", "setup_device_s", "setup_data_s", "setup_build_s", "setup_lrm_s",
        "checkpoint_s", "sample_s", "sample_compile_s", "fid_s", "fid_features_s",
    )
)  # fmt: skip
#: Unix times of a trial's launch (not averaged over seeds: they are moments, not spans).
ACTOR_CREATED = timing("actor_created_unix")
TRIAL_ENTERED = timing("trial_entered_unix")
LAUNCH_STAMPS = (ACTOR_CREATED, TRIAL_ENTERED)
#: The parent run's tag: when the driver handed the trials to Tune.
TUNE_STARTED_TAG = "timing/tune_started_unix"

#: Averaged over a trial's seeds (with ``<name>_std`` beside each when there are
#: several); every other metric is the same for every seed or is a per-run detail.
AVERAGED = QUALITY + COST + TRAINING_LOSSES + THROUGHPUT + TIMINGS
#: Two FIDs are comparable only with these equal: logged as params on every run.
COMPARABILITY = ("fid_dims", "fid_samples", "sampling_steps", "fid_reference")
#: The settings key each comparability param repeats: a run logs the value once, under
#: the comparability name (``fid_reference`` is derived from the data, not a key).
COMPARABILITY_SETTINGS = {
    "fid_dims": "evaluation.fid_dims",
    "fid_samples": "evaluation.fid_samples",
    "sampling_steps": "evaluation.sampling_steps",
}


def logged_param_name(key: str) -> str:
    """The name a run logs settings ``key`` under (its comparability name, if it has one)."""
    names = {setting: name for name, setting in COMPARABILITY_SETTINGS.items()}
    return names.get(key, key)


def once_under_comparability_names(params: dict) -> dict:
    """``params`` (flattened settings) with each ``COMPARABILITY_SETTINGS`` key renamed to
    its comparability name, so the value is a run's param once."""
    out = dict(params)
    for name, key in COMPARABILITY_SETTINGS.items():
        if key in out:
            out[name] = out.pop(key)
    return out


#: Logged at every reported step of the run (the training curves).
CURVE_METRICS = (*TRAINING_LOSSES, "lr", "train_images_per_s")

#: What a trial reports at an early-stopping rung (``search.early_stopping``): the
#: proxy's value (logged to the run at the rung's step), the rung's index and its step.
PROXY_METRICS = ("proxy/test_loss", "proxy/fid")
#: What a rung's proxy cost, in seconds, logged beside it at the rung's step: the
#: held-out loss (with the deployed copy it scores), and the small FID's sampling and
#: Inception (only under ``proxy: fid``). The price of a rung, to weigh against how well
#: the proxy ranks trials.
PROXY_TIMINGS = (timing("proxy_test_loss_s"), timing("proxy_fid_s"))


def proxy_metric(proxy: str) -> str:
    """The rung metric of ``search.early_stopping.proxy`` (``test_loss`` -> ``proxy/test_loss``)."""
    return f"proxy/{proxy}"


RUNG = "rung"
RUNG_STEP = "rung_step"

#: A finished trial's FID over the study's FP reference FID (logged after the study).
FID_RATIO_TO_FP = "fid_ratio_to_fp"
#: The parent run's metrics: the front's hypervolume and the trial counts.
STUDY_METRICS = ("hypervolume", "trials_total", "trials_finished")
#: Every metric name a trial's run may carry (tests hold real runs to it). A study of
#: several seeds logs each seed's curves as ``seed<k>.<curve>``.
TRIAL_METRICS = frozenset(
    (*AVERAGED, *(f"{name}_std" for name in AVERAGED), *LAUNCH_STAMPS, *CURVE_METRICS,
     FID_RATIO_TO_FP, *PROXY_METRICS, *PROXY_TIMINGS)
)  # fmt: skip


def seed_prefix(seed: int) -> str:
    """The prefix of one seed's curves in a trial of several seeds (``seed1.loss``)."""
    return f"seed{seed}."


def is_trial_metric(name: str) -> bool:
    """Whether ``name`` is in the contract of a trial's run (``seed<k>.`` curves included)."""
    seed, dot, curve = name.partition(".")
    if dot and seed.startswith("seed") and seed[4:].isdigit():
        return curve in CURVE_METRICS
    return name in TRIAL_METRICS
