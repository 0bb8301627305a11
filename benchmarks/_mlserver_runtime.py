"""An MLServer runtime serving a randkit bundle: what a user writes to put the same model
behind MLServer (``implementation: _mlserver_runtime.RandkitRuntime`` in
``model-settings.json``, the bundle folder as ``parameters.uri``).

It loads the bundle with randkit's own loader (``load_bundle``) and answers with randkit's
own ``Predictor``, so it computes the function ``randkit serve`` computes: request
``parameters`` ``mode`` (``none`` or ``mc_dropout``), ``samples`` and ``seed``; outputs
``probabilities``, ``predicted``, ``class``, ``entropy`` and ``mutual_information``. A request
with ``mc_dropout`` runs its samples in one batch (``Predictor.predict``: one stochastic pass
of samples x inputs rows). MLServer's adaptive batching, when on, concatenates requests along
the first axis; they then share one ``Sampling`` (the first request's parameters).
Imported by MLServer's own processes (run in ``.tools/mlserver``), never by randkit.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, Parameters

from randkit.deploy.bundle import load_bundle
from randkit.deploy.predictor import Predictor
from randkit.deploy.sampling import Sampling

MODES = ("none", "mc_dropout")


class RandkitRuntime(MLModel):
    """A randkit bundle (``parameters.uri``) behind MLServer, on the CPU."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise MLServerError("model-settings parameters.uri must name the bundle folder")
        self._bundle = load_bundle(uri, "cpu")
        self._predictor = Predictor.from_bundle(self._bundle)
        self._seeds = itertools.count()
        return True

    def _sampling(self, payload: InferenceRequest) -> Sampling:
        params = payload.parameters.model_dump() if payload.parameters else {}
        mode = params.get("mode", "none")
        if mode not in MODES:
            raise MLServerError(f"parameters.mode must be one of {MODES}, got {mode!r}")
        seed = params.get("seed")
        samples = int(params.get("samples", 32)) if mode == "mc_dropout" else 1
        return Sampling(mode, samples, int(seed) if seed is not None else next(self._seeds))

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise MLServerError(f"one input tensor expected, got {len(payload.inputs)}")
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        if list(x.shape[1:]) != list(self._bundle.input_shape):
            raise MLServerError(
                f"input shape {list(x.shape)}, expected [N, *{self._bundle.input_shape}]"
            )
        sampling = self._sampling(payload)
        out = self._predictor.predict(torch.from_numpy(np.ascontiguousarray(x)), sampling)
        classes = [self._bundle.classes[i] for i in out["predicted"]]
        outputs = [NumpyCodec.encode_output(name, value) for name, value in out.items()]
        outputs.append(StringCodec.encode_output("class", classes))
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=outputs,
            parameters=Parameters(mode=sampling.mode, seed=sampling.seed),
        )
