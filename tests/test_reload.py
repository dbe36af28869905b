"""A new champion reaches the running service without a restart (`catdog_nb.service`, `ServiceState.reload`).

`catdog serve` on `models:/catdog@champion` of a local MLflow store (sqlite in a temporary folder) holding three
registered versions of small real bundles (classic features, trained on real photos): under load at concurrency 8 the
alias moves from version 1 to 2 and SIGHUP arrives; with `CATDOG_RELOAD_S=1` the periodic look finds the alias moved;
version 3, whose booster was altered in the store after registration, is refused while version 2 serves on."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from bundles import tiny_bundle
from catdog_nb.bundle import read_bundle_meta
from servers import free_port, log_tail, running

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME, ALIAS = "catdog", "champion"
CONCURRENCY = 8
pytestmark = pytest.mark.slow

REGISTER = """
import json, sys
from pathlib import Path
from catdog_nb.bundle import read_bundle_meta
from catdog_nb.tracking import log_train_run, mlflow_setup
root = Path(sys.argv[1])
mlflow_setup("reload", root)
print(json.dumps([log_train_run(folder, read_bundle_meta(folder), "catdog", root=root)[1] for folder in sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory, training_photos) -> dict:
    """A store with versions 1 and 2 (two bundles trained on different photos) and 3 (bundle 1 again, its booster then
    altered in the store): `uri`, `client`, `versions` (registry version -> bundle version)."""
    root = tmp_path_factory.mktemp("registry")
    cats, dogs = training_photos[:100], training_photos[100:]
    first = tiny_bundle(cats[:30] + dogs[:30], root / "bundles" / "first")
    second = tiny_bundle(cats[30:60] + dogs[30:60], root / "bundles" / "second")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store <root>/mlflow.db
    run = subprocess.run([sys.executable, "-c", REGISTER, root, first, second, first], capture_output=True, text=True,
                         timeout=300, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == ["1", "2", "3"]
    import mlflow
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    stored = client.get_logged_model(client.get_model_version(NAME, "3").source.removeprefix("models:/"))
    (booster,) = Path(stored.artifact_location.removeprefix("file://")).rglob("booster.txt")
    with open(booster, "a") as f: f.write("\n")  # the store's copy of version 3 no longer matches its sha256
    versions = {"1": read_bundle_meta(first)["version"], "2": read_bundle_meta(second)["version"]}
    assert versions["1"] != versions["2"]
    return {"uri": uri, "client": client, "versions": versions}


@contextmanager
def serve(registry: dict, log: Path, **settings):
    "(url, process) of `catdog serve` on the champion alias, `CATDOG_<KEY>` = each of `settings`, once /ready answers 200."
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "CATDOG_MODEL_URI": f"models:/{NAME}@{ALIAS}",
           **{f"CATDOG_{k.upper()}": str(v) for k, v in settings.items()}}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=ROOT,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=log, timeout=180) as proc:
        yield f"http://127.0.0.1:{port}", proc


def metric(url: str, name: str, **labels) -> float | None:
    "The value of one sample of the service's /metrics."
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()): return sample.value
    return None


async def under_load(url: str, photo: bytes, until, during=None) -> list[tuple[float, float, object, str | None]]:
    """(start, end, status or error, model_version) of each `/predict` that `CONCURRENCY` clients send one after the
    other until `until(answers)` is true; `during` (a coroutine function) runs beside them."""
    answers = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def one_client():
            while not until(answers):
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", content=photo, headers={"content-type": "image/jpeg"})
                    status, version = r.status_code, r.json().get("model_version")
                except httpx.HTTPError as e:
                    status, version = type(e).__name__, None
                answers.append((start, time.perf_counter(), status, version))
        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)), *([during()] if during else []))
    return answers


@pytest.fixture(scope="module")
def large_photo(photo) -> bytes:
    "A real photo enlarged to 1200 x 1200: its decoding takes long enough that requests hold a model while it runs."
    import cv2
    from catdog_nb.data import decode_image
    return cv2.imencode(".jpg", cv2.resize(decode_image(photo), (1200, 1200)))[1].tobytes()


def for_seconds(seconds: float):
    deadline = time.perf_counter() + seconds
    return lambda answers: time.perf_counter() > deadline


