"""InferenceService rendering from the kserve SDK's typed models, YAML round trip, and apply with and without a cluster."""

from __future__ import annotations

import pytest
import yaml


@pytest.fixture
def k8s(home):
    from distillery.platform import k8s

    return k8s


def test_renders_a_non_root_predictor_with_storage_uri_and_resources(k8s):
    obj = k8s.render_inference_service("tiny-sd", "s3://models/tiny-sd/3/model", image="distillery:1.0",
                                       namespace="ml", args=["--kind", "text-to-image"])
    assert obj["apiVersion"] == "serving.kserve.io/v1beta1" and obj["kind"] == "InferenceService"
    meta = {k: v for k, v in obj["metadata"].items() if k != "annotations"}
    assert meta == {"name": "tiny-sd", "namespace": "ml",
                    "labels": {"app.kubernetes.io/part-of": "distillery", "distillery/model": "tiny-sd"}}
    pred = obj["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"] == {"name": "distillery-diffusers"} and model["runtime"] == "distillery"
    assert model["storageUri"] == "s3://models/tiny-sd/3/model"
    assert model["image"] == "distillery:1.0" and model["args"] == ["--kind", "text-to-image"]
    assert pred["serviceAccountName"] == "distillery-models" and pred["minReplicas"] == 1
    assert model["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True, "runAsUser": 1000}
    assert model["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pred["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert pred["securityContext"]["runAsNonRoot"] is True and pred["securityContext"]["runAsUser"] == 1000
    res = model["resources"]
    assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"cpu", "memory"}
    assert "nvidia.com/gpu" not in res["limits"]


def test_gpu_and_custom_resources_and_defaults_from_settings(k8s, monkeypatch):
    from distillery.settings import get_settings

    monkeypatch.setenv("DISTILLERY_IMAGE", "registry.example/distillery:cuda")
    monkeypatch.setenv("DISTILLERY_NAMESPACE", "prod")
    get_settings.cache_clear()
    custom = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    obj = k8s.render_inference_service("tiny-sd", "s3://b/m", resources=custom, gpu=True, min_replicas=0,
                                       runtime="other", model_format="fmt", service_account="sa")
    model = obj["spec"]["predictor"]["model"]
    assert model["image"] == "registry.example/distillery:cuda" and obj["metadata"]["namespace"] == "prod"
    assert model["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                  "limits": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}}
    assert custom["limits"] == {"cpu": "1", "memory": "2Gi"}, "the caller's dict must not be mutated"
    assert obj["spec"]["predictor"]["minReplicas"] == 0 and obj["spec"]["predictor"]["serviceAccountName"] == "sa"
    assert model["runtime"] == "other" and model["modelFormat"]["name"] == "fmt"
    # Scale to zero is Knative's (Serverless), which routes one port: REST only, no RawDeployment annotation.
    assert model["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert "annotations" not in obj["metadata"]


def test_rendered_service_declares_rest_and_grpc_like_the_reviewed_manifests(k8s):
    from pathlib import Path

    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/1/model")
    reviewed = yaml.safe_load((Path(__file__).resolve().parents[1] / "manifests/inference/tiny-sd.yaml").read_text())
    assert obj["spec"]["predictor"]["model"]["ports"] == reviewed["spec"]["predictor"]["model"]["ports"]
    assert obj["metadata"]["annotations"] == reviewed["metadata"]["annotations"]
    runtime = yaml.safe_load((Path(__file__).resolve().parents[1] / "manifests/base/servingruntime.yaml").read_text())
    args = runtime["spec"]["containers"][0]["args"]
    assert f"--http-port={k8s.REST_PORT}" in args and f"--grpc-port={k8s.GRPC_PORT}" in args


@pytest.mark.parametrize("name,uri,replicas,match", [
    ("Tiny_SD", "s3://b/m", 1, "DNS-1123"),
    ("tiny-sd", "", 1, "storage_uri is empty"),
    ("tiny-sd", "s3://b/m", -1, "min_replicas"),
])
def test_bad_input_is_refused_with_a_clear_message(k8s, name, uri, replicas, match):
    with pytest.raises(ValueError, match=match):
        k8s.render_inference_service(name, uri, min_replicas=replicas)


def test_yaml_round_trip_and_the_object_matches_the_kserve_model(k8s):
    import kserve

    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/1/model", gpu=True)
    text = k8s.to_yaml(obj)
    assert text.startswith("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n")
    assert yaml.safe_load(text) == obj

    # Every key must be a field of the SDK's typed models (a misspelt key would be silently ignored by KServe).
    unknown = _unknown_keys(obj, kserve.V1beta1InferenceService)
    assert unknown == []
    assert _unknown_keys({"spec": {"predictor": {"modle": {}}}}, kserve.V1beta1InferenceService) == [
        "V1beta1PredictorSpec.modle"]


def _unknown_keys(data, cls) -> list[str]:
    """Walk a plain dict against the swagger-generated types of kserve and kubernetes models."""
    import re

    import kubernetes.client

    import kserve

    if isinstance(cls, str):
        if m := re.fullmatch(r"list\[(.*)\]", cls):
            return [u for item in data for u in _unknown_keys(item, m.group(1))]
        if m := re.fullmatch(r"dict\(([^,]*), (.*)\)", cls):
            return [u for v in data.values() for u in _unknown_keys(v, m.group(2))]
        cls = getattr(kserve, cls, None) or getattr(kubernetes.client, cls, None)
        if cls is None:  # a primitive type
            return []
    by_json = {v: k for k, v in cls.attribute_map.items()}
    out = []
    for key, value in data.items():
        if key not in by_json:
            out.append(f"{cls.__name__}.{key}")
        else:
            out += _unknown_keys(value, cls.openapi_types[by_json[key]])
    return out


class FakeApiServer:
    """A tiny Kubernetes API on 127.0.0.1 answering the CustomObjects calls for InferenceServices."""

    def __init__(self, *, exists=False, fail_status=None, ready_after=1):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.exists, self.fail_status, self.ready_after = exists, fail_status, ready_after
        self.requests, self.gets = [], 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                      self.headers.get("Content-Type"), body))
                return body

            def do_POST(self):
                body = self._record()
                if fake.fail_status:
                    return self._send(fake.fail_status, {"kind": "Status", "reason": "Forbidden", "code": fake.fail_status})
                if fake.exists:
                    return self._send(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                fake.exists = True
                self._send(201, body)

            def do_PATCH(self):
                self._send(200, self._record())

            def do_GET(self):
                self._record()
                fake.gets += 1
                ready = fake.ready_after is not None and fake.gets >= fake.ready_after
                cond = {"type": "Ready", "status": "True"} if ready else \
                    {"type": "Ready", "status": "False", "reason": "RevisionMissing", "message": "pulling image"}
                self._send(200, {"metadata": {"name": "tiny-sd"},
                                 "status": {"url": "http://tiny-sd.ml.example", "conditions": [cond]}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_server(monkeypatch, tmp_path):
    """Starts a FakeApiServer; the pod's ServiceAccount token is loaded by the kubernetes client's own in-cluster
    loader (its https URL swapped for the fake's http one); no kubeconfig exists."""
    import kubernetes
    from kubernetes.client import Configuration
    from kubernetes.config import incluster_config, kube_config

    servers = []
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "no-kubeconfig"))

    def start(in_pod=True, **kw):
        server = FakeApiServer(**kw)
        servers.append(server)
        if in_pod:
            (tmp_path / "token").write_text("sa-token")
            (tmp_path / "ca.crt").write_text("unused: the fake speaks http")
            port = server.server.server_address[1]

            def load_incluster_config():
                incluster_config.InClusterConfigLoader(
                    token_filename=str(tmp_path / "token"), cert_filename=str(tmp_path / "ca.crt"), try_refresh_token=False,
                    environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)},
                ).load_and_set()
                c = Configuration.get_default_copy()
                c.host = server.url
                Configuration.set_default(c)

            monkeypatch.setattr(kubernetes.config, "load_incluster_config", load_incluster_config)
        return server

    yield start
    for server in servers:
        server.close()
    Configuration.set_default(None)


