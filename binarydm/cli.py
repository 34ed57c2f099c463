"""``bdm-search``: run BinaryDM studies, single trials, Pareto analysis and sampling.

    bdm-search search_spaces/lrm_rank.yaml                  # run a study (quick profile)
    bdm-search search_spaces/lrm_rank.yaml --profile gpu --address auto
    bdm-search search_spaces/lrm_rank.yaml --resume         # continue an interrupted study
    bdm-search validate search_spaces/joint.yaml            # check a study file, nothing else
    bdm-search search_spaces/joint.yaml --dry-run           # resolved space, trial count, cost
    bdm-search trial search_spaces/lrm_rank.yaml            # one trial of the fixed settings
    bdm-search pareto lrm_rank                              # recompute the front from MLflow
    bdm-search sample RUN_ID --out samples.png              # images from a trial's packed model
    bdm-search export cifar10_w1a4 --out DIR                # runs as JSON + small artifacts
    bdm-search import DIR                                   # recreate them in a local MLflow

Every error in the input is one line naming the key, the value and what is allowed,
with exit code 2; nothing is written before the input is valid.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

KNOWN_TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql",
                          "databricks", "")  # fmt: skip


class DefaultRunGroup(TyperGroup):
    """A click group whose first argument, if it is not a command, is a study file for `run`.

    (A typer callback taking FILE would swallow the subcommand names.)
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultRunGroup,
    add_completion=False,
    no_args_is_help=True,
    help="BinaryDM search platform: 1-bit diffusion UNets, searched with Ray Tune + Optuna.",
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a key: --set training.lr=2e-5 (repeatable)"),
]
ProfileOption = Annotated[
    str | None, typer.Option(help="profile of the study file (default: its default_profile)")
]
TrackingOption = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (overrides the file)")
]
StoreOption = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI to read (default: ./mlflow.db)"),
]


#: DDIM steps of ``bdm-search sample`` for a run that logged no ``sampling_steps``.
DEFAULT_SAMPLE_STEPS = 100

#: The options that are shorthands for study keys.
_OPTION_OF = {"search.trials": "--trials", "tracking.uri": "--tracking-uri"}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(2)


def _load(file: Path, profile: str | None, sets: list[str] | None, **extra):
    from binarydm._typed import ConfigError
    from binarydm.spec import load_study

    overrides = list(sets or [])
    for key, value in extra.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        spec = load_study(file, profile=profile, overrides=overrides)
    except ConfigError as exc:
        message = str(exc)
        for key, value in extra.items():  # an option's value is no --set: name the option
            if value is not None:
                message = message.replace(f"--set: {key}=", f"{_OPTION_OF[key]}: {key}=")
        _fail(message)
    _check_tracking_uri(spec.tracking.uri)
    return spec


def _check_tracking_uri(uri: str | None) -> None:
    from binarydm.spec import uri_scheme

    if uri is None:
        return
    scheme = (uri_scheme(uri) or "").split("+", 1)[0]
    if scheme not in KNOWN_TRACKING_SCHEMES:
        _fail(
            f"tracking.uri={uri!r} is invalid: unknown scheme {scheme!r}; allowed sqlite:///PATH, "
            "file:///PATH, http(s)://HOST:PORT, postgresql://..., or a local path"
        )


def _store_uri(tracking_uri: str | None, *, create: bool = False) -> str:
    """The MLflow store a command reads: ``--tracking-uri``, else ./mlflow.db; checked.

    A command that only reads (``create=False``) refuses a SQLite store that does not
    exist: opening it would create an empty database. MLflow's "Downloading artifacts"
    bar, printed for each of the few small files these commands read, is turned off
    (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true`` keeps it).
    """
    from binarydm.search import StudyError
    from binarydm.search._preflight import check_mlflow_schema
    from binarydm.spec import sqlite_file

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    uri = tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    _check_tracking_uri(uri)
    database = sqlite_file(uri)
    if not create and database is not None and not Path(database).is_file():
        _fail(
            f"no MLflow store at {database}: run the study here first, or pass "
            "--tracking-uri sqlite:///PATH/mlflow.db (or the server's http://HOST:PORT)"
        )
    try:
        check_mlflow_schema(uri)
    except StudyError as exc:
        _fail(str(exc))
    return uri


