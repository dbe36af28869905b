"""Deployment files checked offline by the real tools: hadolint, kubernetes-validate, promtool, docker-compose,
check-jsonschema, zizmor.

The system tools (promtool, docker-compose) come from Debian: `make tools` installs them; these tests never install anything.
"""
import copy
import json
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths

from dockerfile import DOCKERFILE, stage, stages
from promql import ALERTS, SERIES_NAMES, SERVICE_METRICS, alert_rules, dashboard, dashboard_targets, metric_names

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
# The Kubernetes version the manifests are validated against: one kubernetes-validate ships schemas for.
K8S_VERSION = "1.34.0"
RESEARCH_PACKAGES = ("jupyter", "jupyterlab", "notebook", "ipykernel", "nbdev", "papermill", "dvc", "mlflow", "torch", "jax",
                     "optax")
REGISTRY_CLIENT = "mlflow-skinny"  # MLflow's client alone: the service fetches and reloads models:/ URIs with it


def run(*cmd, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)


def system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None: pytest.fail(f"{name} is missing: run `make tools` (installs Debian's prometheus, docker-compose...)")
    return path


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- Dockerfile ---------------------------------------------------------------------------------------------------

def hadolint(path: Path) -> list[dict]:
    result = run(BIN / "hadolint", "--format", "json", "--failure-threshold", "style", path)
    return json.loads(result.stdout or "[]")


@pytest.mark.slow
def test_dockerfile_passes_hadolint():
    assert hadolint(DOCKERFILE) == []


@pytest.mark.slow
def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    "The same call fails on known mistakes, so a clean report above means the file was really linted."
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    assert {finding["code"] for finding in hadolint(bad)} >= {"DL3007", "DL3013"}


