"""Hypervolume against wall-clock time with and without MO-ASHA early stopping.

    python benchmarks/early_stopping_hv.py run --workdir /tmp/bdm-es --seeds 0 1 2
    python benchmarks/early_stopping_hv.py run --workdir /tmp/bdm-es --seeds 0 1 2 --arms on_r30
    python benchmarks/early_stopping_hv.py run --workdir /tmp/bdm-es-fid --seeds 0 --arms off_fid
    python benchmarks/early_stopping_hv.py report --workdir /tmp/bdm-es /tmp/bdm-es-fid \
        --markdown es.md --plot es.png

``run`` runs ``benchmarks/studies/early_stopping.yaml`` through the real ``bdm-search``
once per sampler seed and arm, one study after the other in ``--workdir`` (its own
SQLite MLflow and Optuna stores): arm ``on`` stops trials dominated at a rung (MO-ASHA,
rungs at 10 % and 30 %; ``on_r30``: one rung at 30 %, run with ``--arms on_r30``),
arm ``off`` scores and logs the same rungs and stops none (``stop: false``), so both
arms start the same number of trials from the same sampler and the off arm's rungs give
the proxy's rank correlation with the final FID; arm ``off_fid`` is the off arm with the
small-FID proxy (``proxy: fid``), whose rungs score ``proxy/fid`` beside
``proxy/test_loss``. A study already finished in the workdir is not run again.
``report`` reads every study of one or more workdirs back from MLflow: the hypervolume
of the trials finished by each moment (one reference point for all studies of the arms
that answer the stopping question, from their finished points), the time each arm takes
to reach its final hypervolume, the Spearman and Kendall correlation of each rung's
proxies with the final FID, the small FID's Spearman gap to the test loss over the same
trials (paired bootstrap), each rung's cost from the trials' ``timing/proxy_*_s``, and
whether each ``off_fid`` study ran the same configurations as its seed's ``off`` study.
``report --baseline benchmarks/results/early_stopping_hv.json`` puts new studies beside
the committed report's (whose stores are gone): its reference point, so every earlier
number stays as it was, and its studies, pairs and correlations.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from binarydm.metric_contract import PROXY_METRICS, PROXY_TIMINGS, timing

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks" / "studies" / "early_stopping.yaml"
ARMS = {
    "on": "{enabled: true, stop: true, rungs: [0.1, 0.3], reduction_factor: 3}",
    "off": "{enabled: true, stop: false, rungs: [0.1, 0.3], reduction_factor: 3}",
    # The milder schedule: one rung at 30 %, where the off arms' test loss ranks trials
    # by final FID nearly as well as the final test loss does (the 10 % rung was the
    # weak one), so more trials finish. Chosen from that correlation, not from its result.
    "on_r30": "{enabled: true, stop: true, rungs: [0.3], reduction_factor: 3}",
    # The same rung, a quarter continuing: about 8 of 24 finish, the most that half of the
    # off arms' time allows at this rung's measured cost (early_stopping.md). Chosen from
    # that arithmetic before it ran.
    "on_r30_eta4": "{enabled: true, stop: true, rungs: [0.3], reduction_factor: 4}",
    # The same schedule ranked by the epsilon-net within a front instead of NSGA-II's
    # crowding distance, which puts every objective's extremes first (the worst proxy of
    # the front among them): does keeping the best proxies hold more volume at the same
    # number of finishers? Chosen from that ranking rule before it ran.
    "on_r30_eta4_eps": (
        "{enabled: true, stop: true, rungs: [0.3], reduction_factor: 4, ranking: epsnet}"
    ),
    # The off arm with the small-FID proxy: every rung also scores a small FID (the
    # spec's defaults, max(256, fid_dims + 1) samples of 10 DDIM steps) beside the test
    # loss, and stops nothing, so both proxies rank the same trials against their final FID.
    "off_fid": "{enabled: true, stop: false, proxy: fid, rungs: [0.1, 0.3], reduction_factor: 3}",
}
DEFAULT_ARMS = ["on", "off"]
LABELS = {"on": "MO-ASHA, rungs 10%/30%", "on_r30": "MO-ASHA, rung 30%", "off": "no stopping",
          "on_r30_eta4": "MO-ASHA, rung 30%, eta 4",
          "on_r30_eta4_eps": "MO-ASHA, rung 30%, eta 4, epsilon-net",
          "off_fid": "no stopping, small-FID rungs"}  # fmt: skip
LINESTYLES = {"on": "-", "on_r30": ":", "on_r30_eta4": "-.", "off": "--",
              "on_r30_eta4_eps": (0, (3, 1, 1, 1, 1, 1))}  # dash-dot-dot  # fmt: skip
RUNS_FILE = "runs.json"


def study_name(arm: str, seed: int) -> str:
    return f"es_{arm}_s{seed}"


def run_studies(
    workdir: Path, seeds: list[int], trials: int, extra: list[str], arms: list[str]
) -> None:
    """Run every (seed, arm) study not yet recorded as finished in ``runs.json``."""
    workdir.mkdir(parents=True, exist_ok=True)
    ledger_path = workdir / RUNS_FILE
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    bdm_search = str(Path(sys.executable).with_name("bdm-search"))
    for seed in seeds:
        for arm in arms:
            early = ARMS[arm]
            name = study_name(arm, seed)
            if ledger.get(name, {}).get("exit_code") == 0:
                print(f"{name}: finished already, not run again", flush=True)
                continue
            command = [
                bdm_search, str(STUDY), "--trials", str(trials),
                "--set", f"name={name}",
                "--set", f"search.sampler_seed={seed}",
                "--set", f"search.early_stopping={early}",
                *extra,
            ]  # fmt: skip
            print(f"{name}: {' '.join(command[1:])}", flush=True)
            started, load_before = time.time(), os.getloadavg()
            with open(workdir / f"{name}.log", "w") as log:
                code = subprocess.call(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
            ledger[name] = {
                # Wall-clock comparisons need an otherwise idle machine: the 1/5/15-min load
                # averages before and after say whether it was.
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "arm": arm,
                "sampler_seed": seed,
                "trials": trials,
                "command": command[1:],
                "started_unix": started,
                "wall_s": time.time() - started,
                "exit_code": code,
            }
            ledger_path.write_text(json.dumps(ledger, indent=2))
            print(f"{name}: exit {code} after {ledger[name]['wall_s']:.0f} s", flush=True)


OBJECTIVES = [("fid", "minimize"), ("ops_g", "minimize"), ("size_mib", "minimize")]
#: The arms whose hypervolume against time answers the stopping question: the reference
#: point comes from their studies only, and only they are plotted. ``off_fid`` is there for
#: its rungs' rank correlations (its trials also spend time on a small FID per rung).
HV_ARMS = ("on", "off", "on_r30", "on_r30_eta4", "on_r30_eta4_eps")
#: The arms whose finished points set the reference point: the first three, so a later
#: arm is measured against the same point (and the same numbers) as the earlier ones; a
#: later arm's point beyond it adds no volume.
REFERENCE_ARMS = ("on", "off", "on_r30")
#: The stopping arms, each paired with the off arm of its sampler seed.
STOPPING_ARMS = ("on", "on_r30", "on_r30_eta4", "on_r30_eta4_eps")
#: The metrics a rung logs at its step: the proxies and their seconds.
RUNG_METRICS = (*PROXY_METRICS, *PROXY_TIMINGS)


def load_arm_studies(workdirs: list[Path]) -> dict[str, dict]:
    """Every study of the workdirs' ledgers with its trials, read back from their MLflow."""
    from mlflow import MlflowClient

    from binarydm.tracking import load_study_results

    studies: dict[str, dict] = {}
    for workdir in workdirs:
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        client = MlflowClient(uri)
        ledger = json.loads((workdir / RUNS_FILE).read_text())
        for name, entry in sorted(ledger.items()):
            if entry["exit_code"] != 0:
                continue
            if name in studies:
                raise SystemExit(f"study {name} is in two workdirs: report one of them")
            records = load_study_results(name, name, uri)
            for record in records:
                record["rungs"] = {}
                for metric in RUNG_METRICS:
                    history = client.get_metric_history(record["run_id"], metric)
                    if history:
                        record["rungs"][metric] = {int(m.step): float(m.value) for m in history}
            studies[name] = {**entry, "records": records}
    return studies


