"""swift-diffusion's one smoke DAG run of the suite, as a cluster runs it: every task in its own container of the
image, configured only by the rendered ConfigMap and Secret, against the MLflow server and Ceph RGW, where the add-on
store is registered and the released runtime reads it from."""

from __future__ import annotations

import json

import pytest
import yaml

from integration.containers import check_lineage

pytestmark = pytest.mark.slow

ADDONS = ("controlnet-edges", "lora-inverted", "lora-thick", "lora-tint")
STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", *(f"train-{a}" for a in ADDONS),
         *(f"evaluate-{a}" for a in ADDONS), "register-addons", "evaluate-serving", "gate", "register", "deploy"}


def test_swift_diffusion_smoke_runs_in_containers(cluster_like, image, s3):
    """Base model, a ControlNet and three LoRAs trained in parallel and each evaluated against the base, the add-on
    store registered on RGW, serving evaluated on it (ours vs the diffusers baseline), gate, release, deploy."""
    run, client, _ = cluster_like
    seconds = run("swift-diffusion", dict(model_name="swift-diffusion-ct"))
    print(f"swift-diffusion smoke in containers: {seconds:.1f} s")
    children = check_lineage(client, "swift-diffusion", "swift-diffusion-ct", STEPS, image, s3)
    assert set(children) == STEPS

    for style in ("inverted", "thick", "tint"):
        train = children[f"train-lora-{style}"].data
        assert train.metrics["lora_parameters"] > 0
        ev = children[f"evaluate-lora-{style}"]
        m = ev.data.metrics
        assert m[f"lora_{style}_style_fd_ratio"] == pytest.approx(
            m[f"lora_{style}_style_fd"] / m[f"lora_{style}_base_style_fd"])
        assert 0 < m[f"lora_{style}_ssim_vs_base"] <= 1 and m["evaluator_version"] >= 1
        assert f"samples/lora_{style}.png" in {a.path for a in client.list_artifacts(ev.info.run_id, "samples")}
    cn = children["evaluate-controlnet-edges"].data.metrics
    assert 0 <= cn["controlnet_edges_edge_f1"] <= 1 and cn["controlnet_edges_fd"] > 0
    assert children["train-controlnet-edges"].data.metrics["controlnet_parameters"] > 0

    # The add-on store: one registered version whose folder is on RGW, in the layout the predictor lists.
    reg = children["register-addons"]
    (store,) = client.search_model_versions("name='swift-diffusion-ct-addons'")
    assert store.source.startswith(f"s3://{s3.bucket}/") and store.run_id == reg.info.run_id
    assert store.tags["addons"] == "controlnet/edges,lora/inverted,lora/thick,lora/tint"
    keys = [k for k in s3.keys("artifacts/") if reg.info.run_id in k]
    for path in ("lora/inverted/pytorch_lora_weights.safetensors", "lora/thick/pytorch_lora_weights.safetensors",
                 "lora/tint/pytorch_lora_weights.safetensors", "controlnet/edges/diffusion_pytorch_model.safetensors"):
        assert any(k.endswith(f"model/{path}") for k in keys), (path, keys)
    assert reg.data.metrics["addons_count"] == 4.0

    served = children["evaluate-serving"].data.metrics
    assert served["late_patch_step"] == 1.0 and 0 < served["ssim_late_patch"] <= 1  # K/N = 0.2 of 5 steps
    assert served["ssim_late_patch"] == min(served[f"lora_{s}_ssim_late_k20"] for s in ("inverted", "thick", "tint"))
    assert served["latency_ratio_cn_cold_lora"] == pytest.approx(
        served["latency_cn_cold_lora_s"] / served["baseline_latency_cn_cold_lora_s"])
    assert served["lora_style_fd_ratio_max"] == max(children[f"evaluate-lora-{s}"].data.metrics[
        f"lora_{s}_style_fd_ratio"] for s in ("inverted", "thick", "tint"))

    # The champion is the runtime release: the base with the registered add-on store as its source.
    champion = client.get_model_version_by_alias("swift-diffusion-ct", "champion")
    with open(client.download_artifacts(champion.run_id, "model/distillery.json")) as f:
        runtime = json.load(f)
    assert runtime["kind"] == "swift-diffusion" and runtime["addons_uri"] == store.source
    with open(client.download_artifacts(children["deploy"].info.run_id, "inferenceservice.yaml")) as f:
        isvc = yaml.safe_load(f)
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == champion.source and model["args"] == ["--kind", "swift-diffusion"]
    assert model["image"] == image.ref or model["image"].startswith(image.ref.split(":")[0])
