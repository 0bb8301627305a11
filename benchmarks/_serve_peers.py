"""``randkit serve`` against MLServer, and randkit over gRPC against randkit in-process, on
the digits CNN (``serve_load.py``'s ``cnn``: requests of about 0.1 ms of compute, so what is
measured is each server's own cost per request).

Workloads (every request a KServe V2 JSON body over HTTP/1.1, the same bytes to both
servers, from the same raw asyncio client; ``samples`` and ``concurrency`` from the command):

- ``det1``/``det8``: mode ``none`` (one deterministic forward), 1 or 8 images per request,
  ``concurrency`` in flight: throughput (and, ``det1``, p99 latency);
- ``mc``: mode ``mc_dropout``, ``samples`` per request (MLServer's runtime runs them in one
  batch through randkit's ``Predictor``), one image, ``concurrency`` in flight;
- ``c1``: mode ``none``, one image, one request in flight: p50 latency.

randkit runs one server (batching on, ``--peer-max-batch`` rows, by default concurrency x
samples so that every request in flight fits one pass, ``--max-delay-ms``, and
``--grpc-port`` when the CLI has it); MLServer one server with two models of the same bundle,
``bench`` (adaptive batching, ``concurrency`` requests or ``--max-delay-ms``) and
``bench-single`` (no batching); MLServer's figure is the better of the two for each figure
(throughput: the higher; latency: the lower), and each side's is its best round.
The servers take turns within each round, in an order that rotates from round to round.
Then the gRPC part: the ``mc`` workload as binary ``ModelInfer`` requests against the
in-process ``Engine.run``/``MonteCarlo.predict`` (the better) at the calibrated forward size.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _serve_bundle import (
    MODEL_LABELS,
    NAME,
    build_bundle,
    calibrate,
    inprocess_engine,
    inprocess_montecarlo,
)
from _serve_common import Load, Server, generate, serving, v2_body, v2_checker

from randkit.deploy.bundle import load_bundle
from randkit.deploy.mc import MonteCarlo
from randkit.serve.engine import Engine

GOALS = {"det1": 2.5, "det8": 2.5, "mc": 2.0, "c1": 1.0, "p99": 1.0, "grpc": 0.7}
SIDES = ("randkit", "mlserver", "mlserver-single")


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    mode: str
    images: int
    concurrency: int

    def parameters(self, samples: int) -> dict[str, Any]:
        return (
            {"mode": "mc_dropout", "samples": samples} if self.mode != "none" else {"mode": "none"}
        )


def workloads(concurrency: int) -> list[Workload]:
    return [
        Workload("det1", "deterministic, 1 image/request", "none", 1, concurrency),
        Workload("det8", "deterministic, 8 images/request", "none", 8, concurrency),
        Workload("mc", "MC dropout, 1 image/request", "mc_dropout", 1, concurrency),
        Workload("c1", "deterministic, 1 image, concurrency 1", "none", 1, 1),
    ]


def bodies_of(inputs: np.ndarray, work: Workload, samples: int) -> list[bytes]:
    """Request bodies of ``work.images`` consecutive inputs each, cycled through."""
    n, params = work.images, work.parameters(samples)
    return [v2_body(np.roll(inputs, -i, 0)[:n], params) for i in range(len(inputs))]


def grpc_available() -> bool:
    """Whether this randkit's ``serve`` command takes ``--grpc-port``."""
    done = subprocess.run(
        [sys.executable, "-m", "randkit", "serve", "--help"], capture_output=True, text=True
    )
    return "--grpc-port" in done.stdout


@dataclass
class Setup:
    """Everything one peer comparison needs, built once."""

    folder: Path
    repo: Path
    inputs: np.ndarray
    max_batch: int
    calibration: dict[int, float]
    samples: int
    server_rows: int = 0  # randkit server's --max-batch
    workers: int = 1  # randkit server's --workers
    grpc_channels: int = 1  # connections of the gRPC load


