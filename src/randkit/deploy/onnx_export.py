"""``randkit export --format onnx``: the bundle plus its network as ONNX, checked by onnxruntime.

``export_onnx`` writes the usual bundle (``randkit.deploy.bundle``) and, inside it before it
is renamed into place, ``model.onnx``: the bundle's model in eval mode (randkit's stochastic
layers are the identity there), its input standardization included, so the ONNX input is
what the server's ``input`` tensor takes. Input ``input``: float32 ``(N, *shape)`` or int64
token ids ``(N, length)``; outputs ``logits`` and ``probabilities`` (softmax of the logits,
what the server's mode ``none`` returns), ``(N, num_classes)``; the batch axis is dynamic.
It uses torch's ``torch.export``-based exporter (``dynamo=True``; the TorchScript one is
deprecated), opset ``OPSET``, and ``onnx.checker``.

The file is accepted only when onnxruntime's probabilities on the run's test split (and on
one row alone, a batch of 1) are within ``TOLERANCE`` of PyTorch's; otherwise the export
fails in one line and no version is left (the bundle and the file are published together).
bundle.json records the file's SHA-256, the opset and the measured differences under
``onnx``. ``config.pbtxt`` beside it is the configuration Triton's onnxruntime backend needs
(to be moved to ``NAME/`` in a Triton model repository). An ensemble (cross-validation)
bundle is refused: one graph per fold would need a combining model a Triton user would
assemble anyway; export a training run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from randkit import atomic
from randkit.deploy.bundle import export_bundle, load_bundle
from randkit.deploy.forward import layer_modes
from randkit.deploy.onnx_model import INPUT, LOGITS, OUTPUTS, PROBABILITIES, inference_session
from randkit.errors import UserError
from randkit.extras import require

OPSET = 18  # the dynamo exporter's own opset; the task asks >= 17 (Triton 23.x and later run it)
TOLERANCE = 1e-5  # largest accepted |p_onnx - p_torch| of a class probability
ONNX_FILE = "model.onnx"
CHECK_ROWS = 1024  # rows per forward pass while checking
TRITON_FILE = "config.pbtxt"
TRITON_MAX_BATCH = 64


def export_onnx(
    run: str | Path,
    repository: str | Path,
    name: str,
    version: str | None = None,
    ensemble: bool = False,
) -> Path:
    """Export a training run as a bundle with ``model.onnx`` in it; return the bundle folder.

    >>> export_onnx("runs/digits", "repo", "digits")  # doctest: +SKIP
    PosixPath('repo/digits/1')
    """
    require("onnx", "randkit export --format onnx")
    run = Path(run)
    if ensemble or (run / "plan.json").is_file():
        raise UserError(
            "format",
            "ONNX export takes one model, a `randkit train` run; a cross-validation's fold "
            "models are exported as an ensemble bundle only (--format bundle --ensemble)",
        )
    return export_bundle(
        run, repository, name, version, finish=lambda folder: write_onnx(folder, run)
    )


def write_onnx(folder: Path, run: Path) -> dict[str, Any]:
    """Write ``folder/model.onnx`` for the bundle in ``folder`` and check it against PyTorch on
    the test split of ``run``; return bundle.json's ``onnx`` section."""
    from randkit.train.load import load_trained

    bundle = load_bundle(folder)
    model = bundle.models[0]
    split, x = _check_rows(load_trained(run, device="cpu").prepared)
    metadata = {
        "randkit.classes": json.dumps(bundle.classes),
        "randkit.input_kind": bundle.kind,
        "randkit.bundle": f"{bundle.meta['name']}/{bundle.meta['version']}",
    }
    data = to_onnx(model, x[:1].repeat(2, *([1] * (x.dim() - 1))), metadata)
    differences = check_onnx(data, model, x)
    atomic.write_bytes(folder / ONNX_FILE, data)
    atomic.write_text(folder / TRITON_FILE, triton_config(bundle.meta))
    return {
        "onnx": {
            "file": ONNX_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "opset": OPSET,
            "input": INPUT,
            "outputs": list(OUTPUTS),
            "triton_config": TRITON_FILE,
            "checked_on": split,
            "tolerance": TOLERANCE,
            **differences,
        }
    }


