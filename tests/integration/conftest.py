"""Real servers for the integration tests: a token-auth Ray head, PostgreSQL, ``mlflow server``.

Each server runs in a session of its own (``setsid``) and is stopped by signalling that
session and every descendant of it, never with ``ray stop``: that kills every Ray process on
the host, including other test sessions' clusters. Studies run as the user runs them, through
the ``bdm-search`` console script in a subprocess, on the shipped offline data.

A tool the tests need (``chromium``, PostgreSQL's ``initdb``) that is missing skips the test
on a developer's machine but fails it where ``CI`` is set: a CI that silently skips its
integration tests has not run them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDY_FILE = REPO_ROOT / "search_spaces" / "lrm_rank.yaml"
VENV_BIN = Path(sys.executable).parent
CI_APT_LINE = "apt-get install -y --no-install-recommends postgresql chromium fonts-dejavu-core"

#: Overrides that shrink the quick profile of lrm_rank.yaml to about a minute per trial.
TINY_STUDY = [
    "--set", "teacher.steps=40",
    "--set", "training.steps=10",
    "--set", "evaluation.fid_samples=100",
    "--set", "evaluation.sampling_steps=4",
    "--set", "evaluation.test_loss_images=64",
]  # fmt: skip

SERVER_START_TIMEOUT_S = 180
STOP_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tool(candidates: list[str], apt_package: str) -> str:
    """Path of the first executable found; skip without it, but fail under CI."""
    for candidate in candidates:
        found = shutil.which(candidate)  # absolute paths too: None unless executable
        if found:
            return found
    _missing(
        f"{apt_package} is not installed (looked for {', '.join(candidates)}); "
        f"run .ci/run's apt line: {CI_APT_LINE}"
    )


def require_module(name: str, install: str) -> None:
    """Import ``name`` or skip (fail under CI), saying what to install."""
    try:
        __import__(name)
    except ImportError:
        _missing(f"Python package {name!r} is missing: {install}")


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def venv_tool(name: str) -> str:
    """A console script of the interpreter running the tests (the venv with binarydm)."""
    path = VENV_BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<{path} unreadable: {exc}>"


# -- processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    sid: int
    state: str
    cmdline: str


def _process_table() -> dict[int, ProcessInfo]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # exited while we looked
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        table[int(entry)] = ProcessInfo(
            int(entry), int(fields[1]), int(fields[3]), fields[0], cmdline
        )
    return table


def session_processes(sid: int, marker: str | None = None) -> list[ProcessInfo]:
    """Live processes of session ``sid``, those naming ``marker``, and all their descendants.

    Ray workers keep the session but not the process group; a job's entrypoint gets a new
    session but stays a descendant of the raylet, so both criteria are needed.
    """
    table = _process_table()
    chosen = {
        p.pid
        for p in table.values()
        if p.sid == sid or (marker is not None and marker in p.cmdline)
    }
    grew = True
    while grew:
        children = {p.pid for p in table.values() if p.ppid in chosen} - chosen
        chosen |= children
        grew = bool(children)
    chosen.discard(os.getpid())  # never the test process itself
    return [table[pid] for pid in sorted(chosen) if table[pid].state not in ("Z", "X")]


def _signal_all(processes: list[ProcessInfo], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, sig)


def stop_session(sid: int, marker: str | None = None, grace_s: float = STOP_GRACE_S) -> list[str]:
    """SIGTERM the session's processes, SIGKILL what is left after ``grace_s``.

    Returns the command lines still alive at the end (empty when everything stopped).
    """
    _signal_all(session_processes(sid, marker), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_processes(sid, marker):
        time.sleep(0.2)
    # gcs_server and Ray's monitor can sit on SIGTERM for longer than a test should wait.
    for _ in range(3):
        left = session_processes(sid, marker)
        if not left:
            return []
        _signal_all(left, signal.SIGKILL)
        time.sleep(1.0)
    return [f"{p.pid}: {p.cmdline[:200]}" for p in session_processes(sid, marker)]


def run_in_session(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout_s: float,
    log: Path,
    stderr_log: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session, output to ``log``; kill its whole tree afterwards.

    stderr goes to ``stderr_log`` if given, else into ``log`` too. On timeout everything
    it started is killed and the test fails with the log's tail.
    """
    with log.open("wb") as out, contextlib.ExitStack() as stack:
        err = stack.enter_context(stderr_log.open("wb")) if stderr_log else subprocess.STDOUT
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_session(process.pid)
            process.wait(timeout=30)
            pytest.fail(f"{command[:3]} ran over {timeout_s:.0f} s; log tail:\n{tail(log)}")
        finally:
            # A local Ray left behind by a crashed driver would hold CPUs for the next test.
            stop_session(process.pid, grace_s=5.0)
    errors = stderr_log.read_text(errors="replace") if stderr_log else ""
    return subprocess.CompletedProcess(command, code, log.read_text(errors="replace"), errors)


