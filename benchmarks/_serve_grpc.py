"""A KServe V2 gRPC load generator with binary tensors: ``ModelInfer`` requests whose input
travels as ``raw_input_contents`` (little-endian float32 bytes), as ``tritonclient.grpc``
sends it, over ``channels`` ``grpc.aio`` channels, each its own connection, as that many
clients would hold (HTTP/2 multiplexes the requests in flight on each; with ``--workers``
each connection talks to one server process).

Each request is serialized once, before the phase, and sent as bytes (a ``unary_unary`` call
without a serializer); each answer is parsed with ``ModelInferResponse.FromString`` and
checked. So, like the raw HTTP client, it takes as little CPU as a client can from the
server it shares the machine with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from _serve_common import NAME, Checker, Load, Sender, drive
from grpc import aio
from tritonclient.grpc import service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
OK = 200


def infer_request(x: np.ndarray, parameters: dict[str, Any], model: str = NAME) -> bytes:
    """A serialized ``ModelInferRequest`` of the inputs ``x`` (``(N, *shape)`` float32)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    for key, value in parameters.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = int(value)
    return request.SerializeToString()


def grpc_checker(mode: str, rows: int) -> Checker:
    """A check of a serialized ``ModelInferResponse`` (status 200 stands for gRPC OK)."""

    def check(status: int, payload: bytes) -> str | None:
        if status != OK:
            return payload[:200].decode(errors="replace")
        try:
            answer = pb.ModelInferResponse.FromString(payload)
            outputs = {o.name: i for i, o in enumerate(answer.outputs)}
            shape = list(answer.outputs[outputs["probabilities"]].shape)
            raw = answer.raw_output_contents[outputs["probabilities"]]
        except (KeyError, IndexError, ValueError) as exc:
            return f"bad response ({exc!r})"
        if shape[0] != rows or len(raw) < 8 * rows:
            return f"probabilities of shape {shape}, not {rows} rows"
        if answer.parameters["mode"].string_param != mode:
            return f"answered in mode {answer.parameters['mode']!r}"
        return None

    return check


async def _grpc_load(
    port: int, requests: Sequence[bytes], args: tuple[int, int, float, int], check: Checker
) -> Load:
    count, concurrency, max_seconds, channels = args
    # A local subchannel pool each: channels to one address would otherwise share a connection.
    opened = [
        aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]

    def sender(channel: aio.Channel) -> Sender:
        infer = channel.unary_unary(METHOD)  # bytes in, bytes out

        async def send(index: int) -> tuple[int, bytes]:
            try:
                return OK, await infer(requests[index % len(requests)], timeout=120)
            except aio.AioRpcError as exc:
                code = exc.code()
                return 500 if code != grpc.StatusCode.OK else OK, str(exc.details()).encode()

        return send

    try:
        senders = [sender(opened[i % channels]) for i in range(concurrency)]
        return await drive(senders, check, count, max_seconds)
    finally:
        for channel in opened:
            await channel.close()


def grpc_generate(
    port: int,
    requests: Sequence[bytes],
    count: int,
    concurrency: int,
    max_seconds: float,
    check: Checker,
    channels: int = 1,
) -> Load:
    """One load phase of pre-serialized gRPC infer requests over ``channels`` connections."""
    args = (count, concurrency, max_seconds, channels)
    return asyncio.run(_grpc_load(port, requests, args, check))
