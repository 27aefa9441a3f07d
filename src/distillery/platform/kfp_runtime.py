"""KFP: run a pipeline with the local runner, compile it to IR YAML, submit it, schedule recurring runs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

from distillery.settings import get_settings


def run_local(pipeline_func: Callable, arguments: dict[str, Any], *, caching: bool = False) -> Any:
    """Execute the whole DAG in subprocesses of this environment (no cluster, no containers)."""
    from kfp import local

    s = get_settings()
    root = Path(s.kfp_pipeline_root)
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=caching,
        cache_root=str(s.home_abs / "kfp-cache"),
    )
    with warnings.catch_warnings():
        # The runner warns that our image name has no "python" in it; it runs in this environment anyway.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        return pipeline_func(**arguments)


def for_cluster(pipeline_func: Callable, arguments: dict[str, Any] | None = None) -> Callable:
    """The pipeline as a cluster runs it, its graph rebuilt with retries on every task and, with `gpu` true,
    accelerators on the compute steps (a pod's resources are fixed at compile time, not by a run parameter)."""
    from kfp import dsl

    from distillery.platform import pods

    with pods.cluster_build(bool((arguments or {}).get("gpu"))):
        return dsl.pipeline(name=pipeline_func.name, description=pipeline_func.description)(pipeline_func.pipeline_func)


def compile_pipeline(pipeline_func: Callable, package_path: Path, *, arguments: dict[str, Any] | None = None) -> Path:
    """Write the KFP IR YAML, uploadable in the KFP UI; `arguments` become the defaults shown there."""
    from kfp import compiler

    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(for_cluster(pipeline_func, arguments), str(package_path),
                                pipeline_parameters=arguments or None)
    return package_path


def load_compiled(package_path: Path) -> Any:
    """A compiled YAML loaded back as a runnable component (runs with the local runner like the original)."""
    from kfp import components

    return components.load_component_from_file(str(package_path))


def client(host: str | None = None):
    import kfp

    host = host or get_settings().kfp_host
    if not host:
        raise ValueError("no KFP endpoint: pass --host or set DISTILLERY_KFP_HOST")
    return kfp.Client(host=host)


def submit(pipeline_func: Callable, arguments: dict[str, Any], *, host: str | None = None,
           experiment: str = "distillery", run_name: str | None = None) -> str:
    result = client(host).create_run_from_pipeline_func(
        for_cluster(pipeline_func, arguments), arguments=arguments, experiment_name=experiment, run_name=run_name,
        pipeline_root=_remote_root())
    return result.run_id


def schedule(pipeline_func: Callable, arguments: dict[str, Any], *, cron: str, host: str | None = None,
             experiment: str = "distillery", job_name: str | None = None, package_dir: Path | None = None) -> str:
    """Create a recurring run (KFP cron: six fields, seconds first)."""
    c = client(host)
    name = job_name or f"{pipeline_func.name}-recurring"
    package = compile_pipeline(pipeline_func, (package_dir or get_settings().home_abs / "compiled") / f"{name}.yaml",
                               arguments=arguments)
    exp = c.create_experiment(experiment)
    job = c.create_recurring_run(experiment_id=exp.experiment_id, job_name=name, cron_expression=cron,
                                 pipeline_package_path=str(package), params=arguments, max_concurrency=1)
    return job.recurring_run_id


def _remote_root() -> str | None:
    root = get_settings().pipeline_root
    return root if root and "://" in root else None
