# Every target installs what it needs when it is missing, and nothing else.
# Four pinned sets (requirements/*.txt, compiled from *.in by `make lock`, each constrained by the one before):
#   serve    -> .venv-serve  what `catdog serve` / `catdog predict` import, nothing else
#   worker   -> image        a Dask worker's tasks (extraction, LightGBM) and scheduler: Dockerfile target `worker` (+ serve)
#   pipeline -> .venv        notebooks, DVC, MLflow, papermill, the backbone converter (+ worker)
#   dev      -> .venv        pipeline + test tools
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
UV_VERSION := 0.13.9

.PHONY: pipeline compare finetune test test-fast tools lab serve mlflow-ui tracking-server lock export clean-nbs readme docs \
	bench-features bench-serve bench-soak bench-pipeline dask-cluster bench-dask monitoring

# A stamp per installed set: re-installs only when its lock file changes. uv, unlike pip, writes no bytecode at
# install, and with PYTHONDONTWRITEBYTECODE=1 (set in many CI and container shells) Python never writes it either:
# every process would compile its imports from source, about 7 s of `catdog predict`'s 11. Compiled once here.
$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

$(VENV)/.pipeline: requirements/pipeline.txt pyproject.toml | $(BIN)/uv
	$(UV) pip install --python $(BIN)/python -q --compile-bytecode -r requirements/pipeline.txt
	$(UV) pip install --python $(BIN)/python -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements/dev.txt pyproject.toml | $(BIN)/uv
	$(UV) pip install --python $(BIN)/python -q --compile-bytecode -r requirements/dev.txt
	$(UV) pip install --python $(BIN)/python -q --no-deps -e .
	touch $@ $(VENV)/.pipeline

data/raw: data/raw.dvc | $(VENV)/.pipeline
	$(BIN)/dvc pull -q data/raw.dvc
	touch $@

# The served model and only it: split, each served set's backbone and features, train, evaluate (dvc repro evaluate),
# then the registry made to follow the files (catdog_nb.evaluate.sync_registry: DVC skips stages whose outputs are
# current, and the registry is outside DVC). The end prints what the run produced. A second run does nothing.
# With params.yaml data.feedback naming a folder, split runs every time (10 s): DVC does not see a new export into the
# same folder (nbs/01_data.ipynb), and an unchanged split.csv leaves every later stage as it was.
pipeline: $(VENV)/.pipeline data/raw
	@[ -z "$$($(BIN)/python -c "from catdog_nb.core import load_params; print(load_params()['data']['feedback'])")" ] \
	  || $(BIN)/dvc repro --force --single-item split
	$(BIN)/dvc repro evaluate
	@$(BIN)/python -c "from catdog_nb.evaluate import sync_registry; print(sync_registry())"
	@$(BIN)/python -c "from catdog_nb.cli import pipeline_summary; print(pipeline_summary())"

# The research: every candidate of compare.candidates (building the sets it needs) cross-validated -> compare.json.
compare: $(VENV)/.pipeline data/raw
	$(BIN)/dvc repro compare

# Research: the top of finetune.set trained per fold of compare's CV, beside the frozen and served figures -> finetune.json.
finetune: $(VENV)/.pipeline data/raw
	$(BIN)/dvc repro finetune

# System tools the tests drive, from Debian: prometheus (promtool and the server, tests/test_deploy.py and
# tests/test_monitoring.py, make monitoring), chromium (the page test), postgresql (make tracking-server,
# tests/test_tracking_server.py; its programs land in /usr/lib/postgresql/<version>/bin) and docker-compose (checks
# compose.yaml offline: `docker-compose config` needs no Docker daemon). apt-get runs only when one is missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
tools:
	@missing=""; \
	[ -x /usr/bin/promtool ] && [ -x /usr/bin/prometheus ] || missing="$$missing prometheus"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/docker-compose ] || missing="$$missing docker-compose"; \
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: $(VENV)/.dev data/raw tools
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest

# The quick loop: the notebooks' own checks, and the tests not marked slow (no server, subprocess or system tool).
test-fast: $(VENV)/.dev data/raw
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest -m "not slow"

# JupyterLab on the notebooks with the project's kernel, `catdog` (this venv's Python). Run as root (usual in a
# container), JupyterLab refuses to start unless told --allow-root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(VENV)/.pipeline
	$(BIN)/python -m ipykernel install --sys-prefix --name catdog --display-name catdog >/dev/null
	$(BIN)/jupyter lab --notebook-dir=nbs --MappingKernelManager.default_kernel_name=catdog $(ALLOW_ROOT)

