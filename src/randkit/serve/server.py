"""The server's state and the inference path shared by both protocols."""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from randkit.deploy.bundle import LoadedBundle
from randkit.serve.engine import Job
from randkit.serve.ids import uuid7
from randkit.serve.ledger import FeedbackLedger, LedgerError, Prediction, policy_fingerprint
from randkit.serve.ledger_db import ledger_location
from randkit.serve.metrics import ServerMetrics
from randkit.serve.options import MAX_ROWS, Options, RequestError, parse_options, shown
from randkit.serve.protocol import output_arrays
from randkit.serve.repository import BatchSettings, Repository, ServedModel, ServedVersion
from randkit.serve.stats import RequestTimes, StatsCollector
from randkit.streams import Streams

if TYPE_CHECKING:
    from randkit.serve.workers import WorkerSlot

GRPC_GRACE_S = 30  # as uvicorn's graceful shutdown
MAX_ELEMENTS = 1 << 26  # input values times samples per request (256 MB of float32)
# The arrival token of the request being handled: [True] until it reaches a batcher.
_ARRIVAL: ContextVar[list[bool] | None] = ContextVar("randkit_arrival", default=None)


@dataclass(frozen=True)
class ServerSettings:
    repository: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_batch: int = 64
    max_delay_ms: float = 2.0
    max_body_mb: float = 16.0
    body_timeout_s: float = 30.0
    grpc_port: int | None = None  # None: no gRPC server
    seed: int = 0
    device: str = "cpu"
    ledger: str | None = None  # a SQLite file or postgresql:// URL; None: REPO/.randkit/...
    ledger_retention_days: float = 30.0  # predictions older than this are deleted
    threads: int | None = None  # torch intra-op threads for inference; None: as is
    workers: int = 1  # server processes sharing the port (workers.py)


@dataclass
class Answer:
    """One inference: the version that answered, whether the policy chose it, the options
    used (with the seed), the request id and the output arrays."""

    model: ServedModel
    served: ServedVersion
    routed: bool
    options: Options
    request_id: str
    arrays: dict[str, np.ndarray]

    def parameters(self) -> dict[str, Any]:
        labels = self.model.labels_of(self.served.version)
        out = {**self.options.as_parameters(), "routed": self.routed}
        if labels:
            out["labels"] = ",".join(labels)
        return out


