"""SCott targets: the scott pipeline run once (fresh home), then its evaluation table read back from MLflow
and the served 2-step student timed against the served 25-step teacher through the KServe endpoint.

    python bench/scott.py [--profile cpu] [--set key=value ...] [--requests 20]

Side by side (ours / baseline): SCott+adv at 2 steps vs the teacher at 25 steps (FD, UNet evaluations,
served latency), vs CD-ODE at 2 steps (FD), and SCott+adv at 1 and 4 steps vs 2 (quality with more steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, fresh_home, report
from serving import latencies, pct, start_server

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--requests", type=int, default=20)
    opts = ap.parse_args()

    home = fresh_home(f"scott-{opts.profile}")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "distillery.cli", "run", "scott", "--profile", opts.profile]
    for s in opts.sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=REPO, env=os.environ, check=True)
    pipeline_s = time.perf_counter() - t0

    from mlflow import MlflowClient

    from distillery.platform import registry, tracking

    tracking.configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name("distillery/scott")
    runs = client.search_runs([exp.experiment_id], "tags.task = 'evaluate'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    m = runs[0].data.metrics
    table = Path(client.download_artifacts(runs[0].info.run_id, "evaluation_table.md", str(home))).read_text()

    # Served latency: the released student (2 steps) vs its teacher (25 steps, guidance as in training).
    student = registry.download("scott", "champion") if registry.champion_metrics("scott") else None
    teachers = sorted(p.parent for p in Path(home).rglob("train-unet/model/model_index.json"))
    served = {}
    if student and teachers:
        for name, folder, steps, guidance in (("student", student, 2, 1.0), ("teacher", teachers[-1], 25, 3.0)):
            server, url, _ = start_server(folder, name)
            try:
                body = {"instances": [{"prompt": "a handwritten digit seven", "steps": steps, "guidance": guidance}]}
                latencies(f"{url}/v1/models/{name}:predict", body, 2)  # warm-up
                served[name] = latencies(f"{url}/v1/models/{name}:predict", body, opts.requests)
            finally:
                server.terminate()
                server.wait(10)

    rows = [
        ("FD: SCott+adv @2 vs teacher @25", m["scott_adv_2step_fd"], m["teacher_25step_fd"], ""),
        ("UNet evals / image: SCott+adv @2 vs teacher @25", m["scott_adv_2step_unet_evals_per_image"],
         m["teacher_25step_unet_evals_per_image"], ""),
        ("FD @2: SCott+adv vs CD-ODE", m["scott_adv_2step_fd"], m["cd_ode_2step_fd"], ""),
        ("FD @2: SCott vs CD-ODE", m["scott_2step_fd"], m["cd_ode_2step_fd"], ""),
        ("FD: SCott+adv @1 vs @2", m["scott_adv_1step_fd"], m["scott_adv_2step_fd"], ""),
        ("FD: SCott+adv @4 vs @2", m["scott_adv_4step_fd"], m["scott_adv_2step_fd"], ""),
        ("cond. acc: SCott+adv @2 vs teacher @25", m["scott_adv_2step_cond_acc"], m["teacher_25step_cond_acc"], ""),
    ]
    if served:
        rows += [("served p50 latency: student @2 vs teacher @25", statistics.median(served["student"]),
                  statistics.median(served["teacher"]), "s"),
                 ("served p95 latency: student @2 vs teacher @25", pct(served["student"], 0.95),
                  pct(served["teacher"], 0.95), "s")]
    out = report(f"scott-{opts.profile}", rows, extra={"profile": opts.profile, "sets": opts.sets,
                                                        "pipeline_s": pipeline_s, "metrics": m})
    print(table)
    (RESULTS / f"scott-{opts.profile}.md").write_text(table)
    targets = {"fd_ratio_vs_teacher_25 <= 1.3": m["fd_ratio_vs_teacher"] <= 1.3,
               "unet_eval_reduction >= 10": m["unet_eval_reduction"] >= 10,
               "fd below CD-ODE at 2 steps": m["scott_adv_2step_fd"] < m["cd_ode_2step_fd"],
               "quality improves or holds 1 -> 2 -> 4": bool(m["monotone_in_steps"])}
    print(json.dumps({"pipeline_s": round(pipeline_s, 1), "targets_met": targets}, indent=1))
    out["targets_met"] = targets
    (RESULTS / f"scott-{opts.profile}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
