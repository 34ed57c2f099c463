"""The Grafana dashboard of a study queries metrics that Ray really exports.

A local Ray node is started in a subprocess (so it never meets a Ray instance of the test
session or of anyone else on the machine) with a Prometheus endpoint on 127.0.0.1, runs a
small workload of tasks, an actor, an object and a Ray Train run, and its endpoint is
scraped. Every metric and label that a CPU panel queries must be among the scraped ones.
GPU panels are marked (their description says "Needs GPU nodes"): this machine has no GPU,
so their metrics must instead be per-GPU gauges of Ray's node agent, read from the installed
Ray package.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "grafana" / "ray_study.json"
GPU_MARK = "Needs GPU nodes"
# Prometheus derives these series from one histogram or summary metric.
SUFFIXES = ("", "_bucket", "_sum", "_count", "_total")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+\S+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TOKEN = re.compile(r"(?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_:][\w:]*)")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)")

# Runs in its own interpreter: a fresh local Ray node ("local" never joins a running one),
# metrics on 127.0.0.1:PORT, reported every second instead of every 10.
WORKLOAD = r"""
import json, os, re, socket, sys, tempfile, time, urllib.request

import ray

wanted = set(json.loads(sys.argv[1]))
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
         _node_ip_address="127.0.0.1", _metrics_export_port=port,
         _system_config={"metrics_report_interval_ms": 1000})
try:
    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    class Counter:
        def add(self, x):
            return x + 1

    assert sum(ray.get([square.remote(i) for i in range(20)])) == 2470
    counter = Counter.remote()
    assert ray.get(counter.add.remote(1)) == 2
    kept = ray.put(b"x" * (1 << 20))

    # A Ray Train run, as every trial is: the Train controller and worker metrics.
    # DataParallelTrainer is TorchTrainer without the torch process group: same metrics.
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    def train_loop(config):
        ray.train.report({"loss": 1.0})

    DataParallelTrainer(
        train_loop,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="dashboard-probe", storage_path=tempfile.mkdtemp()),
    ).fit()

    # Union over scrapes: a finished run's series expire while later ones are awaited.
    labels = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(1)
        url = f"http://127.0.0.1:{port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in body.splitlines():
            match = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
            if match and not line.startswith("#"):
                found = set(re.findall(r'(\w+)="', match.group(2) or ""))
                labels.setdefault(match.group(1), set()).update(found)
        if wanted <= set(labels):
            break
    print("SCRAPED " + json.dumps({name: sorted(keys) for name, keys in labels.items()}))
finally:
    ray.shutdown()
"""


def metric_names(expr: str) -> set[str]:
    """Names of the metrics a PromQL expression reads (not functions, labels or keywords)."""
    if match := _LABEL_VALUES.fullmatch(expr.strip()):
        return {match.group(1)}
    text = _STRING.sub('""', expr)
    for pattern in (_SELECTOR, _RANGE, _OFFSET, _GROUPING):
        text = pattern.sub(" ", text)
    names = set()
    for token in _TOKEN.finditer(text):
        name = token.group("name")
        followed_by_call = text[token.end() :].lstrip().startswith("(")
        if name and not followed_by_call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    if match := _LABEL_VALUES.fullmatch(expr.strip()):
        return {match.group(2)}
    text = _STRING.sub('""', expr)
    labels = {m for selector in _SELECTOR.findall(text) for m in _MATCHER.findall(selector)}
    for grouping in _GROUPING.findall(text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    return labels


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """``(where, needs GPUs, PromQL)`` of every panel target and query variable."""
    found = [
        (panel["title"], GPU_MARK in panel.get("description", ""), target["expr"])
        for panel in graph_panels(dashboard)
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", False, variable["query"]["query"]))
    return found


def exported(name: str, scraped: dict[str, list[str]]) -> str | None:
    """The scraped series ``name`` stands for, allowing the histogram/counter suffixes."""
    return next((name + s for s in SUFFIXES if name + s in scraped), None)


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ('sum by (State) (ray_tasks{IsRetry="0", Name=~"a{1}|b"})', {"ray_tasks"},
         {"State", "IsRetry", "Name"}),
        ("clamp_min(sum(deriv(x_total[5m] offset 1h)), 0) * 1e9 + y", {"x_total", "y"}, set()),
        ("rate(a[$__rate_interval]) / on(ip) group_left(GpuIndex) b", {"a", "b"},
         {"ip", "GpuIndex"}),
        ("label_values(ray_node_cpu_count, SessionName)", {"ray_node_cpu_count"},
         {"SessionName"}),
    ],
)  # fmt: skip
def test_promql_parsing_finds_metrics_and_labels(expr, metrics, labels):
    assert metric_names(expr) == metrics
    assert label_names(expr) == labels


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in graph_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_panels_do_not_overlap_on_the_grid():
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_trials_tasks_cpu_gpu_and_object_store():
    used = set().union(*(metric_names(expr) for _, _, expr in queries(load_dashboard())))
    required = {"ray_train_controller_state", "ray_tasks", "ray_actors",
                "ray_node_cpu_utilization", "ray_node_gpus_utilization",
                "ray_object_store_memory", "ray_node_mem_used"}  # fmt: skip
    assert required <= used


def test_gpu_panels_query_per_gpu_gauges_of_rays_node_agent():
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    # Ray prefixes every gauge of its node agent with "ray_" when it exports it.
    gauges = {f"ray_{g.name}": {str(c) for c in g.view.columns} for g in METRICS_GAUGES.values()}
    gpu_queries = [(where, expr) for where, gpu, expr in queries(load_dashboard()) if gpu]
    assert gpu_queries, "no panel is marked as needing GPUs"
    for where, expr in gpu_queries:
        for name in metric_names(expr):
            assert name in gauges, f"{where}: {name} is not a metric of Ray's node agent"
            assert "GpuIndex" in gauges[name], f"{where}: {name} is not a per-GPU metric"
            missing = label_names(expr) - gauges[name]
            assert not missing, f"{where}: {name} has no label(s) {missing}"


@pytest.fixture(scope="module")
def scraped() -> dict[str, list[str]]:
    """Metric name -> label names, as a local Ray node exports them after a small workload."""
    wanted = sorted({name for _, gpu, expr in queries(load_dashboard()) if not gpu
                     for name in metric_names(expr)})  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A throwaway local node needs no token, and must not write one into ~/.ray.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # Its own process group, so that a hung run is ended with every Ray process it started.
    process = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, json.dumps(wanted)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("SCRAPED ")]
    assert process.returncode == 0 and lines, f"Ray workload failed:\n{stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("SCRAPED "))


def test_every_cpu_panel_metric_and_label_is_exported_by_ray(scraped):
    assert "ray_node_cpu_utilization" in scraped, "the node agent exported nothing"
    problems = []
    for where, gpu, expr in queries(load_dashboard()):
        if gpu:
            continue
        series = {name: exported(name, scraped) for name in metric_names(expr)}
        problems += [f"{where}: {n} not exported" for n, s in series.items() if s is None]
        labels = set().union(*(scraped[s] for s in series.values() if s is not None))
        problems += [f"{where}: no label {label}" for label in label_names(expr) - labels]
    assert problems == []
