"""Open a finished run directory: its config, its data split and its trained model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from randkit.config import ExperimentConfig, validate_config
from randkit.data import Prepared, load_and_prepare
from randkit.errors import UserError
from randkit.models import Classifier, build_model
from randkit.streams import Streams
from randkit.train.loop import resolve_device


@dataclass
class TrainedRun:
    out: Path
    cfg: ExperimentConfig
    streams: Streams
    prepared: Prepared
    model: Classifier
    device: torch.device


def load_trained(out: str | Path, device: str | None = None) -> TrainedRun:
    """Rebuild the run's data split (same streams, same split) and load its final weights."""
    out = Path(out)
    config_path, weights_path = out / "config.yaml", out / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(
            "run",
            f"{str(out)!r} is not a finished run (needs config.yaml and "
            "model.safetensors; train it first)",
        )
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError("run", f"{str(config_path)!r} is not valid YAML") from None
    cfg = validate_config(raw, origin=str(config_path))
    streams = Streams(cfg.seed, cfg.seeds)
    prepared = load_and_prepare(cfg.data, streams)
    model = build_model(cfg.model, prepared, streams)
    try:
        weights = load_file(weights_path)
        model.load_state_dict(weights)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError("run", f"{str(weights_path)!r} does not fit the config: {first}") from None
    target = resolve_device(device or cfg.train.device)
    model.to(target).eval()
    return TrainedRun(out, cfg, streams, prepared, model, target)
