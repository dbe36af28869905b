"""The monitoring files against a live system: Debian's Prometheus on loopback scrapes a real `catdog serve`, configured
as k8s/ deploys it, while real photos are sent to it; then every PromQL expression of the Grafana dashboard and of the
alert rules goes through Prometheus's HTTP API (/api/v1/query): each must parse, and the dashboard's must return data.
`make monitoring`, the same two on this machine for a person, is run as make runs it and stopped as Ctrl-C stops it.

Prometheus comes from `make tools`; the model bundle from the `model_bundle` fixture (tests/conftest.py).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from catdog_nb.data import sample_photos
from promql import ALERTS, SERVICE_METRICS, alert_rules, as_promql, dashboard_targets
from servers import free_port, log_tail, running, stop

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval and $__range, as the dashboard would set them over a short time range.
QUERY_INTERVAL = "1m"
PHOTOS_PER_ROUND = 24

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def deployed_settings() -> dict[str, str]:
    "The environment k8s/ gives the container: the ConfigMap's CATDOG_* settings."
    return yaml.safe_load((ROOT / "k8s" / "configmap.yaml").read_text())["data"]


@pytest.fixture(scope="module")
def service(model_bundle, tmp_path_factory):
    "`catdog serve` on a loopback port with the deployed settings, the local bundle and a multi-process metrics dir."
    tmp = tmp_path_factory.mktemp("catdog-service")
    (tmp / "prometheus-multiproc").mkdir()
    env = {**os.environ, **deployed_settings(), "CATDOG_MODEL_URI": str(model_bundle),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prometheus-multiproc")}
    port = free_port()
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=ROOT,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp / "service.log", timeout=180) as proc:
        yield {"url": f"http://127.0.0.1:{port}", "target": f"127.0.0.1:{port}", "process": proc}


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    "Debian's Prometheus with prometheus-local.yml, retargeted at the test's service and scraping every second."
    binary = shutil.which("prometheus")
    if binary is None: pytest.fail("prometheus is missing: run `make tools` (installs Debian's prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "prometheus-local.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_INTERVAL_S}s", evaluation_interval=f"{SCRAPE_INTERVAL_S}s")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [service["target"]]}]
    config["rule_files"] = [str((ROOT / f).resolve()) for f in config["rule_files"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with running([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 ready_url=f"http://127.0.0.1:{port}/-/ready", log=tmp / "prometheus.log", timeout=60):
        yield f"http://127.0.0.1:{port}"


def query(prometheus: str, promql: str) -> httpx.Response:
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)


def value(prometheus: str, promql: str) -> float | None:
    result = query(prometheus, promql).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (result := condition()) is None or result is False:
        if time.monotonic() > deadline: pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    return result


def post_photo(url: str, photo: Path) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60)


@pytest.fixture(scope="module")
def traffic(service, prometheus):
    """Two rounds of concurrent predictions (so batches form and every counter moves between scrapes) plus
    rejected input (4xx); returns the answers once Prometheus has scraped all of it."""
    answers, predicted = [], 0
    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            answers += list(pool.map(lambda p: post_photo(service["url"], p), sample_photos(PHOTOS_PER_ROUND // 2)))
        answers.append(httpx.post(f"{service['url']}/predict", content=b"not an image",
                                  headers={"content-type": "image/jpeg"}, timeout=10))
        answers.append(httpx.post(f"{service['url']}/predict", content=b"hello", headers={"content-type": "text/plain"},
                                  timeout=10))
        predicted += PHOTOS_PER_ROUND
        wait_for(lambda: (value(prometheus, "sum(catdog_predictions_total)") or 0) >= predicted,
                 f"Prometheus to see {predicted} predictions")
    time.sleep(3 * SCRAPE_INTERVAL_S)  # a few more scrapes, so every rate window holds the last round
    return answers


def test_make_monitoring_serves_and_scrapes_until_interrupted(model_bundle, tmp_path):
    """`make monitoring` (its recipe, as make runs it, with this venv; `make tools` has run) on free ports: the service
    answers /ready, Prometheus scrapes it and shows the alert rules on the alerts page the target prints; then Ctrl-C
    (SIGINT to the process group, as a terminal sends it) stops every process it started and removes its temp folder."""
    serve_port, prometheus_port, venv = free_port(), free_port(), BIN.parent
    env = {**os.environ, "CATDOG_MODEL_URI": str(model_bundle), "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "monitoring.log"
    with open(log, "wb") as out:
        # -o: the venv and the system tools are taken as they are, never installed here
        make = subprocess.Popen(["make", "--no-print-directory", "monitoring", f"VENV={venv}",
                                 "-o", f"{venv}/.pipeline", "-o", "tools",
                                 f"SERVE_PORT={serve_port}", f"PROMETHEUS_PORT={prometheus_port}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    try:
        def answer(url: str) -> httpx.Response | None:
            if make.poll() is not None: pytest.fail(f"make monitoring exited with {make.returncode}:\n{log_tail(log)}")
            try: response = httpx.get(url, timeout=5)
            except httpx.TransportError: return None
            return response if response.status_code == 200 else None
        wait_for(lambda: answer(f"http://127.0.0.1:{serve_port}/ready"), "the service's /ready", timeout=180)
        alerts_page = re.search(r"alerts: (http://\S+)", log.read_text()).group(1)
        assert alerts_page.startswith(prometheus + "/")
        page = wait_for(lambda: answer(alerts_page), f"{alerts_page}", timeout=60)
        assert all(rule["alert"] in page.text for rule in alert_rules())
        wait_for(lambda: value(prometheus, 'up{job="catdog"}') == 1.0, "Prometheus to scrape the service", timeout=60)
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=60)
        deadline = time.monotonic() + 30
        while True:  # every process of the group: make, its shell, catdog serve and its workers, prometheus
            try: os.killpg(make.pid, 0)
            except ProcessLookupError: break
            if time.monotonic() > deadline: pytest.fail(f"processes left after Ctrl-C:\n{log_tail(log)}")
            time.sleep(0.25)
    finally:
        try: os.killpg(make.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        make.wait()
    assert "stopped by itself" not in log.read_text(), log_tail(log)
    assert not list(tmp_path.glob("catdog-monitoring.*"))
    for port in (serve_port, prometheus_port):
        with pytest.raises(httpx.ConnectError): httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_traffic_was_answered(traffic):
    statuses = [a.status_code for a in traffic]
    assert statuses.count(200) == 2 * PHOTOS_PER_ROUND
    assert sorted(s for s in statuses if s != 200) == [400, 400, 415, 415]


def test_service_exports_every_metric_the_monitoring_files_use(service, traffic):
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{service['url']}/metrics").text)}
    for name, kind in SERVICE_METRICS.items():
        family = families.get(name.removesuffix("_total") if kind == "counter" else name)
        assert family is not None, f"/metrics has no {name}"
        assert family.type == kind, f"{name} is a {family.type}, not a {kind}"
        assert family.samples, f"{name} has no samples after traffic"


def test_prometheus_scrapes_the_service(prometheus, traffic):
    assert value(prometheus, 'up{job="catdog"}') == 1.0


def test_model_version_on_the_dashboard_is_the_served_one(prometheus, traffic):
    served = {a.json()["model_version"] for a in traffic if a.status_code == 200}
    result = query(prometheus, "max by (version) (catdog_model_info)").json()["data"]["result"]
    assert {r["metric"]["version"] for r in result} == served


def test_every_dashboard_query_returns_data(prometheus, traffic):
    empty, failed = [], []
    for title, target in dashboard_targets():
        promql = as_promql(target["expr"], QUERY_INTERVAL)
        answer = query(prometheus, promql)
        if answer.status_code != 200: failed.append(f"{title}: {promql}: {answer.text}")
        elif not answer.json()["data"]["result"]: empty.append(f"{title}: {promql}")
    assert not failed, "Prometheus refused:\n" + "\n".join(failed)
    assert not empty, "no data:\n" + "\n".join(empty)


def test_every_alert_expression_parses_and_its_rule_evaluates(prometheus, traffic):
    for rule in alert_rules():
        answer = query(prometheus, rule["expr"])
        assert answer.status_code == 200 and answer.json()["status"] == "success", f"{rule['alert']}: {answer.text}"

    def evaluated_rules():
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules.values()) else None

    rules = wait_for(evaluated_rules, "the alert rules to be evaluated")
    assert set(rules) == {r["alert"] for r in alert_rules()}
    assert {name: r["health"] for name, r in rules.items()} == dict.fromkeys(rules, "ok")
    # The service is up and answers no 5xx. (Latency is left out: p95 on a busy 2-core machine is not a fact of the files.)
    assert (rules["CatdogDown"]["state"], rules["CatdogHighErrorRatio"]["state"]) == ("inactive", "inactive")


def test_catdog_down_alert_goes_pending_when_the_service_stops(service, prometheus, traffic):
    "Runs last in this module: it stops the service."
    stop(service["process"])

    def catdog_down_state():
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        states = [a["state"] for a in alerts if a["labels"]["alertname"] == "CatdogDown"]
        return states[0] if states else None

    assert wait_for(catdog_down_state, "CatdogDown to go pending", timeout=30) == "pending"  # `for: 1m` not yet over
    assert value(prometheus, 'up{job="catdog"}') == 0.0
