# syntax=docker/dockerfile:1.7
#
# kubetune's container images: one Dockerfile, one wheel, three targets.
#
#   docker build --target operator     -t kubetune/operator:0.1.0     .   # the Helm chart's operator (no torch)
#   docker build --target trainer      -t kubetune/trainer:0.1.0      .   # worker pods, CPU build of torch
#   docker build --target trainer-cuda -t kubetune/trainer:0.1.0-cuda .   # worker pods on NVIDIA GPUs
#
# The tags are pyproject.toml's version: the chart's default operator image and the operator's
# default trainer image (kubetune.api.spec.DEFAULT_TRAINER_IMAGE) name them;
# tests/packaging/test_dockerfile.py keeps the three in step and runs every install step below
# against the repository (no image is built by the tests).
#
# Base images are pinned by tag. A release pipeline should pin them by digest as well
# (e.g. python:3.11.14-slim-bookworm@sha256:<digest>, resolved once and renewed on purpose), so
# that a rebuild of the same commit gets the same bytes.
#
# Every final image runs as the numeric non-root user 65532:65532 (the pods' runAsNonRoot can be
# checked without reading the image), keeps its Python environment in /opt/venv (world-readable,
# so a pod's own runAsUser works too) and writes only under /tmp (an emptyDir in the pods: the
# operator's root filesystem is read-only).

ARG PYTHON_VERSION=3.11
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# GPU path: CUDA's major version must be torch's (the torch wheel on PyPI is built for CUDA 13),
# or DeepSpeed refuses to compile its ops.
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG VERSION=0.1.0
# pyproject.toml's pin of torch: installed first, and kept by the install of kubetune[trainer].
ARG TORCH_VERSION=2.13.0

# The one uv of every stage, pinned (the same version as the development venv's).
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv


# ---------------------------------------------------------------------------------------------
# build: the kubetune wheel (hatchling), from the five source roots pyproject.toml names.
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY cli/ cli/
COPY operator/ operator/
COPY trainer/ trainer/
COPY localcluster/kubetune/ localcluster/kubetune/
RUN --mount=type=cache,target=/root/.cache/uv uv build --wheel --out-dir /dist


# ---------------------------------------------------------------------------------------------
# The environments, each built in a stage of its own so that no final image carries uv, the
# wheel, a compiler it does not need or uv's cache.
FROM ${PYTHON_IMAGE} AS venv-base
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
COPY --from=build /dist/ /dist/
# UV_COMPILE_BYTECODE: the images start with a read-only /opt/venv and PYTHONDONTWRITEBYTECODE,
# so the bytecode is written now, once. UV_LINK_MODE=copy: the cache is a mount of its own.
ENV VIRTUAL_ENV=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
RUN uv venv --python "$PYTHON_VERSION" "$VIRTUAL_ENV"

# kubetune[operator] only: kopf, the Kubernetes client, aiohttp, prometheus-client. No torch.
FROM venv-base AS operator-venv
RUN --mount=type=cache,target=/root/.cache/uv uv pip install "$(ls /dist/kubetune-*.whl)[operator]"

# kubetune[trainer] with the CPU build of torch. DeepSpeed ships only an sdist, built without
# build isolation (pyproject.toml's [tool.uv] no-build-isolation-package) against the torch
# installed first; DS_BUILD_OPS=0: the trainer compiles none of its ops (below).
FROM venv-base AS trainer-venv
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/uv uv pip install --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" setuptools
RUN --mount=type=cache,target=/root/.cache/uv DS_BUILD_OPS=0 uv pip install --no-build-isolation-package deepspeed "$(ls /dist/kubetune-*.whl)[trainer]"


# ---------------------------------------------------------------------------------------------
# What the final images share: labels, the user, the environment.
FROM ${PYTHON_IMAGE} AS runtime-base
ARG VERSION
LABEL org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kubetune"
RUN groupadd --gid 65532 kubetune \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubetune
# The venv's bin comes first on PATH: `python`, `kubetune` and `torchrun` are the venv's, not
# the base image's /usr/local/bin/python. HOME=/tmp: nothing may need a writable home elsewhere.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    LOGNAME=kubetune \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1


