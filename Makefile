# Every target installs what it needs when it is missing, and nothing else.
# Three pinned sets (requirements/*.txt, compiled from *.in by `make lock`):
#   serve    -> .venv-serve  what `catdog serve` / `catdog predict` import, nothing else
#   pipeline -> .venv        notebooks, DVC, MLflow, papermill, the backbone converter (+ serve)
#   dev      -> .venv        pipeline + test tools
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
UV_VERSION := 0.13.9

.PHONY: pipeline test lab serve mlflow-ui lock export clean-nbs readme bench-features bench-serve

# A stamp per installed set: re-installs only when its lock file changes.
$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

$(VENV)/.pipeline: requirements/pipeline.txt pyproject.toml | $(BIN)/uv
	$(UV) pip install --python $(BIN)/python -q -r requirements/pipeline.txt
	$(UV) pip install --python $(BIN)/python -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements/dev.txt pyproject.toml | $(BIN)/uv
	$(UV) pip install --python $(BIN)/python -q -r requirements/dev.txt
	$(UV) pip install --python $(BIN)/python -q --no-deps -e .
	touch $@ $(VENV)/.pipeline

data/raw: data/raw.dvc | $(VENV)/.pipeline
	$(BIN)/dvc pull -q data/raw.dvc
	touch $@

pipeline: $(VENV)/.pipeline data/raw
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: $(VENV)/.dev data/raw
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest

lab: $(VENV)/.pipeline
	$(BIN)/python -m ipykernel install --sys-prefix --name catdog --display-name "catdog (.venv)" >/dev/null
	$(BIN)/jupyter lab --notebook-dir=nbs

lock: | $(BIN)/uv
	cd requirements && ../$(UV) pip compile -q --python-version 3.11 serve.in -o serve.txt \
	  && ../$(UV) pip compile -q --python-version 3.11 pipeline.in -c serve.txt -o pipeline.txt \
	  && ../$(UV) pip compile -q --python-version 3.11 dev.in -c pipeline.txt -o dev.txt

# Notebooks -> package, then strip outputs and metadata noise before committing.
export: $(VENV)/.pipeline
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

# README.md is written from nbs/index.ipynb (nbdev's own `nbdev-readme` needs the Quarto binary, which no
# package registry ships; nbconvert renders the same notebook to the same Markdown).
readme: $(VENV)/.pipeline
	$(BIN)/jupyter nbconvert --to markdown --log-level WARN --output-dir . --output README nbs/index.ipynb
