"""Model bundles for serving: a folder of JSON and safetensors, never a pickle.

Layout of a bundle, ``REPOSITORY/NAME/VERSION/``:

* ``bundle.json``: what a server needs to rebuild and feed the model(s) (see ``export_bundle``);
* ``model.safetensors`` (one model) or ``models/<trial id>.safetensors`` (an ensemble of the
  fold models of a cross-validation run), each byte-for-byte the run's own file;
* ``code/<module>.py``: a custom model's module when it is a plain file rather than part of
  an installed package (see ``bundle_code``), recorded with its SHA-256 in bundle.json.

Exports are atomic: the bundle is written into a hidden temp folder inside ``REPOSITORY/NAME``,
checked by loading it back, then renamed into place; an existing version is never replaced.
Loading (``bundle_load``, re-exported here) unpickles nothing: it reads JSON and safetensors
and checks every member and the code file against their SHA-256.

Trust note: the architecture is rebuilt from the model section (``mlp``, ``cnn``, ``resnet``,
``text`` or ``package.module:factory``). A custom factory's code runs when a bundle loads:
the bundle's own ``code/<module>.py`` (after its SHA-256 check) or the installed module, as
when training. A SHA-256 guards against corruption, not against whoever wrote the bundle:
load bundles of custom models only from a source you trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

import randkit
from randkit import atomic
from randkit.config import ExperimentConfig, validate_config
from randkit.deploy.bundle_code import code_to_copy, copy_code
from randkit.deploy.bundle_load import BUNDLE_FILE as BUNDLE_FILE
from randkit.deploy.bundle_load import FORMAT as FORMAT
from randkit.deploy.bundle_load import NAME_PATTERN as NAME_PATTERN
from randkit.deploy.bundle_load import PART_PATTERN
from randkit.deploy.bundle_load import LoadedBundle as LoadedBundle
from randkit.deploy.bundle_load import _device as _device
from randkit.deploy.bundle_load import load_bundle as load_bundle
from randkit.deploy.bundle_load import validate_input as validate_input
from randkit.errors import UserError

SINGLE_MEMBER = "model.safetensors"
MEMBERS_DIR = "models"
DEFAULT_SAMPLES = 32
_TEMP_PREFIX = ".tmp-"
Finish = Callable[[Path], dict[str, Any]]  # see export_bundle


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class _Source:
    """What an export copies from a run: model files and the facts bundle.json records."""

    kind: str  # "train" or "cv"
    cfg: ExperimentConfig
    files: dict[str, Path]  # member path in the bundle -> file in the run
    input: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any]
    code: tuple[str, Path] | None = None  # (module, source file) a custom model needs


def check_name(value: object, field: str) -> str:
    """A bundle name or version: one safe path component (nothing can escape the repository)."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise UserError(
            field,
            "must be 1-64 characters from letters, digits, '_', '.', '-', starting with a "
            f"letter or digit, got {value!r}",
        )
    return value


def export_bundle(
    run: str | Path,
    repository: str | Path,
    name: str,
    version: str | None = None,
    ensemble: bool = False,
    finish: Finish | None = None,
) -> Path:
    """Export a finished run as ``repository/name/version/`` and return that folder.

    ``run`` is either a finished ``randkit train`` run (``config.yaml`` + ``model.safetensors``)
    or a finished ``randkit cv`` run (``plan.json`` + ``trials/``). A training run exports its
    one model; ``ensemble=True`` is refused for it. A cross-validation run needs
    ``ensemble=True`` and exports the model of every trial in ``plan.json`` (all must be
    finished and saved, i.e. ``cv.save_models: true``); without it the export is refused
    rather than silently picking one fold. Text cross-validations cannot be ensembled: each
    fold learned its own vocabulary.

    ``version`` defaults to one more than the highest integer version already in
    ``repository/name`` ("1" first). An existing version is refused, never overwritten.
    ``finish(folder)`` (the ONNX export) adds files to the checked bundle before it is renamed
    into place and returns keys for bundle.json; when it raises, no version is left.
    """
    check_name(name, "name")
    if version is not None:
        check_name(version, "version")
    run = Path(run)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise UserError("repository", f"{str(repository)!r} exists and is not a directory")
    family = repository / name
    if family.exists() and not family.is_dir():
        raise UserError("name", f"{str(family)!r} exists and is not a directory")
    if version is not None and (family / version).exists():
        raise UserError(
            "version", f"{version!r} of bundle {name!r} already exists in {str(repository)!r}"
        )
    # Everything that reads the run (and may fail on it) happens before anything is written.
    source = _inspect_run(run, ensemble)
    source.code = code_to_copy(source.cfg.model)

    made = [p for p in (repository, family) if not p.exists()]
    family.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(family)
    if version is None:
        version = _next_version(family)
    try:
        return _publish(source, run, family, name, version, finish)
    except BaseException:
        for folder in reversed(made):  # folders this call created, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _publish(
    source: _Source, run: Path, family: Path, name: str, version: str, finish: Finish | None
) -> Path:
    """Write the bundle into a temp folder of ``family``, load it back, rename it into place."""
    taken = UserError(
        "version", f"{version!r} of bundle {name!r} already exists in {str(family.parent)!r}"
    )
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=family))
    target = family / version
    try:
        meta = _write_members(source, temp)
        meta = {
            "format": FORMAT,
            "name": name,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_run": str(run.resolve()),
            **meta,
        }
        atomic.write_json(temp / BUNDLE_FILE, meta)
        load_bundle(temp)  # the bundle must load (hashes, architecture, weights) before it exists
        if finish is not None:
            atomic.write_json(temp / BUNDLE_FILE, {**meta, **finish(temp)})
        if target.exists():
            raise taken
        try:
            os.rename(temp, target)
        except OSError as exc:  # another export took the version since the check
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise taken from None
        atomic.fsync_dir(family)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        inside = isinstance(exc, OSError) and str(exc.filename or "").startswith(str(temp))
        if isinstance(exc, OSError) and inside:  # name where the file was going, not the temp
            where = str(target) + str(exc.filename)[len(str(temp)) :]
            raise OSError(exc.errno, exc.strerror, where) from exc
        raise
    return target


