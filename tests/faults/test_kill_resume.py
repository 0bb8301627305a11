"""The SIGKILL table (issue #18): a run killed at a seeded random instant, in the middle of a
checkpoint or metrics write, or through one worker process alone, then resumed with the
same command, ends with the same bytes as an uninterrupted run: every ``model.safetensors``,
``metrics.json`` (less its wall time), ``results.csv`` (less ``fit_seconds``), and no temp
file left. Every runner; the uninterrupted run uses the same runner (its threads per trial).

Kills during a write use ``RANDKIT_CRASH_DURING_WRITE`` (``randkit.atomic``: the process
kills itself with half the bytes on disk); a worker killed mid-trial uses
``RANDKIT_KILL_TRIAL_ONCE`` (``randkit.cv.trial``). ``python tests/faults/test_kill_resume.py``
prints the table for ``docs/faults.md``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, as a script
from conftest import run_cli
from randkit.config import validate_config
from randkit.cv import run_cv

BASE: dict[str, Any] = {
    "seed": 7,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "mlp", "args": {"hidden": [16], "dropout": 0.1}},
    "train": {
        "epochs": 3,
        "batch_size": 128,
        "optimizer": "adamw",
        "lr": 0.01,
        "checkpoint_every": 4,
        "device": "cpu",
    },
    # Streams that must replay on resume: order, input noise, dropout.
    "randomize": {"input_noise": {"kind": "gaussian", "level": 0.05, "p": 0.5}},
}
# Three trials, so a run killed after some leaves a lone trial (issue #18.1: its threads).
CV_EXTRA: dict[str, Any] = {"train": {**BASE["train"], "epochs": 2}, "cv": {"folds": 3}}
STEPS = 3 * 12  # 1437 training examples / 128 per batch = 12 steps an epoch
TIMING = ("fit_seconds",)


@dataclass(frozen=True)
class Kill:
    id: str
    command: str  # train or cv
    runner: str  # cv.runner ("" for train)
    how: str  # random | write | worker-write | worker-trial
    what: str  # for docs/faults.md
    target: str = ""  # the file a write kill hits ("NAME:K"), or the trial a worker runs
    seed: int = 0
    issue: str = ""
    slow: bool = False


KILLS = [
    Kill("train-random-a", "train", "", "random", "2 kills at seeded random instants", seed=1),
    Kill("train-random-b", "train", "", "random", "2 kills at seeded random instants", seed=2,
         slow=True),
    Kill("train-mid-checkpoint", "train", "", "write", "mid-write of the 2nd checkpoint",
         "checkpoint.safetensors:2"),
    Kill("train-mid-state", "train", "", "write", "mid-write of state.json", "state.json:3",
         slow=True),
    Kill("train-mid-metrics", "train", "", "write", "mid-write of metrics.json",
         "metrics.json:1"),
    Kill("cv-sequential-random", "cv", "sequential", "random", "seeded random instant", seed=3),
    Kill("cv-sequential-mid-metrics", "cv", "sequential", "write",
         "mid-write of trial 2's metrics.json", "metrics.json:2"),
    Kill("cv-sequential-mid-model", "cv", "sequential", "write",
         "mid-write of trial 2's model.safetensors", "model.safetensors:2", slow=True),
    Kill("cv-vectorized-random", "cv", "vectorized", "random", "seeded random instant", seed=4,
         slow=True),
    Kill("cv-vectorized-mid-metrics", "cv", "vectorized", "write",
         "mid-write of trial 2's metrics.json", "metrics.json:2", slow=True),
    Kill("cv-processes-random", "cv", "processes", "random", "driver at a seeded random instant",
         seed=5, issue="1", slow=True),
    Kill("cv-processes-worker-mid-metrics", "cv", "processes", "worker-write",
         "one worker alone, mid-write of its 2nd metrics.json: the resume runs a lone trial",
         "metrics.json:2", issue="1"),
    Kill("cv-ray-random", "cv", "ray", "random", "driver at a seeded random instant", seed=6,
         slow=True),
    Kill("cv-ray-worker-mid-trial", "cv", "ray", "worker-trial",
         "one worker alone, mid-trial (Ray retries it)", "f1", issue="1", slow=True),
    Kill("cv-ray-worker-mid-metrics", "cv", "ray", "worker-write",
         "one worker alone, mid-write of its metrics.json", "metrics.json:1", slow=True),
]  # fmt: skip


def _config(folder: Path, kill: Kill) -> Path:
    raw = json.loads(json.dumps(BASE))
    if kill.command == "cv":
        raw.update(json.loads(json.dumps(CV_EXTRA)))
        raw["cv"]["runner"] = kill.runner
    path = folder / f"{kill.command}-{kill.runner or 'train'}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _argv(config: Path, out: Path, command: str) -> list[str]:
    return [sys.executable, "-m", "randkit", command, str(config), "--out", str(out), "--quiet"]


def _env(extra: dict[str, str]) -> dict[str, str]:
    # A local Ray cluster on loopback, as the Ray tests run it.
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def _popen(config: Path, out: Path, command: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _argv(config, out, command),
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _progress(out: Path, command: str) -> int:
    """Steps checkpointed (train) or trials finished (cv) so far."""
    if command == "cv":
        return len(list(out.glob("trials/*/metrics.json")))
    try:
        return int(json.loads((out / "state.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def _kill_at(
    process: subprocess.Popen[str], out: Path, command: str, at: int, delay: float
) -> None:
    """SIGKILL ``delay`` seconds after progress reaches ``at`` (at once if the run ends)."""
    deadline = time.monotonic() + 240
    while _progress(out, command) < at and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    # The pipes close once every process of the run is gone: workers must die with it.
    process.communicate(timeout=60)


def _interrupt(kill: Kill, config: Path, out: Path, scratch: Path) -> None:
    """Run the command once with the fault of ``kill``; assert it died the expected way."""
    if kill.how == "random":
        rng = np.random.default_rng(kill.seed)
        rounds = 2 if kill.command == "train" else 1
        for _ in range(rounds):
            # cv: after 0 or 1 of 3 trials, so the kill lands before the run's end.
            at = (
                int(rng.integers(0, STEPS - 8))
                if kill.command == "train"
                else int(rng.integers(0, 2))
            )
            _kill_at(_popen(config, out, kill.command, {}), out, kill.command, at,
                     float(rng.uniform(0.0, 0.2)))  # fmt: skip
        return
    if kill.how == "write":
        env = {"RANDKIT_CRASH_DURING_WRITE": kill.target}
    elif kill.how == "worker-write":
        env = {"RANDKIT_CRASH_DURING_WRITE": f"{kill.target}:{scratch / 'crashed'}"}
    else:
        env = {"RANDKIT_KILL_TRIAL_ONCE": f"{kill.target}:{scratch / 'crashed'}"}
    done = _popen(config, out, kill.command, env)
    _, stderr = done.communicate(timeout=300)
    if kill.how == "write":
        assert done.returncode == -signal.SIGKILL, stderr
    elif kill.runner == "processes":  # the driver sees its pool broken: one line, exit 1
        assert done.returncode == 1, stderr
        assert stderr.startswith("error: cv.runner 'processes': a worker process died"), stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
    else:  # Ray retries the task: the run finishes on its own
        assert done.returncode == 0, stderr
    if kill.how != "write":
        assert (scratch / "crashed").exists(), "the fault never fired"


def _trial_files(out: Path) -> dict[str, Any]:
    """Every trial's model bytes and metrics (less wall time)."""
    files: dict[str, Any] = {}
    for path in sorted(out.glob("trials/*/*")):
        key = str(path.relative_to(out))
        if path.name == "metrics.json":
            files[key] = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}
        else:
            files[key] = path.read_bytes()
    return files