ISVC_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices"


def test_deploy_in_a_pod_applies_with_the_service_account_and_waits_until_ready(k8s, api_server):
    server = api_server(ready_after=3)
    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/1/model", namespace="ml")
    result = k8s.deploy(obj, mode="apply", timeout_s=30)
    assert result["mode"] == "apply" and result["url"] == "http://tiny-sd.ml.example"
    assert result["status"].startswith("created InferenceService ml/tiny-sd via the pod's service account")
    method, path, auth, _, body = server.requests[0]
    assert (method, path, auth.lower()) == ("POST", ISVC_PATH, "bearer sa-token")
    assert body == obj
    assert [r[0] for r in server.requests] == ["POST", "GET", "GET", "GET"]


def test_deploy_patches_an_existing_service(k8s, api_server):
    server = api_server(exists=True)
    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/2/model", namespace="ml")
    assert k8s.deploy(obj, mode="apply", timeout_s=30)["status"].startswith("updated InferenceService ml/tiny-sd")
    assert [(r[0], r[1]) for r in server.requests[:2]] == [("POST", ISVC_PATH), ("PATCH", f"{ISVC_PATH}/tiny-sd")]
    assert server.requests[1][3] == "application/merge-patch+json"


def test_deploy_fails_saying_why_when_it_cannot_apply(k8s, api_server, monkeypatch):
    obj = k8s.render_inference_service("tiny-sd", "s3://b/m", namespace="ml")
    api_server(fail_status=403)
    with pytest.raises(k8s.DeployError, match="HTTP 403.*pipeline-runner ServiceAccount.*rbac.yaml"):
        k8s.deploy(obj, mode="apply", timeout_s=5)


