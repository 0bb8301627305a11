"""Open Inference Protocol (KServe V2) REST routes, plus randkit's repository, feedback and
experiment extensions."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

import randkit
from randkit.serve.experiment import experiment_report
from randkit.serve.ledger import LedgerError
from randkit.serve.model_config import default_outputs, model_config
from randkit.serve.options import MODES, RequestError
from randkit.serve.protocol import INPUT_NAME, FeedbackRequest, datatype_of
from randkit.serve.repository import ServedModel, ServedVersion
from randkit.serve.server import Server
from randkit.serve.stats import stats_of
from randkit.serve.v2_body import HEADER_LENGTH
from randkit.serve.v2_direct import infer_v2

router = APIRouter(prefix="/v2")
KeyHeader = Annotated[str | None, Header(alias="X-Request-Key", max_length=256)]


def _server(request: Request) -> Server:
    return request.app.state.server  # type: ignore[no-any-return]


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = _server(request).ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {
        "name": "randkit",
        "version": randkit.__version__,
        # perf_analyzer reads the model statistics only when "statistics" is listed.
        "extensions": [
            "model_repository",
            "model_configuration",
            "statistics",
            "randomized_inference",
            "traffic_split",
        ],
    }


def _metadata(model: ServedModel, served: ServedVersion | None) -> dict[str, Any]:
    versions = [served.version] if served else sorted(model.versions)
    bundle = (served or next(iter(model.versions.values()))).bundle
    return {
        "name": model.name,
        "versions": versions,
        "platform": "randkit_pytorch",
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": datatype_of(bundle),
                "shape": [-1, *bundle.input_shape],
            }
        ],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": [-1, len(bundle.classes)]}
            if name == "probabilities"
            else {"name": name, "datatype": datatype, "shape": [-1]}
            for name, datatype in default_outputs(bundle).items()  # radius: mode smooth only
        ],
        "parameters": {
            "classes": ",".join(bundle.classes),
            "labels": ",".join(f"{k}={v}" for k, v in sorted(model.policy.labels.items())),
            "modes": ",".join(MODES),
        },
    }


@router.get("/models/{name}")
async def model_metadata(name: str, request: Request) -> dict[str, Any]:
    return _metadata(_server(request).repository.model(name), None)


@router.get("/models/{name}/versions/{version}")
async def version_metadata(name: str, version: str, request: Request) -> dict[str, Any]:
    repository = _server(request).repository
    model = repository.model(name)
    return _metadata(model, repository.version(model, version))


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> dict[str, Any]:
    _server(request).repository.model(name)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready")
async def version_ready(name: str, version: str, request: Request) -> dict[str, Any]:
    repository = _server(request).repository
    served = repository.version(repository.model(name), version)
    return {"name": name, "version": served.version, "ready": True}


# Triton's model configuration and statistics (what perf_analyzer reads; randkit.serve.stats).


def _config(server: Server, name: str, version: str | None) -> dict[str, Any]:
    model = server.repository.model(name)
    served = server.repository.version(model, version) if version else None
    settings = server.settings
    return model_config(model, served, settings.max_batch, settings.max_delay_ms)


@router.get("/models/{name}/config")
async def config(name: str, request: Request) -> dict[str, Any]:
    return _config(_server(request), name, None)


@router.get("/models/{name}/versions/{version}/config")
async def version_config(name: str, version: str, request: Request) -> dict[str, Any]:
    return _config(_server(request), name, version)


@router.get("/models/{name}/stats")
async def stats(name: str, request: Request) -> dict[str, Any]:
    server = _server(request)
    return stats_of(server.stats, server.repository, name, None)


@router.get("/models/{name}/versions/{version}/stats")
async def version_stats(name: str, version: str, request: Request) -> dict[str, Any]:
    server = _server(request)
    return stats_of(server.stats, server.repository, name, version)


async def _infer(request: Request, name: str, version: str | None, key: str | None) -> Response:
    # Reached only when the router is used on its own: the application answers these paths
    # before routing (v2_direct), with this same function.
    encoded = await infer_v2(
        _server(request),
        name,
        version,
        key,
        await request.body(),
        request.headers.get(HEADER_LENGTH),
    )
    return encoded.response()


# The body is read by hand (JSON or the binary tensor extension); the schema says what it is.
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/V2InferRequest"},
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "A V2InferRequest JSON header of Inference-Header-Content-Length "
                "bytes, then the raw input tensors (binary tensor extension).",
            },
        },
    }
}


@router.post("/models/{name}/infer", openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request, key: KeyHeader = None) -> Response:
    """Infer with the version the traffic policy picks (per request, or sticky by
    ``X-Request-Key``); the response says which version answered and the seed it used."""
    return await _infer(request, name, None, key)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_BODY)
async def infer_version(
    name: str, version: str, request: Request, key: KeyHeader = None
) -> Response:
    return await _infer(request, name, version, key)


@router.post("/repository/index")
async def repository_index(request: Request) -> list[dict[str, Any]]:
    return _server(request).repository.index()


@router.post("/repository/models/{name}/load")
async def load_model(name: str, request: Request) -> dict[str, Any]:
    model = await _server(request).load_model(name)
    return {"name": name, "versions": sorted(model.versions), "failed": model.failed}


@router.post("/repository/models/{name}/unload")
async def unload_model(name: str, request: Request) -> dict[str, Any]:
    await _server(request).unload_model(name)
    return {"name": name, "unloaded": True}


@router.post("/models/{name}/feedback")
async def feedback(name: str, body: FeedbackRequest, request: Request) -> dict[str, Any]:
    """The true label of an answered request (its ``id``; ``id/i`` for instance i of a
    request with several), as a class index or class name."""
    server = _server(request)
    model = server.repository.model(name)
    classes = next(iter(model.versions.values())).bundle.classes
    label = body.label
    if isinstance(label, str):
        if label not in classes:
            raise RequestError(400, f"label: not a class of model {name!r}, got {label!r}")
        label = classes.index(label)
    elif not 0 <= label < len(classes):
        raise RequestError(400, f"label: must be in [0, {len(classes)}), got {label}")
    try:  # answered once committed durably, by the ledger's thread
        return await server.ledger.record_feedback_async(name, body.id, label)
    except LedgerError as exc:
        raise RequestError(exc.status, str(exc)) from None


@router.get("/models/{name}/experiment")
async def experiment(name: str, request: Request) -> dict[str, Any]:
    """Per-version accuracy with 95% CIs, and each version against the baseline, counting
    the routed requests since the model's current policy was loaded."""
    server = _server(request)
    model = server.repository.model(name)
    try:  # it reads the ledger: in a thread, off the event loop
        return await asyncio.to_thread(
            experiment_report,
            name,
            server.ledger,
            model.policy,
            sorted(model.versions),
            model.epoch,
        )
    except LedgerError as exc:
        raise RequestError(exc.status, str(exc)) from None
