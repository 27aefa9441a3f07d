"""The SwiftDiffusion serving runtime: a Stable Diffusion pipeline that serves LoRA and ControlNet add-ons without
putting their loading and patching on a request's critical path. How it maps to the paper (Katz):

- Add-on store. Add-ons are fetched by name through `AddonCache`, a bounded in-memory cache (LRU by bytes) whose
  misses load on background threads, several requests waiting on one load.
- Asynchronous LoRA loading. A request starts denoising with the base weights while its LoRAs load. `LatePatch`
  (diffusers' `callback_on_step_end`, so the pipeline itself is unchanged) patches each LoRA in at the first step
  boundary after its load lands, and blocks only at step K = round(wait_fraction * N) (the paper's code waits at
  step 20 of 50: wait_fraction 0.4). K = 0 is the usual apply-then-generate. A LoRA already cached is applied
  before step 0.
- In-place patching. `LoRAPatcher` adds scale * (alpha / r) * B A to each targeted weight in place, one fused
  `addmm_` per layer (3-4 ms for the tiny UNet's every layer), at the step boundary where a cold LoRA landed or
  before step 0 for a resident one, and keeps a copy of every tensor it touched. (The products used to be built on
  a background thread as the LoRA landed, leaving the boundary one addition per layer; on 2 cores that thread
  takes a core from the denoising, and the fused patch at the boundary measured as fast or faster.) After the
  request the copies are written back, so the base weights are restored bit for bit (subtracting the delta again
  would not be: float addition does not invert exactly).
- ControlNet-as-a-service. The UNet needs the ControlNet's residuals only in its up path: diffusers adds the down
  residuals to the skip connections and the mid residual after the mid block. `ControlNetHooks` starts the ControlNet
  when the UNet is called and joins it after the mid block, so it runs concurrently with the down and mid blocks;
  the residuals are added in place where diffusers adds them. The condition image's embedding (the ControlNet's
  `controlnet_cond_embedding`, which diffusers recomputes at every step) is computed once a request
  (`FixedCondition`, swapped in for the request). The ControlNet runs on a thread of ours, or
  (`controlnet_process=True`, CPU) in a worker process of its own, `ControlNetProcess`: the paper's service. PyTorch
  kernels release the GIL, so two threads overlap in the kernels only, not in diffusers' Python glue; a step of a
  small model on a CPU is mostly glue, and there the thread gains nothing while the process takes the ControlNet's
  time off the step down to what outlasts the down path (`bench/swift_diffusion.py` measures both). The process
  costs a copy of each ControlNet it serves and an array round trip per step. Thread budget: on 2 cores the UNet
  and the ControlNet get one intra-op thread each (one per core, nothing oversubscribed). A call's UNet takes the
  cores its other workers do not hold (`unet_threads`): all of them without a concurrent ControlNet or a split, and
  always for the baseline, whose work is one thread's, as a plain diffusers user runs it.
- Guidance split (`guidance_split=True`). Under classifier-free guidance the UNet's batch is [unconditional;
  conditional]. `GuidanceSplit` runs the unconditional half on a worker thread of its own (one intra-op thread) while
  the caller runs the conditional half, and concatenates the two outputs, so two cores share one step even where one
  small batched call cannot use them. As in the paper, the ControlNet then runs on the conditional half only: the
  unconditional half gets no residuals (half the ControlNet's work; the image moves a little, measured as SSIM
  against the both-halves image in `bench/swift_diffusion.py`). Without guidance there is nothing to split.
- The ControlNet on the conditional half only (`controlnet_cond_only=True`, the predictor's default) without the
  split: under guidance the concurrent ControlNet computes the conditional half's residuals only (batch 1 for 2),
  added to the batch's conditional rows. The paper's ControlNet serves the conditional half; on 2 cores this is
  what shortens a ControlNet request (`bench/swift_diffusion.py`), where the split itself costs more than it gives.
- The baseline (`baseline=True`) is what a plain diffusers user does per request: fetch, `load_lora_weights` +
  `set_adapters` + `fuse_lora`, the ControlNet run before the UNet at every step
  (`StableDiffusionControlNetPipeline`), then `unfuse_lora` + `unload_lora_weights`.
- Backbone kernel optimizations (`compile_backbone=True`): the UNet's and every ControlNet's forward compiled by
  `torch.compile` (inductor: fused kernels, no Python glue per layer). A compiled UNet cannot join a concurrent
  ControlNet half-way: the join's hooks break its graph (a 0.88x step instead of 0.65x, measured). So compiled, the
  ControlNet runs right before the UNet on all cores and hands over its residuals as diffusers' ControlNet pipeline
  does (`ControlNetHooks(native=True)`: one pre-hook, outside the compiled forward); on 2 cores that is faster than
  the eager concurrent ControlNet (`bench/swift_diffusion.py` measures both). LoRAs are still patched in place: the
  compiled graph reads the weights as inputs, so a patch is seen at the next step. Shapes are static (a dynamic
  graph compiled in 200 s and ran slower): each new batch shape compiles once, 15-40 s on 2 cores, which is why
  the predictor warms up at load. Inductor needs a C++ compiler on a CPU (the image has one).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from distillery.papers.swift_diffusion.addons import LoRA

log = logging.getLogger(__name__)

ADDON_KINDS = ("lora", "controlnet")


def addon_nbytes(addon: Any) -> int:
    """Bytes an add-on holds in memory: a module's parameters and buffers, else its own `nbytes`."""
    if isinstance(addon, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in [*addon.parameters(), *addon.buffers()])
    return int(addon.nbytes)


