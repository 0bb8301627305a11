"""The stacked trainer: K models of one architecture trained at once, in lockstep.

Written by hand because no library trains K differently-seeded models at once with per-model
data order, augmentation, noise and dropout. The models' weights are stacked with
``torch.func.stack_module_state`` and one pass computes all K forward passes per step: the
stacked forward of ``forward.py`` for plain ``nn.Sequential`` networks, else ``vmap`` of
``functional_call``. Each model (a ``Member``) keeps its own streams, and the rules of a step
(``train/rules.py``) are those of the single-model ``Trainer``: model k draws what it would
draw alone. Unequal data sizes are padded with zero-weight rows; a model whose epoch has fewer
batches simply does not move on the extra steps. Nothing here knows of cross-validation.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from randkit.config import TrainConfig
from randkit.data import TensorData
from randkit.errors import UserError
from randkit.randomize import Randomization, use_generator
from randkit.stacked import batches
from randkit.stacked.forward import StackedForward, stacked_cross_entropy
from randkit.stacked.optim import StackedOptimizer
from randkit.streams import ScopedStreams, Streams
from randkit.train import rules
from randkit.train.metrics import classification_metrics

_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching"


@dataclass
class Member:
    """One of the K models: its streams (already scoped to it), its data and the extra
    stream coordinates of its draws."""

    streams: Streams | ScopedStreams
    train: TensorData
    val: TensorData | None = None
    coords: dict[str, int] = field(default_factory=dict)


class _Run:
    """A member's training in progress: its loop state, order and learning-rate schedule."""

    def __init__(self, member: Member, cfg: TrainConfig, device: torch.device) -> None:
        self.member, self.batch_size, self.base_lr = member, cfg.batch_size, cfg.lr
        self.x, self.y = member.train.x.to(device), member.train.y.to(device)
        self.steps_per_epoch = rules.steps_per_epoch(len(self.y), cfg.batch_size)
        self.lr_optimizer, self.scheduler = rules.learning_rate_schedule(cfg, self.steps_per_epoch)
        self.state = rules.LoopState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.order = torch.empty(0, dtype=torch.long)

    @property
    def running(self) -> bool:
        return not self.state.stopped_early

    @property
    def lr(self) -> float:
        if self.lr_optimizer is None:
            return self.base_lr
        return float(self.lr_optimizer.param_groups[0]["lr"])

    def rows(self, batch: int) -> int:
        """Examples in step ``batch`` of the current epoch (0: this model sits it out)."""
        if not self.running or batch >= self.steps_per_epoch:
            return 0
        return min(self.batch_size, len(self.order) - batch * self.batch_size)


def _channels_last_stack(p: torch.Tensor) -> torch.Tensor:
    """A copy of stacked parameter ``p``; a stack of convolution weights (K, out, in, kh, kw)
    is laid out so that its (K * out, in, kh, kw) view is channels-last, the layout of the
    stacked forward's activations (oneDNN would reorder the weight on every step)."""
    p = p.detach()
    if p.dim() != 5:
        return p.clone()
    return p.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