def _points(records) -> tuple[list[list[float]], list[dict]]:
    metrics = [m for m, _ in OBJECTIVES]
    rows, kept = [], []
    for record in records:
        values = [record["metrics"].get(m) for m in metrics]
        if record["status"] == "FINISHED" and all(
            v is not None and math.isfinite(v) for v in values
        ):
            rows.append([float(v) for v in values])
            kept.append(record)
    return rows, kept


def analyse(studies: dict[str, dict], baseline: dict | None = None) -> dict:
    """Hypervolume histories against one reference point, times, rank correlations.

    ``baseline``: an earlier report's JSON (``--json``) whose stores are gone: its
    reference point is used, and its studies' summaries, correlations and costs stand
    beside the new studies' (a study in both is taken from the stores)."""
    from binarydm.search import default_reference_point, hypervolume_history

    directions = [d for _, d in OBJECTIVES]
    if baseline is not None:
        # Its numbers must stay as they were: a new study of one of its arms would move
        # that arm's means, target and correlations, so it is refused, not merged.
        baseline = copy.deepcopy(baseline)
        earlier_arms = {s["arm"] for s in baseline["studies"].values()}
        clashes = sorted(
            name for name, s in studies.items()
            if name in baseline["studies"] or s["arm"] in earlier_arms
        )  # fmt: skip
        if clashes:
            raise SystemExit(
                f"--baseline already has the arms of {clashes}: report those workdirs together "
                "instead, or without --baseline"
            )
        reference = [float(baseline["reference_point"][m]) for m, _ in OBJECTIVES]
    else:
        compared = [s for s in studies.values() if s["arm"] in REFERENCE_ARMS]
        compared = compared or list(studies.values())
        every = [row for study in compared for row in _points(study["records"])[0]]
        reference = [float(v) for v in default_reference_point(every, directions)]
    out: dict = {"reference_point": dict(zip([m for m, _ in OBJECTIVES], reference, strict=True)),
                 "studies": {}, "arms": {}, "correlations": {}}  # fmt: skip
    for name, study in studies.items():
        records = study["records"]
        rows, finished = _points(records)
        start = min(r["start_time"] for r in records)
        ends = [(r["end_time"] - start) / 1000 for r in finished]
        history = hypervolume_history(rows, ends, reference, directions)
        last_end = max((r["end_time"] for r in records if r["end_time"]), default=start)
        states = [r["tags"].get("state", r["status"]) for r in records]
        out["studies"][name] = {
            "arm": study["arm"],
            "sampler_seed": study["sampler_seed"],
            "command_wall_s": study["wall_s"],
            "trials_wall_s": (last_end - start) / 1000,
            "trials": len(records),
            "finished": len(finished),
            "pruned": states.count("PRUNED"),
            "failed": states.count("FAILED"),
            "final_hypervolume": history[-1][1] if history else 0.0,
            "history": history,
        }
    for name, summary in (baseline or {}).get("studies", {}).items():
        out["studies"].setdefault(name, summary)
    for arm in ARMS:
        rows = [v for v in out["studies"].values() if v["arm"] == arm]
        if not rows:
            continue
        volumes = [r["final_hypervolume"] for r in rows]
        walls = [r["trials_wall_s"] for r in rows]
        out["arms"][arm] = {
            "studies": len(rows),
            "hypervolume_mean": statistics.mean(volumes),
            "hypervolume_sd": statistics.stdev(volumes) if len(volumes) > 1 else float("nan"),
            "trials_wall_s_mean": statistics.mean(walls),
            "trials_wall_s_sd": statistics.stdev(walls) if len(walls) > 1 else float("nan"),
        }
    off = out["arms"].get("off")
    if off is not None:
        # The time each study takes to come within the off arm's seed spread of the off
        # arm's mean final hypervolume (the goal's "same final hypervolume").
        target = off["hypervolume_mean"] - (
            0.0 if math.isnan(off["hypervolume_sd"]) else off["hypervolume_sd"]
        )
        out["target_hypervolume"] = target
        for study in out["studies"].values():
            reached = [t for t, v in study["history"] if v >= target]
            study["time_to_target_s"] = reached[0] if reached else None
    # Each stopping arm beside the off arm of the same sampler seed: the off arm's volume
    # when the stopping arm had finished, and the time the off arm took to reach its volume.
    out["pairs"] = {}
    seeds = sorted({s["sampler_seed"] for s in out["studies"].values()})
    for arm in STOPPING_ARMS:
        for seed in seeds:
            on = out["studies"].get(study_name(arm, seed))
            off = out["studies"].get(study_name("off", seed))
            if on is not None and off is not None:
                out["pairs"][f"{arm} s{seed}"] = _pair(arm, seed, on, off)
    # Rank correlation of each rung's proxies with the final FID over the trials that have
    # both: an off arm's trials all do; in a stopping arm only the survivors.
    out["proxy_differences"], out["rung_costs"] = {}, {}
    for arm in ARMS:
        finished = [
            r for s in studies.values() if s["arm"] == arm for r in _points(s["records"])[1]
        ]
        if not finished:
            continue
        table = {}
        for label, (metric, step) in _proxy_columns(finished).items():
            pairs = [
                (_proxy_value(r, metric, step), r["metrics"]["fid"])
                for r in finished
                if _proxy_value(r, metric, step) is not None
            ]
            if len(pairs) >= 3:
                table[label] = {"proxy": metric, "step": step,
                                **rank_correlation(*zip(*pairs, strict=True))}  # fmt: skip
        out["correlations"][arm] = table
        differences = _fid_against_test_loss(finished)
        if differences:
            out["proxy_differences"][arm] = differences
        costs = rung_costs(finished)
        if costs:
            out["rung_costs"][arm] = costs
    out["same_configurations"] = {
        name: same_configurations(studies[name]["records"], studies[off_name]["records"])
        for name, s in studies.items()
        if s["arm"] == "off_fid" and (off_name := study_name("off", s["sampler_seed"])) in studies
    }
    for key in ("correlations", "proxy_differences", "rung_costs", "same_configurations"):
        for name, value in (baseline or {}).get(key, {}).items():
            out[key].setdefault(name, value)
    return out


