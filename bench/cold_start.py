"""Cold start: process start to ready, for the predictor of each tiny model and for KServe's ModelServer alone.

Each round starts, in turn, `python -m distillery.serving` on a tiny-sd pipeline folder, on a tiny MoDE policy
folder, and a ModelServer whose model has nothing to load (the floor: Python, KServe, uvicorn); the order rotates
every round so that none gains from a quieter moment. Ready means `GET /v2/health/ready` answers 200.

    python bench/cold_start.py [--rounds 5] [--model-dir SD_DIR] [--policy-dir POLICY_DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from _common import report
from load import build_models, free_port

FLOOR = """
import sys, kserve
class Nothing(kserve.Model):
    def load(self):
        self.ready = True
        return True
m = Nothing("nothing"); m.load()
kserve.ModelServer(http_port=int(sys.argv[1]), enable_grpc=False, workers=1).start([m])
"""


def time_to_ready(cmd: list[str], port: int, log: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - t0 < 300:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"{cmd} exited; see {log}")
            time.sleep(0.02)
        raise SystemExit(f"{cmd} not ready in 300 s; see {log}")
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--policy-dir", type=Path)
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cold-"))
    sd, policy = opts.model_dir, opts.policy_dir
    if sd is None or policy is None:
        built = build_models(tmp)
        sd, policy = sd or built[0], policy or built[1]

    def predictor(folder: Path, name: str):
        return lambda port: [sys.executable, "-m", "distillery.serving", "--model-dir", str(folder), "--model-name",
                             name, "--http-port", str(port), "--grpc-port", "0"]

    kinds = {"tiny-sd": predictor(sd, "tiny-sd"), "policy": predictor(policy, "mode"),
             "kserve alone": lambda port: [sys.executable, "-c", FLOOR, str(port)]}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(opts.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            port = free_port()
            times[name].append(time_to_ready(kinds[name](port), port, tmp / f"{name}.log"))
            print(f"round {r}: {name} ready in {times[name][-1]:.2f} s", flush=True)
    floor = statistics.median(times["kserve alone"])
    report("cold_start", [(f"start to ready, median of {opts.rounds}: {k} predictor vs KServe alone",
                           statistics.median(times[k]), floor, "s") for k in ("tiny-sd", "policy")],
           extra={"times_s": times})


if __name__ == "__main__":
    main()
