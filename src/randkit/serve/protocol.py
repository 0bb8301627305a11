"""Request and response shapes of the Open Inference Protocol (KServe V2, JSON tensors) and of
TensorFlow Serving's REST API, and their conversion to and from the engine's tensors."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from typing_extensions import TypeAliasType

from randkit.deploy.bundle import LoadedBundle, validate_input
from randkit.deploy.smoothing import ABSTAIN
from randkit.serve.engine import Outputs
from randkit.serve.options import RequestError
from randkit.serve.tensors import array_from_bytes, checked_shape

INPUT_NAME = "input"
FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
OUTPUT_TYPES = {
    "probabilities": "FP32",
    "predicted": "INT64",
    "class": "BYTES",
    "entropy": "FP32",
    "mutual_information": "FP32",
    "radius": "FP32",
}
MAX_DIMS = 8
MAX_ID = 256  # characters of a client's request id
# Numbers only, nested to any depth: pydantic checks this in Rust, and a boolean or a string
# among the numbers is refused instead of being turned into 1.0 by numpy.
Numbers = TypeAliasType(
    "Numbers",
    "list[StrictInt | StrictFloat | Numbers]",  # type: ignore[misc]
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V2Tensor(_Strict):
    name: StrictStr
    shape: list[StrictInt] = Field(max_length=MAX_DIMS)
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: Numbers | None = None  # None: the tensor is in the binary part of the body


class V2RequestedOutput(_Strict):
    name: StrictStr
    parameters: dict[str, Any] | None = None


class V2InferRequest(_Strict):
    id: StrictStr | None = Field(default=None, max_length=MAX_ID)
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class TFPredictRequest(_Strict):
    signature_name: StrictStr | None = None
    instances: list[StrictInt | StrictFloat | Numbers | dict[str, Numbers]] | None = None
    inputs: Numbers | dict[str, Numbers] | None = None
    parameters: dict[str, Any] | None = None  # randkit's extension: the V2 parameters


class TFClassifyRequest(_Strict):
    signature_name: StrictStr | None = None
    context: dict[str, Numbers | StrictInt | StrictFloat] | None = None
    examples: list[dict[str, Numbers | StrictInt | StrictFloat]] = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class FeedbackRequest(_Strict):
    id: StrictStr = Field(min_length=1, max_length=256)
    label: StrictInt | StrictStr


class ErrorBody(BaseModel):
    error: str


def _numeric(data: Any, where: str) -> np.ndarray:
    """Validated nested lists of numbers as an array (integers beyond 64 bits as floats,
    as a JSON parser reads them)."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(400, f"{where}: not a rectangular array of numbers") from None
    if array.dtype == object:  # an integer beyond 64 bits among them
        try:
            array = np.asarray(data, dtype=np.float64)
        except OverflowError:
            raise RequestError(400, f"{where}: holds a number too large for float64") from None
        except (ValueError, TypeError):
            raise RequestError(400, f"{where}: holds values that are not numbers") from None
    if array.dtype.kind not in "iuf":
        raise RequestError(400, f"{where}: holds values that are not numbers ({array.dtype})")
    return array


