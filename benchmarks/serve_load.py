"""Monte-Carlo inference over HTTP: ``randkit serve`` under load against in-process batches.

A model bundle is built in a temporary folder without downloading anything: a real
``randkit train`` run (``train_run``, 1 epoch: the weights do not matter for throughput)
exported with ``export_bundle``, as ``randkit export`` does. ``--model``:

- ``resnet`` (the default): randkit's ResNet-20 (width 16, BatchNorm, stochastic depth 0.1 on
  every residual branch, which is what mode ``mc_dropout`` samples) on 3x32x32 images, a
  CIFAR-sized model, trained on a generated ``.npz`` of 640 images of 10 classes (class-tinted
  noise). Its forward pass costs about 41 MFLOPs per row, so one request of 32 samples is
  about 1.3 GFLOPs, tens of milliseconds on a laptop core: the compute a real image model
  puts behind each request, against which the server's per-request cost (HTTP, JSON, pydantic)
  is weighed. This is the figure the target is about.
- ``cnn``: the digits CNN of ``examples/digits.yaml`` (conv 32, conv 64, Linear 128, dropout
  0.3) on scikit-learn's 1x8x8 digits. A request of 32 samples is about 0.1 ms of compute,
  far less than any HTTP stack's per-request cost, so this one measures the server's overhead
  rather than its inference; the ratio it gives is not the target's.

Both sides do the same work, Monte-Carlo inference with ``--samples`` (32) samples per input,
one input per request, in this one process run. The forward size, ``--max-batch`` rows, is by
default calibrated first: the in-process ``Engine.run`` is timed at 32, 64, 128, ... rows per
forward pass (whole requests) and the fastest size is used by both sides. It matters on a CPU:
for the ResNet, 128 rows run about 2x as fast per row as 512 or 1024 rows (bigger activations
are allocated and paged in afresh on every pass), so a fixed "large" batch would handicap both.

- in-process (what a user gets without a server, best of two ways): the server's own
  ``Engine.run`` on many jobs at once, each forward pass ``--max-batch`` rows (``max-batch /
  samples`` inputs; the same forward size as the batched server), and ``MonteCarlo(model,
  "dropout").predict`` on ``max-batch`` inputs per call (32 forward passes of that many rows);
  the bundle loaded with ``load_bundle``, on the CPU, in this process's main thread with
  torch's default threads.
- server: ``python -m randkit serve REPO --port P --quiet`` in a subprocess on 127.0.0.1,
  twice: batching on (``--max-batch`` rows, ``--max-delay-ms``) and batching off
  (``--max-batch 1``: every request runs alone, its 32 samples in one forward pass). An
  asyncio load generator in this process keeps ``--concurrency`` (32) requests in flight over
  keep-alive connections, each a KServe V2 infer request with parameters ``{"mode":
  "mc_dropout", "samples": 32}`` (the server draws a fresh seed per request), pre-serialized
  JSON of one float32 image; a phase ends after ``--requests`` requests or ``--max-seconds``,
  whichever comes first, after a warm-up of ``2 x concurrency`` requests. ``--client raw``
  (the default) writes the pre-built request bytes on asyncio streams and parses only the
  status line, the headers and the JSON body, so that the load generator, which shares the
  machine's cores with the server, takes as little CPU as possible; ``--client httpx`` uses
  ``httpx.AsyncClient`` (what a Python user would write; it costs the client more CPU, which
  on a 2-core machine is taken from the server).

Throughput is inputs (= requests) per second of wall time, best of ``--repeats`` (the phases
take turns, so that load from other processes hits all of them); latencies p50 and p99 are
those of the best batched phase. ``ratio`` = server with batching on / in-process (target at
least 0.7); ``batching_gain`` = batching on / batching off. Every response must be a 200 with
the outputs; ``errors`` counts the others (the run exits 1 if there are any). The last line
printed is a JSON record.

    python benchmarks/serve_load.py [--model resnet|cnn] [--requests 2000] [--max-seconds 10]
                                    [--concurrency 32] [--samples 32] [--max-batch ROWS]
                                    [--max-delay-ms 2] [--repeats 3] [--client raw|httpx]
                                    [--epochs 1] [--calibrate-limit 4096] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from randkit.config import validate_config
from randkit.deploy.bundle import export_bundle, load_bundle
from randkit.deploy.mc import MonteCarlo
from randkit.serve.engine import Engine, Job
from randkit.serve.options import Options
from randkit.train import train_run

TARGET_RATIO = 0.7
NAME = "bench"
SEED = 0
RESNET_IMAGES = 640
REQUEST_INPUTS = 64  # distinct request bodies, cycled through
MAX_CALIBRATION_CALL_S = 0.25

MODELS: dict[str, dict[str, Any]] = {
    "resnet": {
        "name": "resnet",
        "args": {"depth": 20, "width": 16, "norm": "batch", "drop_path": 0.1},
    },
    "cnn": {"name": "cnn", "args": {"widths": [32, 64], "hidden": 128, "dropout": 0.3}},
}
MODEL_LABELS = {
    "resnet": "ResNet-20 (w16, stochastic depth 0.1), 3x32x32",
    "cnn": "digits CNN (32, 64, 128, dropout 0.3), 1x8x8",
}


# ------------------------------------------------------------------------------- the bundle


def write_images(path: Path, count: int) -> np.ndarray:
    """``count`` 3x32x32 images in [0, 1] of 10 classes (a tint per class plus noise)."""
    rng = np.random.default_rng(SEED)
    labels = np.arange(count) % 10
    tints = rng.uniform(0.2, 0.8, size=(10, 3, 1, 1))
    noise = rng.uniform(-0.2, 0.2, size=(count, 3, 32, 32))
    x = np.clip(tints[labels] + noise, 0.0, 1.0)
    x = (np.round(x * 255) / 255).astype(np.float32)  # 8-bit pixels, as images come
    np.savez(path, x=x, y=labels)
    return x


def build_bundle(folder: Path, model: str, epochs: int) -> tuple[Path, np.ndarray]:
    """(repository, request inputs): a trained run of ``model`` exported as NAME/1."""
    if model == "resnet":
        x = write_images(folder / "images.npz", RESNET_IMAGES)
        data: dict[str, Any] = {"kind": "npz", "path": str(folder / "images.npz")}
    else:
        from sklearn.datasets import load_digits

        x = (load_digits().images[:, None] / 16.0).astype(np.float32)
        data = {"kind": "digits"}
    raw = {
        "seed": SEED,
        "data": {**data, "test_fraction": 0.2},
        "model": MODELS[model],
        "train": {"epochs": epochs, "batch_size": 64, "lr": 1e-3, "device": "cpu"},
    }
    started = time.perf_counter()
    result = train_run(validate_config(raw), folder / "run", quiet=True)
    repo = folder / "repo"
    bundle = export_bundle(folder / "run", repo, NAME)
    print(
        f"trained {MODEL_LABELS[model]} for {epochs} epoch(s) in "
        f"{time.perf_counter() - started:.1f} s (test accuracy "
        f"{result.metrics['test']['accuracy']:.3f}), exported {bundle.relative_to(folder)}"
    )
    return repo, x[:REQUEST_INPUTS]


# ------------------------------------------------------------------------------ in-process


def _jobs(inputs: torch.Tensor, samples: int, first: int, count: int) -> list[Job]:
    return [
        Job(inputs[i % len(inputs)][None], Options("mc_dropout", samples, i))
        for i in range(first, first + count)
    ]


def inprocess_engine(
    engine: Engine, inputs: torch.Tensor, samples: int, count: int, per_call: int, seconds: float
) -> float:
    """Inputs per second of ``Engine.run`` on ``per_call`` one-input jobs per call."""
    done, started = 0, time.perf_counter()
    while done < count and time.perf_counter() - started < seconds:
        size = min(per_call, count - done)
        outputs = engine.run(_jobs(inputs, samples, done, size))
        assert len(outputs) == size and outputs[0]["probabilities"].shape[0] == 1
        done += size
    return done / (time.perf_counter() - started)


def inprocess_montecarlo(
    mc: MonteCarlo, inputs: torch.Tensor, count: int, per_call: int, seconds: float
) -> float:
    """Inputs per second of ``MonteCarlo.predict`` on ``per_call`` inputs per call."""
    repeat = math.ceil(per_call / len(inputs))
    pool = inputs.repeat(repeat, *([1] * (inputs.dim() - 1)))
    done, calls, started = 0, 0, time.perf_counter()
    while done < count and time.perf_counter() - started < seconds:
        size = min(per_call, count - done)
        result = mc.predict(pool[:size], seed=calls)
        assert result.probs.shape[0] == size
        done, calls = done + size, calls + 1
    return done / (time.perf_counter() - started)


def calibrate(bundle: Any, inputs: torch.Tensor, samples: int, limit: int) -> dict[int, float]:
    """Inputs per second of ``Engine.run`` by rows per forward pass (whole requests, doubling
    from one request's samples up to ``limit``, the fastest of at least 3 calls each; stops
    after a size whose forward pass takes more than ``MAX_CALIBRATION_CALL_S``): the forward
    size at which this model runs fastest on this machine."""
    rates: dict[int, float] = {}
    rows = samples
    while rows <= limit:
        engine = Engine(bundle, max_rows=rows)
        per_call = rows // samples
        jobs = _jobs(inputs, samples, 0, per_call)
        engine.run(jobs)  # warm-up: allocator, kernels
        fastest, calls, started = math.inf, 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < 0.5:
            begun = time.perf_counter()
            engine.run(jobs)
            fastest, calls = min(fastest, time.perf_counter() - begun), calls + 1
        rates[rows] = per_call / fastest
        if fastest > MAX_CALIBRATION_CALL_S:
            break  # forward passes this long gain nothing more from size
        rows *= 2
    return rates


# ---------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    label: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def _ready(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    try:
        with opener.open(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def serving(
    repo: Path, label: str, max_batch: int, max_delay_ms: float, log: Path
) -> Iterator[Server]:
    """``python -m randkit serve`` on 127.0.0.1:free port until the block ends."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "randkit",
        "serve",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--quiet",
        "--max-batch",
        str(max_batch),
        "--max-delay-ms",
        str(max_delay_ms),
    ]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"server {label!r} did not become ready:\n{tail}")
            time.sleep(0.1)
        yield Server(label, port, process, log)
    finally:
        process.terminate()  # uvicorn's graceful shutdown
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request_bodies(inputs: np.ndarray, samples: int) -> list[bytes]:
    """One V2 infer request body per input, serialized once, as a client's json.dumps does."""
    bodies = []
    for x in inputs:
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, *x.shape],
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ],
            "parameters": {"mode": "mc_dropout", "samples": samples},
        }
        bodies.append(json.dumps(body).encode())
    return bodies


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


