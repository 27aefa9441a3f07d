"""Helpers shared by the benchmarks: timing, a fresh embedded home, printing and saving ratio tables."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def timed(into: dict, key: str):
    t = time.perf_counter()
    yield
    into[key] = time.perf_counter() - t


def fresh_home(name: str) -> Path:
    """Point the settings at a new home folder so the measurement starts cold."""
    from distillery.settings import get_settings

    home = RESULTS / "homes" / f"{name}-{int(time.time())}"
    os.environ["DISTILLERY_HOME"] = str(home)
    get_settings.cache_clear()
    return home


def report(name: str, rows: list[tuple[str, float, float, str]], extra: dict | None = None) -> dict:
    """rows: (what, ours, baseline, unit). Prints ours/baseline side by side and writes bench/results/NAME.json."""
    table = Table(title=f"{name} ({platform.machine()}, {os.cpu_count()} cores)")
    for col in ("measure", "ours", "baseline", "ratio ours/baseline"):
        table.add_column(col)
    out = {"benchmark": name, "cores": os.cpu_count(), "rows": [], **(extra or {})}
    for what, ours, base, unit in rows:
        ratio = ours / base if base else float("nan")
        table.add_row(what, f"{ours:.3f} {unit}", f"{base:.3f} {unit}", f"{ratio:.2f}x")
        out["rows"].append({"measure": what, "ours": ours, "baseline": base, "unit": unit, "ratio": ratio})
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs; NaN when there is nothing to rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def pipeline_evaluation(pipeline: str, description: str) -> tuple[dict, dict]:
    """The command line of a pipeline's target benchmark: `--run [--profile P] [--set K=V ...]` runs the pipeline
    in a fresh home first, `--home DIR` reads a finished run. Returns the metrics of the latest `evaluate` step run
    and what to record beside them (profile, overrides, the pipeline's wall time)."""
    import argparse
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help=f"run the {pipeline} pipeline first")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--home", type=Path, help=f"DISTILLERY_HOME of a finished {pipeline} run")
    opts = ap.parse_args()
    extra: dict = {"profile": opts.profile, "sets": opts.sets}
    home = opts.home
    if opts.run:
        home = fresh_home(f"{pipeline}-{opts.profile}")
        cmd = [sys.executable, "-m", "distillery.cli", "run", pipeline, "--profile", opts.profile]
        for s in opts.sets:
            cmd += ["--set", s]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=RESULTS.parents[1], env=os.environ, check=True)
        extra["pipeline_s"] = time.perf_counter() - t
    if home is None:
        ap.error("give --run or --home")
    from mlflow import MlflowClient

    from distillery.platform import tracking
    from distillery.settings import get_settings

    os.environ["DISTILLERY_HOME"] = str(home)
    get_settings.cache_clear()
    tracking.configure()
    c = MlflowClient()
    exp = c.get_experiment_by_name(f"distillery/{pipeline}")
    run = c.search_runs([exp.experiment_id], "tags.task = 'evaluate'", max_results=1,
                        order_by=["attributes.start_time DESC"])[0]
    return run.data.metrics, extra
