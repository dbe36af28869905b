"""Stage `train` with `train.engine: dask` on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
loopback (`extract.local_dask_cluster`), and feature tables extracted here from 600 real photos by the project's FeatureExtractor
(the Lite0 embedding: seconds to extract, a model in the high nineties).

How close to the local engine: the issue asks for 0.2 points of val accuracy on the pipeline's 1,800 val photos, about
four photos. Here val holds 120 photos, where one photo is 0.83 points, so the bound is counted in photos: the
cluster's model may get at most three val photos more or fewer right than the local one. The models differ as models
trained on other bins and bags do: each worker bins a share of the features and bags on its own rows, and which
worker does what changes from run to run (lightgbm.dask numbers the workers in no fixed order).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dask.utils import key_split
from distributed import Client

from catdog_nb.backbone import backbone_paths, convert_backbone
from catdog_nb.bundle import model_text, predict_proba
from catdog_nb.core import load_params
from catdog_nb.data import assign_splits, read_image, sample_photos, scan_dataset, write_manifest
from catdog_nb.features import FeatureExtractor, feature_settings
from catdog_nb.metrics import classification_metrics
from catdog_nb.predict import Classifier
from catdog_nb.train import ClusterError, engine_client, load_dataset, scatter_rows, split_xy, train_booster
from catdog_nb.extract import local_dask_cluster

ROOT = Path(__file__).resolve().parents[1]
FEATURE_SET = "lite0"
PER_CLASS = 300  # 600 photos: 360 train, 120 val, 120 test
WORST_GAP_PHOTOS = 3  # see the module's docstring
# LightGBM settings for 360 training photos: at the pipeline's (chosen on 8,400), val log loss still improves at
# round 3,000; these stop after about a hundred rounds, in a few blocks. Both engines train with them.
SMALL_SAMPLE = {"learning_rate": 0.3, "lambda_l2": 1.0, "early_stopping_rounds": 25}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root with what stage `train` reads: params.yaml (train.engine: dask, the Lite0 set, SMALL_SAMPLE), a split manifest
    of 600 photos (the project's scan and split), their Lite0 table as stage `features` writes it, the backbone."""
    root = tmp_path_factory.mktemp("project")
    params = load_params()
    params["train"] |= {"engine": "dask", "feature_sets": [FEATURE_SET], **SMALL_SAMPLE}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "nbs").symlink_to(ROOT / "nbs")
    (root / "data").mkdir()
    shutil.copy(ROOT / "data" / "raw.dvc", root / "data")  # the data version the run records
    for photo in sample_photos(PER_CLASS):
        link = root / params["data"]["raw_dir"] / photo.parent.name / photo.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(photo)
    records = scan_dataset(root / params["data"]["raw_dir"], root)
    write_manifest(records, assign_splits(records, 0.2, 0.2, params["seed"]), root / params["data"]["manifest"])
    backbones = {s: convert_backbone(s, path) for s, path in backbone_paths([FEATURE_SET], root / params["backbone"]["dir"]).items()}
    extractor = FeatureExtractor([FEATURE_SET], feature_settings(params, [FEATURE_SET]), backbones)
    paths = {r.md5: root / r.path for r in records}  # one row per content, as stage features writes
    X = np.concatenate([extractor.transform([read_image(p) for p in list(paths.values())[i:i + 32]])
                        for i in range(0, len(paths), 32)]).astype(np.float32)
    out = root / params["features"]["out_dir"]
    out.mkdir(parents=True)
    table = pd.DataFrame({"md5": list(paths)} | {f"{FEATURE_SET}_{i}": X[:, i] for i in range(X.shape[1])})
    table.to_parquet(out / f"{FEATURE_SET}.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_dask_cluster(2, logs=tmp_path_factory.mktemp("dask")) as running:
        yield running


@pytest.fixture(scope="module")
def tables(project) -> dict:
    params = load_params(project / "params.yaml")
    frame, columns = load_dataset([FEATURE_SET], project / params["data"]["manifest"], project / params["features"]["out_dir"])
    return {"params": params, "frame": frame, "columns": columns,
            **{s: split_xy(frame, columns, s) for s in ("train", "val")}}


def test_train_stage_on_the_cluster_writes_a_bundle_that_serves(project, cluster, tables):
    with Client(cluster.address) as client:
        workers = set(client.scheduler_info()["workers"])
        client.get_task_stream()  # the scheduler records every task from now on (its task-stream plugin)
        start = time.time()
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store, in the tmp root
        env |= {"CATDOG_ROOT": str(project), "DASK_SCHEDULER_ADDRESS": cluster.address}
        run = subprocess.run([sys.executable, "-c", "from catdog_nb.core import run_stage; run_stage('12_train', register=False)"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=480)
        assert run.returncode == 0, run.stderr[-3000:]
        tasks = client.get_task_stream(start=start)
    ran_on = lambda name: {t["worker"] for t in tasks if key_split(t["key"]) == name}
    assert len(workers) == 2
    assert ran_on("train_part") == workers   # lightgbm.dask trained on both workers, each on the rows it held
    assert ran_on("val_losses") == workers   # and both scored their share of val
    assert f"training on the Dask cluster at {cluster.address}: 2 workers" in (project / "reports" / "12_train.ipynb").read_text()

    # The bundle loads and predicts in the service's Classifier, from the photos themselves.
    classifier = Classifier.load(project / tables["params"]["train"]["bundle_dir"])
    val = tables["frame"][tables["frame"]["split"] == "val"]
    p = classifier.predict_images([classifier.decode((project / path).read_bytes()) for path in val["path"]])[:, 1]
    on_cluster = classification_metrics(val["y"].to_numpy(), p)

    # The local engine on the same tables, with the same params.
    params = tables["params"]
    local, _ = train_booster(*tables["train"], *tables["val"], params["train"], params["seed"], tables["columns"])
    here = classification_metrics(tables["val"][1], predict_proba(local, tables["val"][0]))
    assert here["accuracy"] >= 0.9 and on_cluster["accuracy"] >= 0.9, (here, on_cluster)
    gap = abs(on_cluster["accuracy"] - here["accuracy"]) * len(val)
    assert gap <= WORST_GAP_PHOTOS + 1e-6, (on_cluster, here)


def test_cluster_training_stops_early_on_the_whole_val_split(cluster, tables):
    params, (X_val, y_val) = tables["params"], tables["val"]
    with Client(cluster.address) as client:
        X, _ = scatter_rows(client, *tables["train"])
        held = client.has_what()
        assert len(X.chunks[0]) == 2 and sorted(len(keys) for keys in held.values()) == [2, 2]  # an X and a y block each
        del X
        booster, history = train_booster(*tables["train"], X_val, y_val, params["train"], params["seed"], tables["columns"],
                                         client=client)
    cfg, best, curve = params["train"], booster.best_iteration, history["val"]
    # the curve the workers scored is the val log loss of the first k rounds, for any k
    for k in (1, best, len(curve)):
        assert curve[k - 1] == pytest.approx(classification_metrics(y_val, booster.predict(X_val, num_iteration=k))["log_loss"], abs=1e-5)
    # LightGBM's early-stopping rule: the best round, then early_stopping_rounds rounds without a new minimum
    assert 0 < best < cfg["num_boost_round"] and len(curve) == best + cfg["early_stopping_rounds"]
    assert min(curve) == curve[best - 1] and min(curve[:best - 1], default=np.inf) > curve[best - 1]
    assert booster.feature_name() == tables["columns"]
    text = model_text(booster)  # what booster.txt holds: cut at the best round, no trace of the run's network
    assert text.count("\nTree=") == best and "[machines: " not in text and "[local_listen_port: " not in text


def test_a_cluster_without_workers_is_a_clear_error(tmp_path):
    "Its workers gone (here the only one, killed as a lost machine would be), the stage gets a clear error, not an endless wait."
    with local_dask_cluster(1, logs=tmp_path) as cluster:
        os.killpg(cluster.processes[1].pid, signal.SIGKILL)  # its own session: the worker process and its nanny
        with Client(cluster.address) as client:
            deadline = time.monotonic() + 60
            while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.workers)) and time.monotonic() < deadline:
                time.sleep(0.2)
        with pytest.raises(ClusterError, match="has no worker after 2 s"):
            engine_client("dask", cluster.address, timeout=2)