class Server:
    def __init__(self, settings: ServerSettings, slot: WorkerSlot | None = None) -> None:
        self.settings, self.slot = settings, slot
        self.metrics = ServerMetrics(slot.metrics_dir if slot else None)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="randkit-forward")
        self.repository = Repository(
            settings.repository,
            self.executor,
            device=settings.device,
            seed=settings.seed,
            batching=BatchSettings(
                settings.max_batch,
                settings.max_delay_ms / 1000,
                self._on_batch,
                lambda: self.arriving > 0,
            ),
            open_epoch=self._open_epoch,
        )
        self.arriving = 0  # inference requests accepted that have not reached a batcher
        self.streams = Streams(settings.seed)
        self.ledger = FeedbackLedger(
            ledger_location(settings.ledger, settings.repository), settings.ledger_retention_days
        )
        self.stats = StatsCollector(slot)
        self.grpc: Any = None  # the gRPC server's thread, when settings.grpc_port is set
        self.grpc_port: int | None = None  # the port it bound
        self.ready = False
        self._sharing: asyncio.Task[None] | None = None  # with --workers: stats for siblings
        # Request numbers (they drive seeds and traffic draws) interleaved between workers.
        self._requests = itertools.count(slot.index, slot.count) if slot else itertools.count()

    async def start(self) -> None:
        await self.repository.load_all()
        settle_memory()
        if self.settings.grpc_port is not None:  # its calls run here: one set of batchers
            from randkit.serve.grpc_thread import GrpcThread

            self.grpc = GrpcThread(self)
            self.grpc_port = await self.grpc.start(self.settings.host, self.settings.grpc_port)
        if self.slot is not None:
            self._sharing = asyncio.create_task(self.stats.share_forever())
        self.ready = True

    async def load_model(self, name: str) -> ServedModel:
        """``repository/models/NAME/load`` (HTTP and gRPC)."""
        self._one_process("load")
        return await self.repository.load(name)

    async def unload_model(self, name: str) -> None:
        self._one_process("unload")
        await self.repository.unload(name)

    def _one_process(self, action: str) -> None:
        """Loading or unloading in one worker would leave its siblings serving other models."""
        if self.slot is not None:
            raise RequestError(
                409,
                f"repository: {action} needs a server of one process (this one runs "
                f"--workers {self.slot.count}); restart it to load new versions",
            )

    @contextmanager
    def arrival(self) -> Iterator[None]:
        """Count an inference request as on its way to a batcher until it gets there (or
        fails first), so that batches wait for it and only for it."""
        token = [True]
        self.arriving += 1
        reset = _ARRIVAL.set(token)
        try:
            yield
        finally:
            _ARRIVAL.reset(reset)
            self._arrived(token)

    def _arrived(self, token: list[bool] | None) -> None:
        if token and token[0]:
            token[0] = False
            self.arriving -= 1

    async def stop(self) -> None:
        self.ready = False
        if self.grpc is not None:
            await self.grpc.stop(GRPC_GRACE_S)  # lets the calls in flight finish
        if self._sharing is not None:
            self._sharing.cancel()
            self.stats.share()
        await self.repository.close()
        self.executor.shutdown(wait=True)
        await asyncio.to_thread(self.ledger.close)

    async def _open_epoch(self, model: ServedModel) -> int:
        """The policy epoch a (re)loaded model counts its experiment in."""
        try:
            return await self.ledger.open_epoch_async(model.name, policy_fingerprint(model))
        except LedgerError as exc:
            raise RequestError(exc.status, str(exc)) from None

    async def infer(
        self,
        name: str,
        version: str | None,
        key: str | None,
        parameters: dict[str, Any] | None,
        read_input: Any,
        request_id: str | None = None,
    ) -> Answer:
        """Route (or take the named version), validate, batch, run, and remember the answer
        for feedback. ``read_input(bundle)`` turns the request body into a tensor."""
        times = RequestTimes()
        try:
            answer = await self._infer(
                name, version, key, parameters, read_input, request_id, times
            )
        except Exception:
            self.stats.failure(name, times)
            raise
        self.stats.success(name, answer.served.version, len(answer.arrays["predicted"]), times)
        return answer

    async def _infer(
        self,
        name: str,
        version: str | None,
        key: str | None,
        parameters: dict[str, Any] | None,
        read_input: Any,
        request_id: str | None,
        times: RequestTimes,
    ) -> Answer:
        model = self.repository.model(name)
        number = next(self._requests)
        if version is not None:
            served, routed = self.repository.version(model, version), False
        else:
            chosen = model.router.route(number, key, list(model.versions))
            if chosen is None:
                raise RequestError(404, f"model {shown(name)} has no version to route to")
            served, routed = model.versions[chosen], True
        times.version = served.version
        bundle: LoadedBundle = served.bundle
        x: torch.Tensor = read_input(bundle)
        options = parse_options(
            parameters, bundle, lambda: self.streams.seed("deploy", request=number)
        )
        rows = options.forward_rows(len(x), len(bundle.models))
        if rows > MAX_ROWS or rows * math.prod(bundle.input_shape) > MAX_ELEMENTS:
            raise RequestError(
                400,
                f"parameters.samples: {len(x)} inputs x {options.forward_rows(1, 1)} samples "
                f"is {rows} rows, more than this server takes in one request",
            )
        self._arrived(_ARRIVAL.get())
        times.submitted_ns = time.perf_counter_ns()
        outputs = await served.batcher.submit(Job(x, options))
        times.answered_ns = time.perf_counter_ns()
        chosen_id = request_id is not None
        # A UUIDv7, not the request number: numbers restart with the server and repeat
        # across replicas, and feedback for an old id would attach to a new prediction.
        request_id = request_id or uuid7()
        predicted = outputs["predicted"].tolist()
        ids = (
            [request_id]
            if len(predicted) == 1
            else [f"{request_id}/{i}" for i in range(len(predicted))]
        )
        predictions = [
            Prediction(name, i, served.version, int(p), routed, model.epoch)
            for i, p in zip(ids, predicted, strict=True)
        ]
        if not chosen_id:  # ids made here cannot collide: the answer need not wait for it
            self.ledger.record_predictions_behind(predictions)
        else:
            try:  # committed before the client sees the id: a reused id is a 409
                await self.ledger.record_predictions_async(predictions)
            except LedgerError as exc:
                raise RequestError(exc.status, str(exc)) from None
        arrays = output_arrays(outputs, bundle.classes)
        return Answer(model, served, routed, options, request_id, arrays)

    def _on_batch(self, model: str, version: str, rows: int, queued: list[float]) -> None:
        self.metrics.on_batch(model, version, rows, queued)
        self.stats.batch(model, version, queued)

    def observe(self, model: str, version: str, protocol: str, status: int, start: float) -> None:
        self.metrics.answered(model, version, protocol, status, time.perf_counter() - start)


def settle_memory() -> None:
    """Move what loading made (models, modules, caches) out of the garbage collector's view:
    a full collection then walks only what requests create, which keeps its pauses, paid by
    every request in flight, short."""
    gc.collect()
    gc.freeze()
