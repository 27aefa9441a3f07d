"""Kubernetes: kustomize overlays render, core resources validate, every container is non-root with limits and
(where the process allows it) a read-only root filesystem, NetworkPolicies admit only the intended clients, the
MLflow server runs its basic-auth app with credentials from Secrets, no credential is written down, the Dockerfile
builds the one non-root image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
CRDS = {"InferenceService", "ServingRuntime"}


def render(overlay: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(REPO / "manifests" / "overlays" / overlay)], capture_output=True,
                         text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_specs(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "ServingRuntime":
        return [doc["spec"]]
    if kind == "InferenceService":
        p = doc["spec"]["predictor"]
        return [{"containers": [p["model"]], "securityContext": p.get("securityContext", {})}]
    return []


@pytest.fixture(scope="module", params=["local", "gpu"])
def docs(request):
    return request.param, render(request.param)


def test_core_resources_validate_against_the_kubernetes_schema(docs):
    _, objs = docs
    kinds = {d["kind"] for d in objs}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "Role", "RoleBinding", "ServiceAccount",
            "ConfigMap", "ServingRuntime", "InferenceService", "NetworkPolicy"} <= kinds
    for d in objs:
        if d["kind"] not in CRDS:
            kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_every_container_runs_as_non_root_with_resource_limits(docs):
    _, objs = docs
    seen = 0
    for d in objs:
        for spec in pod_specs(d):
            pod_ctx = spec.get("securityContext", {})
            for c in spec["containers"]:
                seen += 1
                ctx = {**pod_ctx, **c.get("securityContext", {})}
                assert ctx.get("runAsNonRoot") is True, (d["kind"], d["metadata"]["name"])
                assert ctx.get("runAsUser", 0) != 0
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
                limits = c.get("resources", {}).get("limits", {})
                assert "cpu" in limits and "memory" in limits, (d["kind"], d["metadata"]["name"])
    assert seen >= 4


def _volumes(doc: dict) -> dict[str, dict]:
    kind = doc["kind"]
    spec = (doc["spec"]["template"]["spec"] if kind in ("Deployment", "StatefulSet") else
            doc["spec"]["predictor"] if kind == "InferenceService" else doc["spec"])
    return {v["name"]: v for v in spec.get("volumes", [])}


def test_read_only_root_filesystems_with_a_writable_tmp_and_no_capabilities(docs):
    """MLflow, PostgreSQL and every predictor write only to their volumes; pipeline steps (KFP's launcher writes
    its outputs inside the container) are the exception, configured in platform/pods.py."""
    _, objs = docs
    checked = set()
    for d in objs:
        for spec in pod_specs(d):
            volumes = _volumes(d)
            for c in spec["containers"]:
                ctx = c.get("securityContext", {})
                name = (d["kind"], d["metadata"]["name"])
                assert ctx.get("readOnlyRootFilesystem") is True, name
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], name
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], name
                if d["kind"] != "ServingRuntime":  # its pod-level context is the InferenceService's
                    assert spec["securityContext"].get("seccompProfile") == {"type": "RuntimeDefault"}, name
                checked.add(name)
    assert {("Deployment", "mlflow"), ("StatefulSet", "postgres"), ("ServingRuntime", "distillery"),
            ("InferenceService", "tiny-sd"), ("InferenceService", "mode")} <= checked


def _selects(selector: dict, labels: dict) -> bool:
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"Exists": has, "DoesNotExist": not has, "In": value in e.get("values", []),
              "NotIn": value not in e.get("values", [])}[e["operator"]]
        if not ok:
            return False
    return True


def admitted(policies: list[dict], target_ns: str, target: dict, source_ns: str, source: dict, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod no policy selects takes everything; a selected pod takes a connection
    when some rule of a selecting policy matches its source (pod and/or namespace selectors) and port."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target_ns
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and _selects(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            if rule.get("ports") and not any(r.get("port") == port for r in rule["ports"]):
                continue
            for peer in rule.get("from", [{}]):
                pod_ok = "podSelector" not in peer or _selects(peer["podSelector"], source)
                ns_ok = (_selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_ns})
                         if "namespaceSelector" in peer else source_ns == target_ns)
                if pod_ok and ns_ok:
                    return True
    return False


def test_network_policies_admit_only_the_intended_clients(docs):
    from distillery.platform import pods

    _, objs = docs
    policies = [d for d in objs if d["kind"] == "NetworkPolicy"]
    workloads = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                 for d in objs if d["kind"] in ("Deployment", "StatefulSet")}
    isvc = next(d for d in objs if d["kind"] == "InferenceService")
    # KServe labels the predictor's pods with their InferenceService; pipeline pods get pods.POD_LABEL.
    predictor = {**isvc["metadata"].get("labels", {}), "serving.kserve.io/inferenceservice": isvc["metadata"]["name"],
                 "component": "predictor"}
    mlflow, postgres, step = workloads["mlflow"], workloads["postgres"], dict([pods.POD_LABEL])
    ns = "distillery"
    cases = [  # (target, port, source namespace, source labels, admitted?)
        (predictor, 8080, "istio-system", {"app": "istio-ingressgateway"}, True),
        (predictor, 8080, ns, step, False),
        (predictor, 8080, ns, mlflow, False),
        (predictor, 8080, "default", {}, False),
        (postgres, 5432, ns, mlflow, True),
        (postgres, 5432, ns, step, True),
        (postgres, 5432, ns, predictor, False),
        (postgres, 5432, "istio-system", {}, False),
        (postgres, 5432, "kubeflow", step, False),  # the label alone does not open it from another namespace
        (postgres, 22, ns, mlflow, False),
        (mlflow, 5000, ns, step, True),
        (mlflow, 5000, "istio-system", {}, True),  # the UI through the ingress
        (mlflow, 5000, ns, predictor, False),
        ({"app": "anything-else"}, 80, ns, step, False),  # the namespace's default is deny
    ]
    for target, port, src_ns, src, expected in cases:
        assert admitted(policies, ns, target, src_ns, src, port) is expected, (target, port, src_ns, src)


def test_mlflow_runs_basic_auth_with_credentials_from_secrets(docs):
    import configparser

    _, objs = docs
    (deploy,) = [d for d in objs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["bash", "mlflow/start-server.sh"]  # it adds --app-name basic-auth when configured
    env = {e["name"]: e for e in c["env"]}
    path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    for name, secret in (("MLFLOW_AUTH_ADMIN_PASSWORD", "distillery-mlflow-auth"),
                         ("MLFLOW_FLASK_SERVER_SECRET_KEY", "distillery-mlflow-auth"),
                         ("PGPASSWORD", "distillery-postgres")):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret, name
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
    cm_name = _volumes(deploy)[mount["name"]]["configMap"]["name"]
    (cm,) = [d for d in objs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
    ours, template = configparser.ConfigParser(), configparser.ConfigParser()
    ours.read_string(cm["data"][path.name])
    template.read_string((REPO / "mlflow" / "basic_auth.ini.template").read_text())
    uri = ours["mlflow"].pop("database_uri")
    template["mlflow"].pop("database_uri")
    assert dict(ours["mlflow"]) == dict(template["mlflow"]), "the cluster's auth config drifted from the template"
    assert re.fullmatch(r"postgresql\+psycopg2://distillery@postgres\.distillery\.svc:5432/(\w+)", uri), uri
    db = uri.rsplit("/", 1)[1]
    (init,) = [d for d in objs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "postgres-init"]
    assert any(f"CREATE DATABASE {db} OWNER distillery" in sql for sql in init["data"].values())
    readme = (REPO / "manifests" / "README.md").read_text()
    assert "create secret generic distillery-mlflow-auth" in readme
    assert all(f"--from-literal={k}=" in readme for k in ("admin-password", "flask-secret-key"))


def test_gpu_overlay_asks_for_gpus_and_local_does_not(docs):
    overlay, objs = docs
    isvc = next(d for d in objs if d["kind"] == "InferenceService")
    gpu = isvc["spec"]["predictor"]["model"]["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == "1") == (overlay == "gpu")
    image = next(d for d in objs if d["kind"] == "ServingRuntime")["spec"]["containers"][0]["image"]
    assert image == ("distillery:cuda" if overlay == "gpu" else "distillery:local")


def test_no_credentials_are_written_down():
    secretish = re.compile(r"(password|secret|access[-_]?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{6,}", re.I)
    for path in (REPO / "manifests").rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if "secretKeyRef" in line or line.strip().startswith(("name:", "key:", "- name:", "#")):
                continue
            assert not secretish.search(line), f"{path.name}: {line}"
    for d in render("local"):
        assert d["kind"] != "Secret", "Secrets are created by the operator, not shipped"
        for spec in pod_specs(d):
            for c in spec["containers"]:
                for env in c.get("env", []):
                    if re.search(r"PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                        assert "valueFrom" in env, env


def test_dockerfile_is_one_non_root_image_with_a_cuda_build_arg():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text
    assert re.search(r"^USER 1000$", text, re.M)
    # CPU: every pinned wheel from the host-made wheelhouse, nothing from the network. The wheelhouse is only
    # bind-mounted into the install steps (never a layer), each keyed by a hash of what it installs (the build
    # caches a RUN by its text and args, not by its mounts), and pip leaves the venv after the last install.
    assert re.search(r"pip install -q --no-index --no-deps /wheelhouse/\*\.whl", text)
    assert not re.search(r"^(COPY|ADD) .*wheelhouse/(deps|project)", text, re.M)
    for mount, key in [("wheelhouse/deps", "DEPS_HASH"), ("wheelhouse/project", "PROJECT_HASH")]:
        run = text[text.index(f"--mount=type=bind,source={mount}"):]
        run = run[:run.index("\n\n")]
        assert f"${{{key}}}" in run and re.search(rf"^ARG {key}=", text, re.M), mount
    assert text.rindex("pip uninstall -q -y pip wheel") > text.rindex("pip install")  # setuptools: torch.compile
    build = (REPO / "scripts" / "container" / "build_image.sh").read_text()
    assert '--build-arg DEPS_HASH="$deps_hash"' in build and '--build-arg PROJECT_HASH="$inputs_hash"' in build
    assert not re.search(r"^(ENV|ARG) .*(PASSWORD|SECRET|ACCESS_KEY)", text, re.M | re.I)
    assert (REPO / "constraints.txt").exists()


def test_dockerfile_lets_the_torch_index_pick_the_wheel_variant(tmp_path):
    """The sed in the Dockerfile drops only local labels (+cpu) from torch pins; every other pin is kept verbatim."""
    text = (REPO / "Dockerfile").read_text()
    m = re.search(r"sed -Ei '([^']+)' /tmp/constraints\.txt", text)
    assert m, "the Dockerfile should derive its constraints from constraints.txt with sed"
    sample = "torch==2.13.0+cpu\ntorchvision==0.28.0+cu128\ntorch-pruning==1.6.1\nmlflow==3.1.0\n"
    out = subprocess.run(["sed", "-E", m.group(1)], input=sample, capture_output=True, text=True, check=True).stdout
    assert out == "torch==2.13.0\ntorchvision==0.28.0\ntorch-pruning==1.6.1\nmlflow==3.1.0\n"
    real = (REPO / "constraints.txt").read_text()
    relaxed = subprocess.run(["sed", "-E", m.group(1)], input=real, capture_output=True, text=True, check=True).stdout
    assert "+" not in "".join(line for line in relaxed.splitlines() if line.startswith("torch"))
    assert len(relaxed.splitlines()) == len(real.splitlines())
    assert "python3.11 -m venv /opt/venv" in text and "ENV PATH=/opt/venv/bin:$PATH" in text


def test_the_configmap_holds_every_key_the_pipeline_pods_read(docs):
    from distillery.platform import pods

    _, rendered = docs
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "distillery-config"]
    assert set(pods.CONFIG_ENV) <= set(cm["data"]), set(pods.CONFIG_ENV) - set(cm["data"])
    assert cm["data"]["DISTILLERY_DEPLOY_MODE"] == "apply", "in the cluster the deploy step applies (and fails loudly)"
    assert not set(pods.SECRET_ENV) & set(cm["data"]), "credentials belong in the Secret"
    secret_doc = (REPO / "manifests" / "README.md").read_text()
    assert "create secret generic distillery-credentials" in secret_doc
    assert all(f"--from-literal={k}=" in secret_doc for k in pods.SECRET_ENV)