def triton_config(meta: dict[str, Any]) -> str:
    """Triton's ``config.pbtxt`` for the bundle's ``model.onnx`` (onnxruntime backend). Triton
    wants it in the model's folder, beside the version folders: ``NAME/config.pbtxt``."""
    dtype = "TYPE_INT64" if meta["input"]["dtype"] == "int64" else "TYPE_FP32"
    dims = ", ".join(str(d) for d in meta["input"]["shape"])
    classes = int(meta["num_classes"])
    outputs = ",\n".join(
        f'  {{ name: "{output}", data_type: TYPE_FP32, dims: [ {classes} ] }}' for output in OUTPUTS
    )
    return (
        f'name: "{meta["name"]}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {TRITON_MAX_BATCH}\n"
        f'input [\n  {{ name: "{INPUT}", data_type: {dtype}, dims: [ {dims} ] }}\n]\n'
        f"output [\n{outputs}\n]\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
    )


def _check_rows(prepared: Any) -> tuple[str, torch.Tensor]:
    """The split the check runs on: the test split, or validation/training when the run kept
    no test part (a check on some rows beats none)."""
    for split in ("test", "val", "train"):
        part = getattr(prepared, split)
        if part is not None and len(part.x) > 0:
            return split, part.x
    raise UserError("run", "the run's data has no rows to check the ONNX model on")


class _WithProbabilities(nn.Module):
    """The graph's two outputs: the model's logits and their softmax."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits.float(), dim=-1)


def to_onnx(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """``model`` (eval mode) as a checked ONNX model with a dynamic batch axis, serialized.

    ``example`` (2 or more rows, so that the batch size is not taken for a constant) traces
    the graph; ``metadata`` becomes the model's metadata_props."""
    import onnx

    wrapped = _WithProbabilities(model)
    batch = torch.export.Dim("batch", min=1)
    # The exporter narrates its steps and logs its optimizer's internals; a CLI shows neither
    # (its errors still propagate as exceptions).
    with (
        layer_modes(model, stochastic=False),
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT],
                output_names=[LOGITS, PROBABILITIES],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise UserError(
                "format", f"the model does not export to ONNX: {_reason(exc)}"
            ) from None
    assert program is not None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name = "randkit"
    onnx.checker.check_model(proto, full_check=True)
    opset = {entry.domain: entry.version for entry in proto.opset_import}.get("", 0)
    if opset < 17:
        raise UserError("format", f"the exporter wrote opset {opset}, randkit needs 17 or later")
    return bytes(proto.SerializeToString())


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause (the exporter wraps torch.export's error in a
    colored "step 1/3" banner that says less)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"


@torch.no_grad()
def check_onnx(data: bytes, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Run ``data`` in onnxruntime and ``model`` in PyTorch on ``x`` (in passes of
    ``CHECK_ROWS`` rows, then its first row alone); refuse when a probability differs by more
    than ``TOLERANCE``. Returns the largest differences of probabilities and logits."""
    session = inference_session(data)
    gaps: dict[str, list[float]] = {LOGITS: [], PROBABILITIES: []}
    with layer_modes(model, stochastic=False):
        for rows in [*x.split(CHECK_ROWS), x[:1]]:
            logits = model(rows).float()
            expected = {LOGITS: logits, PROBABILITIES: torch.softmax(logits, dim=-1)}
            got = session.run(list(OUTPUTS), {INPUT: rows.numpy()})
            for output, value in zip(OUTPUTS, got, strict=True):
                gaps[output].append((torch.from_numpy(value) - expected[output]).abs().max().item())
    worst = {output: float(np.max(values)) for output, values in gaps.items()}  # NaN stays NaN
    if not worst[PROBABILITIES] <= TOLERANCE:  # NaN included
        raise UserError(
            "onnx",
            f"onnxruntime's probabilities differ from PyTorch's by up to "
            f"{worst[PROBABILITIES]:.3g} on {len(x)} rows (tolerance {TOLERANCE:g}); "
            "nothing was exported",
        )
    return {
        "checked_rows": len(x),
        "max_abs_diff_probabilities": worst[PROBABILITIES],
        "max_abs_diff_logits": worst[LOGITS],
    }
