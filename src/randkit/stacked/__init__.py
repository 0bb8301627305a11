"""Many models of one architecture trained at once: the stacked forward (batched matmuls and
grouped convolutions on PyTorch's kernels, else ``vmap``), the stacked optimizer and the
stacked trainer. Knows nothing of cross-validation: a caller hands it models and members
(streams and data) and reads back weights, histories and test logits."""

from __future__ import annotations

from torch import nn

from randkit.errors import UserError
from randkit.randomize.modules import GLOBAL_RNG_LAYERS
from randkit.stacked.forward import StackedForward
from randkit.stacked.optim import StackedOptimizer
from randkit.stacked.trainer import Member, StackedTrainer


def check_stackable(model: nn.Module, optimizer: str, field: str) -> None:
    """Refuse, naming the layer or setting, what cannot be trained stacked; ``field`` is the
    setting the message names (the caller's choice of engine)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UserError(
                field,
                f"the vectorized runner cannot train layer {name!r} "
                f"({type(module).__name__}: batch statistics are shared state); use "
                "GroupNorm (resnet norm: group) or another runner",
            )
        if isinstance(module, GLOBAL_RNG_LAYERS):
            raise UserError(
                field,
                f"the vectorized runner cannot train layer {name!r} "
                f"({type(module).__name__} draws from torch's global RNG); use "
                "randkit.randomize.Dropout or another runner",
            )
    if optimizer == "zo-sgd":
        raise UserError(
            field,
            "the vectorized runner does not support train.optimizer 'zo-sgd'; use another runner",
        )


__all__ = ["Member", "StackedForward", "StackedOptimizer", "StackedTrainer", "check_stackable"]