class AddonCache:
    """Add-ons by (kind, name), at most `budget_bytes` of them kept, least recently used evicted first.

    `load(kind, name)` runs on one of `workers` background threads; an add-on larger than the whole budget is
    served but not kept."""

    def __init__(self, load: Callable[[str, str], Any], budget_bytes: int, workers: int = 2):
        if budget_bytes < 1 or workers < 1:
            raise ValueError(f"budget_bytes and workers must be >= 1, got {budget_bytes} and {workers}")
        self._load, self.budget_bytes = load, int(budget_bytes)
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self._inflight: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="addon-fetch")
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def keys(self) -> list[tuple[str, str]]:
        """Resident add-ons, least recently used first."""
        with self._lock:
            return list(self._items)

    def fetch(self, kind: str, name: str) -> tuple[Future, bool]:
        """The add-on as a future, and whether it was resident (a hit). A miss starts a background load, or joins
        the one already running for that add-on."""
        key = (kind, name)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                done: Future = Future()
                done.set_result(self._items[key])
                return done, True
            self.misses += 1
            if key not in self._inflight:
                self._inflight[key] = self._pool.submit(self._fill, key)
            return self._inflight[key], False

    def get(self, kind: str, name: str) -> tuple[Any, bool]:
        """The add-on, waiting for its load on a miss; and whether it was a hit."""
        future, hit = self.fetch(kind, name)
        return future.result(), hit

    def _fill(self, key: tuple[str, str]) -> Any:
        try:
            addon = self._load(*key)
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        size = addon_nbytes(addon)
        with self._lock:
            self._inflight.pop(key, None)
            if size > self.budget_bytes:
                log.warning("%s %s (%d bytes) is larger than the add-on cache (%d bytes): served, not kept",
                            *key, size, self.budget_bytes)
                return addon
            self._items[key], self._sizes[key] = addon, size
            while sum(self._sizes.values()) > self.budget_bytes:
                old, _ = self._items.popitem(last=False)
                del self._sizes[old]
                self.evictions += 1
        return addon


