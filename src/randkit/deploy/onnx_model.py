"""An exported ONNX classifier run by onnxruntime, as a base classifier for randkit.

``randkit export --format onnx`` (``randkit.deploy.onnx_export``) writes ``model.onnx`` with
one input ``input`` (what the server's ``input`` tensor takes: float32 ``(N, *shape)``, or
int64 token ids; the bundle's standardization is inside the graph) and two outputs,
``logits`` and ``probabilities`` (their softmax), both ``(N, num_classes)``, the batch axis
dynamic. ``OnnxClassifier`` wraps an onnxruntime session as a ``torch.nn.Module`` that
returns the logits, so ``Smoothed`` certifies it as it certifies the PyTorch model, with the
noise added outside the network by randkit's seeded generator::

    >>> from randkit.deploy import Smoothed                               # doctest: +SKIP
    >>> smoothed = Smoothed(OnnxClassifier("repo/digits/1/model.onnx"), 10, sigma=0.25)
    >>> smoothed.certify(x, 100, 10_000, 0.001, 1000, generator)          # doctest: +SKIP

Needs the ``onnx`` extra: ``pip install 'randkit[onnx]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from randkit.errors import UserError
from randkit.extras import require

INPUT = "input"
LOGITS = "logits"
PROBABILITIES = "probabilities"
OUTPUTS = (LOGITS, PROBABILITIES)
_DTYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64}


def inference_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``model`` (a path or the serialized bytes), using as many
    threads as torch does (``threads`` to choose)."""
    require("onnx", "randkit's ONNX export and OnnxClassifier")
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's own pool would take every core beside torch's; share torch's setting instead.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's concern
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own (pybind) exception types
        where = "the model" if isinstance(model, bytes) else repr(str(model))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError("onnx", f"onnxruntime cannot load {where}: {first}") from None


class OnnxClassifier(nn.Module):
    """An ONNX classifier (``randkit export --format onnx``) as a module: ``(N, *shape)`` in,
    logits ``(N, num_classes)`` out, computed by onnxruntime on the CPU.

    It has no parameters; the input goes to the CPU and the logits come back on the input's
    device. ``input_shape`` (without the batch axis), ``input_dtype`` and ``num_classes`` are
    read from the graph. The module is deterministic: randkit's stochastic layers were
    exported in eval mode.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError("onnx", f"{str(self.path)!r} not found")
        self.session = inference_session(self.path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if INPUT not in inputs or LOGITS not in outputs:
            raise UserError(
                "onnx",
                f"{str(self.path)!r} must have an input {INPUT!r} and an output {LOGITS!r} (as "
                f"randkit export --format onnx writes), got inputs {sorted(inputs)} and "
                f"outputs {sorted(outputs)}",
            )
        spec, logits = inputs[INPUT], outputs[LOGITS]
        if spec.type not in _DTYPES:
            raise UserError("onnx", f"input {INPUT!r} has type {spec.type}, not float or int64")
        self.input_dtype = _DTYPES[spec.type]
        self.input_shape = [d if isinstance(d, int) else None for d in spec.shape[1:]]
        last = logits.shape[-1] if logits.shape else None
        self.num_classes = last if isinstance(last, int) else None

    def check_input(self, shape: list[int], dtype: torch.dtype) -> None:
        """Refuse, in one line, a model that does not take examples of ``shape`` and ``dtype``
        (e.g. certifying a run with another run's ONNX file)."""
        fits = len(shape) == len(self.input_shape) and all(
            want is None or want == got for want, got in zip(self.input_shape, shape, strict=True)
        )
        if not fits or dtype != self.input_dtype:
            raise UserError(
                "onnx",
                f"{str(self.path)!r} takes {_name(self.input_dtype)} inputs of shape "
                f"(N, {', '.join(str(d) for d in self.input_shape)}), the run's are "
                f"{_name(dtype)} of shape (N, {', '.join(map(str, shape))})",
            )

    def run(self, x: np.ndarray | torch.Tensor, outputs: tuple[str, ...] = OUTPUTS) -> list[Any]:
        """The named outputs of the graph for the batch ``x`` (NumPy arrays)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", self.input_dtype).numpy()
        return list(self.session.run(list(outputs), {INPUT: np.ascontiguousarray(x)}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.run(x, (LOGITS,))
        return torch.from_numpy(logits).to(x.device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
