"""The MLflow side of training on a real store: the champion gate, and the registered pyfunc model in a fresh process.

Everything is built here from a few dozen real photos of data/raw (classic features: no pipeline output needed), in a
SQLite MLflow store under a temporary folder.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from bundles import tiny_bundle
from catdog_nb.bundle import read_bundle_meta
from catdog_nb.core import load_params
from catdog_nb.data import sample_photos
from catdog_nb.evaluate import apply_champion_gate
from catdog_nb.metrics import classification_metrics
from catdog_nb.predict import Classifier
from catdog_nb.tracking import RUN_ID_MARK, log_executed_notebook, log_train_run, mlflow_setup

MODEL = "catdog"
GATE = {"metric": "log_loss", "alias": "champion"}  # the stage passes evaluate.gate_metric and evaluate.champion_alias
pytestmark = pytest.mark.slow  # MLflow stores, a model trained on real photos, a fresh process


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    "An empty embedded MLflow store (SQLite + artifact folder) in a temporary root; yields its tracking URI."
    root = tmp_path_factory.mktemp("mlflow")
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # never write test runs to a configured server
    try:
        uri = mlflow_setup("catdog-test", root=root)  # creates the experiment with its artifacts under root
        assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
        assert mlflow.get_experiment_by_name("catdog-test").artifact_location == (root / "mlartifacts" / "catdog-test").resolve().as_uri()
        os.environ["MLFLOW_TRACKING_URI"] = uri       # so that every later mlflow_setup (and subprocess) uses it
        yield uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        if saved is not None: os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def training_photos():
    return sample_photos(16)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, training_photos):
    "A fitted bundle and a weak one (a single boosting round) on the same 32 photos."
    folder = tmp_path_factory.mktemp("bundles")
    return {"fitted": tiny_bundle(training_photos, folder / "fitted", load_params()),
            "weak": tiny_bundle(training_photos, folder / "weak", load_params(), rounds=1)}


def champion(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


def register(bundle: Path) -> str:
    "Log `bundle` in a training run and register it, as the train stage does; returns the version."
    return log_train_run(bundle, read_bundle_meta(bundle), MODEL)[1]


def measured(bundle: Path, labelled: list[Path]) -> dict:
    "Real metrics of `bundle` on `labelled` photos, through the same Classifier the service uses."
    clf = Classifier.load(bundle)
    p = clf.predict_images([clf.decode(p.read_bytes()) for p in labelled])[:, 1]
    return classification_metrics(np.array([int(p.parent.name == "dog") for p in labelled]), p)


def test_champion_gate_keeps_the_alias_on_a_worse_model(store, bundles, training_photos):
    client = mlflow.MlflowClient()
    fitted, weak = measured(bundles["fitted"], training_photos), measured(bundles["weak"], training_photos)
    assert fitted["log_loss"] < weak["log_loss"]  # the premise: the weak model really is worse

    v_weak = register(bundles["weak"])
    first = apply_champion_gate(client, MODEL, v_weak, weak, **GATE)
    assert first["promoted"] and champion(client) == v_weak

    v_fitted = register(bundles["fitted"])
    better = apply_champion_gate(client, MODEL, v_fitted, fitted, **GATE)
    assert better["promoted"] and better["previous_champion"] == v_weak
    assert champion(client) == v_fitted

    v_worse = register(bundles["weak"])
    worse = apply_champion_gate(client, MODEL, v_worse, weak, **GATE)
    assert not worse["promoted"] and "does not beat" in worse["reason"]
    assert champion(client) == v_fitted
    # the decision is recorded on the losing version too
    tags = client.get_model_version(MODEL, v_worse).tags
    assert tags["champion_decision"] == "kept" and float(tags["test_log_loss"]) == weak["log_loss"]

    again = apply_champion_gate(client, MODEL, v_fitted, fitted, **GATE)  # re-evaluating the champion changes nothing
    assert not again["promoted"] and champion(client) == v_fitted


def test_registered_pyfunc_predicts_image_bytes_in_a_fresh_process(store, bundles, tmp_path):
    version = register(bundles["fitted"])
    unseen = sample_photos(2, skip=100)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps([str(p) for p in unseen]))
    code = f"""
import json, sys
from pathlib import Path
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{MODEL}/{version}")
images = [Path(p).read_bytes() for p in json.loads(Path({str(inputs)!r}).read_text())] + [b"definitely not a photo"]
print(model.predict(pd.DataFrame({{"image": images}})).to_json(orient="records"))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 5
    # the same answers as the Classifier on the bundle folder, in this process
    expected = Classifier.load(bundles["fitted"]).predict_bytes([p.read_bytes() for p in unseen])
    for row, prediction in zip(rows, expected):
        assert row["label"] == prediction.label and row["error"] == ""
        assert row["probability_dog"] == pytest.approx(prediction.probability["dog"], abs=1e-9)
        assert row["probability_cat"] + row["probability_dog"] == pytest.approx(1)
    assert rows[-1]["label"] is None and rows[-1]["error"].startswith("unsupported_format")


def test_executed_notebook_is_attached_to_the_run_it_printed(store, tmp_path):
    with mlflow.start_run() as run: pass
    notebook = tmp_path / "12_train.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [{"text": f"{RUN_ID_MARK}{run.info.run_id}\n"}]}]}))
    assert log_executed_notebook(notebook) == [run.info.run_id]
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "notebooks")] == ["notebooks/12_train.ipynb"]