def v2_input(
    request: V2InferRequest,
    bundle: LoadedBundle,
    binary: dict[int, bytes] | None = None,
    decoded: dict[int, np.ndarray] | None = None,
) -> torch.Tensor:
    """The request's one input tensor, checked against the bundle (shape, datatype, values).

    ``binary`` holds the raw bytes of inputs sent in the body's binary part, and ``decoded``
    the values of JSON inputs already turned into arrays (their ``data`` is then None), by
    position.
    """
    if len(request.inputs) != 1:
        raise RequestError(400, f"inputs: the model takes one input, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise RequestError(400, f"inputs.0.name: must be {INPUT_NAME!r}, got {tensor.name!r}")
    float_model = bundle.input_dtype == torch.float32
    allowed = tuple(FLOAT_TYPES) if float_model else INT_TYPES
    if tensor.datatype not in allowed:
        raise RequestError(
            400,
            f"inputs.0.datatype: must be one of {', '.join(allowed)} for this model, "
            f"got {tensor.datatype!r}",
        )
    checked_shape(tensor.shape, "inputs.0")
    if binary is not None and 0 in binary:
        array = array_from_bytes(tensor.datatype, tensor.shape, binary[0], "inputs.0")
        return checked_input(bundle, array, "inputs.0")
    if decoded is not None and 0 in decoded:
        array = decoded[0]
    elif tensor.data is None:
        raise RequestError(400, "inputs.0.data: field required (or binary_data_size)")
    else:
        array = _numeric(tensor.data, "inputs.0.data")
    if array.size != math.prod(tensor.shape):
        raise RequestError(
            400,
            f"inputs.0.data: holds {array.size} values but shape {tensor.shape} needs "
            f"{math.prod(tensor.shape)}",
        )
    try:
        array = array.reshape(tensor.shape)
    except ValueError:  # e.g. a 0 beside dimensions too large for numpy to size
        raise RequestError(
            400, f"inputs.0.shape: cannot hold a tensor, got {tensor.shape}"
        ) from None
    return checked_input(bundle, array, "inputs.0")


def tf_input(request: TFPredictRequest, bundle: LoadedBundle) -> torch.Tensor:
    """The inputs of a TF Serving predict request (rows or columns)."""
    if (request.instances is None) == (request.inputs is None):
        raise RequestError(400, "give exactly one of 'instances' (rows) and 'inputs' (columns)")
    if request.instances is not None:
        rows = [_unwrap(row, "instances") for row in request.instances]
        return checked_input(bundle, _numeric(rows, "instances"), "instances")
    data = _unwrap(request.inputs, "inputs")
    return checked_input(bundle, _numeric(data, "inputs"), "inputs")


def tf_examples_input(request: TFClassifyRequest, bundle: LoadedBundle) -> torch.Tensor:
    """The inputs of a TF Serving classify request: feature ``input`` of each example, or of
    the shared ``context``."""
    rows = []
    for i, example in enumerate(request.examples):
        features = {**(request.context or {}), **example}
        if set(features) != {INPUT_NAME}:
            raise RequestError(
                400,
                f"examples.{i}: the model's one feature is {INPUT_NAME!r}, got "
                f"{sorted(features)[:5]}",
            )
        rows.append(features[INPUT_NAME])
    return checked_input(bundle, _numeric(rows, "examples"), "examples")


def _unwrap(value: Any, where: str) -> Any:
    """TF Serving lets a named input be ``{"input": value}``."""
    if isinstance(value, dict):
        if set(value) != {INPUT_NAME}:
            raise RequestError(400, f"{where}: the model's one input is named {INPUT_NAME!r}")
        return value[INPUT_NAME]
    return value


def checked_input(bundle: LoadedBundle, array: np.ndarray, where: str) -> torch.Tensor:
    """``array`` as the model's input tensor, checked against the bundle (400 otherwise)."""
    if bundle.input_dtype == torch.float32 and array.dtype.kind in "iu":
        array = array.astype(np.float64)  # whole numbers are fine as float pixel values
    try:
        return validate_input(bundle, array)
    except ValueError as exc:
        raise RequestError(400, f"{where}: {exc}") from None


def output_arrays(outputs: Outputs, classes: list[str]) -> dict[str, np.ndarray]:
    """The engine's outputs plus the predicted class names ("abstain" for -1)."""
    names = np.array(
        ["abstain" if p == ABSTAIN else classes[p] for p in outputs["predicted"].tolist()],
        dtype=object,
    )
    return {**outputs, "class": names}


def tf_outputs(arrays: dict[str, np.ndarray], rows: bool) -> dict[str, Any]:
    """``{"predictions": [per instance]}`` (row format) or ``{"outputs": {...}}`` (columns)."""
    lists = {name: array.tolist() for name, array in arrays.items()}
    if not rows:
        return {"outputs": lists}
    count = len(next(iter(lists.values())))
    return {"predictions": [{name: lists[name][i] for name in lists} for i in range(count)]}


def datatype_of(bundle: LoadedBundle) -> Literal["FP32", "INT64"]:
    return "FP32" if bundle.input_dtype == torch.float32 else "INT64"
