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


def test_both_engines_agree(float_bundle, unseen_photos):
    "onnxruntime and cv2.dnn on a fixed sample of real photos: the same embedding to 1e-4, the same predictions."
    from catdog_nb.data import read_image
    from catdog_nb.engine import ENGINES
    from catdog_nb.predict import Classifier, Prediction
    images = [read_image(p) for p in unseen_photos]
    classifiers = {engine: Classifier.load(float_bundle, engine=engine) for engine in ENGINES}
    features = {engine: clf.features(images) for engine, clf in classifiers.items()}
    assert np.abs(features["onnxruntime"] - features["opencv"]).max() < 1e-4
    probabilities = {engine: clf.predict_features(features[engine]) for engine, clf in classifiers.items()}
    assert (probabilities["onnxruntime"].argmax(1) == probabilities["opencv"].argmax(1)).all()
    assert np.abs(probabilities["onnxruntime"] - probabilities["opencv"]).max() < 1e-3
    # as a user picks one: `--engine`, else $CATDOG_ENGINE (an unknown one is refused), else onnxruntime
    def labels(*args, **env):
        run = subprocess.run([BIN / "catdog", "predict", *unseen_photos[:4], "--model", float_bundle, *args],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        return run.returncode, [json.loads(line)["label"] for line in run.stdout.splitlines()], run.stderr
    default, chosen = labels(), labels("--engine", "opencv", CATDOG_ENGINE="tensorrt")
    assert default[0] == chosen[0] == 0 and default[1] == chosen[1] == [Prediction.from_row(["cat", "dog"], p).label
                                                                        for p in probabilities["onnxruntime"][:4]]
    status, _, errors = labels(CATDOG_ENGINE="tensorrt")
    assert status == 2 and "unknown engine 'tensorrt'" in errors


def test_int8_sets_are_refused_under_cv2_dnn(model_bundle, float_bundle, unseen_photos):
    "A bundle with an -int8 set under `cv2.dnn`, which cannot run it: a typed error from the API, exit 2 from the CLI."
    from catdog_nb.backbone import float_set
    from catdog_nb.bundle import read_bundle
    from catdog_nb.features import FeatureSettingsError
    from catdog_nb.predict import Classifier
    if model_bundle == float_bundle: pytest.skip("the served sets (train.feature_sets) hold no -int8 set")
    quantized = [s for s in read_bundle(model_bundle)[0]["feature_sets"] if float_set(s) != s]
    with pytest.raises(FeatureSettingsError, match=f"{quantized[0]} is quantized to INT8, which only the onnxruntime engine runs"):
        Classifier.load(model_bundle, engine="opencv")
    run = subprocess.run([BIN / "catdog", "predict", unseen_photos[0], "--model", model_bundle, "--engine", "opencv"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "only the onnxruntime engine runs" in run.stderr, run.stderr[-3000:]