def prepare(folder: Path, samples: int, epochs: int, limit: int) -> Setup:
    """The CNN bundle, its request inputs and its calibrated forward size."""
    repo, inputs = build_bundle(folder, "cnn", epochs)
    bundle = load_bundle(repo / NAME / "1", "cpu")
    calibration = calibrate(bundle, torch.from_numpy(inputs), samples, limit)
    fastest = max(calibration, key=lambda rows: calibration[rows])
    print(
        f"{MODEL_LABELS['cnn']}: in-process Engine.run inputs/s by rows per forward: "
        + ", ".join(f"{rows}: {rate:.0f}" for rows, rate in calibration.items())
    )
    return Setup(folder, repo, inputs, fastest, calibration, samples)


@contextlib.contextmanager
def servers(setup: Setup, args: Any, grpc: bool) -> Iterator[dict[str, Server]]:
    """randkit (HTTP and gRPC) and, when its environment works, MLServer."""
    from _serve_mlserver import ensure_env, mlserver_serving, write_models

    folder = setup.folder
    with contextlib.ExitStack() as stack:
        running = {
            "randkit": stack.enter_context(
                serving(
                    setup.repo,
                    "randkit",
                    setup.server_rows,
                    args.max_delay_ms,
                    folder / "randkit-cnn.log",
                    grpc=grpc,
                    workers=args.workers,
                )
            )
        }
        problem = ensure_env(folder / "mlserver-pip.log")
        if problem is None:
            ml = folder / "mlserver"
            write_models(ml, setup.repo / NAME / "1", args.concurrency, args.max_delay_ms)
            running["mlserver"] = stack.enter_context(mlserver_serving(ml, folder / "ml.log"))
        else:
            print(f"MLServer phases SKIPPED: {problem}")
        yield running


def phase(server: Server, side: str, work: Workload, bodies: list[bytes], args: Any) -> Load:
    from _serve_mlserver import SINGLE

    model = SINGLE if side == "mlserver-single" else NAME
    return generate(
        server.port,
        bodies,
        args.peer_requests,
        work.concurrency,
        args.peer_seconds,
        check=v2_checker(work.mode, work.images),
        model=model,
    )


def server_of(running: dict[str, Server], side: str) -> Server | None:
    return running.get("mlserver" if side.startswith("mlserver") else side)


def run_rounds(setup: Setup, args: Any, running: dict[str, Server], grpc: bool) -> dict:
    """Every phase once per round, the sides' order rotating; the raw ``Load``s by
    (workload, side) and the gRPC/in-process rates."""
    loads: dict[tuple[str, str], list[Load]] = {}
    sides = [s for s in SIDES if server_of(running, s) is not None]
    works = workloads(args.concurrency)
    bodies = {w.key: bodies_of(setup.inputs, w, setup.samples) for w in works}
    for work in works:  # warm-up: connections, first batches
        for side in sides:
            warm = phase(server_of(running, side), side, work, bodies[work.key], args)  # type: ignore[arg-type]
            if warm.errors:
                raise SystemExit(f"warm-up of {side} ({work.key}): {warm.errors[0]}")
    part = GrpcPart(setup, args, running["randkit"] if grpc else None)
    for round_ in range(1, args.repeats + 1):
        started = time.perf_counter()
        for work in works:
            shift = (round_ - 1) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                load = phase(server_of(running, side), side, work, bodies[work.key], args)  # type: ignore[arg-type]
                loads.setdefault((work.key, side), []).append(load)
        part.round(round_)
        print(f"  peers round {round_}: {time.perf_counter() - started:6.1f} s", flush=True)
    return {"loads": loads, "grpc": part}


def best_rps(loads: dict, key: str, sides: tuple[str, ...]) -> float:
    rates = [load.rps for s in sides for load in loads.get((key, s), [])]
    return max(rates) if rates else math.nan


def best_latency(loads: dict, key: str, sides: tuple[str, ...], q: float) -> float:
    values = [load.percentile(q) for s in sides for load in loads.get((key, s), [])]
    return min(values) if values else math.nan


