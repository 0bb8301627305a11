"""Tensors as raw bytes: the binary tensor data of the Open Inference Protocol, shared by the
HTTP binary extension and gRPC's ``raw_input_contents`` / ``raw_output_contents``.

Fixed-size types are little-endian, row-major, with no padding. ``BYTES`` elements are each a
4-byte little-endian length followed by that many bytes (Triton's layout, which tritonclient
writes and reads). numpy does the conversions; only the BYTES framing is written by hand,
because no library frames it.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from randkit.serve.options import RequestError

NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def checked_shape(shape: list[int], where: str) -> list[int]:
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in shape):
        raise RequestError(400, f"{where}.shape: must not be negative, got {shape}")
    return shape


def array_from_bytes(datatype: str, shape: list[int], raw: bytes, where: str) -> np.ndarray:
    """The tensor that ``raw`` holds, or a 400 naming ``where`` when its size does not match.

    The array is a read-only view of ``raw`` (no copy) for the fixed-size types.
    """
    checked_shape(shape, where)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(raw, count, where).reshape(shape)
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        known = ", ".join([*NUMPY_TYPES, "BYTES"])
        raise RequestError(400, f"{where}.datatype: must be one of {known}, got {datatype!r}")
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise RequestError(
            400,
            f"{where}: binary data holds {len(raw)} bytes but shape {shape} of {datatype} "
            f"needs {expected}",
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def _bytes_elements(raw: bytes, count: int, where: str) -> np.ndarray:
    elements = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise RequestError(400, f"{where}: BYTES data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError(400, f"{where}: BYTES element {i} runs past the end of the data")
        elements[i] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise RequestError(400, f"{where}: {len(raw) - offset} bytes after the last element")
    return elements


def bytes_of(array: np.ndarray, datatype: str) -> bytes:
    """``array`` as the raw bytes of ``datatype`` (the inverse of ``array_from_bytes``)."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts += [struct.pack("<I", len(data)), data]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype]).tobytes()
