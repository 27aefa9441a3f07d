"""KServe ModelServer on 127.0.0.1 with request limits, V2 gRPC, readiness that follows the model, and overload
answers.

KServe 0.21 hard-codes host 0.0.0.0 (REST) and [::] (gRPC); our server subclasses bind the given host instead
(locally 127.0.0.1; `--host 0.0.0.0` only inside a pod). A body-size middleware answers 413 before a large body is
read, malformed JSON gets a 400 instead of KServe's generic 500, and client mistakes are logged as one warning line
instead of an error with a traceback. The model loads in the background: the server is live at once and ready once
the model is. A full queue is answered 503 with Retry-After, a passed request deadline 504.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import kserve
import numpy as np
from kserve.errors import InvalidInput, ModelNotReady, ServerNotReady
from starlette.responses import JSONResponse

from distillery.models import files
from distillery.serving.batching import Batcher, DeadlineExceeded, ModelFailed, Overloaded

INFERENCE_HEADER = b"inference-header-content-length"

log = logging.getLogger(__name__)

KINDS: dict[str, Callable[..., object]] = {}


def register_kind(name: str):
    def deco(factory):
        KINDS[name] = factory
        return factory
    return deco


class RequestLimits:
    """ASGI middleware on POST routes: reject oversized bodies (413) and bodies that are not JSON (400).

    A body with the binary tensor extension (`Inference-Header-Content-Length: N`) is checked as N bytes of JSON
    followed by the raw tensors. A form content type (curl's default for `-d`) on a body that is JSON is taken as
    JSON, so `curl -d '{...}'` works without `-H 'Content-Type: application/json'`; so is a body without a content
    type (tritonclient's JSON requests)."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._error(scope, receive, send, 413, f"request body larger than {self.max_body_bytes} bytes")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._error(scope, receive, send, 413,
                                         f"request body larger than {self.max_body_bytes} bytes")
        content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        binary = headers.get(INFERENCE_HEADER)
        if binary is not None:
            if not binary.strip().isdigit() or int(binary) > len(body):
                return await self._error(scope, receive, send, 400, f"header {INFERENCE_HEADER.decode()} must be the "
                                         f"byte length of the JSON part of the body (<= {len(body)}), got {binary!r}")
            error = _json_error(body[:int(binary)])
        elif content_type in (b"application/json", b"application/x-www-form-urlencoded") \
                or content_type.endswith(b"+json"):  # application/cloudevents+json is JSON too
            error = _json_error(body)
            if error is None and not content_type.endswith(b"+json") \
                    and headers.get(b"content-type") != b"application/json":  # FastAPI parses only JSON
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}
        else:
            error = None
        if error is not None:
            return await self._error(scope, receive, send, 400, f"request body is not valid JSON: {error}")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _error(scope, receive, send, status: int, message: str):
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)


