"""Study files: the shipped studies, parsing, overrides, paths, Optuna wiring, schema, errors."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from rich.console import Console

from binarydm._typed import ConfigError
from binarydm.search import (
    CPU_COST,
    DefineByRunSpace,
    build_sampler,
    describe_space,
    estimate_cost,
    optuna_distributions,
    optuna_space,
)
from binarydm.search import (
    distribution as optuna_distribution,
)
from binarydm.spec import (
    FILE_KEYS,
    METRIC_DIRECTIONS,
    SearchSpec,
    StudySpec,
    invalid_combinations,
    load_study,
    override_keys,
    parse_dimension,
    parse_study,
)
from binarydm.spec._loading import _read_yaml
from binarydm.spec.schema import SHIPPED_SCHEMA, schema_text, study_schema
from binarydm.train.settings import TrialSettings

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted((REPO / "search_spaces").glob("*.yaml"))
STUDY_NAMES = [p.stem for p in STUDIES]

optuna.logging.set_verbosity(optuna.logging.WARNING)


@functools.cache
def _shipped(name: str, profile: str | None = None) -> StudySpec:
    """A shipped study, loaded once per profile: specs are frozen, and loading validates a lot."""
    return load_study(REPO / "search_spaces" / f"{name}.yaml", profile=profile)


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


#: Settings for spaces that sample 1 or 3 bases: the default recipe's EBB needs exactly 2.
NO_EBB = {"settings/method/ebb/enabled": False}
NO_EBB_LINE = "settings: {method: {ebb: {enabled: false}}}\n"

MINIMAL = """
name: t
search:
  algorithm: random
  trials: 3
  space:
    method.lrm.weight: {logfloat: [1e-6, 1.0]}
