"""`distillery` command line: run, compile, submit and schedule pipelines; serve, manage and compare models."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="distillery: research methods as KFP pipelines, tracked in MLflow, served by KServe.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
models_app = typer.Typer(help="Registered models: list, promote, roll back.", no_args_is_help=True)
data_app = typer.Typer(help="Data under DVC: raw data (data.dvc) pull/status; MT10 demonstrations (dvc.yaml).",
                        no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
console = Console()

PROFILE = typer.Option("smoke", "--profile", "-p", help="Parameter preset: smoke, cpu or paper.")
CLUSTER_PROFILE = typer.Option("cpu", "--profile", "-p", help="Parameter preset baked into the YAML: cpu or paper "
                               "(their real gate thresholds; paper also requests GPUs).")
SUBMIT_PROFILE = typer.Option("cpu", "--profile", "-p", help="Parameter preset: cpu, paper, or smoke (a quick check "
                              "of a cluster; its gates pass nearly any model).")
SET = typer.Option(None, "--set", "-s", help="Override one parameter: key=value (repeatable; JSON values allowed).")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _pipeline(name: str):
    from pipelines import registry

    pipelines = registry()
    if name not in pipelines:
        _fail(f"unknown pipeline {name!r}; choose one of: {', '.join(sorted(pipelines))}")
    return pipelines[name]


def _arguments(name: str, profile: str, sets: Optional[list[str]], *, kept: bool = False) -> dict:
    """`kept`: the result is stored (compiled YAML, recurring run), so the smoke profile's permissive gates are refused."""
    from pipelines.params import ParameterError, parse_set, resolve

    if kept and profile == "smoke":
        _fail("the smoke profile's gates pass nearly any model, so it is not compiled or scheduled: "
              "use --profile cpu or --profile paper (or `distillery run --profile smoke` locally)")

    try:
        return resolve(name, _pipeline(name), profile, parse_set(sets or []))
    except ParameterError as e:
        _fail(str(e))


