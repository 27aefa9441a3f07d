"""Kubernetes: InferenceService rendering with the kserve SDK's typed models; applied (in a pod with its
ServiceAccount) and awaited until Ready, or only rendered when DISTILLERY_DEPLOY_MODE=render."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from distillery.settings import get_settings

ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# KServe derives Service and host names from the InferenceService name, so it must be a DNS-1123 label.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
REST_PORT, GRPC_PORT = 8080, 8081  # the ServingRuntime's --http-port and --grpc-port (manifests/base)


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
    """An InferenceService for one registered model version, as a plain dict ready for YAML or the API.

    With replicas (min_replicas >= 1) it is a RawDeployment declaring REST (8080) and V2 gRPC (8081), as the
    manifests under manifests/inference do. Scale to zero (min_replicas=0) needs KServe's Serverless mode, and
    Knative routes one port per container: REST only, gRPC is not exposed."""
    from kserve import (V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1ModelFormat, V1beta1ModelSpec,
                        V1beta1PredictorSpec)
    from kubernetes.client import (ApiClient, V1Capabilities, V1ContainerPort, V1EmptyDirVolumeSource, V1ObjectMeta,
                                   V1PodSecurityContext, V1SeccompProfile, V1SecurityContext, V1Volume, V1VolumeMount)

    if not _DNS_LABEL.match(name):
        raise ValueError(f"InferenceService name {name!r} is not a DNS-1123 label: use lower-case letters, digits and "
                         "'-', starting with a letter, at most 63 characters (e.g. 'tiny-sd')")
    if not storage_uri:
        raise ValueError("storage_uri is empty: pass the registered model directory, e.g. s3://bucket/tiny-sd/3/model")
    if min_replicas < 0:
        raise ValueError(f"min_replicas must be >= 0 (0 lets KServe scale to zero), got {min_replicas}")
    s = get_settings()
    raw = min_replicas > 0
    ports = [V1ContainerPort(name="http1", container_port=REST_PORT, protocol="TCP")]
    if raw:
        ports.append(V1ContainerPort(name="grpc", container_port=GRPC_PORT, protocol="TCP"))
    model = V1beta1ModelSpec(
        name="kserve-container", model_format=V1beta1ModelFormat(name=model_format), runtime=runtime, storage_uri=storage_uri,
        image=image or s.image, args=args or [], resources=_resources(gpu, resources), ports=ports,
        # The predictor writes only /tmp (its own volume) and reads /mnt/models (KServe's), as manifests/inference.
        security_context=V1SecurityContext(run_as_non_root=True, run_as_user=1000, allow_privilege_escalation=False,
                                           read_only_root_filesystem=True, capabilities=V1Capabilities(drop=["ALL"])),
        volume_mounts=[V1VolumeMount(name="tmp", mount_path="/tmp")])
    isvc = V1beta1InferenceService(
        api_version=f"{ISVC_GROUP}/{ISVC_VERSION}", kind="InferenceService",
        metadata=V1ObjectMeta(name=name, namespace=namespace or s.namespace,
                              labels={"app.kubernetes.io/part-of": "distillery", "distillery/model": name},
                              annotations={"serving.kserve.io/deploymentMode": "RawDeployment"} if raw else None),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(
            model=model, service_account_name=service_account, min_replicas=min_replicas,
            volumes=[V1Volume(name="tmp", empty_dir=V1EmptyDirVolumeSource())],
            security_context=V1PodSecurityContext(run_as_non_root=True, run_as_user=1000, fs_group=1000,
                                                  seccomp_profile=V1SeccompProfile(type="RuntimeDefault")))))
    return ApiClient().sanitize_for_serialization(isvc)


def to_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


class DeployError(RuntimeError):
    """The InferenceService could not be applied or did not become Ready; the message says why."""


def _check(obj: dict) -> None:
    if not isinstance(obj, dict) or not obj.get("metadata", {}).get("name"):
        raise ValueError("apply() needs a manifest dict with metadata.name: pass render_inference_service(...)'s result")
    if obj.get("kind") != "InferenceService":
        raise ValueError(f"apply() handles InferenceService objects only, got kind {obj.get('kind')!r}; "
                         "apply other resources with 'kubectl apply -k manifests/overlays/...'")


def render_only(obj: dict) -> str:
    """Write the manifest under home and say that nothing was applied (DISTILLERY_DEPLOY_MODE=render)."""
    _check(obj)
    s = get_settings()
    out = write_manifest(obj, s.home_abs / "manifests" / f"{obj['metadata']['name']}.yaml")
    uri = obj.get("spec", {}).get("predictor", {}).get("model", {}).get("storageUri", "")
    note = "" if "://" in uri else " (its storageUri is a local path: set DISTILLERY_ARTIFACT_LOCATION=s3://... for a cluster)"
    return f"rendered, not applied (DISTILLERY_DEPLOY_MODE=render): manifest written to {out}{note}"


def _custom_objects_api(context: str | None):
    """The API for a kube context when one is named; else the pod's ServiceAccount (in-cluster), else the
    current kubeconfig context. Says how to fix it when none of these exists."""
    from kubernetes import client, config

    if context:
        config.load_kube_config(context=context)
        return client.CustomObjectsApi(), f"context {context}"
    try:
        config.load_incluster_config()
        return client.CustomObjectsApi(), "the pod's service account"
    except config.ConfigException as in_pod:
        try:
            config.load_kube_config()
            return client.CustomObjectsApi(), "the current kubeconfig context"
        except (config.ConfigException, OSError) as kubeconfig:
            raise DeployError(
                f"cannot apply: no cluster credentials (not in a pod: {in_pod}; no kubeconfig: {kubeconfig}). Run the "
                "step in the cluster with the pipeline-runner ServiceAccount, set DISTILLERY_KUBE_CONTEXT, or set "
                "DISTILLERY_DEPLOY_MODE=render to only write the manifest") from None


def _api_error(e: Exception, what: str, where: str) -> DeployError:
    from kubernetes.client.rest import ApiException

    if isinstance(e, ApiException):
        hint = {401: "the credentials were refused",
                403: "the pipeline-runner ServiceAccount needs the Role in manifests/base/rbac.yaml",
                404: "is KServe installed (CRD inferenceservices.serving.kserve.io) and does the namespace exist?",
                }.get(e.status, "see the API server's message")
        return DeployError(f"cannot {what} via {where}: HTTP {e.status} {e.reason}: {hint}")
    return DeployError(f"cannot {what} via {where}: {type(e).__name__}: {e}")


def apply(obj: dict, context: str | None = None) -> str:
    """Create or patch the InferenceService on the cluster; raises DeployError saying why when it cannot."""
    import urllib3
    from kubernetes.client.rest import ApiException

    _check(obj)
    s = get_settings()
    name, ns = obj["metadata"]["name"], obj["metadata"].get("namespace", s.namespace)
    api, where = _custom_objects_api(context or s.kube_context)
    try:
        try:
            api.create_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, obj)
            return f"created InferenceService {ns}/{name} via {where}"
        except ApiException as e:
            if e.status != 409:
                raise
            api.patch_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, name, obj)  # merge patch
            return f"updated InferenceService {ns}/{name} via {where}"
    except (ApiException, urllib3.exceptions.HTTPError) as e:
        raise _api_error(e, f"apply InferenceService {ns}/{name}", where) from None


def wait_ready(name: str, namespace: str, *, timeout_s: float, context: str | None = None,
               poll_s: float = 2.0) -> str:
    """Poll until the InferenceService reports Ready=True; returns its URL. DeployError on timeout."""
    import time

    import urllib3
    from kubernetes.client.rest import ApiException

    api, where = _custom_objects_api(context or get_settings().kube_context)
    deadline, conditions = time.monotonic() + timeout_s, []
    while True:
        try:
            obj = api.get_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, namespace, ISVC_PLURAL, name)
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise _api_error(e, f"read InferenceService {namespace}/{name}", where) from None
        status = obj.get("status") or {}
        conditions = status.get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return status.get("url") or status.get("address", {}).get("url", "")
        if time.monotonic() >= deadline:
            last = "; ".join(f"{c.get('type')}={c.get('status')} {c.get('reason', '')} {c.get('message', '')}".strip()
                             for c in conditions) or "no status yet"
            raise DeployError(f"InferenceService {namespace}/{name} not Ready after {timeout_s:g}s ({last}); see "
                              f"`kubectl -n {namespace} describe inferenceservice {name}` and the predictor pod's logs")
        time.sleep(poll_s)


def deploy(obj: dict, *, mode: str | None = None, timeout_s: float | None = None) -> dict:
    """Apply and wait until Ready, or only render, as DISTILLERY_DEPLOY_MODE says; the result says which happened."""
    s = get_settings()
    mode = mode or s.deploy_mode
    if mode == "render":
        return {"mode": "render", "status": render_only(obj), "url": ""}
    if mode != "apply":
        raise ValueError(f"deploy mode must be 'apply' or 'render', got {mode!r} (DISTILLERY_DEPLOY_MODE)")
    applied = apply(obj)
    meta = obj["metadata"]
    url = wait_ready(meta["name"], meta.get("namespace", s.namespace), timeout_s=timeout_s or s.deploy_timeout_s)
    return {"mode": "apply", "status": f"{applied}; Ready at {url or '(no URL reported)'}", "url": url}


def write_manifest(obj: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(obj))
    return path
