"""TensorFlow Serving REST routes: model status, metadata and ``:predict`` by version or
label. Requests may carry randkit's ``parameters`` (the V2 ones) as an extension."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request

from randkit.serve.options import RequestError, shown
from randkit.serve.protocol import (
    INPUT_NAME,
    OUTPUT_TYPES,
    TFPredictRequest,
    datatype_of,
    tf_input,
    tf_outputs,
)
from randkit.serve.repository import ServedModel
from randkit.serve.server import Server

router = APIRouter(prefix="/v1")
KeyHeader = Annotated[str | None, Header(alias="X-Request-Key", max_length=256)]
_TF_TYPES = {"FP32": "DT_FLOAT", "INT64": "DT_INT64", "BYTES": "DT_STRING"}


def _server(request: Request) -> Server:
    return request.app.state.server  # type: ignore[no-any-return]


def _status(model: ServedModel, versions: list[str]) -> dict[str, Any]:
    return {
        "model_version_status": [
            {
                "version": v,
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
            for v in versions
        ]
    }


def _signature(model: ServedModel, version: str) -> dict[str, Any]:
    bundle = model.versions[version].bundle
    dims = [{"size": "-1"}] + [{"size": str(s)} for s in bundle.input_shape]
    outputs = {
        name: {"dtype": _TF_TYPES[datatype], "name": name}
        for name, datatype in OUTPUT_TYPES.items()
    }
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": version},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    "serving_default": {
                        "inputs": {
                            INPUT_NAME: {
                                "dtype": _TF_TYPES[datatype_of(bundle)],
                                "tensor_shape": {"dim": dims, "unknown_rank": False},
                                "name": INPUT_NAME,
                            }
                        },
                        "outputs": outputs,
                        "method_name": "tensorflow/serving/predict",
                    }
                }
            }
        },
    }


@router.get("/models/{name}")
async def model_status(name: str, request: Request) -> dict[str, Any]:
    model = _server(request).repository.model(name)
    return _status(model, sorted(model.versions))


@router.get("/models/{name}/versions/{version}")
async def version_status(name: str, version: str, request: Request) -> dict[str, Any]:
    repository = _server(request).repository
    model = repository.model(name)
    return _status(model, [repository.version(model, version).version])


@router.get("/models/{name}/labels/{label}")
async def label_status(name: str, label: str, request: Request) -> dict[str, Any]:
    return await version_status(name, _label(request, name, label), request)


@router.get("/models/{name}/metadata")
async def model_metadata(name: str, request: Request) -> dict[str, Any]:
    server = _server(request)
    model = server.repository.model(name)
    version = model.router.route(0, None, list(model.versions)) or sorted(model.versions)[-1]
    return _signature(model, version)


@router.get("/models/{name}/versions/{version}/metadata")
async def version_metadata(name: str, version: str, request: Request) -> dict[str, Any]:
    repository = _server(request).repository
    model = repository.model(name)
    return _signature(model, repository.version(model, version).version)


@router.get("/models/{name}/labels/{label}/metadata")
async def label_metadata(name: str, label: str, request: Request) -> dict[str, Any]:
    return await version_metadata(name, _label(request, name, label), request)


def _label(request: Request, name: str, label: str) -> str:
    model = _server(request).repository.model(name)
    if label not in model.policy.labels:
        raise RequestError(404, f"model {shown(name)} has no label {shown(label)}")
    return label


async def _predict(
    request: Request, name: str, version: str | None, body: TFPredictRequest, key: str | None
) -> dict[str, Any]:
    server, start = _server(request), time.perf_counter()
    rows = body.instances is not None
    answer = await server.infer(name, version, key, body.parameters, lambda b: tf_input(body, b))
    server.observe(name, answer.served.version, "tf", 200, start)
    return {
        **tf_outputs(answer.arrays, rows),
        "model_version": answer.served.version,
        "id": answer.request_id,
        "parameters": answer.parameters(),
    }


@router.post("/models/{name}:predict")
async def predict(
    name: str, body: TFPredictRequest, request: Request, key: KeyHeader = None
) -> dict[str, Any]:
    return await _predict(request, name, None, body, key)


@router.post("/models/{name}/versions/{version}:predict")
async def predict_version(
    name: str, version: str, body: TFPredictRequest, request: Request, key: KeyHeader = None
) -> dict[str, Any]:
    return await _predict(request, name, version, body, key)


@router.post("/models/{name}/labels/{label}:predict")
async def predict_label(
    name: str, label: str, body: TFPredictRequest, request: Request, key: KeyHeader = None
) -> dict[str, Any]:
    return await _predict(request, name, _label(request, name, label), body, key)
