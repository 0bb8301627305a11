"""The disk-fault table (issue #18.6): a full disk and a read-only output folder under
``train``, ``cv``, ``export`` and ``certify`` give exit code 1 (not 2: not the user's input),
exactly one line on stderr naming the path and the cause, and nothing partial: the fault
folder holds what it held before (a previous checkpoint or finished trials intact, no temp
file or folder). Once the fault is lifted, the same command finishes.

As root (Linux), the fault folder is a real small tmpfs, filled up or remounted read-only.
Elsewhere a full disk is a write hook (``randkit.atomic``'s files refuse bytes beyond a
budget, as the kernel does: ENOSPC with no file name) and a read-only folder is chmod 0555.
Cases run in-process (``randkit.cli.main``), as the bad-input table does.
``python tests/faults/test_disk_faults.py`` prints the table for ``docs/faults.md``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, as a script
from conftest import run_cli
from randkit import atomic
from randkit.cli import main

RAW: dict[str, Any] = {
    "seed": 11,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.01, "checkpoint_every": 4, "device": "cpu"},
    "cv": {"folds": 2, "runner": "sequential"},
}
CAUSES = {
    "full": ("No space left on device", "ENOSPC"),
    "readonly": ("Read-only file system", "EROFS", "Permission denied", "EACCES"),
}


def _can_mount() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"randkit-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                              capture_output=True, check=False)  # fmt: skip
        if made.returncode == 0:
            subprocess.run(["umount", str(probe)], check=True)
        return made.returncode == 0
    finally:
        probe.rmdir()


# RANDKIT_TEST_NO_MOUNT=1 tries the fallback (a write hook, chmod) where mounting works.
MOUNT = not os.environ.get("RANDKIT_TEST_NO_MOUNT") and _can_mount()


# -- the fault folder ---------------------------------------------------------------------------
class Disk:
    """A folder on storage the test can fill up or make read-only, and give back."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path, self.monkeypatch = path, monkeypatch
        path.mkdir()
        if MOUNT:
            _sh("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path))

    def fill(self) -> None:
        """No byte left (a filler file takes the rest), or a write budget of zero."""
        if MOUNT:
            filler = self.path / ".filler"
            with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as handle:
                while True:  # until ENOSPC
                    handle.write(b"\0" * 4096)
        else:
            self.monkeypatch.setattr(atomic, "open", _limited_open(), raising=False)

    def read_only(self) -> None:
        if MOUNT:
            _sh("mount", "-o", "remount,ro", str(self.path))
        else:
            for folder, _, _ in os.walk(self.path):
                os.chmod(folder, 0o555)

    def lift(self) -> None:
        if MOUNT:
            _sh("mount", "-o", "remount,rw", str(self.path))
            (self.path / ".filler").unlink(missing_ok=True)
        else:
            self.monkeypatch.delattr(atomic, "open", raising=False)
            for folder, _, _ in os.walk(self.path):
                os.chmod(folder, 0o755)

    def close(self) -> None:
        if MOUNT:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class _Limited:
    """A file that refuses every byte, as a full disk does (errno only, no file name)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def _limited_open() -> Callable[..., Any]:
    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(file, mode, *args, **kwargs)
        return _Limited(handle) if "w" in mode else handle

    return opened


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder under ``folder`` (the filler aside)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
        if p.name != ".filler"
    }


# -- the cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """Made once: a config, a finished training run, and the runs' half-done states."""

    config: Path
    trained: Path  # a finished `randkit train` run (export's and certify's input)
    partial_train: Path  # a checkpoint at step 4 of 24, as a killed run leaves it
    partial_cv: Path  # one trial of two finished


@dataclass(frozen=True)
class DiskCase:
    id: str
    command: str
    fault: str  # full | readonly
    what: str  # for docs/faults.md
    seed_folder: Callable[[Sources], Path | None]  # copied into the fault folder first
    argv: Callable[[Sources, Path], list[str]]


def _run(command: str) -> Callable[[Sources, Path], list[str]]:
    return lambda s, d: [command, str(s.config), "--out", str(d / "run"), "--quiet"]


def _export(s: Sources, d: Path) -> list[str]:
    return ["export", str(s.trained), "--repository", str(d / "repo"), "--name", "digits"]


def _certify(s: Sources, d: Path) -> list[str]:
    return ["certify", str(s.trained), "--sigma", "0.25", "--n0", "10", "--n", "50",
            "--max", "2", "--out", str(d / "cert" / "certify.tsv"), "--quiet"]  # fmt: skip


def _empty_repo(s: Sources) -> Path:
    return s.config.parent / "empty"


CASES = [
    DiskCase("train-full", "train", "full", "resume onto a full disk",
             lambda s: s.partial_train, _run("train")),
    DiskCase("train-readonly", "train", "readonly", "resume in a read-only --out",
             lambda s: s.partial_train, _run("train")),
    DiskCase("cv-full", "cv", "full", "resume onto a full disk (1 of 2 trials done)",
             lambda s: s.partial_cv, _run("cv")),
    DiskCase("cv-readonly", "cv", "readonly", "resume in a read-only --out",
             lambda s: s.partial_cv, _run("cv")),
    DiskCase("export-full", "export", "full", "a repository on a full disk",
             _empty_repo, _export),
    DiskCase("export-readonly", "export", "readonly", "a read-only repository",
             _empty_repo, _export),
    DiskCase("certify-full", "certify", "full", "--out on a full disk", _empty_repo, _certify),
    DiskCase("certify-readonly", "certify", "readonly", "--out in a read-only folder",
             _empty_repo, _certify),
]  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    base = tmp_path_factory.mktemp("disk-sources")
    config = base / "exp.yaml"
    config.write_text(yaml.safe_dump(RAW))
    trained, partial_cv = base / "trained", base / "partial-cv"
    assert main(["train", str(config), "--out", str(trained), "--quiet"]) == 0
    assert main(["cv", str(config), "--out", str(partial_cv), "--quiet"]) == 0
    shutil.rmtree(partial_cv / "trials" / "f1")  # as a kill after the first trial leaves it
    for name in ("results.csv", "summary.json", "report.html"):
        (partial_cv / name).unlink(missing_ok=True)
    partial_train = base / "partial-train"  # killed writing its 2nd checkpoint
    crash = {"RANDKIT_CRASH_DURING_WRITE": "checkpoint.safetensors:2"}
    killed = run_cli(*_run("train")(Sources(config, trained, base, base), base), env=crash)
    assert killed.returncode == -9, killed.stderr
    (base / "run").rename(partial_train)
    atomic.remove_stale_temps(partial_train)
    (base / "empty").mkdir()
    return Sources(config, trained, partial_train, partial_cv)


@contextlib.contextmanager
def _disk(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    disk = Disk(path, monkeypatch)
    try:
        yield disk
    finally:
        disk.lift()
        disk.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_disk_fault_is_one_line_and_leaves_nothing_partial(
    case: DiskCase,
    sources: Sources,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not MOUNT and case.fault == "readonly" and os.geteuid() == 0:
        pytest.skip("root ignores permissions, and mounting is off")
    with _disk(tmp_path / "disk", monkeypatch) as disk:
        seed = case.seed_folder(sources)
        if seed is not None and seed.name != "empty":
            shutil.copytree(seed, disk.path / "run")
        if case.command == "export":
            (disk.path / "repo").mkdir()
        if case.command == "certify":
            (disk.path / "cert").mkdir()
        before = _tree(disk.path)
        disk.fill() if case.fault == "full" else disk.read_only()
        capsys.readouterr()

        code = main(case.argv(sources, disk.path))
        err = capsys.readouterr().err
        assert code == 1, err
        assert len(err.strip().splitlines()) == 1, err
        line = err.strip()
        assert line.startswith(f"error: {disk.path}/"), line  # names the path...
        assert any(cause in line for cause in CAUSES[case.fault]), line  # ...and the cause
        assert atomic.TEMP_MARK not in line, line  # a path the user will find, not a temp's
        disk.lift()
        assert _tree(disk.path) == before  # nothing partial, the previous state intact

        assert main(case.argv(sources, disk.path)) == 0, capsys.readouterr().err


def test_a_disk_filling_up_mid_training_keeps_the_last_checkpoint(
    sources: Sources, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills between two checkpoints: the earlier one survives and resumes to the
    uninterrupted run's bytes (real tmpfs only: its size is the budget)."""
    if not MOUNT:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    # 4 KiB pages: config, one checkpoint, state.json; the next checkpoint's temp file fails.
    _sh("mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk))
    try:
        argv = ["train", str(sources.config), "--out", str(disk / "run"), "--quiet"]
        assert main(argv) == 1
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"error: {disk}/run/") and "ENOSPC" in line, line
        state = json.loads((disk / "run" / "state.json").read_text())
        assert 0 < state["step"] < 24
        assert not [p for p in (disk / "run").iterdir() if atomic.TEMP_MARK in p.name]
        _sh("mount", "-o", "remount,size=8m", str(disk))
        assert main(argv) == 0, capsys.readouterr().err
        for name in ("model.safetensors", "metrics.json"):
            assert (disk / "run" / name).read_bytes() == (sources.trained / name).read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def markdown() -> str:
    how = (
        "a small tmpfs filled up or remounted read-only (as root), else a write hook and chmod 0555"
    )
    lines = [
        "## Full disk and read-only folder",
        "",
        "Generated from `tests/faults/test_disk_faults.py` (`python "
        f"tests/faults/test_disk_faults.py`); the fault folder is {how}. Each case exits 1 "
        "with exactly one line on stderr, `error: PATH: CAUSE (ERRNO)`, naming a path inside "
        "the fault folder; the folder holds the same files, byte for byte, as before the "
        "command (no temp file or folder, the previous checkpoint or finished trials intact); "
        "once the fault is lifted the same command exits 0.",
        "",
        "| case | command | fault | situation |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        lines.append(f"| {c.id} | {c.command} | {c.fault} | {c.what} |")
    lines.append(
        "| mid-training | train | full | the disk fills between two checkpoints: exit 1, the "
        "earlier checkpoint kept, the resumed run's bytes equal an uninterrupted run's |"
    )
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    print(markdown(), end="")