def test_sighup_under_load_swaps_versions_without_a_failed_or_slow_request(registry, large_photo, tmp_path):
    client, v1, v2 = registry["client"], registry["versions"]["1"], registry["versions"]["2"]
    client.set_registered_model_alias(NAME, ALIAS, "1")
    with serve(registry, tmp_path / "serve.log") as (url, proc):
        asyncio.run(under_load(url, large_photo, for_seconds(2)))  # warm: connections, caches
        before = asyncio.run(under_load(url, large_photo, for_seconds(5)))
        signalled = {}

        async def promote_and_signal():
            await asyncio.sleep(1.5)
            await asyncio.to_thread(client.set_registered_model_alias, NAME, ALIAS, "2")
            signalled["at"] = time.perf_counter()
            os.kill(proc.pid, signal.SIGHUP)

        def switched_a_while_ago(answers) -> bool:
            if "at" in signalled and time.perf_counter() > signalled["at"] + 60: return True  # bounded: asserted below
            ends = [end for _, end, _, version in answers if version == v2]
            return bool(ends) and time.perf_counter() > min(ends) + 3

        reload = asyncio.run(under_load(url, large_photo, switched_a_while_ago, promote_and_signal))
        after = asyncio.run(under_load(url, large_photo, for_seconds(5)))
        loaded = metric(url, "catdog_model_reloads_total", result="loaded")
        info = {v: metric(url, "catdog_model_info", version=v) for v in (v1, v2)}
        log = log_tail(tmp_path / "serve.log", 6000)

    baseline = before + after  # the same load without a reload, on either side of it
    p99 = float(np.percentile([end - start for start, end, _, _ in baseline], 99))
    slowest = max(end - start for start, end, _, _ in reload)
    first_v2_end = min((end for _, end, _, version in reload if version == v2), default=None)
    assert first_v2_end is not None, f"no answer from version 2 within 60 s of SIGHUP:\n{log}"
    print(f"\nwithout a reload: {len(baseline)} requests, p99 {p99 * 1000:.0f} ms; with it: {len(reload)} requests, "
          f"slowest {slowest * 1000:.0f} ms; SIGHUP to the first answer of version 2: {first_v2_end - signalled['at']:.2f} s")
    assert [a for a in baseline + reload if a[2] != 200] == [], log
    assert {version for *_, version in reload} == {v1, v2}
    assert all(version == v2 for start, _, _, version in reload if start > first_v2_end)  # new requests get the new model
    assert {version for *_, version in after} == {v2}
    assert slowest <= 2 * p99, (slowest, p99)
    assert loaded == 1 and info == {v1: 0, v2: 1}, (loaded, info, log)


def test_periodic_reload_takes_the_moved_alias_and_refuses_a_damaged_version(registry, photo, tmp_path):
    client, v2 = registry["client"], registry["versions"]["2"]
    client.set_registered_model_alias(NAME, ALIAS, "1")
    with serve(registry, tmp_path / "serve.log", reload_s=1) as (url, proc):

        def wait_for(check, what: str, seconds: float = 30):
            deadline = time.monotonic() + seconds
            while not check():
                assert time.monotonic() < deadline, f"{what} within {seconds} s:\n{log_tail(tmp_path / 'serve.log')}"
                time.sleep(0.2)

        assert httpx.get(f"{url}/ready").json()["model_version"] == registry["versions"]["1"]
        client.set_registered_model_alias(NAME, ALIAS, "2")
        wait_for(lambda: httpx.get(f"{url}/ready").json()["model_version"] == v2, "version 2 serving")
        assert metric(url, "catdog_model_reloads_total", result="unchanged") >= 1  # looks before the alias moved

        refusals = lambda: (tmp_path / "serve.log").read_text().count("does not match its sha256")
        client.set_registered_model_alias(NAME, ALIAS, "3")
        wait_for(lambda: metric(url, "catdog_model_reloads_total", result="failed") >= 3, "version 3 refused")
        assert refusals() == 1  # fetched and refused once; the next looks count it without fetching it again
        os.kill(proc.pid, signal.SIGHUP)  # asks again
        wait_for(lambda: refusals() == 2, "version 3 fetched and refused again on SIGHUP")
        answer = httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
        ready = httpx.get(f"{url}/ready")
    assert answer.status_code == 200 and answer.json()["model_version"] == v2
    assert ready.status_code == 200 and ready.json()["model_version"] == v2


def test_each_of_several_workers_takes_the_moved_alias(registry, tmp_path):
    "Two worker processes, each looking every second: both serve version 2; the metrics, over the live workers, say so."
    client, v1, v2 = registry["client"], registry["versions"]["1"], registry["versions"]["2"]
    client.set_registered_model_alias(NAME, ALIAS, "1")
    with serve(registry, tmp_path / "serve.log", reload_s=1, workers=2) as (url, _):
        client.set_registered_model_alias(NAME, ALIAS, "2")
        # a worker whose first model is still loading answers 503, without a version: it keeps the loop going
        served = lambda: {httpx.get(f"{url}/ready", timeout=10).json().get("model_version") for _ in range(20)}
        deadline = time.monotonic() + 60
        while (versions := served()) != {v2} or metric(url, "catdog_model_info", version=v1) != 0:
            assert time.monotonic() < deadline, f"both workers on version 2 within 60 s:\n{log_tail(tmp_path / 'serve.log')}"
            time.sleep(0.5)
        info = {v: metric(url, "catdog_model_info", version=v) for v in (v1, v2)}
        loaded = metric(url, "catdog_model_reloads_total", result="loaded")
    assert versions == {v2} and info == {v1: 0, v2: 1} and loaded >= 1
