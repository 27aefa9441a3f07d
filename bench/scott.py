"""SCott targets: the scott pipeline run once (fresh home), then its evaluation table read back from MLflow
and the served 2-step student timed against the served 25-step teacher through the KServe endpoint. Then the
ablation: the same pipeline again with `discriminator=latent` and step caching, so only SCott+adv's sweep,
distillation and the evaluation run again (the standalone latent discriminator instead of the teacher-feature one).

    python bench/scott.py [--profile cpu] [--set key=value ...] [--requests 20] [--no-ablation]

Side by side (ours / baseline): the released student (the best 2-step FD of the three per-method-tuned ones)
and SCott+adv at 2 steps vs the teacher at 25 steps (FD, UNet evaluations, served latency), each method vs
CD-ODE at 2 steps (FD), the teacher-feature vs the latent discriminator, SCott+adv at 1 and 4 steps vs 2; per
method the sweep's trials, pruned trials and best value, with the objective's 95% interval.
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
import requests
from serving import pct, start_server

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--no-ablation", dest="ablation", action="store_false",
                    help="skip the second run with the latent discriminator")
    opts = ap.parse_args()

    home = fresh_home(f"scott-{opts.profile}")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "distillery.cli", "run", "scott", "--profile", opts.profile, "--cache"]
    for s in opts.sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=REPO, env=os.environ, check=True)
    pipeline_s = time.perf_counter() - t0
    ablation_s = None
    if opts.ablation:
        t1 = time.perf_counter()
        subprocess.run(cmd + ["--set", "discriminator=latent"], cwd=REPO, env=os.environ, check=True)
        ablation_s = time.perf_counter() - t1

    from mlflow import MlflowClient

    from distillery.platform import registry, tracking

    tracking.configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name("distillery/scott")
    evaluations = client.search_runs([exp.experiment_id], "tags.task = 'evaluate'", max_results=2,
                                     order_by=["attributes.start_time ASC"])
    m, released = evaluations[0].data.metrics, evaluations[0].data.tags.get("released_method", "?")
    latent = evaluations[1].data.metrics if opts.ablation else None
    table = Path(client.download_artifacts(evaluations[0].info.run_id, "evaluation_table.md", str(home))).read_text()
    sweep = sweep_summary(client, exp.experiment_id, evaluations[0].data.tags.get("kfp_run_id"))

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

    rel = released.replace("-", "_")
    rows = [
        (f"FD: released ({released}) @2 vs teacher @25", m[f"{rel}_2step_fd"], m["teacher_25step_fd"], ""),
        ("FD: SCott+adv @2 vs teacher @25", m["scott_adv_2step_fd"], m["teacher_25step_fd"], ""),
        ("UNet evals / image: SCott+adv @2 vs teacher @25", m["scott_adv_2step_unet_evals_per_image"],
         m["teacher_25step_unet_evals_per_image"], ""),
        ("FD @2: SCott+adv vs CD-ODE", m["scott_adv_2step_fd"], m["cd_ode_2step_fd"], ""),
        ("FD @2: SCott vs CD-ODE", m["scott_2step_fd"], m["cd_ode_2step_fd"], ""),
        ("FD: SCott+adv @1 vs @2", m["scott_adv_1step_fd"], m["scott_adv_2step_fd"], ""),
        ("FD: SCott+adv @4 vs @2", m["scott_adv_4step_fd"], m["scott_adv_2step_fd"], ""),
        ("cond. acc: SCott+adv @2 vs teacher @25", m["scott_adv_2step_cond_acc"], m["teacher_25step_cond_acc"], ""),
    ]
    if latent is not None:
        rows += [("FD @2: SCott+adv, teacher-feature vs latent discriminator", m["scott_adv_2step_fd"],
                  latent["scott_adv_2step_fd"], ""),
                 ("FD @1: same", m["scott_adv_1step_fd"], latent["scott_adv_1step_fd"], ""),
                 ("FD @2: SCott+adv (latent discriminator) vs CD-ODE", latent["scott_adv_2step_fd"],
                  latent["cd_ode_2step_fd"], "")]
    if served:
        rows += [("served p50 latency: student @2 vs teacher @25", statistics.median(served["student"]),
                  statistics.median(served["teacher"]), "s"),
                 ("served p95 latency: student @2 vs teacher @25", pct(served["student"], 0.95),
                  pct(served["teacher"], 0.95), "s")]
    out = report(f"scott-{opts.profile}", rows, extra={
        "profile": opts.profile, "sets": opts.sets, "pipeline_s": pipeline_s, "ablation_s": ablation_s,
        "released_method": released, "sweep": sweep, "metrics": m, "latent_discriminator_metrics": latent})
    print(table)
    if latent is not None:
        ablation = [r for r in markdown_rows(client, evaluations[1].info.run_id, home) if "| scott-adv |" in r]
        table += "\nSCott+adv with the latent discriminator (ablation run):\n\n" + "\n".join(ablation) + "\n"
    table += "\n" + sweep_markdown(sweep)
    print(sweep_markdown(sweep))
    (RESULTS / f"scott-{opts.profile}.md").write_text(table)
    ci = (m["scott_adv_2step_fd_ci_low"], m["scott_adv_2step_fd_ci_high"])
    targets = {"SCott+adv fd @2 <= 1.3x teacher @25": m["scott_adv_2step_fd"] <= 1.3 * m["teacher_25step_fd"],
               "unet_eval_reduction >= 10": m["unet_eval_reduction"] >= 10,
               "SCott+adv fd below CD-ODE at 2 steps": m["scott_adv_2step_fd"] < m["cd_ode_2step_fd"],
               "released fd @2 <= 1.3x teacher @25": m["fd_ratio_vs_teacher"] <= 1.3,
               "quality of the released student improves or holds 1 -> 2 -> 4": bool(m["monotone_in_steps"])}
    print(json.dumps({"pipeline_s": round(pipeline_s, 1), "ablation_s": ablation_s and round(ablation_s, 1),
                      "released": released, "scott_adv_2step_fd_ci95": ci, "targets_met": targets}, indent=1))
    out["targets_met"] = targets
    (RESULTS / f"scott-{opts.profile}.json").write_text(json.dumps(out, indent=2))


def latencies(url: str, body: dict, n: int) -> list[float]:
    """Seconds of `n` sequential requests (one image each)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        requests.post(url, json=body, timeout=120).raise_for_status()
        out.append(time.perf_counter() - t)
    return out


