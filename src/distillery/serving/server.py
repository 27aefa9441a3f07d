"""KServe ModelServer on 127.0.0.1 with request limits.

KServe 0.21 hard-codes host 0.0.0.0 in its uvicorn config; our RESTServer subclass sets the host right after
KServe builds that config (locally 127.0.0.1; `--host 0.0.0.0` only inside a pod). A body-size middleware
answers 413 before a large body is read, malformed JSON gets a 400 instead of KServe's generic 500, and
client mistakes are logged as one warning line instead of an error with a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

KINDS: dict[str, Callable[..., object]] = {}


def register_kind(name: str):
    def deco(factory):
        KINDS[name] = factory
        return factory
    return deco


class RequestLimits:
    """ASGI middleware: reject oversized bodies (413) and bodies that are not JSON (400) on inference routes."""

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
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._error(scope, receive, send, 413,
                                         f"request body larger than {self.max_body_bytes} bytes")
        if headers.get(b"content-type", b"application/json").startswith(b"application/json"):
            try:
                json.loads(body or b"null", parse_constant=_no_constants)
            except (ValueError, UnicodeDecodeError) as e:
                return await self._error(scope, receive, send, 400, f"request body is not valid JSON: {e}")
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


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number (send finite numbers only)")


async def _client_error(request, exc):
    log.warning("400 %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc)}, status_code=400)


def detect_kind(model_dir: Path) -> str:
    """The predictor a model folder needs: a saved policy or a diffusers pipeline."""
    if (Path(model_dir) / "policy.json").exists():
        return "policy"
    if (Path(model_dir) / "model_index.json").exists():
        return "text-to-image"
    raise FileNotFoundError(f"{model_dir} holds neither a saved policy (policy.json) nor a diffusers pipeline "
                            f"(model_index.json)")


def serve(model_dir: Path, name: str, kind: str = "auto", port: int = 8080, host: str = "127.0.0.1",
          max_body_bytes: int = 1 << 20) -> None:
    """Load the model and serve it until interrupted (V1 + V2 REST, /metrics). kind "auto" reads the folder."""
    import kserve
    import kserve.model_server as ms
    import kserve.protocol.rest.server as rest
    from kserve.errors import InvalidInput

    import distillery.serving.hybrid  # noqa: F401 - registers its kinds
    import distillery.serving.policy  # noqa: F401 - registers its kind
    import distillery.serving.text_to_image  # noqa: F401 - registers its kind

    if kind == "auto":
        kind = detect_kind(model_dir)
    if kind not in KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}; available: {sorted(KINDS)}")
    model = KINDS[kind](name, Path(model_dir))
    model.load()

    class RESTServerOnHost(rest.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host

        def _add_exception_handlers(self, app):
            super()._add_exception_handlers(app)
            app.add_exception_handler(InvalidInput, _client_error)

    ms.RESTServer = RESTServerOnHost  # ModelServer.start() builds its REST server from this name
    ms.app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes)
    log.info("serving %s (%s) on http://%s:%d", name, kind, host, port)
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([model])
