"""Paper-agnostic steps shared by every pipeline: validation, gate, registration, deployment, and the exit handler
that ends the pipeline's MLflow parent run."""

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output, PipelineTaskFinalStatus

from components import component


@component
def validate_image_captions(
    dataset: Input[Dataset],
    balance_tolerance: float,
    pipeline: str,
    kfp_run_id: str,
    report: Output[HTML],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import data

    run_step(data.validate_image_captions, pipeline=pipeline, step="validate",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, dataset_dir=dataset.path, report_path=report.path,
             balance_tolerance=balance_tolerance)


@component
def gate(
    metrics: Input[Metrics],
    model_name: str,
    thresholds: dict,
    directions: dict,
    pipeline: str,
    kfp_run_id: str,
    decision: Output[Markdown],
) -> bool:
    from distillery.platform.stepping import run_step
    from distillery.steps import release

    result = run_step(release.gate, pipeline=pipeline, step="gate", kfp_run_id=kfp_run_id,
                      metrics=metrics.metadata, model_name=model_name, thresholds=thresholds, directions=directions,
                      report_path=decision.path)
    return bool(result["passed"])


@component
def register(
    model: Input[Model],
    metrics: Input[Metrics],
    model_name: str,
    pipeline: str,
    kfp_run_id: str,
) -> str:
    from distillery.platform.stepping import run_step
    from distillery.steps import release

    result = run_step(release.register, pipeline=pipeline, step="register",
                      kfp_run_id=kfp_run_id, model_dir=model.path, metrics=metrics.metadata, model_name=model_name)
    return str(result["version"])


@component
def deploy(
    model_name: str,
    version: str,
    kind: str,
    gpu: bool,
    pipeline: str,
    kfp_run_id: str,
    manifest: Output[Markdown],
) -> str:
    from distillery.platform.stepping import run_step
    from distillery.steps import release

    step = f"deploy-{kind}" if kind in release.SERVICE_SUFFIX else "deploy"
    result = run_step(release.deploy, pipeline=pipeline, step=step,
                      kfp_run_id=kfp_run_id, model_name=model_name, version=version, kind=kind, gpu=gpu,
                      manifest_path=manifest.path)
    return str(result["status"])


@component
def finish_run(status: PipelineTaskFinalStatus, pipeline: str, kfp_run_id: str) -> str:
    """Exit handler: runs after every other task, whatever happened, and ends the parent MLflow run with the
    pipeline's final state (on a cluster nothing else would: each step knows only its own run)."""
    from distillery.platform import tracking

    parent = tracking.finish_kfp_run(pipeline, kfp_run_id, status.state, status.error_message or "")
    print(f"pipeline {pipeline} {status.state}: parent run {parent or '(none opened)'}")
    return parent
