"""TensorFlow Serving REST routes: model status, metadata and ``:predict`` by version or
label. Requests may carry randkit's ``parameters`` (the V2 ones) as an extension."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from randkit.serve.options import RequestError, shown
from randkit.serve.protocol import (
    INPUT_NAME,
    OUTPUT_TYPES,
    TFClassifyRequest,
    TFPredictRequest,
    datatype_of,
    tf_examples_input,
    tf_input,
    tf_outputs,
)
from randkit.serve.repository import ServedModel
from randkit.serve.server import Answer, Server
from randkit.serve.traffic import sorted_versions

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
    # TF Serving describes the latest version when none is named.
    model = _server(request).repository.model(name)
    return _signature(model, sorted_versions(list(model.versions))[-1])


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


SIGNATURES = (None, "", "serving_default")


def _check_signature(name: str | None) -> None:
    if name not in SIGNATURES:
        raise RequestError(
            400,
            f"signature_name: unknown signature {shown(name)} (this model has 'serving_default')",
        )


async def _answer(
    request: Request, name: str, version: str | None, body: Any, key: str | None, read: Any
) -> Answer:
    _check_signature(body.signature_name)
    server, start = _server(request), time.perf_counter()
    answer = await server.infer(name, version, key, body.parameters, read)
    server.observe(name, answer.served.version, "tf", 200, start)
    return answer


def _extras(answer: Answer) -> dict[str, Any]:
    return {
        "model_version": answer.served.version,
        "id": answer.request_id,
        "parameters": answer.parameters(),
    }


async def _predict(
    request: Request, name: str, version: str | None, body: TFPredictRequest, key: str | None
) -> JSONResponse:
    answer = await _answer(request, name, version, body, key, lambda b: tf_input(body, b))
    return JSONResponse(
        {**tf_outputs(answer.arrays, body.instances is not None), **_extras(answer)}
    )


async def _classify(
    request: Request, name: str, version: str | None, body: TFClassifyRequest, key: str | None
) -> JSONResponse:
    """TF Serving's classify result: per example, every class with its probability."""
    answer = await _answer(request, name, version, body, key, lambda b: tf_examples_input(body, b))
    classes = answer.served.bundle.classes
    result = [
        [[label, score] for label, score in zip(classes, row, strict=True)]
        for row in answer.arrays["probabilities"].tolist()
    ]
    return JSONResponse({"result": result, **_extras(answer)})


@router.post("/models/{name}:predict")
async def predict(
    name: str, body: TFPredictRequest, request: Request, key: KeyHeader = None
) -> JSONResponse:
    return await _predict(request, name, None, body, key)


@router.post("/models/{name}/versions/{version}:predict")
async def predict_version(
    name: str, version: str, body: TFPredictRequest, request: Request, key: KeyHeader = None
) -> JSONResponse:
    return await _predict(request, name, version, body, key)


@router.post("/models/{name}/labels/{label}:predict")
async def predict_label(
    name: str, label: str, body: TFPredictRequest, request: Request, key: KeyHeader = None
) -> JSONResponse:
    return await _predict(request, name, _label(request, name, label), body, key)


@router.post("/models/{name}:classify")
async def classify(
    name: str, body: TFClassifyRequest, request: Request, key: KeyHeader = None
) -> JSONResponse:
    return await _classify(request, name, None, body, key)


@router.post("/models/{name}/versions/{version}:classify")
async def classify_version(
    name: str, version: str, body: TFClassifyRequest, request: Request, key: KeyHeader = None
) -> JSONResponse:
    return await _classify(request, name, version, body, key)


@router.post("/models/{name}/labels/{label}:classify")
async def classify_label(
    name: str, label: str, body: TFClassifyRequest, request: Request, key: KeyHeader = None
) -> JSONResponse:
    return await _classify(request, name, _label(request, name, label), body, key)


@router.post("/models/{name}:regress", status_code=501)
@router.post("/models/{name}/versions/{version}:regress", status_code=501)
@router.post("/models/{name}/labels/{label}:regress", status_code=501)
async def regress(name: str, request: Request) -> JSONResponse:
    _server(request).repository.model(name)  # an unknown model is still a 404
    return JSONResponse(
        {"error": f"regress: model {shown(name)} is a classifier; use :predict or :classify"},
        status_code=501,
    )