class LoRAPatcher:
    """Patches LoRAs into a UNet's weights in place; `restore` writes back the exact base tensors."""

    def __init__(self, unet: torch.nn.Module):
        self.modules = dict(unet.named_modules())
        self._saved: dict[str, torch.Tensor] = {}

    def check(self, lora: LoRA) -> None:
        """Every layer of the LoRA exists in this UNet with a weight of the shape B A has."""
        for name, (a, b) in lora.layers.items():
            weight = getattr(self.modules.get(name), "weight", None)
            if weight is None:
                raise ValueError(f"LoRA {lora.name!r} targets {name!r}, which this UNet does not have")
            if weight.shape[0] != b.shape[0] or weight[0].numel() != a[0].numel():
                raise ValueError(f"LoRA {lora.name!r} does not fit {name!r}: B A is {b.shape[0]} x {a[0].numel()}, "
                                 f"the weight {tuple(weight.shape)}")

    def _weight(self, name: str) -> torch.Tensor:
        """The layer's weight, its base copy kept before the first change."""
        weight = self.modules[name].weight
        if name not in self._saved:
            self._saved[name] = weight.detach().clone()
        return weight

    @torch.no_grad()
    def apply(self, lora: LoRA, scale: float) -> None:
        """W += scale * (alpha / r) * B A as one fused `addmm_` per layer (3-4 ms for a LoRA on every layer of the
        tiny UNet, with the restore): no product is built apart."""
        for name in lora.layers:
            weight = self._weight(name)
            weight.view(weight.shape[0], -1).addmm_(*lora.factors(name, weight.dtype), alpha=scale * lora.scaling)

    @torch.no_grad()
    def restore(self) -> None:
        for name, base in self._saved.items():
            self.modules[name].weight.copy_(base)
        self._saved.clear()


class LatePatch:
    """`callback_on_step_end`: each LoRA is patched in at the first step boundary after its fetch lands
    (`pending`: name, scale and the cache's future of the `LoRA`), and waited for at step `wait_step` at the latest.
    `applied_from[name]` is the first step that ran with it."""

    def __init__(self, patcher: LoRAPatcher, pending: list[tuple[str, float, Future]], wait_step: int, steps: int,
                 timeout_s: float | None = None):
        self.patcher, self.pending, self.wait_step, self.steps = patcher, pending, wait_step, steps
        self.timeout_s = timeout_s
        self.applied_from: dict[str, int] = {}

    def patch_ready(self, step: int) -> None:
        """Before `step` runs: patch what has landed; at the wait step, wait for the rest."""
        if step >= self.steps:
            return  # nothing left to run with it
        for name, scale, future in self.pending:
            if name not in self.applied_from and (future.done() or step >= self.wait_step):
                self.patcher.apply(_result(future, self.timeout_s, f"LoRA {name!r}"), scale)
                self.applied_from[name] = step

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        self.patch_ready(i + 1)
        return callback_kwargs


