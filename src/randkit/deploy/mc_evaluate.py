"""``randkit evaluate RUN --mc KIND:SAMPLES``: uncertainty of a run's Monte-Carlo predictor on
its test split (uncertainty.json and a reliability diagram)."""

from __future__ import annotations

import json
from typing import Any

from randkit import atomic
from randkit.deploy.mc import MC_KINDS, MonteCarlo
from randkit.errors import UserError
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
            "'ensemble' needs the fold models of a cross-validation, which "
            "this version cannot evaluate yet; use dropout, tta or "
            "weight_noise",
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
