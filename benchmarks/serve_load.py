"""``randkit serve`` under load: against randkit in-process, and against MLServer.

Two parts (``--parts ratio,peers``, both by default), each on a bundle built in a temporary
folder without downloading anything: a real ``randkit train`` run (``train_run``, 1 epoch:
the weights do not matter for throughput) exported with ``export_bundle``, as ``randkit
export`` does (``_serve_bundle.py``).

**ratio** (the server against in-process batches, on ``--model``):

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
  rather than its inference.

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
  on a 2-core machine is taken from the server). The batched server also listens for gRPC
  (``--grpc-port``, when this randkit's CLI has it) and a third phase sends the same
  requests as KServe V2 ``ModelInfer`` calls with binary tensors (``_serve_grpc.py``).

Throughput is inputs (= requests) per second of wall time, best of ``--repeats`` (the phases
take turns, so that load from other processes hits all of them); latencies p50 and p99 are
those of the best batched phase. ``ratio`` = server over HTTP with batching on / in-process
(target at least 0.7); ``ratio_grpc`` = the same over gRPC; ``batching_gain`` = batching on /
batching off.

**peers** (``_serve_peers.py``, always the digits CNN): ``randkit serve`` against MLServer
1.7.1 serving the same bundle through a runtime of randkit's own loader and ``Predictor``
(``_mlserver_runtime.py``), both driven by the raw client above with the same V2 JSON
requests, the servers taking turns in every round: deterministic requests of 1 and 8 images
and MC-dropout requests of ``--samples`` at ``--concurrency``, deterministic single images at
concurrency 1; and randkit over gRPC with binary tensors against randkit in-process on the
MC-dropout requests. Each phase lasts ``--peer-seconds`` (or ``--peer-requests``). MLServer
runs in its own venv, ``.tools/mlserver`` (``pip install mlserver==1.7.1 uvloop==0.21.0``;
torch and randkit come from this venv through a ``.pth`` file read after its own packages),
made on first use or by ``make mlserver-env`` (``_serve_mlserver.py``); when it cannot be
made, the MLServer phases are skipped with the reason. Ratios: randkit / MLServer throughput
(``ratio_vs_mlserver``, ``_8``, ``_mc``), MLServer / randkit latency
(``latency_ratio_vs_mlserver_c1``: p50 at concurrency 1; ``p99_ratio_vs_mlserver_c32``), gRPC
/ in-process (``ratio_grpc_tiny``).

Every response must be a 200 with the outputs; ``errors`` and ``peer_errors`` count the others
(the run exits 1 if there are any). The last line printed is a JSON record.

    python benchmarks/serve_load.py [--parts ratio,peers] [--model resnet|cnn] [--quick]
        [--requests 2000] [--max-seconds 10] [--peer-requests 20000] [--peer-seconds 3]
        [--concurrency 32] [--samples 32] [--max-batch ROWS] [--peer-max-batch ROWS]
        [--max-delay-ms 2] [--repeats 3] [--client raw|httpx] [--epochs 1]
        [--calibrate-limit 4096]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _serve_bundle import (
    MODEL_LABELS,
    MODELS,
    NAME,
    build_bundle,
    calibrate,
    inprocess_engine,
    inprocess_montecarlo,
)
from _serve_common import Load, Server, generate, request_bodies, serving

from randkit.deploy.bundle import load_bundle
from randkit.deploy.mc import MonteCarlo
from randkit.serve.engine import Engine

TARGET_RATIO = 0.7


def progress(repeat: int, label: str, started: float) -> float:
    now = time.perf_counter()
    print(f"  round {repeat}: {label:<30} {now - started:6.1f} s", flush=True)
    return now


def best_of(results: list[float]) -> float:
    return max(results) if results else math.nan


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add("--model", choices=sorted(MODELS), default="resnet", help="of the ratio part")
    add("--parts", default="ratio,peers", help="ratio (server/in-process), peers (CNN)")
    add("--requests", type=int, default=2000, help="ratio part: per phase, at most")
    add("--max-seconds", type=float, default=10.0, help="ratio part: per phase, at most")
    add("--peer-requests", type=int, default=20000, help="peers: per phase, at most")
    add("--peer-seconds", type=float, default=3.0, help="peers: per phase, at most")
    add(
        "--peer-max-batch",
        type=int,
        default=None,
        help="peers: randkit's rows per forward [concurrency x samples]",
    )
    add("--concurrency", type=int, default=32, help="requests in flight")
    add("--workers", type=int, default=2, help="peers: randkit serve --workers")
    add("--grpc-channels", type=int, default=1, help="peers: gRPC channels (connections)")
    add("--samples", type=int, default=32, help="Monte-Carlo samples")
    add("--max-batch", type=int, default=None, help="ratio part: rows per forward [calibrated]")
    add("--calibrate-limit", type=int, default=4096, help="largest forward size calibrated")
    add("--max-delay-ms", type=float, default=2.0, help="batching on: wait")
    add("--repeats", type=int, default=3, help="timings: best of this many rounds")
    add("--epochs", type=int, default=1, help="training epochs of the bundles")
    add("--client", choices=("raw", "httpx"), default="raw", help="ratio part's HTTP client")
    add("--quick", action="store_true", help="a smoke run: few requests")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_seconds, args.repeats = 300, 6.0, 1
        args.peer_requests, args.peer_seconds = 300, 1.5
        args.calibrate_limit = min(args.calibrate_limit, 128)
    if args.max_batch is not None and args.max_batch < args.samples:
        parser.error(f"--max-batch must hold one request's {args.samples} samples")
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not args.parts or args.parts - {"ratio", "peers"}:
        parser.error(f"--parts takes ratio and/or peers, got {sorted(args.parts)}")
    return args


# ------------------------------------------------------------------------ the ratio part


@dataclass
class RatioPart:
    """The server (HTTP batching on and off, gRPC) against in-process ``Engine.run`` and
    ``MonteCarlo.predict``, on ``--model``."""

    args: argparse.Namespace
    folder: Path
    calibration: dict[int, float] = field(default_factory=dict)
    rates: dict[str, list[float]] = field(default_factory=lambda: {"engine": [], "mc": []})
    loads: dict[str, list[Load]] = field(default_factory=lambda: {"on": [], "off": []})

    def setup(self) -> None:
        args = self.args
        self.repo, raw = build_bundle(self.folder, args.model, args.epochs)
        bundle = load_bundle(self.repo / NAME / "1", "cpu")
        self.inputs = torch.from_numpy(raw)
        started = time.perf_counter()
        self.calibration = calibrate(bundle, self.inputs, args.samples, args.calibrate_limit)
        print(
            "in-process Engine.run inputs/s by rows per forward: "
            + ", ".join(f"{rows}: {rate:.1f}" for rows, rate in self.calibration.items())
            + f" ({time.perf_counter() - started:.1f} s)"
        )
        if args.max_batch is None:
            args.max_batch = max(self.calibration, key=lambda rows: self.calibration[rows])
        self.per_call = max(1, args.max_batch // args.samples)
        self.engine = Engine(bundle, max_rows=args.max_batch)
        self.mc = MonteCarlo(
            bundle.models[0], "dropout", samples=args.samples, batch_size=args.max_batch
        )
        self.bodies = request_bodies(raw, args.samples)
        print(
            f"{MODEL_LABELS[args.model]}: {args.samples} MC-dropout samples per input, "
            f"{len(self.bodies[0]) / 1024:.0f} KiB per request; concurrency {args.concurrency}, "
            f"at most {args.requests} requests or {args.max_seconds:g} s per phase, best of "
            f"{args.repeats}; client {args.client}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs"
        )

    def inprocess(self, count: int, seconds: float) -> tuple[float, float]:
        args = self.args
        engine = inprocess_engine(
            self.engine, self.inputs, args.samples, count, self.per_call, seconds
        )
        mc = inprocess_montecarlo(self.mc, self.inputs, count, args.max_batch, seconds)
        return engine, mc

    def server_phase(self, server: Server, count: int, seconds: float) -> Load:
        args = self.args
        return generate(server.port, self.bodies, count, args.concurrency, seconds, args.client)

    def grpc_phase(self, server: Server, count: int, seconds: float) -> Load:
        from _serve_grpc import grpc_checker, grpc_generate, infer_request

        params = {"mode": "mc_dropout", "samples": self.args.samples}
        requests = [infer_request(x[None].numpy(), params) for x in self.inputs]
        assert server.grpc_port is not None
        check = grpc_checker("mc_dropout", 1)
        return grpc_generate(
            server.grpc_port, requests, count, self.args.concurrency, seconds, check
        )

    def run(self, grpc: bool) -> None:
        args, folder = self.args, self.folder
        if grpc:
            self.loads["grpc"] = []
        with (
            serving(
                self.repo, "on", args.max_batch, args.max_delay_ms, folder / "on.log", grpc
            ) as batched,
            serving(self.repo, "off", 1, 0.0, folder / "off.log") as unbatched,
        ):
            servers = {"on": batched, "off": unbatched}
            self.inprocess(2 * self.per_call, math.inf)  # warm-up: first passes, allocator
            for key in self.loads:
                self.phase(servers, key, 2 * args.concurrency, 120, warm=True)
            # The phases take turns, so that load from other processes hits all of them.
            for repeat in range(1, args.repeats + 1):
                started = time.perf_counter()
                engine, mc = self.inprocess(args.requests, args.max_seconds)
                self.rates["engine"].append(engine)
                self.rates["mc"].append(mc)
                started = progress(repeat, "in-process", started)
                for key in self.loads:
                    self.phase(servers, key, args.requests, args.max_seconds)
                    started = progress(repeat, f"server, {key}", started)

    def phase(
        self, servers: dict[str, Server], key: str, count: int, seconds: float, warm: bool = False
    ) -> None:
        if key == "grpc":
            load = self.grpc_phase(servers["on"], count, seconds)
        else:
            load = self.server_phase(servers[key], count, seconds)
        if warm and load.errors:
            raise SystemExit(f"warm-up of server {key!r}: {load.errors[0]}")
        if not warm:
            self.loads[key].append(load)

    def summary(self) -> dict[str, Any]:
        """Prints the table and the ratio line; the JSON fields."""
        args = self.args
        best = {key: max(runs, key=lambda load: load.rps) for key, runs in self.loads.items()}
        engine_rps, mc_rps = best_of(self.rates["engine"]), best_of(self.rates["mc"])
        inprocess_rps = max(engine_rps, mc_rps)
        server_rps, unbatched_rps = best["on"].rps, best["off"].rps
        grpc_rps = best["grpc"].rps if "grpc" in best else math.nan
        ratio, ratio_grpc = server_rps / inprocess_rps, grpc_rps / inprocess_rps
        gain = server_rps / unbatched_rps if unbatched_rps > 0 else math.nan
        rows = [
            (f"in-process Engine.run ({args.max_batch} rows/forward)", engine_rps, None),
            (f"in-process MonteCarlo.predict ({args.max_batch} inputs/call)", mc_rps, None),
            (
                f"server, batching on ({args.max_batch} rows, {args.max_delay_ms:g} ms)",
                server_rps,
                best["on"],
            ),
            (
                f"server, batching off (max-batch 1, {args.samples} rows)",
                unbatched_rps,
                best["off"],
            ),
        ]
        if "grpc" in best:
            rows.append(("server, batching on, gRPC binary", grpc_rps, best["grpc"]))
        print_rows(rows)
        for key, runs in self.loads.items():
            for problem in [e for load in runs for e in load.errors][:3]:
                print(f"  error ({key}): {problem}")
        errors = sum(len(load.errors) for runs in self.loads.values() for load in runs)
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        grpc_verdict = "met" if ratio_grpc >= TARGET_RATIO else "NOT met"
        print(
            f"ratio server (HTTP, batching on) / in-process: {ratio:.2f} (target >= "
            f"{TARGET_RATIO} {verdict}); gRPC / in-process: "
            + (f"{ratio_grpc:.2f} ({grpc_verdict})" if "grpc" in best else "not measured")
            + f"; batching gain on / off: {gain:.2f}x; errors {errors}"
        )
        figures = dict(ratio=ratio, ratio_grpc=ratio_grpc, gain=gain, grpc_rps=grpc_rps)
        figures.update(engine_rps=engine_rps, mc_rps=mc_rps, inprocess_rps=inprocess_rps)
        return self.record(best, figures, errors)

    def record(self, best: dict[str, Load], f: dict[str, float], errors: int) -> dict[str, Any]:
        """The JSON fields of the ratio part."""
        args = self.args
        return {
            "ratio": round(f["ratio"], 3),
            "ratio_grpc": _maybe(f["ratio_grpc"], 3),
            "batching_gain": round(f["gain"], 3),
            "server_rps": round(best["on"].rps, 1),
            "grpc_rps": _maybe(f["grpc_rps"], 1),
            "inprocess_rps": round(f["inprocess_rps"], 1),
            "unbatched_rps": round(best["off"].rps, 1),
            "p50_ms": round(best["on"].percentile(50), 1),
            "p99_ms": round(best["on"].percentile(99), 1),
            "unbatched_p50_ms": round(best["off"].percentile(50), 1),
            "unbatched_p99_ms": round(best["off"].percentile(99), 1),
            "inprocess_engine_rps": round(f["engine_rps"], 1),
            "inprocess_montecarlo_rps": round(f["mc_rps"], 1),
            "errors": errors,
            "target_ratio": TARGET_RATIO,
            "target_met": f["ratio"] >= TARGET_RATIO,
            "model": args.model,
            "requests": [load.ok for load in self.loads["on"]],
            "requests_unbatched": [load.ok for load in self.loads["off"]],
            "max_batch": args.max_batch,
            "calibration": {str(rows): round(rate, 1) for rows, rate in self.calibration.items()},
        }


def _maybe(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def print_rows(rows: list[tuple[str, float, Load | None]]) -> None:
    print(f"\n{'method':<50} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for label, rate, load in rows:
        if load is None:
            print(f"{label:<50} {rate:9.1f}")
        else:
            print(
                f"{label:<50} {rate:9.1f} {load.percentile(50):8.1f} {load.percentile(99):8.1f} "
                f"{len(load.errors):7d}"
            )


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()[0]
    record: dict[str, Any] = {"benchmark": "serve"}
    with tempfile.TemporaryDirectory(prefix="randkit-bench-serve-") as tmp:
        folder = Path(tmp)
        grpc = False
        if "peers" in args.parts or "ratio" in args.parts:
            from _serve_peers import grpc_available, run

            grpc = grpc_available()
        if "ratio" in args.parts:
            part = RatioPart(args, folder / "ratio")
            part.folder.mkdir()
            part.setup()
            part.run(grpc)
            record.update(part.summary())
        if "peers" in args.parts:
            (folder / "peers").mkdir()
            record.update(run(args, folder / "peers"))
    load_after = os.getloadavg()[0]
    print(
        f"load average {load_before:.2f} before, {load_after:.2f} after (other processes "
        "skew the figures)"
    )
    record.update(
        samples=args.samples,
        concurrency=args.concurrency,
        max_delay_ms=args.max_delay_ms,
        client=args.client,
        repeats=args.repeats,
        loadavg=[round(load_before, 2), round(load_after, 2)],
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    print(json.dumps(record))
    if record.get("errors") or record.get("peer_errors"):
        sys.exit(1)


if __name__ == "__main__":
    main()