class FixedCondition(torch.nn.Module):
    """Stands in for a ControlNet's `controlnet_cond_embedding` during one request. The condition image is the same
    at every step, and so is its embedding: computed once here instead of at every step (diffusers recomputes it,
    a quarter of a small ControlNet's time)."""

    def __init__(self, net: torch.nn.Module, image: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("embedding", net(image), persistent=False)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:  # cond: the image tiled over guidance's halves
        return self.embedding.repeat(cond.shape[0] // self.embedding.shape[0], 1, 1, 1)


def controlnet_residuals(controlnet, image: torch.Tensor, scale: float, sample, timestep, text):
    """The ControlNet's (down residuals, mid residual) for one UNet call; the condition image, one per prompt, is
    repeated for every half of a guidance batch, as in diffusers' ControlNet pipeline."""
    cond = image.repeat(sample.shape[0] // image.shape[0], 1, 1, 1)
    return controlnet(sample, timestep, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=scale,
                      return_dict=False)


class ControlNetHooks:
    """A ControlNet attached to a UNet by forward hooks (the UNet is not edited): started when the UNet is called,
    on `executor`'s thread or in a `ControlNetProcess` (None: right there, sequentially), joined after the mid
    block; its residuals are added in place to the skip connections and to the mid block's output, exactly where
    diffusers adds them.
    `image` is the condition in [0, 1], one per prompt (B, 3, H, W); under guidance the UNet's batch is
    [unconditional; conditional] and the image is repeated for both halves, as in diffusers' ControlNet pipeline.
    `cond_only`: the ControlNet sees the conditional half only (half its work, as in the paper) and its residuals
    go to the batch's conditional rows; the unconditional rows get none. Under a `GuidanceSplit` those rows are the
    half the calling thread runs, and the hooks ignore the unconditional half on the split's worker thread."""

    def __init__(self, unet, controlnet, image: torch.Tensor, scale: float = 1.0,
                 executor: ThreadPoolExecutor | ControlNetProcess | None = None, cond_only: bool = False,
                 native: bool = False):
        if native and executor is not None:
            raise ValueError("native hands the residuals to the UNet's call: the ControlNet runs before it, "
                             "not on an executor")
        self.unet, self.controlnet, self.image, self.scale, self.executor = unet, controlnet, image, scale, executor
        self.cond_only, self.native = cond_only, native
        self._handles: list = []
        self._skips: list[torch.Tensor] = []
        self._job: Future | None = None
        self._owner: int | None = None
        self._own_net = None
        self.calls = 0

    def __enter__(self) -> "ControlNetHooks":
        u = self.unet
        if not isinstance(self.executor, ControlNetProcess):  # the process embeds the condition on its side
            self._own_net = self.controlnet.controlnet_cond_embedding  # put back at exit
            self.controlnet.controlnet_cond_embedding = FixedCondition(self._own_net, self.image)
        if self.native:
            self._handles = [u.register_forward_pre_hook(self._inject, with_kwargs=True)]
            return self
        if isinstance(self.executor, ControlNetProcess):
            self.executor.begin(self.controlnet, self.image, self.scale)
        self._handles = [u.register_forward_pre_hook(self._start, with_kwargs=True),
                         u.conv_in.register_forward_hook(lambda m, a, out: self._skip(out)),
                         *[b.register_forward_hook(lambda m, a, out: self._skip(*out[1])) for b in u.down_blocks],
                         u.mid_block.register_forward_hook(self._join)]
        return self

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _skip(self, *outs: torch.Tensor) -> None:
        if self._mine():
            self._skips.extend(outs)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._skips, self._job = [], [], None
        if self._own_net is not None:
            self.controlnet.controlnet_cond_embedding, self._own_net = self._own_net, None

    def _run(self, sample, timestep, text):
        return controlnet_residuals(self.controlnet, self.image, self.scale, sample, timestep, text)

    def _inputs(self, args, kwargs) -> tuple:
        """The UNet call's (sample, timestep, text), of its conditional half only under `cond_only`."""
        names = ("sample", "timestep", "encoder_hidden_states")
        sample, timestep, text = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        if self.cond_only:
            (sample, timestep, text), _ = _halves(sample.shape[0], sample, timestep, text)[1]
        return sample, timestep, text

    def _inject(self, module, args, kwargs):
        """native: the residuals computed here, before the UNet's (compiled) forward, passed in as its
        `down_block_additional_residuals` / `mid_block_additional_residual`; the unconditional rows get zeros."""
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        down, mid = self._run(*self._inputs(args, kwargs))
        self.calls += 1
        if mid.shape[0] < rows:
            down = tuple(_pad_rows(d, rows) for d in down)
            mid = _pad_rows(mid, rows)
        return args, {**kwargs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _start(self, module, args, kwargs):
        sample, timestep, text = self._inputs(args, kwargs)
        self._skips, self._owner = [], threading.get_ident()
        self.calls += 1
        if self.executor is None:
            done: Future = Future()
            done.set_result(self._run(sample, timestep, text))
            self._job = done
        elif isinstance(self.executor, ControlNetProcess):
            self._job = self.executor.submit(sample, timestep, text)
        else:
            self._job = self.executor.submit(_in_callers_mode(self._run), sample, timestep, text)

    def _join(self, module, args, output):
        if not self._mine():
            return None
        down, mid = self._job.result()
        if len(down) != len(self._skips):
            raise RuntimeError(f"the ControlNet gave {len(down)} residuals for the UNet's {len(self._skips)} skips")
        # Residuals of the conditional half only go to the batch's last rows; the unconditional rows get none.
        rows = slice(output.shape[0] - mid.shape[0], None)
        for skip, residual in zip(self._skips, down):
            skip[rows].add_(residual)  # the UNet's up path reads these very tensors
        output[rows].add_(mid)  # likewise the mid block's output, which the hook leaves in place


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` as the batch's last rows, zeros before it."""
    return torch.cat([x.new_zeros((rows - x.shape[0], *x.shape[1:])), x])


def compile_forward(module: torch.nn.Module) -> torch.nn.Module:
    """The module's forward compiled in place (once), static shapes. The forward, not the module's call: its
    hooks (a ControlNet's pre-hook) stay outside the graph."""
    if not getattr(module, "_distillery_compiled", False):
        module.forward = torch.compile(module.forward, dynamic=False)
        module._distillery_compiled = True
    return module


_SERVICE_KEYS = itertools.count()


class ControlNetProcess:
    """ControlNet-as-a-service in a worker process of its own: the ControlNet overlaps the UNet's down path without
    sharing the interpreter's lock. A thread overlaps only inside PyTorch kernels; where a step is mostly diffusers'
    Python glue (a small model, a CPU), the two threads take turns and the ControlNet gains nothing. The process
    (spawned at the first ControlNet call, one intra-op thread per `threads`) keeps a copy of the last `keep`
    ControlNets it was sent (a ControlNet's weights are copied once, when a request first uses it); per step it
    receives the latents, timestep and text embeddings and answers the residuals. CPU only: tensors cross as
    arrays. A request that ends between a step's start and its join leaves one answer unread, drained before the
    next request's first step; a worker that dies fails its request and is started again for the next one."""

    def __init__(self, threads: int = 1, keep: int = 2):
        self.threads, self.keep = threads, keep
        self._conn = self._proc = None
        self._sent: OrderedDict[int, None] = OrderedDict()
        self._unread = 0

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        import multiprocessing as mp

        self.close()
        ctx = mp.get_context("spawn")  # never fork a process that runs server and fetch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_controlnet_service, args=(child, self.threads), daemon=True,
                                 name="controlnet-service")
        self._proc.start()
        child.close()
        self._sent.clear()
        self._unread = 0

    def begin(self, controlnet, image: torch.Tensor, scale: float) -> None:
        """Before a request's first step: this ControlNet (sent once), its condition image and scale."""
        self._ensure()
        self._drain()
        key = vars(controlnet).get("_service_key")
        if key is None:  # a token of our own: the id of a collected model can come back
            key = controlnet._service_key = next(_SERVICE_KEYS)
        if key not in self._sent:
            self._send(("load", key, dict(controlnet.config),
                        {k: v.detach().cpu().numpy() for k, v in controlnet.state_dict().items()}))
            self._sent[key] = None
            while len(self._sent) > self.keep:
                self._send(("drop", self._sent.popitem(last=False)[0]))
        self._sent.move_to_end(key)
        self._send(("begin", key, image.detach().cpu().numpy(), float(scale)))

    def submit(self, sample: torch.Tensor, timestep, text: torch.Tensor) -> "ControlNetProcess":
        t = timestep.detach().cpu().numpy() if isinstance(timestep, torch.Tensor) else timestep
        self._send(("run", sample.detach().cpu().numpy(), t, text.detach().cpu().numpy()))
        self._unread += 1
        return self

    def result(self):
        """The residuals of the last `submit` (down tuple, mid), as `ControlNetModel` returns them."""
        kind, payload = self._recv()
        self._unread -= 1
        if kind == "error":
            raise RuntimeError(f"the ControlNet worker process failed: {payload}")
        down, mid = payload
        return tuple(torch.from_numpy(d) for d in down), torch.from_numpy(mid)

    def _drain(self) -> None:
        while self._unread:
            self._recv()
            self._unread -= 1

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionError, OSError) as e:
            self._dead(e)

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, ConnectionError, OSError) as e:
            self._dead(e)

    def _dead(self, e: Exception):
        code = self._proc.exitcode if self._proc is not None else None
        self.close()
        raise RuntimeError(f"the ControlNet worker process stopped (exit code {code}); it restarts with the next "
                           f"request") from e

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            self._conn.close()
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn = self._proc = None


def _controlnet_service(conn, threads: int) -> None:
    """The worker process of `ControlNetProcess`."""
    from diffusers import ControlNetModel

    torch.set_num_threads(threads)
    models: dict[int, tuple] = {}  # key -> (ControlNet, its own condition embedding net)
    broken: dict[int, str] = {}  # ControlNets whose load failed, and why
    model = image = scale = None
    failed = ""  # why the request's ControlNet could not be set up, answered at each of its steps
    with torch.inference_mode():
        while (msg := _next(conn)) is not None:
            try:
                if msg[0] == "load":
                    _, key, config, state = msg
                    cn = ControlNetModel.from_config(config)
                    cn.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
                    models[key] = cn.eval(), cn.controlnet_cond_embedding
                elif msg[0] == "drop":
                    models.pop(msg[1], None)
                elif msg[0] == "begin":
                    failed = broken.get(msg[1], "")
                    if not failed:
                        (model, net), image, scale = models[msg[1]], torch.from_numpy(msg[2]), msg[3]
                        model.controlnet_cond_embedding = FixedCondition(net, image)  # for this request
                elif failed:
                    conn.send(("error", failed))
                else:
                    down, mid = controlnet_residuals(model, image, scale, *(torch.as_tensor(x) for x in msg[1:]))
                    conn.send(("ok", ([d.numpy() for d in down], mid.numpy())))
            except Exception as e:  # answered at a step's join: never a silent wrong image
                failed = f"{msg[0]}: {type(e).__name__}: {e}"
                if msg[0] == "load":
                    broken[msg[1]] = failed
                elif msg[0] == "run":
                    conn.send(("error", failed))
                    failed = ""


def _next(conn):
    """The next message; None when the server closes the service or goes away (a server that exits without
    `close` leaves the pipe closed under a daemon worker: no traceback for that)."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def _in_callers_mode(fn: Callable) -> Callable:
    """`fn` to run on another thread under the caller's grad / inference mode (both are per thread)."""
    inference = torch.is_inference_mode_enabled()

    def run(*args, **kwargs):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(*args, **kwargs)
    return run


def _halves(n: int, *args, **kwargs) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of a UNet call cut into its batch halves: every tensor with `n` rows is cut (a scalar
    timestep, or one shared by the batch, is not), nested dicts such as `added_cond_kwargs` included."""
    def cut(x, rows: slice):
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n:
            return x[rows]
        if isinstance(x, dict):
            return {k: cut(v, rows) for k, v in x.items()}
        return x

    return [(tuple(cut(a, rows) for a in args), {k: cut(v, rows) for k, v in kwargs.items()})
            for rows in (slice(0, n // 2), slice(n // 2, n))]


class GuidanceSplit:
    """Classifier-free guidance's two halves on two workers: while active, a UNet call with an even batch
    [unconditional; conditional] runs its first half on `executor`'s thread and its second half on the caller's,
    and returns the two outputs concatenated, in the form the call asked for. Forward hooks on the UNet itself see
    the whole call once; hooks on its blocks see each half, from the thread that runs it."""

    def __init__(self, unet, executor: ThreadPoolExecutor):
        self.unet, self.executor = unet, executor
        self.calls = 0

    def __enter__(self) -> "GuidanceSplit":
        self._own = vars(self.unet).get("forward")  # a forward set on the instance before us (an offload hook)
        self._forward = self.unet.forward
        self.unet.forward = self._split
        return self

    def __exit__(self, *exc) -> None:
        if self._own is None:
            del self.unet.forward  # the class's forward again
        else:
            self.unet.forward = self._own

    def _split(self, sample, *args, **kwargs):
        n = sample.shape[0]
        if n < 2 or n % 2:
            return self._forward(sample, *args, **kwargs)
        self.calls += 1
        (u_args, u_kwargs), (c_args, c_kwargs) = _halves(n, sample, *args, **kwargs)
        uncond = self.executor.submit(_in_callers_mode(self._forward), *u_args, **u_kwargs)
        try:
            cond = self._forward(*c_args, **c_kwargs)
        finally:
            u = uncond.result()  # never leave the worker running on a UNet the caller goes on using
        if isinstance(cond, tuple):
            return (torch.cat([u[0], cond[0]]), *cond[1:])
        return type(cond)(sample=torch.cat([u.sample, cond.sample]))


def _result(future: Future, timeout_s: float | None, what: str):
    """A fetch's result, waiting at most `timeout_s`: a store that hangs must not hold the model forever."""
    try:
        return future.result(timeout_s)
    except TimeoutError:
        raise TimeoutError(f"{what} was not fetched within {timeout_s} s") from None


def worker(name: str, threads: int = 1) -> ThreadPoolExecutor:
    """One thread with its own intra-op thread budget (the ControlNet's, the unconditional half's)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(threads,))


@dataclass
class Generation:
    """One call's prompts and options. `control_image`: (B, 3, H, W) in [0, 1], one per prompt."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    negative_prompt: str = ""
    loras: list[tuple[str, float]] = field(default_factory=list)
    controlnet: str | None = None
    control_image: torch.Tensor | None = None
    controlnet_scale: float = 1.0


class SwiftRuntime:
    """A StableDiffusionPipeline with add-ons from `cache` (kinds "lora": a `LoRA`, "controlnet": a
    `ControlNetModel`). Not thread-safe: one generation at a time (the caller holds a lock)."""

    def __init__(self, pipe, cache: AddonCache, *, wait_fraction: float = 0.4, parallel_controlnet: bool = True,
                 controlnet_process: bool = False, controlnet_threads: int = 1, guidance_split: bool = False,
                 controlnet_cond_only: bool = False, compile_backbone: bool = False, baseline: bool = False,
                 fetch_timeout_s: float | None = 120.0):
        if not 0 <= wait_fraction < 1:
            raise ValueError(f"wait_fraction must be in [0, 1), got {wait_fraction}")
        if compile_backbone and (baseline or guidance_split):
            raise ValueError("compile_backbone does not combine with " + (
                "baseline: the baseline is plain diffusers" if baseline else
                "guidance_split: the compiled UNet runs both halves in one call"))
        self.pipe, self.cache, self.wait_fraction, self.baseline = pipe, cache, wait_fraction, baseline
        self.fetch_timeout_s, self.controlnet_threads = fetch_timeout_s, controlnet_threads
        self.controlnet_cond_only = controlnet_cond_only
        self.cores = len(os.sched_getaffinity(0))
        self.patcher = LoRAPatcher(pipe.unet)
        self.compiled = compile_backbone
        if compile_backbone:  # the ControlNets are compiled as they are first used
            for module in (pipe.unet, pipe.text_encoder, pipe.vae.decoder):
                compile_forward(module)
        parallel = parallel_controlnet and not baseline and not compile_backbone
        # The process holds its tensors in host memory: on an accelerator the ControlNet stays on a thread.
        if parallel and controlnet_process and pipe.device.type == "cpu":
            self.executor: ThreadPoolExecutor | ControlNetProcess | None = ControlNetProcess(controlnet_threads)
        else:
            self.executor = worker("controlnet", controlnet_threads) if parallel else None
        self.guidance_worker = worker("unconditional") if guidance_split and not baseline else None

    def close(self) -> None:
        """Stops the ControlNet worker process, if one runs (it is a daemon: it also ends with this process)."""
        if isinstance(self.executor, ControlNetProcess):
            self.executor.close()

    def wait_step(self, steps: int) -> int:
        return min(round(self.wait_fraction * steps), steps - 1)

    def split(self, g: Generation) -> bool:
        return self.guidance_worker is not None and g.guidance > 1  # diffusers batches both halves only then

    def unet_threads(self, g: Generation) -> int:
        """Intra-op threads for the calling thread (the UNet, the conditional half under a split): the cores less
        those the call's other threads hold, the concurrent ControlNet's and the unconditional half's."""
        held = (self.controlnet_threads if g.controlnet is not None and self.executor is not None else 0) \
            + (1 if self.split(g) else 0)
        return max(1, self.cores - held)

    def generate(self, g: Generation, output_type: str = "pil") -> tuple[list, dict]:
        """Images and a report of what happened: per LoRA its cache hit or miss and the first step it ran in."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.unet_threads(g))
        try:
            return self._generate(g, output_type)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, g: Generation, output_type: str) -> tuple[list, dict]:
        gens = [torch.Generator().manual_seed(int(s)) for s in g.seeds]
        common = dict(num_inference_steps=g.steps, guidance_scale=g.guidance, generator=gens, output_type=output_type,
                      negative_prompt=[g.negative_prompt] * len(g.prompts) if g.negative_prompt else None)
        if self.baseline:
            return self._baseline(g, common)
        report: dict = {"wait_step": self.wait_step(g.steps), "loras": []}
        pending, resident = [], []
        for name, scale in g.loras:  # loads start now, in the background
            future, hit = self.cache.fetch("lora", name)
            if hit:  # patched before step 0, right here
                resident.append((name, future.result(), scale))
            else:
                pending.append((name, scale, future))
            report["loras"].append({"name": name, "scale": scale, "cache": "hit" if hit else "miss"})
        late = LatePatch(self.patcher, pending, report["wait_step"], g.steps, self.fetch_timeout_s)
        split = report["guidance_split"] = self.split(g)
        try:
            for name, lora, scale in resident:
                self.patcher.apply(lora, scale)
                late.applied_from[name] = 0
            cond_only = split or (self.controlnet_cond_only and g.guidance > 1)  # a batch of two halves
            with self._split(split), self._controlnet(g, report, cond_only=cond_only) as hooks:
                late.patch_ready(0)
                images = self.pipe(g.prompts, callback_on_step_end=late if pending else None, **common).images
            if hooks is not None:
                report["controlnet"]["unet_calls"] = hooks.calls
        finally:
            self.patcher.restore()
        for entry in report["loras"]:
            entry["applied_from_step"] = late.applied_from[entry["name"]]
        return images, report

    @contextmanager
    def _split(self, on: bool):
        if not on:
            yield None
            return
        with GuidanceSplit(self.pipe.unet, self.guidance_worker) as split:
            yield split

    @contextmanager
    def _controlnet(self, g: Generation, report: dict, cond_only: bool = False):
        if g.controlnet is None:
            yield None
            return
        future, hit = self.cache.fetch("controlnet", g.controlnet)
        controlnet = _result(future, self.fetch_timeout_s, f"ControlNet {g.controlnet!r}")  # needed from step 0
        report["controlnet"] = {"name": g.controlnet, "cache": "hit" if hit else "miss",
                                "parallel": self.executor is not None,
                                "process": isinstance(self.executor, ControlNetProcess),
                                "conditional_half_only": cond_only, "compiled": self.compiled}
        if self.compiled:
            compile_forward(controlnet)
        with ControlNetHooks(self.pipe.unet, controlnet, g.control_image, g.controlnet_scale, self.executor,
                             cond_only=cond_only, native=self.compiled) as hooks:
            yield hooks

    def _baseline(self, g: Generation, common: dict) -> tuple[list, dict]:
        from diffusers import StableDiffusionControlNetPipeline

        pipe, report, adapters = self.pipe, {"wait_step": 0, "loras": []}, []
        try:
            for i, (name, scale) in enumerate(g.loras):
                future, hit = self.cache.fetch("lora", name)
                lora = _result(future, self.fetch_timeout_s, f"LoRA {name!r}")
                pipe.load_lora_weights(dict(lora.state_dict), adapter_name=f"request{i}")
                adapters.append(f"request{i}")
                report["loras"].append({"name": name, "scale": scale, "cache": "hit" if hit else "miss",
                                        "applied_from_step": 0})
            if adapters:
                pipe.set_adapters(adapters, adapter_weights=[s for _, s in g.loras])
                pipe.fuse_lora(adapter_names=adapters)
            if g.controlnet is None:
                images = pipe(g.prompts, **common).images
            else:
                future, hit = self.cache.fetch("controlnet", g.controlnet)
                controlnet = _result(future, self.fetch_timeout_s, f"ControlNet {g.controlnet!r}")
                report["controlnet"] = {"name": g.controlnet, "cache": "hit" if hit else "miss", "parallel": False}
                parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
                cn_pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet,
                                                            requires_safety_checker=False)
                cn_pipe.set_progress_bar_config(disable=True)
                images = cn_pipe(g.prompts, image=g.control_image, controlnet_conditioning_scale=g.controlnet_scale,
                                 height=g.control_image.shape[-2], width=g.control_image.shape[-1], **common).images
        finally:
            if adapters:
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
        return images, report