def _proxy_columns(records: list[dict]) -> dict[str, tuple[str, int | None]]:
    """Every (proxy metric, rung step) the records logged, and the final test loss (step
    None), by label: the proxies a rung can rank by, each at each of its rungs."""
    columns = {"final test_loss": ("test_loss", None)}
    for metric in PROXY_METRICS:
        steps = sorted({step for r in records for step in r["rungs"].get(metric, {})})
        for step in steps:
            columns[f"{metric}, rung step {step}"] = (metric, step)
    return columns


def _proxy_value(record: dict, metric: str, step: int | None) -> float | None:
    if step is None:
        return record["metrics"].get(metric)
    return record["rungs"].get(metric, {}).get(step)


def rank_correlation(xs, ys) -> dict:
    """Spearman's rho and Kendall's tau (tau-b: ties count) of ``xs`` against ``ys``."""
    from scipy.stats import kendalltau, spearmanr

    return {
        "n": len(xs),
        "spearman": float(spearmanr(xs, ys).statistic),
        "kendall": float(kendalltau(xs, ys).statistic),
    }


def spearman_difference(a, b, y, *, draws: int = 2000, seed: int = 0) -> dict:
    """Spearman(a, y) - Spearman(b, y) over the same items, with a 95 % paired bootstrap
    interval: the items are resampled together, so the interval holds what the two
    proxies share (the same trials, the same final FIDs), and says whether ``a`` ranks
    these trials better than ``b`` beyond the luck of which trials were drawn."""
    import numpy as np

    a, b, y = (np.asarray(v, dtype=float) for v in (a, b, y))
    if not len(a) == len(b) == len(y) >= 3:
        raise ValueError(f"need three or more paired items, got {len(a)}, {len(b)}, {len(y)}")
    picks = np.random.default_rng(seed).integers(0, len(y), (draws, len(y)))
    deltas = _spearman_rows(a[picks], y[picks]) - _spearman_rows(b[picks], y[picks])
    deltas = deltas[np.isfinite(deltas)]  # a draw constant in one variable has no ranks
    low, high = np.percentile(deltas, [2.5, 97.5])
    whole = _spearman_rows(a[None], y[None]) - _spearman_rows(b[None], y[None])
    return {
        "n": len(y),
        "difference": float(whole[0]),
        "low": float(low),
        "high": float(high),
        "draws": int(len(deltas)),
    }


