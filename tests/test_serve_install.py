"""The serving set alone is enough: a fresh venv gets requirements/serve.txt and the package, installed from the files
the Dockerfile's builder stage copies, as the image does (`pip install --no-deps .`; uv here, for speed)."""
import json
import shutil
from pathlib import Path

import httpx
import pytest

from servers import free_port, running
from venvs import installed, outside_env, pinned, run_in

ROOT = Path(__file__).resolve().parents[1]
# MLflow's client (mlflow-skinny) serves registry URIs; its tracking store (sqlalchemy) and server stay out.
RESEARCH_PACKAGES = ["jupyter", "jupyterlab", "notebook", "ipykernel", "nbdev", "papermill", "dvc", "sqlalchemy", "onnx",
                     "torch", "jax", "optax", "pandas", "sklearn", "matplotlib"]
# The modules the service and `catdog predict` run on; the pipeline's (train, evaluate, ...) may need more.
SERVING_MODULES = ["catdog_nb", "catdog_nb.core", "catdog_nb.data", "catdog_nb.engine", "catdog_nb.features",
                   "catdog_nb.cli", "catdog_nb.predict", "catdog_nb.batcher", "catdog_nb.monitoring", "catdog_nb.service"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_venv_holds_exactly_the_serving_set(serve_venv):
    assert installed(serve_venv) == pinned("serve.txt") | {"catdog-nb"}


def test_serving_modules_import_without_research_packages(serve_venv):
    script = ("import importlib, importlib.util, json, sys\n"
              f"for m in {SERVING_MODULES!r}: importlib.import_module(m)\n"
              f"print(json.dumps({{p: importlib.util.find_spec(p) is not None for p in {RESEARCH_PACKAGES!r}}}))")
    result = run_in(serve_venv, serve_venv / "bin" / "python", "-c", script)
    assert result.returncode == 0, result.stderr
    present = json.loads(result.stdout.splitlines()[-1])
    assert not [p for p, found in present.items() if found]


def test_catdog_help_runs(serve_venv):
    result = run_in(serve_venv, serve_venv / "bin" / "catdog", "--help")
    assert result.returncode == 0 and "serve" in result.stdout, result.stdout + result.stderr
    result = run_in(serve_venv, serve_venv / "bin" / "catdog", "serve", "--help")
    assert result.returncode == 0 and "--workers" in result.stdout, result.stdout + result.stderr


def test_serving_venv_serves_a_prediction(serve_venv, model_bundle, tmp_path):
    "Laid out as in the image: an app folder with params.yaml (CATDOG_ROOT), the bundle from CATDOG_MODEL_URI."
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "params.yaml", app)
    port = free_port()
    env = outside_env() | {"CATDOG_ROOT": str(app), "CATDOG_MODEL_URI": str(model_bundle)}
    photo = next((ROOT / "data" / "raw" / "dog").glob("*.jpg"))
    with running([serve_venv / "bin" / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=app,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp_path / "service.log", timeout=180):
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=60,
                            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    # the page is package data: installed with the wheel, read from the venv
    from catdog_nb.service import page_html  # the package's index.html, with the threshold of its `animal` note filled in
    assert page.status_code == 200 and page.text == page_html()
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] in ("cat", "dog") and set(answer.json()["probability"]) == {"cat", "dog"}
    version = json.loads((model_bundle / "bundle.json").read_text())["version"]
    assert f"version {version}" in (tmp_path / "service.log").read_text()  # the ready line names the model that runs