"""


def _minimal(**changes: Any) -> dict[str, Any]:
    data = _read_yaml(MINIMAL)
    for key, value in changes.items():
        node = data
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


# -- shipped studies ---------------------------------------------------------------------


def test_all_five_studies_are_shipped() -> None:
    assert set(STUDY_NAMES) == {"lrm_rank", "lmb_bases", "progressive_init", "ablation", "joint"}


@pytest.mark.parametrize("path", STUDIES, ids=STUDY_NAMES)
def test_shipped_study_loads_in_every_profile(path: Path) -> None:
    for profile in ("quick", "gpu", "none"):
        spec = _shipped(path.stem, profile)
        assert spec.name == path.stem
        assert spec.source == str(path)
        assert spec.profile == (None if profile == "none" else profile)
    assert _shipped(path.stem).profile == "quick"


@pytest.mark.parametrize("path", STUDIES, ids=STUDY_NAMES)
def test_quick_profile_fits_fifteen_minutes_on_two_cores(path: Path) -> None:
    spec = _shipped(path.stem)
    cost = estimate_cost(spec, cluster_cpus=2)
    assert cost["cost_model"] == "cpu"
    assert cost["concurrent_trials"] == 2
    assert cost["wall_seconds"] <= 15 * 60
    settings = spec.settings
    assert (settings.data.source, settings.data.resolution, settings.data.channels) == (
        "mnist",
        16,
        1,
    )
    assert settings.evaluation.fid_dims == 64
    assert not settings.workers.use_gpu


@pytest.mark.parametrize("path", STUDIES, ids=STUDY_NAMES)
def test_gpu_profile_is_sized_for_real_results(path: Path) -> None:
    spec = _shipped(path.stem, "gpu")
    settings = spec.settings
    assert (settings.data.source, settings.data.resolution, settings.data.channels) == (
        "cifar10",
        32,
        3,
    )
    assert settings.teacher.preset == "ddpm-cifar10"
    # The GPU protocol of the results (benchmarks/results/cifar10_w1.md): at least 1500 QAT
    # steps, FID-2048 on at least 4000 DDIM-100 samples.
    assert settings.training.steps >= 1500 or "training.steps" in spec.search.space
    assert settings.evaluation.fid_dims == 2048 and settings.evaluation.fid_samples >= 4000
    assert settings.evaluation.sampling_steps == 100
    assert settings.workers.use_gpu


def test_quick_profiles_share_one_teacher() -> None:
    teachers = {
        (_shipped(name).settings.teacher, _shipped(name).settings.data) for name in STUDY_NAMES
    }
    assert len(teachers) == 1


def test_lrm_rank_quick_shape() -> None:
    spec = _shipped("lrm_rank")
    assert spec.search.trials == 4
    assert spec.max_concurrent_trials(cluster_cpus=16) == 2
    assert spec.settings.method.activation.bits == 4
    assert spec.search.space["method.lrm.weight"].log
    assert spec.search.space["method.lrm.rank_divisor"].choices == (1, 2, 4, 8, 16)


def test_ablation_grid_enumerates_every_row_once() -> None:
    spec = _shipped("ablation")
    assert (spec.search.algorithm, spec.search.trials) == ("grid", 5)
    study = optuna.create_study(sampler=build_sampler(spec.search))
    distributions = optuna_distributions(spec.search)

    def objective(trial: optuna.Trial) -> float:
        for key, distribution in distributions.items():
            trial.suggest_categorical(key, distribution.choices)
        return 0.0

    study.optimize(objective, n_trials=10)  # the grid sampler stops the study when exhausted
    assert sorted(t.params["row"] for t in study.trials) == sorted(
        ["vanilla", "ebb", "binarydm", "lrm", "lmb"]
    )
    deployed = {
        row: spec.trial_settings({"row": row}, 0).method.deployed_bases
        for row in ("vanilla", "ebb", "binarydm", "lrm", "lmb")
    }
    assert deployed == {"vanilla": 1, "ebb": 1, "binarydm": 1, "lrm": 1, "lmb": 2}


def test_progressive_grid_size_follows_the_profile() -> None:
    path = REPO / "search_spaces" / "progressive_init.yaml"
    assert _shipped(path.stem).search.trials == 4
    assert _shipped(path.stem, "none").search.trials == 5


# -- trial settings, overrides, paths ------------------------------------------------------


def test_trial_settings_applies_params_and_seed() -> None:
    spec = _shipped("lrm_rank")
    params = {"method.lrm.rank_divisor": np.int64(8), "method.lrm.weight": 0.5}
    settings = spec.trial_settings(params, seed=3)
    assert isinstance(settings, TrialSettings)
    assert settings.method.lrm.rank_divisor == 8
    assert settings.method.lrm.weight == 0.5
    assert settings.seed == 3
    assert settings.training.steps == 150  # the quick profile's fixed value
    with pytest.raises(ConfigError, match=r"training\.lr=0\.1 is invalid: not a dimension"):
        spec.trial_settings({"training.lr": 0.1}, seed=0)


def test_compile_mode_needs_compile() -> None:
    settings = TrialSettings.from_dict(
        {"training": {"compile": True, "compile_mode": "reduce-overhead"}}
    )
    assert settings.training.compile_mode == "reduce-overhead"
    # A mode without compile would silently train eagerly: refused, with the reason.
    with pytest.raises(ConfigError, match=r"compile_mode='reduce-overhead'.*training\.compile"):
        TrialSettings.from_dict({"training": {"compile_mode": "reduce-overhead"}})
    with pytest.raises(ConfigError, match=r"compile_mode='fast' is invalid"):
        TrialSettings.from_dict({"training": {"compile": True, "compile_mode": "fast"}})
    traced = {"compile": True, "compile_backend": "aot_eager"}
    assert TrialSettings.from_dict({"training": traced}).training.compile_options() == {
        "backend": "aot_eager"
    }
    with pytest.raises(ConfigError, match=r"compile_mode='reduce-overhead'.*aot_eager"):
        TrialSettings.from_dict({"training": {**traced, "compile_mode": "reduce-overhead"}})
    with pytest.raises(ConfigError, match=r"compile_backend='tvm' is invalid"):
        TrialSettings.from_dict({"training": {"compile": True, "compile_backend": "tvm"}})


def test_sample_compile_and_fid_batch_are_validated() -> None:
    evaluation = TrialSettings().evaluation
    assert evaluation.sample_compile == "none"  # eager sampling unless a study asks
    assert (evaluation.fid_batch("cpu"), evaluation.fid_batch("cuda")) == (100, 500)
    chosen = TrialSettings.from_dict(
        {"evaluation": {"sample_compile": "reduce-overhead", "fid_batch_size": 64}}
    ).evaluation
    assert chosen.sample_compile == "reduce-overhead"
    assert (chosen.fid_batch("cpu"), chosen.fid_batch("cuda")) == (64, 64)
    with pytest.raises(ConfigError, match=r"sample_compile='fast' is invalid"):
        TrialSettings.from_dict({"evaluation": {"sample_compile": "fast"}})
    with pytest.raises(ConfigError, match=r"fid_batch_size=0 is invalid: allowed an integer >= 1"):
        TrialSettings.from_dict({"evaluation": {"fid_batch_size": 0}})


def test_set_overrides_win_over_the_profile() -> None:
    path = REPO / "search_spaces" / "lrm_rank.yaml"
    spec = load_study(
        path,
        overrides=[
            "training.steps=300",
            "training.lr=1e-3",
            "search.trials=2",
            "search.space.method.lrm.axis=null",
            "search.space.training.batch_size={choice: [32, 64]}",
        ],
    )
    assert spec.settings.training.steps == 300
    assert spec.settings.training.lr == 1e-3  # YAML 1.2 float, not the string '1e-3'
    assert spec.search.trials == 2
    assert list(spec.search.space) == [
        "method.lrm.rank_divisor",
        "method.lrm.weight",
        "training.batch_size",
    ]
    mapping = load_study(path, overrides={"training.steps": "250", "evaluation.use_ema": False})
    assert mapping.settings.training.steps == 250
    assert mapping.settings.evaluation.use_ema is False


def test_profile_none_and_default_profile() -> None:
    path = REPO / "search_spaces" / "lrm_rank.yaml"
    assert load_study(path, profile="none").settings.training.steps == 2000
    data = _read_yaml(path.read_text())
    data["default_profile"] = None
    assert parse_study(data).profile is None
    data["default_profile"] = "gpu"
    assert parse_study(data).settings.data.source == "cifar10"


def test_round_trip_through_to_dict() -> None:
    spec = load_study(REPO / "search_spaces" / "joint.yaml", overrides=["training.lr=2e-4"])
    again = parse_study(json.loads(json.dumps(spec.to_dict())), profile="none")
    for name in ("name", "settings", "search", "resources", "tracking", "storage", "profiles"):
        assert getattr(again, name) == getattr(spec, name), name


def test_resolve_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINARYDM_DATA_ROOT", "shared/data")
    spec = parse_study(_minimal(settings={"data": {"source": "npz", "path": "x/mnist.npz"}}))
    resolved = spec.resolve_paths(tmp_path)
    assert resolved.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolved.tracking.experiment == "t"
    assert resolved.tracking.artifact_location == str(tmp_path / "mlartifacts")
    assert resolved.storage.optuna == f"sqlite:///{tmp_path}/optuna.db"
    assert resolved.storage.ray_results == str(tmp_path / "ray_results")
    assert resolved.settings.data.root == str(tmp_path / "shared" / "data")
    assert resolved.settings.data.path == str(tmp_path / "x" / "mnist.npz")

    given = parse_study(
        _minimal(
            tracking={"uri": "sqlite:///db/m.db", "artifact_location": "s3://bucket/a"},
            storage={"optuna": "postgresql://h/optuna", "ray_results": "out"},
            settings={"data": {"root": "/abs/data"}, "teacher": {"pretrained": "google/x"}},
        )
    ).resolve_paths(tmp_path)
    assert given.tracking.uri == f"sqlite:///{tmp_path}/db/m.db"
    assert given.tracking.artifact_location == "s3://bucket/a"
    assert given.storage.optuna == "postgresql://h/optuna"
    assert given.storage.ray_results == str(tmp_path / "out")
    assert given.settings.data.root == "/abs/data"
    assert given.settings.teacher.pretrained == "google/x"  # a hub id, not a folder


def test_max_concurrent_trials_from_cluster() -> None:
    spec = parse_study(_minimal(search={**_minimal()["search"], "trials": 10}))
    assert spec.max_concurrent_trials(cluster_cpus=2) == 2
    assert spec.max_concurrent_trials(cluster_cpus=64) == 10  # capped by the budget
    driver = dataclasses.replace(
        spec, resources=dataclasses.replace(spec.resources, cpus_per_trial=1)
    )
    assert driver.max_concurrent_trials(cluster_cpus=2) == 1
    gpu = dataclasses.replace(spec, settings=spec.settings.replace(**{"workers.use_gpu": True}))
    assert gpu.max_concurrent_trials(cluster_cpus=64, cluster_gpus=4) == 4
    assert gpu.max_concurrent_trials(cluster_cpus=64, cluster_gpus=0) == 1


def test_trial_reserves_its_workers_share_only_when_inline() -> None:
    from binarydm.search._driver import _driver_resources

    spec = parse_study(_minimal())
    gpu = {"workers.use_gpu": True, "workers.gpus_per_worker": 0.25, "workers.cpus_per_worker": 2}
    train = dataclasses.replace(spec, settings=spec.settings.replace(**gpu))
    # A Ray Train fit's workers reserve their own CPUs and GPUs: the trial only waits.
    assert _driver_resources(train) == {"memory": 64 * 2**20}
    inline = dataclasses.replace(train, settings=train.settings.replace(**{"workers.inline": True}))
    assert _driver_resources(inline) == {"CPU": 2.0, "GPU": 0.25}
    driver = dataclasses.replace(
        inline, resources=dataclasses.replace(inline.resources, cpus_per_trial=1)
    )
    assert _driver_resources(driver) == {"CPU": 3.0, "GPU": 0.25}


# -- search: samplers, Optuna, Ray Tune --------------------------------------------------------


@pytest.mark.parametrize(
    ("trials", "population"), [(4, 4), (8, 4), (30, 15), (100, 50), (1000, 50)]
)
def test_nsga2_population_is_sized_to_the_budget(trials: int, population: int) -> None:
    spec = parse_study(
        _minimal(search={**_minimal()["search"], "algorithm": "nsga2", "trials": trials})
    )
    assert spec.search.population_size == population
    assert isinstance(build_sampler(spec.search), optuna.samplers.NSGAIISampler)


def test_samplers_by_algorithm() -> None:
    def sampler(**search: Any) -> optuna.samplers.BaseSampler:
        data = _minimal(search={**_minimal()["search"], **search})
        return build_sampler(parse_study(data).search)

    assert isinstance(sampler(algorithm="tpe"), optuna.samplers.TPESampler)
    assert isinstance(sampler(algorithm="random"), optuna.samplers.RandomSampler)
    grid = {"algorithm": "grid", "trials": None, "space": {"training.lr": {"choice": [1, 2]}}}
    assert isinstance(sampler(**grid), optuna.samplers.GridSampler)
    assert (
        parse_study(
            _minimal(search={**_minimal()["search"], "algorithm": "tpe", "trials": 40})
        ).search.startup_trials
        == 10
    )


def test_distributions_match_the_forms() -> None:
    spec = _shipped("joint")
    dists = optuna_distributions(spec.search)
    assert dists["method.weight.bases"] == optuna.distributions.CategoricalDistribution([1, 2, 3])
    assert dists["method.weight.scope_levels"] == optuna.distributions.IntDistribution(1, 3)
    assert dists["method.ebb.switch_at"] == optuna.distributions.FloatDistribution(0.4, 0.7)
    assert dists["training.lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)


def test_define_by_run_honours_when_conditions() -> None:
    spec = _shipped("joint")
    space = optuna_space(spec.search)
    assert isinstance(space, DefineByRunSpace)
    space = pickle.loads(pickle.dumps(space))  # Tune pickles the searcher
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_ebb = False
    for _ in range(60):
        trial = study.ask()
        space(trial)
        params = trial.params
        study.tell(trial, 0.0)
        assert ("method.weight.bases" in params) == (params["method.weight.kind"] == "binary")
        assert ("method.weight.bits" in params) == (params["method.weight.kind"] == "lsq")
        assert ("method.ebb.enabled" in params) == (params.get("method.weight.bases") == 2)
        assert ("method.ebb.tau" in params) == (params.get("method.ebb.enabled") is True)
        seen_ebb |= params.get("method.ebb.enabled") is True
        spec.trial_settings(params, seed=0)  # every sampled combination is buildable
    assert seen_ebb


def test_unconditional_space_is_a_distribution_dict() -> None:
    spec = _shipped("lrm_rank")
    assert optuna_space(spec.search) == optuna_distributions(spec.search)


def test_ray_tune_optuna_search_accepts_the_space() -> None:
    optuna_search = pytest.importorskip("ray.tune.search.optuna")
    spec = _shipped("joint")
    searcher = optuna_search.OptunaSearch(
        space=optuna_space(spec.search),
        metric=spec.search.metrics,
        mode=spec.search.tune_modes,
        sampler=build_sampler(spec.search),
    )
    for trial_id in ("a", "b", "c"):
        params = searcher.suggest(trial_id)
        assert set(params) <= set(spec.search.space)
        spec.trial_settings(params, seed=0)


# -- dimensions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        {"choice": [1, True, "a", None, 0.5]},
        {"int": [2, 10], "step": 2},
        {"int": [1, 64], "log": True},
        {"float": [0.0, 1.5]},
        {"logfloat": [1e-6, 1.0]},
        {"choice": [1, 2], "when": {"method.lrm.enabled": [True]}},
    ],
)
def test_dimension_round_trips_through_yaml_form(form: dict[str, Any]) -> None:
    dimension = parse_dimension("k", form)
    assert parse_dimension("k", dimension.to_yaml()) == dimension


def test_when_accepts_a_list_of_values() -> None:
    space = {
        "method.weight.bases": {"choice": [1, 2, 3]},
        "method.weight.scope_levels": {"int": [0, 3], "when": {"method.weight.bases": [2, 3]}},
    }
    spec = parse_study(
        _minimal(search={**_minimal()["search"], "space": space}, **NO_EBB)  # bases 1 and 3
    )
    dimension = spec.search.space["method.weight.scope_levels"]
    assert dimension.when == {"method.weight.bases": (2, 3)}
    assert dimension.active({"method.weight.bases": 3})
    assert not dimension.active({"method.weight.bases": 1})
    assert not dimension.active({})  # a condition on an unsampled dimension is false


def test_invalid_combinations_found_without_when() -> None:
    space = {
        "method.weight.bases": parse_dimension("method.weight.bases", {"choice": [1, 2]}),
        "method.ebb.enabled": parse_dimension("method.ebb.enabled", {"choice": [False, True]}),
    }
    settings = TrialSettings().replace(**{"method.ebb.enabled": False})
    failures = invalid_combinations(settings, space)
    assert [params for params, _ in failures] == [
        {"method.weight.bases": 1, "method.ebb.enabled": True}
    ]
    conditional = dict(space)
    conditional["method.ebb.enabled"] = parse_dimension(
        "method.ebb.enabled", {"choice": [False, True], "when": {"method.weight.bases": 2}}
    )
    assert invalid_combinations(settings, conditional) == []


def test_describe_space_lists_every_dimension() -> None:
    spec = _shipped("joint")
    out = io.StringIO()
    Console(file=out, width=200).print(describe_space(spec))
    text = out.getvalue()
    for key in spec.search.space:
        assert key in text
    assert "nsga2, 6 trials" in text


def test_estimate_cost_scales_with_steps_and_seeds() -> None:
    spec = parse_study(_minimal())
    base = estimate_cost(spec, cluster_cpus=1)
    longer = dataclasses.replace(
        spec, settings=spec.settings.replace(**{"training.steps": 2 * spec.settings.training.steps})
    )
    train_s = (
        spec.settings.training.steps * spec.settings.training.batch_size * CPU_COST.train_image_s
    )
    assert estimate_cost(longer, cluster_cpus=1)["seconds_per_run"] == pytest.approx(
        base["seconds_per_run"] + train_s
    )
    seeded = dataclasses.replace(spec, search=dataclasses.replace(spec.search, seeds=(0, 1)))
    assert estimate_cost(seeded, cluster_cpus=1)["runs"] == 2 * base["runs"]


# -- schema and docs --------------------------------------------------------------------------


def test_shipped_schema_is_up_to_date() -> None:
    assert SHIPPED_SCHEMA.read_text() == schema_text(), "run: python -m binarydm.spec.schema"


@pytest.mark.parametrize("path", STUDIES, ids=STUDY_NAMES)
def test_shipped_study_validates_against_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SHIPPED_SCHEMA.read_text()))
    assert list(validator.iter_errors(_read_yaml(path.read_text()))) == []


def test_schema_rejects_what_the_parser_rejects() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(study_schema())
    jsonschema.Draft202012Validator.check_schema(study_schema())
    bad = [
        _minimal(search={**_minimal()["search"], "algorithm": "bayes"}),
        _minimal(stray=1),
        _minimal(search={**_minimal()["search"], "space": {"training.stepz": {"choice": [1]}}}),
        _minimal(search={**_minimal()["search"], "space": {"training.lr": {"float": [1]}}}),
        _minimal(settings={"training": {"steps": "many"}}),
        _minimal(profiles={"quick": {"training.stepz": 1}}),
        {"search": _minimal()["search"]},
    ]
    for data in bad:
        assert not validator.is_valid(data), data
    assert validator.is_valid(_minimal(profiles={"q": {"search.space.training.lr": None}}))


def test_docs_mention_every_study_key() -> None:
    doc = (REPO / "docs" / "study-file.md").read_text()
    keys = list(FILE_KEYS) + [k.split(".", 1)[1] for k in override_keys() if "." in k]
    keys += [f.name for f in dataclasses.fields(SearchSpec)]
    missing = [key for key in keys if f"`{key}`" not in doc]
    assert missing == []
    assert set(METRIC_DIRECTIONS) <= set(re.findall(r"`(\w+)`", doc))


# -- errors: one line naming file, key, value, allowed -------------------------------------------


def _error(tmp_path: Path, text: str, **kwargs: Any) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_study(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def _with(search_line: str = "", top: str = "", space: str = "") -> str:
    space = space or "    method.lrm.weight: {logfloat: [1e-6, 1.0]}\n"
    return (
        f"name: t\n{top}search:\n  algorithm: random\n  trials: 3\n{search_line}  space:\n{space}"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_with(top="stray: 1\n"), r"stray=1 is invalid: unknown key; allowed: name, settings"),
        (
            _with(top="settings: {training: {stepz: 5}}\n"),
            r"settings: training\.stepz=5 is invalid: unknown key",
        ),
        (
            _with(space="    training.stepz: {choice: [1]}\n"),
            r"search\.space\.training\.stepz=.* unknown key; .*did you mean training\.steps\?",
        ),
        (
            _with(space="    workers.inline: {choice: [true, false]}\n"),
            r"search\.space\.workers\.inline=.* is invalid: not searchable .*allowed: a fixed",
        ),
        (
            _with(top="settings: {training: {steps: many}}\n"),
            r"training\.steps='many' is invalid: allowed an integer",
        ),
        (
            _with(top="settings: {training: {steps: 0}}\n"),
            r"training\.steps=0 is invalid: allowed an integer >= 1",
        ),
        (
            _with(top=NO_EBB_LINE, space="    method.weight.bases: {choice: [1, 2, 4]}\n"),
            r"search\.space\.method\.weight\.bases=4 is invalid: .*allowed an integer in 1\.\.3",
        ),
        (
            _with(space="    training.steps: {float: [10, 20]}\n"),
            r"search\.space\.training\.steps=10\.0 is invalid: .*allowed an integer",
        ),
        (
            _with(space="    training.lr: {logfloat: [0, 1]}\n"),
            r"search\.space\.training\.lr\.logfloat=\[0\.0, 1\.0\] is invalid: allowed low > 0",
        ),
        (
            _with(space="    training.lr: {float: [1, 2], step: 1}\n"),
            r"search\.space\.training\.lr\.step=1 is invalid: unknown option .*allowed: log, when",
        ),
        (
            _with(space="    training.steps: {int: [10, 25], step: 10}\n"),
            r"training\.steps\.int=\[10, 25\] is invalid: allowed high - low a multiple of step",
        ),
        (
            _with(space="    training.steps: [1, 2]\n"),
            r"search\.space\.training\.steps=\[1, 2\] is invalid: allowed one of \{choice",
        ),
        (
            _with(space="    seed: {choice: [1, 2]}\n"),
            r"search\.space\.seed=.* allowed: a settings key other than seed",
        ),
        (
            _with("  objectives: [{metric: fidd}]\n"),
            r"search\.objectives\[0\]\.metric='fidd' is invalid: allowed one of 'fid'",
        ),
        (
            _with("  objectives: [{metric: fid, direction: lower}]\n"),
            r"search\.objectives\[0\]\.direction='lower' is invalid: .*'minimize', 'maximize'",
        ),
        (
            _with("  objectives: [{metric: fid}, {metric: fid}]\n"),
            r"search\.objectives\[1\]\.metric='fid' is invalid: allowed a metric not already",
        ),
        (
            _with("  reference_point: {test_loss: 3}\n"),
            r"search\.reference_point\.test_loss=3 is invalid: allowed keys among the objectives",
        ),
        (
            _with().replace("random", "grid"),
            r"search\.space\.method\.lrm\.weight=\{'logfloat'.* allowed only \{choice",
        ),
        (
            _with(space="    method.lrm.axis: {choice: [channel, width]}\n").replace(
                "random", "grid"
            ),
            r"search\.trials=3 is invalid: allowed at most the grid size 2",
        ),
        (
            _with().replace("  trials: 3\n", ""),
            r"search\.trials=None is invalid: allowed an integer >= 1 \(only grid",
        ),
        (
            _with().replace(
                "  space:\n    method.lrm.weight: {logfloat: [1e-6, 1.0]}\n", "  space: {}\n"
            ),
            r"search\.space=\{\} is invalid: allowed a mapping of at least one",
        ),
        (_with().replace("random", "annealing"), r"search\.algorithm='annealing' is invalid"),
        (
            _with(
                space="    method.ebb.enabled: {choice: [true], when: {method.weight.bases: 2}}\n"
                "    method.weight.bases: {choice: [1, 2]}\n"
            ),
            r"search\.space\.method\.ebb\.enabled\.when\.method\.weight\.bases=\[2\] is invalid: "
            r"allowed only choice or cases dimensions listed before",
        ),
        (
            _with(
                top=NO_EBB_LINE,
                space="    method.weight.bases: {choice: [1, 2]}\n"
                "    method.ebb.enabled: {choice: [false, true]}\n",
            ),
            r"search\.space: the combination \{'method\.weight\.bases': 1, "
            r"'method\.ebb\.enabled': True\} is invalid",
        ),
        (
            _with(top="name: again\n"),
            r"name=.* on line 2 is invalid: duplicate key \(first on line 1\)",
        ),
        (_with().replace("name: t", "name: my study"), r"name='my study' is invalid"),
        (
            _with(top="profiles: {quick: {training.stepz: 3}}\n"),
            r"profile 'quick': training\.stepz=3 is invalid: unknown key; .*training\.steps\?",
        ),
        (
            _with(top="profiles: {gpu: {evaluation.fid_dims: 100}}\ndefault_profile: gpu\n"),
            r"profile 'gpu': evaluation\.fid_dims=100 is invalid: allowed one of",
        ),
        (
            _with(top="settings: {seed: 5}\n"),
            r"settings\.seed=5 is invalid: allowed not set here: .*search\.seeds",
        ),
        (
            _with(top="profiles: {quick: {seed: 1}}\n"),
            r"profile 'quick': seed=1 is invalid: allowed not set here",
        ),
        ("name: t\nsearch: [\n", r"YAML syntax error at line \d+, column \d+"),
        ("- just\n- a list\n", r"\['just', 'a list'\] is invalid: allowed a mapping with name"),
    ],
)
def test_bad_study_is_one_line_naming_key_and_value(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert re.search(expected, _error(tmp_path, text)), _error(tmp_path, text)


def test_bad_profile_and_set_arguments(tmp_path: Path) -> None:
    text = _with(top="profiles: {quick: {training.steps: 50}}\n")
    assert "profile='fast' is invalid: allowed one of quick, none" in _error(
        tmp_path, text, profile="fast"
    )
    assert "--set: training.steps=0 is invalid" in _error(
        tmp_path, text, overrides=["training.steps=0"]
    )
    assert "--set 'training.steps' is invalid: allowed KEY=VALUE" in _error(
        tmp_path, text, overrides=["training.steps"]
    )
    assert "--set 'search.trials=[1' is invalid: YAML syntax error" in _error(
        tmp_path, text, overrides=["search.trials=[1"]
    )


def test_missing_file_names_the_shipped_studies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _shipped("lrm_rnak")
    message = str(info.value)
    assert "lrm_rnak.yaml: no such study file; allowed: ablation.yaml" in message
    assert "lrm_rank.yaml" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"nothing\.yaml: no such study file"):
        load_study(tmp_path / "nothing.yaml")


def test_docs_error_example_is_real() -> None:
    doc = (REPO / "docs" / "study-file.md").read_text()
    data = _read_yaml((REPO / "search_spaces" / "lmb_bases.yaml").read_text())
    data["search"]["space"]["method.weight.bases"] = {"choice": [1, 2, 4]}
    with pytest.raises(ConfigError) as info:
        parse_study(data, source="search_spaces/lmb_bases.yaml")
    assert str(info.value) in doc


def test_study_spec_is_frozen() -> None:
    spec = parse_study(_minimal())
    assert isinstance(spec, StudySpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


# -- cases dimensions ----------------------------------------------------------------------

CASES = {
    "cases": {
        "plain": {"method.lrm.enabled": False, "training.lr": 1.0e-4},
        "lrm": {"method.lrm.enabled": True, "training.lr": 3.0e-5},
    }
}


def test_cases_dimension_round_trips_and_expands() -> None:
    dimension = parse_dimension("row", CASES)
    assert dimension.kind == "cases" and dimension.choices == ("plain", "lrm")
    assert parse_dimension("row", dimension.to_yaml()) == dimension
    assert optuna_distribution(dimension) == optuna.distributions.CategoricalDistribution(
        ["plain", "lrm"]
    )
    space = {
        "row": CASES,
        "method.lrm.weight": {"logfloat": [1e-6, 1.0], "when": {"row": "lrm"}},
    }
    spec = parse_study(
        _minimal(search={**_minimal()["search"], "algorithm": "random", "space": space})
    )
    plain = spec.trial_settings({"row": "plain"}, seed=0)
    assert not plain.method.lrm.enabled and plain.training.lr == 1e-4
    lrm = spec.trial_settings({"row": "lrm", "method.lrm.weight": 0.5}, seed=3)
    assert lrm.method.lrm.enabled and lrm.training.lr == 3e-5 and lrm.method.lrm.weight == 0.5
    assert lrm.seed == 3
    assert spec.search.space["method.lrm.weight"].active({"row": "lrm"})
    assert not spec.search.space["method.lrm.weight"].active({"row": "plain"})


def test_cases_dimension_is_a_grid_and_rejects_bad_cases(tmp_path: Path) -> None:
    grid = parse_study(
        _minimal(
            search={
                **_minimal()["search"],
                "algorithm": "grid",
                "trials": None,
                "space": {"row": CASES},
            }
        )  # fmt: skip
    )
    assert grid.search.trials == 2
    assert isinstance(build_sampler(grid.search), optuna.samplers.GridSampler)
    bad = {
        "training.row": (CASES, r"a cases dimension is invalid under a dotted key"),
        "row": ({"cases": {"a": {"training.stepz": 3}}}, r"row\.cases\.a\.training\.stepz=3 .*"
                r"did you mean training\.steps\?"),
        "row2": ({"cases": {"a": {"training.lr": 1e-4}}}, r"row2\.cases\.a\.training\.lr=.* "
                 r"a key no other dimension of the space sets"),
        "row3": ({"cases": {"a": {"training.steps": 0}}}, r"search\.space\.row3='a' is invalid: "
                 r"the settings reject it \(training\.steps=0"),
        "row4": ({"cases": {}}, r"row4\.cases=\{\} is invalid: allowed a non-empty mapping"),
    }  # fmt: skip
    for key, (form, expected) in bad.items():
        space = {key: form}
        if key == "row2":
            space = {"training.lr": {"choice": [1e-4]}, "row2": form}
        text = yaml.safe_dump(
            {"name": "t", "search": {"algorithm": "random", "trials": 2, "space": space}}
        )
        assert re.search(expected, _error(tmp_path, text)), (key, _error(tmp_path, text))


def test_cases_label_is_logged_beside_the_settings() -> None:
    from binarydm.search._trainable import StudyContext, trial_params

    spec = _shipped("ablation")
    params = trial_params(StudyContext(spec, None, "", "", ""), {"row": "lmb"})
    assert params["row"] == "lmb"
    assert params["method.ebb.enabled"] == "False" or params["method.ebb.enabled"] is False
    assert params["method.weight.bases"] == 2
    # The FID's comparability settings once, under design.md's names, known before the end.
    assert params["fid_dims"] == spec.settings.evaluation.fid_dims
    assert params["sampling_steps"] == spec.settings.evaluation.sampling_steps
    assert params["fid_reference"] == "mnist/test/16px"
    assert not {"evaluation.fid_dims", "evaluation.fid_samples", "evaluation.sampling_steps"} & set(
        params
    )


BENCHMARK_STUDIES = sorted((REPO / "benchmarks" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCHMARK_STUDIES, ids=[p.stem for p in BENCHMARK_STUDIES])
def test_benchmark_study_files_load(path: Path) -> None:
    # The studies the results were measured with must keep loading as the settings evolve.
    spec = load_study(path)
    assert spec.search.trials >= 1
    rows = spec.search.space.get("row")
    for params in [{"row": name} for name in rows.choices] if rows else [{}]:
        spec.trial_settings(params, seed=0)