def _spearman_rows(x, y):
    """Spearman's rho of each row of ``x`` against the same row of ``y`` (ties averaged):
    the Pearson correlation of the ranks, NaN for a constant row."""
    import numpy as np
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=1) / np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))


def _fid_against_test_loss(records: list[dict]) -> dict:
    """At each rung with both proxies: spearman(proxy/fid) - spearman(proxy/test_loss)
    against the final FID over the same trials (``spearman_difference``)."""
    fid_metric, loss_metric = "proxy/fid", "proxy/test_loss"
    out = {}
    steps = sorted({step for r in records for step in r["rungs"].get(fid_metric, {})})
    for step in steps:
        both = [
            r
            for r in records
            if all(step in r["rungs"].get(m, {}) for m in (fid_metric, loss_metric))
        ]
        if len(both) < 3:
            continue
        out[f"rung step {step}"] = spearman_difference(
            [r["rungs"][fid_metric][step] for r in both],
            [r["rungs"][loss_metric][step] for r in both],
            [r["metrics"]["fid"] for r in both],
        )
    return out


def rung_costs(records: list[dict]) -> dict:
    """Seconds each proxy took at each rung (mean, sd, over the trials that logged it),
    beside the trial's own training and final evaluation: what a rung costs."""
    out = {}
    for metric in PROXY_TIMINGS:
        steps = sorted({step for r in records for step in r["rungs"].get(metric, {})})
        for step in steps:
            values = [
                r["rungs"][metric][step] for r in records if step in r["rungs"].get(metric, {})
            ]
            out[f"{metric}, rung step {step}"] = _spread(values)
    if not out:
        return out
    final_eval = [
        r["metrics"][timing("sample_s")] + r["metrics"][timing("fid_s")]
        for r in records
        if timing("sample_s") in r["metrics"] and timing("fid_s") in r["metrics"]
    ]
    out["final sampling + FID"] = _spread(final_eval)
    # train_s is the training loop's wall time, the rungs' proxies inside it: their share
    # of it, trial by trial, is what the rungs cost the trial (on a loaded machine too,
    # as far as the load stays even over one trial).
    timed = [r for r in records if "train_s" in r["metrics"]]
    out["train_s (training loop, rungs included)"] = _spread(
        [r["metrics"]["train_s"] for r in timed]
    )
    out["rungs' proxies / train_s (fraction)"] = _spread(
        [
            sum(v for m in PROXY_TIMINGS for v in r["rungs"].get(m, {}).values())
            / r["metrics"]["train_s"]
            for r in timed
        ]
    )
    return out


