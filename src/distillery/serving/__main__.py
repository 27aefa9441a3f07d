"""`python -m distillery.serving --model-dir DIR --model-name NAME`: the predictor entry point, locally and in a pod."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

import distillery

if distillery.OMP_WAIT_DEFAULTED and "torch" not in sys.modules:
    # A predictor owns its CPUs and answers one request at a time at low load: spinning waiters give a batch-1
    # image in 60 ms instead of 126 ms (tiny-sd, 2 idle cores). The package's sleeping default is for steps.
    for var in ("OMP_WAIT_POLICY", "OMP_WAIT_POLICY_SET_BY"):
        os.environ.pop(var, None)


def _import_model_libraries(model_dir: Path, kind: str) -> None:
    """Import torch (and diffusers for a pipeline folder) while the main thread imports KServe: the two overlap
    where imports wait on the disk or release the GIL. The load waits for this thread: diffusers' lazy module is
    not safe to import from two threads at once."""
    import torch  # noqa: F401

    if kind in ("text-to-image", "swift-diffusion", "swift-diffusion-baseline") \
            or (kind == "auto" and (model_dir / "model_index.json").exists()):
        from diffusers import StableDiffusionPipeline  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m distillery.serving", description=__doc__)
    ap.add_argument("--model-dir", type=Path, required=True, help="Model folder (KServe mounts storageUri at /mnt/models).")
    ap.add_argument("--model-name", required=True, help="Name in the URL: /v1/models/NAME:predict.")
    ap.add_argument("--kind", default="auto", help="Predictor kind (text-to-image, policy, navigation, locomotion); auto reads the model folder.")
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1", help="Bind address; 0.0.0.0 only inside a pod.")
    ap.add_argument("--grpc-port", type=int, default=8081, help="V2 gRPC port; 0 turns gRPC off.")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
    ap.add_argument("--batch-window-ms", type=float, default=10.0,
                    help="How long the first request of a batch waits for compatible ones (0: no waiting).")
    ap.add_argument("--max-queue", type=int, default=32,
                    help="Requests allowed to wait; beyond it the answer is 503 with Retry-After at once.")
    opts, _ = ap.parse_known_args()  # KServe's own flags (e.g. --workers) pass through
    logging.basicConfig(level=logging.INFO)
    warm = threading.Thread(target=_import_model_libraries, args=(opts.model_dir, opts.kind), daemon=True)
    warm.start()
    from distillery.serving.server import serve

    serve(opts.model_dir, opts.model_name, opts.kind, opts.http_port, opts.host, opts.max_body_bytes,
          grpc_port=opts.grpc_port or None, batch_window_ms=opts.batch_window_ms, max_queue=opts.max_queue,
          after=warm)


if __name__ == "__main__":
    main()
