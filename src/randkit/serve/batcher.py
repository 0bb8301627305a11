"""Dynamic batching: requests wait up to ``max_delay`` for others, up to ``max_rows`` rows
(Monte-Carlo samples count as rows), then run in one forward pass in the worker thread.

A batch waits only while another request is on its way (``others_coming``: the server has
accepted a request that has not reached a batcher yet), and for a few turns of the event loop
(requests the loop has read but not yet handed to a handler, as gRPC's calls are). A request
alone runs at once, so the batching window costs a lone client nothing.

A long forward pass runs in the server's one worker thread (PyTorch already uses all cores
inside an operation, so a second concurrent forward would only fight it for them); while it
runs, the next batch gathers. A short one runs on the event loop itself: handing it to the
thread and back costs more than it saves, because the two threads take turns on Python's
interpreter lock at every PyTorch call (measured on the digits CNN: 18-25% more requests per
second inline). "Short" is what the batcher has measured: a batch whose rows, at the recent
seconds per row, should take under ``INLINE_MAX_S`` runs inline, so the event loop never
stalls longer than about that for it; the first batch, and any slower one, goes to the thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from randkit.serve.engine import Engine, Job, Outputs

BatchHook = Callable[[int, list[float]], None]  # (rows in the batch, queue seconds per job)
INLINE_MAX_S = 0.02  # a batch expected to take less runs on the event loop (module docstring)
SETTLE_TURNS = 3  # event-loop turns a batch waits for requests already read (_quiet)
LEARNING_RATE = 0.3  # weight of the newest batch in the seconds-per-row estimate


@dataclass
class _Pending:
    job: Job
    rows: int
    future: asyncio.Future[Outputs]
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """``await batcher.submit(job)`` from any request handler of the event loop."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        max_rows: int,
        max_delay_s: float,
        on_batch: BatchHook | None = None,
        others_coming: Callable[[], bool] | None = None,
    ) -> None:
        self.engine, self.executor = engine, executor
        self.max_rows, self.max_delay_s = max(1, max_rows), max(0.0, max_delay_s)
        self.on_batch = on_batch
        self.others_coming = others_coming or (lambda: True)  # unknown: always wait
        # A deque and one wake-up future rather than an asyncio.Queue read with wait_for:
        # that made a task and a timer per request.
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._held: _Pending | None = None  # took it, but it did not fit the last batch
        self._busy = False  # a batch is running
        self._seconds_per_row: float | None = None  # measured, a moving average

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._task is None:
            return
        while self._queue or self._held is not None or self._busy:
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def submit(self, job: Job) -> Outputs:
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(job, self.engine.rows(job), future))
        self._wake()
        return await future

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _arrival(self, timeout: float | None) -> bool:
        """Whether a job is queued, waiting for one up to ``timeout`` seconds (None: for
        ever)."""
        if self._queue:
            return True
        if timeout is not None and timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._wake)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()
        return bool(self._queue)

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._held is not None:
            held, self._held = self._held, None
            return held
        while not await self._arrival(timeout):
            if timeout is not None:
                return None
        return self._queue.popleft()

    async def _gather(self) -> list[_Pending]:
        first = await self._next(None)
        assert first is not None
        batch, rows = [first], first.rows
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_rows:
            if self._held is None and not self._queue and not self.others_coming():
                if await self._quiet():
                    break  # nothing queued and nothing on its way: waiting only adds latency
                continue
            pending = await self._next(deadline - time.perf_counter())
            if pending is None:
                break
            if rows + pending.rows > self.max_rows:
                self._held = pending
                break
            batch.append(pending)
            rows += pending.rows
        return batch

    async def _quiet(self) -> bool:
        """Whether nothing arrives within a few turns of the event loop. Requests already
        read by the server but not yet handed to a handler (gRPC's calls wait in its core
        until the loop runs their handler) reach the queue within them."""
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
            if self._queue or self.others_coming():
                return False
        return True

    def _short(self, rows: int) -> bool:
        """Whether a batch of ``rows`` should take under ``INLINE_MAX_S`` (run it inline)."""
        per_row = self._seconds_per_row
        return per_row is not None and per_row * rows < INLINE_MAX_S

    def _learn(self, rows: int, seconds: float) -> None:
        per_row = seconds / max(1, rows)
        old = self._seconds_per_row
        self._seconds_per_row = per_row if old is None else old + LEARNING_RATE * (per_row - old)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [p for p in batch if not p.future.done()]  # a client may have gone away
            if not live:
                continue
            started = time.perf_counter()
            if self.on_batch is not None:
                self.on_batch(sum(p.rows for p in live), [started - p.queued_at for p in live])
            self._busy = True
            rows, jobs = sum(p.rows for p in live), [p.job for p in live]
            try:
                if self._short(rows):
                    results = self.engine.run(jobs)
                else:
                    results = await loop.run_in_executor(self.executor, self.engine.run, jobs)
            except Exception as exc:  # the batch failed as a whole: every request hears why
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            self._learn(rows, time.perf_counter() - started)
            for p, result in zip(live, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, Exception):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
