"""From the ``randomize:`` config section to the objects the training loop uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from randkit.config import RandomizeConfig
from randkit.errors import UserError
from randkit.randomize.base import BatchTransform, Compose
from randkit.randomize.geometric import (
    HorizontalFlip,
    RandomAffine,
    RandomCrop,
    RandomResizedCrop,
    VerticalFlip,
)
from randkit.randomize.mixing import CutMix, Mixup
from randkit.randomize.noise import InputNoise
from randkit.randomize.photometric import ColorJitter, RandomErasing
from randkit.randomize.weights import GradientNoise


@dataclass
class Randomization:
    """What the training loop applies at each step."""

    augment: Compose | None = None
    input_noise: InputNoise | None = None
    weight_noise_std: float = 0.0
    weight_noise_relative: bool = False
    drop_connect: float = 0.0
    grad_noise: GradientNoise | None = None

    @property
    def perturbs_weights(self) -> bool:
        return self.weight_noise_std > 0 or self.drop_connect > 0


def build_transform(spec) -> BatchTransform:  # type: ignore[no-untyped-def]
    options = spec.model_dump(exclude={"kind"})
    kind = spec.kind
    if kind == "crop":
        return RandomCrop(**options)
    if kind == "hflip":
        return HorizontalFlip(**options)
    if kind == "vflip":
        return VerticalFlip(**options)
    if kind == "resized_crop":
        return RandomResizedCrop(**options)
    if kind == "affine":
        return RandomAffine(**options)
    if kind == "color":
        return ColorJitter(**options)
    if kind == "erasing":
        return RandomErasing(**options)
    if kind == "mixup":
        return Mixup(**options)
    return CutMix(**options)


def build_randomization(
    cfg: RandomizeConfig, num_classes: int, input_shape: list[int], unit_range: bool = True
) -> Randomization:
    """Objects for the loop; an impossible setting is a UserError naming its config path."""
    transforms = []
    for index, spec in enumerate(cfg.augment):
        if len(input_shape) != 3:
            raise UserError(
                f"randomize.augment.{index}",
                f"{spec.kind!r} needs images (C, H, W), got input shape {input_shape}",
            )
        try:
            transforms.append(build_transform(spec))
        except ValueError as exc:
            raise UserError(f"randomize.augment.{index}", str(exc)) from None
    noise = None
    if cfg.input_noise is not None:
        try:
            spec = cfg.input_noise.model_dump()
            # Clipping to [0, 1] only makes sense for data known to lie there.
            spec["clip"] = unit_range if spec["clip"] is None else spec["clip"]
            noise = InputNoise(**spec)
        except ValueError as exc:
            raise UserError("randomize.input_noise", str(exc)) from None
    grad = GradientNoise(cfg.grad_noise.eta, cfg.grad_noise.gamma) if cfg.grad_noise else None
    return Randomization(
        augment=Compose(transforms, num_classes=num_classes) if transforms else None,
        input_noise=noise,
        weight_noise_std=cfg.weight_noise.std if cfg.weight_noise else 0.0,
        weight_noise_relative=cfg.weight_noise.relative if cfg.weight_noise else False,
        drop_connect=cfg.drop_connect,
        grad_noise=grad,
    )


def preflight(model: torch.nn.Module, plan: Randomization, sample: torch.Tensor) -> torch.Tensor:
    """Run the augmentation and one forward pass on a couple of training examples, so that a
    setting that only fails at run time fails before anything is written; returns the
    outputs (their width is checked against the task by ``train.tasks.check_output_width``)."""
    generator = torch.Generator().manual_seed(0)  # a throwaway generator: nothing is kept
    x = sample
    if plan.augment is not None:
        try:
            x = plan.augment(x, generator)
        except (ValueError, RuntimeError) as exc:
            raise UserError("randomize.augment", str(exc).splitlines()[0]) from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(x)
    except (ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError("model", f"forward pass fails on input {list(x.shape)}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(outputs, torch.Tensor):
        raise UserError(
            "model", f"forward must return a tensor of outputs, got {type(outputs).__name__}"
        )
    return outputs
