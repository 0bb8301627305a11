"""Shared fixtures: small, fast experiment configs written to temp folders."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

# Keep tests away from the user's cache.
os.environ.setdefault("RANDKIT_CACHE", tempfile.mkdtemp(prefix="randkit-test-cache-"))

FAST_EXPERIMENT: dict[str, Any] = {
    "seed": 3,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "mlp", "args": {"hidden": [32], "dropout": 0.1}},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.01, "device": "cpu"},
}


def write_config(folder: Path, raw: dict[str, Any], name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


def merged(base: dict[str, Any], **sections: dict[str, Any] | Any) -> dict[str, Any]:
    """``base`` with top-level sections updated key by key."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``randkit ARGS`` in a fresh interpreter, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "randkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, FAST_EXPERIMENT)


@pytest.fixture(scope="session")
def serve_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository for the server tests (see tests/serve_support.py)."""
    from serve_support import build_repository

    return build_repository(tmp_path_factory.mktemp("serve"))
