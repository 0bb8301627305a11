"""The fast V2 JSON parse (orjson + NumPy for the tensors' values) against the full pydantic
parse it stands in for: every body gives the same tensor, or the same one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from randkit.deploy.bundle import LoadedBundle, load_bundle
from randkit.serve.options import RequestError
from randkit.serve.protocol import V2InferRequest, v2_input
from randkit.serve.refusals import one_line
from randkit.serve.v2_body import parse_v2_body

ZEROS = [0.0] * 64


@pytest.fixture(scope="module")
def bundle(serve_repository: Path) -> LoadedBundle:
    return load_bundle(serve_repository / "digits" / "1", "cpu")


def body(data: Any, **extra: Any) -> dict[str, Any]:
    shape = extra.pop("shape", [1, 1, 8, 8])
    tensor = {"name": "input", "shape": shape, "datatype": "FP32", "data": data}
    return {"inputs": [tensor], **extra}


def outcome(read: Any) -> tuple[str, Any]:
    """("ok", tensor) or ("error", the one-line message the client would get)."""
    try:
        return "ok", read()
    except RequestError as exc:
        return "error", exc.message
    except RequestValidationError as exc:
        return "error", one_line(exc)


def fast(raw: bytes, bundle: LoadedBundle) -> tuple[str, Any]:
    def read() -> torch.Tensor:
        parsed = parse_v2_body(raw, None)
        return v2_input(parsed.request, bundle, parsed.binary, parsed.decoded)

    return outcome(read)


def slow(raw: bytes, bundle: LoadedBundle) -> tuple[str, Any]:
    def read() -> torch.Tensor:
        try:
            request = V2InferRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        return v2_input(request, bundle)

    return outcome(read)


CASES = {
    "floats": body([i / 64 for i in range(64)]),
    "ints": body(list(range(64))),
    "nested": body([[[[i / 64 for i in range(8)] for _ in range(8)]]]),
    "two-rows": body([0.5] * 128, shape=[2, 1, 8, 8]),
    "bool-in-parameters": body(ZEROS, parameters={"binary_data_output": False, "seed": 3}),
    "true-inside-a-string": body(ZEROS, id="true-or-false"),
    "bool-among-numbers": body([True, *ZEROS[1:]]),
    "bool-among-numbers-and-in-parameters": body(
        [False, *ZEROS[1:]], parameters={"binary_data_output": True}
    ),
    "only-bools": body([True] * 64),
    "string-among-numbers": body(["0.5", *ZEROS[1:]]),
    "null-among-numbers": body([None, *ZEROS[1:]]),
    "object-among-numbers": body([{"v": 1}, *ZEROS[1:]]),
    "ragged": body([ZEROS[:32], ZEROS[:31]]),
    "int-beyond-64-bits": body([10**30, *ZEROS[1:]]),
    "int-beyond-float64": body([10**400, *ZEROS[1:]]),
    "wrong-count": body(ZEROS[:10]),
    "unknown-field": {**body(ZEROS), "colour": "red"},
    "unknown-tensor-field": {
        "inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ZEROS, "x": 1}
        ]
    },
    "shape-of-strings": body(ZEROS, shape=["1", 1, 8, 8]),
    "no-inputs": {"inputs": []},
    "inputs-not-a-list": {"inputs": {"name": "input"}},
    "data-not-a-list": body("0,0,0"),
    "data-missing": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]},
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_parse_gives_what_the_full_parse_gives(name: str, bundle: LoadedBundle) -> None:
    raw = json.dumps(CASES[name]).encode()
    got, want = fast(raw, bundle), slow(raw, bundle)
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert torch.equal(got[1], want[1])
    else:
        assert got[1] == want[1]


def test_the_fast_parse_is_taken_for_ordinary_bodies(bundle: LoadedBundle) -> None:
    for name in ("floats", "nested", "bool-in-parameters"):
        parsed = parse_v2_body(json.dumps(CASES[name]).encode(), None)
        assert 0 in parsed.decoded and parsed.request.inputs[0].data is None, name
    for name in ("bool-among-numbers", "true-inside-a-string", "string-among-numbers"):
        parsed = outcome(lambda n=name: parse_v2_body(json.dumps(CASES[n]).encode(), None))
        assert parsed[0] == "error" or not parsed[1].decoded, name


def test_a_huge_integer_is_a_float_on_both_paths(bundle: LoadedBundle) -> None:
    raw = json.dumps(CASES["int-beyond-64-bits"]).encode()
    status, tensor = fast(raw, bundle)
    assert status == "ok" and tensor[0, 0, 0, 0].item() == np.float32(1e30)
