"""``ray job submit`` of a study against a real token-auth Ray head, as design.md tells users.

The head runs from this venv with its own temp dir, HOME (holding the token that
``ray get-auth-token --generate`` writes) and ports, all on 127.0.0.1. The job uploads
the repository as its working directory and runs ``bdm-search`` there; every store is
given as an absolute path because the job runs in a temporary copy of the upload. The
last test stops the head by its session, without ``ray stop``, and checks nothing is left.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from binarydm.tracking import load_study_results

pytestmark = pytest.mark.timeout(900)

JOB_TIMEOUT_S = 600
#: What must never travel with a job: the upload has to stay small. Patterns are gitignore
#: style: a bare "data" would also drop binarydm/data, so the data folder is anchored.
EXCLUDES = [
    ".git",
    ".venv",
    "mlruns",
    "mlartifacts",
    "*.db",
    "ray_results",
    "/data",
    ".cache",
    "/benchmarks/results",  # committed run archives and reports: results, not code
]
UPLOAD_LIMIT_BYTES = 5 * 2**20
STUDY = "lrm_rank"


def _packages(repo_root: Path) -> list[str]:
    """binarydm and every subpackage of it in the checkout."""
    return sorted(
        ".".join(init.parent.relative_to(repo_root).parts)
        for init in (repo_root / "binarydm").rglob("__init__.py")
    )


def _entrypoint(layout, results: Path, data_root: str) -> str:
    """Say where the job's driver imports each binarydm package from, then run the study."""
    packages = _packages(layout.repo_root)
    probe = (
        "import importlib, sys; print('PYTHON', sys.executable); "
        f"[print('IMPORTED', n, importlib.import_module(n).__file__) for n in {packages}]"
    )
    study = " ".join(
        [
            "bdm-search", "search_spaces/lrm_rank.yaml", *layout.tiny_study, "--trials", "1",
            # The trial runs in its Tune actor (workers.inline): a job-submitted study's
            # actors import the job's working directory as Ray Train's workers would, and
            # a 2-core CI spends 50-75 s starting a Train fit.
            "--set", "workers.inline=true",
            "--tracking-uri", f"sqlite:///{results / 'mlflow.db'}",
            "--set", f"storage.optuna=sqlite:///{results / 'optuna.db'}",
            "--set", f"storage.ray_results={results / 'ray_results'}",
            # Left out, artifacts would go to the job's temporary copy and vanish with it.
            "--set", f"tracking.artifact_location={results / 'mlartifacts'}",
            "--set", f"data.root={data_root}",
        ]
    )  # fmt: skip
    return f'python -c "{probe}" && {study}'


def _submit(ray_head, layout, results: Path, data_root: str, submission_id: str):
    command = [
        str(layout.venv_bin / "ray"), "job", "submit", "--address", ray_head.address,
        "--submission-id", submission_id, "--working-dir", str(layout.repo_root),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        # The CLI quotes each word after --: a shell runs the && chain.
        "--", "sh", "-c", _entrypoint(layout, results, data_root),
    ]  # fmt: skip
    try:
        return subprocess.run(
            command, env=ray_head.env, cwd=results, capture_output=True, text=True,
            timeout=JOB_TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        ray_head.ray("job", "stop", "--address", ray_head.address, submission_id)
        logs = ray_head.ray("job", "logs", "--address", ray_head.address, submission_id)
        pytest.fail(f"job {submission_id} ran over {JOB_TIMEOUT_S} s; logs:\n{logs.stdout[-6000:]}")


def test_head_rejects_requests_without_the_token(ray_head):
    status, _ = ray_head.api("/api/jobs/", token=None)
    assert status in (401, 403), f"the jobs API answered {status} without a token"
    status, body = ray_head.api("/api/jobs/", token=ray_head.token)
    assert status == 200 and json.loads(body) == []


def test_job_submit_runs_a_study(ray_head, layout, workspace, tmp_path):
    submission_id = f"bdm-study-{uuid.uuid4().hex[:8]}"
    done = _submit(ray_head, layout, tmp_path, workspace["data_root"], submission_id)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"ray job submit exited {done.returncode}:\n{output[-8000:]}"

    status, body = ray_head.api(f"/api/jobs/{submission_id}", token=ray_head.token)
    assert status == 200 and json.loads(body)["status"] == "SUCCEEDED", body[-2000:]

    # The driver runs this venv's Python but imports binarydm from the uploaded copy, which
    # Ray puts first on PYTHONPATH. A subpackage missing from the upload would silently come
    # from the editable install here, and be missing on a real cluster.
    (python,) = re.findall(r"^PYTHON (\S+)$", output, flags=re.M)
    assert Path(python).parent.resolve() == layout.venv_bin.resolve()
    imported = dict(re.findall(r"^IMPORTED (\S+) (\S+)$", output, flags=re.M))
    assert sorted(imported) == _packages(layout.repo_root), output[-4000:]
    session = (ray_head.temp_dir / "session_latest").resolve()  # a symlink
    uploads = session / "runtime_resources" / "working_dir_files"
    elsewhere = {n: f for n, f in imported.items() if not Path(f).is_relative_to(uploads)}
    assert not elsewhere, f"imported from outside the upload: {elsewhere}"

    (package,) = [p for p in uploads.iterdir() if p.is_dir()]
    # The job's imports have written __pycache__ beside the uploaded sources since.
    sizes = {
        str(f.relative_to(package)): f.stat().st_size
        for f in package.rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    }
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:10]
    assert sum(sizes.values()) < UPLOAD_LIMIT_BYTES, f"upload too large; largest: {largest}"
    assert (package / "binarydm" / "__init__.py").is_file()
    # Neither uploaded nor written by the study into the copy (it vanishes with the job).
    for unwanted in (".git", ".venv", ".cache", "data", "ray_results", "mlruns", "mlartifacts"):
        assert not (package / unwanted).exists(), f"{unwanted} is in the job's working dir"
    assert not list(package.glob("*.db"))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (trial,) = load_study_results(STUDY, STUDY, tracking_uri=uri)
    assert trial["trial_id"] == 0 and trial["status"] == "FINISHED"
    assert math.isfinite(trial["metrics"]["fid"]) and trial["pareto"] is True
    # The upload has no .git: a worker that imported the editable install (a checkout)
    # would log its commit instead.
    assert trial["params"]["code.git_commit"] == "unknown"

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("bdm.role") == "parent"]
    assert parent.info.status == "FINISHED"
    # The parent, the one trial and the FP reference run, each exactly once.
    roles = sorted(r.data.tags.get("bdm.role") for r in runs)
    assert roles == ["parent", "reference", "trial"]
    assert trial["tags"]["mlflow.parentRunId"] == parent.info.run_id
    artifacts = tmp_path / "mlartifacts"
    assert (artifacts / trial["run_id"] / "artifacts" / "config.json").is_file()
    assert list((artifacts / parent.info.run_id).rglob("pareto*.png"))


def test_head_stops_without_ray_stop(ray_head):
    assert ray_head.processes(), "the head was not running before the stop"
    left = ray_head.stop()
    assert left == [], "processes of the head survived SIGKILL:\n" + "\n".join(left)
    assert ray_head.processes() == []
    for port in (ray_head.dashboard_port, ray_head.gcs_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert "Ray runtime started" in (ray_head.root / "ray-start.log").read_text()
