"""The vectorized runner: every missing trial trained at once in this process by the stacked
trainer (``randkit.stacked``). Each trial becomes one member with its own scoped streams and
split, so its batch order, augmentation, noise, dropout and init are those the sequential
runner gives it."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from randkit.cv.plan import Trial
from randkit.cv.runners import OnDone, RunContext
from randkit.cv.trial import prepare_trial, save_trial, trial_model, trial_record
from randkit.data import Prepared
from randkit.randomize import build_randomization
from randkit.stacked import Member, StackedTrainer, check_stackable
from randkit.streams import ScopedStreams
from randkit.train.loop import resolve_device


class VectorizedRunner:
    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.wanted: set[str] = set()

    def run(self, trials: list[Trial], on_done: OnDone) -> None:
        # A member's float sums depend on the stack it trains in (its size, its place): a
        # resume stacks every trial of the plan again, as the uninterrupted run did, and
        # saves and reports only the missing ones, so they end with the same bytes.
        self.wanted = {t.id for t in trials}
        trials = self.context.plan_trials or trials
        cfg, data = self.context.cfg, self.context.data
        streams = self.context.streams()
        scopes, prepared, models = [], [], []
        for trial in trials:
            scoped = ScopedStreams(streams, trial.scopes())
            split = prepare_trial(cfg, data, trial, scoped)
            model, _ = trial_model(cfg, self.context.objects, split, data, scoped)
            models.append(model)
            scopes.append(scoped)
            prepared.append(split)
        check_stackable(models[0], cfg.train.optimizer, "cv.runner")
        # Models stack only when their shapes agree; a text model's vocabulary is fit on each
        # trial's training part, so its embedding may differ by a few rows between trials.
        for group in _same_shapes(models):
            self._fit(
                [trials[k] for k in group],
                [scopes[k] for k in group],
                [prepared[k] for k in group],
                [models[k] for k in group],
                on_done,
            )

    def _fit(
        self,
        trials: list[Trial],
        scopes: list[ScopedStreams],
        prepared: list[Prepared],
        models: list[nn.Module],
        on_done: OnDone,
    ) -> None:
        """Train one stack of same-shaped models at once; save and report each trial."""
        cfg, out = self.context.cfg, self.context.out
        device = resolve_device(cfg.train.device)
        first = prepared[0]
        plan = build_randomization(
            cfg.randomize, len(first.classes), first.input_shape, first.unit_range
        )
        members = [
            Member(streams=s, train=p.train, val=p.val)
            for s, p in zip(scopes, prepared, strict=True)
        ]
        models = [m.to(device) for m in models]
        trainer = StackedTrainer(models, members, cfg.train, plan, len(first.classes), device)
        started = time.perf_counter()
        trainer.fit(on_epoch=self._epoch_hook(trials, trainer))
        seconds = (time.perf_counter() - started) / len(trials)
        test_logits = trainer.test_logits([p.test.x for p in prepared])
        for k, trial in enumerate(trials):
            if trial.id not in self.wanted:
                continue  # finished before: trained again only to keep the stack whole
            split = prepared[k]
            record = trial_record(
                trial, scopes[k], split, test_logits[k], split.test.y, trainer.histories[k], seconds
            )
            save_trial(out, record, trainer.weights(k) if cfg.cv.save_models else None)
            on_done(record)

    def _epoch_hook(
        self, trials: list[Trial], trainer: StackedTrainer
    ) -> Callable[[list[int]], None] | None:
        """Tell the bar of an epoch of all trials at once: one event per trial that ran it."""
        on_epoch = self.context.on_epoch
        if on_epoch is None:
            return None

        def hook(ran: list[int]) -> None:
            for k in ran:
                if trials[k].id in self.wanted:
                    on_epoch(trials[k].id, trainer.histories[k][-1])

        return hook


def _same_shapes(models: list[nn.Module]) -> list[list[int]]:
    """Indices of the models grouped by the shapes of their parameters and buffers, in the
    order each shape first appears."""
    groups: dict[tuple, list[int]] = {}
    for k, model in enumerate(models):
        state = model.state_dict()
        groups.setdefault(tuple((n, tuple(t.shape)) for n, t in state.items()), []).append(k)
    return list(groups.values())
