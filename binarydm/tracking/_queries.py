"""MLflow searches every tracking module shares: quoted filters, all pages, canonical runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size`` (MLflow caps its batch calls)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def quote_filter_value(value: str) -> str:
    """Quote a string for an MLflow filter; its grammar has no escape, so pick the other quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} cannot appear in an MLflow search filter: it holds both ' and \"")


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every active (non-deleted) run matching ``filter_string``, across result pages."""
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def search_store_runs(client: MlflowClient, filter_string: str) -> list[Run]:
    """Every active run matching ``filter_string`` in any active experiment of the store."""
    experiments, page_token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=page_token)
        experiments.extend(e.experiment_id for e in page)
        page_token = page.token
        if not page_token:
            break
    return [run for eid in experiments for run in search_all_runs(client, eid, filter_string)]


def oldest_run(runs: Iterable[Run]) -> Run:
    """The run every process agrees is canonical when a create race left several."""
    return min(runs, key=lambda run: (run.info.start_time or 0, run.info.run_id))
