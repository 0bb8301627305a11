"""The FastAPI application: middleware (body limit, bearer token, in-flight gauge), one-line
JSON errors, and the routes of both protocols (``v2.py``, ``tfserving.py``)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import randkit
from randkit.serve.options import RequestError
from randkit.serve.protocol import ErrorBody, V2InferRequest
from randkit.serve.refusals import (
    INFERENCE_SUFFIXES,
    count_refused,
    is_parse_error,
    one_line,
    protocol_of,
)
from randkit.serve.server import Server, ServerSettings
from randkit.serve.v2_direct import infer_target, serve_infer
from randkit.serve.workers import WorkerSlot

# A handler of a request whose body the guard has read: (scope, body, send).
BodyHandler = Callable[[Scope, bytes, Send], Awaitable[None]]
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _is_inference(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].endswith(INFERENCE_SUFFIXES)


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
        await self.guard(scope, receive, send, None)

    async def guard(
        self, scope: Scope, receive: Receive, send: Send, direct: BodyHandler | None
    ) -> None:
        """Check the request, read its body, then pass it on: to ``direct`` (with the body)
        when given, else to the wrapped application."""
        headers = dict(scope.get("headers") or [])
        if (
            direct is None
            and scope["method"] == "POST"
            and headers.get(b"content-type") != b"application/json"
        ):
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
                await self._handle(scope, receive, send, direct)
        else:
            await self._handle(scope, receive, send, direct)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, direct: BodyHandler | None
    ) -> None:
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        gauge = self.server.metrics.in_flight
        gauge.inc()
        try:
            if direct is not None:
                await direct(scope, body, send)
            else:
                await self.app(scope, replay, send)
        finally:
            gauge.dec()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once the request was refused (too big, too slow) or the
        client went away."""
        body = bytearray()
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            try:
                async with asyncio.timeout(self.timeout):  # no task per call, as wait_for
                    message = await receive()
            except TimeoutError:
                response = self._refuse(
                    scope,
                    408,
                    f"body: incomplete after {self.timeout:g} s ({len(body)} bytes received)",
                )
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._too_big(scope)(scope, receive, send)
                return None
        return bytes(body)

    def _refuse(self, scope: Scope, status: int, message: str) -> JSONResponse:
        self.server.metrics.refuse(status, protocol_of(scope["path"]))
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


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]


class _App(FastAPI):
    """FastAPI, except that V2 infer requests go from the guard straight to ``serve_infer``
    (see ``v2_direct``): the hot path skips the middleware chain and the router."""

    guard: _Guard
    server: Server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = infer_target(scope) if scope["type"] == "http" else None
        if target is None:
            await super().__call__(scope, receive, send)
            return

        async def direct(scope: Scope, body: bytes, send: Send) -> None:
            await serve_infer(self.server, scope, body, send, target)

        await self.guard.guard(scope, receive, send, direct)


def create_app(settings: ServerSettings, slot: WorkerSlot | None = None) -> FastAPI:
    """The server's ASGI application (run it with uvicorn, or ``randkit serve``); ``slot``:
    this process is one of ``--workers`` (``workers.py``)."""
    from randkit.serve.tfserving import router as tf_router
    from randkit.serve.v2 import router as v2_router

    server = Server(settings, slot)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        yield
        await server.stop()

    app = _App(
        title="randkit model server",
        version=randkit.__version__,
        description="Open Inference Protocol (KServe V2) and TensorFlow Serving REST, with "
        "randomized inference, randomized traffic splits and A/B statistics.",
        lifespan=lifespan,
    )
    app.state.server = server
    app.server, app.guard = server, _Guard(app, server)

    def refused(request: Request, status: int, message: str, parse: bool = False) -> JSONResponse:
        params = request.path_params
        asked = params.get("version") or params.get("label")
        count_refused(server, request.url.path, params.get("name", ""), asked, status, parse)
        return error(status, message)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return refused(request, exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refused(request, 400, one_line(exc), is_parse_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        server.metrics.refuse(exc.status_code, protocol_of(request.url.path))
        return error(exc.status_code, str(exc.detail))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

    app.include_router(v2_router)
    app.include_router(tf_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(_Guard, server=server)
    return app
