"""The loop, run end to end on loopback: what the service sees comes back as labelled data, a better model is promoted and
picked up without a restart, and drift is measured on what the service logged.

A real `mlflow server` (sqlite, its own artifacts folder) holds the registry. Version 1 is a deliberately weak bundle
(classic features, 2 photos per class), registered and made `champion` by `sync_registry` on a project folder as `dvc
repro evaluate` leaves it. `catdog serve`, installed as the serving image installs it (`serve_venv`: MLflow's client
alone), runs on `models:/catdog@champion` with the prediction log and its photos on and `CATDOG_RELOAD_S=1`. Twenty
training photos are sent and their true labels posted to `/feedback`; `catdog feedback export` turns them into a
training folder; the bundle retrained on the first 4 photos plus the exported ones is scored on the same unseen photos,
and `sync_registry`'s gate moves `champion` to version 2. The running service answers with it within seconds. Then the
service classifies photos, and darkened copies of them, and the drift measures of `catdog_nb.drift`, against a reference
of unshifted photos logged by the same service, tell the darkened set from the unshifted one.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from bundles import tiny_bundle
from catdog_nb.bundle import CLASSES, read_bundle_meta
from catdog_nb.core import load_params
from catdog_nb.data import decode_image, scan_feedback
from catdog_nb.drift import load_current, measure_drift, reference_from_rows, summary_text
from catdog_nb.metrics import classification_metrics
from catdog_nb.predict import Classifier
from catdog_nb.predlog import LOG_GLOB
from servers import free_port, log_tail, running
from venvs import outside_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = load_params()
MODEL, ALIAS = PARAMS["train"]["registered_model"], PARAMS["evaluate"]["champion_alias"]
SYNC = "from catdog_nb.evaluate import sync_registry; print(sync_registry())"
FIRST, FEEDBACK, DRIFT = 2, 10, 30  # photos per class: version 1's training, the feedback, each drift set
DARKEN = 0.3  # the shift: every pixel at 30 % of its brightness
RELOAD_S = 1
pytestmark = pytest.mark.slow  # an MLflow server, a service and two trainings


def per_class(photos: list[Path], start: int, stop: int) -> list[Path]:
    "Photos `start` to `stop` of each class folder, cats first."
    return [p for label in CLASSES for p in [q for q in photos if q.parent.name == label][start:stop]]


def darkened(photo: Path) -> bytes:
    return cv2.imencode(".jpg", (decode_image(photo.read_bytes()) * DARKEN).astype(np.uint8))[1].tobytes()


def without_tracking_uri() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> str:
    "`mlflow server` on a free loopback port with a sqlite store and an artifacts folder of its own; its URI."
    folder = tmp_path_factory.mktemp("tracking")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", folder / "artifacts", "--host", "127.0.0.1", "--port", port,
           "--workers", "1"]
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/health", log=folder / "mlflow.log", env=without_tracking_uri(),
                 cwd=folder, timeout=180):
        yield f"http://127.0.0.1:{port}"


def publish(project: Path, photos: list[Path], unseen: list[Path], tracking_uri: str) -> tuple[str, dict, str]:
    """What `dvc repro train evaluate` then `make pipeline`'s last step do, small: a bundle trained on `photos` in the
    project's `train.bundle_dir`, its metrics.json on `unseen`, then `sync_registry`; returns the bundle version, its
    test metrics and what `sync_registry` printed."""
    bundle = project / PARAMS["train"]["bundle_dir"]
    shutil.rmtree(bundle, ignore_errors=True)
    version = read_bundle_meta(tiny_bundle(photos, bundle))["version"]
    answers = Classifier.load(bundle).predict_bytes([p.read_bytes() for p in unseen])
    test = classification_metrics([int(p.parent.name == "dog") for p in unseen], [a.probability["dog"] for a in answers])
    metrics = {"test": test, "n_test": len(unseen), "bundle_version": version}
    (project / PARAMS["evaluate"]["metrics_file"]).write_text(json.dumps(metrics))
    env = {**without_tracking_uri(), "CATDOG_ROOT": str(project), "MLFLOW_TRACKING_URI": tracking_uri}
    run = subprocess.run([sys.executable, "-c", SYNC], capture_output=True, text=True, timeout=300, env=env, cwd=project)
    assert run.returncode == 0, run.stderr[-3000:]
    return version, test, run.stdout


def predict(client: httpx.Client, image: bytes) -> dict:
    answer = client.post("/predict", content=image, headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def logged_lines(log_dir: Path, ids: list[str], seconds: float = 30) -> dict[str, str]:
    "prediction id -> its line in the service's log, once the lines of all `ids` are written (off the request path)."
    deadline = time.monotonic() + seconds
    while True:
        lines = {}
        for path in sorted(log_dir.glob(LOG_GLOB)):
            for line in path.read_text().splitlines():
                try: lines[json.loads(line)["prediction_id"]] = line
                except ValueError: pass  # the line the writer is writing right now
        if set(ids) <= lines.keys(): return {i: lines[i] for i in ids}
        missing = len(set(ids) - lines.keys())
        assert time.monotonic() < deadline, f"{missing} of {len(ids)} predictions not logged within {seconds} s"
        time.sleep(0.2)


def test_feedback_retrains_promotes_reloads_and_drift_is_told(tracking_server, serve_venv, training_photos, unseen_photos,
                                                             tmp_path):
    project, log_dir, export = tmp_path / "project", tmp_path / "prediction-log", tmp_path / "feedback"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    first_photos = per_class(training_photos, 0, FIRST)
    v1, first_test, synced = publish(project, first_photos, unseen_photos, tracking_server)
    assert f"models:/{MODEL}@{ALIAS} = version 1" in synced and f"no {ALIAS} yet" in synced, synced

    port, service_tmp = free_port(), tmp_path / "service-tmp"
    service_tmp.mkdir()
    env = {**outside_env(), "CATDOG_ROOT": str(project), "MLFLOW_TRACKING_URI": tracking_server,
           "CATDOG_MODEL_URI": f"models:/{MODEL}@{ALIAS}", "CATDOG_RELOAD_S": str(RELOAD_S),
           "CATDOG_PREDICTION_LOG": str(log_dir), "CATDOG_LOG_IMAGES": "1", "TMPDIR": str(service_tmp)}
    for name in ("MLFLOW_REGISTRY_URI", "PROMETHEUS_MULTIPROC_DIR"): env.pop(name, None)
    serve_log = tmp_path / "serve.log"
    with running([serve_venv / "bin" / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=tmp_path,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=serve_log, timeout=180), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        # users send photos and say what each one shows
        sent = per_class(training_photos, FIRST, FIRST + FEEDBACK)
        answers = [predict(client, p.read_bytes()) for p in sent]
        assert {a["model_version"] for a in answers} == {v1}
        for photo, answer in zip(sent, answers):
            said = client.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": photo.parent.name})
            assert said.status_code == 200, said.text
            assert said.json() == {"prediction_id": answer["prediction_id"], "label": photo.parent.name, "changed": True}
        again = client.post("/feedback", json={"prediction_id": answers[0]["prediction_id"], "label": sent[0].parent.name})
        assert again.status_code == 200 and again.json()["changed"] is False  # idempotent
        rows = {i: json.loads(line) for i, line in logged_lines(log_dir, [a["prediction_id"] for a in answers]).items()}
        assert all(rows[a["prediction_id"]]["label"] == a["label"] and rows[a["prediction_id"]]["model_version"] == v1
                   for a in answers)

        # the labelled photos become a training folder; the bundle retrained with them is gated
        exported = subprocess.run([BIN / "catdog", "feedback", "export", log_dir, export], capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr[-3000:]
        counts = json.loads(exported.stdout.splitlines()[-1])
        assert counts["exported"] == len(sent) and counts["no_photo"] == counts["bad_photo"] == 0, counts
        feedback = scan_feedback(export, export)
        assert [r.error for r in feedback if r.error] == []
        sent_photos = sorted((hashlib.md5(p.read_bytes()).hexdigest(), p.parent.name) for p in sent)
        assert sorted((r.md5, r.label) for r in feedback) == sent_photos
        v2, second_test, synced = publish(project, first_photos + [export / r.path for r in feedback], unseen_photos,
                                          tracking_server)
        promoted_at = time.monotonic()
        print(f"\nversion 1 ({v1}): {first_test}\nversion 2 ({v2}): {second_test}\n{synced.strip()}")
        assert v2 != v1
        assert f"models:/{MODEL}@{ALIAS} = version 2" in synced and f"bundle {v2} is version 2" in synced, synced
        assert " beats " in synced, synced
        assert second_test["accuracy"] > first_test["accuracy"]

        # the running service takes the new champion by itself
        while (serving := client.get("/ready").json()["model_version"]) != v2:
            assert time.monotonic() < promoted_at + 30, f"still {serving} 30 s after the promotion:\n{log_tail(serve_log)}"
            time.sleep(0.2)
        print(f"version 2 serving {time.monotonic() - promoted_at:.1f} s after the promotion")
        assert predict(client, sent[0].read_bytes())["model_version"] == v2
        assert not list(service_tmp.rglob("bundle.json"))  # each version's download deleted once loaded

        # drift: a reference of unshifted photos, then other photos, then the same photos darkened, all through the service
        start = FIRST + FEEDBACK  # photos neither version was trained on
        reference = per_class(training_photos, start, start + DRIFT)
        current = per_class(training_photos, start + DRIFT, start + 2 * DRIFT)
        phases = {"reference": [p.read_bytes() for p in reference], "unshifted": [p.read_bytes() for p in current],
                  "darkened": [darkened(p) for p in current]}
        ids = {phase: [predict(client, image)["prediction_id"] for image in images] for phase, images in phases.items()}
        for phase, lines in ((phase, logged_lines(log_dir, phase_ids)) for phase, phase_ids in ids.items()):
            assert {json.loads(line)["model_version"] for line in lines.values()} == {v2}
            (tmp_path / f"{phase}.jsonl").write_text("".join(line + "\n" for line in lines.values()))
    frames = {phase: load_current(tmp_path / f"{phase}.jsonl") for phase in ids}
    assert {phase: len(frame) for phase, frame in frames.items()} == {phase: len(i) for phase, i in ids.items()}
    baseline = reference_from_rows(frames["reference"], {"photos": "unshifted, through the service"})
    unshifted, shifted = (measure_drift(frames[phase], baseline) for phase in ("unshifted", "darkened"))
    print(summary_text(unshifted.summary), summary_text(shifted.summary), sep="\n")
    assert not unshifted.drifted, unshifted.summary["drifted"]
    assert shifted.drifted and "embedding" in shifted.summary["drifted"]
