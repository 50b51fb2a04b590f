# syntax=docker/dockerfile:1
#
# Model Server image: coordinator, workers and HTTP frontends under supervisord,
# started by `model-server serve`. One file, two variants (BuildKit builds only
# the stages the chosen variant needs):
#
#   docker build -t model-server:gpu .                          # default: CUDA 13 + cuDNN 9
#   docker build -t model-server:cpu --build-arg VARIANT=cpu .  # python:3.11-slim
#
# Run:
#
#   docker run --gpus all --shm-size=1g --stop-timeout=45 -p 8001:8001 \
#       -v "$PWD/models.yaml:/etc/model-server/models.yaml:ro" \
#       -e MODEL_SERVER_MODELS_FILE=/etc/model-server/models.yaml \
#       model-server:gpu
#
# Tokens: the image listens on 0.0.0.0, so without admin tokens the admin routes
#   (model load/unload, client shared memory) answer 403; inference stays open
#   unless inference tokens are set. Give tokens as a file, never as an ENV in
#   an image (docker history shows it), e.g. a Docker/Compose secret:
#
#   openssl rand -hex 32 > admin-tokens
#   docker run ... -v "$PWD/admin-tokens:/run/secrets/model-server-admin-tokens:ro" \
#       -e MODEL_SERVER_ADMIN_TOKENS_FILE=/run/secrets/model-server-admin-tokens model-server:gpu
#
# --shm-size: each HTTP frontend process maps a shared-memory arena of
#   MODEL_SERVER_SHM_ARENA_BYTES (128 MiB by default) in /dev/shm. Docker's
#   default /dev/shm is 64 MB, too small for even one arena. Give at least
#   MODEL_SERVER_FRONTEND_PROCESSES x MODEL_SERVER_SHM_ARENA_BYTES plus headroom;
#   1g fits the defaults several times over.
# --stop-timeout: on SIGTERM the server turns /ready to 503 and lets in-flight
#   requests finish for MODEL_SERVER_DRAIN_SECONDS (30 by default). `docker stop`
#   sends SIGKILL after 10 s unless told otherwise: use a stop timeout above the
#   drain time (45 for the default 30), here or with `docker stop -t 45`.
#
# The runtime dependencies come from requirements.lock only; the project itself
# is installed with `pip install --no-deps .`, so the lock is the whole truth.
#
# Both variants install onnxruntime-gpu from the lock. Its wheel carries the CPU
# execution provider too, and the CUDA provider library is loaded only when a
# session asks for it, so the CPU image runs it on CPUExecutionProvider (and sets
# MODEL_SERVER_GPUS=none). The cost is image size (the CUDA provider library),
# not behaviour; one lock for both images is worth it.
#
# GPU variant: onnxruntime-gpu 1.31 is built against CUDA 13.0
# (onnxruntime/capi/build_and_package_info.py: cuda_version = '13.0'; its CUDA
# provider links libcudart.so.13 and libcublas.so.13) and needs cuDNN 9, so the
# base is NVIDIA's CUDA 13.0 runtime image with cuDNN. CUDA 13 needs an NVIDIA
# driver >= 580 on the host. Ubuntu 24.04's own Python is 3.12, so Python 3.11
# comes from the deadsnakes PPA; builder and runtime share that interpreter, so
# the venv copied between them points at the same /usr/bin/python3.11.

ARG VARIANT=gpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
# Base images: an interpreter, tini and nothing else.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
# Unpinned apt packages: the base image tag pins the distribution release, and
# exact Debian versions vanish from the archive with every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
# GPUs off in the CPU image: on a GPU host /proc/driver/nvidia can list the
# host's GPUs even when none is given to the container.
ENV PYTHON_BIN=/usr/local/bin/python3.11 \
    MODEL_SERVER_GPUS=none

FROM ${CUDA_IMAGE} AS base-gpu
ARG DEBIAN_FRONTEND=noninteractive
# Unpinned apt packages: as above; the PPA also drops superseded versions.
# software-properties-common is only needed to add the PPA and is purged after.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv tini \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*
# nvidia/cuda sets NVIDIA_VISIBLE_DEVICES=all. Capabilities: compute for CUDA,
# utility for NVML / nvidia-smi (GPU discovery with MODEL_SERVER_GPUS=auto).
ENV PYTHON_BIN=/usr/bin/python3.11 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MODEL_SERVER_GPUS=auto

# ---------------------------------------------------------------------------
# Builder: a venv with the locked dependencies and the project.
# ---------------------------------------------------------------------------
# base-${VARIANT} is a stage of this file, not a registry image: nothing to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN "${PYTHON_BIN}" -m venv /opt/venv
WORKDIR /src
# The lock first, alone: this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY model_server/ model_server/
COPY frontend/ frontend/
COPY workers/ workers/
COPY coordinator/ coordinator/
COPY ipc/ ipc/
COPY loader/ loader/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------
# Runtime: the base plus the venv, a non-root user and supervisord.conf.
# ---------------------------------------------------------------------------
# base-${VARIANT} is a stage of this file (see builder): nothing to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="model-server" \
      org.opencontainers.image.description="ONNX inference server (Open Inference Protocol v2)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.model-server.variant="${VARIANT}"

# A numeric user, so Kubernetes' runAsNonRoot can verify it; home and the
# writable directories belong to it. /tmp is left alone: the run directory is
# created there at start (in Kubernetes /tmp is an emptyDir).
RUN groupadd --system --gid 10001 model-server \
    && useradd --system --uid 10001 --gid 10001 --create-home \
        --home-dir /home/model-server --shell /usr/sbin/nologin model-server \
    && install -d -o 10001 -g 10001 /var/cache/model-server /mnt/models

COPY --from=builder /opt/venv /opt/venv
# `model-server serve` looks for supervisord.conf next to the package sources,
# then in <sys.prefix>/share/model-server/ - the venv's, for an installed package.
COPY supervisord.conf /opt/venv/share/model-server/supervisord.conf
WORKDIR /home/model-server

# Every MODEL_SERVER_* name here is a field of model_server.settings.Settings
# (tests/deploy/test_dockerfile.py checks it).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_SERVER_HOST=0.0.0.0 \
    MODEL_SERVER_PORT=8001 \
    MODEL_SERVER_GRPC_PORT=8002 \
    MODEL_SERVER_RUN_DIR=/tmp/model-server \
    MODEL_SERVER_CACHE_DIR=/var/cache/model-server \
    MODEL_SERVER_MODEL_REPOSITORY=/mnt/models

USER 10001:10001
# 8001: HTTP (REST, /metrics, probes); 8002: gRPC (KServe V2 / Triton, grpc.health.v1).
EXPOSE 8001 8002
STOPSIGNAL SIGTERM

# Liveness only (/health); readiness (/ready) is for load balancers and stays
# 503 while start-up models load. No curl in the image: Python's urllib does it,
# and a non-2xx answer raises, so the exit status is non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MODEL_SERVER_PORT', '8001'), timeout=4)"]

# tini is PID 1: it forwards SIGTERM to `model-server serve`, which execs
# supervisord; supervisord stops the programs in order and they drain. tini runs
# without -g on purpose: signalling the whole group would hand every process a
# second SIGTERM after supervisord's, and a second signal forces an immediate exit.
ENTRYPOINT ["tini", "--"]
CMD ["model-server", "serve"]