def test_deploy_outside_a_cluster_fails_unless_render_is_asked_for(k8s, api_server, home):
    api_server(in_pod=False)  # neither a ServiceAccount nor a kubeconfig
    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/1/model")
    with pytest.raises(k8s.DeployError, match="no cluster credentials.*DISTILLERY_DEPLOY_MODE=render"):
        k8s.deploy(obj, mode="apply")
    result = k8s.deploy(obj)  # the embedded default is render
    written = home / "manifests" / "tiny-sd.yaml"
    assert result["mode"] == "render" and result["status"].startswith("rendered, not applied")
    assert str(written) in result["status"] and yaml.safe_load(written.read_text()) == obj
    local = k8s.render_inference_service("tiny-sd", str(home / "models" / "1"))
    assert "storageUri is a local path" in k8s.deploy(local)["status"]
    with pytest.raises(ValueError, match="'apply' or 'render'"):
        k8s.deploy(obj, mode="dry")


def test_deploy_times_out_with_the_services_conditions(k8s, api_server):
    api_server(ready_after=None)
    obj = k8s.render_inference_service("tiny-sd", "s3://b/m", namespace="ml")
    k8s.apply(obj)
    with pytest.raises(k8s.DeployError, match=r"not Ready after 0.5s \(Ready=False RevisionMissing pulling image\)"):
        k8s.wait_ready("tiny-sd", "ml", timeout_s=0.5, poll_s=0.1)


def test_a_named_context_is_used_over_the_pod(k8s, api_server, tmp_path, monkeypatch):
    from kubernetes.config import kube_config

    server = api_server(in_pod=False)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "c", "cluster": {"server": server.url}}],
        "users": [{"name": "u", "user": {"token": "ctx-token"}}],
        "contexts": [{"name": "kind-distillery", "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "nowhere", "user": "u"}}]}))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    obj = k8s.render_inference_service("tiny-sd", "s3://b/m", namespace="ml")
    assert k8s.apply(obj, context="kind-distillery") == "created InferenceService ml/tiny-sd via context kind-distillery"
    assert server.requests[0][2].lower() == "bearer ctx-token"


def test_apply_refuses_other_kinds(k8s):
    with pytest.raises(ValueError, match="InferenceService objects only"):
        k8s.apply({"kind": "Deployment", "metadata": {"name": "x"}})
    with pytest.raises(ValueError, match="metadata.name"):
        k8s.apply({"kind": "InferenceService"})


@pytest.mark.parametrize("gpu", [False, True])
def test_the_deploy_step_uses_the_settings_image_and_says_what_happened(k8s, api_server, home, monkeypatch, tmp_path,
                                                                         gpu):
    from distillery.platform import registry
    from distillery.settings import get_settings
    from distillery.steps import release

    monkeypatch.setenv("DISTILLERY_IMAGE", "registry.example/ml/distillery:1.0")
    monkeypatch.setenv("DISTILLERY_IMAGE_GPU", "registry.example/ml/distillery:1.0-cuda")
    monkeypatch.setenv("DISTILLERY_NAMESPACE", "ml")
    monkeypatch.setenv("DISTILLERY_DEPLOY_MODE", "apply")
    get_settings.cache_clear()
    monkeypatch.setattr(registry, "storage_uri", lambda name, version: f"s3://b/artifacts/1/run/artifacts/model-{version}")
    monkeypatch.setattr(release, "_log_text", lambda text, name: None)
    server = api_server()
    out = release.deploy(model_name="tiny-sd", version="4", kind="text-to-image", gpu=gpu,
                         manifest_path=str(tmp_path / "manifest.md"))
    assert out["mode"] == "apply" and out["applied"] == 1.0 and "Ready at http://tiny-sd.ml.example" in out["status"]
    model = server.requests[0][4]["spec"]["predictor"]["model"]
    assert model["image"] == ("registry.example/ml/distillery:1.0-cuda" if gpu else "registry.example/ml/distillery:1.0")
    assert model["storageUri"] == "s3://b/artifacts/1/run/artifacts/model-4"
    assert (tmp_path / "manifest.md").read_text().startswith("# tiny-sd v4: apply")
