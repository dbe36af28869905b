"""Stage `features` on a real Dask cluster (`extract.local_dask_cluster`: `dask scheduler` and `dask worker` processes on
loopback): the same tables as the local processes, in the same order, filling the same cache, with images read by
path, by file:// URL and by http:// URL; complete and equal also when a worker is killed mid-run. And `make
dask-cluster`'s command: a cluster on loopback that Ctrl-C stops entirely."""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from catdog_nb.backbone import convert_backbone
from catdog_nb.core import load_params, project_root
from catdog_nb.data import sample_photos
from catdog_nb.extract import extract_features
from catdog_nb.features import FeatureExtractor
from catdog_nb.extract import local_dask_cluster
from servers import free_port

ROOT = project_root()
PER_CLASS = 120          # 240 photos, read three ways
BATCH = 8                # images per task: some 30 tasks, enough to kill a worker in the middle
TASK_PREFIX = "extract-features"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def photo_server():
    "`data/raw` over HTTP on a loopback port: images by URL, which the workers read through fsspec."
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(ROOT / "data" / "raw")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def rows(photo_server, tmp_path_factory) -> list[dict]:
    "Manifest rows: a third by relative path, a third by file:// URL, a third by http:// URL; a duplicate; a corrupt file."
    photos = sample_photos(PER_CLASS)
    if len(photos) < 2 * PER_CLASS: pytest.fail("data/raw is missing: run `make data/raw` (dvc pull)")
    where = [lambda p: p.relative_to(ROOT).as_posix(), lambda p: p.resolve().as_uri(),
             lambda p: f"{photo_server}/{p.parent.name}/{p.name}"]
    out = [{"path": where[i % 3](p), "md5": hashlib.md5(p.read_bytes()).hexdigest()} for i, p in enumerate(photos)]
    corrupt = tmp_path_factory.mktemp("corrupt") / "cat.corrupt.jpg"
    corrupt.write_bytes(photos[0].read_bytes()[:600])
    return out + [dict(out[5], path=photos[5].resolve().as_uri()),
                  {"path": str(corrupt), "md5": hashlib.md5(corrupt.read_bytes()).hexdigest()}]


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> FeatureExtractor:
    "The classic descriptors and the Lite0 embedding, its backbone converted here as stage `backbone` does."
    lite0 = convert_backbone("lite0", tmp_path_factory.mktemp("backbones") / "lite0.onnx")
    return FeatureExtractor.from_params(load_params(), sets=["classic", "lite0"], batch_size=BATCH, backbones={"lite0": lite0})


@pytest.fixture(scope="module")
def local(rows, extractor):
    "The local processes' run: what the cluster must reproduce."
    result = extract_features(rows, extractor, None, workers=2, root=ROOT, progress=False)
    assert result.computed == {"classic": 2 * PER_CLASS, "lite0": 2 * PER_CLASS}
    assert [reason.split(":")[0] for _, reason in result.failed] == ["corrupt"]
    return result


def assert_same_tables(result, local):
    assert list(result.tables) == list(local.tables)
    for s, table in local.tables.items():
        assert list(result.tables[s]["md5"]) == list(table["md5"])  # the same rows in the same order
        np.testing.assert_allclose(result.tables[s].iloc[:, 1:].to_numpy(), table.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-5)
    assert sorted(result.failed) == sorted(local.failed)  # the corrupt file is reported, not fatal


def worker_names(client) -> dict[str, str]:
    return {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}


def tasks_by_worker(client, since: float, names: dict[str, str]) -> dict[str, list[str]]:
    "Worker name -> keys of the extraction tasks it finished since `since`, from the scheduler's task stream."
    out = {}
    for record in client.get_task_stream(start=since):
        if str(record["key"]).startswith(TASK_PREFIX):
            out.setdefault(names.get(record["worker"], record["worker"]), []).append(str(record["key"]))
    return out


