"""The compiled KFP IR is what a cluster runs: every task gets the ConfigMap/Secret env, the configured image,
resources, retries and a timeout; GPU profiles put accelerators on the compute steps; gates are real."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

PIPELINES = ("tiny-sd", "scott", "mode", "smdp-nav", "hybrid-sd", "teacher-prior", "swift-diffusion")


def _compile(name: str, profile: str, out) -> tuple[dict, dict]:
    from distillery.platform import kfp_runtime
    from pipelines import registry
    from pipelines.params import resolve

    func = registry()[name]
    path = kfp_runtime.compile_pipeline(func, out / f"{name}-{profile}.yaml", arguments=resolve(name, func, profile, {}))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from distillery.settings import get_settings

    out = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as mp:
        for var in [v for v in os.environ if v.startswith("DISTILLERY_")]:
            mp.delenv(var)
        mp.setenv("DISTILLERY_HOME", str(out / "home"))
        get_settings.cache_clear()
        yield {(n, p): _compile(n, p, out) for n in PIPELINES for p in ("cpu", "paper")}
    get_settings.cache_clear()


def _container_tasks(spec: dict):
    """(task name, task, component name) for every container task in every DAG, nested ones included."""
    comps = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in comps.values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            comp = comps[task["componentRef"]["name"]]
            if "executorLabel" in comp and "container" in spec["deploymentSpec"]["executors"][comp["executorLabel"]]:
                yield name, task, comp["executorLabel"]


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_every_task_is_configured_the_kubernetes_way(compiled, name, profile):
    from distillery.platform import pods
    from distillery.settings import get_settings

    s = get_settings()
    spec, platform = compiled[name, profile]
    executors = {k: v["container"] for k, v in spec["deploymentSpec"]["executors"].items() if "container" in v}
    assert executors and set(platform) == set(executors), "every container executor has a platform config"
    for label, container in executors.items():
        assert container["image"] == s.image, label
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env == {"DISTILLERY_IMAGE": s.image, "DISTILLERY_IMAGE_GPU": s.image_gpu}, label
        res = container["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert res.get(key), (label, key)

        k8s = platform[label]
        (cm,) = k8s["configMapAsEnv"]
        assert cm["configMapName"] == s.config_map == "distillery-config"
        assert {e["configMapKey"]: e["envVar"] for e in cm["keyToEnv"]} == pods.CONFIG_ENV
        secrets = {(e["secretName"], bool(e.get("optional"))): {k["secretKey"]: k["envVar"] for k in e["keyToEnv"]}
                   for e in k8s["secretAsEnv"]}
        assert secrets == {(s.credentials_secret, False): pods.SECRET_ENV,
                           (s.credentials_secret, True): pods.SECRET_ENV_OPTIONAL}
        assert int(k8s["activeDeadlineSeconds"]) > 0
        assert k8s["securityContext"] == {"runAsNonRoot": True, "runAsUser": "1000", "runAsGroup": "1000"}
        # the label the NetworkPolicies let through to PostgreSQL and MLflow (tests/test_manifests.py)
        assert k8s["podMetadata"]["labels"] == dict([pods.POD_LABEL]), label

    tasks = list(_container_tasks(spec))
    assert tasks
    for task_name, task, _ in tasks:
        retry = task.get("retryPolicy", {})
        assert retry.get("maxRetryCount", 0) >= 1 and retry.get("backoffDuration"), task_name


@pytest.mark.parametrize("name", PIPELINES)
def test_gpu_profile_requests_accelerators_on_compute_steps_only(compiled, name):
    from distillery.platform import pods

    for profile, gpu in (("cpu", False), ("paper", True)):
        spec, _ = compiled[name, profile]
        seen = set()
        for label, ex in spec["deploymentSpec"]["executors"].items():
            if "container" not in ex:
                continue
            step_name = re.sub(r"-[0-9]+$", "", label.removeprefix("exec-"))  # exec-distill-3 -> distill
            accel = ex["container"]["resources"].get("accelerator")
            want = gpu and step_name in pods.ACCELERATOR_STEPS
            assert bool(accel) == want, (profile, label)
            if accel:
                assert accel["resourceType"] == pods.ACCELERATOR and accel["resourceCount"] == "1"
                seen.add(step_name)
        assert bool(seen) == gpu, f"{name} {profile}: accelerator steps {seen}"


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_compiled_gates_are_the_profiles_real_thresholds(compiled, name, profile):
    from pipelines.params import PROFILES

    spec, _ = compiled[name, profile]
    params = spec["root"]["inputDefinitions"]["parameters"]
    gates = params["gate_thresholds"]["defaultValue"]
    assert gates == PROFILES[name][profile]["gate_thresholds"]
    assert gates != PROFILES[name]["smoke"]["gate_thresholds"]
    for metric, (kind, bound) in gates.items():
        # A bound that every model meets (fd < 1e9, accuracy > 0) would register anything.
        assert (kind == "max" and bound <= 100) or (kind == "min" and bound > 0), (metric, kind, bound)
    assert params["gpu"]["defaultValue"] is (profile == "paper")


def test_image_and_object_names_come_from_settings(tmp_path, home):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "DISTILLERY_HOME": str(home),
           "DISTILLERY_IMAGE": "registry.example/ml/distillery:1.2.3",
           "DISTILLERY_IMAGE_GPU": "registry.example/ml/distillery@sha256:" + "a" * 64,
           "DISTILLERY_IMAGE_DIGEST": "sha256:" + "d" * 64,
           "DISTILLERY_CONFIG_MAP": "my-config", "DISTILLERY_CREDENTIALS_SECRET": "my-creds"}
    out = subprocess.run([sys.executable, "-m", "distillery.cli", "compile", "tiny-sd", "--profile", "paper",
                          "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    spec, platform = yaml.safe_load_all((tmp_path / "tiny-sd.yaml").read_text())
    for label, ex in spec["deploymentSpec"]["executors"].items():
        c = ex["container"]
        assert c["image"] == "registry.example/ml/distillery:1.2.3"
        assert {"name": "DISTILLERY_IMAGE_GPU", "value": env["DISTILLERY_IMAGE_GPU"]} in c["env"]
        # The tag's digest reaches every task, so every run is tagged with the exact image it ran in.
        assert {"name": "DISTILLERY_IMAGE_DIGEST", "value": env["DISTILLERY_IMAGE_DIGEST"]} in c["env"]
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]
        assert k8s["configMapAsEnv"][0]["configMapName"] == "my-config"
        assert {e["secretName"] for e in k8s["secretAsEnv"]} == {"my-creds"}


def test_compile_refuses_the_smoke_profile(home, tmp_path):
    from typer.testing import CliRunner

    from distillery.cli import app

    for cmd in (["compile", "tiny-sd", "--out", str(tmp_path)],
                ["schedule", "tiny-sd", "--cron", "0 3 * * *", "--host", "http://127.0.0.1:1"]):
        r = CliRunner().invoke(app, [*cmd, "--profile", "smoke"])
        assert r.exit_code == 2 and "--profile cpu" in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_the_graph_the_local_runner_runs_has_no_retries(compiled, tmp_path):
    """The local runner honours retry policies: a failing local step must fail at once, not after minutes of
    backoff. Only the cluster build (compile, submit, schedule) carries them."""
    from kfp import compiler

    from pipelines import registry

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(registry()["tiny-sd"], str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    tasks = list(_container_tasks(spec))
    assert tasks and not any("retryPolicy" in task for _, task, _ in tasks)
    assert all("configMapAsEnv" in e for e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values())


def test_swift_diffusion_trains_its_addons_in_parallel_in_both_base_branches(compiled):
    from distillery.steps.swift_diffusion import ADDON_PARALLELISM

    spec, _ = compiled["swift-diffusion", "cpu"]
    comps = spec["components"]
    loops = {n: c["dag"] for n, c in comps.items() if "dag" in c and any(
        t["componentRef"]["name"].startswith("comp-train-addon") for t in c["dag"]["tasks"].values())}
    assert len(loops) == 2  # a trained base and an imported one (base_uri) run the same add-on DAG
    for dag in loops.values():
        names = {re.sub(r"-[0-9]+$", "", t["componentRef"]["name"]) for t in dag["tasks"].values()}
        assert names == {"comp-train-addon", "comp-evaluate-addon"}
    iterators = [t for c in comps.values() if "dag" in c for t in c["dag"]["tasks"].values()
                 if "parameterIterator" in t]
    assert len(iterators) == 2 and all(t["iteratorPolicy"]["parallelismLimit"] == ADDON_PARALLELISM
                                       for t in iterators)
    assert any(e.get("importer") for e in spec["deploymentSpec"]["executors"].values())
    deploys = [t for c in comps.values() if "dag" in c for t in c["dag"]["tasks"].values()
               if t["componentRef"]["name"].startswith("comp-deploy")]
    assert deploys and all(t["inputs"]["parameters"]["kind"]["runtimeValue"]["constant"] == "swift-diffusion"
                           for t in deploys)
