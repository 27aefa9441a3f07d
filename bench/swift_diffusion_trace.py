"""SwiftDiffusion under a trace-driven load: both runtimes (the swift-diffusion predictor and its
swift-diffusion-baseline twin) replay the same seeded request trace, open loop, in one run, with the add-ons fetched
from a real object store (a one-node Ceph cluster's RADOS Gateway, S3).

- Store: `--loras` random LoRAs (lora00 ... lora15, a LoRA on every attention, feed-forward and ResNet convolution
  layer, like `bench/swift_diffusion.py` makes one) and two ControlNets, once per `--sizes` entry RANK[+PAD_MB]:
  rank 4 is 0.5 MB, 4% of the tiny SD's 13 MB UNet (a common SD-1.5 LoRA of 10-150 MB is 0.5-9% of its 1.7 GB
  half-precision UNet); "4+48" puts 48 MB more in each LoRA's folder (a file the runtime downloads and ignores):
  the same LoRA in memory and in compute, only its fetch longer, which is where fetch time starts to weigh against
  the K steps a LoRA may load behind. A larger rank (e.g. 64: 8.4 MB) grows the LoRA in memory and in patching
  work as well. The add-on cache holds the ControlNets and `--cache-loras` LoRAs, fewer than the store has, as a
  production cache holds a fraction of its add-ons.
- Trace: Poisson arrivals (exponential gaps, mean 1/rate). Per request 0-1 ControlNet and 0-2 distinct LoRAs, the
  paper's workflow shapes, in proportions chosen here: a ControlNet with probability `--controlnet-p` (0.5; the two
  equally likely) and 0, 1 or 2 LoRAs with probabilities 0.25, 0.5, 0.25. LoRA popularity is Zipf: rank k is
  drawn with probability proportional to k^-s. The paper (Li et al., "SwiftDiffusion: Efficient Diffusion Model
  Serving with Add-on Modules", arXiv:2407.02031; published as Katz) reports skewed add-on popularity in its
  production traces without an exponent taken here; s = 1.0 (`--zipf`) is the classic Zipf law that cache studies
  default to. Breslau et al. ("Web Caching and Zipf-like Distributions", INFOCOM 1999) measured 0.64-0.83 for web
  requests, so s = 1 is the more skewed, cache-friendlier choice (`--zipf 0.7` for theirs). A second LoRA is
  drawn from the same law without the first. One seed gives the same requests at every rate; only their arrival
  times scale.
- Rates: fractions (`--loads`) of the baseline's single-request capacity, measured first (requests of the trace
  one after the other, the two runtimes alternating, cache warm). Every replay starts from a cold cache. Requests
  go through the predictor's own V1 `predict` in this process (validation, the dynamic batcher, the model call on
  the batcher's thread), each sent at its arrival time whether or not earlier ones are done. Latency = completion
  - arrival (queueing included); throughput = requests completed / (last completion - replay start). Throughput
  compares capacities only where both runtimes are saturated: below that a runtime serves what arrives, so the
  default loads go up to 4x the baseline's capacity (ours has about 2x its capacity).

    python bench/swift_diffusion_trace.py [--requests 24] [--loads 0.5 1 2 4 | --rates R ...] [--repeats 1]
                                          [--sizes 4 4+48] [--store DIR]

--store DIR writes the add-on store to a local folder instead of the RGW bucket (no Ceph needed). The Ceph cluster
comes from tests/integration/services.py (`make services` installs it) and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _common import RESULTS, pct, report

LORA_COUNTS = (0.25, 0.5, 0.25)  # P(0, 1, 2 LoRAs in a request)


@dataclass(frozen=True)
class Request:
    at: float  # arrival, seconds from the replay's start
    loras: tuple[str, ...]
    controlnet: str | None
    seed: int


def zipf_pmf(n: int, s: float) -> np.ndarray:
    """P(rank k) proportional to k^-s, k = 1..n."""
    w = np.arange(1, n + 1, dtype=float) ** -s
    return w / w.sum()


def make_trace(n: int, rate: float, loras: list[str], controlnets: list[str], *, zipf_s: float = 1.0,
               controlnet_p: float = 0.5, lora_counts: tuple[float, ...] = LORA_COUNTS, seed: int = 0) -> list[Request]:
    """`n` requests arriving as a Poisson process of `rate` per second; `loras` are in popularity order (rank 1
    first). The requests depend on `seed` alone, so every rate replays the same ones at scaled times."""
    if rate <= 0 or n < 1:
        raise ValueError(f"rate must be > 0 and n >= 1, got {rate} and {n}")
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0, n)) / rate
    pmf = zipf_pmf(len(loras), zipf_s)
    out = []
    for i in range(n):
        k = min(int(rng.choice(len(lora_counts), p=lora_counts)), len(loras))
        picked = rng.choice(len(loras), size=k, replace=False, p=pmf) if k else []
        cn = controlnets[int(rng.integers(len(controlnets)))] if controlnets and rng.random() < controlnet_p else None
        out.append(Request(float(at[i]), tuple(loras[j] for j in picked), cn, 1000 + i))
    return out


# ------------------------------------------------------------------------------------------------ store


def _random_lora(unet, path: Path, rank: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from distillery.papers.swift_diffusion.train import LORA_TARGETS

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if name.endswith(LORA_TARGETS) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight
            # With alpha = rank (no alpha stored) B A sums `rank` terms: A shrinks so that every rank changes the
            # weights as much as the rank-4 LoRA does.
            a = torch.randn((rank, *w.shape[1:]), generator=gen) * 0.2 * (4 / rank) ** 0.5
            sd[f"unet.{name}.lora_A.weight"] = a
            sd[f"unet.{name}.lora_B.weight"] = torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])),
                                                           generator=gen) * 0.2
    path.parent.mkdir(parents=True)
    save_file(sd, str(path), metadata={"format": "pt"})


def _build_store(model: Path, store: Path, n_loras: int, rank: int, pad_mb: float) -> tuple[list[str], list[str]]:
    """LoRAs lora00.. of `rank` (each folder padded with `pad_mb` MB) and the ControlNet `_model_folder` made (twice,
    under two names) in `store`."""
    from diffusers import UNet2DConditionModel

    from distillery.papers.swift_diffusion.addons import LORA_FILE

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    loras = [f"lora{i:02d}" for i in range(n_loras)]
    for i, name in enumerate(loras):
        _random_lora(unet, store / "lora" / name / LORA_FILE, rank, seed=i)
        if pad_mb:  # random bytes: nothing on the way can compress them
            (store / "lora" / name / "padding.bin").write_bytes(os.urandom(int(pad_mb * 1e6)))
    controlnets = ["edges", "edges-b"]
    for name in controlnets:
        shutil.copytree(model / "addons" / "controlnet" / "edges", store / "controlnet" / name)
    return loras, controlnets


def _start_rgw():
    """A Ceph RGW and the settings that point `distillery.platform.storage` at it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from integration.services import start_ceph_rgw

    from distillery.settings import get_settings

    rgw = start_ceph_rgw(bucket="addons")
    os.environ.update({"DISTILLERY_S3_ENDPOINT_URL": rgw.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": rgw.endpoint_url,
                       "AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
                       "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)
    get_settings.cache_clear()
    return rgw


# ------------------------------------------------------------------------------------------------ replay


def _body(r: Request, steps: int, guidance: float, control_png_b64: str) -> dict:
    inst = {"prompt": f"a handwritten digit {r.seed % 10}", "seed": r.seed, "steps": steps, "guidance": guidance,
            "loras": [{"name": n} for n in r.loras]}
    if r.controlnet:
        inst["controlnet"] = {"name": r.controlnet, "image": control_png_b64}
    return {"instances": [inst]}


def _fresh(m) -> None:
    """A cold add-on cache and a fresh batcher (its averages and its event loop belong to one replay)."""
    from distillery.serving.batching import Batcher

    m.runtime.cache = m.fresh_cache()
    m.batcher = Batcher(m.run_batch, max_items=m.max_items, window_s=m.batch_window_s, max_queue=m.max_queue,
                        on_fatal=m.fail)


def replay(m, trace: list[Request], steps: int, guidance: float, control_png_b64: str) -> dict:
    """Each request sent at its arrival time (open loop); latencies, throughput and what the add-ons did."""
    _fresh(m)

    async def run() -> list[dict]:
        t0 = time.monotonic()

        async def one(r: Request) -> dict:
            await asyncio.sleep(max(0.0, t0 + r.at - time.monotonic()))
            try:
                out = await m.predict(_body(r, steps, guidance, control_png_b64))
            except Exception as e:  # noqa: BLE001 - an overload or store failure is a result to count
                return {"ok": False, "error": type(e).__name__, "done": time.monotonic() - t0}
            done = time.monotonic() - t0
            return {"ok": True, "latency": done - r.at, "done": done, "addons": out["predictions"][0]["addons"]}

        return await asyncio.gather(*(one(r) for r in trace))

    results = asyncio.run(run())
    ok = [x for x in results if x["ok"]]
    span = max(x["done"] for x in results)
    loras = [e for x in ok for e in x["addons"]["loras"]]
    cns = [x["addons"]["controlnet"] for x in ok if "controlnet" in x["addons"]]
    with_lora = [x for x in ok if x["addons"]["loras"]]
    waited = [x for x in with_lora if any(e["cache"] == "miss" and e["applied_from_step"] == x["addons"]["wait_step"]
                                          and e["applied_from_step"] > 0 for e in x["addons"]["loras"])]
    late = [x for x in with_lora if any(0 < e["applied_from_step"] < x["addons"]["wait_step"]
                                        for e in x["addons"]["loras"])]
    lat = [x["latency"] for x in ok]
    cache = m.runtime.cache
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({x["error"] for x in results if not x["ok"]}),
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "mean_s": statistics.fmean(lat) if lat else float("nan"),
            "throughput_rps": len(ok) / span, "span_s": span,
            "lora_hit_rate": sum(e["cache"] == "hit" for e in loras) / max(1, len(loras)),
            "controlnet_hit_rate": sum(c["cache"] == "hit" for c in cns) / max(1, len(cns)),
            "cache_hits": cache.hits, "cache_misses": cache.misses, "cache_evictions": cache.evictions,
            "requests_with_lora": len(with_lora), "waited_at_K": len(waited), "patched_before_K": len(late),
            "model_calls": m.batcher.batches}


def service_seconds(models: list, trace: list[Request], steps: int, guidance: float,
                    control_png_b64: str) -> list[float]:
    """Per model, mean seconds per request served one after the other (cache warm after a first pass): 1 / its
    capacity. The models take turns request by request, so a change in the machine's load falls on all alike."""
    for m in models:
        _fresh(m)

    async def run() -> list[list[float]]:
        times: list[list[float]] = [[] for _ in models]
        for r in trace:
            for m, into in zip(models, times):
                t = time.perf_counter()
                await m.predict(_body(r, steps, guidance, control_png_b64))
                into.append(time.perf_counter() - t)
        return times

    asyncio.run(run())  # fills the caches and warms diffusers' and peft's first-call paths
    return [statistics.fmean(t) for t in asyncio.run(run())]


def _png_b64(m) -> str:
    from PIL import Image

    from swift_diffusion import _control_image

    arr = (_control_image(m)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _store_bytes(store: Path, kind: str, name: str) -> int:
    return sum(p.stat().st_size for p in (store / kind / name).rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path,
                    help="A diffusers StableDiffusionPipeline folder (default: an untrained tiny SD, 32 px).")
    ap.add_argument("--store", type=Path, help="Write the add-on store to this local folder instead of Ceph RGW.")
    ap.add_argument("--requests", type=int, default=24, help="Requests per replay.")
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0],
                    help="Arrival rates as fractions of the baseline's single-request capacity.")
    ap.add_argument("--sizes", nargs="+", default=["4", "4+48"], metavar="RANK[+PAD_MB]",
                    help="One store and one set of replays per entry: the LoRAs' rank, and MB of padding per LoRA.")
    ap.add_argument("--loras", type=int, default=16, help="LoRAs in the store.")
    ap.add_argument("--cache-loras", type=int, default=8, help="LoRAs the add-on cache holds beside the ControlNets.")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of LoRA popularity.")
    ap.add_argument("--controlnet-p", type=float, default=0.5, help="Share of requests with a ControlNet.")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--wait-fraction", type=float, default=0.4, help="K/N: where a request waits for its LoRA.")
    ap.add_argument("--rates", type=float, nargs="+",
                    help="Arrival rates in requests per second (instead of --loads: comparable across runs).")
    ap.add_argument("--repeats", type=int, default=1,
                    help="Replays per rate and runtime; the table shows the median of each measure.")
    ap.add_argument("--calibration", type=int, default=6, help="Requests timed one by one for the capacity.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thread-controlnet", action="store_true",
                    help="Our ControlNet on a thread of the server's instead of its own worker process.")
    opts = ap.parse_args()

    # Imported here so that the trace generator above loads without torch (its test stays fast).
    from swift_diffusion import _headroom, _model_folder, _predictor

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from distillery.papers.swift_diffusion.addons import LORA_FILE
    from distillery.platform import storage
    from distillery.serving.swift_diffusion import BaselineDiffusionModel, SwiftDiffusionModel

    # The baseline's per-request load_lora_weights warns each time that the text encoder gets no LoRA.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    work = RESULTS / "homes" / f"swift-diffusion-trace-{int(time.time())}"
    model = _model_folder(argparse.Namespace(base=opts.base, addons=None, steps=opts.steps,
                                             wait_fraction=opts.wait_fraction), work)
    cfg_path = model / "distillery.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["controlnet_process"] = not opts.thread_controlnet
    rows: list[tuple[str, float, float, str]] = []
    extra: dict = {"requests": opts.requests, "repeats": opts.repeats, "steps": opts.steps, "guidance": opts.guidance,
                   "wait_fraction": opts.wait_fraction, "zipf_s": opts.zipf, "controlnet_p": opts.controlnet_p,
                   "lora_counts_p": LORA_COUNTS, "loras_in_store": opts.loras, "cache_loras": opts.cache_loras,
                   "store": "local folder" if opts.store else "Ceph RGW (S3)", "base": str(opts.base or "untrained"),
                   "seed": opts.seed, "conditions": {}}
    rgw = None if opts.store else _start_rgw()
    rates: list[float] | None = None
    try:
        for size in opts.sizes:
            rank, _, pad = size.partition("+")
            rank, pad_mb, name = int(rank), float(pad or 0), f"r{size}"
            local = (opts.store or work / "stores") / name
            loras, controlnets = _build_store(model, local, opts.loras, rank, pad_mb)
            lora_bytes = (local / "lora" / loras[0] / LORA_FILE).stat().st_size  # what the cache holds
            fetch_bytes = _store_bytes(local, "lora", loras[0])
            cn_bytes = sum(_store_bytes(local, "controlnet", c) for c in controlnets)
            uri = str(local.resolve())
            if rgw is not None:
                uri = f"s3://{rgw.bucket}/{name}"
                t = time.perf_counter()
                storage.upload(local, uri)
                upload_s = time.perf_counter() - t
            budget = int(cn_bytes + (opts.cache_loras + 0.5) * lora_bytes)  # room for cache_loras, not one more
            cfg_path.write_text(json.dumps({**cfg, "addons_uri": uri, "addon_cache_bytes": budget}))
            ours = _predictor(SwiftDiffusionModel, model, 0.0)
            base = _predictor(BaselineDiffusionModel, model, 0.0)
            png = _png_b64(ours)
            for probe in ("first", "timed"):  # the first includes the S3 client's one-time setup
                t = time.perf_counter()
                storage.download(f"{uri}/lora/{loras[0]}", work / "probe" / name / probe)
                fetch_s = time.perf_counter() - t
            cond: dict = {"lora_file_bytes": lora_bytes, "lora_fetch_bytes": fetch_bytes,
                          "controlnets_bytes": cn_bytes, "lora_fetch_s": fetch_s,
                          **({"upload_s": upload_s} if rgw is not None else {})}
            calib = make_trace(opts.calibration, 1.0, loras, controlnets, zipf_s=opts.zipf,
                               controlnet_p=opts.controlnet_p, seed=opts.seed + 1)
            cond["service_s"] = dict(zip(("ours", "baseline"),
                                         service_seconds([ours, base], calib, opts.steps, opts.guidance, png)))
            tag = f"{name} ({fetch_bytes / 1e6:.1f} MB per LoRA fetch)"
            rows.append((f"{tag} one at a time: s/request", cond["service_s"]["ours"],
                         cond["service_s"]["baseline"], "s"))
            if rates is None:  # the same absolute rates for every add-on size
                rates = opts.rates or [f / cond["service_s"]["baseline"] for f in opts.loads]
                if opts.rates:
                    opts.loads = [r * cond["service_s"]["baseline"] for r in opts.rates]
            print(f"{tag}: fetch {fetch_s * 1000:.0f} ms, service ours {cond['service_s']['ours']:.3f} s, baseline "
                  f"{cond['service_s']['baseline']:.3f} s; rates {', '.join(f'{r:.2f}' for r in rates)}/s", flush=True)
            for i, (load, rate) in enumerate(zip(opts.loads, rates)):
                trace = make_trace(opts.requests, rate, loras, controlnets, zipf_s=opts.zipf,
                                   controlnet_p=opts.controlnet_p, seed=opts.seed)
                order, reps = [("ours", ours), ("baseline", base)], []
                for j in range(opts.repeats):  # who runs first alternates, so drifting load falls on both
                    got = {who: replay(m, trace, opts.steps, opts.guidance, png)
                           for who, m in (order if (i + j) % 2 == 0 else order[::-1])}
                    reps.append(got)
                    for who in ("ours", "baseline"):
                        g = got[who]
                        print(f"  {load:.2g}x #{j + 1} {who:8s}: {g['completed']}/{opts.requests} done ({g['failed']} "
                              f"failed {g['errors']}), {g['throughput_rps']:.2f} req/s, p50 {g['p50_s']:.2f} s, LoRA "
                              f"hits {g['lora_hit_rate']:.0%}, ControlNet hits {g['controlnet_hit_rate']:.0%}, "
                              f"evictions {g['cache_evictions']}, waited for a LoRA at step K "
                              f"{g['waited_at_K']}/{g['requests_with_lora']}, patched in before K "
                              f"{g['patched_before_K']}, model calls {g['model_calls']}", flush=True)
                cond[f"load {load}"] = {"rate_rps": rate, "repeats": reps}

                def med(key: str) -> tuple[float, float]:
                    return tuple(statistics.median(g[who][key] for g in reps) for who in ("ours", "baseline"))

                at = f"{name} {rate:.2f} req/s ({load:.2g}x)"
                rows += [(f"{at}: p50 latency", *med("p50_s"), "s"), (f"{at}: p95 latency", *med("p95_s"), "s"),
                         (f"{at}: throughput", *med("throughput_rps"), "req/s")]
            extra["conditions"][name] = cond
            extra["rates_rps"], extra["loads"] = rates, opts.loads
    finally:
        if rgw is not None:
            rgw.stop()
        for scratch in (work / "stores", work / "probe"):  # the padded stores run to hundreds of MB
            shutil.rmtree(scratch, ignore_errors=True)
    rows.append(("machine headroom: two kernel threads vs one after the other", *_headroom(), "s"))
    extra["cores"], extra["controlnet_threads"] = ours.runtime.cores, ours.addon_limits["controlnet_threads"]
    report("swift-diffusion-trace", rows, extra)
    print(f"written: {RESULTS / 'swift-diffusion-trace.json'}")


if __name__ == "__main__":
    main()
