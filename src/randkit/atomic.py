"""Atomic file writes: temp file in the same folder, fsync, os.replace.

A reader (or a resumed run) sees either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as safetensors_bytes

TEMP_MARK = ".tmp-"

# Fault injection for the kill-during-write tests: "NAME:K" makes the process SIGKILL itself
# halfway through writing the K-th file called NAME (after half its bytes reached the disk);
# "NAME:K:MARKER" does it once across processes (MARKER records it: a retried worker lives).
_CRASH_ENV = "RANDKIT_CRASH_DURING_WRITE"
_write_counts: dict[str, int] = {}


def _maybe_crash(path: Path, handle: Any, data: bytes) -> None:
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    name, nth, marker = [*spec.split(":", 2), ""][:3]
    if name != path.name or (marker and os.path.exists(marker)):
        return
    _write_counts[name] = _write_counts.get(name, 0) + 1
    if _write_counts[name] == int(nth):
        if marker:
            Path(marker).write_text("crashed")
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            _maybe_crash(path, handle, data)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # never made, or a read-only folder: keep exc
            temp.unlink()
        if isinstance(exc, OSError) and _names(exc, None, temp):
            # write/fsync errors name no file, and the temp name means nothing to a user
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


def _names(exc: OSError, *paths: Path | None) -> bool:
    """Whether ``exc`` names one of ``paths`` (None: no file), as str or as path object."""
    named = None if exc.filename is None else os.fspath(exc.filename)
    return any(named == (None if p is None else os.fspath(p)) for p in paths)


def write_files(files: dict[Path, bytes]) -> None:
    """Write several files that belong together: every temp file first, then the renames, so
    that a full disk or a read-only folder leaves the old set (or none), not half a new one."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            temp = path.with_name(f".{path.name}{TEMP_MARK}set-{os.getpid()}")
            temps.append((temp, path))
            try:
                write_bytes(temp, data)
            except OSError as exc:
                if not _names(exc, temp):
                    raise
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
        for temp, path in temps:
            os.replace(temp, path)
    except BaseException:
        for temp, _ in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
        raise
    for folder in {path.parent for path in files}:
        fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, compact: bool = False) -> None:
    """Indented JSON, or ``compact``: one line, for machine files with long lists (only
    without indent does ``json`` use its C encoder, much faster on a plan's indices)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)
    write_text(path, text + "\n")


# LibYAML's emitter where PyYAML was built with it: the same text, faster
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.dump(obj, Dumper=SAFE_DUMPER, sort_keys=False))


METADATA_KEY = "randkit"


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save tensors as safetensors, atomically. Tensors are copied to contiguous CPU memory.

    ``metadata`` is stored as one JSON string under the key ``randkit``: safetensors keeps
    metadata in a hash map whose order varies between processes, and a single key keeps the
    file's bytes reproducible. Key order is kept, so JSON read back is written back the same.
    """
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata)} if metadata else None
    write_bytes(path, safetensors_bytes(plain, metadata=header))


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata written by ``write_safetensors``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def remove_stale_temps(folder: str | Path) -> None:
    """Delete temp files left by a process killed mid-write."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f".*{TEMP_MARK}*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
