"""No 5xx for any bad input, and the server still answers afterwards.

Three parts, each against a real uvicorn server on 127.0.0.1 (``running_server``):

* schemathesis, loaded from the running server's ``/openapi.json``, fuzzes every operation
  (positive and negative cases, free and pinned to the real models, plus near-valid infer
  bodies) and checks ``not_a_server_error`` and that every 4xx is a one-line JSON error;
* a handcrafted list of bad requests against both protocols, each with the exact 4xx status
  and words its ``{"error": ...}`` message must name;
* a bearer-token server: 401 without the token, health still open.

The six bugs these tests found (500 on a zero-size tensor with huge dimensions, nulls in a
200 after an overflow, booleans among numbers accepted, a falsy mode taken as the default, URL
segments as metric labels, text/json refused) each have a test below.
"""

from __future__ import annotations

import http.client
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from randkit.serve.options import MODES
from randkit.serve.tfserving import router as tf_router
from randkit.serve.v2 import router as v2_router
from serve_support import RunningServer, running_server

V2 = "/v2/models/digits/infer"
V2_ENSEMBLE = "/v2/models/digits-ensemble/infer"
TF = "/v1/models/digits:predict"
ZEROS = [0.0] * 64
IMAGE = [[[0.0] * 8 for _ in range(8)]]  # one 1x8x8 instance
MAX_BODY_MB = 0.5
LIMIT = int(MAX_BODY_MB * 1024 * 1024)
TOKEN = "fuzz-token-0123456789"


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(serve_repository: Path) -> Iterator[RunningServer]:
    """The server schemathesis fuzzes (its own, since it may unload models)."""
    with running_server(serve_repository, max_body_mb=MAX_BODY_MB, seed=7) as server:
        yield server


@pytest.fixture(scope="module")
def server(serve_repository: Path) -> Iterator[RunningServer]:
    """The server of the handcrafted bad requests, and of the final valid one."""
    with running_server(serve_repository, max_body_mb=MAX_BODY_MB, seed=11) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


# -- helpers --------------------------------------------------------------------------------


def tensor(
    data: Any = None, shape: Any = (1, 1, 8, 8), datatype: str = "FP32", name: str = "input"
) -> dict[str, Any]:
    shape = list(shape) if isinstance(shape, tuple) else shape
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "data": ZEROS if data is None else data,
    }


def v2(*tensors: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"inputs": list(tensors) or [tensor()], **fields}


def v2_literal(data: str, parameters: str = "") -> bytes:
    """A V2 body with raw JSON text for ``data`` (NaN, Infinity: not in strict JSON)."""
    extra = f', "parameters": {parameters}' if parameters else ""
    return (
        '{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        f'"data": {data}}}]{extra}}}'
    ).encode()


def zeros_with(first: str) -> str:
    return "[" + ", ".join([first] + ["0.0"] * 63) + "]"


def tf_instances(*, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"instances": [IMAGE]}
    if parameters is not None:
        body["parameters"] = parameters
    return body


def assert_error(response: httpx.Response, status: int, expect: tuple[str, ...]) -> str:
    """The status is ``status``, the body is exactly ``{"error": "<one line>"}`` and the
    message names every word of ``expect`` (case-insensitive)."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and list(body) == ["error"], body
    message = body["error"]
    assert isinstance(message, str) and message.strip(), body
    assert "\n" not in message and "\r" not in message, message
    for word in expect:
        assert word.lower() in message.lower(), (word, message)
    return message


def assert_answer(response: httpx.Response, instances: int = 1) -> dict[str, Any]:
    """A well-formed 200 V2 answer: every output with the right shape and finite numbers."""
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [instances, 10]
    for name in ("predicted", "class", "entropy", "mutual_information"):
        assert outputs[name]["shape"] == [instances], outputs[name]
    for name, output in outputs.items():
        assert len(output["data"]) == math.prod(output["shape"]), name
        if output["datatype"] == "FP32":
            assert all(isinstance(v, float) and math.isfinite(v) for v in output["data"]), name
    assert math.isclose(sum(outputs["probabilities"]["data"][:10]), 1.0, abs_tol=1e-4)
    return body


# -- 1. schemathesis ------------------------------------------------------------------------

OPERATIONS = sorted(
    (route.path, method)
    for router in (v2_router, tf_router)
    for route in router.routes
    if isinstance(route, APIRoute)
    for method in route.methods
)

NAMES = st.sampled_from(["digits", "digits-ensemble"])
VERSIONS = st.sampled_from(["1", "2", "3", "stable", "canary", "..", "01"])
LABELS = st.sampled_from(["stable", "canary", "1", "nope"])

LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
JSON = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
PIXEL = st.one_of(st.floats(-1e3, 1e3, allow_nan=False), st.integers(-3, 3))


def odd(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` as one branch of a ``|`` (hypothesis would flatten a ``one_of`` into its
    alternatives and draw each alike, so the odd values would drown the usual ones)."""
    return strategy.map(lambda value: value)


DIMS = st.one_of(st.integers(-2, 9), st.sampled_from([1, 8, 64, 2**31, 2**63, 2**64]))
SHAPES = st.lists(DIMS, max_size=10)
ODD_PARAMETER = odd(
    st.sampled_from([0, -1, 0.5, 0.7, 1e-320, 1e300, 10_001, 10**9, 2**63, 2**64, "5", "NaN"])
    | LEAF
)
PARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(MODES) | ODD_PARAMETER,
        "samples": st.integers(1, 40) | ODD_PARAMETER,
        "seed": st.integers(0, 2**63 - 1) | ODD_PARAMETER,
        "sigma": st.floats(0.01, 2.0) | ODD_PARAMETER,
        "alpha": st.floats(1e-6, 0.49) | ODD_PARAMETER,
        "n0": st.integers(1, 40) | ODD_PARAMETER,
        "binary_data_output": st.booleans(),
        "priority": LEAF,
    },
) | odd(st.dictionaries(st.text(max_size=4), LEAF, max_size=2) | JSON)


