"""The evaluator (the feature network behind FD) is a versioned artifact: trained once per dataset revision,
registered, reused by later runs, and named on every evaluation."""

from __future__ import annotations

import json

import pytest

from distillery.data import build_image_caption_dataset
from distillery.steps import EVALUATOR_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "ds"
    build_image_caption_dataset(out, sources=("mnist",), resolution=16, per_class=6)
    return out


def _feature_net(dataset, out, steps=4):
    from distillery.platform.stepping import run_step
    from distillery.steps import tiny_sd

    return run_step(tiny_sd.train_feature_net, pipeline="evaluator-test", step="feature-net",
                    dataset_dir=str(dataset), out_dir=str(out), steps=steps, seed=0)


def test_evaluator_is_trained_once_per_data_revision_and_reused(home, dataset, tmp_path):
    from distillery.platform import registry, tracking

    first = _feature_net(dataset, tmp_path / "a")
    info = json.loads((tmp_path / "a" / EVALUATOR_FILE).read_text())
    assert first["evaluator_reused"] == 0 and info["name"] == "evaluator-mnist-16px" and info["version"] == "1"
    assert str(registry.by_alias(info["name"], info["alias"]).version) == "1"

    again = _feature_net(dataset, tmp_path / "b")  # same data, same parameters: downloaded, not retrained
    assert again["evaluator_reused"] == 1
    assert again["evaluator_key"] == first["evaluator_key"] and again["evaluator_version"] == 1
    a, b = ((tmp_path / d / "feature_net.safetensors").read_bytes() for d in "ab")
    assert a == b and json.loads((tmp_path / "b" / EVALUATOR_FILE).read_text()) == info

    other = _feature_net(dataset, tmp_path / "c", steps=5)  # another evaluator: a new version, another key
    assert other["evaluator_reused"] == 0 and other["evaluator_version"] == 2
    assert other["evaluator_key"] != first["evaluator_key"]

    runs = tracking.client().search_runs([tracking.experiment_for("evaluator-test")],
                                         filter_string="tags.task = 'feature-net'")
    assert {r.data.tags["evaluator"] for r in runs} == {"evaluator-mnist-16px v1 (" + info["alias"] + ")",
                                                         f"evaluator-mnist-16px v2 (rev-{json.loads((tmp_path / 'c' / EVALUATOR_FILE).read_text())['key']})"}


def test_evaluation_is_tagged_with_its_evaluator_and_the_gate_refuses_another(home, dataset, tmp_path):
    from distillery.models import tiny_sd as model
    from distillery.platform import registry, tracking
    from distillery.platform.stepping import run_step
    from distillery.steps import tiny_sd

    _feature_net(dataset, tmp_path / "net")
    pipe_dir = tmp_path / "pipe"
    model.build_pipeline(model.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4,
                                            unet_channels=(16, 32), norm_groups=8)).save_pretrained(pipe_dir)
    metrics = run_step(tiny_sd.evaluate, pipeline="evaluator-test", step="evaluate", model_dir=str(pipe_dir),
                       dataset_dir=str(dataset), feature_net_dir=str(tmp_path / "net"), num_per_class=1, steps=1,
                       guidance_scale=1.0, seed=0)
    assert metrics["evaluator_version"] == 1 and "fd_ci_high" in metrics and "kid" in metrics
    run = tracking.client().search_runs([tracking.experiment_for("evaluator-test")],
                                        filter_string="tags.task = 'evaluate'")[0]
    assert run.data.tags["evaluator"].startswith("evaluator-mnist-16px v1")
    ok, reasons = registry.gate(metrics, {}, {**metrics, "evaluator_key": metrics["evaluator_key"] + 1}, {"fd": "min"})
    assert not ok and "not comparable" in reasons[0]
