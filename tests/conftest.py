"""Session fixtures shared by the service, predict and monitoring tests.

`model_bundle` is a real bundle: the pipeline's own functions (`convert_backbone`, and `FeatureExtractor`,
`train_booster`, `save_bundle` via `bundles.tiny_bundle`) on a fixed sample of real photos, so that the tests do not depend on `make pipeline`
having run. `server` is the real `catdog serve` on a loopback port, serving `model_bundle`. `serve_venv` is the serving
image's install: requirements/serve.txt and the package, in a fresh venv.
"""
import os
import sys
from pathlib import Path

import pytest

from catdog_nb.backbone import backbone_paths, convert_backbone, is_int8
from catdog_nb.core import load_params
from catdog_nb.data import read_image, sample_photos
from bundles import tiny_bundle
from servers import free_port, running
from venvs import build_venv

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PHOTOS_PER_CLASS = 100  # the training sample of `model_bundle`
BUNDLE_FEATURE_SETS = load_params()["train"]["feature_sets"]  # what the pipeline serves


@pytest.fixture(scope="session")
def training_photos() -> list[Path]:
    photos = sample_photos(PHOTOS_PER_CLASS)
    if len(photos) < 2 * PHOTOS_PER_CLASS: pytest.fail("data/raw is missing: run `make data/raw` (dvc pull)")
    return photos


@pytest.fixture(scope="session")
def photo(training_photos) -> bytes:
    "The bytes of one training photo (a cat)."
    return training_photos[0].read_bytes()


@pytest.fixture(scope="session")
def unseen_photos() -> list[Path]:
    "Photos that `model_bundle` was not trained on (10 per class)."
    return sample_photos(10, skip=PHOTOS_PER_CLASS)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory, training_photos) -> dict[str, Path]:
    """The backbones of `BUNDLE_FEATURE_SETS` converted from the pip-shipped weights (seconds each), as stage `backbone` does;
    an -int8 set calibrated on a quarter of `training_photos` (the stage's train split is not there before `dvc repro`)."""
    folder = tmp_path_factory.mktemp("backbones")
    calibration = [read_image(p) for p in training_photos[::4]]
    return {s: convert_backbone(s, path, calibration if is_int8(s) else None)
            for s, path in backbone_paths(BUNDLE_FEATURE_SETS, folder).items()}


@pytest.fixture(scope="session")
def model_bundle(tmp_path_factory, training_photos, backbones) -> Path:
    "A real model bundle folder trained on `training_photos` with the served feature sets."
    out = tmp_path_factory.mktemp("bundle") / "catdog"
    return tiny_bundle(training_photos, out, load_params(), BUNDLE_FEATURE_SETS, backbones)


@pytest.fixture(scope="session")
def server(model_bundle, tmp_path_factory):
    "`catdog serve` on 127.0.0.1 and a free port with the `model_bundle`; entered once /ready answers 200."
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "CATDOG_MODEL_URI": str(model_bundle)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=ROOT,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp / "server.log", timeout=180) as proc:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "process": proc, "log": tmp / "server.log"}


@pytest.fixture(scope="session")
def serve_venv(tmp_path_factory) -> Path:
    "A venv holding the serving set and the package, built from a copy of the builder stage's build context."
    return build_venv(tmp_path_factory.mktemp("serve-install"), ["builder"], "serve.txt")
