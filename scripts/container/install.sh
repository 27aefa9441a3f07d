#!/usr/bin/env bash
# A container engine for `make image` and the container tests: Debian's podman, runc behind a wrapper
# runtime that drops rlimits (sandboxes without CAP_SYS_RESOURCE refuse them), debootstrap for the
# base image (no registry needed), and a containers.conf that selects the wrapper and the host network
# (containers reach the test servers on 127.0.0.1). Idempotent; installing packages needs root.
# Use it with: export CONTAINERS_CONF=$PWD/build/container/containers.conf
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
need=()
for cmd in podman runc debootstrap; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != "0" ]; then
    echo "container: installing ${need[*]} needs root (sudo bash $0)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  echo "container: installed ${need[*]}"
fi
conf_dir="$root/build/container"
mkdir -p "$conf_dir"
conf="$conf_dir/containers.conf"
runtime="$root/scripts/container/runc-no-rlimits"
want="[containers]
netns = \"host\"

[engine]
runtime = \"runc-no-rlimits\"

[engine.runtimes]
runc-no-rlimits = [\"$runtime\"]
"
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$(printf '%s' "$want")" ]; then
  printf '%s' "$want" > "$conf"
fi
# KServe's storage initializer (kserve-storage) for the predictor test, in a venv of its own as in its own
# container: its pins differ from the project's.
si="$conf_dir/storage-initializer"
req="$root/scripts/container/storage-initializer.txt"
if [ "$(cat "$si/.installed" 2>/dev/null)" != "$(sha256sum < "$req")" ]; then
  rm -rf "$si"
  python3 -m venv "$si"
  "$si/bin/pip" install -q -r "$req"
  sha256sum < "$req" > "$si/.installed"
fi
CONTAINERS_CONF="$conf" podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null
echo "container: podman ready (CONTAINERS_CONF=$conf)"