@st.composite
def _valid_tensor(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    data = draw(st.lists(PIXEL, min_size=64 * n, max_size=64 * n))
    return tensor(data, (n, 1, 8, 8))


TENSORS = _valid_tensor() | odd(
    st.fixed_dictionaries(
        {
            "name": st.just("input") | odd(st.text(max_size=3)),
            "shape": SHAPES,
            "datatype": st.sampled_from(["FP32", "FP64", "FP16", "INT64", "BYTES", "BOOL", "fp32"]),
            "data": st.one_of(
                st.lists(PIXEL, max_size=130),
                st.recursive(PIXEL, lambda inner: st.lists(inner, max_size=8), max_leaves=80),
                st.lists(LEAF, max_size=8),
                JSON,
            ),
        },
        optional={"parameters": st.dictionaries(st.text(max_size=4), LEAF, max_size=2)},
    )
)
V2_BODIES = st.fixed_dictionaries(
    {"inputs": st.lists(TENSORS, min_size=1, max_size=1) | odd(st.lists(TENSORS, max_size=2))},
    optional={
        "id": st.text(max_size=8) | odd(LEAF),
        "parameters": PARAMETERS,
        "outputs": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "radius", "x"])}),
            max_size=2,
        ),
    },
)
INSTANCES = st.one_of(
    st.lists(st.just(IMAGE), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"input": st.just(IMAGE)}), min_size=1, max_size=2),
    odd(st.recursive(PIXEL, lambda inner: st.lists(inner, max_size=8), max_leaves=80) | JSON),
)
TF_BODIES = st.fixed_dictionaries(
    {"instances": INSTANCES},
    optional={"parameters": PARAMETERS, "signature_name": st.just("serving_default")},
) | odd(
    st.fixed_dictionaries(
        {},
        optional={
            "instances": INSTANCES,
            "inputs": INSTANCES | odd(st.fixed_dictionaries({"input": INSTANCES}) | JSON),
            "parameters": PARAMETERS,
            "signature_name": st.text(max_size=4) | odd(LEAF),
        },
    )
)
FEEDBACK_IDS = [f"fuzz-{i}" for i in range(5)]  # answered before the feedback fuzz
FEEDBACK_BODIES = st.fixed_dictionaries(
    {
        "id": st.sampled_from(FEEDBACK_IDS) | odd(st.sampled_from(["", "x" * 257]) | LEAF),
        "label": st.integers(-2, 11) | odd(st.sampled_from(["3", "cat", "", 2**64]) | LEAF),
    },
) | odd(st.dictionaries(st.sampled_from(["id", "label", "x"]), LEAF, max_size=3))


def _bodies(path: str) -> st.SearchStrategy[Any] | None:
    if path.endswith("/infer"):
        return V2_BODIES
    if path.endswith(":predict"):
        return TF_BODIES
    if path.endswith("/feedback"):
        return FEEDBACK_BODIES
    return None


def _pinned(path: str) -> dict[str, st.SearchStrategy[str]]:
    pinned = {"name": NAMES, "version": VERSIONS, "label": LABELS}
    return {key: value for key, value in pinned.items() if "{" + key + "}" in path}


def _schema_cases(operation: Any, path: str) -> st.SearchStrategy[Any]:
    """Schemathesis's own cases, positive and negative: free (random names, mostly 404s)
    and with the path parameters pinned to the real models, versions and labels."""
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    parts = [operation.as_strategy(mode) for mode in modes]
    pinned = _pinned(path)
    if pinned:
        params = st.fixed_dictionaries(pinned)
        for mode in modes:
            parts.append(
                params.flatmap(lambda p, m=mode: operation.as_strategy(m, path_parameters=p))
            )
    return st.one_of(parts)


def _body_cases(operation: Any, path: str) -> st.SearchStrategy[Any]:
    """Schemathesis cases with the path pinned and a near-valid body of ours (the schema
    alone rarely gets past the first check: its tensors have random names)."""
    bodies = _bodies(path)
    assert bodies is not None
    return st.tuples(st.fixed_dictionaries(_pinned(path)), bodies).flatmap(
        lambda pb: operation.as_strategy(
            path_parameters=pb[0], body=pb[1], media_type="application/json"
        )
    )