def _inspect_run(run: Path, ensemble: bool) -> _Source:
    is_cv = (run / "plan.json").is_file() and (run / "trials").is_dir()
    is_train = (run / "config.yaml").is_file() and (run / "model.safetensors").is_file()
    if is_cv:
        if not ensemble:
            raise UserError(
                "ensemble",
                f"{str(run)!r} is a cross-validation run with one model per trial; export them "
                "all as an ensemble with --ensemble (or export a `randkit train` run)",
            )
        return _inspect_cv(run)
    if is_train:
        if ensemble:
            raise UserError(
                "ensemble",
                f"{str(run)!r} is a training run with a single model; --ensemble needs a "
                "cross-validation run (plan.json + trials/)",
            )
        return _inspect_train(run)
    raise UserError(
        "run",
        f"{str(run)!r} is neither a finished training run (config.yaml + model.safetensors) "
        "nor a cross-validation run (plan.json + trials/)",
    )


def _input_section(
    kind: str, shape: list[int], unit_range: bool, vocab_size: int | None
) -> dict[str, Any]:
    return {
        "kind": kind,
        "shape": [int(s) for s in shape],
        "dtype": "int64" if kind == "text" else "float32",
        "value_range": [0, 1] if unit_range else None,
        "vocab_size": vocab_size,
    }


