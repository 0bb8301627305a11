"""The V2 infer route, ``POST /v2/models/{name}[/versions/{version}]/infer``, served straight
from the application's ASGI callable.

Every inference request would otherwise pass Starlette's middleware chain, FastAPI's router,
its dependency solver and a ``Request`` object before any work of its own; for small models
that costs more than the inference. The application (``app.py``) sends these requests here
after the same guard (token, size, body timeout, in-flight count); the FastAPI routes of the
same paths stay for the OpenAPI schema and answer the same way (``infer_v2``). Refusals are
the same one-line errors, counted the same way (``refusals.py``).
"""

from __future__ import annotations

import logging
import re
import time

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.types import Scope, Send

from randkit.serve.options import RequestError, shown
from randkit.serve.protocol import v2_input
from randkit.serve.refusals import count_refused, is_parse_error, one_line
from randkit.serve.server import Server
from randkit.serve.v2_body import EncodedAnswer, parse_v2_body, v2_response

log = logging.getLogger("randkit.serve")
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
MAX_KEY_LENGTH = 256
_JSON_HEADERS = [(b"content-type", b"application/json")]


def infer_target(scope: Scope) -> tuple[str, str | None] | None:
    """(model, version or None) when the request is a V2 infer request, else None."""
    if scope["method"] != "POST":
        return None
    found = INFER_PATH.fullmatch(scope["path"])
    return None if found is None else (found.group(1), found.group(2))


def request_key(key: str | None) -> str | None:
    if key is not None and len(key) > MAX_KEY_LENGTH:
        raise RequestError(
            400, f"header.X-Request-Key: at most {MAX_KEY_LENGTH} characters, got {shown(key)}"
        )
    return key


async def infer_v2(
    server: Server,
    name: str,
    version: str | None,
    key: str | None,
    raw: bytes,
    header_length: str | None,
) -> EncodedAnswer:
    """Parse a V2 infer body (JSON or binary), infer, and encode the answer."""
    start = time.perf_counter()
    parsed = parse_v2_body(raw, header_length)
    body = parsed.request
    answer = await server.infer(
        name,
        version,
        key,
        body.parameters,
        lambda b: v2_input(body, b, parsed.binary, parsed.decoded),
        body.id,
    )
    encoded = v2_response(
        body,
        answer.arrays,
        {
            "model_name": name,
            "model_version": answer.served.version,
            "id": answer.request_id,
            "parameters": answer.parameters(),
        },
    )
    server.observe(name, answer.served.version, "v2", 200, start)
    return encoded


async def serve_infer(
    server: Server, scope: Scope, body: bytes, send: Send, target: tuple[str, str | None]
) -> None:
    """Answer one V2 infer request whose body the guard has read."""
    name, version = target
    headers = dict(scope["headers"])
    try:
        encoded = await infer_v2(
            server,
            name,
            version,
            request_key(_text(headers.get(b"x-request-key"))),
            body,
            _text(headers.get(b"inference-header-content-length")),
        )
    except RequestError as exc:
        await _refuse(server, scope, send, target, exc.status, exc.message, False)
        return
    except RequestValidationError as exc:
        await _refuse(server, scope, send, target, 400, one_line(exc), is_parse_error(exc))
        return
    except Exception:  # as Starlette's ServerErrorMiddleware: a 500, the traceback logged
        log.exception("error while answering %s", scope["path"])
        await _send(send, 500, _JSON_HEADERS, b'{"error":"Internal Server Error"}')
        return
    await _send(send, 200, encoded.raw_headers(), encoded.body)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _refuse(
    server: Server,
    scope: Scope,
    send: Send,
    target: tuple[str, str | None],
    status: int,
    message: str,
    parse: bool,
) -> None:
    count_refused(server, scope["path"], target[0], target[1], status, parse)
    await _send(send, status, _JSON_HEADERS, orjson.dumps({"error": message}))


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