# ---------------------------------------------------------------------------------------------
# operator: what the Helm chart runs (command ["kubetune"], args ["operator", ...]).
FROM runtime-base AS operator
LABEL org.opencontainers.image.title="kubetune operator" \
      org.opencontainers.image.description="The FineTuneJob operator (kopf); no torch."
COPY --from=operator-venv /opt/venv /opt/venv
USER 65532:65532
ENTRYPOINT ["kubetune"]
CMD ["operator"]


# ---------------------------------------------------------------------------------------------
# trainer: the worker pods' image. The operator gives each pod its own command
# (python -m kubetune.trainer.logkeeper --config /etc/kubetune/config.json -- torchrun ...),
# so ENTRYPOINT only serves `docker run`. No compiler: the trainer compiles no DeepSpeed op. It
# brings torch's AdamW, also under deepspeed.offload: cpu (so not DeepSpeed's cpu_adam), and
# turns off the shared-memory op DeepSpeed would build for its CPU comm backend; the recipe's
# ZeRO-3 offload test runs with an empty TORCH_EXTENSIONS_DIR and finds it empty afterwards.
FROM runtime-base AS trainer
LABEL org.opencontainers.image.title="kubetune trainer" \
      org.opencontainers.image.description="FineTuneJob workers: torchrun, DeepSpeed ZeRO, PEFT LoRA (CPU build of torch)."
COPY --from=trainer-venv /opt/venv /opt/venv
# Every cache the stack writes goes under /tmp, the pods' emptyDir (any runAsUser can write it).
ENV HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    MPLCONFIGDIR=/tmp/matplotlib
USER 65532:65532
ENTRYPOINT ["kubetune"]
CMD ["trainer", "--help"]


# ---------------------------------------------------------------------------------------------
# GPU PATH. NEVER BUILT ON THE PROJECT'S MACHINES (they have no Docker and no GPU): the stages
# below are written from the CUDA, DeepSpeed and uv documentation; the tests only resolve their
# requirements. Build and run it on a GPU machine before publishing kubetune/trainer:*-cuda.
#
# cuda-build: torch's CUDA wheel from PyPI, DeepSpeed with FusedAdam and CPUAdam compiled for
# A100 (8.0) and H100 (9.0); add 10.0 to TORCH_CUDA_ARCH_LIST for B200. Python is uv's build
# of CPython (Ubuntu 24.04 ships 3.12 only), copied as is into the runtime stage.
FROM ${CUDA_DEVEL_IMAGE} AS cuda-build
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=8
COPY --from=uv /uv /usr/local/bin/uv
COPY --from=build /dist/ /dist/
ENV VIRTUAL_ENV=/opt/venv \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install "$PYTHON_VERSION"
RUN uv venv --python "$PYTHON_VERSION" "$VIRTUAL_ENV"
# ninja here too: DeepSpeed's ops are compiled while it is built, before its own dependencies.
RUN --mount=type=cache,target=/root/.cache/uv uv pip install "torch==$TORCH_VERSION" setuptools ninja
# --no-cache: a DeepSpeed wheel cached by an earlier build without its ops must not be reused.
RUN DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" uv pip install --no-cache --no-build-isolation-package deepspeed "$(ls /dist/kubetune-*.whl)[trainer]"

# trainer-cuda: the runtime image (CUDA runtime libraries; torch brings its own cuDNN and NCCL).
# No compiler: DeepSpeed ops other than the two above are not available at run time.
FROM ${CUDA_RUNTIME_IMAGE} AS trainer-cuda
ARG VERSION
LABEL org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kubetune" \
      org.opencontainers.image.title="kubetune trainer (CUDA)" \
      org.opencontainers.image.description="FineTuneJob workers on NVIDIA GPUs: torchrun, DeepSpeed ZeRO (FusedAdam, CPUAdam prebuilt), PEFT LoRA."
RUN groupadd --gid 65532 kubetune \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubetune
COPY --from=cuda-build /opt/python /opt/python
COPY --from=cuda-build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    LOGNAME=kubetune \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    MPLCONFIGDIR=/tmp/matplotlib
USER 65532:65532
ENTRYPOINT ["kubetune"]
CMD ["trainer", "--help"]
