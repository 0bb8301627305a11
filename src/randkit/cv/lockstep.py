"""The lockstep training loop of the vectorized runner (see ``vectorized.py``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from randkit.config import ExperimentConfig
from randkit.cv.stacked import StackedForward
from randkit.cv.stacked_optim import StackedOptimizer
from randkit.randomize import Randomization, use_generator
from randkit.randomize.build import randomize_batch
from randkit.randomize.weights import draw_weight_perturbation
from randkit.train.metrics import classification_metrics

NEUTRAL = {"uniform": 1.0, "normal": 0.0}  # a padded row keeps its activation unchanged


def _pad(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    if len(t) == rows:
        return t
    filler = torch.full((rows - len(t), *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, filler])


def _trial_channels_last(p: torch.Tensor) -> torch.Tensor:
    """A copy of stacked parameter ``p``; a stack of convolution weights (K, out, in, kh, kw)
    is laid out so that its (K * out, in, kh, kw) view is channels-last, the layout of the
    stacked forward's activations. oneDNN otherwise reorders the weight and its gradient on
    every step. Measured on the digits CNN's second convolution alone (K = 5, forward and
    backward): 1.22 ms against 1.88 ms; in the whole training step the gain is about 1%."""
    p = p.detach()
    if p.dim() != 5:
        return p.clone()
    return p.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


class Lockstep:
    def __init__(
        self,
        cfg: ExperimentConfig,
        base: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        states: list[Any],
        plan: Randomization,
        device: torch.device,
        recorder: Any,
        pre_drawn: Any,
    ) -> None:
        self.cfg, self.base, self.states, self.plan, self.device = cfg, base, states, plan, device
        self.stacked = StackedForward.build(base)  # None: the model needs vmap
        # Measured on the CPU only; CUDA keeps the usual layout.
        relayout = self.stacked is not None and device.type == "cpu"
        self.params = {
            n: _trial_channels_last(p) if relayout else p.detach().clone()
            for n, p in params.items()
        }
        for p in self.params.values():
            p.requires_grad_(True)
        self.buffers = buffers
        self.optimizer = StackedOptimizer(self.params, cfg.train, len(states))
        self.recorder, self.pre_drawn = recorder, pre_drawn
        self._calls: dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]] = {}
        self.num_classes = len(states[0].prepared.classes)
        self._pool = self._shared_pool()
        self._epoch_index: torch.Tensor | None = None

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
        self.base.eval()
        # Images in channels-last memory: torch's CPU max pooling is about 20x faster on it.
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
        """Trial k's logits for its examples ``xs[k]``, in eval mode, on the CPU. Through the
        stacked forward when there is one: all trials per pass (for the digits CNN 5 ms
        instead of 16 ms trial by trial), the shorter sets padded with zero rows."""
        if self.stacked is None:
            return [self.logits(self.weights(k), x) for k, x in enumerate(xs)]
        longest = max(len(x) for x in xs)
        self.base.eval()
        try:
            parts = []
            for start in range(0, longest, batch_size):
                rows = min(batch_size, longest - start)
                chunk = torch.stack([_pad(x[start : start + rows], rows) for x in xs])
                out = self.stacked(self.params, self.buffers, chunk.to(self.device), [])
                parts.append(out.float().cpu())
        finally:
            self.base.train()
        logits = torch.cat(parts, dim=1)
        return [logits[k, : len(x)] for k, x in enumerate(xs)]

    # -- training -----------------------------------------------------------------------
    def fit(self) -> None:
        self.base.train()
        for epoch in range(self.cfg.train.epochs):
            running = [s for s in self.states if not s.stopped]
            if not running:
                break
            for s in running:
                generator = s.streams.torch("order", epoch=epoch)
                s.order = torch.randperm(len(s.y), generator=generator)
            self._epoch_index = self._gather_index(running) if self._pool is not None else None
            for batch in range(max(s.steps_per_epoch for s in running)):
                self._step(epoch, batch)
            for s in running:
                self._end_epoch(s, epoch)
        for k, s in enumerate(self.states):
            if s.best_weights is not None:
                with torch.no_grad():
                    for name, value in s.best_weights.items():
                        target = self.params.get(name, self.buffers.get(name))
                        target[k].copy_(value)

    def _shared_pool(self) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
        """Every trial's training examples in one tensor, plus a zero row labelled -1 for
        padding, when batches need no per-trial randomization: then one index op per step
        gathers all K batches instead of K gathers, pads and stacks (measured: 3-5% of the
        digits benchmark's runs, MLP and CNN)."""
        plan = self.plan
        if plan.augment is not None or plan.input_noise is not None:
            return None
        xs = [s.x for s in self.states]
        if any(x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype for x in xs):
            return None
        pad_x = torch.zeros((1, *xs[0].shape[1:]), dtype=xs[0].dtype, device=self.device)
        pad_y = torch.full((1,), -1, dtype=self.states[0].y.dtype, device=self.device)
        offsets = [0]
        for x in xs:
            offsets.append(offsets[-1] + len(x))
        x_all = torch.cat([*(x.to(self.device) for x in xs), pad_x])
        y_all = torch.cat([*(s.y.to(self.device) for s in self.states), pad_y])
        return x_all, y_all, offsets

    def _gather_index(self, running: list[Any]) -> torch.Tensor:
        """(K, steps * batch size): this epoch's example indices into the shared pool, in
        each trial's order; the padding row's index where a trial has no example."""
        _, y_all, offsets = self._pool
        size = self.cfg.train.batch_size
        steps = max(s.steps_per_epoch for s in running)
        index = torch.full((len(self.states), steps * size), len(y_all) - 1, dtype=torch.long)
        for k, s in enumerate(self.states):
            if s in running:
                index[k, : len(s.order)] = s.order + offsets[k]
        return index.to(self.device)

    def _pooled_batch(
        self, epoch: int, batch: int
    ) -> tuple[list[int], list[dict[str, int]], torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.cfg.train.batch_size
        rows, keys = [], []
        for s in self.states:
            live = not s.stopped and batch < s.steps_per_epoch
            rows.append(min(size, len(s.order) - batch * size) if live else 0)
            keys.append({"epoch": epoch, "step": epoch * s.steps_per_epoch + batch})
        x_all, y_all, _ = self._pool
        index = self._epoch_index[:, batch * size : batch * size + max(rows)]
        # index_select on the flat index: half the time of x_all[index] (digits, 5 trials)
        flat = index.reshape(-1)
        label = y_all.index_select(0, flat).view(index.shape)
        x = x_all.index_select(0, flat).view(*index.shape, *x_all.shape[1:])
        return rows, keys, x, label.clamp(min=0), label

    def _step(self, epoch: int, batch: int) -> None:
        if self._epoch_index is not None:
            rows, keys, x, target, label = self._pooled_batch(epoch, batch)
            self._train_on(rows, keys, x, target, label)
            return
        size = self.cfg.train.batch_size
        rows, keys, xs, targets, labels = [], [], [], [], []
        for s in self.states:
            live = not s.stopped and batch < s.steps_per_epoch
            index = s.order[batch * size : (batch + 1) * size] if live else s.order[:0]
            key = {"epoch": epoch, "step": epoch * s.steps_per_epoch + batch}
            x, y = s.x[index.to(s.x.device)], s.y[index.to(s.y.device)]
            t = (
                randomize_batch(self.plan, s.streams, x, y, key, self.device)
                if len(index)
                else (x, y)
            )
            rows.append(len(index))
            keys.append(key)
            xs.append(t[0])
            targets.append(t[1])
            labels.append(y)
        width = max(rows)
        soft = any(t.dim() == 2 for t in targets)
        if soft:
            targets = [
                t if t.dim() == 2 else F.one_hot(t, self.num_classes).float() for t in targets
            ]
        x = torch.stack([_pad(t, width) for t in xs])
        target = torch.stack([_pad(t, width) for t in targets])
        label = torch.stack([_pad(t, width, -1) for t in labels])  # -1: a padded row
        self._train_on(rows, keys, x, target, label)

    def _train_on(
        self,
        rows: list[int],
        keys: list[dict[str, int]],
        x: torch.Tensor,
        target: torch.Tensor,
        label: torch.Tensor,
    ) -> None:
        """One step of all trials on their stacked batches (K, width, ...); ``label`` -1
        marks a padded row."""
        cfg = self.cfg.train
        weight = (label >= 0).to(x.dtype)
        draws = self._dropout_draws(rows, keys, x.shape[2:])
        params = self._perturbed(rows, keys)
        smoothing = cfg.label_smoothing

        direct = None
        if self.stacked is not None and params is self.params:  # no weight perturbation
            direct = self.stacked.loss_and_grads(
                params, self.buffers, x, target, weight, draws, smoothing
            )
        if direct is not None:  # an all-dense model: its gradients without autograd
            losses, logits, grads = direct
            for name, p in self.params.items():
                p.grad = grads[name]
        elif self.stacked is not None:
            losses, logits = self.stacked.loss(
                params, self.buffers, x, target, weight, draws, smoothing
            )
        else:

            def per_trial(
                p: dict, b: dict, xb: torch.Tensor, tb: torch.Tensor, wb: torch.Tensor, db: list
            ) -> tuple[torch.Tensor, torch.Tensor]:
                with use_generator(self.pre_drawn(db)):
                    logits = functional_call(self.base, (p, b), (xb,))
                ce = F.cross_entropy(logits, tb, reduction="none", label_smoothing=smoothing)
                return (ce * wb).sum() / wb.sum().clamp(min=1), logits

            losses, logits = vmap(per_trial, randomness="error")(
                params, self.buffers, x, target, weight, draws
            )
        if direct is None:
            for p in self.params.values():
                p.grad = None
            losses.sum().backward()
        self._gradient_noise(rows, keys)
        if cfg.grad_clip is not None:
            self._clip(cfg.grad_clip)
        self.optimizer.step([s.lr for s in self.states], [r > 0 for r in rows])
        # The running metrics of all trials in two tensors, read back once per step.
        with torch.no_grad():
            loss_sums = (losses * weight.sum(1)).tolist()
            corrects = (logits.argmax(-1) == label).sum(1).tolist()
        for k, s in enumerate(self.states):
            if rows[k]:
                if s.scheduler is not None:
                    s.lr_optimizer.step()  # a no-op that keeps the scheduler's order check happy
                    s.scheduler.step()
                s.loss_sum += loss_sums[k]
                s.correct += int(corrects[k])
                s.seen += rows[k]

    def _dropout_draws(
        self, rows: list[int], keys: list[dict[str, int]], sample_shape: torch.Size
    ) -> list[torch.Tensor]:
        """Per layer call, the K trials' numbers from their own dropout streams, padded."""
        width = max(rows)
        shape_key = (width, *sample_shape)
        if shape_key not in self._calls:
            recorder = self.recorder()
            first = {n: p[0].detach() for n, p in self.params.items()}
            first.update({n: b[0] for n, b in self.buffers.items()})
            with torch.no_grad(), use_generator(recorder):
                probe = torch.zeros(shape_key, device=self.device, dtype=self.states[0].x.dtype)
                functional_call(self.base, first, (probe,))
            self._calls[shape_key] = recorder.calls
        calls = self._calls[shape_key]
        if not calls:
            return []
        per_call: list[list[torch.Tensor]] = [[] for _ in calls]
        for s, r, key in zip(self.states, rows, keys, strict=True):
            generator = s.streams.torch("dropout", device=self.device, **key) if r else None
            for i, (kind, shape) in enumerate(calls):
                own = (r, *shape[1:])
                if generator is None:
                    values = torch.empty((0, *shape[1:]), device=self.device)
                elif kind == "uniform":
                    values = torch.rand(own, generator=generator, device=self.device)
                else:
                    values = torch.randn(own, generator=generator, device=self.device)
                per_call[i].append(_pad(values, shape[0], NEUTRAL[kind]))
        return [torch.stack(parts) for parts in per_call]

    def _perturbed(self, rows: list[int], keys: list[dict[str, int]]) -> dict[str, torch.Tensor]:
        """Weight noise and DropConnect, drawn per trial like ``perturbed_parameters``."""
        plan = self.plan
        if not plan.perturbs_weights:
            return self.params
        out = dict(self.params)
        names = [n for n, p in self.params.items() if p.dim() >= 3]  # weights: >= 2 dims each
        masks = {n: torch.ones_like(self.params[n]) for n in names}
        noises = {n: torch.zeros_like(self.params[n]) for n in names}
        for k, (s, r, key) in enumerate(zip(self.states, rows, keys, strict=True)):
            if not r:
                continue
            generator = s.streams.torch("noise", device=self.device, what="weights", **key)
            for n in names:
                w = self.params[n][k]
                keep, noise = draw_weight_perturbation(
                    w,
                    generator,
                    plan.weight_noise_std,
                    plan.weight_noise_relative,
                    plan.drop_connect,
                )
                if keep is not None:
                    masks[n][k] = keep.to(w.dtype) / (1 - plan.drop_connect)
                if noise is not None:
                    noises[n][k] = noise
        for n in names:
            out[n] = self.params[n] * masks[n] + noises[n]
        return out

    @torch.no_grad()
    def _gradient_noise(self, rows: list[int], keys: list[dict[str, int]]) -> None:
        noise = self.plan.grad_noise
        if noise is None:
            return
        for k, (s, r, key) in enumerate(zip(self.states, rows, keys, strict=True)):
            if not r:
                continue
            generator = s.streams.torch("noise", device=self.device, what="gradient", **key)
            std = math.sqrt(noise.variance(key["step"]))
            for p in self.params.values():
                if p.grad is not None:
                    shape = p.shape[1:]
                    draw = torch.randn(shape, generator=generator, device=p.device, dtype=p.dtype)
                    p.grad[k] += std * draw

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads))
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))

    def _end_epoch(self, s: Any, epoch: int) -> None:
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "lr": s.lr,
            "train_loss": s.loss_sum / max(1, s.seen),
            "train_accuracy": s.correct / max(1, s.seen),
        }
        val = s.prepared.val
        if val is not None:
            k = self.states.index(s)
            scores = classification_metrics(
                self.logits(self.weights(k), val.x), val.y, self.num_classes
            )
            record.update({f"val_{name}": v for name, v in scores.items()})
            rule = self.cfg.train.early_stopping
            if rule is not None:
                value = -scores[rule.metric] if rule.metric == "loss" else scores[rule.metric]
                if s.best_value is None or value > s.best_value + rule.min_delta:
                    s.best_value, s.bad_epochs = value, 0
                    s.best_weights = self.weights(k)
                else:
                    s.bad_epochs += 1
                    s.stopped = s.bad_epochs >= rule.patience
        s.history.append(record)
        s.loss_sum, s.correct, s.seen = 0.0, 0, 0