def _json_error(raw: bytes) -> str | None:
    try:
        json.loads(raw or b"null", parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return str(e)
    return None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number (send finite numbers only)")


async def _client_error(request, exc):
    log.warning("400 %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _overloaded(request, exc):
    log.warning("503 %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})


async def _deadline(request, exc):
    return JSONResponse({"error": str(exc)}, status_code=504)


async def _unavailable(request, exc):
    return JSONResponse({"error": str(exc)}, status_code=503)


class ServedModel(kserve.Model):
    """What every predictor shares: cheap checks before the server starts (`check`), the model loaded in the
    background after the model folder's recorded hashes are verified (`load_model`), readiness that is false while
    loading and after a fatal model error, and one dynamic `Batcher` for the model calls (`run_batch`)."""

    max_items = 8  # items (prompts, observation histories) one model call takes

    def __init__(self, name: str, model_dir: Path, *, batch_window_s: float = 0.01, max_queue: int = 32):
        # A kind is built as factory(name, model_dir); serve() sets the batching options afterwards.
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.batch_window_s, self.max_queue = batch_window_s, max_queue
        self.failure: str | None = None
        self._loading = threading.Lock()
        self.batcher: Batcher | None = None

    def check(self) -> None:
        """Fast checks of the model folder, run before the server starts; raise with a clear message."""

    def load_model(self) -> None:
        """Each kind loads its own model (text-to-image, policy, navigation); the base has none to load."""
        raise NotImplementedError

    def run_batch(self, key, items: list) -> list:
        """Each kind answers one merged batch of compatible items, in order; the base has no model to call."""
        raise NotImplementedError

    def load(self) -> bool:
        """Verify the folder against its recorded hashes, then load. Also called by KServe for a model that is
        not ready: answered 503 while another load runs or after a failure, instead of loading twice."""
        if self.ready:
            return True
        if self.failure:
            raise ModelNotReady(self.name, self.failure)
        if not self._loading.acquire(blocking=False):
            raise ModelNotReady(self.name, "it is still loading")
        try:
            if not files.verify(self.model_dir):
                log.warning("%s has no %s: its files cannot be checked", self.model_dir, files.HASHES)
            self.load_model()
            self.batcher = Batcher(self.run_batch, max_items=self.max_items, window_s=self.batch_window_s,
                                   max_queue=self.max_queue, on_fatal=self.fail)
            self.ready = True
        except Exception as e:
            self.fail(e)
            raise
        finally:
            self._loading.release()
        return True

    def fail(self, exc: BaseException) -> None:
        """A fatal model error: readiness turns false (liveness stays true) and requests get 503."""
        self.ready = False
        self.failure = f"{type(exc).__name__}: {exc}"
        log.error("model %s is not ready: %s", self.name, self.failure)

    async def healthy(self) -> bool:
        return self.ready


def v2_array(inp, datatypes: tuple[str, ...]) -> np.ndarray:
    """A V2 input as a numpy array, whether it came as JSON data, binary tensor data or over gRPC."""
    if inp.datatype not in datatypes:
        raise InvalidInput(f"input '{inp.name}' must have datatype {' or '.join(datatypes)}, got {inp.datatype}")
    try:
        return inp.as_numpy()
    except InvalidInput:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's many ways of saying the data does not fit the shape
        raise InvalidInput(f"input '{inp.name}': data does not match datatype {inp.datatype} and shape "
                           f"{inp.shape}: {e}") from None


def v2_parameters(request) -> dict:
    """A V2 request's parameters as plain values (gRPC hands over InferParameter messages), less KServe's own switch
    for the binary data extension (`binary_data_output`, which tritonclient sends): it is not a model parameter."""
    from kserve.protocol.infer_type import to_http_parameters

    params = request.parameters or {}
    params = dict(to_http_parameters(params)) if request.from_grpc else dict(params)
    params.pop("binary_data_output", None)
    return params


def binary_output(request, name: str) -> bool:
    """Whether output `name` goes as raw bytes: always over gRPC; over REST as the request asks for that output
    (`binary_data`), else for every output (`binary_data_output`)."""
    if request.from_grpc:
        return True
    asked = [o for o in request.request_outputs or [] if o.name == name]
    return bool(asked[0].binary_data) if asked else bool(request.use_binary_outputs)


def detect_kind(model_dir: Path) -> str:
    """The predictor a model folder needs: a saved policy (its policy.json names the kind: "policy",
    "navigation" or "locomotion") or a diffusers pipeline."""
    if (Path(model_dir) / "policy.json").exists():
        return json.loads((Path(model_dir) / "policy.json").read_text()).get("kind", "policy")
    if (Path(model_dir) / "model_index.json").exists():  # its distillery.json may name another diffusers kind
        cfg = Path(model_dir) / "distillery.json"
        return json.loads(cfg.read_text()).get("kind", "text-to-image") if cfg.exists() else "text-to-image"
    raise FileNotFoundError(f"{model_dir} holds neither a saved policy (policy.json) nor a diffusers pipeline "
                            f"(model_index.json)")


def _kinds() -> dict:
    import distillery.serving.hybrid  # noqa: F401 - registers its kinds
    import distillery.serving.locomotion  # noqa: F401 - registers its kind
    import distillery.serving.navigation  # noqa: F401 - registers its kind
    import distillery.serving.policy  # noqa: F401 - registers its kind
    import distillery.serving.swift_diffusion  # noqa: F401 - registers its kinds
    import distillery.serving.text_to_image  # noqa: F401 - registers its kind

    return KINDS


def serve(model_dir: Path, name: str, kind: str = "auto", port: int = 8080, host: str = "127.0.0.1",
          max_body_bytes: int = 1 << 20, grpc_port: int | None = 8081, batch_window_ms: float = 10.0,
          max_queue: int = 32, after: threading.Thread | None = None) -> None:
    """Serve a model folder until interrupted: V1 and V2 REST on `port`, V2 gRPC on `grpc_port` (None: off),
    /metrics. The folder is checked before the server starts and loaded while it starts; readiness turns true
    once it is loaded. kind "auto" reads the folder. `after`: a thread to wait for before loading."""
    import kserve.model_server as ms
    import kserve.protocol.grpc.server as grpc_server
    import kserve.protocol.rest.server as rest

    kinds = _kinds()
    if kind == "auto":
        kind = detect_kind(model_dir)
    if kind not in kinds:
        raise ValueError(f"unknown predictor kind {kind!r}; available: {sorted(kinds)}")
    model = kinds[kind](name, Path(model_dir))
    if isinstance(model, ServedModel):
        model.batch_window_s, model.max_queue = batch_window_ms / 1000, max_queue
        model.check()

    def load_in_background():
        try:
            if after is not None:
                after.join()  # imports the model's libraries; loading alongside it could race them
            model.load()
            log.info("model %s (%s) is ready", name, kind)
        except Exception:  # noqa: BLE001 - logged; readiness stays false, liveness true
            log.exception("loading %s from %s failed; the predictor stays live but not ready", name, model_dir)

    threading.Thread(target=load_in_background, name="load", daemon=True).start()

    class RESTServerOnHost(rest.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host

        def _add_exception_handlers(self, app):
            super()._add_exception_handlers(app)
            app.add_exception_handler(InvalidInput, _client_error)
            app.add_exception_handler(Overloaded, _overloaded)
            app.add_exception_handler(DeadlineExceeded, _deadline)
            app.add_exception_handler(ModelFailed, _unavailable)
            app.add_exception_handler(ServerNotReady, _unavailable)  # readiness probes while loading: no traceback
            app.add_exception_handler(ModelNotReady, _unavailable)

    class GRPCServerOnHost(grpc_server.GRPCServer):
        async def start(self, max_workers):
            # KServe listens on [::] with no option; bind the same host as REST (loopback locally).
            make = grpc_server.aio.server

            def on_host(*args, **kwargs):
                server = make(*args, **kwargs)
                add = server.add_insecure_port
                server.add_insecure_port = lambda addr: add(f"{host}:{self._port}")
                return server

            grpc_server.aio = SimpleNamespace(server=on_host)
            try:
                await super().start(max_workers)
            except RuntimeError as e:  # the port is taken: REST keeps serving rather than the process exiting
                log.error("V2 gRPC is off: cannot listen on %s:%d (%s)", host, self._port, e)
            finally:
                grpc_server.aio = aio

    from grpc import aio

    ms.RESTServer = RESTServerOnHost  # ModelServer.start() builds its servers from these names
    ms.GRPCServer = GRPCServerOnHost
    ms.app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes)
    server = kserve.ModelServer(http_port=port, grpc_port=grpc_port or 0, enable_grpc=grpc_port is not None,
                                workers=1)
    server.register_model(model)

    async def ready() -> bool:  # KServe's server readiness is always true; ours is the model's
        return model.ready

    server.dataplane.ready = ready
    metadata = server.dataplane.model_metadata

    async def model_metadata(model_name: str) -> dict:  # a kind reads its shapes from the loaded model: 503 before
        if model_name == name and not model.ready:
            raise ModelNotReady(name, model.failure or "it is still loading")
        return await metadata(model_name)

    server.dataplane.model_metadata = model_metadata
    log.info("serving %s (%s) on http://%s:%d%s", name, kind, host, port,
             f" and grpc://{host}:{grpc_port}" if grpc_port else "")
    server.start([])  # registered above: start() would refuse a model that is still loading