def test_two_workers_give_the_local_tables_and_fill_the_cache(tmp_path, rows, extractor, local):
    n_tasks = -(-(2 * PER_CLASS + 1) // BATCH)  # the unique images (the photos and the corrupt file) in tasks of BATCH
    with local_dask_cluster(2, logs=tmp_path) as cluster, Client(cluster.address) as client:
        names, start = worker_names(client), time.time()
        client.get_task_stream(start=start)  # the scheduler records the task stream from now on
        result = extract_features(rows, extractor, tmp_path / "cache", root=ROOT, progress=False, client=client)
        ran = tasks_by_worker(client, start, names)
    assert_same_tables(result, local)
    assert sorted(ran) == ["worker-0", "worker-1"], ran        # the scheduler saw both workers run tasks
    assert sum(map(len, ran.values())) == sum(result.ran_on.values()) == n_tasks  # each task ran once
    assert Counter({w: len(keys) for w, keys in ran.items()}) == Counter(result.ran_on)
    # the cluster filled the same content-hash cache: a local run now computes nothing and gives the same tables
    again = extract_features(rows, extractor, tmp_path / "cache", workers=1, root=ROOT, progress=False)
    assert again.computed == {"classic": 0, "lite0": 0}
    assert_same_tables(again, local)


def test_a_worker_killed_mid_run_loses_nothing(tmp_path, rows, extractor, local):
    with local_dask_cluster(2, logs=tmp_path) as cluster, Client(cluster.address) as client:
        names, start = worker_names(client), time.time()
        victim = next(address for address, name in names.items() if name == "worker-0")
        client.get_task_stream(start=start)
        with ThreadPoolExecutor(1) as background:
            run = background.submit(extract_features, rows, extractor, None, root=ROOT, progress=False, client=client)
            deadline = time.monotonic() + 300
            while True:  # until worker-0 has finished a task and holds others: then SIGKILL it, nanny and all
                assert not run.done(), "the run ended before worker-0 could be killed"
                assert time.monotonic() < deadline, "worker-0 never ran a task"
                held = client.processing(workers=[victim]).get(victim, [])
                if held and tasks_by_worker(client, start, names).get("worker-0"): break
                time.sleep(0.1)
            os.killpg(cluster.processes[1].pid, signal.SIGKILL)
            assert not run.done()
            result = run.result(timeout=300)
        ran = tasks_by_worker(client, start, names)
        left = worker_names(client)
    assert_same_tables(result, local)                          # complete, and equal to the local run
    assert list(left.values()) == ["worker-1"]                 # worker-0 is gone for good
    assert ran.get("worker-0") and ran.get("worker-1")
    # what worker-0 held when it died ran again on worker-1
    assert {str(k) for k in held} & set(ran["worker-1"]), (held, ran)


def test_dask_cluster_command_starts_on_loopback_and_ctrl_c_stops_it(tmp_path):
    port, dashboard_port = free_port(), free_port()
    command = [sys.executable, "-c", "from catdog_nb.extract import dask_cluster_main; dask_cluster_main()",
               "--workers", "1", "--port", str(port), "--dashboard-port", str(dashboard_port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        printed = []
        for line in proc.stdout:  # the driver prints its summary once every worker joined
            printed.append(line)
            if line.startswith("Ctrl-C"): break
        text = "".join(printed)
        assert f"Dask scheduler tcp://127.0.0.1:{port} with 1 worker of 1 thread" in text, text
        assert f"dashboard      http://127.0.0.1:{dashboard_port}/status" in text
        assert f"export DASK_SCHEDULER_ADDRESS=tcp://127.0.0.1:{port}" in text and "dvc repro" in text
        with Client(f"tcp://127.0.0.1:{port}", timeout=30) as client:
            workers = client.scheduler_info()["workers"]
            assert [w["nthreads"] for w in workers.values()] == [1]
            pids = [*client.run(os.getpid).values(), client.run_on_scheduler(os.getpid)]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest = proc.communicate(timeout=90)[0]
        assert proc.returncode == 0 and "stopped the scheduler and the workers" in rest, rest
    finally:
        if proc.poll() is None:  # a failed check: still stop the cluster the way a user does
            proc.send_signal(signal.SIGINT)
            proc.wait(90)
    for pid in pids:
        with pytest.raises(ProcessLookupError): os.kill(pid, 0)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2): pass