def _check(status: int, payload: bytes) -> str | None:
    """None for a good answer, else why not."""
    if status != 200:
        return f"HTTP {status}: {payload[:200]!r}"
    try:
        answer = json.loads(payload)
        outputs = {o["name"]: o for o in answer["outputs"]}
        if len(outputs["probabilities"]["data"]) < 2:
            return "too few probabilities"
        if answer["parameters"]["mode"] != "mc_dropout":
            return f"answered in mode {answer['parameters']['mode']!r}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"bad response body ({exc!r}): {payload[:200]!r}"
    return None


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


async def _generate(
    port: int,
    bodies: list[bytes],
    requests: int,
    concurrency: int,
    max_seconds: float,
    client: str,
) -> Load:
    path = f"/v2/models/{NAME}/infer"
    load = Load()
    counter = iter(range(requests))
    started = time.perf_counter()
    deadline = started + max_seconds
    finished = started

    if client == "raw":
        prebuilt = [
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
            for body in bodies
        ]

        async def worker() -> None:
            nonlocal finished
            connection = RawConnection(port)
            try:
                for index in counter:
                    if time.perf_counter() > deadline:
                        break
                    load.sent += 1
                    sent = time.perf_counter()
                    try:
                        status, payload = await connection.request(prebuilt[index % len(prebuilt)])
                        problem = _check(status, payload)
                    except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
                        problem = f"{type(exc).__name__}: {exc}"
                        await connection.close()
                    _record(load, problem, time.perf_counter() - sent)
                    finished = time.perf_counter()
            finally:
                await connection.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120, trust_env=False
        ) as http:

            async def worker() -> None:
                nonlocal finished
                for index in counter:
                    if time.perf_counter() > deadline:
                        break
                    load.sent += 1
                    sent = time.perf_counter()
                    try:
                        response = await http.post(
                            path, content=bodies[index % len(bodies)], headers=headers
                        )
                        problem = _check(response.status_code, response.content)
                    except httpx.HTTPError as exc:
                        problem = f"{type(exc).__name__}: {exc}"
                    _record(load, problem, time.perf_counter() - sent)
                    finished = time.perf_counter()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.seconds = finished - started
    return load