def python_version_tested() -> str:
    return re.search(r"^PYTHON \?= python(\d+\.\d+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_every_stage_uses_the_python_the_project_tests_on():
    "Each stage starts from the same Python image, or from a stage before it."
    version = python_version_tested()
    for i, each in enumerate(stages()):
        assert each.image == f"python:{version}-slim-bookworm" or each.image in {s.name for s in stages()[:i]}, each
    assert f"python:{version}" in (ROOT / ".github" / "workflows" / "ci.yml").read_text()


def test_only_the_serving_set_is_installed():
    builder, runtime = stage("builder"), stage("runtime")
    requirement_files = set(re.findall(r"requirements/[\w.-]+", "\n".join(args for _, args in builder.instructions)))
    assert requirement_files == {"requirements/serve.txt"}
    installs = [args for args in builder.args("RUN") if "pip install" in args]
    assert any("-r requirements/serve.txt" in args for args in installs)
    assert any("--no-deps ." in args for args in installs), "the package must not pull dependencies past the lock"
    assert not [args for args in runtime.args("RUN") + stage(runtime.image).args("RUN") if "pip" in args or "requirements" in args]


def test_serving_set_has_no_research_packages():
    pinned = {line.split("==")[0].strip().lower() for line in (ROOT / "requirements" / "serve.txt").read_text().splitlines()
              if "==" in line and not line.lstrip().startswith("#")}
    assert pinned, "requirements/serve.txt pins nothing"
    assert REGISTRY_CLIENT in pinned
    assert not {name for name in pinned - {REGISTRY_CLIENT} if name.startswith(RESEARCH_PACKAGES)}


def test_runtime_stage_holds_the_venv_and_the_bundle_only():
    builder, runtime = stage("builder"), stage("runtime")
    copies = runtime.copies()
    assert ([f"--from={builder.name}"], ["/opt/venv"], "/opt/venv") in copies
    local_sources = {src.rstrip("/") for flags, sources, _ in copies if not flags for src in sources}
    assert local_sources == {"models/catdog", "params.yaml"}


def test_runtime_stage_runs_catdog_serve_as_a_non_root_user():
    runtime = stage("runtime")
    assert stages()[-1] == runtime  # the last stage: what `docker build -t catdog .` builds
    (user,) = runtime.args("USER")
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "a numeric UID lets Kubernetes verify runAsNonRoot"
    assert json.loads(runtime.args("ENTRYPOINT")[0]) == ["catdog", "serve"]
    assert runtime.args("EXPOSE") == ["8000"]
    cmd = json.loads(runtime.args("CMD")[0])
    assert cmd[cmd.index("--port") + 1] == "8000"
    (healthcheck,) = runtime.args("HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck and "urllib.request" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck  # neither exists in the slim image


def test_image_sets_only_the_settings_its_layout_decides():
    "The project root and the bundle the image copies; the other CATDOG_* settings keep their one default."
    env = runtime_env()
    assert {k for k in env if k.startswith("CATDOG_")} == {"CATDOG_ROOT", "CATDOG_MODEL_URI"}
    (workdir,) = stage("runtime").args("WORKDIR")
    copied = {f"{workdir}/{dest.rstrip('/')}" for flags, _, dest in stage("runtime").copies() if not flags}
    assert env["CATDOG_MODEL_URI"] in copied and env["CATDOG_ROOT"] == workdir


def runtime_env() -> dict[str, str]:
    env = {}
    for args in stage("runtime").args("ENV"):
        env.update(dict(word.split("=", 1) for word in args.split()))
    return env


def test_dockerignore_sends_only_what_the_image_copies(tmp_path):
    "Docker's own .dockerignore matching (docker-py) on a tree shaped like a working copy after `make pipeline`."
    for name in ("data/raw/cat/cat.0.jpg", "data/split.csv", "data/features/lite2.parquet", ".venv/bin/python",
                 "mlruns/0/meta.yaml", "mlflow.db", "mlartifacts/1/model.pkl", "nbs/00_core.ipynb",
                 "reports/01_data.ipynb", ".dvc/cache/files/md5/ab/cdef", ".dvc/config", ".git/HEAD",
                 "models/backbones/lite2.onnx", "models/catdog/MLmodel", "catdog_nb/__init__.py", "catdog_nb/static/index.html",
                 "catdog_nb/__pycache__/core.cpython-311.pyc", "requirements/serve.txt", "requirements/worker.txt", "requirements/dev.txt",
                 "pyproject.toml", "README.md", "LICENSE", "params.yaml", "Dockerfile", "tests/test_deploy.py", "Makefile"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    context = {p for p in exclude_paths(str(tmp_path), patterns, dockerfile="Dockerfile") if (tmp_path / p).is_file()}
    copied = {src.rstrip("/") for each in stages() for flags, sources, _ in each.copies() if not flags for src in sources}
    expected = {"Dockerfile", "catdog_nb/__init__.py", "catdog_nb/static/index.html", "models/catdog/MLmodel"} | (copied - {"catdog_nb", "models/catdog"})
    assert context == expected


def pins(requirements: str) -> dict[str, str]:
    return dict(line.split("==") for line in (ROOT / "requirements" / requirements).read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))


def test_worker_image_holds_the_worker_set_and_the_package():
    "Target `worker`: the builder's venv (serving set + package) plus requirements/worker.txt, copied onto the shared base."
    worker_builder, worker = stage("worker-builder"), stage("worker")
    assert worker_builder.image == "builder" and worker.image == stage("runtime").image
    installs = [args for args in worker_builder.args("RUN") if "pip install" in args]
    assert len(installs) == 1 and "-r requirements/worker.txt" in installs[0]
    assert worker.copies() == [(["--from=worker-builder"], ["/opt/venv"], "/opt/venv")]  # no bundle, no params.yaml
    assert not [args for args in worker.args("RUN") if "pip" in args]


def test_worker_set_is_the_clients_without_research_packages():
    "Dask wants the same versions on the client, the scheduler and the workers: pipeline.txt is compiled under worker.txt."
    worker, pipeline = pins("worker.txt"), pins("pipeline.txt")
    assert {"dask", "distributed", "lightgbm", "onnxruntime", "pandas", "pyarrow", "scikit-learn", "fsspec", "bokeh"} <= set(worker)
    assert pins("serve.txt").items() <= worker.items() <= pipeline.items()
    assert not {name for name in worker if name.lower().startswith(RESEARCH_PACKAGES) and name != REGISTRY_CLIENT}


def test_worker_image_runs_dask_worker_as_a_non_root_user():
    worker = stage("worker")
    (user,) = worker.args("USER")
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user) and user == stage("runtime").args("USER")[0]
    assert json.loads(worker.args("ENTRYPOINT")[0]) == ["dask", "worker"]
    cmd = json.loads(worker.args("CMD")[0])
    assert cmd[cmd.index("--nworkers") + 1] == "1" and "--no-dashboard" in cmd


# --- Kubernetes ---------------------------------------------------------------------------------------------------

DASK = K8S / "dask"  # the Dask cluster of the pipeline: a kustomization of its own


def manifests(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


MANIFESTS, DASK_MANIFESTS = manifests(K8S), manifests(DASK)


@pytest.mark.slow
@pytest.mark.parametrize("folder", [K8S, DASK], ids=["k8s", "k8s/dask"])
def test_kubernetes_manifests_validate(folder):
    "Every manifest against the offline JSON schemas of Kubernetes K8S_VERSION, unknown fields rejected (--strict)."
    result = run(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", K8S_VERSION, *(folder / name for name in manifests(folder)))
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    for name in manifests(folder):
        assert re.search(rf"^INFO \S*{folder.relative_to(ROOT).as_posix()}/{re.escape(name)} passed ", report, re.M), report


@pytest.mark.slow
def test_kubernetes_validate_rejects_a_mistyped_field(tmp_path):
    "Strict mode is on: a misspelt field (replica) fails, so the passes above mean something."
    deployment = load_yaml(K8S / "deployment.yaml")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    result = run(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", K8S_VERSION, tmp_path / "bad.yaml")
    assert result.returncode != 0 and "replica" in result.stdout + result.stderr


def test_kustomization_lists_every_manifest():
    assert sorted(load_yaml(K8S / "kustomization.yaml")["resources"]) == MANIFESTS


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return {p.stem: load_yaml(p) for p in K8S.glob("*.yaml")}


def container(k8s) -> dict:
    (c,) = k8s["deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_deployment_probes_and_replicas(k8s):
    c = container(k8s)
    assert k8s["deployment"]["spec"]["replicas"] == 2
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    (port,) = c["ports"]
    assert port["containerPort"] == 8000 and c["args"][c["args"].index("--port") + 1] == "8000"
    assert all(c[probe]["httpGet"]["port"] == port["name"] for probe in ("livenessProbe", "readinessProbe", "startupProbe"))


def assert_locked_down(pod: dict, c: dict, image: str) -> dict[str, str]:
    """Non-root as the user of the Dockerfile stage `image`, the runtime's seccomp profile, no service-account token (the
    pods never talk to the Kubernetes API), no privilege, a read-only root, resources set; returns the mounts, all emptyDirs."""
    image_uid = int(stage(image).args("USER")[0].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == image_uid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v and v["emptyDir"].get("sizeLimit")}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= empty_dirs
    return mounts


def test_deployment_runs_locked_down(k8s):
    c = container(k8s)
    mounts = assert_locked_down(k8s["deployment"]["spec"]["template"]["spec"], c, "runtime")
    # The only writable places are emptyDirs: /tmp and the prometheus-client multi-process directory.
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert set(mounts) == {"/tmp", env["PROMETHEUS_MULTIPROC_DIR"]}


def mebibytes(quantity: str) -> float:
    "A Kubernetes memory quantity (`640Mi`, `1Gi`, `1500M`) in MiB."
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity).groups()
    scale = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20, None: 1 / 2**20}
    return float(number) * scale[unit]


@pytest.fixture
def deployed_bundle(request) -> Path:
    "The bundle the image carries (params.yaml train.bundle_dir); before `make pipeline`, one of the same served sets (`model_bundle`)."
    bundle = ROOT / load_yaml(ROOT / "params.yaml")["train"]["bundle_dir"]
    return bundle if (bundle / "bundle.json").is_file() else request.getfixturevalue("model_bundle")


def test_memory_limit_covers_the_worst_case_of_one_worker(k8s, deployed_bundle):
    """The limit is the service's own worst-case formula at the settings the pod runs with (one worker per pod), for the
    bundle it serves: its measured peak (reports/bench/serve/<sets>.json of its version) or the estimate from its files."""
    from catdog_nb.service import Settings, memory_ceiling_mib, model_base_mib
    settings = Settings.from_env(k8s["configmap"]["data"])
    assert settings.workers == 1
    base, source = model_base_mib(deployed_bundle)
    ceiling, limit = memory_ceiling_mib(settings, base), mebibytes(container(k8s)["resources"]["limits"]["memory"])
    assert ceiling <= limit <= 1.25 * ceiling, (ceiling, limit, base, source)
    assert mebibytes(container(k8s)["resources"]["requests"]["memory"]) < limit


def test_network_policy_admits_the_service_port_only_and_lets_nothing_out(k8s):
    policy, pod = k8s["networkpolicy"]["spec"], k8s["deployment"]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": container(k8s)["ports"][0]["name"], "protocol": "TCP"}]
    assert policy["egress"] == []  # the service fetches nothing: no egress at all, DNS included


def test_deployment_is_scraped_and_configured(k8s):
    pod = k8s["deployment"]["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container(k8s)["ports"][0]["containerPort"]
    assert container(k8s)["envFrom"] == [{"configMapRef": {"name": k8s["configmap"]["metadata"]["name"]}}]


def test_configmap_holds_valid_catdog_settings_only(k8s):
    "Each key is a field of the service's Settings and each value parses there (the defaults live in Settings only)."
    from catdog_nb.service import Settings
    settings = k8s["configmap"]["data"]
    assert settings and all(isinstance(value, str) for value in settings.values())
    assert set(settings) <= {f"CATDOG_{name.upper()}" for name in Settings.__dataclass_fields__}
    Settings.from_env(settings)


def test_service_hpa_and_pdb_point_at_the_deployment(k8s):
    deployment = k8s["deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert k8s["service"]["spec"]["selector"].items() <= pod_labels.items()
    assert k8s["service"]["spec"]["ports"][0]["targetPort"] == container(k8s)["ports"][0]["name"]
    target = k8s["hpa"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert k8s["hpa"]["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert [m["resource"]["name"] for m in k8s["hpa"]["spec"]["metrics"]] == ["cpu"]
    assert k8s["pdb"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert k8s["pdb"]["spec"]["minAvailable"] < deployment["spec"]["replicas"]


# --- Kubernetes: the Dask cluster (k8s/dask/) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_k8s() -> dict[str, dict]:
    return {p.stem: load_yaml(p) for p in DASK.glob("*.yaml")}


def pod_and_container(deployment: dict) -> tuple[dict, dict]:
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return pod, c


def test_dask_kustomization_lists_every_manifest_and_the_worker_image(dask_k8s):
    kustomization = dask_k8s["kustomization"]
    assert sorted(kustomization["resources"]) == DASK_MANIFESTS
    images = {pod_and_container(dask_k8s[name])[1]["image"] for name in ("scheduler-deployment", "worker-deployment")}
    assert images == {"catdog-worker"} and [i["name"] for i in kustomization["images"]] == ["catdog-worker"]


def test_dask_pods_run_locked_down(dask_k8s):
    scheduler = assert_locked_down(*pod_and_container(dask_k8s["scheduler-deployment"]), "worker")
    worker = assert_locked_down(*pod_and_container(dask_k8s["worker-deployment"]), "worker")
    assert set(scheduler) == {"/tmp"} and set(worker) == {"/tmp", "/scratch"}  # /scratch: Dask's local directory


def test_dask_scheduler_service_reaches_the_scheduler(dask_k8s):
    deployment, service = dask_k8s["scheduler-deployment"], dask_k8s["scheduler-service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    _, c = pod_and_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert {p["port"]: p["targetPort"] for p in service["spec"]["ports"]} == {8786: "tcp-comm", 8787: "http-dashboard"}
    assert c["command"] == ["dask", "scheduler"]
    assert c["args"][c["args"].index("--port") + 1] == "8786" and c["args"][c["args"].index("--dashboard-address") + 1] == ":8787"
    assert all(c[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"} for probe in ("startupProbe", "livenessProbe", "readinessProbe"))


def test_dask_workers_find_the_scheduler_and_spill_to_their_emptydir(dask_k8s):
    deployment, service = dask_k8s["worker-deployment"], dask_k8s["scheduler-service"]
    pod, c = pod_and_container(deployment)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{service['metadata']['name']}:8786"
    assert "command" not in c  # the image's entrypoint, `dask worker`
    args, image_cmd = c["args"], json.loads(stage("worker").args("CMD")[0])
    assert args[:len(image_cmd)] == image_cmd  # the image's own arguments, then the cluster's
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert args[args.index("--local-directory") + 1] in mounts  # spilled data and lock files on an emptyDir
    (http,) = c["ports"]
    assert args[args.index("--dashboard-address") + 1] == f":{http['containerPort']}"
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": http["name"]}
    # requests equal to limits: Dask sizes its threads and memory limit from the container's limits
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


# --- Prometheus -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prometheus_config_is_valid():
    result = run(system_tool("promtool"), "check", "config", "prometheus-local.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_prometheus_config_scrapes_the_local_service_with_the_alert_rules():
    config = load_yaml(ROOT / "prometheus-local.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "catdog" and job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]
    assert [(ROOT / f).resolve() for f in config["rule_files"]] == [ALERTS.resolve()]


@pytest.mark.slow
def test_alert_rules_are_valid():
    result = run(system_tool("promtool"), "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {rule["alert"] for rule in alert_rules()} == {"CatdogDown", "CatdogHighErrorRatio", "CatdogHighLatencyP95", "CatdogShedding",
                                                        "CatdogLowAnimalShare", "CatdogConfidenceShift"}


@pytest.mark.slow
def test_alert_rules_fire_on_synthetic_series():
    "promtool's rule unit tests (deployment/monitoring/alerts-test.yml): each alert fires when it should and only then."
    result = run(system_tool("promtool"), "test", "rules", ALERTS.parent / "alerts-test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana and PromQL ---------------------------------------------------------------------------------------------

def test_service_metrics_are_the_ones_the_service_registers():
    from catdog_nb.monitoring import ServiceMetrics
    registered = {family.name + ("_total" if family.type == "counter" else ""): family.type
                  for family in ServiceMetrics().registry.collect()}
    assert registered == SERVICE_METRICS


def test_metric_names_reads_selectors_only():
    assert metric_names('sum by (le) (rate(a_bucket{route=~"/p(x)", q="}"}[5m] offset 1h)) / on(instance) group_left b'
                        ' > 1e3 and vector(0) or label_replace(c, "d", "$1", "e", "(.*)")') == {"a_bucket", "b", "c"}
    assert metric_names("histogram_quantile(0.95, sum without (pod) (rate(x:y_bucket[1m])))") == {"x:y_bucket"}


def test_dashboard_panels_query_prometheus():
    board = dashboard()
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"] and board["uid"] and board["schemaVersion"] >= 36
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${%s}" % variable["name"]}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {p["datasource"]["uid"] for p in board["panels"]} == {datasource["uid"]}
    targets = dashboard_targets()
    assert targets
    for title, target in targets:
        assert target.get("expr", "").strip(), f"panel {title!r} has a target without expr"
        assert target["datasource"] == datasource and target["refId"]


def test_dashboard_shows_latency_errors_predictions_confidence_and_model():
    panels = dashboard()["panels"]
    joined = "\n".join(t["expr"] for _, t in dashboard_targets())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(catdog_request_duration_seconds_bucket" in joined
    assert 'status=~"5.."' in joined and "sum by (label) (rate(catdog_predictions_total" in joined
    assert any(p["type"] == "heatmap" and "catdog_prediction_confidence_bucket" in p["targets"][0]["expr"] for p in panels)
    assert any(p["type"] == "stat" and "catdog_model_info" in p["targets"][0]["expr"] for p in panels)
    used = set().union(*(metric_names(t["expr"]) for _, t in dashboard_targets()))
    for name, kind in SERVICE_METRICS.items():
        assert {name, name + "_bucket"} & used, f"no panel shows {name}"


@pytest.mark.parametrize("source,expr", [*((f"panel {title!r}", t["expr"]) for title, t in dashboard_targets()),
                                         *((f"alert {r['alert']}", r["expr"]) for r in alert_rules())])
def test_promql_uses_only_the_service_metrics(source, expr):
    names = metric_names(expr)
    assert names, f"{source} selects no metric"
    assert names <= SERIES_NAMES, f"{source} uses unknown metrics {names - SERIES_NAMES}"


# --- compose.yaml ---------------------------------------------------------------------------------------------------

COMPOSE = ROOT / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    "compose.yaml as `docker-compose config` (Debian's, `make tools`) resolves and validates it: no Docker daemon needed."
    result = run(system_tool("docker-compose"), "-f", COMPOSE, "config")
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)["services"]


def published(port) -> tuple[str, int, int]:
    "(host address, host port, container port) of a port in the short syntax (docker-compose 1) or the long one (2)."
    if isinstance(port, dict): return port.get("host_ip", ""), int(port["published"]), int(port["target"])
    *host, host_port, container_port = str(port).split("/")[0].split(":")  # 127.0.0.1:8000:8000/tcp
    return (host[0] if host else ""), int(host_port), int(container_port)


def binds(service: dict) -> dict[str, tuple[Path, bool]]:
    "Container path -> (host path, read-only) of a service's bind mounts, in the short or the long syntax."
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict): out[v["target"]] = (Path(v["source"]), bool(v.get("read_only")))
        else: source, target, *mode = v.split(":"); out[target] = (Path(source), mode == ["ro"])
    return out


def as_mounted(service: dict, root: Path) -> Path:
    "The service's bind mounts copied under `root` where the container sees them (/etc/x -> root/etc/x)."
    for target, (source, _) in binds(service).items():
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
    return root


@pytest.mark.slow
def test_compose_runs_the_service_as_the_ci_smoke_test_does(compose):
    assert set(compose) == {"catdog", "prometheus", "grafana"}
    catdog = compose["catdog"]
    assert Path(catdog["build"]["context"]) == ROOT and catdog["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert catdog["build"]["target"] == stages()[-1].name == "runtime"
    assert catdog["read_only"] is True and catdog["tmpfs"] == ["/tmp"]
    assert [published(p) for p in catdog["ports"]] == [("127.0.0.1", 8000, 8000)]  # the port of the image's CMD


@pytest.mark.slow
def test_compose_publishes_every_port_on_loopback_and_mounts_files_of_the_repository_read_only(compose):
    assert [published(p)[0] for s in compose.values() for p in s["ports"]] == ["127.0.0.1"] * 3
    mounts = [m for s in compose.values() for m in binds(s).values()]
    assert len(mounts) == 4
    for source, read_only in mounts:
        assert source.exists() and source.is_relative_to(ROOT) and read_only, source


@pytest.mark.slow
def test_compose_images_are_the_official_ones_pinned_by_version_and_digest(compose):
    digest = r"@sha256:[0-9a-f]{64}"
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+" + digest, compose["prometheus"]["image"])
    grafana = re.fullmatch(r"grafana/grafana:(\d+)\.(\d+)\.(\d+)" + digest, compose["grafana"]["image"])
    assert grafana
    (required,) = [r["version"] for r in dashboard()["__requires"] if r["id"] == "grafana"]
    assert tuple(map(int, grafana.groups())) >= tuple(map(int, required.split(".")))


@pytest.mark.slow
def test_compose_prometheus_config_scrapes_the_service_with_the_alert_rules(compose, tmp_path):
    "promtool checks the config where the container reads it (the image's default --config.file), rules included."
    prometheus = compose["prometheus"]
    assert "command" not in prometheus and "entrypoint" not in prometheus  # the image's: /etc/prometheus/prometheus.yml
    config_file = as_mounted(prometheus, tmp_path) / "etc" / "prometheus" / "prometheus.yml"
    result = run(system_tool("promtool"), "check", "config", config_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr
    config = load_yaml(config_file)
    assert [(config_file.parent / f).read_text() for f in config["rule_files"]] == [ALERTS.read_text()]
    (job,) = config["scrape_configs"]
    (catdog_port,) = [published(p)[2] for p in compose["catdog"]["ports"]]
    assert job["job_name"] == "catdog" and job["static_configs"] == [{"targets": [f"catdog:{catdog_port}"]}]


@pytest.mark.slow
def test_compose_grafana_provisions_the_prometheus_data_source_and_the_dashboard(compose, tmp_path):
    """The data source is the compose Prometheus and the default one, which the dashboard's DS_PROMETHEUS variable (type
    datasource) takes: provisioned, `${DS_PROMETHEUS}` resolves without the import prompt `__inputs` asks for."""
    grafana = compose["grafana"]
    etc = as_mounted(grafana, tmp_path) / "etc" / "grafana"
    (sources,) = [load_yaml(f)["datasources"] for f in (etc / "provisioning" / "datasources").glob("*.yml")]
    (source,) = sources
    (prometheus_port,) = [published(p)[2] for p in compose["prometheus"]["ports"]]
    assert (source["type"], source["url"], source["isDefault"]) == ("prometheus", f"http://prometheus:{prometheus_port}", True)
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (variable["type"], variable["query"]) == ("datasource", source["type"])
    (providers,) = [load_yaml(f)["providers"] for f in (etc / "provisioning" / "dashboards").glob("*.yml")]
    (provider,) = providers
    folder = tmp_path / provider["options"]["path"].lstrip("/")
    assert provider["type"] == "file" and [json.loads(f.read_text()) for f in folder.glob("*.json")] == [dashboard()]
    home = tmp_path / grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].lstrip("/")
    assert home.parent == folder and home.is_file()


@pytest.mark.slow
def test_docker_compose_rejects_a_mistyped_option(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("read_only: true", "read_olny: true"))
    result = run(system_tool("docker-compose"), "-f", bad, "config")
    assert result.returncode != 0 and "read_olny" in result.stdout + result.stderr


# --- GitHub Actions -------------------------------------------------------------------------------------------------

WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW = WORKFLOWS / "ci.yml"
# `uses: owner/name@<commit SHA> # <release tag>`: the SHA runs, the tag says which release it is.
PINNED_USES = re.compile(r"^\s*(?:- )?uses: ([\w-]+/[\w-]+)@([0-9a-f]{40}) # (v\d+\.\d+\.\d+)$")


def zizmor(*inputs) -> list[dict]:
    "zizmor's findings in the default persona, of every severity and confidence; offline, so no GitHub API audits."
    result = run(BIN / "zizmor", "--offline", "--no-exit-codes", "--format", "json", *inputs)
    assert result.returncode == 0, result.stderr  # with --no-exit-codes, anything else is the tool failing
    return json.loads(result.stdout)


def describe(finding: dict) -> str:
    where = finding["locations"][0]
    path = where["symbolic"]["key"]["Local"]["verbatim_path"]
    line = where["concrete"]["location"]["start_point"]["row"] + 1
    severity, feature = finding["determinations"]["severity"], where["concrete"]["feature"].splitlines()[0]
    return f"{path}:{line} {finding['ident']} ({severity}): {finding['desc']}: {feature}"


@pytest.mark.slow
@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_workflow_matches_the_github_schema(schema):
    result = run(BIN / "check-jsonschema", "--builtin-schema", schema, WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_tests_then_builds_and_smoke_tests_the_image():
    jobs = load_yaml(WORKFLOW)["jobs"]
    test_steps = " ".join(step.get("run", "") for step in jobs["test"]["steps"])
    assert "make test" in test_steps and "hadolint" in test_steps and "kubernetes" in test_steps
    assert jobs["image"]["needs"] == "test"
    image_steps = " ".join(step.get("run", "") for step in jobs["image"]["steps"])
    assert "docker build" in image_steps
    assert "http://127.0.0.1:8000/health" in image_steps and "http://127.0.0.1:8000/predict" in image_steps
    assert "--target worker" in image_steps and "DASK_SCHEDULER_ADDRESS=" in image_steps  # the Dask image joins a scheduler


def test_workflows_pin_each_action_to_one_release_commit():
    pins: dict[str, set] = {}
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for line in path.read_text().splitlines():
            if not re.match(r"\s*(- )?uses:", line): continue
            match = PINNED_USES.match(line)
            assert match, f"{path.name}: {line.strip()} is not pinned to a commit with its tag beside it"
            pins.setdefault(match[1], set()).add(match.group(2, 3))
    assert "actions/checkout" in pins, pins
    assert all(len(commits) == 1 for commits in pins.values()), pins  # one action, one release in every workflow


def test_workflow_jobs_read_the_repository_only_and_keep_no_token_in_the_checkout():
    workflow = load_yaml(WORKFLOW)
    assert workflow["permissions"] == {}  # a job gets only what it names
    for name, job in workflow["jobs"].items():
        assert job["permissions"] == {"contents": "read"}, name
        checkouts = [step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout@")]
        assert checkouts and all(step["with"]["persist-credentials"] is False for step in checkouts), name


@pytest.mark.slow
def test_zizmor_finds_nothing_in_the_workflows():
    findings = zizmor(WORKFLOWS)
    assert not findings, "\n".join(describe(finding) for finding in findings)


@pytest.mark.slow
def test_zizmor_reports_an_unpinned_checkout_and_a_template_injection(tmp_path):
    workflow = tmp_path / "bad.yml"
    workflow.write_text("""\
name: bad
on: pull_request
permissions: {}
jobs:
  greet:
    runs-on: ubuntu-latest
    permissions:
      contents: read
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}"
""")
    rules = {finding["ident"] for finding in zizmor(workflow)}
    assert {"unpinned-uses", "artipacked", "template-injection"} <= rules, rules


# --- API keys (k8s/api-keys, a kustomize component) ----------------------------------------------------------------

def with_patch(deployment: dict, patch: dict) -> dict:
    "`deployment` with a strategic-merge `patch` of its pod spec applied as kustomize does (containers by name, lists appended)."
    merged, spec = copy.deepcopy(deployment), patch["spec"]["template"]["spec"]
    pod = merged["spec"]["template"]["spec"]
    for extra in spec.get("containers", []):
        (container,) = [c for c in pod["containers"] if c["name"] == extra["name"]]
        for field, items in extra.items():
            if field != "name": container.setdefault(field, []).extend(items)
    pod.setdefault("volumes", []).extend(spec.get("volumes", []))
    return merged


@pytest.mark.slow
def test_the_api_keys_component_mounts_the_secret_where_the_service_reads_it(tmp_path):
    component = load_yaml(K8S / "api-keys" / "kustomization.yaml")
    assert component["kind"] == "Component"
    (secret,) = component["secretGenerator"]
    patch = load_yaml(K8S / "api-keys" / component["patches"][0]["path"])
    deployment = with_patch(load_yaml(K8S / "deployment.yaml"), patch)
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    keys_file = {e["name"]: e.get("value") for e in c["env"]}["CATDOG_API_KEYS_FILE"]
    (mount,) = [m for m in c["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["name"] and mount["readOnly"]
    assert keys_file == f"{mount['mountPath']}/{secret['files'][0]}"
    assert secret["options"]["disableNameSuffixHash"]  # one name: an updated Secret reaches the running pods
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    result = run(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", K8S_VERSION, tmp_path / "deployment.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "k8s/api-keys/keys.jsonl" in (ROOT / ".gitignore").read_text()


# --- The registry (k8s/registry, a kustomize component) -------------------------------------------------------------

@pytest.mark.slow
def test_the_registry_component_serves_the_champion_and_lets_out_only_the_tracking_server(deployed_bundle, tmp_path):
    from catdog_nb.bundle import bundle_files, read_bundle_meta
    from catdog_nb.service import Settings
    component = load_yaml(K8S / "registry" / "kustomization.yaml")
    assert component["kind"] == "Component"
    patches = {(patch := load_yaml(K8S / "registry" / p["path"]))["kind"]: patch for p in component["patches"]}
    deployment = with_patch(load_yaml(K8S / "deployment.yaml"), patches["Deployment"])
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    settings = Settings.from_env(load_yaml(K8S / "configmap.yaml")["data"] | env)
    params = load_yaml(ROOT / "params.yaml")
    assert settings.model_uri == f"models:/{params['train']['registered_model']}@{params['evaluate']['champion_alias']}"
    assert settings.reload_s > 0
    # each version is downloaded to /tmp and deleted once loaded: one version must fit its emptyDir
    meta = read_bundle_meta(deployed_bundle)
    bundle_mib = sum((deployed_bundle / name).stat().st_size for name in bundle_files(meta)) / 2**20
    (tmp,) = [v for v in pod["volumes"] if v["name"] == {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/tmp"]]
    assert bundle_mib < mebibytes(tmp["emptyDir"]["sizeLimit"])
    # out: the tracking server's namespace and port, and the cluster's DNS; every rule names where it goes
    policy = copy.deepcopy(load_yaml(K8S / "networkpolicy.yaml"))
    policy["spec"]["egress"] = patches["NetworkPolicy"]["spec"]["egress"]  # a list without a merge key: replaced
    tracking = urllib.parse.urlsplit(env["MLFLOW_TRACKING_URI"])
    to_server, to_dns = policy["spec"]["egress"]
    assert to_server == {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": tracking.hostname.split(".")[1]}}}],
                         "ports": [{"port": tracking.port, "protocol": "TCP"}]}
    assert {p["port"] for p in to_dns["ports"]} == {53} and to_dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    for name, manifest in (("deployment", deployment), ("networkpolicy", policy)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
    result = run(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", K8S_VERSION, *tmp_path.glob("*.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