def _spread(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean_s": statistics.mean(values) if values else float("nan"),
        "sd_s": statistics.stdev(values) if len(values) > 1 else float("nan"),
    }


def same_configurations(records: list[dict], others: list[dict]) -> dict:
    """Trial by trial (by trial number), whether two studies sampled the same values of
    the searched keys, and how far apart their final FIDs and rung test losses are."""
    theirs = {r["trial_id"]: r for r in others}
    matched, differing, fid_gap, loss_gap = 0, [], 0.0, 0.0
    for record in records:
        other = theirs.get(record["trial_id"])
        if "searched" not in record["tags"]:
            raise SystemExit(f"trial run {record['run_id']} has no 'searched' tag to compare")
        keys = record["tags"]["searched"].split(",")
        if other is None or any(record["params"].get(k) != other["params"].get(k) for k in keys):
            differing.append(record["trial_id"])
            continue
        matched += 1
        if "fid" in record["metrics"] and "fid" in other["metrics"]:
            fid_gap = max(fid_gap, abs(record["metrics"]["fid"] - other["metrics"]["fid"]))
        mine, its = (
            record["rungs"].get("proxy/test_loss", {}),
            other["rungs"].get("proxy/test_loss", {}),
        )
        for step in set(mine) & set(its):
            loss_gap = max(loss_gap, abs(mine[step] - its[step]))
    return {
        "trials": len(records),
        "same_params": matched,
        "differing_trials": differing,
        "max_abs_fid_difference": fid_gap,
        "max_abs_rung_test_loss_difference": loss_gap,
    }


