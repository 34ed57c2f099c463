"""How far a searched front is from a fixed recipe: its best FID at the recipe's size and OPs.

    python benchmarks/front_gap.py --front benchmarks/results/runs/cifar10_stage3 \\
        --recipe benchmarks/results/runs/cifar10_w1a4_s0:row=binarydm \\
        --recipe benchmarks/results/runs/cifar10_w1a4_s1:row=binarydm \\
        --markdown gap.md --json gap.json

Issue 17's stage 3 asks whether the search beats the paper's recipe "by at least 10 %
lower FID at equal size", and for the gap "at equal size and at equal OPs either way".
Both sides come from `bdm-search export` archives (docs/run-archive.md), so the number is
recomputed from committed runs anywhere:

- the **recipe** is the mean over its selected runs (one a seed): ``ARCHIVE:RUN_NAME`` or
  ``ARCHIVE:PARAM=VALUE`` (every trial run of the archive with that param); its cost
  objectives must agree between the runs (they are fixed by the configuration);
- the **front** is every finished trial run of the ``--front`` archives with an FID
  (pruned, failed and reference runs are not candidates, nor are the recipe's own runs:
  its best seed would otherwise be measured against its seeds' mean);
- for each cost (``--costs``, default ``size_mib,ops_g``) the gap is taken against the
  front's best FID among the runs whose cost is at most the recipe's: "equal size" as a
  model no larger, since a searched front rarely holds the recipe's exact size. Its
  value is ``(recipe FID - best FID) / recipe FID``: positive where the front is better,
  negative where it is worse, none where no searched run is that small. ``--slack R``
  widens "no costlier" to a cost at most ``(1 + R)`` times the recipe's (reported beside
  the table): a searched model can differ by a few stored floats (LSQ+'s activation
  offsets add 0.42 KiB, 0.007 %, to a 5.80 MiB 1-bit model).

The goal holds for a cost when the gap is at least ``--goal`` (0.10). The recipe's seed
spread is reported beside it: a gap inside it is not a measured difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from binarydm.tracking import read_archive

#: Relative slack when comparing costs: the same configuration logs the same size, but
#: through a float that went through MLflow's store.
_COST_SLACK = 1e-9


def _is_candidate(run: dict[str, Any]) -> bool:
    """A finished trial of the search with an FID: a point of the searched front."""
    tags = run.get("tags", {})
    return (
        tags.get("bdm.role") == "trial"
        and run.get("status") == "FINISHED"  # a pruned trial's run ends KILLED
        and "fid" in run.get("metrics", {})
    )


def select_runs(archive: dict[str, Any], selector: str) -> list[dict[str, Any]]:
    """The runs of ``archive`` that ``selector`` names: a run name, or ``PARAM=VALUE``."""
    runs = archive["runs"]
    if "=" in selector:
        key, value = selector.split("=", 1)
        chosen = [r for r in runs if _is_candidate(r) and r["params"].get(key) == value]
    else:
        chosen = [r for r in runs if r["run_name"] == selector]
    if not chosen:
        names = sorted(r["run_name"] for r in runs)
        raise ValueError(f"no run matches {selector!r} (runs: {', '.join(names)})")
    for run in chosen:
        if "fid" not in run["metrics"]:
            raise ValueError(f"run {run['run_name']} has no fid (status {run['status']})")
    return chosen


def recipe_point(runs: list[dict[str, Any]], costs: list[str]) -> dict[str, Any]:
    """The recipe's mean FID over its runs (seeds) and its cost objectives, checked equal."""
    fids = [r["metrics"]["fid"] for r in runs]
    point: dict[str, Any] = {
        "runs": [r["run_name"] for r in runs],
        "fid": statistics.fmean(fids),
        "fid_sd": statistics.stdev(fids) if len(fids) > 1 else None,
        "fids": fids,
    }
    for cost in costs:
        values = [r["metrics"].get(cost) for r in runs]
        by_run = dict(zip(point["runs"], values, strict=True))
        if any(v is None for v in values):
            raise ValueError(f"a recipe run has no {cost!r}: {by_run}")
        if max(values) - min(values) > _COST_SLACK * max(abs(v) for v in values):
            raise ValueError(
                f"the recipe's runs differ in {cost} ({by_run}): they are not one configuration"
            )
        point[cost] = values[0]
    return point


