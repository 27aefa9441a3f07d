#!/usr/bin/env bash
# Real servers the integration tests start on 127.0.0.1: PostgreSQL 15 and a one-node Ceph cluster
# (mon + memstore OSD + RADOS Gateway as the S3 server), and headless OpenGL for MuJoCo frames.
# Idempotent; Debian packages; needs root.
set -euo pipefail
need=()
command -v /usr/lib/postgresql/15/bin/initdb >/dev/null 2>&1 || need+=(postgresql-15)
command -v radosgw >/dev/null 2>&1 || need+=(radosgw)
command -v ceph-mon >/dev/null 2>&1 || need+=(ceph-mon)
command -v ceph-osd >/dev/null 2>&1 || need+=(ceph-osd)
command -v ceph >/dev/null 2>&1 || need+=(ceph-common)
# Headless OpenGL (EGL + Mesa's software rasterizer) so MuJoCo renders evaluation frames without a display.
for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "services: PostgreSQL, Ceph RGW and EGL already installed"
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "services: installing ${need[*]} needs root (sudo bash $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian package starts a cluster of its own; the tests start theirs in temp folders.
pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
echo "services: installed ${need[*]}"