def _pair(arm: str, seed: int, on: dict, off: dict) -> dict:
    """A stopping arm's study against the off arm's study of the same sampler seed."""
    return {
        "arm": arm,
        "sampler_seed": seed,
        "on_s": on["trials_wall_s"],
        "off_s": off["trials_wall_s"],
        "time_ratio": on["trials_wall_s"] / off["trials_wall_s"],
        "on_hv": on["final_hypervolume"],
        "off_hv": off["final_hypervolume"],
        "hv_ratio": on["final_hypervolume"] / off["final_hypervolume"],
        "off_hv_when_on_ended": volume_at(off["history"], on["trials_wall_s"]),
        "off_s_to_on_hv": time_to(off["history"], on["final_hypervolume"]),
    }


def volume_at(history: list[tuple[float, float]], moment: float) -> float:
    """The hypervolume a history had reached by ``moment`` (seconds)."""
    return max((v for t, v in history if t <= moment), default=0.0)


def time_to(history: list[tuple[float, float]], volume: float) -> float | None:
    """When a history first reached ``volume`` (None: never)."""
    return next((t for t, v in history if v >= volume), None)


def _fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    ref = ", ".join(f"{k} {v:.4g}" for k, v in result["reference_point"].items())
    lines = [
        f"Reference point (finished points of the {'/'.join(REFERENCE_ARMS)} arms' studies, "
        f"1.1 x worst): {ref}.",
        "",
        "| study | arm | sampler seed | trials | finished | pruned | failed | final HV "
        "| trials' wall s | to target HV s | command wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in result["studies"].items():
        lines.append(
            f"| {name} | {s['arm']} | {s['sampler_seed']} | {s['trials']} | {s['finished']} "
            f"| {s['pruned']} | {s['failed']} | {s['final_hypervolume']:.4g} "
            f"| {_fmt(s['trials_wall_s'])} | {_fmt(s.get('time_to_target_s'))} "
            f"| {_fmt(s['command_wall_s'])} |"
        )
    lines += ["", "| arm | studies | final HV mean ± sd | trials' wall s mean ± sd |",
              "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for arm, a in result["arms"].items():
        lines.append(
            f"| {arm} | {a['studies']} "
            f"| {a['hypervolume_mean']:.4g} ± {_fmt(a['hypervolume_sd'], 4)} "
            f"| {_fmt(a['trials_wall_s_mean'])} ± {_fmt(a['trials_wall_s_sd'])} |"
        )
    lines += ["", "| arm | sampler seed | on: trials' wall s | off: trials' wall s "
              "| on / off time | on HV | off HV | on / off HV | off HV when on ended "
              "| off s to on's HV |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for q in result.get("pairs", {}).values():
        lines.append(
            f"| {q['arm']} | {q['sampler_seed']} | {_fmt(q['on_s'])} | {_fmt(q['off_s'])} "
            f"| {q['time_ratio']:.2f} "
            f"| {q['on_hv']:.4g} | {q['off_hv']:.4g} | {q['hv_ratio']:.3f} "
            f"| {q['off_hv_when_on_ended']:.4g} | {_fmt(q['off_s_to_on_hv'])} |"
        )
    if "target_hypervolume" in result:
        lines += ["", f"Target HV (off mean - off sd): {result['target_hypervolume']:.4g}."]
    lines += [
        "",
        "| arm | proxy | trials | Spearman | Kendall |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for arm, table in result["correlations"].items():
        for proxy, c in table.items():
            lines.append(
                f"| {arm} | {proxy} | {c['n']} | {c['spearman']:.3f} | {c['kendall']:.3f} |"
            )
    return "\n".join(lines + _proxy_lines(result)) + "\n"


def _proxy_lines(result: dict) -> list[str]:
    """The small FID against the test loss: their Spearman difference over the same
    trials, each rung's cost, and whether the off_fid studies ran the off studies' trials."""
    lines: list[str] = []
    if result.get("proxy_differences"):
        lines += ["", "| arm | rung | trials | Spearman fid - test_loss | 95 % paired bootstrap |",
                  "| --- | --- | ---: | ---: | --- |"]  # fmt: skip
        for arm, table in result["proxy_differences"].items():
            for rung, d in table.items():
                lines.append(
                    f"| {arm} | {rung} | {d['n']} | {d['difference']:+.3f} "
                    f"| [{d['low']:+.3f}, {d['high']:+.3f}] |"
                )
    if result.get("rung_costs"):
        lines += [
            "",
            "| arm | what (seconds unless said) | trials | mean | sd |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for arm, table in result["rung_costs"].items():
            for what, c in table.items():
                lines.append(
                    f"| {arm} | {what} | {c['n']} | {_fmt(c['mean_s'], 2)} | {_fmt(c['sd_s'], 2)} |"
                )
    for name, same in result.get("same_configurations", {}).items():
        lines += [
            "",
            f"{name} against the off study of its sampler seed: {same['same_params']} of "
            f"{same['trials']} trials sampled the same searched values (differing: "
            f"{same['differing_trials'] or 'none'}); largest final FID difference "
            f"{same['max_abs_fid_difference']:.4g}, largest rung test-loss difference "
            f"{same['max_abs_rung_test_loss_difference']:.4g}.",
        ]
    return lines


def write_report(
    workdirs: list[Path], *, markdown_path=None, plot=None, json_path=None, baseline=None
) -> dict:
    earlier = json.loads(Path(baseline).read_text()) if baseline else None
    result = analyse(load_arm_studies(workdirs), earlier)
    text = markdown(result)
    print(text)
    if markdown_path:
        Path(markdown_path).write_text(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if plot:
        from binarydm.tracking import hypervolume_figure

        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
        histories, styles = {}, {}
        for s in (s for s in result["studies"].values() if s["arm"] in HV_ARMS):
            label = f"{LABELS[s['arm']]}, sampler seed {s['sampler_seed']}"
            histories[label] = s["history"]
            styles[label] = {"color": colours[s["sampler_seed"] % len(colours)],
                             "linestyle": LINESTYLES[s["arm"]]}  # fmt: skip
        figure = hypervolume_figure(
            histories, title="early_stopping.yaml, quick profile, 24 trials", styles=styles
        )
        figure.savefig(plot)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the studies")
    run.add_argument("--workdir", type=Path, required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--trials", type=int, default=24)
    run.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     help="an extra --set KEY=VALUE for every study")  # fmt: skip
    report = sub.add_parser("report", help="hypervolume against time, rank correlations")
    report.add_argument("--workdir", type=Path, nargs="+", required=True,
                        help="one or more run workdirs, read together")  # fmt: skip
    report.add_argument("--markdown", type=Path)
    report.add_argument("--plot", type=Path)
    report.add_argument("--json", type=Path)
    report.add_argument("--baseline", type=Path,
                        help="an earlier report's --json whose workdirs are gone: its "
                             "reference point, studies, correlations beside the new")  # fmt: skip
    args = parser.parse_args()
    if args.command == "run":
        extra = [a for value in args.overrides for a in ("--set", value)]
        run_studies(args.workdir, args.seeds, args.trials, extra, args.arms)
    else:
        write_report(
            args.workdir,
            markdown_path=args.markdown,
            plot=args.plot,
            json_path=args.json,
            baseline=args.baseline,
        )


if __name__ == "__main__":
    main()
