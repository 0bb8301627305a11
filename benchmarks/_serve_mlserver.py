"""MLServer, the peer a user would pick to serve a PyTorch model over KServe V2: its own
environment, a model folder for a randkit bundle, and the server process.

The environment is a separate venv, ``.tools/mlserver`` (gitignored), made on first use with
this interpreter: ``python -m venv`` + ``pip install mlserver==1.7.1 uvloop==0.21.0`` (with
uvloop 0.23, MLServer 1.7.1's inference worker restarts in a loop). So that torch is not
installed a second time, a ``.pth`` file appends this venv's site-packages (torch, numpy,
randkit) to its ``sys.path`` AFTER its own: MLServer's own fastapi, starlette, uvloop and
protobuf win. ``make mlserver-env`` (or the first benchmark run) creates it; if it cannot
be created the MLServer phases are skipped with the reason.

MLServer runs as ``mlserver start FOLDER`` with ``settings.json`` (ports, ``debug`` off: no
access log, as ``randkit serve --quiet``; ``parallel_workers`` 1, its default: inference in
one worker process) and two models of the same bundle through ``_mlserver_runtime``:
``bench`` with MLServer's adaptive batching (up to ``max_batch_size`` requests or
``max_batch_time``) and ``bench-single`` without.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from _serve_common import NAME, Server, free_port, ready, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / ".tools" / "mlserver"
PACKAGES = ("mlserver==1.7.1", "uvloop==0.21.0")
PTH_NAME = "zz_randkit_venv.pth"
SINGLE = f"{NAME}-single"


def _env_python() -> Path:
    return ENV / "bin" / "python"


def _env_works() -> str | None:
    """None if the environment imports MLServer, uvloop 0.21 and randkit; else why not."""
    probe = (
        "import mlserver, uvloop, torch, randkit.deploy.predictor; "
        "assert mlserver.__version__ == '1.7.1', mlserver.__version__; "
        "assert uvloop.__version__ == '0.21.0', uvloop.__version__"
    )
    try:
        done = subprocess.run(
            [str(_env_python()), "-c", probe], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def ensure_env(log: Path = ENV.parent / "mlserver-pip.log") -> str | None:
    """Create ``.tools/mlserver`` if it does not work yet; None when it works, else why not
    (the pip output is in ``log``)."""
    if _env_python().exists() and _env_works() is None:
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"creating MLServer's environment in {ENV} (pip install {' '.join(PACKAGES)}) ...")
    base = Path(sysconfig.get_config_var("BINDIR")) / "python3"
    with open(log, "wb") as sink:
        try:
            subprocess.run(
                [str(base), "-m", "venv", str(ENV)], check=True, stdout=sink, stderr=sink
            )
            pip = [str(_env_python()), "-m", "pip", "install", "--disable-pip-version-check"]
            subprocess.run([*pip, *PACKAGES], check=True, stdout=sink, stderr=sink, timeout=900)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"could not create {ENV}: {type(exc).__name__}: {exc} (see {log})"
    ours = sysconfig.get_paths()["purelib"]
    line = f"import site; site.addsitedir({ours!r})\n"  # after the env's own packages
    (_site_packages(_env_python()) / PTH_NAME).write_text(line)
    return _env_works()


def write_models(folder: Path, bundle: Path, max_batch_size: int, max_batch_ms: float) -> None:
    """MLServer's model folder: ``bench`` (adaptive batching) and ``bench-single`` (none)."""
    for name, batching in ((NAME, True), (SINGLE, False)):
        settings: dict[str, object] = {
            "name": name,
            "implementation": "_mlserver_runtime.RandkitRuntime",
            "parameters": {"uri": str(bundle), "version": "1"},
        }
        if batching:
            settings.update(max_batch_size=max_batch_size, max_batch_time=max_batch_ms / 1000)
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps(settings, indent=2))


@contextlib.contextmanager
def mlserver_serving(folder: Path, log: Path) -> Iterator[Server]:
    """``mlserver start FOLDER`` on free ports of 127.0.0.1 until the block ends."""
    port = free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "debug": False,
        "parallel_workers": 1,
        "load_models_at_startup": True,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    command = [str(ENV / "bin" / "mlserver"), "start", str(folder)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(process, port, "mlserver", log)
        for model in (NAME, SINGLE):  # the server is ready before its models are
            wait_model(process, port, model, log)
        yield Server("mlserver", port, process, log)
    finally:
        stop(process)


def wait_model(process: subprocess.Popen[bytes], port: int, model: str, log: Path) -> None:
    """Poll the model's readiness route until it answers 200 (at most 120 s)."""
    deadline = time.monotonic() + 120
    while not ready(port, f"/v2/models/{model}/ready"):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"MLServer's model {model!r} did not become ready:\n{tail}")
        time.sleep(0.1)
