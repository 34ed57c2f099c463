"""The deployment files under platform/: Kubernetes manifests and container images.

Nothing here talks to a cluster. The manifests are checked against what would reject or
break them there: Kubernetes' own JSON schemas (kubernetes-validate, strict, as
`kubectl apply` validates), the fields of the KubeRay CRDs, the option parsers of the
pinned `ray start`, `mlflow server` and `bdm-search`, and the version pins of
pyproject.toml. The secret checks are also run on a deliberately leaky manifest, to show
they catch what they look for.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's venvs are 3.11
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
PLATFORM = REPO / "platform"
K8S = PLATFORM / "k8s"
DOCKER = PLATFORM / "docker"
EXAMPLE_SECRETS = K8S / "secrets.example.yaml"
K8S_VERSION = "1.33"  # validated against this Kubernetes API (schemas of kubernetes-validate)
API_VERSIONS = {
    "RayJob": "ray.io/v1",
    "RayCluster": "ray.io/v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
}
RAY_KINDS = ("RayJob", "RayCluster")
SECRET_ENV_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s/]+@", re.IGNORECASE)
PLACEHOLDER = "CHANGE-ME"
# Example Secret values that are not credentials, so need no placeholder marker.
NON_SECRET_KEYS = {"username", "admin-username", "endpoint-url"}
# Kubernetes' resource.Quantity: a decimal number with an optional SI/binary suffix or exponent.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?")
SHELL_OPERATORS = {"&&", "||", ";", "(", ")", "&", "|"}
SHELL_REDIRECTS = {">", ">>", "<", ">&", "<&"}


# --- loading -------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_docs(*, include_examples: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in manifest_files()
        if include_examples or path != EXAMPLE_SECRETS
        for doc in load_docs(path)
    ]


def the(kind: str, path: Path | None = None) -> dict[str, Any]:
    """The only document of ``kind`` (in ``path`` if given)."""
    found = [d for p, d in all_docs() if d["kind"] == kind and path in (None, p)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pins() -> dict[str, str]:
    """``name -> version`` of every ``==`` pin of pyproject.toml's dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            found[requirement.name] = exact[0]
    return found


def dockerfile_args(path: Path) -> dict[str, str]:
    """Default values of the Dockerfile's ``ARG NAME=value`` lines (last one wins)."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", path.read_text(), re.MULTILINE))


def ray_pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(role, pod template)`` of a RayJob's or RayCluster's head, workers and submitter."""
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker:{group['groupName']}", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return pod_template(workload)["metadata"]["labels"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside ``node``, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# --- parsing and versions ----------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_parses_into_named_objects_of_known_kinds(path: Path):
    docs = load_docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert doc.get("kind") in API_VERSIONS, f"{path.name}: unexpected kind {doc.get('kind')}"
        assert doc.get("apiVersion") == API_VERSIONS[doc["kind"]], f"{path.name}: {doc['kind']}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} has no name"


def test_each_file_holds_the_objects_the_guide_applies():
    kinds = {p.name: sorted(d["kind"] for d in load_docs(p)) for p in manifest_files()}
    assert kinds["rayjob.yaml"] == ["RayJob"]
    assert kinds["raycluster.yaml"] == ["RayCluster"]
    assert kinds["storage.yaml"] == ["PersistentVolumeClaim"]
    assert kinds["mlflow.yaml"] == ["ConfigMap", "Deployment", "Service"]
    assert kinds["postgres.yaml"] == ["ConfigMap", "Service", "StatefulSet"]
    assert set(kinds["secrets.example.yaml"]) == {"Secret"}


def test_no_python_under_platform():
    # A `platform` package would shadow the stdlib module under `ray job submit --working-dir .`.
    python = [p for p in PLATFORM.rglob("*") if p.suffix in {".py", ".pyc", ".pyi"}]
    assert python == [], f"Python files under platform/: {python}"


def test_ray_version_everywhere_equals_the_pin():
    ray = pins()["ray"]
    for path, doc in all_docs():
        if doc["kind"] not in RAY_KINDS:
            continue
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert cluster["rayVersion"] == ray, f"{path.name}: rayVersion"
        for role, template in ray_pod_templates(doc):
            for container in containers(template):
                tag = container["image"].rsplit(":", 1)[1]
                assert re.search(rf"(^|[^0-9.])ray{re.escape(ray)}($|[^0-9.])", tag), (
                    f"{path.name} {role}: image {container['image']} is not the Ray {ray} image"
                )
    args = dockerfile_args(DOCKER / "Dockerfile")
    assert args["RAY_VERSION"] == ray
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", _dockerfile(), re.MULTILINE)