def _guarded(action):
    """Turn the platform's expected errors into one line and exit code 2."""
    from binarydm._typed import ConfigError
    from binarydm.data import DatasetError
    from binarydm.models import ModelLoadError
    from binarydm.search import StudyError
    from binarydm.train import TrialError

    try:
        return action()
    except (ConfigError, DatasetError, ModelLoadError, StudyError) as exc:
        _fail(str(exc))
    except TrialError as exc:
        _fail(f"trial failed: {exc}")


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="study file (YAML)")],
    sets: SetOption = None,
    profile: ProfileOption = None,
    tracking_uri: TrackingOption = None,
    address: Annotated[
        str | None, typer.Option(help="existing Ray cluster (HOST:PORT or auto); default local")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted study")] = False,
    trials: Annotated[int | None, typer.Option(help="override search.trials")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the space, trial count, cost")] = False,
    verbose: Annotated[bool, typer.Option(help="forward Ray worker logs")] = False,
) -> None:
    """Run a study: every trial a BinaryDM QAT run on Ray Train, tracked in MLflow."""
    from rich.console import Console

    spec = _load(file, profile, sets, **{"tracking.uri": tracking_uri, "search.trials": trials})
    console = Console()

    def say_notes() -> None:  # after the checks: a bad input's error stays one line
        for note in spec.profile_notes():
            console.print(note, highlight=False, soft_wrap=True)

    if dry_run:
        _guarded(lambda: _preflight(spec, address))
        say_notes()
        _print_dry_run(spec, console)
        return
    _warn_remote_paths(spec, address, console)
    from binarydm.search import pareto_table, run_study
    from binarydm.search._console import interrupted_message, location_lines

    def started(location: dict) -> None:
        say_notes()
        for line in location_lines(location):
            console.print(line, highlight=False, soft_wrap=True)

    try:
        summary = _guarded(
            lambda: run_study(
                spec,
                address=address,
                resume=resume,
                verbose=verbose,
                on_start=started,
                say=lambda line: console.print(line, highlight=False, soft_wrap=True),
            )
        )
    except KeyboardInterrupt:
        command = resume_command(file, profile, sets, tracking_uri, address, trials)
        message = interrupted_message(spec.resolve_paths(), command)
        console.print(message, highlight=False, soft_wrap=True)  # the command on one line
        raise typer.Exit(130) from None
    console.print(pareto_table(summary))
    counts = ", ".join(f"{k.lower()}: {v}" for k, v in sorted(summary["counts"].items()))
    console.print(f"trials {counts}; MLflow experiment {spec.tracking.experiment or spec.name!r}")
    for line in location_lines(summary["location"]):
        console.print(line, highlight=False, soft_wrap=True)


def resume_command(
    file: Path,
    profile: str | None,
    sets: list[str] | None,
    tracking_uri: str | None,
    address: str | None,
    trials: int | None,
) -> str:
    """The command line that continues this study where it stopped."""
    import shlex

    words = ["bdm-search", str(file)]
    for flag, value in (("--profile", profile), ("--tracking-uri", tracking_uri),
                        ("--address", address), ("--trials", trials)):  # fmt: skip
        if value is not None:
            words += [flag, str(value)]
    for override in sets or []:
        words += ["--set", override]
    return shlex.join([*words, "--resume"])


def _warn_remote_paths(spec, address: str | None, console) -> None:
    """On a remote cluster, relative/local stores vanish with the job's temporary directory."""
    from binarydm.spec import is_remote_uri

    if not address or address.startswith(("127.", "localhost")):
        return
    local = []
    for key, value in (
        ("tracking.uri", spec.tracking.uri),
        ("storage.optuna", spec.storage.optuna),
        ("storage.ray_results", spec.storage.ray_results),
        ("data.root", spec.settings.data.root),
        ("tracking.artifact_location", spec.tracking.artifact_location),
    ):
        if value is None or not is_remote_uri(value):
            local.append(key)
    if local:
        console.print(
            f"[yellow]warning:[/] on a cluster, {', '.join(local)} must be remote or on shared "
            "storage (an mlflow server, a Postgres URL, s3:// or an NFS path); local paths "
            "vanish with the job's working directory"
        )


def _print_dry_run(spec, console) -> None:
    from binarydm.search import describe_space, estimate_cost

    console.print(describe_space(spec))
    cost = estimate_cost(spec, teacher_cached=_teacher_cached(spec))
    for key, value in cost.items():
        console.print(f"{key}: {value}")


def _teacher_cached(spec) -> bool:
    """Whether the study's shared FP teacher is already in the cache (no time to count)."""
    from binarydm.data import DatasetError
    from binarydm.train import cached_teacher_dir

    if spec.settings.teacher.pretrained or any(
        k.startswith(("teacher.", "data.")) for k in spec.search.space
    ):
        return False
    settings = spec.resolve_paths().trial_settings({}, spec.search.seeds[0])
    try:
        return (cached_teacher_dir(settings, settings.data.root) / "config.json").is_file()
    except DatasetError:
        return False


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="study file (YAML)")],
    sets: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Check a study file (and overrides) and what its run reads first (the data, a given
    teacher, an MLflow server); prints `ok` or one line saying what is wrong. Creates no
    store (it may fill the data cache, as the run would)."""
    spec = _load(file, profile, sets)
    checked = _guarded(lambda: _preflight(spec, None))
    for note in spec.profile_notes():
        typer.echo(note)
    typer.echo(f"ok: study {spec.name!r}, profile {spec.profile or 'none'}, "
               f"{spec.search.trials} trials x {len(spec.search.seeds)} seeds; "
               f"checked: the file, {', '.join(checked) or 'nothing else'}")  # fmt: skip


def _preflight(spec, address: str | None) -> list[str]:
    """The run's own checks before Ray starts (``search._preflight.preflight``)."""
    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.search._preflight import preflight

    return preflight(spec.resolve_paths(), str(resolve_cache_dir(None)), address)


