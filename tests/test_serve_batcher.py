"""The batcher's choice between the event loop and the worker thread: a batch expected to be
short runs inline, the first one and slow ones in the thread, and every request gets its own
result either way."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from randkit.serve import batcher as batching
from randkit.serve.batcher import Batcher


@dataclass
class FakeJob:
    value: int
    rows: int = 1


class FakeEngine:
    """Doubles each job's value after ``seconds``; records the thread of each batch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.threads: list[str] = []

    def rows(self, job: FakeJob) -> int:
        return job.rows

    def run(self, jobs: list[FakeJob]) -> list[Any]:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return [{"value": 2 * job.value} for job in jobs]


async def _batches(engine: FakeEngine, rounds: int) -> list[list[int]]:
    with ThreadPoolExecutor(1, thread_name_prefix="forward") as executor:
        batcher = Batcher(engine, executor, 64, 0.001)  # type: ignore[arg-type]
        batcher.start()
        answers = []
        for r in range(rounds):
            jobs = [FakeJob(10 * r + i) for i in range(4)]
            results = await asyncio.gather(*(batcher.submit(j) for j in jobs))  # type: ignore[arg-type]
            answers.append([result["value"] for result in results])
        await batcher.stop()
    return answers


def test_short_batches_run_on_the_event_loop_after_the_first() -> None:
    engine = FakeEngine(0.0005)
    answers = asyncio.run(_batches(engine, 5))
    assert answers == [[2 * (10 * r + i) for i in range(4)] for r in range(5)]
    assert engine.threads[0].startswith("forward")  # nothing measured yet: the thread
    assert engine.threads[-1] == threading.main_thread().name  # measured short: inline


def test_slow_batches_stay_in_the_worker_thread() -> None:
    engine = FakeEngine(batching.INLINE_MAX_S * 1.5)
    answers = asyncio.run(_batches(engine, 3))
    assert answers == [[2 * (10 * r + i) for i in range(4)] for r in range(3)]
    assert all(name.startswith("forward") for name in engine.threads)


def test_a_batch_slower_than_measured_sends_the_next_to_the_thread() -> None:
    engine = FakeEngine(0.0005)
    with ThreadPoolExecutor(1, thread_name_prefix="forward") as executor:
        batcher = Batcher(engine, executor, 64, 0.001)  # type: ignore[arg-type]

        async def scenario() -> None:
            batcher.start()
            for _ in range(3):
                await batcher.submit(FakeJob(1))  # type: ignore[arg-type]
            assert engine.threads[-1] == threading.main_thread().name
            engine.seconds = batching.INLINE_MAX_S * 10  # the model got slow (a big batch)
            await batcher.submit(FakeJob(1))  # type: ignore[arg-type]
            await batcher.submit(FakeJob(1))  # type: ignore[arg-type]
            await batcher.stop()

        asyncio.run(scenario())
    assert engine.threads[-2] == threading.main_thread().name  # it was expected short
    assert engine.threads[-1].startswith("forward")  # the estimate learned


def test_requests_a_turn_of_the_loop_behind_join_the_batch() -> None:
    """Calls the server has read but not yet handed to a handler (gRPC's) reach the queue a
    turn or two later; the batch waits those few turns, not the batching window."""
    engine = FakeEngine(0.0)
    sizes: list[int] = []
    engine_run = engine.run

    def run(jobs: list[FakeJob]) -> list[Any]:
        sizes.append(len(jobs))
        return engine_run(jobs)

    engine.run = run  # type: ignore[method-assign]

    async def scenario() -> float:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(engine, executor, 64, 10.0, others_coming=lambda: False)  # type: ignore[arg-type]
            batcher.start()

            async def late(value: int, turns: int) -> int:
                for _ in range(turns):
                    await asyncio.sleep(0)
                return (await batcher.submit(FakeJob(value)))["value"]  # type: ignore[arg-type]

            started = time.perf_counter()
            values = await asyncio.gather(late(1, 0), late(2, 1), late(3, 2))
            elapsed = time.perf_counter() - started
            await batcher.stop()
        assert values == [2, 4, 6]
        return elapsed

    elapsed = asyncio.run(scenario())
    assert sizes == [3]  # one batch
    assert elapsed < 5.0  # not the 10 s window: nothing else was on its way
