"""The worker set is enough for a Dask worker: a fresh venv gets requirements/worker.txt and the package, installed from the
files the Dockerfile's builder and worker-builder stages copy, as the `worker` image does; that venv's own `dask scheduler`
and `dask worker` then run the extraction and training tasks of a client in the pipeline's venv."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from catdog_nb.bundle import CLASSES
from catdog_nb.core import load_params
from catdog_nb.data import decode_image, sample_photos
from catdog_nb.features import FeatureExtractor, feature_settings
from catdog_nb.metrics import classification_metrics
from catdog_nb.bundle import predict_proba
from catdog_nb.train import train_booster
from servers import free_port, running
from venvs import build_venv, installed, outside_env, pinned, run_in

# What the client keeps to itself: notebooks, DVC, MLflow's tracking store (sqlalchemy; the serving set brings the
# client, mlflow-skinny), the backbone converter, the fine-tuning (jax, optax).
CLIENT_ONLY = ["jupyter", "jupyterlab", "notebook", "ipykernel", "nbdev", "papermill", "dvc", "sqlalchemy", "onnx", "torch",
               "jax", "optax", "matplotlib"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory) -> Path:
    return build_venv(tmp_path_factory.mktemp("worker-install"), ["builder", "worker-builder"], "worker.txt")


@pytest.fixture(scope="module")
def worker_cluster(worker_venv, tmp_path_factory):
    "The worker venv's `dask scheduler` and one `dask worker` on loopback; yields the scheduler's address."
    tmp = tmp_path_factory.mktemp("worker-cluster")
    port, dashboard = free_port(), free_port()
    address, bin_ = f"tcp://127.0.0.1:{port}", worker_venv / "bin"
    with running([bin_ / "dask", "scheduler", "--host", "127.0.0.1", "--port", port, "--dashboard-address", f"127.0.0.1:{dashboard}"],
                 ready_url=f"http://127.0.0.1:{dashboard}/health", log=tmp / "scheduler.log", env=outside_env(), cwd=tmp):
        # as the image runs it: `dask worker` with the image's arguments (CMD), the scheduler from DASK_SCHEDULER_ADDRESS
        http = free_port()
        with running([bin_ / "dask", "worker", "--nworkers", "1", "--no-dashboard", "--dashboard-address", f"127.0.0.1:{http}",
                      "--host", "127.0.0.1", "--nthreads", "1"],
                     ready_url=f"http://127.0.0.1:{http}/health", log=tmp / "worker.log", cwd=tmp,
                     env=outside_env() | {"DASK_SCHEDULER_ADDRESS": address}):
            yield address


def test_venv_holds_exactly_the_worker_set(worker_venv):
    assert installed(worker_venv) == pinned("worker.txt") | {"catdog-nb"}
    assert pinned("serve.txt") <= pinned("worker.txt") <= pinned("pipeline.txt")
    found = run_in(worker_venv, worker_venv / "bin" / "python", "-c",
                   f"import importlib.util as u; print([p for p in {CLIENT_ONLY!r} if u.find_spec(p)])")
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


def test_worker_runs_extraction_and_training_tasks(worker_cluster):
    with Client(worker_cluster, timeout=60) as client:
        client.get_versions(check=True)  # the same versions on both sides: worker.txt pins pipeline.txt (make lock)
        (worker_python,) = {v["host"]["python"] for v in client.get_versions()["workers"].values()}
        where = client.run(lambda: importlib.util.find_spec("catdog_nb").origin)
        assert all("worker-install" in origin for origin in where.values())  # the worker venv's package, not this tree's
        assert worker_python.startswith("3.11")

        def classic_features(data: bytes, settings: dict) -> np.ndarray:  # sent by value; its imports run on the worker
            from catdog_nb.data import decode_image
            from catdog_nb.features import FeatureExtractor
            return FeatureExtractor(["classic"], settings).transform([decode_image(data)])

        settings = feature_settings(load_params(), ["classic"])
        photos = sample_photos(30)
        X = np.concatenate(client.gather([client.submit(classic_features, p.read_bytes(), settings, pure=False) for p in photos]))
        here = FeatureExtractor(["classic"], settings).transform([decode_image(p.read_bytes()) for p in photos])
        np.testing.assert_allclose(X, here, rtol=1e-5, atol=1e-6)

        y = np.array([CLASSES.index(p.parent.name) for p in photos])
        cfg = {**load_params()["train"], "num_boost_round": 40, "early_stopping_rounds": 20, "min_data_in_leaf": 2,
               "learning_rate": 0.3, "feature_fraction": 1.0, "bagging_fraction": 1.0, "bagging_freq": 0}
        booster, history = train_booster(X, y, X, y, cfg, 0, client=client)
    assert 0 < booster.best_iteration <= 40 and len(history["val"]) >= booster.best_iteration
    assert classification_metrics(y, predict_proba(booster, X))["accuracy"] == 1.0  # it fits what it saw
