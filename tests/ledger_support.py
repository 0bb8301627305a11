"""Helpers of the ledger tests: ``randkit serve`` as a subprocess (for restarts and SIGKILL),
HTTP helpers, and a throwaway PostgreSQL server (``initdb`` + ``pg_ctl`` into a temporary
folder, listening on 127.0.0.1 and a socket in that folder on a free port, with trust
authentication, stopped and deleted afterwards).

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user
(or ``nobody``); its folder is created under /tmp, which that user can reach (pytest's
own temporary folders are private to root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from randkit.streams import Streams
from serve_support import free_port, v2_body, wait_ready

INFER = "/v2/models/digits/infer"
FEEDBACK = "/v2/models/digits/feedback"


def postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: pg_config's, else the newest Debian one."""
    candidates = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(Path(found.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb") or "").parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _unprivileged() -> dict[str, Any]:
    """subprocess arguments that drop root (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    pytest.skip("running as root and no postgres or nobody user to run PostgreSQL as")


@contextmanager
def postgres_url(_: Path | None = None) -> Iterator[str]:
    """A ``postgresql://`` URL of a fresh server, for the length of the block."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (`make test` installs them as root)")
    run_as = _unprivileged()
    folder = Path(tempfile.mkdtemp(prefix="randkit-pg-"))
    data = folder / "data"
    if run_as:
        os.chown(folder, run_as["user"], run_as["group"])
    port = free_port()

    def run(*args: str) -> None:
        result = subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            cwd=folder,
            timeout=120,
            **run_as,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}")

    started = False
    try:
        run("initdb", "-D", str(data), "-U", "randkit", "-A", "trust", "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -k {folder} -c fsync=off"
        run("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o", options, "start")
        started = True
        yield f"postgresql://randkit@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


# -- randkit serve as a process, and its clients ------------------------------------------


def x_of(seed: int = 0) -> list[Any]:
    return Streams(seed).numpy("noise", test=1).random((1, 1, 8, 8)).astype(np.float32).tolist()


class Process:
    def __init__(self, popen: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.popen, self.url, self.log = popen, url, log


@contextmanager
def serve_process(repo: Path, *args: str) -> Iterator[Process]:
    """``python -m randkit serve REPO --port P --quiet`` until the block ends (then SIGTERM,
    a graceful shutdown, unless the test killed it)."""
    port = free_port()
    log = repo.parent / f"serve-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "randkit",
                "serve",
                str(repo),
                "--port",
                str(port),
                "--quiet",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    process = Process(popen, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(
            process.url,
            lambda: popen.poll() is None,
            180,
            lambda: f"the server did not start: {log.read_text()[-2000:]}",
        )
        yield process
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            popen.wait(timeout=120)


_CLIENTS = threading.local()


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    """POST on this thread's keep-alive client (a new connection per request costs more
    than the request on two cores)."""
    if not hasattr(_CLIENTS, "client"):
        _CLIENTS.client = httpx.Client(timeout=60)
    return _CLIENTS.client.post(url, json=body)  # type: ignore[no-any-return]


def infer_many(url: str, count: int, start: int = 0) -> list[dict[str, Any]]:
    def one(i: int) -> dict[str, Any]:
        response = post(url + INFER, v2_body(x_of(i)))
        assert response.status_code == 200, response.text
        body = response.json()
        predicted = next(o for o in body["outputs"] if o["name"] == "predicted")["data"][0]
        return {"id": body["id"], "version": body["model_version"], "predicted": predicted}

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(start, start + count)))


def send_feedback(url: str, answer: dict[str, Any], label: int) -> httpx.Response:
    return post(url + FEEDBACK, {"id": answer["id"], "label": label})


def label_of(answer: dict[str, Any]) -> int:
    return int(uuid.UUID(answer["id"]).int % 10)  # any label; fixed by the id


def stored_rows(repo: Path) -> dict[str, tuple[str, int, int | None]]:
    with sqlite3.connect(repo / ".randkit" / "ledger.sqlite") as db:
        rows = db.execute("SELECT id, version, predicted, label FROM randkit_predictions")
        return {i: (v, p, label) for i, v, p, label in rows}
