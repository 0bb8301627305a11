"""randkit.cv.nested: the nested CV interval (Bates, Hastie & Tibshirani 2024), checked
against a loop-by-loop transcription of the authors' reference code, by simulation on a
learner whose expected accuracy is known exactly, and end to end on every runner.

The simulated learner is the one of tests/test_cv_intervals.py: two Gaussian classes
N(+-(delta/2) e_1, I_d), the nearest-class-mean rule fitted in closed form, its accuracy
exact by the normal CDF. Nested CV needs, per repetition, K outer fits and K(K-1)/2 fits
without two folds; for this rule every fit's class means are the data's class sums minus
the held-out folds' sums, so all of them come from the K per-fold sums at once.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from randkit.cv.nested import loss_for_metric, nested_cv_interval, to_metric_scale
from test_cv_intervals import class_mean, expected_accuracy, rule_accuracy, simulate_data


def ncm_nested_losses(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, folds: int, reps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sets, R, n, K) 0-1 losses in ``nested_cv_interval``'s layout and (sets, R, n) fold
    ids: stratified folds, class 1 first in ``x`` as ``simulate_data`` makes it."""
    sets, n, _ = x.shape
    half, eye = n // 2, np.eye(folds, dtype=bool)
    losses = np.empty((sets, reps, n, folds))
    fold_ids = np.empty((sets, reps, n), dtype=np.int64)
    for r in range(reps):
        fold = np.empty((sets, n), dtype=np.int64)
        for part in (slice(0, half), slice(half, n)):  # stratified: each class dealt in turn
            order = rng.permuted(np.broadcast_to(np.arange(half), (sets, half)), axis=1)
            fold[:, part] = order % folds
        member = (fold[..., None] == np.arange(folds)).astype(float)
        means = []
        for part in (slice(0, half), slice(half, n)):
            sums = np.einsum("snk,snd->skd", member[:, part], x[:, part])
            counts = member[:, part].sum(1)
            # Held-out sums and counts of folds {k, j}; the diagonal holds fold k alone.
            out_sums = sums[:, :, None] + sums[:, None, :]
            out_counts = counts[:, :, None] + counts[:, None, :]
            out_sums[:, eye], out_counts[:, eye] = sums, counts
            total = x[:, part].sum(1)[:, None, None]
            means.append((total - out_sums) / (half - out_counts)[..., None])
        w = means[0] - means[1]  # (sets, K, K, d): the fit without folds {k, j}
        b = -(w * (means[0] + means[1]) / 2.0).sum(-1)
        at = np.arange(sets)[:, None]
        score = np.einsum("snd,snkd->snk", x, w[at, fold]) + b[at, fold]
        losses[:, r] = (score > 0) != y[None, :, None]
        fold_ids[:, r] = fold
    return losses, fold_ids


def reference_transcription(losses: np.ndarray, folds: np.ndarray, alpha: float) -> dict:
    """The reference R code (nestedcv, R/core.R: nested_cv_helper then nested_cv) loop by
    loop, with its naive_cv bias runs replaced by the repetitions' own outer runs."""
    reps, n, k = losses.shape
    pivots, ho_errs, cv_means = [], [], []
    for r in range(reps):
        ho = {}  # ho[(f2, f1)]: errors on fold f2 of the fit without folds f1 and f2
        for f1 in range(k):
            for f2 in range(k):
                if f1 != f2:
                    ho[(f2, f1)] = losses[r, folds[r] == f2, f1]
        for f1 in range(k):
            e_out = losses[r, folds[r] == f1, f1]
            e_bar = np.concatenate([ho[(f2, f1)] for f2 in range(k) if f2 != f1])
            pivots.append((e_bar.mean() - e_out.mean(), e_out.var(ddof=1) / len(e_out)))
        for f1 in range(k - 1):
            for f2 in range(f1 + 1, k):
                ho_errs.extend([*ho[(f1, f2)], *ho[(f2, f1)]])
        cv_means.append(np.mean([losses[r, i, folds[r, i]] for i in range(n)]))
    p, ho_errs = np.array(pivots), np.array(ho_errs)
    n_sub = math.floor(n * (k - 1) / k)
    sd = ho_errs.std(ddof=1)
    infl = math.sqrt(max(0.0, np.mean(p[:, 0] ** 2 - p[:, 1]))) / (sd / math.sqrt(n_sub))
    infl = max(1.0, min(infl, math.sqrt(k)))
    bias = (ho_errs.mean() - np.mean(cv_means)) * (1 + ((k - 2) / k) ** 1.5)
    est = ho_errs.mean() - bias
    from scipy.stats import norm

    half = norm.ppf(1 - alpha / 2) * sd / math.sqrt(n) * infl
    return {"ci": [est - half, est + half], "estimate": est, "inflation": infl, "bias": bias}


