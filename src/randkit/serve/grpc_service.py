"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` as Triton and
KServe define it, served by ``grpc.aio`` on a thread of its own (``grpc_thread.py``) with
each method run on the server's event loop, so it shares the HTTP routes' batchers, seeds,
traffic routing, feedback ledger, metrics and token.

The message classes are the ones ``tritonclient.grpc`` ships (Triton's wire definitions, a
superset of KServe's): the server and Triton's clients cannot drift apart, and there is no
.proto to compile. Inputs come as ``raw_input_contents`` or typed ``contents``; outputs go
back as ``raw_output_contents``, the way Triton answers.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from functools import wraps
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf import json_format
from grpc import aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from randkit.deploy.bundle import LoadedBundle
from randkit.serve.model_config import model_config
from randkit.serve.options import RequestError, shown
from randkit.serve.protocol import (
    FLOAT_TYPES,
    INPUT_NAME,
    INT_TYPES,
    MAX_DIMS,
    OUTPUT_TYPES,
    checked_input,
)
from randkit.serve.refusals import count_refused_inference
from randkit.serve.server import Answer, Server
from randkit.serve.stats import stats_of
from randkit.serve.tensors import NUMPY_TYPES, array_from_bytes, bytes_of, checked_shape
from randkit.serve.v2 import _metadata, server_metadata  # the HTTP routes' own answers

log = logging.getLogger("randkit.serve")
SERVICE = "/inference.GRPCInferenceService/"
OPEN_METHODS = frozenset({SERVICE + "ServerLive", SERVICE + "ServerReady"})
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# The typed field of InferTensorContents for each datatype (FP16 has none: raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
MAX_ID = 256  # characters of a client's request id, as over HTTP
UNAUTHENTICATED = "authorization: a valid bearer token is required"
Reply = TypeVar("Reply")
Metadata = Mapping[str, Any]  # a call's invocation metadata
OnMain = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]  # runs it on the server's loop