@app.command()
def run(
    pipeline: str = typer.Argument(..., help="Pipeline name, e.g. tiny-sd."),
    profile: str = PROFILE,
    set_: Optional[list[str]] = SET,
    cache: bool = typer.Option(False, "--cache/--no-cache", help="Reuse outputs of steps whose inputs did not change."),
):
    """Run a pipeline locally with the KFP local runner; every step is tracked in MLflow."""
    from distillery.platform import kfp_runtime, registry, tracking
    from distillery.settings import get_settings

    func = _pipeline(pipeline)
    args = _arguments(pipeline, profile, set_)
    tracking.configure()
    parent = tracking.start_pipeline_run(pipeline, args, tags={"profile": profile, "runner": "kfp-local"})
    os.environ["DISTILLERY_PARENT_RUN_ID"] = parent  # the steps' subprocesses nest their runs under it
    get_settings.cache_clear()
    console.rule(f"[bold]{pipeline}[/] ({profile}) - MLflow run {parent}")
    try:
        kfp_runtime.run_local(func, args, caching=cache)
    except BaseException as e:  # noqa: BLE001 - the parent run must record every way a run ends
        tracking.finish_pipeline_run(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        _fail(f"pipeline {pipeline} failed: {e}", code=1)
    tracking.finish_pipeline_run(parent, "FINISHED")
    _summary(pipeline, parent, args.get("model_name"), registry)


def _summary(pipeline: str, parent: str, model_name: str | None, registry) -> None:
    from distillery.settings import get_settings

    table = Table(show_header=False, box=None)
    table.add_row("MLflow run", parent)
    table.add_row("tracking", get_settings().mlflow_tracking_uri)
    version = registry.version_for_run(model_name, parent) if model_name else None
    if version:
        table.add_row("registered", f"{model_name} version {version} (alias champion)")
        table.add_row("serve it", f"distillery serve {model_name}")
    else:
        table.add_row("registered", "nothing: the gate did not pass (see the gate step's decision)")
    console.print(table)


@app.command("compile")
def compile_(
    pipeline: Optional[str] = typer.Argument(None, help="Pipeline name; all pipelines when omitted."),
    out: Path = typer.Option(Path("build/pipelines"), "--out", "-o", help="Folder for the IR YAML files."),
    profile: str = CLUSTER_PROFILE,
):
    """Compile pipelines to KFP IR YAML (upload them in the KFP UI); the profile sets the defaults."""
    from distillery.platform import kfp_runtime
    from pipelines import registry

    names = [pipeline] if pipeline else sorted(registry())
    for name in names:
        path = kfp_runtime.compile_pipeline(_pipeline(name), out / f"{name}.yaml",
                                            arguments=_arguments(name, profile, None, kept=True))
        console.print(f"compiled [bold]{name}[/] -> {path}")


@app.command()
def submit(
    pipeline: str = typer.Argument(..., help="Pipeline name."),
    host: Optional[str] = typer.Option(None, help="KFP API endpoint (default: DISTILLERY_KFP_HOST)."),
    profile: str = SUBMIT_PROFILE,
    set_: Optional[list[str]] = SET,
    experiment: str = typer.Option("distillery", help="KFP experiment."),
):
    """Compile a pipeline and start a run on a KFP cluster."""
    from distillery.platform import kfp_runtime

    run_id = kfp_runtime.submit(_pipeline(pipeline), _arguments(pipeline, profile, set_), host=host,
                                experiment=experiment)
    console.print(f"submitted {pipeline}: KFP run {run_id}")


CRON_FIELD = re.compile(r"^(\*|\?|[0-9A-Za-z]+([-/,][0-9A-Za-z]+)*|\*/[0-9]+)$")


def kfp_cron(expr: str) -> str:
    """Standard 5-field cron or KFP's 6-field (seconds first) -> KFP's form; raises ValueError when malformed."""
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6 or not all(CRON_FIELD.match(f) for f in fields):
        raise ValueError(f"invalid cron expression {expr!r}: use 5 fields (min hour dom month dow, e.g. '0 3 * * *') "
                         "or KFP's 6 fields with seconds first")
    return " ".join(fields)


@app.command()
def schedule(
    pipeline: str = typer.Argument(..., help="Pipeline name."),
    cron: str = typer.Option(..., help="Cron expression, e.g. '0 3 * * *' (daily at 03:00)."),
    host: Optional[str] = typer.Option(None, help="KFP API endpoint (default: DISTILLERY_KFP_HOST)."),
    profile: str = CLUSTER_PROFILE,
    set_: Optional[list[str]] = SET,
    experiment: str = typer.Option("distillery", help="KFP experiment."),
):
    """Create a recurring run (scheduled retraining) on a KFP cluster."""
    from distillery.platform import kfp_runtime

    try:
        expr = kfp_cron(cron)
    except ValueError as e:
        _fail(str(e))
    job = kfp_runtime.schedule(_pipeline(pipeline), _arguments(pipeline, profile, set_, kept=True), cron=expr, host=host,
                               experiment=experiment)
    console.print(f"scheduled {pipeline} ({expr}): recurring run {job}")


@app.command()
def serve(
    name: str = typer.Argument(..., help="Registered model name, e.g. tiny-sd."),
    ref: str = typer.Option("champion", help="Alias or version to serve."),
    port: int = typer.Option(None, help="HTTP port (default: DISTILLERY_SERVE_PORT)."),
    kind: str = typer.Option("auto", help="Predictor kind (text-to-image, policy, navigation, locomotion); auto reads the model folder."),
    model_dir: Optional[Path] = typer.Option(None, help="Serve this local model folder instead of the registry's."),
):
    """Serve models:/NAME@champion with KServe's ModelServer on 127.0.0.1 (V1 and V2 protocols)."""
    from distillery.platform import registry, tracking
    from distillery.serving import serve as start
    from distillery.settings import get_settings

    s = get_settings()
    if model_dir is None:
        tracking.configure()
        try:
            model_dir = registry.download(name, ref)
        except Exception as e:  # noqa: BLE001 - shown to the user as a clear message
            _fail(f"cannot load models:/{name}@{ref}: {e}")
    console.print(f"serving {name} ({ref}) from {model_dir} on http://{s.serve_host}:{port or s.serve_port}")
    start(model_dir=Path(model_dir), name=name, kind=kind, port=port or s.serve_port, host=s.serve_host)


@app.command()
def edge(
    release_dir: Path = typer.Argument(..., help="A hybrid-sd release folder (cloud/, edge/, hybrid.json)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
    cloud: str = typer.Option("http://127.0.0.1:8080", help="URL of the hybrid-cloud predictor."),
    name: str = typer.Option("hybrid-sd", help="Model name the cloud predictor serves."),
    seed: int = typer.Option(0, help="Seed of the first prompt (the next ones count up)."),
    out: Path = typer.Option(Path("edge"), help="Folder for the PNG images."),
):
    """Hybrid SD on this machine as the edge: the cloud predictor runs the first k steps, the release's small UNet
    and tiny VAE finish them here."""
    from PIL import Image

    from distillery.serving.hybrid import edge_client

    try:
        images, stats = edge_client(cloud, name, release_dir, prompt, seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:02d}.png")
    console.print(f"{len(images)} image(s) in {out}: {stats['split']} of {stats['steps']} steps in the cloud "
                  f"({stats['cloud_s']:.2f} s, {stats['bytes_from_cloud']} bytes), {stats['total_s']:.2f} s in all")


@models_app.command("list")
def models_list():
    """Registered models with their versions, aliases and champion metrics."""
    from distillery.platform import registry, tracking

    tracking.configure()
    table = Table("name", "versions", "aliases", "champion metrics")
    for m in registry.list_models():
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(m.get("aliases", {}).items()))
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.get("champion_metrics", {}).items()))
        table.add_row(m["name"], str(len(m.get("versions", []))), aliases, metrics)
    console.print(table)