def test_matches_a_transcription_of_the_reference_code() -> None:
    rng = np.random.default_rng(0)
    for reps, n, k in ((1, 30, 3), (4, 57, 5), (3, 100, 10)):
        folds = np.stack([rng.permutation(np.arange(n) % k) for _ in range(reps)])
        losses = rng.exponential(1.0, (reps, n, k)) * (rng.random((reps, n, k)) < 0.6)
        ours = nested_cv_interval(losses, folds, confidence=0.9)
        ref = reference_transcription(losses, folds, alpha=0.1)
        assert ours["ci"] == pytest.approx(ref["ci"], abs=1e-12)
        assert ours["estimate"] == pytest.approx(ref["estimate"], abs=1e-12)
        assert ours["inflation"] == pytest.approx(ref["inflation"], abs=1e-12)
        assert ours["bias"] == pytest.approx(ref["bias"], abs=1e-12)


def test_the_simulated_losses_are_those_of_refitted_rules() -> None:
    """The per-fold-sum shortcut of ``ncm_nested_losses`` equals fitting every rule anew."""
    rng = np.random.default_rng(1)
    x, y = simulate_data(rng, 2, 24, 3, 2.0)
    losses, folds = ncm_nested_losses(rng, x, y, 4, 2)
    for s in range(2):
        for r in range(2):
            for i in range(24):
                for j in range(4):
                    train = (folds[s, r] != folds[s, r, i]) & (folds[s, r] != j)
                    m1, m0 = x[s, train & y].mean(0), x[s, train & ~y].mean(0)
                    w = m1 - m0
                    right = (x[s, i] @ w - w @ (m1 + m0) / 2 > 0) == y[i]
                    assert losses[s, r, i, j] == float(not right)


# The coverage regime, fixed before measuring: few items in many dimensions (n = 50,
# d = 200, delta = 5), where the rule is unstable and the folds' errors correlated: 5-fold
# CV repeated R = 10 times (150 fits per data set), 2,000 data sets, nominal 90% (the
# paper's alpha = 0.1).
SETS, N_ITEMS, DIM, DELTA, FOLDS, REPS = 2000, 50, 200, 5.0, 5, 10


@pytest.fixture(scope="module")
def nested_coverage() -> dict[str, float]:
    err = 1.0 - expected_accuracy(np.random.default_rng(7), N_ITEMS, DIM, DELTA)
    rng = np.random.default_rng(41)
    x, y = simulate_data(rng, SETS, N_ITEMS, DIM, DELTA)
    half, mu = N_ITEMS // 2, class_mean(DIM, DELTA)
    err_xy = 1.0 - rule_accuracy(x[:, :half].mean(1), x[:, half:].mean(1), mu)
    hits = {"nested": 0, "nested_xy": 0, "naive": 0, "naive_xy": 0}
    ratios = []
    for s in range(0, SETS, 250):  # batches keep the (sets, n, K, d) arrays small
        losses, folds = ncm_nested_losses(rng, x[s : s + 250], y, FOLDS, REPS)
        for i in range(len(losses)):
            nested = nested_cv_interval(losses[i], folds[i], confidence=0.90)
            # The naive interval of one plain K-fold run, what a user gets without nesting.
            naive = nested_cv_interval(losses[i][:1], folds[i][:1], confidence=0.90)["naive"]
            for name, ci in (("nested", nested["ci"]), ("naive", naive)):
                lo, hi = ci if ci is not None else (np.inf, np.inf)  # none: a miss
                hits[name] += lo <= err <= hi
                hits[f"{name}_xy"] += lo <= err_xy[s + i] <= hi
            ratios.append(nested["width_ratio"] or np.nan)
    return {**{k: v / SETS for k, v in hits.items()}, "ratio": float(np.nanmedian(ratios))}