def _results(out: Path) -> list[list[str]]:
    rows = [line.split(",") for line in (out / "results.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name not in TIMING]
    return [[row[i] for i in keep] for row in rows]


def _outcome(out: Path, command: str) -> dict[str, Any]:
    if command == "train":
        return {
            name: (out / name).read_bytes()
            for name in ("model.safetensors", "metrics.json", "checkpoint.safetensors")
        }
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("runner")  # which runner ran it, by name; the numbers must agree
    return {"trials": _trial_files(out), "results": _results(out), "summary": summary}


_REFERENCES: dict[tuple[str, str, int], dict[str, Any]] = {}


def _reference(kill: Kill, config: Path, folder: Path, threads: int) -> dict[str, Any]:
    """The uninterrupted run's outcome. ``train``: the command itself. ``cv``: in this
    process (no interpreter start, no report), at the threads per trial the killed run
    recorded; by the sequential runner for sequential, processes and Ray, which give the
    same bits at the same threads (tested in test_cv.py), else by the vectorized one."""
    runner = "vectorized" if kill.runner == "vectorized" else "sequential"
    key = (kill.command, runner, threads)
    if key in _REFERENCES:
        return _REFERENCES[key]
    out = folder / f"reference-{kill.command}-{runner}-{threads}"
    if kill.command == "train":
        done = run_cli(*_argv(config, out, kill.command)[3:], env=_env({}))
        assert done.returncode == 0, done.stderr
    else:
        raw = yaml.safe_load(config.read_text())
        raw["cv"].update(runner=runner, threads_per_trial=threads)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)  # the vectorized runner trains on the process's count
        try:
            run_cv(validate_config(raw), out, quiet=True, report=False)
        finally:
            torch.set_num_threads(previous)
    _REFERENCES[key] = _outcome(out, kill.command)
    return _REFERENCES[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("references")


@pytest.mark.parametrize(
    "kill",
    [pytest.param(k, id=k.id, marks=[pytest.mark.slow] if k.slow else []) for k in KILLS],
)
def test_killed_run_resumes_to_the_same_bytes(kill: Kill, tmp_path: Path, references: Path) -> None:
    if kill.runner == "ray":
        pytest.importorskip("ray")
    config = _config(tmp_path, kill)
    out = tmp_path / "run"
    _interrupt(kill, config, out, tmp_path)

    resumed = run_cli(*_argv(config, out, kill.command)[3:], env=_env({}))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr == ""
    threads = 0
    if kill.command == "cv":  # the reference runs on the threads the run recorded
        threads = json.loads((out / "plan.json").read_text())["threads_per_trial"]
    assert _outcome(out, kill.command) == _reference(kill, config, references, threads)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temp file was left"


def test_a_resume_keeps_the_threads_per_trial_the_run_started_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #18.1: the run records its threads per trial; a resume asking for another count
    runs on the recorded one, says so in one warning, and ends with the same bytes."""
    raw = {**json.loads(json.dumps(BASE)), **json.loads(json.dumps(CV_EXTRA))}
    raw["train"]["epochs"] = 1
    raw["cv"].update(folds=2, threads_per_trial=1)
    out = tmp_path / "run"
    run_cv(validate_config(raw), out, quiet=True, report=False)
    expected = (out / "trials" / "f1" / "model.safetensors").read_bytes()
    (out / "trials" / "f1" / "metrics.json").unlink()  # as a kill before it finished
    raw["cv"]["threads_per_trial"] = 2
    resumed = run_cv(validate_config(raw), out, quiet=True, report=False)
    assert resumed.trained == 1
    assert json.loads((out / "plan.json").read_text())["threads_per_trial"] == 1
    assert (out / "trials" / "f1" / "model.safetensors").read_bytes() == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cv.threads_per_trial 2 ignored" in w and " 1 threads" in w for w in warnings)


RAY_STARTS = [  # (id, extra argv, environment, the line begins)
    ("ray-address-silent", ["--address", "127.0.0.1:1"], {},
     "error: cv.runner 'ray': could not reach the Ray cluster at '127.0.0.1:1'"),
    ("ray-local-start-fails", [], {"RAY_TMPDIR": "/proc/no-such-folder"},
     "error: cv.runner 'ray': could not start Ray locally"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "env", "line"), [r[1:] for r in RAY_STARTS],
                         ids=[r[0] for r in RAY_STARTS])  # fmt: skip
def test_a_ray_start_up_failure_is_one_line(
    argv: list[str], env: dict[str, str], line: str, tmp_path: Path
) -> None:
    """Issue #18.10: exit 1 and one line, not Ray's traceback nor its retry log."""
    pytest.importorskip("ray")
    config = _config(tmp_path, next(k for k in KILLS if k.runner == "ray"))
    done = run_cli(*_argv(config, tmp_path / "run", "cv")[3:], *argv, env=_env(env), timeout=120)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(line), done.stderr


def _ray_row(row: tuple[str, list[str], dict[str, str], str]) -> str:
    situation = " ".join([*row[1], *(f"{k}={v}" for k, v in row[2].items())])
    return f"| {row[0]} | `{situation}` | `{row[3]}` |"


def markdown() -> str:
    lines = [
        "## Kills and resume",
        "",
        "Generated from `tests/faults/test_kill_resume.py` (`python "
        "tests/faults/test_kill_resume.py`). Each run is SIGKILLed as the row says, then the "
        "same command runs again; it must exit 0 with every `model.safetensors` and "
        "`metrics.json` (less `fit_seconds`), `results.csv` (less `fit_seconds`) and "
        "`summary.json` equal to an uninterrupted run's (`cv`: the sequential runner's, or "
        "the vectorized one's, at the threads per trial the killed run recorded in "
        "`plan.json`; #18.1), no temp file left, and no worker outliving a killed driver. "
        "A resume asking for another `cv.threads_per_trial` keeps the recorded one, with one "
        "warning (`test_a_resume_keeps_the_threads_per_trial_the_run_started_with`). *slow* "
        "rows run in `make test` too.",
        "",
        "| case | command | runner | killed | issue | slow |",
        "|---|---|---|---|---|---|",
    ]
    for k in KILLS:
        issue = f"#18.{k.issue}" if k.issue else ""
        lines.append(
            f"| {k.id} | {k.command} | {k.runner or ''} | {k.what} | {issue} | "
            f"{'yes' if k.slow else ''} |"
        )
    lines += [
        "",
        "A Ray cluster that does not start is one line and exit code 1 (#18.10), and a Ray run "
        "under `--quiet` prints nothing (every Ray resume above checks an empty stderr):",
        "",
        "| case | situation | the line begins |",
        "|---|---|---|",
        *(_ray_row(r) for r in RAY_STARTS),
    ]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    print(markdown(), end="")
