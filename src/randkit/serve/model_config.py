"""A served model as Triton's model configuration (``GET .../config`` and gRPC
``ModelConfig``): what Triton's clients and ``perf_analyzer`` read to shape their requests.

``max_batch_size`` is the server's ``--max-batch``, the rows of one forward batch. It is not
0, because the inputs carry a leading batch dimension (``-1`` in the metadata) and
``max_batch_size: 0`` tells a Triton client there is none; with it, ``dims`` leave the batch
dimension out, as Triton's do. A request may hold more inputs than that (up to the server's
row limit): it then runs alone, in chunks. ``output`` lists what a request that names no
mode gets (``radius`` only comes with mode ``smooth``).
"""

from __future__ import annotations

from typing import Any

from randkit.deploy.bundle import LoadedBundle
from randkit.deploy.sampling import MODES
from randkit.serve.options import parse_options
from randkit.serve.protocol import INPUT_NAME, OUTPUT_TYPES, datatype_of
from randkit.serve.repository import ServedModel, ServedVersion

CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
PLATFORM = "randkit_pytorch"  # as the model metadata says


def served_version(model: ServedModel, served: ServedVersion | None) -> ServedVersion:
    """The version a model-wide answer describes: the named one, else the first loaded (the
    one the model metadata describes too)."""
    return served or next(iter(model.versions.values()))


def default_outputs(bundle: LoadedBundle) -> dict[str, str]:
    """The outputs (and datatypes) of a request that names no mode. Triton's clients, such
    as perf_analyzer, ask for every output that the metadata lists, and ``radius`` only
    exists in mode ``smooth``."""
    mode = parse_options(None, bundle, lambda: 0).mode
    return {k: v for k, v in OUTPUT_TYPES.items() if k != "radius" or mode == "smooth"}


def model_config(
    model: ServedModel, served: ServedVersion | None, max_batch: int, max_delay_ms: float
) -> dict[str, Any]:
    """Triton's JSON model configuration of ``model`` (its version ``served``, if named)."""
    bundle = served_version(model, served).bundle
    kind = "KIND_GPU" if bundle.device.type == "cuda" else "KIND_CPU"
    outputs = []
    for name, datatype in default_outputs(bundle).items():
        output: dict[str, Any] = {"name": name, "data_type": CONFIG_TYPES[datatype]}
        if name == "probabilities":
            output["dims"] = [len(bundle.classes)]
        else:  # one value per input: Triton writes that as dims [1] reshaped to []
            output.update(dims=[1], reshape={"shape": []})
        outputs.append(output)
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "randkit",
        "version_policy": {"all": {}},  # every version folder of the repository is served
        "max_batch_size": max_batch,
        "input": [
            {
                "name": INPUT_NAME,
                "data_type": CONFIG_TYPES[datatype_of(bundle)],
                "format": "FORMAT_NONE",
                "dims": list(bundle.input_shape),
            }
        ],
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": round(max_delay_ms * 1000)},
        "instance_group": [{"name": model.name, "kind": kind, "count": 1}],
        "parameters": {
            "classes": {"string_value": ",".join(bundle.classes)},
            "modes": {"string_value": ",".join(MODES)},
        },
    }