def _wait_http_ok(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return False


# -- study environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where things are, for test modules (which take fixtures rather than import conftest)."""

    repo_root: Path = REPO_ROOT
    venv_bin: Path = VENV_BIN
    tiny_study: tuple[str, ...] = tuple(TINY_STUDY)


@pytest.fixture(scope="session")
def layout() -> Layout:
    return Layout()


@pytest.fixture(scope="session")
def study_env(workspace) -> dict[str, str]:
    """Environment of a ``bdm-search`` subprocess: offline data, the session's shared cache.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray keep 127.0.0.1 as the node address;
    otherwise it replaces loopback with the host's routable address and listens there.
    """
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "BINARYDM_GIT_COMMIT"):
        env.pop(key, None)
    env.update(
        BINARYDM_DATA_ROOT=workspace["data_root"],
        BINARYDM_CACHE_DIR=workspace["cache_dir"],
        TORCH_HOME=os.environ.get("TORCH_HOME", str(Path(workspace["cache_dir"]) / "torch")),
        BINARYDM_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # `python` and `bdm-search` in a job's entrypoint must be this venv's, activated or not.
        PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def run_study():
    """``run_study(args, cwd, env, timeout_s)``: ``bdm-search lrm_rank.yaml`` + tiny overrides."""

    def run(extra: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float = 600):
        command = [venv_tool("bdm-search"), str(STUDY_FILE), *TINY_STUDY, *extra]
        done = run_in_session(
            command, cwd=cwd, env=env, timeout_s=timeout_s, log=cwd / "bdm-search.log"
        )
        assert done.returncode == 0, f"bdm-search exited {done.returncode}:\n{done.stdout[-6000:]}"
        return done

    return run


# -- mlflow server ------------------------------------------------------------------------


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts, in a session of its own."""

    def __init__(self, root: Path, backend_uri: str):
        self.root = root
        self.backend_uri = backend_uri
        self.artifacts = root / "artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        self.process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        command = [
            venv_tool("mlflow"), "server", "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # Its job runner (seven huey consumers) nearly doubles start-up on 2 cores.
        env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if not _wait_http_ok(f"{self.url}/health", self.process, SERVER_START_TIMEOUT_S):
            self.stop()
            pytest.fail(f"mlflow server at {self.url} did not come up; log:\n{tail(self.log)}")

    def stop(self) -> list[str]:
        if self.process is None:
            return []
        left = stop_session(self.process.pid)
        self.process.wait(timeout=30)
        self.process = None
        return left


@pytest.fixture(scope="module")
def mlflow_server_factory():
    """``start(root, backend_uri, env)`` -> a running MlflowServer, stopped after the module."""
    started: list[MlflowServer] = []

    def start(root: Path, backend_uri: str, env: dict[str, str]) -> MlflowServer:
        server = MlflowServer(root, backend_uri)
        started.append(server)
        server.start(env)
        return server

    yield start
    for server in started:
        server.stop()


# -- PostgreSQL ---------------------------------------------------------------------------


class PostgresServer:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) on 127.0.0.1 with password auth.

    PostgreSQL refuses to run as root, so as root every server command runs as the
    ``postgres`` user in a directory it owns (pytest's tmp dirs are root-only, hence /tmp).
    """

    user = "bdm"

    def __init__(self):
        self.bin_dir = Path(
            require_tool(
                sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True) + ["initdb"],
                "postgresql",
            )
        ).parent
        self.root = Path(tempfile.mkdtemp(prefix="bdmpg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.postmaster_pid: int | None = None
        self.stopped = False

    def _as_owner(self, *command: str) -> list[str]:
        if os.geteuid() != 0:
            return list(command)
        return ["runuser", "-u", "postgres", "--", *command]

    def start(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        password_file.chmod(0o600)
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", self.user,
            f"--pwfile={password_file}", "--auth-host=scram-sha-256", "--auth-local=reject",
            "-E", "UTF8", "--no-locale",
        )  # fmt: skip
        password_file.unlink()
        # TCP on loopback only; no Unix socket (its default directory belongs to the system).
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._run(
            str(self.bin_dir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", "120", "-o", options,
        )  # fmt: skip
        self.postmaster_pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            self._as_owner(*command), capture_output=True, text=True, timeout=180, check=False
        )
        if done.returncode != 0:
            pytest.fail(
                f"{Path(command[0]).name} failed ({done.returncode}):\n{done.stdout}\n"
                f"{done.stderr}\nserver log:\n{tail(self.log)}"
            )

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password,
            dbname=database, autocommit=True,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def stop(self) -> list[str]:
        """``pg_ctl stop -m fast``; then make sure the postmaster and its children are gone."""
        if self.stopped:
            return []
        self.stopped = True
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._as_owner(str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data),
                               "-m", "fast", "-w", "-t", "60"),
                capture_output=True, timeout=90, check=False,
            )  # fmt: skip
        # pg_ctl starts the postmaster as a session leader: its session is the whole server.
        left = []
        if self.postmaster_pid is not None:
            left = stop_session(self.postmaster_pid, marker=str(self.data))
        shutil.rmtree(self.root, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def postgres():
    # SQLAlchemy 2.1 (MLflow's and Optuna's) maps postgresql:// to psycopg 3, not psycopg2.
    require_module("psycopg", "pip install 'psycopg[binary]' (the dev extra)")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- Ray head -----------------------------------------------------------------------------


class RayHead:
    """``ray start --head`` with token auth, on loopback, with its own temp dir and HOME.

    The temp dir is short on purpose: Ray's Unix sockets live under it and a socket path
    may not exceed 107 bytes. The isolated HOME keeps the generated token (Ray reads
    ``~/.ray/auth_token``) away from the developer's own clusters.
    """

    def __init__(self, env: dict[str, str]):
        self.root = Path(tempfile.mkdtemp(prefix="bdmray-", dir="/tmp"))
        self.home = self.root / "home"
        self.home.mkdir()
        self.temp_dir = self.root / "t"
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**env, "HOME": str(self.home), "RAY_AUTH_MODE": "token"}
        self.sid: int | None = None
        self.stopped = False

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def ray(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv_tool("ray"), *args], env=self.env, cwd=self.root, capture_output=True,
            text=True, timeout=timeout_s, check=False,
        )  # fmt: skip

    def start(self) -> None:
        generated = self.ray("get-auth-token", "--generate")
        assert generated.returncode == 0, generated.stderr
        assert generated.stdout.strip() == self.token
        command = [
            venv_tool("ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
            "--port", str(self.gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", str(self.temp_dir),
            # Defaults 10001 and 52365 collide with any other head on the host.
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
        ]  # fmt: skip
        log = self.root / "ray-start.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.sid = process.pid  # the daemons it forks keep this session after it exits
        try:
            code = process.wait(timeout=SERVER_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            self.stop()
            pytest.fail(f"ray start failed ({code}); log:\n{tail(log)}")

    def api(self, path: str, *, token: str | None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.address}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def processes(self) -> list[ProcessInfo]:
        return [] if self.sid is None else session_processes(self.sid, str(self.temp_dir))

    def stop(self) -> list[str]:
        if self.sid is None or self.stopped:
            return []
        left = stop_session(self.sid, marker=str(self.temp_dir))
        # Once the session is gone its id may be reused by someone else's process.
        self.stopped = not left
        return left

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(study_env):
    head = RayHead(study_env)
    try:
        head.start()
        yield head
    finally:
        head.cleanup()


# -- Chromium -----------------------------------------------------------------------------


class Chromium:
    """Headless Chromium, one process tree per page, each in a session that is killed after."""

    flags = (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1000",
    )  # fmt: skip

    def __init__(self, executable: str, profile: Path):
        self.executable = executable
        self.profile = profile

    def _run(self, url: str, action: str, virtual_time_ms: int, log: Path) -> str:
        command = [
            self.executable, *self.flags, f"--user-data-dir={self.profile}",
            # Virtual time lets the app's timers run ahead; fetches still complete for real.
            f"--virtual-time-budget={virtual_time_ms}", action, url,
        ]  # fmt: skip
        done = run_in_session(
            command, cwd=log.parent, env=dict(os.environ), timeout_s=180, log=log,
            stderr_log=log.with_suffix(".err"),
        )  # fmt: skip
        assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done.stdout

    def dump_dom(self, url: str, path: Path, virtual_time_ms: int = 15000) -> str:
        """The rendered DOM of ``url``, also written to ``path``."""
        dom = self._run(url, "--dump-dom", virtual_time_ms, path)
        assert "</html>" in dom, f"chromium printed no document for {url}"
        return dom

    def screenshot(self, url: str, path: Path, virtual_time_ms: int = 15000) -> Path:
        self._run(url, f"--screenshot={path}", virtual_time_ms, path.with_suffix(".out"))
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        return path


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> Chromium:
    executable = require_tool(["chromium", "chromium-browser", "google-chrome"], "chromium")
    return Chromium(executable, tmp_path_factory.mktemp("chromium-profile"))