def test_ray_pods_of_a_cluster_share_one_image():
    # The submitter and workers must speak the head's Ray: one image for all of them.
    for path, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            images = {c["image"] for _, t in ray_pod_templates(doc) for c in containers(t)}
            assert len(images) == 1, f"{path.name}: several images {images}"


def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def test_dockerfile_installs_the_pinned_torch_and_ray_on_python_311():
    expected = pins()
    args = dockerfile_args(DOCKER / "Dockerfile")
    assert args["TORCH_VERSION"] == expected["torch"]
    assert args["TORCHVISION_VERSION"] == expected["torchvision"]
    assert args["PYTHON_TAG"] == "py311"
    text = _dockerfile()
    for requirement in (
        '"torch==${TORCH_VERSION}"',
        '"torchvision==${TORCHVISION_VERSION}"',
        '"ray[default,tune,train]==${RAY_VERSION}"',
    ):
        assert requirement in text
    assert re.search(r"^RUN pip install --no-cache-dir \.", text, re.MULTILINE), "pip install ."
    assert re.search(r"^COPY .*\bsearch_spaces\b", text, re.MULTILINE), "study files copied"


def test_mlflow_image_and_server_match_the_client_pin():
    mlflow = pins()["mlflow"]
    assert dockerfile_args(DOCKER / "mlflow.Dockerfile")["MLFLOW_VERSION"] == mlflow
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in (DOCKER / "mlflow.Dockerfile").read_text()
    (container,) = pod_template(the("Deployment"))["spec"]["containers"]
    assert container["image"].rsplit(":", 1)[1] == mlflow


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    required = {".venv", "mlruns", "mlartifacts", "*.db", "ray_results", ".git", ".devbundle"}
    assert required | {"data"} <= ignored


# --- schemas -------------------------------------------------------------------------------


def test_core_objects_match_the_kubernetes_schema():
    validator = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
    )
    for _, doc in all_docs():
        if doc["kind"] not in RAY_KINDS:
            validator.validate(doc, K8S_VERSION, strict=True)  # raises naming path and field


def _strict_pod_template_validator() -> jsonschema.protocols.Validator:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
    )
    from importlib.resources import files

    from referencing import Registry, Resource

    schemas = files(kubernetes_validate) / "kubernetes-json-schema"
    folder = schemas / f"v{K8S_VERSION}.0-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_ray_pod_templates_match_the_kubernetes_pod_schema():
    validator = _strict_pod_template_validator()
    for path, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            for role, template in ray_pod_templates(doc):
                errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(template)]
                assert errors == [], f"{path.name} {role}: {errors}"


# The fields of KubeRay's ray.io/v1 CRDs (API reference of KubeRay v1.6) that these manifests
# may use, with the CRD's types and enums; additionalProperties: false is what `kubectl apply`
# (strict field validation) does with a misspelt field. Pod templates are checked above.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"]}},
}
_HEAD_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["template"],
    "properties": {
        "template": _TEMPLATE,
        "rayStartParams": _STRINGS,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "serviceType": {"type": "string"},
    },
}
_WORKER_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "template"],
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": _STRINGS,
        "template": _TEMPLATE,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "suspend": {"type": "boolean"},
        "scaleStrategy": {"type": "object"},
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer"},
                "resources": {"type": "object"},
                "version": {"enum": ["v1", "v2"]},
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
                "securityContext": {"type": "object"},
            },
        },
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "headServiceAnnotations": _STRINGS,
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
    },
}
_METADATA = {"type": "object", "required": ["name"]}
KUBERAY_SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": _CLUSTER_SPEC},
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["entrypoint", "rayClusterSpec"],
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "rayClusterSpec": _CLUSTER_SPEC,
                    "submissionMode": {
                        "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                    },
                    "submitterPodTemplate": _TEMPLATE,
                    "submitterConfig": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"backoffLimit": {"type": "integer", "minimum": 0}},
                    },
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "runtimeEnvYAML": {"type": "string"},
                    "jobId": {"type": "string"},
                    "metadata": _STRINGS,
                    "clusterSelector": _STRINGS,
                    "entrypointNumCpus": {"type": "number"},
                    "entrypointNumGpus": {"type": "number"},
                    "entrypointResources": {"type": "string"},
                    "deletionStrategy": {"type": "object"},
                    "managedBy": {"type": "string"},
                    "suspend": {"type": "boolean"},
                },
            },
        },
    },
}


