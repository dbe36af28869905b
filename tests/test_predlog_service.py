"""The prediction log and `POST /feedback` in the real service (`catdog serve` on loopback, a small bundle of classic
features): ids in every answer, rows with the embedding the model saw, feedback 200/404/415/422 and idempotent, the
page's "Wrong?" button, and a full disk under the log that fails no request."""
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bundles import tiny_bundle
from catdog_nb.bundle import read_bundle_meta
from catdog_nb.predict import Classifier
from catdog_nb.predlog import read_feedback, read_log
from servers import free_port, running

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def bundle(training_photos, tmp_path_factory) -> Path:
    cats = [p for p in training_photos if p.parent.name == "cat"][:12]
    dogs = [p for p in training_photos if p.parent.name == "dog"][:12]
    return tiny_bundle(cats + dogs, tmp_path_factory.mktemp("bundle") / "catdog")


@contextmanager
def serve(bundle: Path, tmp: Path, **env):
    "`catdog serve` on a free loopback port with `bundle` and `env` (CATDOG_* names), until the block ends."
    port = free_port()
    environ = {**os.environ, "CATDOG_MODEL_URI": str(bundle), **env}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=environ, cwd=ROOT,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp / "server.log", timeout=120):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def logged(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logged")
    with serve(bundle, tmp, CATDOG_PREDICTION_LOG=str(tmp / "log")) as client:
        yield client, tmp / "log"


def rows_of(folder: Path, ids: set[str], timeout: float = 15.0):
    "The log's rows of `ids`, once all are written (the writer is a thread of the service)."
    deadline = time.monotonic() + timeout
    while True:
        table = read_log(folder) if any(folder.glob("predictions-*.jsonl")) else None
        if table is not None and ids <= set(table["prediction_id"]):
            return table[table["prediction_id"].isin(ids)].set_index("prediction_id")
        if time.monotonic() > deadline: pytest.fail(f"rows of {ids} not in the log after {timeout} s")
        time.sleep(0.1)


def failures(client: httpx.Client) -> dict[str, float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {s.labels["kind"]: s.value for f in families if f.name == "catdog_prediction_log_failures"
            for s in f.samples if s.name.endswith("_total")}


def test_answers_carry_ids_and_the_log_keeps_their_rows(logged, bundle, training_photos):
    client, folder = logged
    cat, dog = training_photos[0], training_photos[-1]
    one = client.post("/predict", content=cat.read_bytes(), headers={"content-type": "image/jpeg"}).json()
    batch = client.post("/predict/batch", files=[("files", ("a.jpg", dog.read_bytes(), "image/jpeg")),
                                                 ("files", ("b.txt", b"hi", "text/plain"))]).json()
    good, bad = batch["results"]
    assert ID.fullmatch(one["prediction_id"]) and ID.fullmatch(good["prediction_id"]) and bad["prediction_id"] is None
    assert one["prediction_id"] != good["prediction_id"]
    rows = rows_of(folder, {one["prediction_id"], good["prediction_id"]})
    n_features = len(Classifier.load(bundle).extractor.feature_names)
    version = str(read_bundle_meta(bundle)["version"])
    for answer in (one, good):
        row = rows.loc[answer["prediction_id"]]
        assert (row["label"], row["model_version"]) == (answer["label"], version)
        assert row["probability"] == pytest.approx(answer["probability"])
        assert len(row["embedding"]) == row["embedding_len"] == n_features
        assert row["latency_ms"] > 0 and len(row["image_md5"]) == 32
    assert len(read_log(folder)) == 2  # the file that is no image has no row
    assert set(failures(client).values()) == {0.0}


def test_feedback_is_recorded_once_and_refuses_what_it_cannot_record(logged, training_photos):
    client, folder = logged
    answer = client.post("/predict", content=training_photos[1].read_bytes(), headers={"content-type": "image/jpeg"}).json()
    pid, other = answer["prediction_id"], next(c for c in answer["probability"] if c != answer["label"])
    send = lambda body, **kw: client.post("/feedback", json=body, **kw)
    first, again = send({"prediction_id": pid, "label": other}), send({"prediction_id": pid, "label": other})
    assert (first.status_code, first.json()) == (200, {"prediction_id": pid, "label": other, "changed": True})
    assert (again.status_code, again.json()["changed"]) == (200, False)
    assert read_feedback(folder)[pid] == other
    back = send({"prediction_id": pid, "label": answer["label"]})
    assert (back.status_code, back.json()["changed"]) == (200, True) and read_feedback(folder)[pid] == answer["label"]
    refusals = [send({"prediction_id": "0" * 32, "label": "cat"}), send({"prediction_id": pid, "label": "horse"}),
                send({"prediction_id": pid}), send(["cat"]),
                client.post("/feedback", content=b"{", headers={"content-type": "application/json"}),
                client.post("/feedback", content=b"cat", headers={"content-type": "text/plain"})]
    assert [(r.status_code, r.json()["reason"]) for r in refusals] == [
        (404, "unknown_prediction"), (422, "bad_label"), (422, "malformed_feedback"), (422, "malformed_feedback"),
        (422, "malformed_feedback"), (415, "unsupported_media_type")]
    assert all(r.headers["content-type"].startswith("application/problem+json") for r in refusals)
    assert list(read_feedback(folder)) == [pid]  # nothing else written


def test_feedback_without_a_log_is_404(bundle, training_photos, tmp_path):
    with serve(bundle, tmp_path) as client:
        answer = client.post("/predict", content=training_photos[0].read_bytes(), headers={"content-type": "image/jpeg"}).json()
        assert ID.fullmatch(answer["prediction_id"])
        refused = client.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": "dog"})
        assert (refused.status_code, refused.json()["reason"]) == (404, "no_prediction_log")
        assert set(failures(client).values()) == {0.0}  # each kind exported, at 0
    assert not list(tmp_path.rglob("predictions-*.jsonl"))


def test_a_full_disk_under_the_log_fails_no_request(bundle, training_photos, tmp_path):
    "The log (with photos) on a 256 KB tmpfs: it fills within the run; every request still answers 200."
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0: pytest.fail(f"cannot mount a tmpfs (needs root): {mounted.stderr}")
    try:
        with serve(bundle, tmp_path, CATDOG_PREDICTION_LOG=str(disk / "log"), CATDOG_LOG_IMAGES="1") as client:
            photos = training_photos[:40]
            statuses = [client.post("/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).status_code
                        for p in photos for _ in range(2)]
            statuses += [client.post("/predict/batch", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:8]]
                                     ).status_code for _ in range(3)]
            deadline = time.monotonic() + 15
            while not failures(client).get("disk_full") and time.monotonic() < deadline: time.sleep(0.1)
            lost = failures(client)
            assert statuses == [200] * len(statuses)
            assert lost["disk_full"] > 0, lost
            assert client.get("/ready").status_code == 200
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_the_page_says_wrong_in_one_click(logged, training_photos):
    from playwright.sync_api import sync_playwright
    from test_service import VIEWPORT, launch
    client, folder = logged
    before = read_feedback(folder)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(str(client.base_url) + "/")
            page.set_input_files("#file", str(training_photos[-1]))
            page.wait_for_function("!document.getElementById('wrong').hidden", timeout=30_000)
            label, button = page.text_content("#label"), page.text_content("#wrong")
            other = button.rsplit(" ", 1)[-1]
            assert button.startswith("Wrong? It is a ") and other in ("cat", "dog") and other != label
            page.click("#wrong")
            page.wait_for_function("document.getElementById('thanks').textContent.length > 0", timeout=30_000)
            assert page.text_content("#thanks") == "Thanks: noted"
        finally:
            browser.close()
    added = {pid: label for pid, label in read_feedback(folder).items() if pid not in before}
    assert list(added.values()) == [other], added  # one row: the page's answer, with the label the button named
