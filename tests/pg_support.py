"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` into a temporary folder,
listening on 127.0.0.1 (and a socket in that folder) on a free port, with trust
authentication, stopped and deleted afterwards.

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user
(or ``nobody``); its folder is created under /tmp, which that user can reach (pytest's
own temporary folders are private to root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from serve_support import free_port


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
