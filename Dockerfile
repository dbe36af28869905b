# The catdog prediction service: `catdog serve` with the serving dependency set and the model bundle, nothing else.
#   docker build -t catdog .            (needs models/catdog/, made by the pipeline: `make pipeline`)
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp catdog
# and, from the same file, the pipeline's Dask worker (target `worker`, below; k8s/dask/ runs it).
# Every stage uses the same base image, so the venv's interpreter path (/usr/local/bin/python3.11) exists in all.
# Python 3.11 is the version the project tests on (Makefile PYTHON, CI).

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned serving set first: this layer is reused until requirements/serve.txt changes.
COPY requirements/serve.txt requirements/serve.txt
RUN pip install --no-cache-dir -r requirements/serve.txt
COPY pyproject.toml README.md LICENSE ./
COPY catdog_nb/ catdog_nb/
# The package pins nothing itself (dependencies = []): --no-deps keeps the serving set exactly as locked.
RUN pip install --no-cache-dir --no-deps . \
    && catdog --help >/dev/null

# What both images run on: the system OpenMP runtime and the numeric non-root user.
FROM python:3.11-slim-bookworm AS base
# LightGBM's wheel links the system OpenMP runtime (libgomp.so.1), which the slim image lacks.
# Unpinned on purpose: the base tag fixes the Debian release, and its point releases carry security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# A numeric non-root user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 catdog \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin catdog
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# The pipeline's Dask worker: the worker set (requirements/worker.txt: the serving set + dask, pandas, pyarrow,
# scikit-learn for lightgbm.dask; no JupyterLab, DVC or MLflow) and the package, so that the tasks of stages
# `features` and `train` run here. The same image runs the scheduler (`dask scheduler`, k8s/dask/).
#   docker build --target worker -t catdog-worker .
#   docker run --rm --read-only --tmpfs /tmp -e DASK_SCHEDULER_ADDRESS=tcp://HOST:8786 catdog-worker
# Its versions are the client's: requirements/pipeline.txt is compiled under worker.txt's pins (`make lock`).
FROM builder AS worker-builder
COPY requirements/worker.txt requirements/worker.txt
RUN pip install --no-cache-dir -r requirements/worker.txt \
    && python -c "import catdog_nb.extract, catdog_nb.train, lightgbm.dask"

FROM base AS worker
COPY --from=worker-builder /opt/venv /opt/venv
USER 10001:10001
# The scheduler comes from DASK_SCHEDULER_ADDRESS (Dask's own variable, as for the pipeline) or an argument.
# One worker process per container, its threads and memory limit read by Dask from the container's limits;
# /health and /metrics without the Bokeh dashboard on 8788.
ENTRYPOINT ["dask", "worker"]
CMD ["--nworkers", "1", "--no-dashboard", "--dashboard-address", ":8788"]

FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# params.yaml marks the project root (catdog_nb.core.project_root); the bundle is read-only at run time.
COPY params.yaml ./
COPY models/catdog/ models/catdog/
# Only what this image's layout decides: the project root and the bundle copied above. Every other CATDOG_*
# setting keeps its default, which lives in one place (catdog_nb.server.Settings); k8s/configmap.yaml and
# `docker run -e` override them.
ENV CATDOG_ROOT=/app \
    CATDOG_MODEL_URI=/app/models/catdog
USER 10001:10001
EXPOSE 8000
# The slim image has no curl: probe /health with the standard library (the port matches CMD below).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["catdog", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
