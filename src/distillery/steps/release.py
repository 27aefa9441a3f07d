"""Gate, register, deploy: the release half of every pipeline (paper-agnostic)."""

from __future__ import annotations

from pathlib import Path

from distillery.settings import get_settings


def gate(*, metrics: dict, model_name: str, thresholds: dict, directions: dict, report_path: str) -> dict:
    """Pass only if every threshold holds and the candidate is not worse than the current champion."""
    from distillery.platform import registry

    bounds = {k: (v[0], float(v[1])) for k, v in thresholds.items()}
    champion = registry.champion_metrics(model_name)
    passed, reasons = registry.gate(metrics, bounds, champion, directions)
    lines = [f"# Gate for {model_name}: {'PASSED' if passed else 'FAILED'}", "",
             "| metric | candidate | bound | champion |", "|---|---|---|---|"]
    for name, (kind, bound) in bounds.items():
        lines.append(f"| {name} | {metrics.get(name, float('nan')):.4g} | {kind} {bound:.4g} | "
                     f"{champion.get(name, float('nan')):.4g} |")
    lines += ["", *(f"- {r}" for r in reasons)]
    Path(report_path).write_text("\n".join(lines) + "\n")
    _log_text("\n".join(lines), "gate.md")
    return {"passed": passed, "gate_passed": float(passed)}


def register(*, model_dir: str, metrics: dict, model_name: str) -> dict:
    """Register the model folder as a new version and make it the champion."""
    import mlflow

    from distillery.platform import registry

    run = mlflow.active_run()
    parent = run.data.tags.get("mlflow.parentRunId", "")
    version = registry.register_dir(model_name, Path(model_dir), run.info.run_id,
                                    tags={"parent_run_id": parent}, metrics=metrics)
    registry.promote(model_name, version)
    return {"version": version, "registered_version": float(version)}


SERVICE_SUFFIX = {"hybrid-cloud": "cloud", "hybrid-edge": "edge"}


def deploy(*, model_name: str, version: str, kind: str, gpu: bool, manifest_path: str) -> dict:
    """Render the InferenceService for this version; apply it and wait until Ready unless DISTILLERY_DEPLOY_MODE=render.
    Fails (DeployError) when it cannot apply: a deploy that silently did nothing would look like a release."""
    from distillery.platform import k8s, registry

    s = get_settings()
    image = s.image_gpu if gpu else s.image  # GPU predictors need the CUDA build
    # One registered version can back several predictors (hybrid-sd's cloud and edge): each its own service.
    service = f"{model_name}-{SERVICE_SUFFIX[kind]}" if kind in SERVICE_SUFFIX else model_name
    isvc = k8s.render_inference_service(service, registry.storage_uri(model_name, version), image=image,
                                        namespace=s.namespace, gpu=gpu, args=["--kind", kind])
    _log_text(k8s.to_yaml(isvc), "inferenceservice.yaml")
    result = k8s.deploy(isvc)
    text = f"# {model_name} v{version}: {result['mode']}\n\n{result['status']}\n\n```yaml\n{k8s.to_yaml(isvc)}```\n"
    Path(manifest_path).write_text(text)
    return {"status": result["status"], "mode": result["mode"], "applied": float(result["mode"] == "apply")}


def _log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)