def sweep_summary(client, experiment_id: str, kfp_run_id: str) -> dict:
    """Per method: trials, pruned trials, the best objective, and the 95% interval of the objective (FD at 2 steps)
    of the trials that reached the last rung, so the noise can be read against the spread it ranks."""
    trials = [r for r in client.search_runs([experiment_id], "tags.`distillery.role` = 'trial'", max_results=1000)
              if r.data.tags.get("kfp_run_id") == kfp_run_id]
    out = {}
    for method in ("cd-ode", "scott", "scott-adv"):
        mine = [r for r in trials if r.data.tags.get("optuna.study", "").endswith(f"-{method}")]
        done = [r for r in mine if r.data.tags.get("optuna.state") == "COMPLETE"]
        widths = [r.data.metrics["fd_ci_high"] - r.data.metrics["fd_ci_low"] for r in done if "fd_ci_high" in r.data.metrics]
        values = [r.data.metrics["objective"] for r in done if "objective" in r.data.metrics]
        out[method] = {"trials": len(mine), "pruned": sum(r.data.tags.get("optuna.state") == "PRUNED" for r in mine),
                       "best": min(values) if values else None,
                       "spread": (max(values) - min(values)) if len(values) > 1 else None,
                       "median_ci_width": statistics.median(widths) if widths else None}
    return out


def sweep_markdown(sweep: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["| method | trials | pruned | best FD @2 (objective) | spread of completed trials | median 95% CI width |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['trials']} | {v['pruned']} | {f(v['best'])} | {f(v['spread'])} | {f(v['median_ci_width'])} |"
              for k, v in sweep.items()]
    return "\n".join(lines) + "\n"


def markdown_rows(client, run_id: str, home: Path) -> list[str]:
    folder = Path(home) / "ablation"
    folder.mkdir(exist_ok=True)
    return Path(client.download_artifacts(run_id, "evaluation_table.md", str(folder))).read_text().splitlines()


if __name__ == "__main__":
    main()
