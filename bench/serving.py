"""Serving: the KServe endpoint vs calling the pipeline in-process, and cold start.

Serves a tiny-sd model folder with `python -m distillery.serving` on 127.0.0.1 and measures
p50/p95 latency of sequential V1 requests, throughput with concurrent clients, and process-start-to-ready
time; the baseline is the same StableDiffusionPipeline called in this process with the same request, under the
same `torch.inference_mode` as the endpoint. The two are timed in turn, one request each per round, the order
flipped every round, so that neither gains from running while the machine is quieter.

    python bench/serving.py [--model-dir DIR] [--steps 8] [--requests 30] [--concurrency 4]
Without --model-dir the registry's tiny-sd champion is used (run `make run` first).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import free_port, pct, report



def start_server(model_dir: Path, name: str) -> tuple[subprocess.Popen, str, float]:
    """`python -m distillery.serving` on a free loopback port; returns (process, base URL, seconds to ready)."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(model_dir),
                               "--model-name", name, "--http-port", str(port), "--grpc-port", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return server, url, time.perf_counter() - t0
        except requests.ConnectionError:
            pass
        if server.poll() is not None or time.perf_counter() - t0 > 120:
            server.kill()
            raise SystemExit(f"the server for {model_dir} did not become ready")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=4)
    opts = ap.parse_args()

    import requests
    import torch
    from diffusers import StableDiffusionPipeline

    model_dir = opts.model_dir
    if model_dir is None:
        from distillery.platform import registry, tracking

        tracking.configure()
        model_dir = registry.download("tiny-sd", "champion")
    body = {"instances": [{"prompt": "a handwritten digit seven", "steps": opts.steps, "guidance": 3.0, "seed": 0}]}

    # Baseline: the pipeline in this process.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def local_call(seed: int = 0):
        with torch.inference_mode():
            return pipe(["a handwritten digit seven"], num_inference_steps=opts.steps, guidance_scale=3.0,
                        height=size, width=size, generator=torch.Generator().manual_seed(seed)).images[0]

    server, url, cold = start_server(model_dir, "tiny-sd")
    try:
        predict = f"{url}/v1/models/tiny-sd:predict"
        r = requests.post(predict, json=body, timeout=60)
        r.raise_for_status()
        base64.b64decode(r.json()["predictions"][0]["image_png_b64"])
        local_call()

        def served_call(i: int) -> None:
            b = {"instances": [{**body["instances"][0], "seed": i}]}
            requests.post(predict, json=b, timeout=120).raise_for_status()

        local, served = [], []
        for i in range(opts.requests):
            order = [(local_call, local), (served_call, served)]
            for call, times in (order if i % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                call(i)
                times.append(time.perf_counter() - t)

        t = time.perf_counter()
        with ThreadPoolExecutor(opts.concurrency) as ex:
            list(ex.map(served_call, range(opts.requests)))
        throughput = opts.requests / (time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(10)

    local_tput = 1.0 / statistics.mean(local)
    report("serving", [
        ("p50 latency: KServe V1 vs in-process", statistics.median(served), statistics.median(local), "s"),
        ("p95 latency: KServe V1 vs in-process", pct(served, 0.95), pct(local, 0.95), "s"),
        (f"throughput ({opts.concurrency} clients) vs in-process sequential", throughput, local_tput, "img/s"),
    ], extra={"cold_start_s": cold, "steps": opts.steps, "requests": opts.requests, "resolution": size})
    print(f"cold start (process start -> ready): {cold:.2f} s")


if __name__ == "__main__":
    main()
