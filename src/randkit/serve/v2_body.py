"""Bodies of V2 infer requests and responses over HTTP: JSON tensors, or the binary tensor
extension that Triton's clients use by default.

A binary body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
raw tensors, in the order of the inputs whose ``parameters.binary_data_size`` gives their
size. A response is binary when an output asks for it (``parameters.binary_data``) or the
request does (``parameters.binary_data_output``); its outputs then carry
``parameters.binary_data_size`` instead of ``data``, in the same framing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from randkit.serve.options import RequestError, shown
from randkit.serve.protocol import OUTPUT_TYPES, V2InferRequest
from randkit.serve.tensors import bytes_of

HEADER_LENGTH = "inference-header-content-length"
OUTPUT_PARAMETERS = frozenset({"binary_data"})


@dataclass(frozen=True)
class V2Body:
    """A parsed V2 infer request: the request (input ``data`` left out where ``decoded``
    holds it), the raw bytes of its binary inputs and its JSON inputs' values as arrays,
    both by input position."""

    request: V2InferRequest
    binary: dict[int, bytes]
    decoded: dict[int, np.ndarray]


def parse_v2_body(raw: bytes, header_length: str | None) -> V2Body:
    """The request, its binary inputs and its JSON inputs' values."""
    json_part, blob = raw, b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise RequestError(
                400,
                f"Inference-Header-Content-Length: must be a byte count within the body's "
                f"{len(raw)} bytes, got {shown(header_length)}",
            )
        json_part, blob = raw[: int(header_length)], raw[int(header_length) :]
    if not json_part.strip():
        raise RequestError(400, "body: field required (a V2 inference request)")
    fast = _parse_fast(json_part)
    if fast is not None:
        request, decoded = fast
    else:
        try:
            request, decoded = V2InferRequest.model_validate_json(json_part), {}
        except ValidationError as exc:
            # FastAPI's own error type, so that the one-line message and the count are the
            # same as for a body FastAPI parsed.
            raise RequestValidationError(exc.errors()) from None
    return V2Body(request, _binary_inputs(request, blob, decoded), decoded)


def _parse_fast(json_part: bytes) -> tuple[V2InferRequest, dict[int, np.ndarray]] | None:
    """orjson for the JSON, NumPy for the tensors' values and pydantic for the rest: a
    tensor's values validated as nested lists of numbers by pydantic cost more than the
    inference of a small model. None whenever anything is unusual; the full pydantic parse
    then gives the canonical answer or error."""
    try:
        body = orjson.loads(json_part)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return None
    decoded, inputs = {}, []
    for i, tensor in enumerate(body["inputs"]):
        data = tensor.get("data") if isinstance(tensor, dict) else None
        if not isinstance(data, list):
            inputs.append(tensor)
            continue
        try:
            array = np.asarray(data)
        except (ValueError, TypeError, RecursionError):
            return None
        if array.dtype.kind not in "iuf":  # strings, nulls, objects: pydantic says which
            return None
        decoded[i] = array
        inputs.append({**tensor, "data": None})
    # NumPy turns a boolean among numbers into 1.0: unless every true/false of the text is
    # accounted for outside the tensors' values, let pydantic refuse it.
    literals = json_part.count(b"true") + json_part.count(b"false")
    if literals and literals != _booleans({**body, "inputs": inputs}):
        return None
    try:
        return V2InferRequest.model_validate({**body, "inputs": inputs}), decoded
    except ValidationError:
        return None


def _booleans(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, dict):
        return sum(_booleans(v) for v in value.values())
    if isinstance(value, list):
        return sum(_booleans(v) for v in value)
    return 0


def _binary_inputs(
    request: V2InferRequest, blob: bytes, decoded: dict[int, np.ndarray]
) -> dict[int, bytes]:
    binary: dict[int, bytes] = {}
    offset = 0
    for i, tensor in enumerate(request.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        where = f"inputs.{i}.parameters.binary_data_size"
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RequestError(400, f"{where}: must be a byte count, got {shown(size)}")
        if tensor.data is not None or i in decoded:
            raise RequestError(400, f"inputs.{i}: give either data or binary_data_size, not both")
        if offset + size > len(blob):
            raise RequestError(
                400,
                f"{where}: {size} bytes, but the body's binary part has {len(blob) - offset} "
                "left (is Inference-Header-Content-Length set?)",
            )
        binary[i] = blob[offset : offset + size]
        offset += size
    if offset != len(blob):
        raise RequestError(
            400, f"body: {len(blob) - offset} bytes after the binary tensors the inputs declare"
        )
    return binary


def _wanted_outputs(request: V2InferRequest, available: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary) of each output to send, in the order asked (all when none are)."""
    default = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise RequestError(
            400, f"parameters.binary_data_output: must be true or false, got {shown(default)}"
        )
    if not request.outputs:
        return [(name, default) for name in available]
    wanted = []
    for i, output in enumerate(request.outputs):
        if output.name not in available:
            raise RequestError(
                400,
                f"outputs: unknown output {output.name!r} (this request gives "
                f"{', '.join(available)})",
            )
        params = output.parameters or {}
        unknown = sorted(set(params) - OUTPUT_PARAMETERS)
        if unknown:
            raise RequestError(
                400, f"outputs.{i}.parameters.{unknown[0][:80]}: not supported (known: binary_data)"
            )
        binary = params.get("binary_data", default)
        if not isinstance(binary, bool):
            where = f"outputs.{i}.parameters.binary_data"
            raise RequestError(400, f"{where}: must be true or false, got {shown(binary)}")
        wanted.append((output.name, binary))
    return wanted


@dataclass(frozen=True)
class EncodedAnswer:
    """A V2 infer response's bytes: JSON, or a JSON header of ``header_length`` bytes
    followed by the binary outputs."""

    body: bytes
    header_length: int | None = None

    @property
    def media_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers of an ASGI ``http.response.start`` message, but its length."""
        headers = [(b"content-type", self.media_type.encode())]
        if self.header_length is not None:
            headers.append((HEADER_LENGTH.encode(), str(self.header_length).encode()))
        return headers

    def response(self) -> Response:
        extra = {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}
        return Response(self.body, media_type=self.media_type, headers=extra)


def _json_data(array: np.ndarray) -> Any:
    """An output's values as orjson writes them: numbers as float64 / int64 arrays (so a
    float32 prints as the same decimal ``json.dumps`` of ``tolist()`` would), strings as a
    list."""
    if array.dtype.kind == "f":
        return np.ascontiguousarray(array.reshape(-1), dtype=np.float64)
    if array.dtype.kind in "iub":
        return np.ascontiguousarray(array.reshape(-1))
    return array.reshape(-1).tolist()


def v2_response(
    request: V2InferRequest, arrays: dict[str, Any], header: dict[str, Any]
) -> EncodedAnswer:
    """``header`` (model_name, id, parameters, ...) plus the outputs, JSON or binary."""
    outputs, blobs = [], []
    for name, binary in _wanted_outputs(request, arrays):
        array, datatype = arrays[name], OUTPUT_TYPES[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = bytes_of(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(array)
        outputs.append(entry)
    # orjson (Rust) rather than json.dumps: this runs once per request on the event loop.
    body = orjson.dumps({**header, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return EncodedAnswer(body)
    return EncodedAnswer(body + b"".join(blobs), len(body))