lock: | $(BIN)/uv
	cd requirements && ../$(UV) pip compile -q --python-version 3.11 serve.in -o serve.txt \
	  && ../$(UV) pip compile -q --python-version 3.11 worker.in -c serve.txt -o worker.txt \
	  && ../$(UV) pip compile -q --python-version 3.11 pipeline.in -c worker.txt -o pipeline.txt \
	  && ../$(UV) pip compile -q --python-version 3.11 dev.in -c pipeline.txt -o dev.txt

# Notebooks -> package, then strip outputs and metadata noise before committing.
export: $(VENV)/.pipeline
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

# README.md is written from nbs/index.ipynb (nbdev's own `nbdev-readme` needs the Quarto binary, which no
# package registry ships; nbconvert renders the same notebook to the same Markdown). Cells tagged remove-input
# show only their output: the model table, computed from compare.json and metrics.json when the notebook runs.
README_NB ?= nbs/index.ipynb
README_OUT ?= README.md
readme: $(VENV)/.pipeline
	$(BIN)/nbdev-test --save $(README_NB)
	$(BIN)/nbdev-clean --fname $(README_NB)
	$(BIN)/jupyter nbconvert --to markdown --stdout --log-level WARN \
	  --TagRemovePreprocessor.remove_input_tags remove-input $(README_NB) | cat -s > $(README_OUT)

# The docs site (mkdocs.yml) into _site/: a page per notebook with its stored outputs (nothing is executed) and an API
# page per module of catdog_nb. --strict: any warning, such as a broken link or a notebook missing from the nav, fails
# the build. NO_MKDOCS_2_WARNING silences Material's banner about MkDocs 2, which this site does not use.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir _site

# The MLflow UI on the tracking store the pipeline writes to: $MLFLOW_TRACKING_URI when set, else the embedded
# one (mlflow.db at the root, artifacts in mlartifacts/). MLFLOW_PORT=5000 by default, on loopback only.
MLFLOW_PORT ?= 5000
mlflow-ui: $(VENV)/.pipeline
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db) --default-artifact-root $(CURDIR)/mlartifacts

# A team's setup on this machine (catdog_nb.tracking.tracking_server): Debian's PostgreSQL (make tools) on a throwaway
# data directory, `mlflow server` over it on 127.0.0.1:$(MLFLOW_PORT), artifacts proxied into a temporary folder. Prints
# the MLFLOW_TRACKING_URI to export; Ctrl-C stops both servers and deletes the database.
tracking-server: $(VENV)/.pipeline
	$(BIN)/python -c "from catdog_nb.tracking import tracking_server_main; tracking_server_main()" --port $(MLFLOW_PORT)

# The service (catdog serve, uvicorn) on the pipeline's bundle (params.yaml train.bundle_dir, or $CATDOG_MODEL_URI);
# CATDOG_* variables set its limits (README).
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
SERVE_WORKERS ?= 1
serve: $(VENV)/.pipeline
	$(BIN)/catdog serve --host $(SERVE_HOST) --port $(SERVE_PORT) --workers $(SERVE_WORKERS)

# The service and its monitoring on this machine, without Docker (compose.yaml adds Grafana, with Docker): `catdog serve`
# on 127.0.0.1:$(SERVE_PORT) and Debian's Prometheus (make tools) on 127.0.0.1:$(PROMETHEUS_PORT) with prometheus-local.yml
# and its alert rules (the scrape target moved to SERVE_PORT, the data in a temporary folder), until Ctrl-C (or a
# SIGTERM to make) stops both. If either stops by itself, the other is stopped too and the target fails.
# Debian's Prometheus has the classic web UI only: its alerts page is /classic/alerts (/alerts is a 404 there).
PROMETHEUS_PORT ?= 9090
monitoring: $(VENV)/.pipeline tools
	@tmp=$$(mktemp -d -t catdog-monitoring.XXXXXX); serve=; prom=; stopping=; \
	trap 'stopping=1' INT TERM; \
	sed -e 's|127.0.0.1:8000|127.0.0.1:$(SERVE_PORT)|' -e 's|^  - deployment/|  - $(CURDIR)/deployment/|' \
	  prometheus-local.yml > "$$tmp/prometheus.yml"; \
	$(BIN)/catdog serve --host 127.0.0.1 --port $(SERVE_PORT) & serve=$$!; \
	prometheus --config.file="$$tmp/prometheus.yml" --storage.tsdb.path="$$tmp/data" \
	  --web.listen-address=127.0.0.1:$(PROMETHEUS_PORT) --log.level=warn & prom=$$!; \
	echo "catdog      http://127.0.0.1:$(SERVE_PORT)  (/ready, /metrics)"; \
	echo "Prometheus  http://127.0.0.1:$(PROMETHEUS_PORT)  alerts: http://127.0.0.1:$(PROMETHEUS_PORT)/classic/alerts"; \
	echo "Ctrl-C stops both."; \
	wait -n $$serve $$prom; \
	[ -n "$$stopping" ] || echo "monitoring: a process stopped by itself; stopping the other" >&2; \
	kill $$serve $$prom 2>/dev/null; wait $$serve $$prom; rm -rf "$$tmp"; [ -n "$$stopping" ]

