"""A team's MLflow setup on this machine: live PostgreSQL and a live `mlflow server`, started by the very command of
`make tracking-server` (`catdog_nb.tracking.tracking_server_main`) in its own process group.

With MLFLOW_TRACKING_URI pointing at it, the train and evaluate stages' own functions log a run of `model_bundle`,
register `catdog` and move `champion`; the rows are read back from PostgreSQL and the files from the server's
artifacts folder; `catdog serve` loads models:/catdog@champion from the server and answers as the local bundle does;
then a Ctrl-C stops both servers, leaving no process and no data behind.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import mlflow
import numpy as np
import psutil
import psycopg2
import pytest

from catdog_nb.bundle import BUNDLE_FILE, bundle_files, file_sha256, read_bundle_meta
from catdog_nb.core import load_params
from catdog_nb.evaluate import apply_champion_gate
from catdog_nb.metrics import classification_metrics
from catdog_nb.predict import Classifier
from catdog_nb.tracking import RUN_ID_MARK, find_model_version, log_executed_notebook, log_train_run, mlflow_setup
from servers import free_port, log_tail, running, stop

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = load_params()
MODEL, EXPERIMENT = PARAMS["train"]["registered_model"], PARAMS["train"]["experiment"]
METRIC, ALIAS = PARAMS["evaluate"]["gate_metric"], PARAMS["evaluate"]["champion_alias"]
COMMAND = "from catdog_nb.tracking import tracking_server_main; tracking_server_main()"  # the Makefile's
START_TIMEOUT = 300  # initdb, then mlflow server imports MLflow twice and creates its tables: 2 min measured at load 8 on 2 cores
pytestmark = pytest.mark.slow  # PostgreSQL and `mlflow server` processes


def printed(proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> dict:
    "What the command printed once both servers answered: the tracking URI, the database URI, the artifacts folder."
    deadline = time.monotonic() + timeout
    while "export MLFLOW_TRACKING_URI=" not in (text := log.read_text(errors="replace")):
        if proc.poll() is not None: pytest.fail(f"make tracking-server exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline: pytest.fail(f"make tracking-server did not start within {timeout} s:\n{log_tail(log)}")
        time.sleep(0.5)
    field = lambda pattern: re.search(rf"^  {pattern}(\S+)$", text, re.M)[1]
    return {"uri": field("export MLFLOW_TRACKING_URI="), "database": field("database +"), "artifacts": Path(field("artifacts +"))}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    "`make tracking-server` on a free port, MLFLOW_TRACKING_URI pointing at it; yields what it printed, its process and its log."
    log = tmp_path_factory.mktemp("tracking") / "tracking-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", COMMAND, "--port", str(free_port())], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # a terminal's Ctrl-C reaches this group only
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    servers = []
    try:
        server = printed(proc, log)
        servers = psutil.Process(proc.pid).children(recursive=True)
        os.environ["MLFLOW_TRACKING_URI"] = server["uri"]
        yield {**server, "process": proc, "log": log}
    finally:
        stop(proc)  # SIGTERM: the command stops both servers, as on Ctrl-C
        for p in psutil.wait_procs(servers, timeout=30)[1]: p.kill()  # only if the command could not
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"]); mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():  # mlflow_setup exported both; never leave this server to later tests
            if value is None: os.environ.pop(name, None)
            else: os.environ[name] = value


def measured(bundle: Path, photos: list[Path]) -> dict:
    "Real metrics of `bundle` on labelled `photos`, through the Classifier that the service uses."
    clf = Classifier.load(bundle)
    p = clf.predict_images([clf.decode(p.read_bytes()) for p in photos])[:, 1]
    return classification_metrics(np.array([int(p.parent.name == "dog") for p in photos]), p)


@pytest.fixture(scope="module")
def registered(team_server, model_bundle, unseen_photos, tmp_path_factory):
    "Stage train's logging and registration of `model_bundle`, then stage evaluate's test metrics and champion gate, on the server."
    meta = read_bundle_meta(model_bundle)
    assert mlflow_setup(EXPERIMENT) == team_server["uri"]
    run_id, version = log_train_run(model_bundle, meta, MODEL, params={"seed": PARAMS["seed"]})
    notebook = tmp_path_factory.mktemp("reports") / "12_train.ipynb"  # what the stage's second command attaches
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [{"text": f"{RUN_ID_MARK}{run_id}\n"}]}]}))
    assert log_executed_notebook(notebook, EXPERIMENT) == [run_id]

    client = mlflow.MlflowClient()
    found = find_model_version(client, MODEL, meta["version"])
    test_metrics = measured(model_bundle, unseen_photos)
    with mlflow.start_run(run_id=found.tags["run_id"]): mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items()})
    decision = apply_champion_gate(client, MODEL, found.version, test_metrics, METRIC, ALIAS)
    return {"meta": meta, "run_id": run_id, "version": version, "test_metrics": test_metrics, "decision": decision}


def test_the_stages_log_register_and_promote_on_the_server(team_server, registered):
    client, meta = mlflow.MlflowClient(), registered["meta"]
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == team_server["uri"]
    assert registered["version"] == "1"  # a fresh registry: its first version of catdog
    assert registered["decision"]["promoted"] and registered["decision"]["reason"] == f"no {ALIAS} yet"
    champion = client.get_model_version_by_alias(MODEL, ALIAS)
    assert str(champion.version) == "1" and champion.tags["bundle_version"] == meta["version"]
    run = client.get_run(registered["run_id"])
    assert run.info.run_name == f"train-{'+'.join(meta['feature_sets'])}-{meta['version']}"
    assert run.data.metrics[f"test_{METRIC}"] == pytest.approx(registered["test_metrics"][METRIC])
    # the server decided where the artifacts go: its proxy, not a path on this machine
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:/")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notebooks")] == ["notebooks/12_train.ipynb"]


def test_runs_and_registry_are_rows_in_postgresql(team_server, registered):
    with closing(psycopg2.connect(team_server["database"])) as db, db.cursor() as cursor:
        cursor.execute("SELECT e.name, r.status FROM runs r JOIN experiments e USING (experiment_id) WHERE r.run_uuid = %s",
                       (registered["run_id"],))
        assert cursor.fetchall() == [(EXPERIMENT, "FINISHED")]
        cursor.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = %s", (registered["run_id"], f"test_{METRIC}"))
        assert cursor.fetchone()[0] == pytest.approx(registered["test_metrics"][METRIC])
        cursor.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,))
        assert cursor.fetchall() == [(ALIAS, 1)]
        cursor.execute("SELECT value FROM model_version_tags WHERE name = %s AND version = 1 AND key = 'bundle_version'", (MODEL,))
        assert cursor.fetchall() == [(registered["meta"]["version"],)]


def test_artifacts_are_files_in_the_servers_folder(team_server, registered):
    "The registered model's copy of the bundle, byte for byte, and the executed notebook, under --artifacts-destination."
    meta, artifacts = registered["meta"], team_server["artifacts"]
    copies = [p.parent for p in artifacts.rglob(BUNDLE_FILE) if (p.parent / meta["booster"]).is_file()]
    assert len(copies) == 1, copies
    assert {name: file_sha256(copies[0] / name) for name in bundle_files(meta)} == meta["sha256"]
    assert [p.name for p in artifacts.rglob("*.ipynb")] == ["12_train.ipynb"]


def test_service_serves_the_champion_from_the_server(team_server, registered, model_bundle, unseen_photos, tmp_path):
    port = free_port()
    env = {**os.environ, "CATDOG_MODEL_URI": f"models:/{MODEL}@{ALIAS}", "MLFLOW_TRACKING_URI": team_server["uri"]}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    photos = [unseen_photos[0], unseen_photos[-1]]  # a cat and a dog it was not trained on
    server_log = team_server["artifacts"].parent / "mlflow.log"
    lookups = lambda: server_log.read_text().count(f"/registered-models/alias?name={MODEL}&alias={ALIAS} ")
    before = lookups()
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=tmp_path,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp_path / "serve.log", timeout=180):
        answers = [httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")},
                              timeout=60) for p in photos]
    assert lookups() > before  # the service asked the server which version is the champion
    expected = Classifier.load(model_bundle).predict_bytes([p.read_bytes() for p in photos])
    for answer, prediction in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == registered["meta"]["version"]
        assert body["label"] == prediction.label
        assert body["probability"] == pytest.approx(prediction.probability, abs=1e-9)


def test_ctrl_c_stops_both_servers_and_leaves_nothing_behind(team_server):
    "Run last: it stops the server. A terminal's Ctrl-C is SIGINT to the command's process group."
    proc = team_server["process"]
    family = psutil.Process(proc.pid).children(recursive=True)
    assert {"postgres", "mlflow"} <= {word for p in family for word in re.findall(r"postgres|mlflow", " ".join(p.cmdline()))}
    os.killpg(proc.pid, signal.SIGINT)
    # bounded by the command's own stop: up to 30 s of grace for mlflow, then 30 s for PostgreSQL, then cleanup
    try: status = proc.wait(120)
    except subprocess.TimeoutExpired: pytest.fail(f"still running 120 s after Ctrl-C:\n{log_tail(team_server['log'])}")
    assert status == 0, log_tail(team_server["log"])
    assert psutil.wait_procs(family, timeout=10)[1] == []  # none left, postgres's own children included
    socket_dir = Path(team_server["database"].split("host=")[1])
    assert not socket_dir.exists() and not team_server["artifacts"].exists()
    assert "stopped" in team_server["log"].read_text()
