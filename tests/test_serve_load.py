"""5,000 requests at concurrency 64 against one server: every answer a well-formed 200, the
batching invisible in the numbers, and /metrics counting exactly what was sent."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_support import RunningServer, running_server, v2_body

REQUESTS = 5_000
CONCURRENCY = 64
CLASSES = 10
INPUTS = np.random.default_rng(2024).uniform(0, 16, size=(8, 1, 8, 8)).round(3)


def plan(i: int) -> dict[str, Any]:
    """Request ``i`` of the run (fixed, whatever the order they complete in)."""
    first = i % len(INPUTS)
    rows = 2 if i % 7 == 0 else 1
    picks = [(first + k) % len(INPUTS) for k in range(rows)]
    x = INPUTS[picks]
    if i % 3 == 1:
        if i % 2:
            body: dict[str, Any] = {"instances": x.tolist()}
        else:
            body = {"inputs": {"input": x.tolist()}}
        return {
            "protocol": "tf",
            "path": "/v1/models/digits:predict",
            "body": body,
            "picks": picks,
            "mode": "none",
        }
    parameters: dict[str, Any] = {}
    mode = "none"
    if i % 50 == 0:  # a few randomized ones, with a seed that repeats
        mode = "mc_dropout"
        parameters = {"mode": mode, "samples": 2 + i % 3, "seed": i % 4}
    body = v2_body(x, **parameters)
    return {
        "protocol": "v2",
        "path": "/v2/models/digits/infer",
        "body": body,
        "picks": picks,
        "mode": mode,
        "parameters": parameters,
    }


def _finite(values: list[Any]) -> bool:
    return all(isinstance(v, float | int) and math.isfinite(v) for v in values)


def check_answer(request: dict[str, Any], response: httpx.Response) -> tuple[str, list[list]]:
    """(version, probabilities per row) of a 200 answer, after checking its shapes."""
    assert response.status_code == 200, (response.status_code, response.text[:300])
    payload = response.json()
    rows = len(request["picks"])
    version = payload["model_version"]
    assert version in ("1", "2"), payload
    assert payload["parameters"]["mode"] == request["mode"]
    if request["protocol"] == "v2":
        outputs = {o["name"]: o for o in payload["outputs"]}
        assert set(outputs) == {
            "probabilities",
            "predicted",
            "class",
            "entropy",
            "mutual_information",
        }
        assert outputs["probabilities"]["shape"] == [rows, CLASSES]
        for name in ("predicted", "class", "entropy", "mutual_information"):
            assert outputs[name]["shape"] == [rows], name
        for output in outputs.values():
            assert len(output["data"]) == math.prod(output["shape"]), output["name"]
        flat = outputs["probabilities"]["data"]
        probabilities = [flat[r * CLASSES : (r + 1) * CLASSES] for r in range(rows)]
        predicted = outputs["predicted"]["data"]
        assert _finite(outputs["entropy"]["data"] + outputs["mutual_information"]["data"])
        assert outputs["class"]["data"] == [str(p) for p in predicted]
        if request["mode"] == "mc_dropout":
            assert payload["parameters"]["seed"] == request["parameters"]["seed"]
            assert payload["parameters"]["samples"] == request["parameters"]["samples"]
    else:
        if "instances" in request["body"]:
            predictions = payload["predictions"]
            assert len(predictions) == rows
            probabilities = [p["probabilities"] for p in predictions]
            predicted = [p["predicted"] for p in predictions]
        else:
            columns = payload["outputs"]
            assert all(len(columns[name]) == rows for name in columns), columns.keys()
            probabilities = columns["probabilities"]
            predicted = columns["predicted"]
    for row, label in zip(probabilities, predicted, strict=True):
        assert len(row) == CLASSES and _finite(row), row
        assert math.isclose(sum(row), 1.0, abs_tol=1e-4)
        assert 0 <= label < CLASSES and row[label] == max(row)
    return version, probabilities


async def run_load(url: str) -> list[tuple[dict[str, Any], str, list[list]]]:
    results: list[tuple[dict[str, Any], str, list[list]] | None] = [None] * REQUESTS
    errors: list[str] = []
    queue = iter(range(REQUESTS))
    # Idle connections are dropped by the client well before uvicorn's 5 s keep-alive timeout:
    # with both at 5 s, a busy machine lets the client reuse a connection just as the server
    # closes it (a ReadError that says nothing about the server).
    limits = httpx.Limits(
        max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=1.0
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def worker() -> None:
            for i in queue:  # the workers share one iterator: each index once
                request = plan(i)
                try:
                    response = await client.post(request["path"], json=request["body"])
                    results[i] = (request, *check_answer(request, response))
                except Exception as exc:  # report them all, not only the first
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}"[:300])

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}"
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def samples(metrics: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` in a Prometheus exposition."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def forward_rows(request: dict[str, Any]) -> int:
    rows = len(request["picks"])
    return rows * request["parameters"]["samples"] if request["mode"] == "mc_dropout" else rows


@pytest.fixture(scope="module")
def load_server(serve_repository: Path) -> Iterator[RunningServer]:
    with running_server(serve_repository, seed=5, max_batch=64, max_delay_ms=2.0) as server:
        yield server


@pytest.mark.slow
def test_5000_requests_at_concurrency_64(load_server: RunningServer) -> None:
    results = asyncio.run(run_load(load_server.url))

    # Every protocol and version as sent; the 90/10 split holds over the routed requests.
    sent = Counter((request["protocol"], version) for request, version, _ in results)
    assert sum(sent.values()) == REQUESTS
    canary = sum(n for (_, version), n in sent.items() if version == "2")
    assert abs(canary - 0.1 * REQUESTS) <= 5 * math.sqrt(REQUESTS * 0.1 * 0.9), sent

    # Batching is invisible: an input gets the same numbers from a version, in any batch,
    # and an mc_dropout request with a given seed gets the same numbers as its repeats.
    seen: dict[tuple, list] = {}
    for request, version, probabilities in results:
        for pick, row in zip(request["picks"], probabilities, strict=True):
            if request["mode"] == "none":
                key: tuple = ("none", version, pick)
            else:
                parameters = request["parameters"]
                picks = tuple(request["picks"])  # a row's draws depend on the whole request
                key = ("mc", version, picks, pick, parameters["seed"], parameters["samples"])
            first = seen.setdefault(key, row)
            assert row == first, (key, row, first)
    assert sum(1 for key in seen if key[0] == "mc") >= 2

    with httpx.Client(base_url=load_server.url, timeout=60) as client:
        metrics = client.get("/metrics").text
    counted: Counter[tuple[str, str]] = Counter()
    for labels, value in samples(metrics, "randkit_requests_total"):
        assert labels["status"] == "200", (labels, value)
        assert labels["model"] == "digits", labels
        counted[(labels["protocol"], labels["version"])] += int(value)
    assert counted == sent
    # Each request ran in exactly one forward batch, with its rows; batches held several.
    # (the batch histograms have a series per model and version: sum them)
    batched = sum(value for _, value in samples(metrics, "randkit_batch_requests_sum"))
    batches = sum(value for _, value in samples(metrics, "randkit_batch_requests_count"))
    rows = sum(value for _, value in samples(metrics, "randkit_batch_rows_sum"))
    assert batched == REQUESTS
    assert rows == sum(forward_rows(request) for request, _, _ in results)
    assert batches < REQUESTS
    [(_, in_flight)] = samples(metrics, "randkit_requests_in_flight")
    assert in_flight == 1  # the /metrics request itself
