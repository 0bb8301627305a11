"""Helpers for the server tests: a small model repository and a real uvicorn server on
127.0.0.1 with a free port, started and stopped inside the test process."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from randkit.config import validate_config
from randkit.cv import run_cv
from randkit.deploy.bundle import export_bundle
from randkit.serve.app import create_app
from randkit.serve.server import ServerSettings
from randkit.train import train_run

CNN: dict[str, Any] = {
    "seed": 1,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "cnn", "args": {"widths": [8, 16], "hidden": 32, "dropout": 0.3}},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.01, "device": "cpu"},
    "randomize": {
        "augment": [{"kind": "crop", "padding": 1}],
        "input_noise": {"kind": "gaussian", "level": 0.25},
    },
}
ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer"  # `make tools`: a wrapper that finds libcudart
# Two clients, windows of 1 s until 3 in a row agree (10 at most): a few seconds. The
# stability threshold is loose because the test machine's cores are shared; the tests check
# that perf_analyzer can measure the server, not how fast it is.
PERF_ARGS = ["--concurrency-range", "2", "-p", "1000", "-r", "10", "-s", "1000"]
POLICY = "labels: {stable: '1', canary: '2'}\nweights: {stable: 90, canary: 10}\n"


def build_repository(root: Path) -> Path:
    """``root/repo`` with ``digits`` (CNN, versions 1 and 2, 90/10 policy) and
    ``digits-ensemble`` (the two fold models of a 2-fold cross-validation)."""
    repo = root / "repo"
    for seed in (1, 2):
        run = root / f"run{seed}"
        train_run(validate_config({**CNN, "seed": seed}), run, quiet=True)
        export_bundle(run, repo, "digits")
    (repo / "digits" / "policy.yaml").write_text(POLICY)
    mlp = {
        **CNN,
        "model": {"name": "mlp", "args": {"hidden": [16]}},
        "train": {**CNN["train"], "epochs": 1},
        "randomize": {},
        "cv": {"folds": 2, "runner": "sequential"},
    }
    run_cv(validate_config(mlp), root / "cv", quiet=True, report=False)
    export_bundle(root / "cv", repo, "digits-ensemble", ensemble=True)
    return repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    def __init__(self, url: str, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.url, self.server, self.thread = url, server, thread
        self.grpc_url: str | None = None  # "127.0.0.1:PORT" when started with grpc=True

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def wait_ready(
    url: str, alive: Callable[[], bool], seconds: float, failure: Callable[[], str]
) -> None:
    """Poll ``url``'s readiness until a 200; ``RuntimeError(failure())`` when the server
    dies (``alive()`` false) or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(failure())
        time.sleep(0.05)


@contextmanager
def running_server(
    repository: Path, grpc: bool = False, **settings: Any
) -> Iterator[RunningServer]:
    """uvicorn serving ``repository`` on 127.0.0.1:free port in a thread, until the block
    ends (then a graceful shutdown); with ``grpc``, the gRPC service on another free port."""
    port = free_port()
    if grpc:
        settings["grpc_port"] = free_port()
    app = create_app(ServerSettings(repository=repository, port=port, **settings))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, thread.is_alive, 60, lambda: "the server did not become ready")
    try:
        running = RunningServer(url, server, thread)
        if grpc:
            running.grpc_url = f"127.0.0.1:{settings['grpc_port']}"
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def v2_body(x: Any, **parameters: Any) -> dict[str, Any]:
    array = np.asarray(x, dtype=np.float32)
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(array.shape),
                "datatype": "FP32",
                "data": array.reshape(-1).tolist(),
            }
        ]
    }
    if parameters:
        body["parameters"] = parameters
    return body


def measure_with_perf_analyzer(url: str, protocol: str, model: str = "digits") -> str:
    """Triton's perf_analyzer (installed by ``make tools``, here when missing) on ``url``
    (``host:port``) over ``protocol``; checks that it measured the server and its own split
    of the latency (from the model statistics); its output."""
    import pytest

    if not PERF_ANALYZER.exists() and shutil.which("make"):
        subprocess.run(["make", "tools"], cwd=ROOT, capture_output=True, timeout=900, check=False)
    if not PERF_ANALYZER.exists():
        pytest.skip("perf_analyzer is absent and `make tools` could not install it")
    done = subprocess.run(
        [str(PERF_ANALYZER), "-m", model, "-x", "1", "-u", url, "-i", protocol, *PERF_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", done.stdout)
    assert throughput and float(throughput.group(1)) > 0, done.stdout[-2000:]
    assert re.search(r"Server:\s+Inference count: [1-9]", done.stdout), done.stdout[-2000:]
    assert "compute infer" in done.stdout
    return done.stdout
