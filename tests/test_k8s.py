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
    assert obj["metadata"] == {"name": "tiny-sd", "namespace": "ml",
                               "labels": {"app.kubernetes.io/part-of": "distillery", "distillery/model": "tiny-sd"}}
    pred = obj["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"] == {"name": "distillery-diffusers"} and model["runtime"] == "distillery"
    assert model["storageUri"] == "s3://models/tiny-sd/3/model"
    assert model["image"] == "distillery:1.0" and model["args"] == ["--kind", "text-to-image"]
    assert pred["serviceAccountName"] == "distillery-models" and pred["minReplicas"] == 1
    assert model["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                                        "runAsNonRoot": True, "runAsUser": 1000}
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


def test_apply_without_a_cluster_writes_the_manifest_and_never_connects(k8s, home, monkeypatch):
    import kubernetes

    def boom(*a, **kw):
        raise AssertionError("must not touch a cluster when none is configured")

    monkeypatch.setattr(kubernetes.config, "load_kube_config", boom)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", boom)
    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/1/model")
    status = k8s.apply(obj)
    written = home / "manifests" / "tiny-sd.yaml"
    assert status.startswith("no cluster configured") and str(written) in status
    assert yaml.safe_load(written.read_text()) == obj
    local = k8s.render_inference_service("tiny-sd", str(home / "models" / "1"))
    assert "storageUri is a local path" in k8s.apply(local)


class _FakeApi:
    def __init__(self, exists: bool, fail_status: int | None = None):
        self.exists, self.fail_status, self.calls = exists, fail_status, []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        from kubernetes.client.rest import ApiException

        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.fail_status:
            raise ApiException(status=self.fail_status, reason="Forbidden")
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("patch", group, version, namespace, plural, name))


@pytest.mark.parametrize("exists", [False, True])
def test_apply_with_a_context_creates_or_patches(k8s, monkeypatch, exists):
    import kubernetes

    from distillery.settings import get_settings

    monkeypatch.setenv("DISTILLERY_KUBE_CONTEXT", "kind-distillery")
    get_settings.cache_clear()
    api, contexts = _FakeApi(exists), []
    monkeypatch.setattr(kubernetes.config, "load_kube_config", lambda context=None: contexts.append(context))
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda: api)
    obj = k8s.render_inference_service("tiny-sd", "s3://b/tiny-sd/2/model", namespace="ml")
    status = k8s.apply(obj)
    assert contexts == ["kind-distillery"]
    target = ("serving.kserve.io", "v1beta1", "ml", "inferenceservices", "tiny-sd")
    if exists:
        assert api.calls == [("create", *target), ("patch", *target)]
        assert status == "updated InferenceService ml/tiny-sd on kind-distillery"
    else:
        assert api.calls == [("create", *target)]
        assert status == "created InferenceService ml/tiny-sd on kind-distillery"


def test_apply_surfaces_api_errors_and_refuses_other_kinds(k8s, monkeypatch):
    import kubernetes
    from kubernetes.client.rest import ApiException

    api = _FakeApi(exists=False, fail_status=403)
    monkeypatch.setattr(kubernetes.config, "load_kube_config", lambda context=None: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda: api)
    obj = k8s.render_inference_service("tiny-sd", "s3://b/m")
    with pytest.raises(ApiException):
        k8s.apply(obj, context="ctx")
    assert [c[0] for c in api.calls] == ["create"], "only a conflict (409) falls back to patch"
    with pytest.raises(ValueError, match="InferenceService objects only"):
        k8s.apply({"kind": "Deployment", "metadata": {"name": "x"}})
    with pytest.raises(ValueError, match="metadata.name"):
        k8s.apply({"kind": "InferenceService"})
