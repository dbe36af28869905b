"""`catdog predict` as a user runs it: a subprocess on a folder of good and bad files, one JSON line per file."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # `catdog predict` in subprocesses


def catdog_predict(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "catdog", "predict", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_predict_folder_of_mixed_files(model_bundle, training_photos, unseen_photos, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = [training_photos[0], training_photos[-1], *unseen_photos[:2], *unseen_photos[-2:]]
    for p in good[:4]: shutil.copy(p, folder / p.name)
    for p in good[4:]: shutil.copy(p, folder / "sub" / p.name)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "sub" / "half.jpg").write_bytes(training_photos[1].read_bytes()[:3000])
    missing = tmp_path / "missing.jpg"

    run = catdog_predict(folder, missing, "--model", model_bundle, "--batch-size", "3")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    by_name = {Path(line["path"]).name: line for line in lines}
    assert len(lines) == 10 and len(by_name) == 10
    files = sorted(p for p in folder.rglob("*") if p.is_file())  # folders are walked in sorted order
    assert [line["path"] for line in lines] == [str(p) for p in files] + [str(missing)]
    for p in good:
        line = by_name[p.name]
        assert "error" not in line and set(line["probability"]) == {"cat", "dog"}
        assert 0 <= line["animal"] <= 1  # the served backbone's P(cat or dog at all)
        assert line["label"] == max(line["probability"], key=line["probability"].get)
    assert by_name[training_photos[0].name]["label"] == "cat" and by_name[training_photos[-1].name]["label"] == "dog"
    assert by_name["notes.txt"]["error"].startswith("unsupported_format:")
    assert by_name["empty.jpg"]["error"].startswith("empty:")
    assert by_name["half.jpg"]["error"].startswith("corrupt:")
    assert by_name["missing.jpg"]["error"].startswith("unreadable:")
    assert "10/10" in run.stderr and "%|" in run.stderr  # the progress bar, on stderr


def test_predict_exit_status(model_bundle, training_photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    run = catdog_predict(bad, "--model", model_bundle)
    assert run.returncode == 1 and json.loads(run.stdout)["error"].startswith("unsupported_format:")
    run = catdog_predict(training_photos[0], "--model", tmp_path / "no-model")
    assert run.returncode == 2 and "cannot load model" in run.stderr and run.stdout == ""
    run = catdog_predict(training_photos[0], "--model", model_bundle)
    assert run.returncode == 0 and json.loads(run.stdout)["label"] == "cat" and "%|" not in run.stderr


def test_predict_from_the_registry(model_bundle, training_photos, tmp_path):
    "A `models:/catdog@champion` URI: the bundle registered in MLflow (a store of its own) is fetched and used."
    import os
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    register = (  # in a process of its own: MLflow's tracking URI is global state
        "import sys, mlflow\n"
        "from catdog_nb.pyfunc import log_bundle_model\n"
        "mlflow.set_experiment('catdog-test')\n"
        "with mlflow.start_run(): info = log_bundle_model(sys.argv[1], 'catdog')\n"
        "mlflow.MlflowClient().set_registered_model_alias('catdog', 'champion', info.registered_model_version)\n"
        "print(info.registered_model_version)\n")
    run = subprocess.run([sys.executable, "-c", register, str(model_bundle)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    version = run.stdout.split()[-1]
    assert version == "1"
    for uri in ["models:/catdog@champion"]:
        run = subprocess.run([BIN / "catdog", "predict", training_photos[-1], "--model", uri], capture_output=True,
                             text=True, timeout=300, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout)["label"] == "dog"
    run = subprocess.run([BIN / "catdog", "predict", training_photos[-1], "--model", "models:/catdog@nobody"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 2 and "cannot load model" in run.stderr


def test_cli_agrees_with_the_classifier(model_bundle, unseen_photos):
    "`catdog predict` on real photos gives the labels `Classifier` gives in-process on the same photos."
    from catdog_nb.data import read_image
    from catdog_nb.predict import Classifier, Prediction
    clf = Classifier.load(model_bundle)
    probabilities = clf.predict_features(clf.features([read_image(p) for p in unseen_photos[:4]]))
    run = subprocess.run([BIN / "catdog", "predict", *unseen_photos[:4], "--model", model_bundle],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["label"] for line in lines] == [Prediction.from_row(clf.classes, p).label for p in probabilities]
    assert np.abs(np.array([line["probability"]["dog"] for line in lines]) - probabilities[:, 1]).max() < 1e-4
