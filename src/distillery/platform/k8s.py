"""Kubernetes: InferenceService rendering with the kserve SDK's typed models, applied when a cluster is configured."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from distillery.settings import get_settings

ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# KServe derives Service and host names from the InferenceService name, so it must be a DNS-1123 label.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def _resources(gpu: bool, resources: dict | None):
    from kubernetes.client import V1ResourceRequirements

    r = resources or {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    if gpu:
        r = {"requests": dict(r["requests"]), "limits": {**r["limits"], "nvidia.com/gpu": "1"}}
    return V1ResourceRequirements(requests=r["requests"], limits=r["limits"])


def render_inference_service(name: str, storage_uri: str, *, image: str | None = None, namespace: str | None = None,
                             runtime: str = "distillery", model_format: str = "distillery-diffusers",
                             resources: dict | None = None, gpu: bool = False,
                             service_account: str = "distillery-models", min_replicas: int = 1,
                             args: list[str] | None = None) -> dict:
    """An InferenceService for one registered model version, as a plain dict ready for YAML or the API."""
    from kserve import (V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1ModelFormat, V1beta1ModelSpec,
                        V1beta1PredictorSpec)
    from kubernetes.client import ApiClient, V1ObjectMeta, V1PodSecurityContext, V1SecurityContext

    if not _DNS_LABEL.match(name):
        raise ValueError(f"InferenceService name {name!r} is not a DNS-1123 label: use lower-case letters, digits and "
                         "'-', starting with a letter, at most 63 characters (e.g. 'tiny-sd')")
    if not storage_uri:
        raise ValueError("storage_uri is empty: pass the registered model directory, e.g. s3://bucket/tiny-sd/3/model")
    if min_replicas < 0:
        raise ValueError(f"min_replicas must be >= 0 (0 lets KServe scale to zero), got {min_replicas}")
    s = get_settings()
    model = V1beta1ModelSpec(
        name="kserve-container", model_format=V1beta1ModelFormat(name=model_format), runtime=runtime, storage_uri=storage_uri,
        image=image or s.image, args=args or [], resources=_resources(gpu, resources),
        security_context=V1SecurityContext(run_as_non_root=True, run_as_user=1000, allow_privilege_escalation=False,
                                           read_only_root_filesystem=False))
    isvc = V1beta1InferenceService(
        api_version=f"{ISVC_GROUP}/{ISVC_VERSION}", kind="InferenceService",
        metadata=V1ObjectMeta(name=name, namespace=namespace or s.namespace,
                              labels={"app.kubernetes.io/part-of": "distillery", "distillery/model": name}),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(
            model=model, service_account_name=service_account, min_replicas=min_replicas,
            security_context=V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, fs_group=1000))))
    return ApiClient().sanitize_for_serialization(isvc)


def to_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


def apply(obj: dict, context: str | None = None) -> str:
    """Create or patch the object on the configured cluster; without one, write the manifest and say so."""
    if not isinstance(obj, dict) or not obj.get("metadata", {}).get("name"):
        raise ValueError("apply() needs a manifest dict with metadata.name: pass render_inference_service(...)'s result")
    if obj.get("kind") != "InferenceService":
        raise ValueError(f"apply() handles InferenceService objects only, got kind {obj.get('kind')!r}; "
                         "apply other resources with 'kubectl apply -k manifests/overlays/...'")
    s = get_settings()
    context = context or s.kube_context
    name, ns = obj["metadata"]["name"], obj["metadata"].get("namespace", s.namespace)
    if not context:
        out = s.home_abs / "manifests" / f"{name}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_yaml(obj))
        uri = obj.get("spec", {}).get("predictor", {}).get("model", {}).get("storageUri", "")
        note = "" if "://" in uri else " (its storageUri is a local path: set DISTILLERY_ARTIFACT_LOCATION=s3://... for a cluster)"
        return f"no cluster configured (DISTILLERY_KUBE_CONTEXT unset); rendered manifest written to {out}{note}"
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config.load_kube_config(context=context)
    api = client.CustomObjectsApi()
    try:
        api.create_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, obj)
        return f"created InferenceService {ns}/{name} on {context}"
    except ApiException as e:
        if e.status != 409:
            raise
        api.patch_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, name, obj)
        return f"updated InferenceService {ns}/{name} on {context}"


def write_manifest(obj: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(obj))
    return path
