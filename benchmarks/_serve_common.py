"""What the serving benchmarks share: starting ``randkit serve``, KServe V2 JSON request
bodies, and the asyncio HTTP load generator that drives every server alike.

The load generator keeps ``concurrency`` requests in flight over keep-alive connections. Its
``raw`` client writes pre-built request bytes on asyncio streams and parses only the status
line, the headers and the JSON body, so that it takes as little CPU as possible from the
server it shares the machine with; ``httpx`` is what a Python user would write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NAME = "bench"
Checker = Callable[[int, bytes], "str | None"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(port: int, path: str = "/v2/health/ready") -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Server:
    label: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    grpc_port: int | None = None


def wait_ready(process: subprocess.Popen[bytes], port: int, label: str, log: Path) -> None:
    """Poll the V2 readiness route until it answers 200 (at most 120 s)."""
    deadline = time.monotonic() + 120
    while not ready(port):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server {label!r} did not become ready:\n{tail}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # uvicorn's graceful shutdown
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serving(
    repo: Path,
    label: str,
    max_batch: int,
    max_delay_ms: float,
    log: Path,
    grpc: bool = False,
    workers: int = 1,
) -> Iterator[Server]:
    """``python -m randkit serve`` on 127.0.0.1:free port (and a gRPC port when ``grpc``),
    ``--workers`` processes, until the block ends."""
    port = free_port()
    grpc_port = free_port() if grpc else None
    command = [sys.executable, "-m", "randkit", "serve", str(repo), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--quiet", "--max-batch", str(max_batch)]
    command += ["--max-delay-ms", str(max_delay_ms)]
    if workers > 1:
        command += ["--workers", str(workers)]
    if grpc_port is not None:
        command += ["--grpc-port", str(grpc_port)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_ready(process, port, label, log)
        yield Server(label, port, process, log, grpc_port)
    finally:
        stop(process)


def v2_body(x: np.ndarray, parameters: dict[str, Any]) -> bytes:
    """One V2 infer request of the inputs ``x`` (``(N, *shape)``), as a client's json.dumps
    writes it."""
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.reshape(-1).tolist(),
            }
        ],
        "parameters": parameters,
    }
    return json.dumps(body).encode()


def request_bodies(inputs: np.ndarray, samples: int) -> list[bytes]:
    """One MC-dropout request body per input (one image each)."""
    return [v2_body(x[None], {"mode": "mc_dropout", "samples": samples}) for x in inputs]


def v2_checker(mode: str, rows: int) -> Checker:
    """A check of a V2 JSON answer: 200, ``rows`` rows of probabilities, the ``mode`` echoed.
    It returns None for a good answer, else why not."""

    def check(status: int, payload: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}: {payload[:200]!r}"
        try:
            answer = json.loads(payload)
            outputs = {o["name"]: o for o in answer["outputs"]}
            probabilities = outputs["probabilities"]
            if probabilities["shape"][0] != rows or len(probabilities["data"]) < 2 * rows:
                return f"probabilities of shape {probabilities['shape']}, not {rows} rows"
            if answer["parameters"]["mode"] != mode:
                return f"answered in mode {answer['parameters']['mode']!r}"
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return f"bad response body ({exc!r}): {payload[:200]!r}"
        return None

    return check


@dataclass
class Load:
    """What one load phase measured."""

    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else math.nan

    def record(self, problem: str | None, latency: float) -> None:
        if problem is None:
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.errors.append(problem)


class RawConnection:
    """HTTP/1.1 keep-alive over asyncio streams: pre-built request bytes in, (status, body)
    out. Enough for uvicorn's answers (Content-Length bodies)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = None, False
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "connection" and value.strip().lower() == "close":
                close = True
        if length is None:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# A sender answers (status, payload) for request number i, or raises an OSError-like error.
Sender = Callable[[int], Awaitable[tuple[int, bytes]]]
FAILURES: tuple[type[BaseException], ...] = (OSError, RuntimeError, asyncio.IncompleteReadError)


async def drive(
    senders: Sequence[Sender],
    check: Checker,
    requests: int,
    max_seconds: float,
    failures: tuple[type[BaseException], ...] = FAILURES,
) -> Load:
    """One worker per sender (the concurrency), each sending its next request as soon as its
    previous one was answered, until ``requests`` were sent or ``max_seconds`` passed."""
    load = Load()
    counter = iter(range(requests))
    started = time.perf_counter()
    deadline, finished = started + max_seconds, started

    async def worker(send: Sender) -> None:
        nonlocal finished
        for index in counter:
            if time.perf_counter() > deadline:
                break
            load.sent += 1
            sent = time.perf_counter()
            try:
                problem = check(*await send(index))
            except failures as exc:
                problem = f"{type(exc).__name__}: {exc}"
            load.record(problem, time.perf_counter() - sent)
            finished = time.perf_counter()

    await asyncio.gather(*(worker(send) for send in senders))
    load.seconds = finished - started
    return load


async def _raw_load(
    port: int, bodies: Sequence[bytes], args: tuple[int, int, float], check: Checker, path: str
) -> Load:
    requests, concurrency, max_seconds = args
    prebuilt = [
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    connections = [RawConnection(port) for _ in range(concurrency)]

    def sender(connection: RawConnection) -> Sender:
        async def send(index: int) -> tuple[int, bytes]:
            try:
                return await connection.request(prebuilt[index % len(prebuilt)])
            except FAILURES:
                await connection.close()
                raise

        return send

    try:
        return await drive([sender(c) for c in connections], check, requests, max_seconds)
    finally:
        for connection in connections:
            await connection.close()


async def _httpx_load(
    port: int, bodies: Sequence[bytes], args: tuple[int, int, float], check: Checker, path: str
) -> Load:
    import httpx

    requests, concurrency, max_seconds = args
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120, trust_env=False
    ) as http:

        async def send(index: int) -> tuple[int, bytes]:
            response = await http.post(path, content=bodies[index % len(bodies)], headers=headers)
            return response.status_code, response.content

        return await drive([send] * concurrency, check, requests, max_seconds, (httpx.HTTPError,))


def generate(
    port: int,
    bodies: Sequence[bytes],
    requests: int,
    concurrency: int,
    max_seconds: float,
    client: str = "raw",
    check: Checker | None = None,
    model: str = NAME,
) -> Load:
    """One load phase of V2 JSON requests on ``/v2/models/MODEL/infer`` (by default MC-dropout
    answers of one row are checked)."""
    path = f"/v2/models/{model}/infer"
    check = check or v2_checker("mc_dropout", 1)
    run = _raw_load if client == "raw" else _httpx_load
    return asyncio.run(run(port, bodies, (requests, concurrency, max_seconds), check, path))