# A Dask cluster on this machine (catdog_nb.extract.dask_cluster_main): `dask scheduler` and one `dask worker` per
# core, one thread each, on 127.0.0.1 (8786, dashboard 8787), until Ctrl-C; it prints how to run the pipeline on it.
# Options: make dask-cluster DASK_ARGS="--workers 2 --port 8786 --dashboard-port 8787"
dask-cluster: $(VENV)/.pipeline
	$(BIN)/python -c "from catdog_nb.extract import dask_cluster_main; dask_cluster_main()" $(DASK_ARGS)

# Benchmarks (catdog_nb.bench, catdog_nb.bench_serve, catdog_nb.soak); run them on a quiet machine. Each prints a Markdown table with the load
# average and writes it to reports/bench/<name>.md, and reports/bench/<name>.json: CPU, cores, load, date, commit, arguments
# and figures (catdog_nb.bench.write_record). BENCH_ARGS="--out DIR" writes them elsewhere.
# Feature extraction: images/s incl. JPEG decode, per set, 1 process vs all cores, and the parallel efficiency.
# Options: make bench-features BENCH_ARGS="--n 960 --sets lite0"
bench-features: $(VENV)/.pipeline data/raw
	$(BIN)/dvc repro -q backbone  # up to date: nothing to do
	$(BIN)/python -c "from catdog_nb.bench import bench_main; bench_main()" features $(BENCH_ARGS)

# Extraction in the stage's local processes and on a local Dask cluster of as many one-thread workers, same photos:
# images/s, parallel efficiency, Dask / local. Options: make bench-dask BENCH_ARGS="--n 960 --sets lite0 --workers 2"
bench-dask: $(VENV)/.pipeline data/raw
	$(BIN)/dvc repro -q backbone  # up to date: nothing to do
	$(BIN)/python -c "from catdog_nb.bench import bench_main; bench_main()" dask $(BENCH_ARGS)

# The serving set alone in a venv of its own, installed as the image installs it (the package without its
# dependencies, bytecode compiled as pip compiles it): what a deployment carries, whose size bench-serve prints.
SERVE_VENV := .venv-serve
$(SERVE_VENV)/.serve: requirements/serve.txt pyproject.toml $(wildcard catdog_nb/*.py) | $(BIN)/uv
	$(PYTHON) -m venv --without-pip $(SERVE_VENV)
	$(UV) pip install --python $(SERVE_VENV)/bin/python -q --compile-bytecode -r requirements/serve.txt
	$(UV) pip install --python $(SERVE_VENV)/bin/python -q --compile-bytecode --no-deps --reinstall-package catdog_nb .
	touch $@

# The service against the model in-process, measured in turns on the same photos (catdog_nb.bench_serve): throughput
# at concurrency 8, one request at a time against one image at a time, memory. One bundle (default params.yaml train.bundle_dir): make bench-serve BENCH_ARGS="--model models:/catdog/5"
bench-serve: $(VENV)/.pipeline data/raw $(SERVE_VENV)/.serve
	$(BIN)/python -c "from catdog_nb.bench_serve import bench_serve_main; bench_serve_main()" $(BENCH_ARGS)

# A fresh clone of the committed HEAD (commit first): make pipeline, install included, then again; dvc status and git
# status after it (catdog_nb.bench_pipeline). Writes reports/bench/pipeline.{md,json}. Options: BENCH_ARGS="--keep"
bench-pipeline: $(VENV)/.pipeline
	$(BIN)/python -c "from catdog_nb.bench_pipeline import bench_pipeline_main; bench_pipeline_main()" $(BENCH_ARGS)

# A live service under 10,000 mixed good and hostile requests at concurrency 16: 5xx, latency, memory (catdog_nb.soak).
# Options: make bench-soak BENCH_ARGS="--requests 2000 --model models/catdog"
bench-soak: $(VENV)/.pipeline data/raw
	$(BIN)/python -c "from catdog_nb.soak import soak_main; soak_main()" $(BENCH_ARGS)
