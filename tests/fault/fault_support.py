"""Shared pieces of the fault suite: tiny study arguments, MLflow and Optuna readers, and
subprocesses (``mlflow server``, ``bdm-search`` with its own Ray) that leave nothing behind.

Not a conftest: a second ``conftest`` module would shadow ``tests/conftest.py`` for the
``from bdm_support import tiny_settings`` imports of the other test folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bdm_support import MlflowServer, free_port  # noqa: F401 (re-exported to the fault tests)

REPO = Path(__file__).resolve().parents[2]
LRM_STUDY = str(REPO / "search_spaces" / "lrm_rank.yaml")
BDM_SEARCH = str(Path(sys.executable).with_name("bdm-search"))


def tiny(
    steps: int = 20, every: int = 10, log_every: int | None = None, inline: bool = False
) -> list[str]:
    """``--set`` arguments of a seconds-long trial; the teacher keys match the session's
    cached tiny teacher (tests/conftest.tiny_settings), so no study pretrains one. The
    faults hit trials: these studies score no FP reference (tests/search covers it).
    ``inline``: the trial's loop runs in its Tune actor (``workers.inline``), for tests
    whose subject is not Ray Train's fit: on the 2-core CI machine a fit's own start-up
    is 50-75 s of a 10-step trial, an inline trial's whole run about 25 s."""
    values = {
        "search.fp_reference": "false",
        "teacher.steps": 40, "teacher.batch_size": 32,
        "training.steps": steps, "training.batch_size": 16,
        "training.checkpoint_every": every, "training.log_every": log_every or every,
        "evaluation.fid_samples": 100, "evaluation.fid_dims": 64,
        "evaluation.sampling_steps": 4, "evaluation.test_loss_images": 64,
        "evaluation.sample_batch_size": 100,
    }  # fmt: skip
    if inline:
        values["workers.inline"] = "true"
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def faults_env(plan: dict) -> dict[str, str]:
    """The environment entry that makes the study's driver inject ``plan`` (driver.FAULTS_ENV)."""
    from binarydm.search._driver import FAULTS_ENV

    return {FAULTS_ENV: json.dumps(plan)}


# -- reading results back ---------------------------------------------------------------


def study_runs(tracking_uri: str, experiment: str = "lrm_rank"):
    """(client, parent runs, trial runs by trial_id -> list of runs) of an experiment."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client, [], {}
    runs = client.search_runs([found.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    parents = [r for r in runs if r.data.tags.get("bdm.role") == "parent"]
    trials: dict[int, list] = {}
    for run in runs:
        if run.data.tags.get("bdm.role") == "trial":
            trials.setdefault(int(run.data.tags["trial_id"]), []).append(run)
    return client, parents, trials


def sqlite_uri(workdir: Path, name: str) -> str:
    return f"sqlite:///{workdir / name}"


def optuna_trials(workdir: Path, study: str = "lrm_rank"):
    import optuna

    loaded = optuna.load_study(study_name=study, storage=sqlite_uri(workdir, "optuna.db"))
    return {t.number: t for t in loaded.get_trials(deepcopy=False)}


def curve_steps(client, run_id: str, metric: str = "loss") -> list[int]:
    """Every step of the run's logged curve, sorted, duplicates kept (so doubling shows)."""
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def assert_curve_once(client, run_id: str, expected: list[int], metric: str = "loss") -> None:
    """The curve has exactly ``expected`` steps, each training step once.

    The last step is exempt from "once": besides its checkpoint report, the final report
    and the trial's final metrics log the same value there again (see faults.md).
    """
    steps = curve_steps(client, run_id, metric)
    assert sorted(set(steps)) == expected, steps
    doubled = [s for s in set(steps) if s != expected[-1] and steps.count(s) > 1]
    assert doubled == [], f"{metric} logged more than once at steps {doubled}: {steps}"


def registered_step(run_dir: Path) -> int:
    """The newest step Ray Train has registered a checkpoint for in ``run_dir`` (-1: none)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        results = snapshot["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return -1
    return max((r["metrics"].get("step", -1) for r in results), default=-1)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail the test with ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# -- processes ---------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (zombies excluded: they hold nothing)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def processes_of_ray_tmp(ray_tmp: str) -> list[int]:
    """PIDs of the processes a Ray with temp dir ``ray_tmp`` started (zombies excluded).

    Its daemons name the dir on their command line; its workers rename their command line
    (``ray::IDLE``) but inherit ``RAY_TMPDIR`` from the driver that started the cluster.
    """
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        if ray_tmp.encode() in cmdline or marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def listening_addresses(pids: list[int]) -> dict[str, set[str]]:
    """Local address -> names of the given processes that listen on a TCP socket there."""
    owners: dict[str, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owners[target[8:-1]] = f"{pid} {name}"
    addresses: dict[str, set[str]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in owners:  # 0A: LISTEN
                    address = _decode_address(fields[1].split(":")[0], width)
                    addresses.setdefault(address, set()).add(owners[fields[9]])
    return addresses


def _decode_address(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp* stores each 32-bit word in host (little-endian) order.
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
    packed = b"".join(words)
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, packed)
    return socket.inet_ntop(socket.AF_INET6, packed)


class StudyProcess:
    """``bdm-search`` in its own session (process group), by default with its own local Ray.

    Its own ``RAY_TMPDIR`` (short: Unix socket paths are limited to 107 bytes) names
    every Ray process it starts, so a test can prove none of them outlived a kill.
    """

    def __init__(
        self,
        workdir: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        own_ray: bool = True,
    ):
        self.workdir = workdir
        self.args = args
        self.ray_tmp = tempfile.mkdtemp(prefix="bdmr", dir="/tmp") if own_ray else None
        self.env = {**os.environ, **(env or {})}
        if own_ray:
            self.env["RAY_TMPDIR"] = self.ray_tmp
        self.env.pop("RAY_ADDRESS", None)
        handle, log_path = tempfile.mkstemp(prefix="bdm-search-", suffix=".log", dir=workdir)
        os.close(handle)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> StudyProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [BDM_SEARCH, *self.args], cwd=self.workdir, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()
        return self

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"bdm-search ran past {timeout_s} s; log:\n{self.output()}"
            ) from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def members(self) -> list[int]:
        return group_members(self.process.pid)

    def ray_processes(self) -> list[int]:
        return processes_of_ray_tmp(self.ray_tmp) if self.ray_tmp else []

    def kill_group(self, settle_s: float = 30.0) -> list[int]:
        """SIGKILL the whole group (a crash, no clean-up); returns what was still alive after
        ``settle_s`` (then killed too, so a failing test leaves nothing behind)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and (self.members() or self.ray_processes()):
            time.sleep(0.5)
        survivors = sorted(set(self.members()) | set(self.ray_processes()))
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.ray_tmp and not survivors:  # keep Ray's logs only when something went wrong
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return survivors
