"""The FastAPI application: middleware (body limit, bearer token, in-flight gauge), one-line
JSON errors, and the routes of both protocols (``v2.py``, ``tfserving.py``)."""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import randkit
from randkit.serve.options import RequestError, shown
from randkit.serve.protocol import ErrorBody, V2InferRequest
from randkit.serve.repository import ServedModel
from randkit.serve.server import Server, ServerSettings
from randkit.serve.traffic import resolve_version

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# Names pydantic gives the members of a union in an error's location (int, list[...], ...).
_UNION_MEMBER = re.compile(r"^(int|float|str|list\[.*\]|dict\[.*\]|Numbers)$")


def _one_line(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    parts = [str(p) for p in first.get("loc", ()) if p != "body"]
    tensor_data = any(_UNION_MEMBER.match(p) for p in parts) and parts[0] in (
        "inputs",
        "instances",
    )
    where = ".".join(p for p in parts if not _UNION_MEMBER.match(p)) or "body"
    got = shown(first.get("input"))
    if tensor_data:
        return f"{where}: holds values that are not numbers (strings, booleans, nulls), got {got}"
    if first.get("type") == "missing":
        return f"{where}: field required"
    if first.get("type") == "json_invalid":
        return f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    return f"{where}: {first.get('msg', 'invalid')}, got {got}"


def _protocol(path: str) -> str:
    return "v2" if path.startswith("/v2/") else "tf" if path.startswith("/v1/") else "other"


def _is_inference(scope: Scope) -> bool:
    path = scope["path"]
    return scope["method"] == "POST" and path.endswith(("/infer", ":predict", ":classify"))


class _Guard:
    """Pure ASGI middleware: bearer token, body-size limit, body timeout, in-flight gauge.
    The body is read here, up to the limit, so an oversized one is refused before any
    parsing; one that stops short of its declared length is dropped after the timeout."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app, self.server = app, server
        self.limit = int(server.settings.max_body_mb * 1024 * 1024)
        self.timeout = server.settings.body_timeout_s
        token = server.settings.token
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope["method"] == "POST" and headers.get(b"content-type") != b"application/json":
            # Every POST body here is JSON (or a V2 binary body, read by hand); like Triton,
            # do not insist on the content type.
            scope = {**scope, "headers": _json_content_type(scope["headers"])}
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = self._refuse(
                    scope, 401, "authorization: a valid bearer token is required"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_big(scope)(scope, receive, send)
            return
        if _is_inference(scope):
            with self.server.arrival():
                await self._handle(scope, receive, send)
        else:
            await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                response = self._refuse(
                    scope,
                    408,
                    f"body: incomplete after {self.timeout:g} s ({len(body)} bytes received)",
                )
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._too_big(scope)(scope, receive, send)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        gauge = self.server.metrics.in_flight
        gauge.inc()
        try:
            await self.app(scope, replay, send)
        finally:
            gauge.dec()

    def _refuse(self, scope: Scope, status: int, message: str) -> JSONResponse:
        self.server.metrics.refuse(status, _protocol(scope["path"]))
        return error(status, message)

    def _too_big(self, scope: Scope) -> JSONResponse:
        return self._refuse(scope, 413, f"body: larger than the limit of {self.limit} bytes")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the errors this server really sends: 4xx ``{"error": ...}``
    instead of its default 422 ``{"detail": [...]}``."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    # The infer routes read their body by hand (JSON or binary); publish its JSON schema.
    infer_schema = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(infer_schema.pop("$defs", {}))
    schemas["V2InferRequest"] = infer_schema
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, why in (("400", "Bad request"), ("404", "Unknown model or version")):
                responses[status] = {
                    "description": why,
                    "content": {"application/json": {"schema": error_ref}},
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    app.openapi_schema = schema
    return schema


def _known_version(model: ServedModel | None, asked: str | None) -> str:
    """A metric label from a URL: a loaded version, or "" / "unknown" (never any string a
    client sends, which would create a new series per request)."""
    if asked is None:
        return ""
    if model is None:
        return "unknown"
    version = resolve_version(model.policy, list(model.versions), asked)
    return version if version in model.versions else "unknown"


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]


def create_app(settings: ServerSettings) -> FastAPI:
    """The server's ASGI application (run it with uvicorn, or ``randkit serve``)."""
    from randkit.serve.tfserving import router as tf_router
    from randkit.serve.v2 import router as v2_router

    server = Server(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        yield
        await server.stop()

    app = FastAPI(
        title="randkit model server",
        version=randkit.__version__,
        description="Open Inference Protocol (KServe V2) and TensorFlow Serving REST, with "
        "randomized inference, randomized traffic splits and A/B statistics.",
        lifespan=lifespan,
    )
    app.state.server = server

    def refused(request: Request, status: int, message: str, parse: bool = False) -> JSONResponse:
        path = request.url.path
        server.metrics.refuse(status, _protocol(path), parse)
        if path.endswith(
            ("/infer", ":predict", ":classify")
        ):  # count refused inference requests too
            name = request.path_params.get("name", "")
            model = server.repository.models.get(name)
            asked = request.path_params.get("version") or request.path_params.get("label")
            version = _known_version(model, asked)
            protocol = "v2" if path.startswith("/v2/") else "tf"
            label = model.name if model else "unknown"
            server.metrics.requests.labels(label, version, protocol, str(status)).inc()
        return error(status, message)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return refused(request, exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parse = any(e.get("type") == "json_invalid" for e in exc.errors())
        return refused(request, 400, _one_line(exc), parse)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        server.metrics.refuse(exc.status_code, _protocol(request.url.path))
        return error(exc.status_code, str(exc.detail))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

    app.include_router(v2_router)
    app.include_router(tf_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(_Guard, server=server)
    return app