@app.command()
def trial(
    file: Annotated[Path, typer.Argument(help="study file (YAML)")],
    sets: SetOption = None,
    profile: ProfileOption = None,
    tracking_uri: TrackingOption = None,
    address: Annotated[str | None, typer.Option(help="existing Ray cluster")] = None,
) -> None:
    """Run one trial of the file's fixed settings; print its metrics; log one MLflow run."""
    from rich.console import Console
    from rich.table import Table

    spec = _load(file, profile, sets, **{"tracking.uri": tracking_uri})
    metrics = _guarded(lambda: _single_trial(spec, address))
    table = Table(title=f"trial of {spec.name} ({spec.profile or 'no'} profile)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)


def _single_trial(spec, address: str | None) -> dict:
    from rich.console import Console

    from binarydm.search import run_single_trial

    console = Console(stderr=True)
    return run_single_trial(
        spec, address, say=lambda line: console.print(line, highlight=False, soft_wrap=True)
    )


@app.command()
def pareto(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment of the study")],
    study: Annotated[str | None, typer.Option(help="study name (default: the experiment)")] = None,
    tracking_uri: StoreOption = None,
) -> None:
    """Recompute a study's Pareto front, hypervolume and plots from MLflow alone."""
    from rich.console import Console

    from binarydm.search import pareto_table, summarize
    from binarydm.tracking import StudyTracker, load_study_summary

    uri = _store_uri(tracking_uri)
    name = study or experiment
    try:
        saved = load_study_summary(experiment, name, uri)
    except (LookupError, ValueError) as exc:
        _fail(str(exc))
    if not saved.get("objectives"):
        _fail(f"study {name!r} in experiment {experiment!r} was never summarised (no objectives)")
    objectives = [(o["metric"], o["direction"]) for o in saved["objectives"]]
    tracker = StudyTracker(uri, experiment, name)
    study_text = _parent_study_file(tracker, saved["run_id"])
    summary = summarize(
        tracker,
        objectives,
        reference_point=saved.get("reference_point") or None,
        study_file_text=study_text,
    )
    Console().print(pareto_table(summary))


def _parent_study_file(tracker, parent_run_id: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.client.download_artifacts(parent_run_id, "study.yaml", tmp)
        except Exception:  # an older parent without the file: the summary still recomputes
            return ""
        return Path(path).read_text()


@app.command()
def sample(
    run_id: Annotated[
        str,
        typer.Argument(
            help="a trial's MLflow run id, a unique prefix of one (as the Pareto table "
            "prints), or STUDY:N for trial N of study STUDY"
        ),
    ],
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("samples.png"),
    num: Annotated[int, typer.Option(help="number of images")] = 64,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="DDIM steps (default: the run's sampling_steps, as its FID was scored; "
            f"{DEFAULT_SAMPLE_STEPS} for a run without one)",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    tracking_uri: StoreOption = None,
) -> None:
    """Generate images from a trial's packed 1-bit model (local checkpoint or logged artifact)."""
    import tempfile

    import mlflow

    from binarydm.export import load_packed
    from binarydm.tracking import find_run
    from binarydm.train import ddim_sample, save_grid, to_uint8

    uri = _store_uri(tracking_uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = find_run(client, run_id)
    except LookupError as exc:
        _fail(str(exc))
    with tempfile.TemporaryDirectory() as tmp:
        packed = _packed_model(client, run, Path(tmp))
        model = load_packed(packed).eval()
    # The trial's own sampler by default: the images its FID and samples.png were made from.
    steps = steps or int(run.data.params.get("sampling_steps", DEFAULT_SAMPLE_STEPS))
    images = to_uint8(ddim_sample(model, num, steps=steps, seed=seed))
    save_grid(images, out)
    tags = run.data.tags
    which = (
        f"trial {tags['trial_id']} of study {tags['study']}"
        if "trial_id" in tags and "study" in tags
        else f"run {run.info.run_name}"
    )
    # Which model it was, in words: a prefix or STUDY:N names it only by a lookup.
    typer.echo(
        f"wrote {num} samples ({steps} DDIM steps) of {which} (run {run.info.run_id[:12]}, "
        f"{packed.name}) to {out}"
    )


def _packed_model(client, run, tmp: Path) -> Path:
    """The run's ``model.bdm``: its local checkpoint if this machine has it, else the copy
    logged to MLflow (``checkpoint/model.bdm``, logged for the Pareto front's trials)."""
    local = Path(run.data.tags.get("checkpoint", "")) / "model.bdm"
    if run.data.tags.get("checkpoint") and local.is_file():
        return local
    logged = "checkpoint/model.bdm"
    if any(a.path == logged for a in client.list_artifacts(run.info.run_id, "checkpoint")):
        return Path(client.download_artifacts(run.info.run_id, logged, str(tmp)))
    _fail(
        f"run {run.info.run_id} has no packed model: not at {local} on this machine and no "
        f"{logged} artifact (logged for Pareto-front trials once the study finished)"
    )


@app.command("export")
def export_runs(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment to export")],
    out: Annotated[Path, typer.Option(help="empty folder to write runs.json and artifacts to")],
    max_artifact_mib: Annotated[
        float, typer.Option(help="skip artifacts larger than this (weights are always skipped)")
    ] = 2.0,
    artifacts_from: Annotated[
        Path | None,
        typer.Option(help="the store's mlartifacts folder, copied from the machine that ran it"),
    ] = None,
    optuna_storage: Annotated[
        str | None,
        typer.Option(
            help="also write the study's Optuna trials (optuna.jsonl), so that it can be "
            "imported and resumed elsewhere: the study's storage URL (sqlite:///optuna.db)"
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option(help="the Optuna study (default: the experiment's name, a study's default)"),
    ] = None,
    tracking_uri: StoreOption = None,
) -> None:
    """Write an experiment's runs (params, metrics with history, tags, small artifacts) to a
    folder that can be committed; `bdm-search import` recreates them (docs/run-archive.md)."""
    from binarydm.tracking import export_experiment

    uri = _store_uri(tracking_uri)
    try:
        done = export_experiment(
            experiment, out, uri, int(max_artifact_mib * 1024 * 1024), artifacts_from,
            optuna_storage=optuna_storage, study_name=study_name,
        )  # fmt: skip
    except (LookupError, FileExistsError) as exc:
        _fail(str(exc))
    typer.echo(f"exported {done['runs']} runs and {done['artifacts']} artifacts to {out}")
    if done["optuna_trials"] is not None:
        typer.echo(f"  and the Optuna study's {done['optuna_trials']} trials (optuna.jsonl)")
    for skipped in done["skipped"]:
        typer.echo(f"  not exported: {skipped}")


@app.command("import")
def import_runs(
    archive: Annotated[Path, typer.Argument(help="folder written by bdm-search export")],
    experiment: Annotated[
        str | None, typer.Option(help="experiment to create (default: the archived name)")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="MLflow tracking URI to import into (./mlflow.db)"),
    ] = None,
    artifact_location: Annotated[
        str | None,
        typer.Option(help="the new experiment's artifact root (default: as a study's)"),
    ] = None,
    optuna_storage: Annotated[
        str | None,
        typer.Option(
            help="also recreate the archive's Optuna study here, to resume the study with "
            "`bdm-search STUDY --resume` (sqlite:///optuna.db is a study's default)"
        ),
    ] = None,
) -> None:
    """Recreate an exported experiment's runs in an MLflow store (for the UI and `pareto`),
    and with --optuna-storage its Optuna study (to resume it on this machine)."""
    from binarydm.spec import artifact_root
    from binarydm.tracking import import_archive

    uri = _store_uri(tracking_uri, create=True)
    root = artifact_root(uri, artifact_location, Path.cwd())
    try:
        name, created = import_archive(archive, uri, experiment, root, optuna_storage)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    typer.echo(f"imported {len(created)} runs into experiment {name!r} at {uri}")
    if optuna_storage is not None:
        typer.echo(f"  and its Optuna study into {optuna_storage}: resume with --resume")
    typer.echo(f"  browse: mlflow ui --backend-store-uri {uri}")


def main() -> None:
    app(prog_name="bdm-search")


if __name__ == "__main__":
    sys.exit(main())