def gap_at(
    front: list[dict[str, Any]],
    recipe: dict[str, Any],
    cost: str,
    goal: float,
    slack: float = _COST_SLACK,
):
    """The front's best FID among runs no costlier than the recipe in ``cost`` (relative
    ``slack`` allowed), and the gap."""
    limit = recipe[cost] * (1 + max(slack, _COST_SLACK))
    within = [r for r in front if r["metrics"].get(cost, float("inf")) <= limit]
    if not within:
        return {"cost": cost, "recipe": recipe[cost], "candidates": 0, "best": None, "gap": None,
                "meets_goal": False}  # fmt: skip
    best = min(within, key=lambda r: r["metrics"]["fid"])
    gap = (recipe["fid"] - best["metrics"]["fid"]) / recipe["fid"]
    return {
        "cost": cost,
        "recipe": recipe[cost],
        "candidates": len(within),
        "best": {
            "run": best["run_name"],
            "archive": best["_archive"],
            "fid": best["metrics"]["fid"],
            cost: best["metrics"][cost],
        },
        "gap": gap,
        "meets_goal": gap >= goal,
    }


def compare(
    fronts: list[Path],
    recipes: list[str],
    costs: list[str],
    goal: float,
    slack: float = _COST_SLACK,
) -> dict:
    """The recipe's point, the front's size, and the gap at each cost."""
    chosen = []
    for spec in recipes:
        archive, _, selector = spec.rpartition(":")
        if not archive:
            raise ValueError(f"--recipe {spec!r}: give ARCHIVE:RUN_NAME or ARCHIVE:PARAM=VALUE")
        for run in select_runs(read_archive(archive), selector):
            chosen.append({**run, "run_name": f"{Path(archive).name}/{run['run_name']}"})
    recipe_ids = {run["run_id"] for run in chosen}
    front = []
    for path in fronts:
        for run in read_archive(path)["runs"]:
            if _is_candidate(run) and run["run_id"] not in recipe_ids:
                front.append({**run, "_archive": path.name})
    if not front:
        raise ValueError(f"no finished trial with an FID in {[str(p) for p in fronts]}")
    recipe = recipe_point(chosen, costs)
    return {
        "recipe": recipe,
        "front_runs": len(front),
        "goal": goal,
        "slack": slack,
        "gaps": [gap_at(front, recipe, cost, goal, slack) for cost in costs],
    }


def markdown(result: dict) -> str:
    recipe = result["recipe"]
    spread = f" ± {recipe['fid_sd']:.2f}" if recipe["fid_sd"] is not None else ""
    lines = [
        f"Recipe: FID {recipe['fid']:.2f}{spread} over {len(recipe['runs'])} run(s) "
        f"({', '.join(f'{f:.2f}' for f in recipe['fids'])}); front: {result['front_runs']} "
        "finished trials."
        + (
            f" No costlier: within {100 * result['slack']:.3g} % of the recipe's cost."
            if result.get("slack", 0) > _COST_SLACK
            else ""
        ),
        "",
        "| at equal | recipe | searched runs no costlier | best FID (run) | its cost | gap | "
        f"goal {result['goal']:.0%} |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for row in result["gaps"]:
        if row["best"] is None:
            lines.append(f"| {row['cost']} | {row['recipe']:.6g} | 0 | - | - | - | no |")
            continue
        best = row["best"]
        lines.append(
            f"| {row['cost']} | {row['recipe']:.6g} | {row['candidates']} | {best['fid']:.2f} "
            f"({best['archive']}/{best['run']}) | {best[row['cost']]:.6g} | {row['gap']:+.1%} | "
            f"{'yes' if row['meets_goal'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--front", nargs="+", type=Path, required=True, help="run archives")
    parser.add_argument("--recipe", action="append", required=True, metavar="ARCHIVE:SELECTOR")
    parser.add_argument("--costs", default="size_mib,ops_g")
    parser.add_argument("--goal", type=float, default=0.10)
    parser.add_argument(
        "--slack",
        type=float,
        default=_COST_SLACK,
        help="relative cost slack of 'no costlier' (default: float rounding only)",
    )
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        if args.slack < 0:
            raise ValueError(f"--slack {args.slack}: expected a relative slack >= 0")
        result = compare(args.front, args.recipe, args.costs.split(","), args.goal, args.slack)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    text = markdown(result)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