class StackedTrainer:
    """Trains ``models`` (one architecture, K instances with their own weights) on their
    ``members``' data; ``histories``, ``weights(k)`` and ``test_logits`` give the results."""

    def __init__(
        self,
        models: list[nn.Module],
        members: list[Member],
        cfg: TrainConfig,
        plan: Randomization,
        num_classes: int,
        device: torch.device,
    ) -> None:
        self.cfg, self.plan, self.device, self.num_classes = cfg, plan, device, num_classes
        params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0])
        self.stacked = StackedForward.build(self.base)  # None: the model needs vmap
        relayout = self.stacked is not None and device.type == "cpu"
        self.params = {
            n: _channels_last_stack(p) if relayout else p.detach().clone()
            for n, p in params.items()
        }
        for p in self.params.values():
            p.requires_grad_(True)
        self.runs = [_Run(m, cfg, device) for m in members]
        self.optimizer = StackedOptimizer(self.params, cfg, len(members))
        self._calls: dict[tuple[int, ...], batches.Calls] = {}
        usable = batches.SharedPool.usable(self.runs, plan)
        self.pool = batches.SharedPool(self.runs, device) if usable else None

    @property
    def histories(self) -> list[list[dict[str, float]]]:
        return [run.state.history for run in self.runs]

    # -- weights and evaluation ---------------------------------------------------------
    def weights(self, k: int) -> dict[str, torch.Tensor]:
        out = {
            n: p[k].detach().clone(memory_format=torch.contiguous_format)
            for n, p in self.params.items()
        }
        out.update({n: b[k].clone() for n, b in self.buffers.items()})
        return out

    @torch.no_grad()
    def logits(
        self, weights: dict[str, torch.Tensor], x: torch.Tensor, batch_size: int = 1024
    ) -> torch.Tensor:
        """One model's logits for ``x`` in eval mode, on the CPU."""
        self.base.eval()
        # Images in channels-last memory, where torch's CPU max pooling is fastest.
        layout = torch.channels_last if x.dim() == 4 else torch.preserve_format
        try:
            parts = [
                functional_call(
                    self.base,
                    weights,
                    (x[i : i + batch_size].to(self.device).contiguous(memory_format=layout),),
                )
                .float()
                .cpu()
                for i in range(0, len(x), batch_size)
            ]
        finally:
            self.base.train()
        return torch.cat(parts)

    @torch.no_grad()
    def test_logits(self, xs: list[torch.Tensor], batch_size: int = 256) -> list[torch.Tensor]:
        """Model k's logits for its examples ``xs[k]``, in eval mode, on the CPU: all models
        per pass through the stacked forward when there is one, shorter sets padded."""
        if self.stacked is None:
            return [self.logits(self.weights(k), x) for k, x in enumerate(xs)]
        longest = max(len(x) for x in xs)
        self.base.eval()
        try:
            parts = []
            for start in range(0, longest, batch_size):
                rows = min(batch_size, longest - start)
                chunk = torch.stack([batches.pad(x[start : start + rows], rows) for x in xs])
                out = self.stacked(self.params, self.buffers, chunk.to(self.device), [])
                parts.append(out.float().cpu())
        finally:
            self.base.train()
        logits = torch.cat(parts, dim=1)
        return [logits[k, : len(x)] for k, x in enumerate(xs)]

    # -- training -----------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[list[int]], None] | None = None) -> None:
        """Train every model; ``on_epoch(ks)`` after each epoch with the models that ran it."""
        self.base.train()
        for epoch in range(self.cfg.epochs):
            running = [run for run in self.runs if run.running]
            if not running:
                break
            for run in running:
                m = run.member
                run.order = rules.batch_order(m.streams, len(run.y), epoch, m.coords)
            steps = max(run.steps_per_epoch for run in running)
            if self.pool is not None:
                self.pool.start_epoch(self.runs, steps, self.cfg.batch_size)
            for batch in range(steps):
                self._step(epoch, batch)
            for k, run in enumerate(self.runs):
                if run in running:
                    self._end_epoch(k, run)
            if on_epoch is not None:
                on_epoch([k for k, run in enumerate(self.runs) if run in running])
        with torch.no_grad():
            for k, run in enumerate(self.runs):
                for name, value in (run.best_weights or {}).items():
                    self.params.get(name, self.buffers.get(name))[k].copy_(value)

    def _step(self, epoch: int, batch: int) -> None:
        rows = [run.rows(batch) for run in self.runs]
        keys = [
            rules.step_keys(epoch, run.state.global_step, run.member.coords) for run in self.runs
        ]
        if self.pool is not None:
            x, target, label = self.pool.batch(batch, self.cfg.batch_size, max(rows))
        else:
            x, target, label = batches.per_model_batch(
                self.runs, rows, keys, batch, self.plan, self.num_classes, self.device
            )
        self._train_on(rows, keys, x, target, label)

    def _train_on(
        self,
        rows: list[int],
        keys: list[dict[str, int]],
        x: torch.Tensor,
        target: torch.Tensor,
        label: torch.Tensor,
    ) -> None:
        """One step of all models on their stacked batches (K, width, ...); ``label`` -1
        marks a padded row."""
        cfg = self.cfg
        weight = (label >= 0).to(x.dtype)
        losses, logits = self._losses(rows, keys, x, target, weight)
        for p in self.params.values():
            p.grad = None
        losses.sum().backward()
        self._gradient_noise(rows, keys)
        if cfg.grad_clip is not None:
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            rules.clip_gradients(grads, cfg.grad_clip)
        self.optimizer.step([run.lr for run in self.runs], [r > 0 for r in rows])
        # The running metrics of all models in two tensors, read back once per step.
        with torch.no_grad():
            loss_sums = (losses * weight.sum(1)).tolist()
            corrects = (logits.argmax(-1) == label).sum(1).tolist()
        for k, run in enumerate(self.runs):
            if rows[k]:
                if run.scheduler is not None:
                    run.lr_optimizer.step()  # a no-op that keeps the scheduler's order check happy
                    run.scheduler.step()
                rules.record_step(run.state, loss_sums[k], int(corrects[k]), rows[k])
                run.state.global_step += 1

    def _losses(
        self,
        rows: list[int],
        keys: list[dict[str, int]],
        x: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(each model's weighted mean loss (K,), logits (K, width, classes))."""
        draws = self._dropout_draws(rows, keys, x.shape[2:])
        params = self._perturbed(rows, keys)
        if self.stacked is not None:
            logits = self.stacked(params, self.buffers, x, draws)
        else:

            def per_model(p: dict, b: dict, xb: torch.Tensor, db: list) -> torch.Tensor:
                with use_generator(batches.PreDrawn(db)):
                    return functional_call(self.base, (p, b), (xb,))

            with warnings.catch_warnings():
                # An op without a vmap batching rule (EmbeddingBag with padding_idx, the text
                # model) runs once per model: correct, only slower; torch's warning would
                # reach the user's terminal as a raw C++ line on every run.
                warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
                logits = vmap(per_model, randomness="error")(params, self.buffers, x, draws)
        losses = stacked_cross_entropy(logits, target, weight, self.cfg.label_smoothing)
        return losses, logits

    def _dropout_draws(
        self, rows: list[int], keys: list[dict[str, int]], sample_shape: torch.Size
    ) -> list[torch.Tensor]:
        """Per layer call, the K models' numbers from their own dropout streams."""
        shape_key = (max(rows), *sample_shape)
        if shape_key not in self._calls:  # ask the layers once what they draw at this shape
            recorder = batches.Recorder()
            first = {n: p[0].detach() for n, p in self.params.items()}
            first.update({n: b[0] for n, b in self.buffers.items()})
            dtype = self.runs[0].x.dtype
            with torch.no_grad(), use_generator(recorder):
                probe = torch.zeros(shape_key, device=self.device, dtype=dtype)
                functional_call(self.base, first, (probe,))
            odd = [shape for _, shape, _ in recorder.calls if shape[0] != shape_key[0]]
            if odd:
                raise UserError(
                    "model",
                    f"a stochastic layer draws numbers of shape {list(odd[0])}, not one row per "
                    "example; only one model at a time can train it (another runner)",
                )
            self._calls[shape_key] = recorder.calls
        calls = self._calls[shape_key]
        return batches.dropout_draws(self.runs, rows, keys, calls, self.device)

    def _perturbed(self, rows: list[int], keys: list[dict[str, int]]) -> dict[str, torch.Tensor]:
        """Weight noise and DropConnect, drawn per model as the single-model trainer draws
        them, applied to the stacked weights in one operation each."""
        plan = self.plan
        if not plan.perturbs_weights:
            return self.params
        stacked: dict[str, dict[str, torch.Tensor]] = {}
        for k, (run, r, key) in enumerate(zip(self.runs, rows, keys, strict=True)):
            if not r:
                continue
            generator = rules.weight_noise_generator(run.member.streams, key, self.device)
            named = [(n, p[k]) for n, p in self.params.items()]
            for name, parts in rules.perturbed_weights(named, plan, generator).items():
                for part, value in parts.items():
                    if part not in stacked.setdefault(name, {}):
                        fill = torch.ones_like if part == "factor" else torch.zeros_like
                        stacked[name][part] = fill(self.params[name].detach())
                    stacked[name][part][k] = value
        out = dict(self.params)
        for name, parts in stacked.items():
            out[name] = rules.apply_perturbation(self.params[name], parts)
        return out

    @torch.no_grad()
    def _gradient_noise(self, rows: list[int], keys: list[dict[str, int]]) -> None:
        if self.plan.grad_noise is None:
            return
        for k, (run, r, key) in enumerate(zip(self.runs, rows, keys, strict=True)):
            if r:
                grads = [p.grad[k] for p in self.params.values() if p.grad is not None]
                rules.add_gradient_noise(self.plan, grads, run.member.streams, key, self.device)

    def _end_epoch(self, k: int, run: _Run) -> None:
        val = run.member.val
        scores = None
        if val is not None:
            logits = self.logits(self.weights(k), val.x)
            scores = classification_metrics(logits, val.y, self.num_classes)
        if rules.finish_epoch(run.state, run.lr, scores, self.cfg.early_stopping):
            run.best_weights = self.weights(k)