@models_app.command("promote")
def models_promote(name: str, version: str):
    """Make VERSION the champion (the previous champion stays reachable for rollback)."""
    from distillery.platform import registry, tracking

    tracking.configure()
    try:
        registry.promote(name, version)
    except Exception as e:  # noqa: BLE001
        _fail(str(e))
    console.print(f"{name}: champion -> version {version}")


@models_app.command("rollback")
def models_rollback(name: str):
    """Move the champion alias back to the previous champion."""
    from distillery.platform import registry, tracking

    tracking.configure()
    try:
        version = registry.rollback(name)
    except Exception as e:  # noqa: BLE001
        _fail(str(e))
    console.print(f"{name}: champion rolled back to version {version}")


@app.command()
def compare(
    pipeline: str = typer.Argument(..., help="Pipeline whose runs to compare."),
    metrics: Optional[list[str]] = typer.Option(None, "--metric", "-m", help="Metric(s) to show (default: all)."),
    last: int = typer.Option(10, help="How many recent runs."),
    plot: Optional[Path] = typer.Option(None, help="Write a bar chart PNG of the metrics here."),
):
    """Compare runs of a pipeline from MLflow side by side: a table and a plot."""
    from distillery.platform import compare as cmp
    from distillery.platform import tracking

    tracking.configure()
    frame = cmp.runs_frame(pipeline, metrics=metrics, last=last)
    if frame.empty:
        _fail(f"no finished runs of {pipeline} in {tracking.tracking_uri()}", code=1)
    table = Table(*map(str, frame.columns))
    for _, row in frame.iterrows():
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    if plot:
        cmp.plot(frame, plot)
        console.print(f"plot -> {plot}")


@data_app.command("pull")
def data_pull():
    """Fetch data/ (DVC remote when configured, otherwise rebuilt from the offline sources) and verify it."""
    from distillery.platform import versioning

    console.print(versioning.data_pull())


@data_app.command("status")
def data_status():
    """Does data/ match the revision recorded in data.dvc?"""
    from distillery.platform import versioning

    status = versioning.data_status()
    console.print(status)


@data_app.command("demos")
def data_demos(
    out: Path = typer.Option(Path("demos/mt10"), "--out", help="Folder to write (the DVC stage's output)."),
    episodes_per_task: int = typer.Option(50, "--episodes-per-task", min=1, help="Successful episodes per task."),
    seed: int = typer.Option(0, "--seed", help="Seed of the task variations and resets."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder (only once the new one validates)."),
):
    """Roll out MT10's scripted experts into a demonstration dataset and validate it (`dvc repro mt10-demos`)."""
    import shutil
    import tempfile

    from distillery.data.demos import collect_mt10_demos, validate_demos
    from distillery.platform import versioning
    from distillery.platform.validation import DataValidationError

    if out.exists() and any(out.iterdir()) and not force:
        _fail(f"{out} already holds files; pass --force to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        fresh = Path(tmp) / "demos"
        manifest = collect_mt10_demos(fresh, episodes_per_task=episodes_per_task, seed=seed)
        result = validate_demos(fresh, Path(tmp) / "report.html")
        if not result.success:
            _fail(str(DataValidationError(result)), code=1)
        shutil.rmtree(out, ignore_errors=True)
        fresh.rename(out)
    console.print({"out": str(out), "episodes": manifest["episodes"], "steps": manifest["steps"],
                   "content_sha256": manifest["content_sha256"], "dvc_md5": versioning.content_hash(out)})


if __name__ == "__main__":
    app()
