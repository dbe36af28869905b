"""The registry follows the files: the last step of `make pipeline` (`catdog_nb.evaluate.sync_registry`) makes the
bundle in `train.bundle_dir` a registered version with `champion` on it, even where DVC skipped `train` and `evaluate`,
so that `mlflow models predict` and `catdog serve` answer on `models:/catdog@champion` in a fresh store."""
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from catdog_nb.bundle import read_bundle_meta
from catdog_nb.core import load_params
from catdog_nb.metrics import classification_metrics
from catdog_nb.predict import Classifier
from servers import free_port, running

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYNC = "from catdog_nb.evaluate import sync_registry; print(sync_registry())"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, model_bundle, unseen_photos) -> Path:
    "A project folder as `dvc repro evaluate` leaves it: params.yaml, the bundle, its metrics.json; no MLflow store yet."
    root = tmp_path_factory.mktemp("project")
    params = load_params()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(model_bundle, root / params["train"]["bundle_dir"])
    results = Classifier.load(model_bundle).predict_bytes([p.read_bytes() for p in unseen_photos])
    y = [int(p.parent.name == "dog") for p in unseen_photos]
    metrics = {"test": classification_metrics(y, [r.probability["dog"] for r in results]), "n_test": len(y),
               "bundle_version": read_bundle_meta(model_bundle)["version"]}
    (root / params["evaluate"]["metrics_file"]).write_text(json.dumps(metrics))
    return root


def env_of(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store, <root>/mlflow.db
    return {**env, "CATDOG_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def sync(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SYNC], capture_output=True, text=True, timeout=300, env=env_of(root), cwd=root)


def test_sync_registers_the_bundle_then_changes_nothing(project):
    first = sync(project)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "models:/catdog@champion = version 1" in first.stdout and "no champion yet" in first.stdout
    again = sync(project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "models:/catdog@champion = version 1" in again.stdout and "already is the champion" in again.stdout


def test_champion_answers_mlflow_models_predict_and_catdog_serve(project, unseen_photos, tmp_path):
    assert sync(project).returncode == 0
    env, photo = env_of(project), unseen_photos[-1]  # a dog
    request = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo.read_bytes()).decode()]]}}
    (tmp_path / "input.json").write_text(json.dumps(request))
    run = subprocess.run([BIN / "mlflow", "models", "predict", "-m", "models:/catdog@champion", "-i", tmp_path / "input.json",
                          "-t", "json", "-o", tmp_path / "out.json", "--env-manager", "local"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=project)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["predictions"][0]["label"] == "dog"
    port = free_port()
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], ready_url=f"http://127.0.0.1:{port}/ready",
                 log=tmp_path / "serve.log", env={**env, "CATDOG_MODEL_URI": "models:/catdog@champion"}, cwd=project):
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", content=photo.read_bytes(),
                            headers={"content-type": "image/jpeg"}, timeout=60)
    assert answer.status_code == 200 and answer.json()["label"] == "dog"


def test_metrics_of_another_bundle_are_refused(project, tmp_path):
    other = tmp_path / "project"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    metrics = json.loads((other / "metrics.json").read_text()) | {"bundle_version": "0123456789ab"}
    (other / "metrics.json").write_text(json.dumps(metrics))
    run = sync(other)
    assert run.returncode != 0 and "run `dvc repro evaluate`" in run.stderr
    assert not (other / "mlflow.db").exists()  # refused before the store was touched
