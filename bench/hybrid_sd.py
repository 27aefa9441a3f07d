"""Hybrid SD targets: the hybrid-sd pipeline run once (fresh home), its evaluation read back from MLflow, and the
released cloud + edge predictors timed end to end through their HTTP endpoints (bytes moved between them too).

    python bench/hybrid_sd.py [--profile cpu] [--set key=value ...] [--requests 5]
    python bench/hybrid_sd.py --home DIR     # the measurements for a finished run (DIR: its DISTILLERY_HOME)

Side by side (ours / baseline), at the released split k/N:
hybrid (large->small) vs large only (cloud UNet FLOPs, FD), the small->large quality gap recovered, the pruned UNet
vs the teacher (parameters, CPU time per step), significance-scored vs uniform pruning at equal parameters and KD
steps (FD; also with both small UNets decoded by the teacher's VAE, the pruning alone), the tiny VAE vs the
teacher's (decode time, PSNR, and FD of the large model's images through each), and the two orders of the split (FD).
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

import requests

from _common import RESULTS, fresh_home, report

REPO = Path(__file__).resolve().parents[1]


def _serve(release: Path, kind: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(release), "--model-name",
                             "hybrid-sd", "--kind", kind, "--http-port", str(port), "--grpc-port", "0",
                             "--max-body-bytes", str(8 << 20)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{kind} predictor not ready")


def served_roundtrips(release: Path, n: int) -> dict:
    """Cloud then edge over HTTP, n times: end-to-end latency and the bytes of the cloud's answer."""
    procs = [_serve(release, "hybrid-cloud", 18471), _serve(release, "hybrid-edge", 18472)]
    try:
        prompt = {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["an emoji (smileys & emotion)"]}
        times, moved = [], 0
        for i in range(n + 1):
            t = time.perf_counter()
            r = requests.post("http://127.0.0.1:18471/v2/models/hybrid-sd/infer", timeout=300,
                              json={"inputs": [prompt], "parameters": {"seed": i}})
            r.raise_for_status()
            moved = len(r.content)
            state = [{k: o[k] for k in ("name", "datatype", "shape", "data")} for o in r.json()["outputs"]]
            e = requests.post("http://127.0.0.1:18472/v2/models/hybrid-sd/infer", timeout=300,
                              json={"inputs": [prompt, *state]})
            e.raise_for_status()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t)
        return {"e2e_p50_s": statistics.median(times), "cloud_to_edge_bytes": moved}
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--home", type=Path, help="Read a finished run from this DISTILLERY_HOME instead of running one.")
    opts = ap.parse_args()

    if opts.home:
        from distillery.settings import get_settings

        home = opts.home.resolve()
        os.environ["DISTILLERY_HOME"] = str(home)
        get_settings.cache_clear()
        pipeline_s = float("nan")
    else:
        home = fresh_home(f"hybrid-sd-{opts.profile}")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "distillery.cli", "run", "hybrid-sd", "--profile", opts.profile]
        for s in opts.sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=REPO, env=os.environ, check=True)
        pipeline_s = time.perf_counter() - t0

    from mlflow import MlflowClient

    from distillery.platform import tracking

    tracking.configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name("distillery/hybrid-sd")
    run = client.search_runs([exp.experiment_id], "tags.task = 'evaluate'", max_results=1,
                             order_by=["attributes.start_time DESC"])[0]
    m = run.data.metrics
    table = Path(client.download_artifacts(run.info.run_id, "split_table.md", str(home))).read_text()
    releases = sorted(Path(home).rglob("evaluate-hybrid*/release/hybrid.json"))
    served = served_roundtrips(releases[-1].parent, opts.requests) if releases else {}

    rows = [
        ("cloud UNet FLOPs / image: hybrid vs large only", m["cloud_flops_ratio_large_small"], 1.0, "x"),
        ("FD: hybrid (large->small) vs large only", m["fd_large_small"], m["fd_large"], ""),
        ("FD: hybrid vs small only", m["fd_large_small"], m["fd_small"], ""),
        ("FD: small->large vs large->small (same k)", m.get("fd_small_large", float("nan")), m["fd_large_small"], ""),
        ("UNet params: pruned vs teacher", m["small_params"], m["large_params"], ""),
        ("CPU s / step: pruned vs teacher", m["small_step_s"], m["large_step_s"], "s"),
        ("FD: scored pruning vs uniform (equal params, KD steps)", m["fd_small"], m["fd_uniform"], ""),
        ("FD: the same, both through the teacher's VAE", m.get("small_only_sd_vae_fd", float("nan")),
         m.get("uniform_only_sd_vae_fd", float("nan")), ""),
        ("FD: large only, tiny VAE vs the teacher's", m.get("large_only_tiny_vae_fd", float("nan")), m["fd_large"], ""),
        ("VAE decode s: tiny vs teacher", m["tiny_vae_decode_s"], m["vae_decode_s"], "s"),
        ("VAE PSNR dB: tiny vs teacher", m["tiny_vae_psnr"], m["vae_psnr"], "dB"),
        ("cond. acc: hybrid vs large only", m["cond_acc_large_small"], m["cond_acc_large"], ""),
    ]
    out = report(f"hybrid-sd-{opts.profile}", rows,
                 extra={"profile": opts.profile, "sets": opts.sets, "pipeline_s": pipeline_s, "served": served,
                        "metrics": m})
    print(table)
    (RESULTS / f"hybrid-sd-{opts.profile}.md").write_text(table)
    targets = {
        "cloud FLOPs <= 0.4x large only": m["cloud_flops_ratio_large_small"] <= 0.4,
        "FD <= 1.15x large only": m["fd_ratio_large_small_vs_large"] <= 1.15,
        ">= 60% of the small->large FD gap recovered": m.get("gap_recovered_large_small", float("nan")) >= 0.6,
        "pruned params <= 0.5x": m["params_ratio"] <= 0.5,
        "pruned CPU latency / step <= 0.65x": m["step_latency_ratio"] <= 0.65,
        "scored FD <= 0.9x uniform": m["fd_ratio_scored_vs_uniform"] <= 0.9,
        "tiny VAE decode <= 0.4x": m["tiny_vae_decode_ratio"] <= 0.4,
        "tiny VAE PSNR drop <= 1.5 dB": m["tiny_vae_psnr_drop"] <= 1.5,
    }
    winner = "large->small" if m.get("large_small_wins", 1.0) else "small->large"
    print(json.dumps({"pipeline_s": round(pipeline_s, 1), "served": served, "order_that_wins": winner,
                      "gap_recovered": m.get("gap_recovered_large_small", float("nan")), "targets_met": targets}, indent=1))
    out.update(served=served, targets_met=targets, order_that_wins=winner)
    (RESULTS / f"hybrid-sd-{opts.profile}.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
