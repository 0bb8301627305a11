"""What a refused request answers and how it is counted, the same whether FastAPI's exception
handlers or the direct infer path (``v2_direct``) refuse it."""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError

from randkit.serve.options import shown
from randkit.serve.repository import ServedModel
from randkit.serve.server import Server
from randkit.serve.traffic import resolve_version

INFERENCE_SUFFIXES = ("/infer", ":predict", ":classify")
# Names pydantic gives the members of a union in an error's location (int, list[...], ...).
_UNION_MEMBER = re.compile(r"^(int|float|str|list\[.*\]|dict\[.*\]|Numbers)$")


def one_line(exc: RequestValidationError) -> str:
    """The first validation error, as ``field: what is wrong, got VALUE``."""
    first = exc.errors()[0]
    parts = [str(p) for p in first.get("loc", ()) if p != "body"]
    tensor_data = any(_UNION_MEMBER.match(p) for p in parts) and parts[0] in (
        "inputs",
        "instances",
    )
    where = _printable(".".join(p for p in parts if not _UNION_MEMBER.match(p)) or "body")
    got = shown(first.get("input"))
    if tensor_data:
        return f"{where}: holds values that are not numbers (strings, booleans, nulls), got {got}"
    if first.get("type") == "missing":
        return f"{where}: field required"
    if first.get("type") == "json_invalid":
        return f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    return f"{where}: {first.get('msg', 'invalid')}, got {got}"


def _printable(where: str, limit: int = 120) -> str:
    """A field path a client chose (a JSON key) on one line: control characters escaped."""
    shown_where = "".join(c if c.isprintable() else repr(c)[1:-1] for c in where)
    return shown_where if len(shown_where) <= limit else shown_where[:limit] + "..."


def is_parse_error(exc: RequestValidationError) -> bool:
    return any(e.get("type") == "json_invalid" for e in exc.errors())


def protocol_of(path: str) -> str:
    return "v2" if path.startswith("/v2/") else "tf" if path.startswith("/v1/") else "other"


def known_version(model: ServedModel | None, asked: str | None) -> str:
    """A metric label from a URL: a loaded version, or "" / "unknown" (never any string a
    client sends, which would create a new series per request)."""
    if asked is None:
        return ""
    if model is None:
        return "unknown"
    version = resolve_version(model.policy, list(model.versions), asked)
    return version if version in model.versions else "unknown"


def count_refused(
    server: Server, path: str, name: str, asked: str | None, status: int, parse: bool
) -> None:
    """Count a refusal by reason, and a refused inference request by model and version."""
    protocol = protocol_of(path)
    if path.endswith(INFERENCE_SUFFIXES):
        count_refused_inference(server, protocol, name, asked, status, parse)
    else:
        server.metrics.refuse(status, protocol, parse)


def count_refused_inference(
    server: Server, protocol: str, name: str, asked: str | None, status: int, parse: bool = False
) -> None:
    """Count a refused inference request by reason, and by model and version labelled only
    with names the server knows (a client's string would make a new series per request)."""
    server.metrics.refuse(status, protocol, parse)
    model = server.repository.models.get(name)
    version = known_version(model, asked)
    label = model.name if model else "unknown"
    server.metrics.requests.labels(label, version, protocol, str(status)).inc()