def _record(load: Load, problem: str | None, latency: float) -> None:
    if problem is None:
        load.ok += 1
        load.latencies.append(latency)
    else:
        load.errors.append(problem)


def generate(
    port: int,
    bodies: list[bytes],
    requests: int,
    concurrency: int,
    max_seconds: float,
    client: str,
) -> Load:
    return asyncio.run(_generate(port, bodies, requests, concurrency, max_seconds, client))


# ------------------------------------------------------------------------------------ main


def progress(repeat: int, label: str, started: float) -> float:
    now = time.perf_counter()
    print(f"  round {repeat}: {label:<30} {now - started:6.1f} s", flush=True)
    return now


def best_of(results: list[float]) -> float:
    return max(results) if results else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet")
    parser.add_argument("--requests", type=int, default=2000, help="per phase, at most")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="per phase, at most")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--samples", type=int, default=32, help="Monte-Carlo samples")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="batching on: rows per forward [default: the fastest size, calibrated]",
    )
    parser.add_argument(
        "--calibrate-limit", type=int, default=4096, help="largest forward size calibrated"
    )
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="batching on: wait")
    parser.add_argument("--repeats", type=int, default=3, help="timings: best of this many")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the bundle")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_seconds, args.repeats = 300, 6.0, 1
    if args.max_batch is not None and args.max_batch < args.samples:
        parser.error(f"--max-batch must hold one request's {args.samples} samples")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="randkit-bench-serve-") as tmp:
        folder = Path(tmp)
        repo, raw_inputs = build_bundle(folder, args.model, args.epochs)
        bundle = load_bundle(repo / NAME / "1", "cpu")
        inputs = torch.from_numpy(raw_inputs)
        started = time.perf_counter()
        calibration = calibrate(bundle, inputs, args.samples, args.calibrate_limit)
        fastest = max(calibration, key=lambda rows: calibration[rows])
        print(
            "in-process Engine.run inputs/s by rows per forward: "
            + ", ".join(f"{rows}: {rate:.1f}" for rows, rate in calibration.items())
            + f" ({time.perf_counter() - started:.1f} s)"
        )
        if args.max_batch is None:
            args.max_batch = fastest
        per_call = max(1, args.max_batch // args.samples)
        engine = Engine(bundle, max_rows=args.max_batch)
        mc = MonteCarlo(
            bundle.models[0], "dropout", samples=args.samples, batch_size=args.max_batch
        )
        bodies = request_bodies(raw_inputs, args.samples)
        print(
            f"{MODEL_LABELS[args.model]}: {args.samples} MC-dropout samples per input, "
            f"{len(bodies[0]) / 1024:.0f} KiB per request; concurrency {args.concurrency}, "
            f"at most {args.requests} requests or {args.max_seconds:g} s per phase, best of "
            f"{args.repeats}; client {args.client}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs"
        )

        inprocess_rates: dict[str, list[float]] = {"engine": [], "montecarlo": []}
        loads: dict[str, list[Load]] = {"on": [], "off": []}
        with (
            serving(
                repo, "on", args.max_batch, args.max_delay_ms, folder / "server-on.log"
            ) as batched,
            serving(repo, "off", 1, 0.0, folder / "server-off.log") as unbatched,
        ):
            servers = {"on": batched, "off": unbatched}
            # Warm-up: first forward passes, allocator, connections.
            inprocess_engine(engine, inputs, args.samples, 2 * per_call, per_call, math.inf)
            inprocess_montecarlo(mc, inputs, args.max_batch, args.max_batch, math.inf)
            for server in servers.values():
                warm = generate(
                    server.port, bodies, 2 * args.concurrency, args.concurrency, 120, args.client
                )
                if warm.errors:
                    raise SystemExit(f"warm-up of server {server.label!r}: {warm.errors[0]}")

            # The phases take turns, so that load from other processes hits all of them.
            for repeat in range(1, args.repeats + 1):
                started = time.perf_counter()
                inprocess_rates["engine"].append(
                    inprocess_engine(
                        engine, inputs, args.samples, args.requests, per_call, args.max_seconds
                    )
                )
                started = progress(repeat, "in-process Engine.run", started)
                inprocess_rates["montecarlo"].append(
                    inprocess_montecarlo(
                        mc, inputs, args.requests, args.max_batch, args.max_seconds
                    )
                )
                started = progress(repeat, "in-process MonteCarlo.predict", started)
                for key, server in servers.items():
                    loads[key].append(
                        generate(
                            server.port,
                            bodies,
                            args.requests,
                            args.concurrency,
                            args.max_seconds,
                            args.client,
                        )
                    )
                    started = progress(repeat, f"server, batching {key}", started)

    load_after = os.getloadavg()[0]
    best = {key: max(runs, key=lambda load: load.rps) for key, runs in loads.items()}
    errors = sum(len(load.errors) for runs in loads.values() for load in runs)
    engine_rps, mc_rps = best_of(inprocess_rates["engine"]), best_of(inprocess_rates["montecarlo"])
    inprocess_rps = max(engine_rps, mc_rps)
    server_rps, unbatched_rps = best["on"].rps, best["off"].rps
    ratio = server_rps / inprocess_rps
    gain = server_rps / unbatched_rps if unbatched_rps > 0 else math.nan

    print(f"\n{'method':<50} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    rows = [
        (f"in-process Engine.run ({args.max_batch} rows/forward)", engine_rps, None),
        (f"in-process MonteCarlo.predict ({args.max_batch} inputs/call)", mc_rps, None),
        (
            f"server, batching on ({args.max_batch} rows, {args.max_delay_ms:g} ms)",
            server_rps,
            best["on"],
        ),
        (f"server, batching off (max-batch 1, {args.samples} rows)", unbatched_rps, best["off"]),
    ]
    for label, rate, load in rows:
        if load is None:
            print(f"{label:<50} {rate:9.1f} {'':>8} {'':>8} {'':>7}")
        else:
            print(
                f"{label:<50} {rate:9.1f} {load.percentile(50):8.1f} {load.percentile(99):8.1f} "
                f"{len(load.errors):7d}"
            )
    for key, runs in loads.items():
        for load in runs:
            for problem in load.errors[:3]:
                print(f"  error (batching {key}): {problem}")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(
        f"ratio server (batching on) / in-process: {ratio:.2f} (target >= {TARGET_RATIO} "
        f"{verdict}); batching gain on / off: {gain:.2f}x; errors {errors}; load average "
        f"{load_before:.2f} before, {load_after:.2f} after (other processes skew the figures)"
    )
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "ratio": round(ratio, 3),
                "batching_gain": round(gain, 3),
                "server_rps": round(server_rps, 1),
                "inprocess_rps": round(inprocess_rps, 1),
                "unbatched_rps": round(unbatched_rps, 1),
                "p50_ms": round(best["on"].percentile(50), 1),
                "p99_ms": round(best["on"].percentile(99), 1),
                "unbatched_p50_ms": round(best["off"].percentile(50), 1),
                "unbatched_p99_ms": round(best["off"].percentile(99), 1),
                "inprocess_engine_rps": round(engine_rps, 1),
                "inprocess_montecarlo_rps": round(mc_rps, 1),
                "errors": errors,
                "target_ratio": TARGET_RATIO,
                "target_met": ratio >= TARGET_RATIO,
                "model": args.model,
                "samples": args.samples,
                "concurrency": args.concurrency,
                "requests": [load.ok for load in loads["on"]],
                "requests_unbatched": [load.ok for load in loads["off"]],
                "max_batch": args.max_batch,
                "calibration": {str(rows): round(rate, 1) for rows, rate in calibration.items()},
                "max_delay_ms": args.max_delay_ms,
                "client": args.client,
                "repeats": args.repeats,
                "loadavg": [round(load_before, 2), round(load_after, 2)],
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
