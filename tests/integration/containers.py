"""The project image and podman for the container tests: `make image` builds it (cached by a hash of its inputs);
the fixture calls the same script, so a test run after a code change never uses a stale image."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "build" / "container" / "containers.conf"
KUBECTL = str(Path(sys.executable).parent / "kubectl")


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


def pod_env(tmp_path: Path, config: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    """The env a pod gets: an overlay of manifests/base (the test servers' addresses patched into the ConfigMap,
    the credentials Secret generated), rendered with kustomize, its ConfigMap and Secret data turned into env the
    way the compiled tasks map them (key -> env var of the same name)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(REPO / "manifests" / "base", overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [base],
        "patches": [{"target": {"kind": "ConfigMap", "name": "distillery-config"},
                     "patch": yaml.safe_dump([{"op": "add", "path": f"/data/{k}", "value": v}
                                              for k, v in config.items()])}],
        "secretGenerator": [{"name": "distillery-credentials", "literals": [f"{k}={v}" for k, v in secret.items()]}],
        "generatorOptions": {"disableNameSuffixHash": True}}))
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    env = dict(docs[("ConfigMap", "distillery-config")]["data"])
    env.update({k: base64.b64decode(v).decode() for k, v in docs[("Secret", "distillery-credentials")]["data"].items()})
    return env


def check_lineage(client, pipeline: str, model_name: str, steps: set[str], image, s3,
                   own_data: bool = False) -> dict:
    """The checks every containerized run gets; returns its step runs by task. own_data: the pipeline versions data it generates (smdp-nav's scenarios), not the DVC-tracked sources: every
    run then carries that one revision instead of data.dvc's."""
    from distillery.platform import tracking, versioning

    exp = client.get_experiment_by_name(f"distillery/{pipeline}")
    # This run's parent: other tests share the server, but only the containers ran with this image.
    parents = client.search_runs([exp.experiment_id], f"tags.`{tracking.ROLE}` = 'pipeline' and tags.image = '{image.ref}'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    # The exit handler ended it with the pipeline's state: nothing else in a pod knows the pipeline is over.
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp_final_state"] == "SUCCEEDED", parent.data.tags
    children = client.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'",
                                  max_results=500)
    assert steps <= {c.data.tags["task"] for c in children}, sorted(c.data.tags["task"] for c in children)
    assert all(c.info.status == "FINISHED" for c in children), [(c.data.tags["task"], c.info.status) for c in children]
    recorded = parent.data.tags.get("data_revision") if own_data else versioning.recorded_md5(REPO / "data.dvc")
    assert recorded, parent.data.tags
    for run in [parent, *children]:
        assert run.data.tags.get("data_revision") == recorded, (run.data.tags.get("task"), run.data.tags)
        # The commit comes from the image (DISTILLERY_GIT_COMMIT): there is no git checkout in a container.
        assert run.data.tags.get("git_commit") not in (None, "", "unknown"), run.data.tags
        assert run.data.tags.get("image") == image.ref and run.data.tags.get("image_digest") == f"sha256:{image.id}"
    mv = client.get_model_version_by_alias(model_name, "champion")
    assert mv.run_id == parent.info.run_id or client.get_run(mv.run_id).data.tags.get(tracking.PARENT_TAG) == \
        parent.info.run_id
    weights = [k for k in s3.keys("artifacts/") if mv.run_id in k and k.endswith(".safetensors")]
    assert weights, "no model weights of the champion's run in RGW"
    return {c.data.tags["task"]: c for c in children}
