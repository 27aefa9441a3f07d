"""The project image and podman for the container tests: `make image` builds it (cached by a hash of its inputs);
the fixture calls the same script, so a test run after a code change never uses a stale image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "build" / "container" / "containers.conf"


@dataclass(frozen=True)
class Image:
    ref: str
    id: str
    size: int


def podman_env() -> dict:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, check=check,
                          timeout=timeout, **kw)


def build_image() -> Image:
    """`make image`'s script: builds only when an input changed, then names the image."""
    if shutil.which("podman") is None or not CONTAINERS_CONF.exists():
        raise RuntimeError("podman is not set up: run `make container` (sudo bash scripts/container/install.sh)")
    rc_file = os.environ.get("DISTILLERY_TEST_IMAGE_RC")
    if rc_file:  # `make test` started the build in the background: wait for it (the script below is then a no-op)
        rc_path, deadline = Path(rc_file), time.time() + 3600
        while not rc_path.exists() and time.time() < deadline:
            time.sleep(5)
        rc = rc_path.read_text().strip() if rc_path.exists() else "timeout"
        if rc != "0":
            log = rc_path.with_name("image.log")
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"the background image build failed ({rc}):\n{tail}")
    out = subprocess.run(["bash", str(REPO / "scripts" / "container" / "build_image.sh")], env=podman_env(),
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"make image failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    m = re.search(r"^image (\S+) id (\S+) size (\d+) bytes$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"make image printed no image line:\n{out.stdout[-2000:]}")
    return Image(m.group(1), m.group(2), int(m.group(3)))