class GrpcPart:
    """The ``mc`` workload as binary gRPC requests to randkit, and in-process."""

    def __init__(self, setup: Setup, args: Any, server: Server | None) -> None:
        from _serve_grpc import grpc_checker, grpc_generate, infer_request

        bundle = load_bundle(setup.repo / NAME / "1", "cpu")
        self.setup, self.args, self.server = setup, args, server
        self.x = torch.from_numpy(setup.inputs)
        self.engine = Engine(bundle, max_rows=setup.max_batch)
        self.mc = MonteCarlo(
            bundle.models[0], "dropout", samples=setup.samples, batch_size=setup.max_batch
        )
        self.per_call = max(1, setup.max_batch // setup.samples)
        params = {"mode": "mc_dropout", "samples": setup.samples}
        self.requests = [infer_request(x[None], params) for x in setup.inputs]
        self.check, self.generate = grpc_checker("mc_dropout", 1), grpc_generate
        self.engine_rates: list[float] = []
        self.mc_rates: list[float] = []
        self.loads: list[Load] = []
        self._measure(warm=True)

    def _measure(self, warm: bool = False) -> None:
        args, samples = self.args, self.setup.samples
        count = 2 * self.per_call if warm else args.peer_requests
        seconds = math.inf if warm else args.peer_seconds
        rate = inprocess_engine(self.engine, self.x, samples, count, self.per_call, seconds)
        mc_rate = inprocess_montecarlo(self.mc, self.x, count, self.setup.max_batch, seconds)
        if not warm:
            self.engine_rates.append(rate)
            self.mc_rates.append(mc_rate)
        if self.server is None:
            return
        port = self.server.grpc_port
        assert port is not None
        count = 2 * args.concurrency if warm else args.peer_requests
        load = self.generate(
            port, self.requests, count, args.concurrency, seconds, self.check, args.grpc_channels
        )
        if warm and load.errors:
            raise SystemExit(f"warm-up of randkit gRPC: {load.errors[0]}")
        if not warm:
            self.loads.append(load)

    def round(self, round_: int) -> None:
        self._measure()

    def inprocess_rps(self) -> float:
        return max(self.engine_rates + self.mc_rates, default=math.nan)

    def grpc_rps(self) -> float:
        return max((load.rps for load in self.loads), default=math.nan)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def _verdict(value: float, goal: float) -> str:
    if math.isnan(value):
        return "not measured"
    return f"goal >= {goal:g} {'met' if value >= goal else 'NOT met'}"


def print_table(loads: dict, works: list[Workload]) -> None:
    print(
        f"\n{'workload (digits CNN)':<40} {'server':<16} {'req/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'errors':>6}"
    )
    for work in works:
        for side in SIDES:
            runs = loads.get((work.key, side))
            if not runs:
                continue
            best = max(runs, key=lambda load: load.rps)
            print(
                f"{work.label:<40} {side:<16} {best.rps:8.1f} {best.percentile(50):8.2f} "
                f"{best.percentile(99):8.1f} {sum(len(r.errors) for r in runs):6d}"
            )
            for problem in [e for r in runs for e in r.errors][:3]:
                print(f"  error ({side}, {work.key}): {problem}")


def summarize(result: dict, setup: Setup, concurrency: int) -> dict[str, Any]:
    """Prints the table and the ratio lines; the JSON fields."""
    loads, part = result["loads"], result["grpc"]
    rk, ml = ("randkit",), ("mlserver", "mlserver-single")
    print_table(loads, workloads(concurrency))
    figures = {
        key: _ratio(best_rps(loads, key, rk), best_rps(loads, key, ml))
        for key in ("det1", "det8", "mc")
    }
    figures["c1"] = _ratio(best_latency(loads, "c1", ml, 50), best_latency(loads, "c1", rk, 50))
    figures["p99"] = _ratio(
        best_latency(loads, "det1", ml, 99), best_latency(loads, "det1", rk, 99)
    )
    inprocess = part.inprocess_rps()
    figures["grpc"] = _ratio(part.grpc_rps(), inprocess)
    http_tiny = _ratio(best_rps(loads, "mc", rk), inprocess)
    lines = {
        "det1": "throughput randkit / MLServer, deterministic, 1 image/request, c32",
        "det8": "throughput randkit / MLServer, deterministic, 8 images/request, c32",
        "mc": f"throughput randkit / MLServer, MC dropout {setup.samples} samples, c32",
        "c1": "p50 latency MLServer / randkit, concurrency 1",
        "p99": "p99 latency MLServer / randkit, deterministic, 1 image, c32",
        "grpc": f"randkit gRPC (binary) / in-process, MC dropout {setup.samples} samples",
    }
    print(
        f"randkit serve --workers {setup.workers}; gRPC load over {setup.grpc_channels} channel(s)"
    )
    for key, text in lines.items():
        print(f"ratio {text}: {figures[key]:.2f} ({_verdict(figures[key], GOALS[key])})")
    print(
        f"randkit gRPC {part.grpc_rps():.1f} inputs/s, HTTP {best_rps(loads, 'mc', rk):.1f}, "
        f"in-process {inprocess:.1f} (Engine.run {max(part.engine_rates, default=0):.1f}, "
        f"MonteCarlo.predict {max(part.mc_rates, default=0):.1f}); HTTP / in-process "
        f"{http_tiny:.2f}"
    )
    return _record(figures, loads, part, setup, http_tiny)


def _rounded(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _record(
    figures: dict[str, float], loads: dict, part: GrpcPart, setup: Setup, http_tiny: float
) -> dict[str, Any]:
    per_server = {
        f"{key}_{side}": {
            "rps": _rounded(max(load.rps for load in runs), 1),
            "p50_ms": _rounded(min(load.percentile(50) for load in runs), 2),
            "p99_ms": _rounded(min(load.percentile(99) for load in runs), 1),
        }
        for (key, side), runs in loads.items()
    }
    errors = sum(len(load.errors) for runs in loads.values() for load in runs)
    errors += sum(len(load.errors) for load in part.loads)
    return {
        "ratio_vs_mlserver": _rounded(figures["det1"]),
        "ratio_vs_mlserver_8": _rounded(figures["det8"]),
        "ratio_vs_mlserver_mc": _rounded(figures["mc"]),
        "latency_ratio_vs_mlserver_c1": _rounded(figures["c1"]),
        "p99_ratio_vs_mlserver_c32": _rounded(figures["p99"]),
        "ratio_grpc_tiny": _rounded(figures["grpc"]),
        "ratio_http_tiny": _rounded(http_tiny),
        "peer_goals": GOALS,
        "peer_goals_met": {
            key: (None if math.isnan(value) else value >= GOALS[key])
            for key, value in figures.items()
        },
        "peers": per_server,
        "grpc_tiny_rps": _rounded(part.grpc_rps(), 1),
        "inprocess_tiny_rps": _rounded(part.inprocess_rps(), 1),
        "peer_max_batch": setup.server_rows,
        "peer_inprocess_rows": setup.max_batch,
        "peer_calibration": {str(k): round(v, 1) for k, v in setup.calibration.items()},
        "peer_errors": errors,
        "workers": setup.workers,
        "grpc_channels": setup.grpc_channels,
    }


def run(args: Any, folder: Path) -> dict[str, Any]:
    """The whole peer comparison; its JSON fields (``peer_errors`` counts bad answers)."""
    setup = prepare(folder, args.samples, args.epochs, args.calibrate_limit)
    setup.server_rows = args.peer_max_batch or args.concurrency * setup.samples
    setup.workers, setup.grpc_channels = args.workers, args.grpc_channels
    grpc = grpc_available()
    if not grpc:
        print("randkit serve has no --grpc-port here: the gRPC phases are SKIPPED")
    with servers(setup, args, grpc) as running:
        result = run_rounds(setup, args, running, grpc)
    return summarize(result, setup, args.concurrency)
