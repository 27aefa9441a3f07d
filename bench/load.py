"""Load test: every endpoint under concurrent clients, at and above capacity.

Serves a tiny-sd pipeline folder and a MoDE policy folder with `python -m distillery.serving` on 127.0.0.1 and,
for text-to-image and policy, V1 and V2 (JSON): first one client (one request at a time: the baseline), then as
many clients as a batch holds (at capacity), then four times the queue bound (above it). Each request is one of a
few (prompt, seed) or (task, observations, seed) keys whose answer was recorded one at a time beforehand, so every
response is matched to its request: a lost, swapped or wrong answer counts as a mismatch. Reports p50/p95/p99
latency of the answered requests, throughput, the declared 503s (Retry-After) and anything else (5xx, errors).
First, in this process, what batching can gain at most: the text-to-image model's batched call against one image
at a time, with oneDNN on (as served) and off, and how far batched images stray from unbatched ones.

    python bench/load.py [--seconds 60] [--steps 4] [--model-dir SD_DIR] [--policy-dir POLICY_DIR]
Without folders, a tiny-sd pipeline (untrained: the same computation) and a tiny MoDE policy are built first.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests

from _common import free_port, pct


@dataclass
class Endpoint:
    """One route and how to make, read and compare its requests. `body(key)` -> JSON; `read(json)` -> answer."""
    name: str
    path: str
    body: Callable[[Any], dict]
    read: Callable[[dict], Any]
    same: Callable[[Any, Any], bool]
    keys: list
    expected: dict = field(default_factory=dict)


def same_png(a: bytes, b: bytes) -> bool:
    """Equal up to float rounding (CPU kernels round differently per batch size: at most one grey level)."""
    x, y = png_array(a), png_array(b)
    return x.shape == y.shape and np.abs(x - y).max() <= 1 and (x == y).mean() >= 0.99


def png_array(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def text_to_image_endpoints(name: str, steps: int, n_keys: int = 6) -> list[Endpoint]:
    keys = [(f"a handwritten digit {k % 10}", 1000 + k) for k in range(n_keys)]
    v1 = Endpoint("text-to-image V1", f"/v1/models/{name}:predict",
                  lambda k: {"instances": [{"prompt": k[0], "seed": k[1], "steps": steps}]},
                  lambda j: base64.b64decode(j["predictions"][0]["image_png_b64"]), same_png, keys)
    v2 = Endpoint("text-to-image V2", f"/v2/models/{name}/infer",
                  lambda k: {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [k[0]]}],
                             "parameters": {"seed": k[1], "steps": steps}},
                  lambda j: base64.b64decode(j["outputs"][0]["data"][0]), same_png, keys)
    return [v1, v2]


def policy_endpoints(name: str, history: int, obs_dim: int, n_keys: int = 6) -> list[Endpoint]:
    rng = np.random.default_rng(0)
    tasks = ["push-v3", "reach-v3", "door-open-v3"]
    keys = [(tasks[k % 3], 7 + k, k) for k in range(n_keys)]
    obs = {k: rng.normal(size=(history, obs_dim)).round(4).tolist() for k in range(n_keys)}
    close = lambda a, b: np.allclose(a, b, atol=1e-5)  # noqa: E731
    v1 = Endpoint("policy V1", f"/v1/models/{name}:predict",
                  lambda k: {"instances": [{"task": k[0], "observations": obs[k[2]], "seed": k[1]}]},
                  lambda j: np.array(j["predictions"][0]["actions"]), close, keys)
    v2 = Endpoint("policy V2", f"/v2/models/{name}/infer",
                  lambda k: {"inputs": [{"name": "observations", "datatype": "FP32", "shape": [1, history, obs_dim],
                                         "data": sum(obs[k[2]], [])},
                                        {"name": "task", "datatype": "BYTES", "shape": [1], "data": [k[0]]}],
                             "parameters": {"seed": k[1]}},
                  lambda j: np.array(j["outputs"][0]["data"]).reshape(j["outputs"][0]["shape"])[0], close, keys)
    return [v1, v2]


def record(url: str, ep: Endpoint) -> None:
    """The answer to every key, one request at a time."""
    for k in ep.keys:
        r = requests.post(url + ep.path, json=ep.body(k), timeout=300)
        r.raise_for_status()
        ep.expected[k] = ep.read(r.json())


def run_load(url: str, ep: Endpoint, clients: int, seconds: float, seed: int = 0) -> dict:
    """`clients` threads send requests back to back for `seconds`; returns counts, latencies and throughput."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {"ok": 0, "declared_503": 0, "503_without_retry_after": 0, "other_5xx": 0, "4xx": 0, "mismatched": 0,
             "errors": 0}
    latencies: list[float] = []

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        session = requests.Session()
        while time.monotonic() < stop:
            k = rng.choice(ep.keys)
            t = time.monotonic()
            try:
                r = session.post(url + ep.path, json=ep.body(k), timeout=300)
            except requests.RequestException:
                with lock:
                    stats["errors"] += 1
                continue
            took = time.monotonic() - t
            with lock:
                if r.status_code == 200:
                    if ep.same(ep.read(r.json()), ep.expected[k]):
                        stats["ok"] += 1
                        latencies.append(took)
                    else:
                        stats["mismatched"] += 1
                elif r.status_code == 503:
                    stats["declared_503" if r.headers.get("Retry-After") else "503_without_retry_after"] += 1
                elif r.status_code >= 500:
                    stats["other_5xx"] += 1
                else:
                    stats["4xx"] += 1
            if r.status_code == 503:  # a well-behaved client backs off as told, briefly here to keep pressure on
                time.sleep(min(float(r.headers.get("Retry-After", 1)), 1.0) * rng.random() * 0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t0
    return {**stats, "endpoint": ep.name, "clients": clients, "seconds": round(elapsed, 2),
            "throughput_rps": stats["ok"] / elapsed, "p50_s": pct(latencies, 0.5), "p95_s": pct(latencies, 0.95),
            "p99_s": pct(latencies, 0.99)}


def start_server(model_dir: Path, name: str, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(model_dir),
                             "--model-name", name, "--http-port", str(port), "--grpc-port", "0", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server for {model_dir} did not become ready; see {log}")


def batch_cost(sd_dir: Path, steps: int, capacity: int) -> list[dict]:
    """Seconds for `capacity` images one call each and in one batched call, oneDNN on and off, with the largest
    pixel difference between the two (the same prompts and seeds)."""
    import torch

    from distillery.serving.text_to_image import TextToImageModel

    model = TextToImageModel("tiny-sd", sd_dir)
    model.check()
    model.load()
    items, opts = [(f"a handwritten digit {k % 10}", 100 + k) for k in range(capacity)], (steps, 3.0, "")
    rows = []
    for onednn in (True, False):
        torch.backends.mkldnn.enabled = onednn
        model.run_batch(opts, items[:1]), model.run_batch(opts, items)  # warm-up
        t = time.perf_counter()
        alone = [model.run_batch(opts, [item])[0] for item in items]
        one = (time.perf_counter() - t) / capacity
        t = time.perf_counter()
        batched = model.run_batch(opts, items)
        batch = time.perf_counter() - t
        diff = [np.abs(png_array(a) - png_array(b)) for a, b in zip(alone, batched)]
        rows.append({"onednn": onednn, "one_s": one, "batch_s": batch, "batch_over_one": batch / one,
                     "max_pixel_diff": int(max(d.max() for d in diff)),
                     "pixels_differing": float(max((d > 0).mean() for d in diff))})
    torch.backends.mkldnn.enabled = True
    return rows


def build_models(root: Path) -> tuple[Path, Path]:
    from distillery.data import demos as dm
    from distillery.models import files, tiny_sd
    from distillery.papers.mode import MoDEConfig
    from distillery.papers.mode.policy import train_policy

    sd = root / "sd"
    tiny_sd.build_pipeline(tiny_sd.TinySDConfig()).save_pretrained(sd)
    (sd / "distillery.json").write_text(json.dumps({"default_steps": 4, "max_steps": 50}))
    files.seal(sd)
    dm.collect_mt10_demos(root / "demos", episodes_per_task=1, progress=False)
    cfg = MoDEConfig(width=32, depth=2, expert_hidden=32, chunk=4, obs_history=2)
    train_policy(dm.load_demos(root / "demos"), root / "policy", cfg, steps=5, batch_size=32, sampling_steps=4)
    return sd, root / "policy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--policy-dir", type=Path)
    opts = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="load-"))
    sd_dir, policy_dir = opts.model_dir, opts.policy_dir
    if sd_dir is None or policy_dir is None:
        built = build_models(tmp)
        sd_dir, policy_dir = sd_dir or built[0], policy_dir or built[1]
    cfg = json.loads((policy_dir / "policy.json").read_text())["config"]
    costs = batch_cost(sd_dir, opts.steps, 8)
    for c in costs:
        print(f"in process, oneDNN {'on ' if c['onednn'] else 'off'}: {c['batch_s']:.3f} s for a batch of 8 against "
              f"{c['one_s']:.3f} s for one image ({c['batch_over_one']:.2f}x); batched vs one at a time: at most "
              f"{c['max_pixel_diff']} grey level(s) apart on {100 * c['pixels_differing']:.2f}% of the pixels",
              flush=True)
    plans = [(sd_dir, "tiny-sd", text_to_image_endpoints("tiny-sd", opts.steps), 8),
             (policy_dir, "mode", policy_endpoints("mode", cfg["obs_history"], cfg["obs_dim"]), 8)]
    rows = []
    for folder, name, endpoints, capacity in plans:
        proc, url = start_server(folder, name, tmp / f"{name}.log", "--max-queue", str(opts.max_queue))
        try:
            for ep in endpoints:
                record(url, ep)
                for clients in (1, capacity, 4 * opts.max_queue):
                    row = run_load(url, ep, clients, opts.seconds)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(15)

    print(f"\n| endpoint | clients | answered/s | vs 1 client | p50 | p95 | p99 | 503 (Retry-After) | other 5xx | "
          f"mismatched | errors |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["endpoint"] == row["endpoint"] and r["clients"] == 1)
        print(f"| {row['endpoint']} | {row['clients']} | {row['throughput_rps']:.1f} | "
              f"{row['throughput_rps'] / base['throughput_rps']:.2f}x | {row['p50_s']:.3f} s | {row['p95_s']:.3f} s | "
              f"{row['p99_s']:.3f} s | {row['declared_503']} | {row['other_5xx'] + row['503_without_retry_after']} | "
              f"{row['mismatched']} | {row['errors']} |")
    out = Path(__file__).resolve().parent / "results" / "load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": opts.seconds, "steps": opts.steps, "batch_cost": costs, "rows": rows}, indent=1))
    bad = sum(r["other_5xx"] + r["503_without_retry_after"] + r["mismatched"] + r["errors"] for r in rows)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
