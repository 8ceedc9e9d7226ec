# syntax=docker/dockerfile:1.7
#
# mtrank images. Targets:
#   serve        (default) the ranking service, no torch. CPU build:  docker build -t mtrank:0.1.0 .
#                GPU build: docker build --build-arg VARIANT=gpu -t mtrank:0.1.0-gpu .
#   serve-baked  serve plus a model repository copied into /models:
#                docker build --target serve-baked --build-context models=./repo -t mtrank:0.1.0-baked .
#   trainer      synth / train / export / load-embeddings (torch, CPU), used by the compose one-shot job:
#                docker build --target trainer -t mtrank-trainer:0.1.0 .
#   loadtest     locust with the project's own scenario (loadtests/locustfile.py), compose's `load` profile:
#                docker build --target loadtest -t mtrank-loadtest:0.1.0 .
#
# The install steps are the README's: '.[cpu]' or '.[gpu]' for serving, '.[cpu,train]' for training.
# onnxruntime and onnxruntime-gpu own the same package, so no stage ever installs both.

# cpu | gpu: picks the runtime base and the ONNX Runtime build of the serving image.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA 13 runtime, as onnxruntime-gpu 1.2x/1.3x expects; cuDNN comes from the '.[gpu]' extra.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Runtime bases: a Python interpreter, a venv on PATH and an unprivileged user (uid 10001).
FROM ${PYTHON_IMAGE} AS base-cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MTRANK_DEVICE=cpu
RUN groupadd --system --gid 10001 mtrank \
    && useradd --system --uid 10001 --gid mtrank --home-dir /app --shell /usr/sbin/nologin mtrank

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04 ships Python 3.12 (the project needs >= 3.11).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MTRANK_DEVICE=cuda
RUN groupadd --system --gid 10001 mtrank \
    && useradd --system --uid 10001 --gid mtrank --home-dir /app --shell /usr/sbin/nologin mtrank

# ---------------------------------------------------------------------------------------------
# source: the project's files, copied once for every stage that installs the project.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY mtrank /src/mtrank
COPY loadtests /src/loadtests

# builder: installs the project (not editable) into /opt/venv on the runtime base of the variant,
# so the venv's interpreter path is valid when serve-common copies it over.
FROM base-${VARIANT} AS builder
ARG VARIANT
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY --from=source /src ./
RUN pip install --no-cache-dir ".[${VARIANT}]"

# ---------------------------------------------------------------------------------------------
# trainer: the offline side (synth, train, export, load-embeddings). CPU torch; not a serving image.
FROM base-cpu AS trainer
# Where pip looks for torch first; the CPU wheel index keeps the image free of CUDA libraries.
# Pass --build-arg TORCH_INDEX_URL= to take torch from PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
RUN python3 -m venv /opt/venv
COPY --from=source /src ./
RUN if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install --no-cache-dir '.[cpu,train]'
COPY configs ./configs
RUN mkdir -p /models /var/lib/mtrank && chown mtrank:mtrank /models /var/lib/mtrank
USER 10001:10001
ENTRYPOINT ["mtrank"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# loadtest: locust running loadtests/locustfile.py. The scenario imports numpy, orjson and the
# project's mtrank package (mtrank.bench.workload): the base install (no ONNX Runtime, no torch) plus locust.
FROM base-cpu AS loadtest
ARG LOCUST_VERSION=2.47.0
WORKDIR /app
RUN python3 -m venv /opt/venv
COPY --from=source /src ./
RUN pip install --no-cache-dir . "locust==${LOCUST_VERSION}"
USER 10001:10001
# Run options (host, users, run time) come from the compose service or `docker run ... IMAGE --headless ...`.
ENTRYPOINT ["locust", "-f", "loadtests/locustfile.py"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# serve-common: the serving image proper. One serving process per core of the container's CPU
# quota or MTRANK_CPUS (MTRANK_WORKERS=0, see deploy/README.md), each owning its ONNX sessions,
# dynamic batcher and embedding cache behind the one port; scale with replicas.
FROM base-${VARIANT} AS serve-common
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
RUN mkdir -p /models && chown mtrank:mtrank /models
ENV MTRANK_MODEL_REPO=/models \
    MTRANK_HOST=0.0.0.0 \
    MTRANK_PORT=8000
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz); readiness (/readyz) is for load balancers and compose's depends_on.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MTRANK_PORT', '8000') + '/healthz', timeout=2)"
# uvicorn drains in-flight requests on SIGTERM within MTRANK_DRAIN_TIMEOUT_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mtrank"]
CMD ["serve"]

# serve-baked: the model repository inside the image (immutable deploys, no volume needed).
FROM serve-common AS serve-baked
COPY --from=models --chown=10001:10001 . /models/

# serve: the model repository is mounted at /models (compose volume, Kubernetes volume).
FROM serve-common AS serve
