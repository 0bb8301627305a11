"""The single-model training loop. Its rules (which stream each draw comes from, noise,
clipping, schedules, early stopping) live in ``train/rules.py``, shared with the stacked
trainer. Every draw is keyed by (epoch, step), so the loop resumes bit-exactly at any step
from a checkpoint."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import Dataset

from randkit.config import ExperimentConfig, TrainConfig
from randkit.data import Prepared, TensorData
from randkit.models import Classifier, build_model
from randkit.randomize import Randomization, ZerothOrderSGD
from randkit.randomize.build import build_randomization
from randkit.randomize.modules import randomness_needs
from randkit.streams import ScopedStreams, Streams
from randkit.train import rules
from randkit.train.batches import batch_source, predict
from randkit.train.checkpoint import optimizer_from_flat, strip_prefix
from randkit.train.metrics import evaluate
from randkit.train.optim import make_optimizer, make_scheduler
from randkit.train.parts import UserParts
from randkit.train.rules import LoopState
from randkit.train.tasks import default_loss, metric_targets, task_metrics, user_metrics

ProgressHook = Callable[[LoopState, float], None]
CheckpointHook = Callable[["Trainer"], None]


def model_and_randomization(
    cfg: ExperimentConfig, prepared: Prepared, streams: Streams | ScopedStreams
) -> tuple[Classifier, Randomization]:
    """The model (weights from stream ``init``) and the training randomization of ``cfg``
    for one prepared split: what every trainer of a run or trial starts from."""
    model = build_model(cfg.model, prepared, streams, init=cfg.randomize.init)
    randomization = build_randomization(
        cfg.randomize, len(prepared.classes), prepared.input_shape, prepared.unit_range
    )
    return model, randomization


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from randkit.errors import UserError

        raise UserError("train.device", "'cuda' asked for but no CUDA device is available")
    return torch.device(name)


class Trainer:
    """Trains one model on one split. ``coords`` (e.g. fold, repeat) key every stream."""

    def __init__(
        self,
        model: nn.Module,
        train: TensorData | Dataset[Any],
        val: TensorData | Dataset[Any] | None,
        num_classes: int,
        cfg: TrainConfig,
        streams: Streams,
        device: torch.device,
        randomization: Randomization | None = None,
        parts: UserParts | None = None,
        **coords: int,
    ) -> None:
        self.cfg = cfg
        self.parts = parts or UserParts()
        self.randomization = randomization or Randomization()
        self._randomness_needs = randomness_needs(model)
        self.streams = streams
        self.coords = coords
        self.device = device
        self.model = model.to(device)
        self.train_data = train
        self.val_data = val
        self.num_classes = num_classes
        self.steps_per_epoch = rules.steps_per_epoch(len(train), cfg.batch_size)
        self.batches = batch_source(train, cfg.batch_size, self.parts.num_workers, self.parts.task)
        self._scheduler_per_step = True
        if self.parts.optimizer is not None:
            self.optimizer = self.parts.make_optimizer(self.model)
        else:
            self.optimizer = make_optimizer(self.model, cfg)
        if self.parts.scheduler is not None:
            self.scheduler, self._scheduler_per_step = self.parts.make_scheduler(self.optimizer)
        else:
            self.scheduler = make_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.loss_fn = self.parts.loss or training_loss(self.parts.task, cfg.label_smoothing)
        self.state = LoopState()
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def finished(self) -> bool:
        return self.state.stopped_early or self.state.epoch >= self.cfg.epochs

    # -- checkpoint state -------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Extra tensors and JSON state to checkpoint (model and optimizer are saved by the
        caller)."""
        extra = {f"best.{k}": v for k, v in (self.best_weights or {}).items()}
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        return extra, {"loop": self.state.to_json(), "scheduler": scheduler}

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.model.load_state_dict(strip_prefix(tensors, "model."))
        optimizer_from_flat(self.optimizer, tensors, state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        best = strip_prefix(tensors, "best.")
        self.best_weights = best or None
        self.state = LoopState(**state["loop"])

    # -- the loop -----------------------------------------------------------------------
    def stop(self) -> None:
        """End training after this epoch (what a callback calls to stop early)."""
        self.state.stopped_early = True

    def fit(
        self,
        on_step: ProgressHook | None = None,
        on_checkpoint: CheckpointHook | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        """Train to the end; ``on_epoch(history_row)`` after every epoch (progress bars)."""
        cfg, state = self.cfg, self.state
        self.model.train()
        self._callbacks("on_train_start")
        while not self.finished:
            order = self.batch_order(state.epoch)
            loader = self.batches.epoch(order, state.step_in_epoch, self._loader_generator())
            for batch, (xb, yb) in enumerate(loader, start=state.step_in_epoch):
                loss, correct = self._step(xb.to(self.device), yb.to(self.device))
                rules.record_step(state, loss * len(yb), correct, len(yb))
                state.step_in_epoch = batch + 1
                state.global_step += 1
                if on_step is not None:
                    on_step(state, loss)
                self._callbacks("on_step_end", state.global_step, loss)
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    if state.step_in_epoch < self.steps_per_epoch and on_checkpoint:
                        on_checkpoint(self)
            self._end_epoch()
            if on_checkpoint is not None:
                on_checkpoint(self)
            if on_epoch is not None:
                on_epoch(state.history[-1])
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)

    def _loader_generator(self) -> torch.Generator | None:
        """Seeds of DataLoader workers (random transforms inside a Dataset), per epoch."""
        if not self.batches.streamed:
            return None
        return self.streams.torch("augment", what="loader", epoch=self.state.epoch, **self.coords)

    def _callbacks(self, hook: str, *args: Any) -> None:
        for callback in self.parts.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def batch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of the training examples for ``epoch``, from stream ``order``."""
        return rules.batch_order(self.streams, len(self.train_data), epoch, self.coords)

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, int]:
        """One optimizer step. Every random draw is keyed by (epoch, step) and ``coords``."""
        keys = rules.step_keys(self.state.epoch, self.state.global_step, self.coords)
        plan = self.randomization
        xb, targets = rules.randomize_inputs(plan, self.streams, xb, yb, keys, self.device)
        if isinstance(self.optimizer, ZerothOrderSGD):
            loss, logits = self._zeroth_order_step(xb, targets, keys)
        else:
            with self._stochastic_layers(keys):
                logits = self._forward(xb, keys)
                loss = self.loss_fn(logits, targets)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            rules.add_gradient_noise(plan, grads, self.streams, keys, self.device)
            if self.cfg.grad_clip is not None:
                rules.clip_gradients([g.unsqueeze(0) for g in grads], self.cfg.grad_clip)
            self.optimizer.step()
        if self.scheduler is not None and self._scheduler_per_step:
            self.scheduler.step()
        if self.parts.task != "classification":
            return float(loss.detach()), 0
        return float(loss.detach()), int((logits.argmax(1) == yb).sum())

    def _stochastic_layers(self, keys: dict[str, int]) -> Any:
        return rules.stochastic_layers(self.streams, keys, self.device, self._randomness_needs)

    def _forward(self, xb: torch.Tensor, keys: dict[str, int]) -> torch.Tensor:
        plan = self.randomization
        if not plan.perturbs_weights:
            return self.model(xb)
        generator = rules.weight_noise_generator(self.streams, keys, self.device)
        named = list(self.model.named_parameters())
        parts = rules.perturbed_weights(named, plan, generator)
        weights = {n: rules.apply_perturbation(w, parts[n]) for n, w in named if n in parts}
        return functional_call(self.model, weights, (xb,))

    def _zeroth_order_step(
        self, xb: torch.Tensor, targets: torch.Tensor, keys: dict[str, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits_seen: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            # Both evaluations see the same dropout masks and weight noise (same streams).
            with self._stochastic_layers(keys):
                logits = self._forward(xb, keys)
            logits_seen.append(logits)
            return self.loss_fn(logits, targets)

        seed = rules.zeroth_order_seed(self.streams, keys)
        loss = self.optimizer.step(closure, seed=seed)
        return loss, logits_seen[0]

    def evaluate(self, data: TensorData | Dataset[Any]) -> dict[str, float]:
        """The task's metrics and the user's on ``data``, in eval mode."""
        if self.parts.default_loop and isinstance(data, TensorData):
            return evaluate(self.model, data, self.num_classes, self.device)
        parts = self.parts
        outputs, targets = predict(
            self.model, data, self.device, parts.num_workers, task=parts.task
        )
        return {
            **task_metrics(self.parts.task, outputs, targets),
            **user_metrics(self.parts.metrics, outputs, metric_targets(self.parts.task, targets)),
        }

    def _end_epoch(self) -> None:
        scores = None
        if self.val_data is not None:
            scores = self.evaluate(self.val_data)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scheduler is not None and not self._scheduler_per_step:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                # It steps on a loss: the validation loss, else the epoch's training loss.
                seen = max(1, self.state.seen)
                self.scheduler.step(scores["loss"] if scores else self.state.loss_sum / seen)
            else:
                self.scheduler.step()
        accuracy = self.parts.task == "classification"
        stopped = self.state.stopped_early  # a callback's stop() during the epoch
        improved = rules.finish_epoch(
            self.state, lr, scores, self.cfg.early_stopping, train_accuracy=accuracy
        )
        if improved:
            self.best_weights = copy.deepcopy(
                {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            )
        self._callbacks("on_epoch_end", self.state.history[-1])
        self.state.stopped_early = self.state.stopped_early or stopped


def _label_smoothed_cross_entropy(smoothing: float) -> Any:
    return functools.partial(F.cross_entropy, label_smoothing=smoothing)


def training_loss(task: str, label_smoothing: float) -> Any:
    """Cross-entropy with the config's label smoothing, or the task's default loss."""
    if task == "classification":
        return _label_smoothed_cross_entropy(label_smoothing)
    return default_loss(task)
