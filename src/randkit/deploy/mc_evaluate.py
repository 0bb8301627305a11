"""``randkit evaluate RUN --mc KIND:SAMPLES``: uncertainty of a run's Monte-Carlo predictor on
its test split (uncertainty.json and a reliability diagram)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from randkit import atomic
from randkit.deploy.mc import MC_KINDS, MonteCarlo
from randkit.errors import UserError
from randkit.extras import require
from randkit.randomize.base import Compose
from randkit.randomize.build import build_randomization
from randkit.train.load import TrainedRun


def parse_mc(spec: str) -> tuple[str, int]:
    """``"dropout:32"`` -> ("dropout", 32)."""
    kind, _, samples = spec.partition(":")
    if kind not in MC_KINDS:
        raise UserError("--mc", f"kind must be one of {', '.join(MC_KINDS)}, got {spec!r}")
    if kind == "ensemble":
        return kind, 0
    try:
        count = int(samples)
    except ValueError:
        raise UserError("--mc", f"expected KIND:SAMPLES such as dropout:32, got {spec!r}") from None
    if count < 1:
        raise UserError("--mc", f"samples must be >= 1, got {count}")
    return kind, count


def predictor(trained: TrainedRun, kind: str, samples: int) -> MonteCarlo:
    cfg = trained.cfg
    if kind == "ensemble":
        raise UserError(
            "--mc",
            "'ensemble' needs a cross-validation run (its fold models), not a training "
            "run; set cv.holdout_fraction and evaluate the cv run directory",
        )
    if kind == "tta":
        plan = build_randomization(
            cfg.randomize,
            len(trained.prepared.classes),
            trained.prepared.input_shape,
            trained.prepared.unit_range,
        )
        usable = [
            t for t in (plan.augment.transforms if plan.augment else []) if not t.mixes_labels
        ]
        if not usable:
            raise UserError(
                "--mc",
                "'tta' needs randomize.augment (other than mixup/cutmix) in the run's config",
            )
        return MonteCarlo(trained.model, "tta", samples, transforms=Compose(usable))
    if kind == "weight_noise":
        spec = cfg.randomize.weight_noise
        std, relative = (spec.std, spec.relative) if spec else (0.01, True)
        return MonteCarlo(trained.model, "weight_noise", samples, noise_std=std, relative=relative)
    return MonteCarlo(trained.model, "dropout", samples)


def evaluate_mc(trained: TrainedRun, specs: list[str], seed: int) -> dict[str, Any]:
    """Reports per MC kind, merged into RUN/uncertainty.json; one reliability PNG per kind."""
    require("report", "randkit evaluate --mc")  # draws its figure with matplotlib
    from randkit.deploy.uncertainty import reliability_png, uncertainty_report

    test = trained.prepared.test
    path = trained.out / "uncertainty.json"
    merged: dict[str, Any] = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {}
    for spec in specs:
        kind, samples = parse_mc(spec)
        result = predictor(trained, kind, samples).predict(test.x, seed=seed)
        report = uncertainty_report(result.probs, test.y.numpy())
        report.update(
            {
                "samples": samples,
                "seed": seed,
                "mean_entropy": float(result.entropy.mean()),
                "mean_mutual_information": float(result.mutual_information.mean()),
                "mean_variance": float(result.variance.mean()),
            }
        )
        merged[kind] = report
        png = trained.out / f"reliability-{kind}.png"
        atomic.write_bytes(png, reliability_png(report, title=f"Reliability, MC {kind}"))
    atomic.write_json(path, merged)
    return merged


def evaluate_cv_ensemble(run: Path) -> dict[str, Any]:
    """The ensemble of a cross-validation's fold models on the run's held-out part
    (``cv.holdout_fraction``), merged into RUN/uncertainty.json."""
    require("report", "the ensemble evaluation")  # draws its figure with matplotlib
    import yaml

    from randkit.config import validate_config
    from randkit.cv.plan import Plan
    from randkit.data import load_data
    from randkit.data.base import data_fingerprint
    from randkit.deploy.uncertainty import reliability_png, uncertainty_report

    cfg = validate_config(yaml.safe_load((run / "config.yaml").read_text()))
    raw_plan = json.loads((run / "plan.json").read_text())
    plan = Plan.from_json(raw_plan)
    if not len(plan.holdout):
        raise UserError(
            "--mc",
            "'ensemble' needs a held-out part: set cv.holdout_fraction > 0 "
            "and run the cross-validation again",
        )
    data = load_data(cfg.data)
    if data_fingerprint(data) != raw_plan.get("data_hash"):
        raise UserError("run", f"the data of {str(run)!r} changed since the cross-validation")
    if data.kind == "text":
        raise UserError(
            "--mc", "'ensemble' of text models is not supported (each fold has its own vocabulary)"
        )
    models = _fold_models(run, cfg, plan, data)
    index = torch.as_tensor(plan.holdout)
    result = MonteCarlo(models, "ensemble").predict(data.inputs[index])
    report = uncertainty_report(result.probs, data.targets[index].numpy())
    report.update(
        {
            "members": len(models),
            "holdout_size": len(index),
            "mean_entropy": float(result.entropy.mean()),
            "mean_mutual_information": float(result.mutual_information.mean()),
            "mean_variance": float(result.variance.mean()),
        }
    )
    path = run / "uncertainty.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged["ensemble"] = report
    atomic.write_bytes(
        run / "reliability-ensemble.png",
        reliability_png(report, title="Reliability, fold-model ensemble"),
    )
    atomic.write_json(path, merged)
    return merged


def _fold_models(run: Path, cfg: Any, plan: Any, data: Any) -> list[torch.nn.Module]:
    """The saved model of every trial of the plan, rebuilt as its trial built it."""
    from safetensors.torch import load_file

    from randkit.cv.trial import prepare_trial
    from randkit.models import build_model
    from randkit.streams import ScopedStreams, Streams

    streams = Streams(cfg.seed, cfg.seeds)
    models = []
    for trial in (t for t in plan.trials if t.inner is None):  # not nested CV's inner fits
        weights = run / "trials" / trial.id / "model.safetensors"
        if not weights.is_file():
            raise UserError(
                "run",
                f"trial {trial.id} has no saved model (unfinished, or cv.save_models was false)",
            )
        scoped = ScopedStreams(streams, trial.scopes())
        model = build_model(cfg.model, prepare_trial(cfg, data, trial, scoped), scoped)
        model.load_state_dict(load_file(weights))
        models.append(model.eval())
    return models