def _inspect_train(run: Path) -> _Source:
    from randkit.train.load import load_trained

    trained = load_trained(run, device="cpu")  # checks that the weights fit the config
    prepared = trained.prepared
    preprocessing = dict(prepared.preprocessing)
    saved = run / "preprocessing.json"
    if saved.is_file():
        try:
            on_disk = json.loads(saved.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError("run", f"{str(saved)!r} is not valid JSON") from None
        if on_disk != preprocessing:
            raise UserError(
                "run",
                f"{str(saved)!r} differs from the preprocessing rebuilt from the data; "
                "the data changed since training",
            )
    return _Source(
        kind="train",
        cfg=trained.cfg,
        files={SINGLE_MEMBER: run / "model.safetensors"},
        input=_input_section(
            prepared.kind, prepared.input_shape, prepared.unit_range, prepared.vocab_size
        ),
        classes=[str(c) for c in prepared.classes],
        preprocessing=preprocessing,
    )


def _inspect_cv(run: Path) -> _Source:
    from randkit.data import load_data
    from randkit.data.base import data_fingerprint

    cfg = _read_config(run / "config.yaml")
    plan_path = run / "plan.json"
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        # Nested CV's inner fits (an "inner" fold) are no members of the fold ensemble.
        trial_ids = [str(t["id"]) for t in plan["trials"] if t.get("inner") is None]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError("run", f"{str(plan_path)!r} is not a readable plan") from None
    if not trial_ids:
        raise UserError("run", f"{str(plan_path)!r} lists no trials")
    unfinished = [t for t in trial_ids if not (run / "trials" / t / "metrics.json").is_file()]
    if unfinished:
        raise UserError(
            "run",
            f"{len(unfinished)} of {len(trial_ids)} trials of {str(run)!r} are not finished "
            f"(first: {unfinished[0]!r}); resume the cross-validation first",
        )
    unsaved = [t for t in trial_ids if not (run / "trials" / t / "model.safetensors").is_file()]
    if unsaved:
        why = " (it ran with cv.save_models: false)" if not cfg.cv.save_models else ""
        raise UserError(
            "run", f"trial {unsaved[0]!r} of {str(run)!r} saved no model{why}; nothing to export"
        )
    if cfg.task != "classification":
        raise UserError(
            "run",
            f"{str(run)!r} is a {cfg.task} run; bundles and the server serve classifiers",
        )
    files = {}
    for trial_id in trial_ids:
        if not PART_PATTERN.fullmatch(trial_id):
            raise UserError("run", f"{str(plan_path)!r} lists an unsafe trial id {trial_id!r}")
        files[f"{MEMBERS_DIR}/{trial_id}.safetensors"] = (
            run / "trials" / trial_id / "model.safetensors"
        )
    if cfg.data.kind == "object":
        return _object_data_source(run, cfg, files)
    data = load_data(cfg.data)
    if data_fingerprint(data) != plan.get("data_hash"):
        raise UserError(
            "run",
            f"the data of {str(run)!r} changed since the cross-validation ran "
            "(its fingerprint differs from plan.json's data_hash)",
        )
    if data.kind == "text":
        raise UserError(
            "ensemble",
            f"{str(run)!r} is a text cross-validation: every fold learned its own vocabulary, "
            "so its models take different inputs; export a `randkit train` run instead",
        )
    assert isinstance(data.inputs, torch.Tensor)
    return _Source(
        kind="cv",
        cfg=cfg,
        files=files,
        input=_input_section(data.kind, list(data.inputs.shape[1:]), data.unit_range, None),
        classes=[str(c) for c in data.classes],
        preprocessing={},
    )


def _object_data_source(run: Path, cfg: ExperimentConfig, files: dict[str, Path]) -> _Source:
    """A run of a Python Dataset or arrays (``randkit.cross_validate``): the data cannot be
    loaded again, so the input and the classes come from its ``summary.json``."""
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        shape, classes = summary["input"], summary["classes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(
            "run", f"{str(run)!r} has no summary.json with input and classes; rerun it"
        ) from None
    section = _input_section(shape["kind"], list(shape["shape"]), shape["unit_range"], None)
    return _Source(
        kind="cv", cfg=cfg, files=files, input=section, classes=classes, preprocessing={}
    )


def _read_config(path: Path) -> ExperimentConfig:
    if not path.is_file():
        raise UserError("run", f"{str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError("run", f"{str(path)!r} is not valid YAML") from None
    return validate_config(raw, origin=str(path))


def _write_members(source: _Source, folder: Path) -> dict[str, Any]:
    """Copy the model files into ``folder``; return the rest of bundle.json."""
    digests = {}
    for member, origin in source.files.items():
        data = origin.read_bytes()
        digests[member] = hashlib.sha256(data).hexdigest()
        atomic.write_bytes(folder / member, data)
    code = None
    if source.code is not None:
        code, text = copy_code(source.cfg.model.name, source.code)
        atomic.write_bytes(folder / code["file"], text)
    randomize = source.cfg.randomize
    noise = randomize.input_noise
    # Test-time augmentation reuses the training augmentation, minus the label-mixing kinds.
    augment = [
        spec.model_dump(mode="json")
        for spec in randomize.augment
        if spec.kind not in ("mixup", "cutmix")
    ]
    weight_noise = randomize.weight_noise.model_dump() if randomize.weight_noise else None
    return {
        "model": source.cfg.model.model_dump(mode="json", include={"name", "args"}),
        "code": code,
        "input": source.input,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "preprocessing": source.preprocessing,
        "members": list(source.files),
        "randomized": {
            "sigma": noise.level if noise is not None and noise.kind == "gaussian" else None,
            "default_mode": None,
            "samples": DEFAULT_SAMPLES,
            "augment": augment,
            "weight_noise": weight_noise,
        },
        "source_kind": source.kind,
        "randkit_version": randkit.__version__,
        "sha256": digests,
    }


def _next_version(family: Path) -> str:
    versions = [int(p.name) for p in family.iterdir() if p.name.isdigit() and p.is_dir()]
    return str(max(versions, default=0) + 1)


def _remove_dead_temps(family: Path) -> None:
    """Delete temp folders of exports whose process died (a crash leaves only these)."""
    for stale in family.glob(f"{_TEMP_PREFIX}*"):
        pid = stale.name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
