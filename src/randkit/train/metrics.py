"""Evaluation metrics: loss, accuracy, macro-F1."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.nn import functional as F

from randkit.data import TensorData


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Logits for ``x`` in eval mode, batch by batch, returned on the CPU."""
    was_training = model.training
    model.eval()
    try:
        parts = [
            model(x[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    per_class_f1: np.ndarray | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (zero for a class never predicted nor present).
    ``per_class_f1``: the F1 of each class when the caller has it already (scikit-learn's
    macro average is their plain mean), which saves computing it again."""
    predicted = logits.argmax(dim=1)
    if per_class_f1 is None:
        macro_f1 = f1_score(
            targets.numpy(),
            predicted.numpy(),
            labels=list(range(num_classes)),
            average="macro",
            zero_division=0,
        )
    else:
        macro_f1 = np.mean(per_class_f1)
    return {
        "loss": float(F.cross_entropy(logits, targets)),
        "accuracy": float((predicted == targets).float().mean()),
        "macro_f1": float(macro_f1),
    }


def evaluate(
    model: nn.Module, data: TensorData, num_classes: int, device: torch.device
) -> dict[str, float]:
    return classification_metrics(predict_logits(model, data.x, device), data.y, num_classes)