def one_line_json_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every 4xx answer is ``{"error": "<one line>"}``."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert isinstance(body, dict) and list(body) == ["error"], body
        message = body["error"]
        assert isinstance(message, str) and message.strip() and "\n" not in message, body
    return None


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_openapi_lists_every_route(api_schema: Any) -> None:
    served = {(op.ok().path, op.ok().method.upper()) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


def _fuzz(
    cases: st.SearchStrategy[Any], examples: int, allowed: frozenset[int] = frozenset()
) -> list[int]:
    """Send ``examples`` cases; schemathesis's checks raise on a 5xx (but the ``allowed``
    ones) or a bad 4xx body."""
    seen: list[int] = []
    checks = [one_line_json_error] if allowed else [not_a_server_error, one_line_json_error]

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def fuzz(case: Any) -> None:
        response = case.call_and_validate(checks=checks, timeout=60)
        seen.append(response.status_code)

    fuzz()
    assert seen and all(status < 500 or status in allowed for status in seen), sorted(seen)
    return seen


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_schemathesis_no_server_error(
    api_schema: Any, fuzz_server: RunningServer, path: str, method: str
) -> None:
    # :regress answers 501 by design: these models are classifiers (TF Serving's own
    # regress API needs a regression signature).
    allowed = frozenset({501}) if path.endswith(":regress") else frozenset()
    try:
        _fuzz(_schema_cases(api_schema[path][method], path), examples=40, allowed=allowed)
    finally:
        if path.endswith("/unload"):  # put back what the fuzz unloaded, for the other tests
            with fuzz_server.client() as c:
                for name in ("digits", "digits-ensemble"):
                    assert c.post(f"/v2/repository/models/{name}/load").status_code == 200


BODY_OPERATIONS = [(p, m) for p, m in OPERATIONS if _bodies(p) is not None]


@pytest.mark.parametrize(
    ("path", "method"), BODY_OPERATIONS, ids=[f"{m} {p}" for p, m in BODY_OPERATIONS]
)
def test_schemathesis_near_valid_bodies(
    api_schema: Any, fuzz_server: RunningServer, path: str, method: str
) -> None:
    if path.endswith("/feedback"):  # predictions for the feedback to label
        with fuzz_server.client() as c:
            for name in ("digits", "digits-ensemble"):
                for request_id in FEEDBACK_IDS:
                    body = v2(id=request_id)
                    assert c.post(f"/v2/models/{name}/infer", json=body).status_code == 200
    seen = _fuzz(_body_cases(api_schema[path][method], path), examples=50)
    # The bodies get past the schema: some answers are 200s, some are refusals.
    assert 200 in seen and any(400 <= status < 500 for status in seen), sorted(set(seen))


def test_fuzzed_server_still_answers(fuzz_server: RunningServer) -> None:
    with fuzz_server.client() as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert_answer(c.post(V2, json=v2()))
        assert_answer(c.post(V2_ENSEMBLE, json=v2()))
        assert c.post(TF, json=tf_instances()).status_code == 200


# -- 2. handcrafted bad requests ------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    path: str
    body: Any = None  # sent as JSON unless ``content`` is given
    content: bytes | Callable[[], Iterator[bytes]] | None = None
    status: int = 400
    expect: tuple[str, ...] = ()
    method: str = "POST"
    headers: dict[str, str] | None = None

    def send(self, client: httpx.Client) -> httpx.Response:
        if self.content is not None:
            content = self.content() if callable(self.content) else self.content
            return client.request(self.method, self.path, content=content, headers=self.headers)
        if self.body is None:
            return client.request(self.method, self.path, headers=self.headers)
        return client.request(self.method, self.path, json=self.body, headers=self.headers)


def bad(
    id: str,
    path: str,
    body: Any = None,
    status: int = 400,
    expect: tuple[str, ...] = (),
    *,
    marks: Any = (),
    **kwargs: Any,
) -> Any:
    case = Bad(path, body, status=status, expect=expect, **kwargs)
    return pytest.param(case, id=id, marks=marks)


def _chunks(total: int, size: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """A chunked body (no content-length) of ``total`` bytes."""

    def generate() -> Iterator[bytes]:
        yield b'{"inputs": ['
        sent = 0
        while sent < total:
            yield b" " * size
            sent += size

    return generate


def _parameters(path: str = V2, **parameters: Any) -> dict[str, Any]:
    if path == TF:
        return tf_instances(parameters=parameters)
    return v2(parameters=parameters)


def _binary(header: dict[str, Any], blob: bytes, length: str | None = None) -> Bad:
    """A binary-extension body: the JSON header, then ``blob``."""
    text = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": length or str(len(text))}
    return Bad(V2, content=text + blob, headers=headers)


def _binary_tensor(size: int, shape: tuple[int, ...] = (1, 1, 8, 8)) -> dict[str, Any]:
    return {
        "name": "input",
        "shape": list(shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }


def _bad_binary(id: str, case: Bad, expect: tuple[str, ...]) -> Any:
    return pytest.param(replace(case, expect=expect), id=id)


IMAGE_BYTES = bytes(4 * 64)
BINARY_CASES = [
    _bad_binary(
        "binary-header-length-not-a-number",
        _binary(v2(_binary_tensor(256)), IMAGE_BYTES, length="12x"),
        ("Inference-Header-Content-Length", "'12x'"),
    ),
    _bad_binary(
        "binary-header-length-past-the-body",
        _binary(v2(_binary_tensor(256)), IMAGE_BYTES, length="99999"),
        ("Inference-Header-Content-Length", "99999"),
    ),
    _bad_binary(
        "binary-size-past-the-data",
        _binary(v2(_binary_tensor(512)), IMAGE_BYTES),
        ("inputs.0.parameters.binary_data_size", "512", "256 left"),
    ),
    _bad_binary(
        "binary-size-not-shape",
        _binary(v2(_binary_tensor(128)), IMAGE_BYTES[:128]),
        ("inputs.0", "128 bytes", "[1, 1, 8, 8]", "256"),
    ),
    _bad_binary(
        "binary-bytes-left-over",
        _binary(v2(_binary_tensor(256)), IMAGE_BYTES + b"xx"),
        ("body", "2 bytes after"),
    ),
    _bad_binary(
        "binary-size-negative",
        _binary(v2(_binary_tensor(-4)), IMAGE_BYTES),
        ("binary_data_size", "-4"),
    ),
    _bad_binary(
        "binary-without-header-length",
        Bad(V2, content=json.dumps(v2(_binary_tensor(256))).encode() + IMAGE_BYTES),
        ("body", "not valid JSON"),
    ),
    _bad_binary(
        "binary-nan-pixels",
        _binary(v2(_binary_tensor(256)), np.full(64, np.nan, np.float32).tobytes()),
        ("inputs.0",),
    ),
]


SHAPE_CASES = [
    bad("rank-1", V2, v2(tensor(shape=(64,))), expect=("inputs.0", "[64]", "(N, 1, 8, 8)")),
    bad("rank-5", V2, v2(tensor(shape=(1, 1, 1, 8, 8))), expect=("[1, 1, 1, 8, 8]",)),
    bad("no-batch-dim", V2, v2(tensor(shape=(1, 8, 8))), expect=("no batch dimension",)),
    bad("wrong-sizes", V2, v2(tensor(shape=(1, 1, 4, 16))), expect=("[1, 4, 16]",)),
    bad("rank-0", V2, v2(tensor([1.0], shape=())), expect=("shape []",)),
    bad("nine-dims", V2, v2(tensor(shape=[1] * 9)), expect=("inputs.0.shape",)),
    bad("negative-dim", V2, v2(tensor(shape=(-1, 1, 8, 8))), expect=("shape", "negative")),
    bad("negative-dims-even", V2, v2(tensor(shape=(-1, -1, 8, 8))), expect=("negative",)),
    bad("data-too-short", V2, v2(tensor(shape=(2, 1, 8, 8))), expect=("64 values", "128")),
    bad("data-too-long", V2, v2(tensor(ZEROS * 2)), expect=("128 values", "64")),
    bad("zero-batch", V2, v2(tensor([], shape=(0, 1, 8, 8))), expect=("no examples",)),
    bad("huge-dim", V2, v2(tensor(shape=(10**30, 1, 8, 8))), expect=("64 values",)),
    bad("float-dim", V2, v2(tensor(shape=[1.5, 1, 8, 8])), expect=("inputs.0.shape.0",)),
    bad("shape-string", V2, v2(tensor(shape="1,1,8,8")), expect=("inputs.0.shape",)),
    bad("tf-rank-1", TF, {"instances": [ZEROS]}, expect=("instances", "[1, 64]")),
    bad("tf-wrong-sizes", TF, {"instances": [[[[0.0] * 4] * 16]]}, expect=("[1, 16, 4]",)),
    bad("tf-empty-instances", TF, {"instances": []}, expect=("instances", "[0]")),
    bad("tf-columns-no-batch", TF, {"inputs": IMAGE}, expect=("no batch dimension",)),
    bad("tf-ragged", TF, {"instances": [IMAGE, [[[0.0] * 8] * 7]]}, expect=("rectangular",)),
]

DATATYPE_CASES = [
    bad("bytes", V2, v2(tensor(datatype="BYTES")), expect=("datatype", "'BYTES'")),
    bad("bool", V2, v2(tensor(datatype="BOOL")), expect=("datatype", "'BOOL'")),
    bad("int64-for-float-model", V2, v2(tensor(datatype="INT64")), expect=("'INT64'", "FP32")),
    bad("lower-case-fp32", V2, v2(tensor(datatype="fp32")), expect=("'fp32'",)),
    bad("datatype-number", V2, v2(tensor(datatype=32)), expect=("inputs.0.datatype",)),
    bad("strings", V2, v2(tensor(["0.5"] * 64)), expect=("inputs.0.data", "not numbers")),
    bad("one-string", V2, v2(tensor(["x", *ZEROS[1:]])), expect=("not numbers",)),
    bad("booleans", V2, v2(tensor([True] * 64)), expect=("inputs.0.data", "bool")),
    bad(
        "booleans-mixed-with-numbers", V2, v2(tensor([True, *ZEROS[1:]])), expect=("inputs.0.data",)
    ),
    bad("nulls", V2, v2(tensor([None] * 64)), expect=("not numbers",)),
    bad("objects", V2, v2(tensor([{"v": 1}] * 64)), expect=("not numbers",)),
    bad("ragged", V2, v2(tensor([ZEROS[:32], ZEROS[:31]])), expect=("rectangular",)),
    bad("ragged-deep", V2, v2(tensor([[ZEROS], [ZEROS[:3]]])), expect=("rectangular",)),
    bad("int-too-big", V2, v2(tensor([10**400, *ZEROS[1:]])), expect=("too large",)),
    bad("data-not-list", V2, v2(tensor("0,0,0")), expect=("inputs.0.data",)),
    bad("tf-strings", TF, {"instances": [[[["a"] * 8] * 8]]}, expect=("instances", "numbers")),
    bad("tf-booleans", TF, {"instances": [[[[True] * 8] * 8]]}, expect=("bool",)),
    bad("tf-columns-string", TF, {"inputs": "abc"}, expect=("inputs", "numbers")),
]

NON_FINITE_CASES = [
    bad("nan", V2, content=v2_literal(zeros_with("NaN")), expect=("NaN or Inf",)),
    bad("infinity", V2, content=v2_literal(zeros_with("Infinity")), expect=("NaN or Inf",)),
    bad("minus-infinity", V2, content=v2_literal(zeros_with("-Infinity")), expect=("Inf",)),
    bad("1e400-is-inf", V2, content=v2_literal(zeros_with("1e400")), expect=("NaN or Inf",)),
    bad("float32-overflow", V2, content=v2_literal(zeros_with("1e39")), expect=("NaN or Inf",)),
    bad(
        "nan-sigma",
        V2,
        content=v2_literal(json.dumps(ZEROS), '{"mode": "smooth", "sigma": NaN}'),
        expect=("parameters.sigma", "finite"),
    ),
    bad(
        "infinite-sigma",
        V2,
        content=v2_literal(json.dumps(ZEROS), '{"mode": "smooth", "sigma": Infinity}'),
        expect=("parameters.sigma", "finite"),
    ),
    bad(
        "nan-seed",
        V2,
        content=v2_literal(json.dumps(ZEROS), '{"seed": NaN}'),
        expect=("parameters.seed",),
    ),
    bad(
        "tf-nan",
        TF,
        content=b'{"instances": [[[[NaN, 0, 0, 0, 0, 0, 0, 0]'
        + b", [0, 0, 0, 0, 0, 0, 0, 0]" * 7
        + b"]]]}",
        expect=("instances", "NaN or Inf"),
    ),
    bad(
        "tf-infinity-columns",
        TF,
        content=b'{"inputs": [[[[-Infinity, 0, 0, 0, 0, 0, 0, 0]'
        + b", [0, 0, 0, 0, 0, 0, 0, 0]" * 7
        + b"]]]}",
        expect=("inputs", "NaN or Inf"),
    ),
]

STRUCTURE_CASES = [
    bad("empty-inputs", V2, {"inputs": []}, expect=("inputs", "at least 1")),
    bad("two-inputs", V2, v2(tensor(), tensor()), expect=("one input", "got 2")),
    bad("wrong-input-name", V2, v2(tensor(name="image")), expect=("inputs.0.name", "'image'")),
    bad("no-inputs", V2, {"id": "x"}, expect=("inputs", "required")),
    bad("unknown-field", V2, v2(foo=1), expect=("foo",)),
    bad("unknown-tensor-field", V2, v2({**tensor(), "foo": 1}), expect=("inputs.0.foo",)),
    bad("id-not-string", V2, v2(id=5), expect=("id",)),
    bad("parameters-not-object", V2, v2(parameters=[1]), expect=("parameters",)),
    bad(
        "binary-tensor",
        V2,
        v2({**tensor(), "parameters": {"binary_data_size": 256}}),
        expect=("binary",),
    ),
    bad("unknown-output", V2, v2(outputs=[{"name": "radius"}]), expect=("outputs", "'radius'")),
    bad("body-too-big", V2, content=b" " * (LIMIT + 1), status=413, expect=("body", "limit")),
    bad("tf-body-too-big", TF, content=b"[" * (2 * LIMIT), status=413, expect=("limit",)),
    bad("chunked-too-big", V2, content=_chunks(LIMIT + 1), status=413, expect=("limit",)),
    bad("tf-chunked-too-big", TF, content=_chunks(4 * LIMIT), status=413, expect=("limit",)),
    bad("nested-100000", V2, content=b"[" * 100_000, expect=("body",)),
    bad("nested-object-100000", V2, content=b'{"inputs": ' + b"[" * 100_000, expect=("body",)),
    bad(
        "nested-data-2000",
        V2,
        content=v2_literal("[" * 2000 + "]" * 2000),
        expect=("body",),
    ),
    bad("nested-data-100", V2, content=v2_literal("[" * 100 + "1" + "]" * 100), expect=("data",)),
    bad("tf-nested-100000", TF, content=b'{"instances": ' + b"[" * 100_000, expect=("body",)),
    bad(
        "tf-nested-100", TF, {"instances": json.loads("[" * 100 + "]" * 100)}, expect=("instances",)
    ),
    bad("invalid-json", V2, content=b'{"inputs": [', expect=("not valid JSON",)),
    bad("invalid-json-quote", TF, content=b"{'instances': []}", expect=("not valid JSON",)),
    bad("invalid-utf8", V2, content=b'{"inputs": "\xff\xfe"}', expect=("body",)),
    bad("empty-body", V2, content=b"", expect=("body", "required")),
    bad("json-array", V2, [1, 2], expect=("body", "object")),
    bad("json-string", V2, content=b'"inputs"', expect=("body", "object")),
    bad("json-number", TF, content=b"5", expect=("body", "dictionary")),
    bad("json-null", TF, content=b"null", expect=("body",)),
]

NAME_CASES = [
    bad("unknown-model", "/v2/models/nope/infer", v2(), status=404, expect=("'nope'", "not found")),
    bad("tf-unknown-model", "/v1/models/nope:predict", tf_instances(), 404, expect=("'nope'",)),
    bad("unknown-version", "/v2/models/digits/versions/7/infer", v2(), 404, expect=("'7'",)),
    bad("version-zero-padded", "/v2/models/digits/versions/01/infer", v2(), 404, ("'01'",)),
    bad("unknown-label", "/v2/models/digits/versions/beta/infer", v2(), 404, ("'beta'",)),
    bad(
        "tf-unknown-version",
        "/v1/models/digits/versions/9:predict",
        tf_instances(),
        404,
        expect=("'9'",),
    ),
    bad(
        "tf-unknown-label",
        "/v1/models/digits/labels/beta:predict",
        tf_instances(),
        404,
        expect=("no label 'beta'",),
    ),
    bad("tf-version-as-label", "/v1/models/digits/labels/1:predict", tf_instances(), 404),
    bad("dot-dot-encoded", "/v2/models/%2e%2e/infer", v2(), 404, expect=("'..'", "not found")),
    bad("tf-dot-dot-encoded", "/v1/models/%2E%2E:predict", tf_instances(), 404, ("'..'",)),
    bad("dot-dot-slash-encoded", "/v2/models/%2e%2e%2f%2e%2e%2fetc/infer", v2(), 404),
    bad("absolute-path", "/v2/models/%2Fetc%2Fpasswd/infer", v2(), 404, ("not found",)),
    bad("dot-dot-version", "/v2/models/digits/versions/%2e%2e/infer", v2(), 404, ("'..'",)),
    bad("dot-name-pattern", "/v2/models/1../infer", v2(), 404, ("'1..'", "not found")),
    bad("load-dot-dot", "/v2/repository/models/%2e%2e/load", status=404, expect=("'..'",)),
    bad("load-absolute", "/v2/repository/models/%2Ftmp/load", status=404),
    bad("load-unknown", "/v2/repository/models/nope/load", status=404, expect=("'nope'",)),
    bad("unload-unknown", "/v2/repository/models/nope/unload", status=404, expect=("'nope'",)),
    bad("metadata-dot-dot", "/v2/models/%2e%2e", status=404, method="GET", expect=("'..'",)),
    bad("tf-metadata-dot-dot", "/v1/models/%2e%2e/metadata", status=404, method="GET"),
    bad("name-64", f"/v2/models/{'a' * 64}/infer", v2(), 404, ("not found",)),
    bad("name-65", f"/v2/models/{'a' * 65}/infer", v2(), 404, ("not found",)),
    bad("name-60000", f"/v2/models/{'a' * 60_000}/infer", v2(), 404, ("not found",)),
    bad("tf-name-60000", f"/v1/models/{'b' * 60_000}:predict", tf_instances(), 404),
    bad("version-5000", f"/v2/models/digits/versions/{'9' * 5000}/infer", v2(), 404),
    bad("outputs-not-list", V2, v2(outputs={"name": "x"}), expect=("outputs",)),
    bad("request-key-257", V2, v2(), headers={"X-Request-Key": "k" * 257}, expect=("key",)),
]

PARAMETER_CASES = [
    bad("unknown-key", V2, _parameters(temperature=1), expect=("parameters.temperature",)),
    bad("mode-unknown", V2, _parameters(mode="bayes"), expect=("parameters.mode", "'bayes'")),
    bad("mode-case", V2, _parameters(mode="NONE"), expect=("parameters.mode", "'NONE'")),
    bad("mode-list", V2, _parameters(mode=["none"]), expect=("parameters.mode",)),
    *(
        bad(f"mode-falsy-{value!r}", V2, _parameters(mode=value), expect=("parameters.mode",))
        for value in ("", 0, False)
    ),
    *(
        bad(f"samples-{value!r}", V2, _parameters(mode="mc_dropout", samples=value), expect=e)
        for value, e in [
            (0, ("parameters.samples", "[1, 10000]")),
            (-1, ("parameters.samples", "[1, 10000]")),
            (10**9, ("parameters.samples", "[1, 10000]")),
            ("5", ("parameters.samples", "integer")),
            (True, ("parameters.samples", "integer")),
            (1.5, ("parameters.samples", "integer")),
        ]
    ),
    bad("tf-samples-0", TF, _parameters(TF, mode="mc_dropout", samples=0), expect=("samples",)),
    *(
        bad(f"seed-{value!r}", V2, _parameters(seed=value), expect=("parameters.seed",))
        for value in (-1, 2**63, 2**64, "x", True, 1.5)
    ),
    *(
        bad(
            f"sigma-{value!r}",
            V2,
            _parameters(mode="smooth", sigma=value),
            expect=("parameters.sigma",),
        )
        for value in (0, -0.5, "NaN", None, True)
    ),
    bad("weight-noise-sigma-0", V2, _parameters(mode="weight_noise", sigma=0), expect=("sigma",)),
    *(
        bad(
            f"alpha-{value!r}",
            V2,
            _parameters(mode="smooth", sigma=0.25, alpha=value),
            expect=("parameters.alpha",),
        )
        for value in (0.7, 0.5, 0, -0.1)
    ),
    bad("n0-0", V2, _parameters(mode="smooth", sigma=0.25, n0=0), expect=("parameters.n0",)),
    bad("n0-with-none", V2, _parameters(mode="none", n0=5), expect=("parameters.n0", "'none'")),
    bad("sigma-with-tta", V2, _parameters(mode="tta", sigma=0.1), expect=("parameters.sigma",)),
    bad("alpha-with-none", V2, _parameters(alpha=0.01), expect=("parameters.alpha",)),
    bad(
        "ensemble-on-single",
        V2,
        _parameters(mode="ensemble"),
        expect=("parameters.mode", "'ensemble'"),
    ),
    bad("tf-ensemble-on-single", TF, _parameters(TF, mode="ensemble"), expect=("mode",)),
    *(
        bad(
            f"{mode}-on-ensemble",
            V2_ENSEMBLE,
            _parameters(mode=mode),
            expect=("parameters.mode", "ensemble of 2", f"'{mode}'"),
        )
        for mode in ("tta", "mc_dropout", "weight_noise", "smooth")
    ),
    bad(
        "binary-output-not-bool",
        V2,
        _parameters(binary_data_output="yes"),
        expect=("parameters.binary_data_output", "'yes'"),
    ),
    bad(
        "output-binary-not-bool",
        V2,
        v2(outputs=[{"name": "predicted", "parameters": {"binary_data": 1}}]),
        expect=("outputs.0.parameters.binary_data", "1"),
    ),
    bad(
        "output-classification",
        V2,
        v2(outputs=[{"name": "predicted", "parameters": {"classification": 3}}]),
        expect=("outputs.0.parameters.classification", "not supported"),
    ),
    *BINARY_CASES,
    bad(
        "too-many-rows",
        V2,
        v2(tensor(ZEROS * 200, shape=(200, 1, 8, 8)), parameters={"mode": "tta", "samples": 10**4}),
        expect=("parameters.samples", "rows"),
    ),
]

TF_CASES = [
    bad(
        "tf-instances-and-inputs",
        TF,
        {"instances": [IMAGE], "inputs": [IMAGE]},
        400,
        ("instances", "inputs"),
    ),
    bad("tf-neither", TF, {}, expect=("instances", "inputs")),
    bad("tf-only-parameters", TF, {"parameters": {"mode": "none"}}, expect=("instances",)),
    bad("tf-inputs-null", TF, {"inputs": None}, expect=("instances", "inputs")),
    bad("tf-inputs-wrong-key", TF, {"inputs": {"image": [IMAGE]}}, expect=("'input'",)),
    bad("tf-inputs-two-keys", TF, {"inputs": {"input": [IMAGE], "x": 1}}, expect=("'input'",)),
    bad("tf-instance-wrong-key", TF, {"instances": [{"image": IMAGE}]}, expect=("'input'",)),
    bad(
        "tf-instance-extra-key",
        TF,
        {"instances": [{"input": IMAGE, "mask": 1}]},
        expect=("instances", "'input'"),
    ),
    bad("tf-input-singular", TF, {"input": [IMAGE]}, expect=("input",)),
    bad("tf-unknown-field", TF, {"instances": [IMAGE], "foo": 1}, expect=("foo",)),
    bad("tf-instances-not-list", TF, {"instances": IMAGE[0][0][0]}, expect=("instances",)),
    bad(
        "tf-signature-number",
        TF,
        {"instances": [IMAGE], "signature_name": 5},
        400,
        ("signature_name",),
    ),
]

FEEDBACK = "/v2/models/digits/feedback"
FEEDBACK_CASES = [
    bad(
        "feedback-unknown-id",
        FEEDBACK,
        {"id": "never-seen", "label": 1},
        404,
        ("id", "'never-seen'"),
    ),
    bad(
        "feedback-unknown-model",
        "/v2/models/nope/feedback",
        {"id": "x", "label": 1},
        404,
        ("'nope'",),
    ),
    bad("feedback-label-10", FEEDBACK, {"id": "x", "label": 10}, expect=("label", "[0, 10)")),
    bad("feedback-label-negative", FEEDBACK, {"id": "x", "label": -1}, expect=("label",)),
    bad("feedback-label-huge", FEEDBACK, {"id": "x", "label": 2**70}, expect=("label",)),
    bad("feedback-label-cat", FEEDBACK, {"id": "x", "label": "cat"}, expect=("label", "'cat'")),
    bad("feedback-label-float", FEEDBACK, {"id": "x", "label": 1.5}, expect=("label",)),
    bad("feedback-label-bool", FEEDBACK, {"id": "x", "label": True}, expect=("label",)),
    bad("feedback-no-label", FEEDBACK, {"id": "x"}, expect=("label", "required")),
    bad("feedback-no-id", FEEDBACK, {"label": 1}, expect=("id", "required")),
    bad("feedback-empty-id", FEEDBACK, {"id": "", "label": 1}, expect=("id",)),
    bad("feedback-long-id", FEEDBACK, {"id": "x" * 257, "label": 1}, expect=("id", "256")),
    bad("feedback-extra", FEEDBACK, {"id": "x", "label": 1, "user": "u"}, expect=("user",)),
]

ALL_CASES = [
    *SHAPE_CASES,
    *DATATYPE_CASES,
    *NON_FINITE_CASES,
    *STRUCTURE_CASES,
    *NAME_CASES,
    *PARAMETER_CASES,
    *TF_CASES,
    *FEEDBACK_CASES,
]


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_request_is_a_one_line_4xx(client: httpx.Client, case: Bad) -> None:
    assert_error(case.send(client), case.status, case.expect)


def test_dot_dot_segments_sent_verbatim(server: RunningServer) -> None:
    """``..`` in a raw request target (httpx would normalize it away)."""
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(v2())
    tf_body = json.dumps(tf_instances())
    for target, expect in [
        ("/v2/models/../infer", "'..'"),
        ("/v2/models/../../etc/passwd/infer", "not found"),
        ("/v1/models/..:predict", "'..'"),
        ("/v2/repository/models/../load", "'..'"),
    ]:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(
                "POST",
                target,
                body=tf_body if target.startswith("/v1/") else body,
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            status, payload = response.status, response.read()
        finally:
            connection.close()
        assert status == 404, (target, status, payload[:200])
        message = json.loads(payload)["error"]
        assert expect in message.lower() and "\n" not in message, (target, message)


def test_second_feedback_is_a_conflict(client: httpx.Client) -> None:
    answer = client.post(V2, json=v2(id="fuzz-feedback-1"))
    assert answer.status_code == 200 and answer.json()["id"] == "fuzz-feedback-1"
    first = client.post(FEEDBACK, json={"id": "fuzz-feedback-1", "label": "3"})
    assert first.status_code == 200 and first.json()["label"] == 3
    second = client.post(FEEDBACK, json={"id": "fuzz-feedback-1", "label": 3})
    assert_error(second, 409, ("id", "'fuzz-feedback-1'", "already"))
    # The label of an instance of a batch request is id/i; id/2 of a 2-instance one is unknown.
    pair = client.post(V2, json=v2(tensor(ZEROS * 2, (2, 1, 8, 8)), id="fuzz-pair"))
    assert pair.status_code == 200
    assert client.post(FEEDBACK, json={"id": "fuzz-pair/1", "label": 0}).status_code == 200
    assert_error(client.post(FEEDBACK, json={"id": "fuzz-pair/2", "label": 0}), 404, ("id",))
    assert_error(client.post(FEEDBACK, json={"id": "fuzz-pair", "label": 0}), 404, ("id",))


# -- known bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[2**63, 0], [0, 2**40, 2**40], [2**62, 0, 8, 8]])
def test_zero_size_tensor_with_huge_dims(client: httpx.Client, shape: list[int]) -> None:
    response = client.post(V2, json=v2(tensor([], shape=shape)))
    assert response.status_code < 500, response.text[:200]
    assert_error(response, 400, ("inputs.0",))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(V2, v2(tensor([3e38] * 64)), id="v2-input-3e38"),
        pytest.param(TF, {"instances": [[[[3e38] * 8] * 8]]}, id="tf-input-3e38"),
        pytest.param(
            V2,
            v2(parameters={"mode": "weight_noise", "sigma": 1e308, "samples": 2, "seed": 1}),
            id="weight-noise-sigma-1e308",
        ),
        pytest.param(
            TF,
            tf_instances(
                parameters={"mode": "smooth", "sigma": 1e308, "samples": 100, "n0": 10, "seed": 1}
            ),
            id="smooth-sigma-1e308-radius",
        ),
    ],
)
def test_finite_request_never_answers_null(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    """Either refuse the request (4xx naming the problem) or answer with numbers."""
    response = client.post(path, json=body)
    assert response.status_code < 500
    if response.status_code != 200:
        assert_error(response, 400, ())
        return

    def numbers(value: Any) -> Iterator[Any]:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in ("class", "name", "datatype", "parameters", "id"):
                    yield from numbers(item)
        elif isinstance(value, list):
            for item in value:
                yield from numbers(item)
        else:
            yield value

    payload = response.json()
    values = list(numbers(payload.get("outputs", payload.get("predictions"))))
    assert values and None not in values, "an output number is null (NaN or Inf)"


def test_bad_names_do_not_become_metric_labels(client: httpx.Client) -> None:
    """A refused request's unknown model is counted as "unknown"; its version or label
    should not be a label value of its own either."""
    for i in range(3):
        bogus = client.post(f"/v2/models/digits/versions/bogus-{i}/infer", json=v2())
        assert_error(bogus, 404, (f"'bogus-{i}'",))
        label = client.post(f"/v1/models/digits/labels/nolabel-{i}:predict", json=tf_instances())
        assert_error(label, 404, (f"'nolabel-{i}'",))
    model = client.post(f"/v2/models/{'m' * 80}/infer", json=v2())
    assert_error(model, 404, ("not found",))
    metrics = client.get("/metrics").text
    assert "m" * 80 not in metrics  # the model name is collapsed to "unknown"
    assert "bogus-" not in metrics and "nolabel-" not in metrics


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/json",
    ],
)
def test_content_type_is_not_insisted_on(client: httpx.Client, content_type: str) -> None:
    body = json.dumps(v2()).encode()
    assert_answer(client.post(V2, content=body, headers={"Content-Type": content_type}))


# -- 3. bearer token ------------------------------------------------------------------------


def test_token_server(serve_repository: Path) -> None:
    with running_server(
        serve_repository, token=TOKEN, seed=3, max_body_mb=MAX_BODY_MB
    ) as token_server:
        with token_server.client() as c:
            assert c.get("/v2/health/live").status_code == 200
            assert c.get("/v2/health/ready").status_code == 200
            refused = {
                "missing": {},
                "wrong": {"Authorization": "Bearer wrong-token-0000"},
                "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
                "longer": {"Authorization": f"Bearer {TOKEN}x"},
                "scheme": {"Authorization": f"Token {TOKEN}"},
                "lower-case-scheme": {"Authorization": f"bearer {TOKEN}"},
                "bare": {"Authorization": TOKEN},
                "empty": {"Authorization": ""},
            }
            for why, headers in refused.items():
                for path, body in [(V2, v2()), (TF, tf_instances())]:
                    response = c.post(path, json=body, headers=headers)
                    assert response.headers.get("www-authenticate") == "Bearer", why
                    assert_error(response, 401, ("authorization", "token"))
            # The token is checked before the body is even read.
            assert_error(c.post(V2, content=b"{not json"), 401, ("token",))
            assert_error(c.post(V2, content=b" " * (2 * LIMIT)), 401, ("token",))
            assert_error(c.get("/v2/models/digits"), 401, ("token",))
            assert_error(c.get("/metrics"), 401, ("token",))
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert_answer(c.post(V2, json=v2(), headers=auth))
            assert c.post(TF, json=tf_instances(), headers=auth).status_code == 200
            assert_error(c.post(V2, json=v2(tensor(datatype="BYTES")), headers=auth), 400, ())
            assert c.get("/v2/health/live").json() == {"live": True}


# -- 4. afterwards --------------------------------------------------------------------------


def test_server_still_answers_after_bad_requests(client: httpx.Client) -> None:
    """Runs last in this file: the server of every bad request above still serves."""
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    body = assert_answer(client.post(V2, json=v2(tensor(ZEROS * 3, (3, 1, 8, 8)))), 3)
    assert body["model_name"] == "digits" and body["model_version"] in ("1", "2")
    mc = client.post(V2, json=v2(parameters={"mode": "mc_dropout", "samples": 4, "seed": 5}))
    assert assert_answer(mc)["parameters"]["seed"] == 5
    assert_answer(client.post(V2_ENSEMBLE, json=v2()))
    tf = client.post(TF, json={"instances": [IMAGE, {"input": IMAGE}]})
    assert tf.status_code == 200
    predictions = tf.json()["predictions"]
    assert len(predictions) == 2 and all(len(p["probabilities"]) == 10 for p in predictions)
    columns = client.post(TF, json={"inputs": {"input": [IMAGE]}})
    assert columns.status_code == 200 and len(columns.json()["outputs"]["predicted"]) == 1
    assert_error(client.post(V2, json=v2(tensor(datatype="BYTES"))), 400, ("datatype",))
    assert_error(client.post("/v2/models/nope/infer", json=v2()), 404, ("'nope'",))
    metrics = client.get("/metrics").text
    for status in ("200", "400", "404"):
        assert f'status="{status}"' in metrics, status
    assert 'status="5' not in metrics