def _answers(
    method: Callable[[Any, Any, Metadata], Awaitable[Reply]],
) -> Callable[[Any, Any, aio.ServicerContext], Awaitable[Reply]]:
    """The method runs on the server's event loop (with the batchers and the repository)
    while the call itself lives on gRPC's thread. A user's mistake ends the call with the
    status matching its HTTP one and the same one-line message; anything else is a bug,
    logged, and INTERNAL."""

    @wraps(method)
    async def call(self: Any, request: Any, context: aio.ServicerContext) -> Reply:
        metadata = dict(context.invocation_metadata() or ())
        try:
            return await self.on_main(method(self, request, metadata))
        except RequestError as exc:
            code = CODES.get(exc.status, grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(code, exc.message)
        except Exception:  # the methods run on the server's loop: none of them aborts itself
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        raise AssertionError("unreachable: abort raises")

    return call


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: Server, on_main: OnMain) -> None:
        self.server, self.on_main = server, on_main

    @_answers
    async def ServerLive(self, request: Any, metadata: Metadata) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_answers
    async def ServerReady(self, request: Any, metadata: Metadata) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server.ready)

    @_answers
    async def ModelReady(self, request: Any, metadata: Metadata) -> pb.ModelReadyResponse:
        """Not ready (rather than NOT_FOUND) for an unknown model or version, as Triton says:
        clients poll this."""
        repository = self.server.repository
        try:
            model = repository.model(request.name)
            if request.version:
                repository.version(model, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_answers
    async def ServerMetadata(self, request: Any, metadata: Metadata) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(await server_metadata(), pb.ServerMetadataResponse())

    @_answers
    async def ModelMetadata(self, request: Any, metadata: Metadata) -> pb.ModelMetadataResponse:
        repository = self.server.repository
        model = repository.model(request.name)
        served = repository.version(model, request.version) if request.version else None
        metadata = _metadata(model, served)
        return json_format.ParseDict(
            metadata, pb.ModelMetadataResponse(), ignore_unknown_fields=True
        )

    @_answers
    async def ModelConfig(self, request: Any, metadata: Metadata) -> pb.ModelConfigResponse:
        repository, settings = self.server.repository, self.server.settings
        model = repository.model(request.name)
        served = repository.version(model, request.version) if request.version else None
        config = model_config(model, served, settings.max_batch, settings.max_delay_ms)
        response = pb.ModelConfigResponse()
        json_format.ParseDict(config, response.config)
        return response

    @_answers
    async def ModelStatistics(self, request: Any, metadata: Metadata) -> pb.ModelStatisticsResponse:
        """One model (all its versions unless one is named), or every model for no name."""
        server = self.server
        names = [request.name] if request.name else sorted(server.repository.models)
        entries = []
        for name in names:
            report = stats_of(server.stats, server.repository, name, request.version or None)
            entries += report["model_stats"]
        return json_format.ParseDict({"model_stats": entries}, pb.ModelStatisticsResponse())

    @_answers
    async def RepositoryIndex(self, request: Any, metadata: Metadata) -> pb.RepositoryIndexResponse:
        entries = self.server.repository.index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

    @_answers
    async def RepositoryModelLoad(
        self, request: Any, metadata: Metadata
    ) -> pb.RepositoryModelLoadResponse:
        await self.server.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(
        self, request: Any, metadata: Metadata
    ) -> pb.RepositoryModelUnloadResponse:
        await self.server.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_answers
    async def ModelInfer(self, request: Any, metadata: Metadata) -> pb.ModelInferResponse:
        server, start = self.server, time.perf_counter()
        key = metadata.get("x-request-key")
        server.metrics.in_flight.inc()
        try:
            with server.arrival():  # the batchers wait for a request on its way, as over HTTP
                answer = await self._infer(request, key)
            response = _response(answer, request)
        except RequestError as exc:
            asked = request.model_version or None
            count_refused_inference(server, "grpc", request.model_name, asked, exc.status)
            raise
        finally:
            server.metrics.in_flight.dec()
        server.observe(request.model_name, answer.served.version, "grpc", 200, start)
        return response

    async def _infer(self, request: Any, key: str | None) -> Answer:
        if len(request.id) > MAX_ID:
            raise RequestError(400, f"id: longer than {MAX_ID} characters")
        if key is not None and len(key) > MAX_ID:
            raise RequestError(400, f"x-request-key: longer than {MAX_ID} characters")
        unknown = [o.name for o in request.outputs if o.name not in OUTPUT_TYPES]
        if unknown:
            known = ", ".join(OUTPUT_TYPES)
            raise RequestError(400, f"outputs: unknown output {shown(unknown[0])} (known: {known})")
        return await self.server.infer(
            request.model_name,
            request.model_version or None,
            key,
            _parameter_values(request.parameters, "parameters"),
            lambda bundle: _input(request, bundle),
            request.id or None,
        )


def _parameter_values(parameters: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``InferParameter``s as the plain values ``parse_options`` checks (as JSON gives)."""
    values: dict[str, Any] = {}
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is None:
            raise RequestError(400, f"{where}.{name[:80]}: holds no value")
        values[name] = getattr(parameter, which)
    return values


def _input(request: Any, bundle: LoadedBundle) -> torch.Tensor:
    """The request's one input, from its raw bytes or its typed contents, checked against
    the bundle as over HTTP."""
    if len(request.inputs) != 1:
        raise RequestError(400, f"inputs: the model takes one input, got {len(request.inputs)}")
    tensor, where = request.inputs[0], "inputs.0"
    if tensor.name != INPUT_NAME:
        raise RequestError(400, f"{where}.name: must be {INPUT_NAME!r}, got {shown(tensor.name)}")
    allowed = tuple(FLOAT_TYPES) if bundle.input_dtype == torch.float32 else INT_TYPES
    if tensor.datatype not in allowed:
        raise RequestError(
            400,
            f"{where}.datatype: must be one of {', '.join(allowed)} for this model, "
            f"got {shown(tensor.datatype)}",
        )
    if len(tensor.shape) > MAX_DIMS:
        raise RequestError(400, f"{where}.shape: more than {MAX_DIMS} dimensions")
    if "shared_memory_region" in tensor.parameters:
        raise RequestError(400, f"{where}.parameters: shared memory is not supported")
    shape = checked_shape(list(tensor.shape), where)
    try:
        if request.raw_input_contents:
            array = _raw(request, tensor, shape, where)
        else:
            array = _typed(tensor, shape, where)
    except ValueError:  # e.g. a 0 beside dimensions too large for numpy to size
        raise RequestError(400, f"{where}.shape: cannot hold a tensor, got {shape}") from None
    if not array.flags.writeable:
        array = array.copy()  # torch takes only writable arrays without a warning
    return checked_input(bundle, array, where)


def _raw(request: Any, tensor: Any, shape: list[int], where: str) -> np.ndarray:
    count = len(request.raw_input_contents)
    if count != len(request.inputs):
        raise RequestError(
            400, f"raw_input_contents: holds {count} tensors for {len(request.inputs)} inputs"
        )
    if tensor.HasField("contents"):
        raise RequestError(
            400, f"{where}.contents: give the values in contents or raw_input_contents, not both"
        )
    return array_from_bytes(tensor.datatype, shape, request.raw_input_contents[0], where)


def _typed(tensor: Any, shape: list[int], where: str) -> np.ndarray:
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        raise RequestError(
            400, f"{where}.contents: {tensor.datatype} has no typed field; send raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise RequestError(
            400,
            f"{where}.contents.{field}: holds {len(values)} values but shape {shape} needs "
            f"{math.prod(shape)}",
        )
    # int_contents and uint_contents carry 8- and 16-bit types in 32 bits: keep the wide type
    # (the bundle checks the values' range) rather than wrap out-of-range values around.
    wide = {"int_contents": np.int32, "uint_contents": np.uint32}.get(field)
    return np.asarray(values, dtype=wide or NUMPY_TYPES[tensor.datatype]).reshape(shape)


def _response(answer: Answer, request: Any) -> pb.ModelInferResponse:
    names = [o.name for o in request.outputs] or list(answer.arrays)
    for name in names:
        if name not in answer.arrays:
            raise RequestError(
                400,
                f"outputs: unknown output {name!r} (this request gives {', '.join(answer.arrays)})",
            )
    response = pb.ModelInferResponse(
        model_name=answer.model.name, model_version=answer.served.version, id=answer.request_id
    )
    for key, value in answer.parameters().items():
        _set_parameter(response.parameters[key], value)
    for name in names:
        array, datatype = answer.arrays[name], OUTPUT_TYPES[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(bytes_of(array, datatype))
    return response


def _set_parameter(parameter: Any, value: Any) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


class _TokenCheck(aio.ServerInterceptor):
    """``authorization: Bearer TOKEN`` metadata on every call but the health ones."""

    def __init__(self, token: str, server: Server) -> None:
        self.expected, self.server = f"Bearer {token}".encode(), server

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:  # type: ignore[attr-defined]
            return handler
        metadata = dict(details.invocation_metadata or ())  # type: ignore[attr-defined]
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self.expected):
            return handler
        self.server.metrics.refuse(401, "grpc")

        async def refuse(request: Any, context: aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


async def start_grpc(
    server: Server, host: str, port: int, on_main: OnMain
) -> tuple[aio.Server, int]:
    """The gRPC server on ``host:port`` (0: a free port), started on the running event loop
    (gRPC's own), its methods run through ``on_main``; and the port it bound."""
    limit = int(server.settings.max_body_mb * 1024 * 1024)
    token = server.settings.token
    grpc_server = aio.server(
        interceptors=[_TokenCheck(token, server)] if token else None,
        options=[
            ("grpc.max_receive_message_length", limit),  # --max-body-mb, as over HTTP
            ("grpc.max_send_message_length", -1),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(server, on_main), grpc_server
    )
    bound = grpc_server.add_insecure_port(f"{host}:{port}")
    await grpc_server.start()
    return grpc_server, bound