def test_ray_resources_match_the_kuberay_crd_fields():
    for path, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            validator = jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[doc["kind"]])
            errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
            assert errors == [], f"{path.name}: {errors}"
            cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group in cluster["workerGroupSpecs"]:
                # KubeRay's validation: minReplicas <= replicas <= maxReplicas.
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_ray_start_params_are_options_of_the_pinned_ray_start():
    from ray.scripts.scripts import start

    for _, doc in all_docs():
        if doc["kind"] not in RAY_KINDS:
            continue
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            # KubeRay renders each entry as --key=value on `ray start`.
            args = [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
            start.make_context("start", args)  # raises on an unknown option or a bad value


# --- the study on the cluster ---------------------------------------------------------------


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The simple commands of the RayJob's ``bash -c '...'`` entrypoint, in order."""
    outer = shlex.split(entrypoint)
    assert outer[:2] == ["bash", "-c"] and len(outer) == 3, outer
    lexer = shlex.shlex(outer[2], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # URLs stay one word; only operators split them
    commands: list[list[str]] = [[]]
    redirect_target = False
    for token in lexer:
        if redirect_target:
            redirect_target = False
        elif token in SHELL_REDIRECTS:
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()  # the descriptor of `2>&1`
            redirect_target = True
        elif token in SHELL_OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def study_command(doc: dict[str, Any]) -> list[str]:
    (command,) = [c for c in entrypoint_commands(doc["spec"]["entrypoint"]) if "bdm-search" in c]
    assert command[:2] == ["exec", "bdm-search"], command
    return command[2:]


def parse_bdm_search(argv: list[str]) -> dict[str, Any]:
    """``bdm-search ARGV`` parsed by the real CLI, without running it."""
    import typer.main

    from binarydm.cli import app

    group = typer.main.get_command(app)
    assert argv[0] not in group.commands, "the study file must come first (default `run`)"
    return group.get_command(None, "run").make_context("run", list(argv)).params


def image_path_to_repo(path: Path) -> Path:
    workdir = re.findall(r"^WORKDIR\s+(\S+)", _dockerfile(), re.MULTILINE)[-1]
    return REPO / path.relative_to(workdir)


def shared_mount(template: dict[str, Any], claim: str) -> str:
    volumes = [v["name"] for v in template["spec"]["volumes"]
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim]  # fmt: skip
    assert len(volumes) == 1, f"claim {claim} mounted {len(volumes)} times"
    mounts = [m["mountPath"] for c in template["spec"]["containers"]
              for m in c.get("volumeMounts", []) if m["name"] == volumes[0]]  # fmt: skip
    assert len(mounts) == 1
    return mounts[0]


def service_url(name: str, scheme: str) -> str:
    service = [d for _, d in all_docs() if d["kind"] == "Service" and d["metadata"]["name"] == name]
    assert len(service) == 1, f"no Service {name}"
    return f"{scheme}://{name}:{service[0]['spec']['ports'][0]['port']}"


def test_rayjob_entrypoint_is_a_valid_study_with_cluster_locations():
    from binarydm.spec import load_study

    rayjob = the("RayJob")
    params = parse_bdm_search(study_command(rayjob))
    study_file = image_path_to_repo(params["file"])
    assert study_file.is_file(), f"{params['file']} is not a study file of the repository"
    assert params["profile"] == "gpu" and params["address"] == "auto"
    # A retry (backoffLimit) must continue the study, not refuse because results exist.
    assert params["resume"] or rayjob["spec"].get("backoffLimit", 0) == 0
    spec = load_study(study_file, profile=params["profile"], overrides=params["sets"])
    spec = spec.resolve_paths("/job-working-dir")  # where `ray job submit` would run it
    assert spec.tracking.uri == service_url("mlflow", "http")
    optuna = urlparse(spec.storage.optuna)
    assert optuna.scheme.startswith("postgresql") and optuna.password is None
    assert f"postgresql://{optuna.hostname}:{optuna.port}" == service_url("postgres", "postgresql")
    mount = shared_mount(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
                         the("PersistentVolumeClaim")["metadata"]["name"])  # fmt: skip
    for location in (spec.storage.ray_results, spec.settings.data.root):
        assert location.startswith(mount + "/"), f"{location} is not on the shared volume"


def test_rayjob_creates_the_study_experiment_before_the_study():
    from binarydm.spec import load_study

    rayjob = the("RayJob")
    commands = entrypoint_commands(rayjob["spec"]["entrypoint"])
    params = parse_bdm_search(study_command(rayjob))
    spec = load_study(image_path_to_repo(params["file"]), profile=params["profile"],
                      overrides=params["sets"])  # fmt: skip
    experiment = spec.tracking.experiment or spec.name
    get, create = commands[0], commands[1]
    assert get == ["mlflow", "experiments", "get", "--experiment-name", experiment]
    assert create == ["mlflow", "experiments", "create", "--experiment-name", experiment]
    assert "bdm-search" in commands[2]


def test_ray_pods_share_the_read_write_many_volume_and_tracking_settings():
    claim = the("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for path, doc in all_docs():
        if doc["kind"] not in RAY_KINDS:
            continue
        for role, template in ray_pod_templates(doc):
            if role == "submitter":
                continue
            mount = shared_mount(template, claim["metadata"]["name"])
            (ray,) = template["spec"]["containers"]
            env = env_of(ray)
            assert env["BINARYDM_DATA_ROOT"]["value"].startswith(mount + "/"), (path.name, role)
            assert env["BINARYDM_CACHE_DIR"]["value"].startswith(mount + "/"), (path.name, role)
            assert env["MLFLOW_TRACKING_URI"]["value"] == service_url("mlflow", "http")
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "binarydm-mlflow-client"


def test_gpu_workers_request_gpus_and_the_head_runs_no_trials():
    for path, doc in all_docs():
        if doc["kind"] not in RAY_KINDS:
            continue
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", path.name
        assert "nvidia.com/gpu" not in str(head["template"]), f"{path.name}: GPU on the head"
        for group in cluster["workerGroupSpecs"]:
            (ray,) = group["template"]["spec"]["containers"]
            resources = ray["resources"]
            # Extended resources: the limit is what counts, a request must equal it.
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, path.name
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_rayjob_cleans_up_retries_and_submits_through_a_kubernetes_job():
    spec = the("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0 and spec["submitterConfig"]["backoffLimit"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    (container,) = submitter["containers"]
    assert "command" not in container, "KubeRay fills in the `ray job submit` command"


def test_ray_clusters_use_token_authentication():
    for path, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert cluster["authOptions"]["mode"] == "token", path.name
    # The interactive cluster's token is one the user can read to submit jobs.
    assert the("RayCluster")["spec"]["authOptions"]["secretName"] == "binarydm-ray-token"


# --- MLflow and Postgres ----------------------------------------------------------------------


def test_mlflow_server_command_parses_and_proxies_authenticated_artifacts():
    from mlflow.cli import server

    deployment = the("Deployment")
    (container,) = pod_template(deployment)["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    params = server.make_context("server", list(container["args"])).params
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"].startswith("s3://")
    assert params["app_name"] == "basic-auth"
    backend = urlparse(params["backend_store_uri"])
    assert backend.scheme.startswith("postgresql") and backend.password is None
    postgres = service_url("postgres", "postgresql")
    assert f"postgresql://{backend.hostname}:{backend.port}" == postgres
    # Clients send Host: mlflow:5000; MLflow's DNS-rebinding guard must let it through.
    allowed = params["allowed_hosts"].split(",")
    assert service_url("mlflow", "http").removeprefix("http://") in allowed


def test_mlflow_auth_config_holds_no_secret_and_is_where_mlflow_reads_it():
    config_map = the("ConfigMap", K8S / "mlflow.yaml")
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"]["basic_auth.ini"])
    section = ini["mlflow"]
    assert {"default_permission", "database_uri"} <= set(section)
    assert "admin_password" not in section
    assert urlparse(section["database_uri"]).password is None
    template = pod_template(the("Deployment"))
    (container,) = template["spec"]["containers"]
    env = env_of(container)
    name = config_map["metadata"]["name"]
    volumes = template["spec"]["volumes"]
    (volume,) = [v for v in volumes if v.get("configMap", {}).get("name") == name]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/basic_auth.ini"
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name


def test_postgres_init_script_creates_the_roles_and_databases_the_uris_name():
    script = the("ConfigMap", K8S / "postgres.yaml")["data"]["10-binarydm.sh"]
    # bash -n only warns (exit 0) about an unterminated here-document: no output allowed.
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    roles = set(re.findall(r"CREATE ROLE (\w+) LOGIN", script))
    databases = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", script))
    (mlflow,) = pod_template(the("Deployment"))["spec"]["containers"]
    mlflow_args = mlflow["args"]
    backend = next(a.split("=", 1)[1] for a in mlflow_args if a.startswith("--backend-store-uri="))
    auth_ini = the("ConfigMap", K8S / "mlflow.yaml")["data"]["basic_auth.ini"]
    auth = re.search(r"database_uri = (\S+)", auth_ini).group(1)
    params = parse_bdm_search(study_command(the("RayJob")))
    optuna = next(s.split("=", 1)[1] for s in params["sets"] if s.startswith("storage.optuna="))
    for uri in (backend, auth, optuna):
        parsed = urlparse(uri)
        database = parsed.path.lstrip("/")
        assert parsed.username in roles, uri
        assert databases.get(database) == parsed.username, f"{uri}: database or owner missing"


def test_services_select_pods_that_expose_their_target_ports():
    workloads = [d for _, d in all_docs() if d["kind"] in {"Deployment", "StatefulSet"}]
    for _, service in all_docs():
        if service["kind"] != "Service":
            continue
        selector = service["spec"]["selector"]
        matching = [w for w in workloads if selector.items() <= pod_labels(w).items()]
        assert len(matching) == 1, f"Service {service['metadata']['name']} selects {len(matching)}"
        (workload,) = matching
        assert selector.items() <= workload["spec"]["selector"]["matchLabels"].items()
        ports = {p["name"] for c in containers(pod_template(workload)) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]


def test_resource_quantities_are_kubernetes_quantities():
    # The schemas accept any string for a quantity; the API server would reject "lots".
    for path, doc in all_docs():
        for node in walk(doc):
            for field in ("requests", "limits"):
                if isinstance(node.get(field), dict):
                    for name, value in node[field].items():
                        assert QUANTITY.fullmatch(str(value)), f"{path.name}: {name}={value!r}"


# --- secrets ------------------------------------------------------------------------------------


def secret_problems(docs: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Every way ``docs`` (manifests other than the example Secrets) could leak a secret."""
    problems = []
    for path, doc in docs:
        if doc["kind"] == "Secret":
            problems.append(f"{path.name}: a Secret belongs in secrets.example.yaml only")
        text = yaml.safe_dump(doc)
        if URL_WITH_PASSWORD.search(text):
            problems.append(f"{path.name}: a URL with an inline password")
        for node in walk(doc):
            if not (isinstance(node.get("env"), list) and "name" in node):
                continue  # not a container
            for entry in node["env"]:
                if SECRET_ENV_NAME.search(entry["name"]) and (
                    "value" in entry or "secretKeyRef" not in entry.get("valueFrom", {})
                ):
                    problems.append(f"{path.name}: env {entry['name']} is not from a Secret")
    return problems


def example_secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in load_docs(EXAMPLE_SECRETS)}


def test_no_manifest_carries_a_secret_inline():
    assert secret_problems(all_docs(include_examples=False)) == []


def test_secret_checks_catch_a_leaky_manifest():
    leaky = yaml.safe_load(
        """
        kind: Deployment
        spec:
          template:
            spec:
              containers:
                - name: app
                  args: ["--backend-store-uri=postgresql://mlflow:hunter2@postgres/mlflow"]
                  env:
                    - {name: DB_PASSWORD, value: hunter2}
                    - name: API_TOKEN
                      valueFrom: {configMapKeyRef: {name: settings, key: token}}
        """
    )
    secret = {"kind": "Secret", "stringData": {"password": "hunter2"}}
    problems = secret_problems([(Path("leaky.yaml"), leaky), (Path("leaky.yaml"), secret)])
    assert len(problems) == 4, problems


def test_every_secret_reference_resolves_to_an_example_secret_key():
    secrets = example_secrets()
    for path, doc in all_docs(include_examples=False):
        for node in walk(doc):
            reference = node.get("secretKeyRef")
            if isinstance(reference, dict):
                assert reference["key"] in secrets.get(reference["name"], {}), (
                    f"{path.name}: Secret {reference['name']} key {reference['key']} not shown "
                    "in secrets.example.yaml"
                )
        if doc["kind"] in RAY_KINDS:
            cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
            name = cluster["authOptions"].get("secretName")
            assert name is None or "auth_token" in secrets[name], f"{path.name}: {name}"


def test_example_secret_values_are_marked_placeholders():
    for name, data in example_secrets().items():
        for key, value in data.items():
            if key not in NON_SECRET_KEYS:
                assert PLACEHOLDER in value, f"{name}.{key} is not an obvious placeholder"