def test_nested_interval_covers_where_the_naive_one_fails(nested_coverage: dict) -> None:
    """At nominal 90%, 2,000 data sets. Monte-Carlo error of a coverage p: sqrt(p (1-p) /
    2000), 0.67 points at 90%. Measured: nested 94.2% (+-0.5) of the learner's expected
    error at n = 50 (Err) and 94.9% (+-0.5) of each data set's own fitted rule's error
    (Err_XY, the paper's target); the naive interval of one 5-fold run 74.5% (+-1.0) and
    75.4% (+-1.0); median nested / naive width 1.36."""
    c = nested_coverage
    assert c["nested"] >= 0.88 and c["nested_xy"] >= 0.88, c
    assert c["naive"] < 0.80 and c["naive_xy"] < 0.80, c


def test_no_spread_gives_no_interval() -> None:
    folds = np.arange(30) % 3
    r = nested_cv_interval(np.zeros((30, 3)), folds)
    assert r["ci"] is None and r["naive"] is None and r["estimate"] == 0.0


def test_bad_inputs_are_refused_in_one_line() -> None:
    folds = np.arange(30) % 3
    with pytest.raises(ValueError, match="K >= 3"):
        nested_cv_interval(np.zeros((30, 2)), np.arange(30) % 2)
    with pytest.raises(ValueError, match="shape"):
        nested_cv_interval(np.zeros((30, 3)), folds[:20])
    with pytest.raises(ValueError, match="at least 2 items"):
        nested_cv_interval(np.zeros((4, 3)), np.array([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="macro_f1"):
        loss_for_metric("macro_f1")


def test_metric_scale_accuracy_and_rmse() -> None:
    r = {"estimate": 0.1, "ci": [-0.02, 0.2], "naive": [0.05, 0.15]}
    acc = to_metric_scale(r, "accuracy")
    assert acc["estimate"] == pytest.approx(0.9) and acc["ci"] == pytest.approx([0.8, 1.0])
    rmse = to_metric_scale({"estimate": 4.0, "ci": [-1.0, 9.0], "naive": None}, "rmse")
    assert rmse == {"estimate": 2.0, "ci": [0.0, 3.0], "naive": None}


def test_docstring_examples() -> None:
    import doctest

    import randkit.cv.nested

    assert doctest.testmod(randkit.cv.nested, verbose=False).failed == 0


# End to end: the plan, per-item losses on disk, resume, and runners.


def _digits(n: int = 450) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[:n].astype(np.float32), y[:n]


def test_nested_plan_holds_the_pair_trials() -> None:
    from randkit.config import CVConfig
    from randkit.cv.plan import Trial, make_plan
    from randkit.streams import Streams

    y = np.arange(60) % 3
    plan = make_plan(CVConfig(folds=4, repeats=2, interval="nested"), y, None, Streams(0))
    outer = [t for t in plan.trials if t.inner is None]
    inner = [t for t in plan.trials if t.inner is not None]
    assert len(outer) == 4 * 2 and len(inner) == 4 * 3 // 2 * 2
    folds = {t.fold: set(t.test_idx.tolist()) for t in outer if t.repeat == 0}
    for t in (t for t in inner if t.repeat == 0):
        assert set(t.test_idx.tolist()) == folds[t.fold] | folds[t.inner]
        assert set(t.train_idx.tolist()) == set(range(60)) - folds[t.fold] - folds[t.inner]
        assert Trial.from_json(json.loads(json.dumps(t.to_json()))).id == t.id
        assert t.scopes()["init"] != outer[t.fold].scopes()["init"]  # streams of its own
    assert len({t.id for t in plan.trials}) == len(plan.trials)


@pytest.mark.parametrize(
    ("cv", "words"),
    [
        ({"folds": 2}, "folds >= 3"),
        ({"splitter": "shuffle_split"}, "k-fold splitter"),
        ({"repeats": 2, "decompose": True}, "decompose"),
    ],
)
def test_plans_nested_cv_cannot_use_are_refused(cv: dict, words: str) -> None:
    from randkit.config import validate_config
    from randkit.errors import UserError

    with pytest.raises(UserError, match=words):
        validate_config({"cv": {"interval": "nested", **cv}})


def test_the_default_interval_keeps_old_fingerprints() -> None:
    from randkit.config import validate_config

    old, new = validate_config({}), validate_config({"cv": {"interval": "nested"}})
    assert (
        "interval" not in json.dumps(old.fingerprint()) and old.fingerprint() != new.fingerprint()
    )


def test_refusals_of_the_python_api(tmp_path) -> None:
    import randkit
    from randkit.errors import UserError

    with pytest.raises(UserError, match="vectorized"):
        randkit.cross_validate("mlp", _digits(), folds=3, interval="nested", runner="vectorized")
    with pytest.raises(UserError, match="macro_f1"):
        randkit.cross_validate("mlp", _digits(), folds=3, interval="nested", metric="macro_f1")


def _run(out, runner: str):
    import randkit

    return randkit.cross_validate(
        "mlp", _digits(), folds=3, interval="nested", runner=runner, workers=2,
        train={"epochs": 1, "batch_size": 128}, out=out,
    )  # fmt: skip


def test_cross_validate_nested_end_to_end(tmp_path) -> None:
    """3 outer + 3 inner trainings; the summary's ci95 is the nested interval; a rerun trains
    nothing and gives the same summary; worker processes give the same interval."""
    first = _run(tmp_path / "seq", "sequential")
    s = first.summary
    assert first.trained == 6 and s["n_trials"] == 3 and len(first.table) == 3
    assert s["ci95_method"] == "nested" and s["ci95_corrected"] is None
    assert 0.0 <= s["ci95"][0] <= s["nested"]["estimate"] <= s["ci95"][1] <= 1.0
    assert s["nested"]["trainings"] == {"outer": 3, "inner": 3, "total": 6}
    assert s["per_metric"]["accuracy"]["ci95"] == s["ci95"]
    assert "Bates" in s["ci95_note"] and s["nested"]["n"] == 450
    saved = json.loads((tmp_path / "seq" / "summary.json").read_text())
    assert saved["ci95"] == s["ci95"] and (tmp_path / "seq/trials/f0x1/losses.safetensors").exists()
    again = _run(tmp_path / "seq", "sequential")
    assert again.trained == 0 and again.summary["ci95"] == s["ci95"]
    other = _run(tmp_path / "proc", "processes")
    assert other.trained == 6 and other.summary["ci95"] == s["ci95"]
    assert other.summary["nested"]["mse"] == s["nested"]["mse"]


@pytest.mark.slow
def test_ray_gives_the_sequential_interval(tmp_path) -> None:
    pytest.importorskip("ray")
    first, other = _run(tmp_path / "seq", "sequential"), _run(tmp_path / "ray", "ray")
    assert other.trained == 6 and other.summary["ci95"] == first.summary["ci95"]


def test_point_losses_of_each_task() -> None:
    import torch

    from randkit.cv.nested_run import point_losses

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert point_losses("classification", logits, torch.tensor([0, 0, 1])).tolist() == [
        0.0,
        1.0,
        1.0,
    ]
    out = torch.tensor([[1.0], [2.0]])  # an (N, 1) output against (N,) targets
    assert point_losses("regression", out, torch.tensor([0.0, 4.0])).tolist() == [1.0, 4.0]
