"""Randomized smoothing (``randkit.deploy.smoothing``) and ``randkit certify``.

The soundness tests use a linear classifier whose smoothed classifier is known in closed
form. With logits ``[m(x), -m(x)]``, ``m(x) = w.x + b``, the base classifier picks class 0
iff ``m(x + e) > 0``; ``w.e ~ N(0, sigma^2 ||w||^2)``, so ``P(class 0) = Phi(m(x) / (sigma
||w||))``: the smoothed class is the sign of ``m(x)`` and its exact certified L2 radius is
``sigma * PhiInv(pA) = |m(x)| / ||w||``, the distance to the decision boundary (Cohen et al.,
Theorem 1 is tight for linear classifiers). A certificate is wrong when it names the other
class or a radius above that distance; the guarantee is that this happens with probability
at most alpha for each input, so over many independent inputs the wrong fraction must not
exceed alpha beyond binomial sampling noise (one-sided binomial test at level 1e-3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import binomtest, norm
from torch import nn

from conftest import run_cli
from randkit.cli import main
from randkit.deploy.smoothing import (
    ABSTAIN,
    Smoothed,
    lower_confidence_bound,
    upper_confidence_bound,
)
from randkit.streams import seeded_generator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits-smoothing.yaml"
TEST_LEVEL = 1e-3  # a rate test fails when a one-sided binomial test rejects at this level


# --------------------------------------------------------------------------- helpers


def linear_problem(
    count: int, dim: int, sigma: float, seed: int, spread: float = 3.0
) -> tuple[Smoothed, torch.Tensor, np.ndarray]:
    """A 2-class linear model, ``count`` inputs and their signed exact radii (float64).

    Signed distances to the boundary are ``sigma * t``: 70 % with t uniform in
    [-spread, spread], 30 % near zero (t ~ N(0, 0.05^2)), so that inputs close to the
    boundary, where the smoothed classifier is hardest to estimate, are well represented.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(dim)
    b = 0.3
    near = int(0.3 * count)
    t = np.concatenate([rng.uniform(-spread, spread, count - near), rng.normal(0, 0.05, near)])
    base = rng.standard_normal((count, dim))
    unit = w / np.linalg.norm(w)
    shift = sigma * t - (base @ w + b) / np.linalg.norm(w)
    x = (base + shift[:, None] * unit).astype(np.float32)

    linear = torch.nn.utils.skip_init(nn.Linear, dim, 2)  # no global RNG for the init
    weight = torch.tensor(np.stack([w, -w]), dtype=torch.float32)
    bias = torch.tensor([b, -b], dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    # Exact distances from the float32 values the model really uses.
    w32 = weight[0].double().numpy()
    signed = (x.astype(np.float64) @ w32 + float(bias[0])) / np.linalg.norm(w32)
    return Smoothed(linear, num_classes=2, sigma=sigma, device="cpu"), torch.from_numpy(x), signed


def exact_class(signed: np.ndarray) -> np.ndarray:
    return np.where(signed > 0, 0, 1)


def assert_rate_at_most(failures: int, trials: int, alpha: float, what: str) -> None:
    """``failures / trials`` is not significantly above ``alpha`` (one-sided binomial test)."""
    p_value = binomtest(failures, trials, alpha, alternative="greater").pvalue
    assert p_value >= TEST_LEVEL, (
        f"{what}: {failures}/{trials} = {failures / trials:.4f} > alpha = {alpha} "
        f"(p = {p_value:.2g})"
    )


# --------------------------------------------------------------- 1. soundness by simulation


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_certify_is_sound_by_simulation(alpha: float) -> None:
    sigma, count = 0.5, 2000
    smoothed, x, signed = linear_problem(count, dim=10, sigma=sigma, seed=11)
    truth, exact_radius = exact_class(signed), np.abs(signed)

    predicted, radius = smoothed.certify(
        x, n0=32, n=512, alpha=alpha, batch_size=4096, generator=seeded_generator(1)
    )

    certified = predicted != ABSTAIN
    assert np.all(radius[~certified] == 0.0)
    assert np.all(radius[certified] >= 0.0)
    wrong = certified & ((predicted != truth) | (radius > exact_radius))
    assert_rate_at_most(int(wrong.sum()), count, alpha, "wrong certificates")
    # The check has teeth: most inputs are certified, with radii near the exact ones.
    assert certified.mean() > 0.6
    assert np.median(exact_radius[certified] - radius[certified]) < 0.25 * sigma


def test_point_estimate_radius_fails_the_same_check() -> None:
    """The simulation detects an unsound certificate: the plug-in radius sigma * PhiInv(nA/n)
    (no confidence bound) overshoots the exact radius about half of the time."""
    sigma, count, n = 0.5, 1000, 512
    smoothed, x, signed = linear_problem(count, dim=10, sigma=sigma, seed=12, spread=2.0)
    counts = smoothed.sample_counts(x, n, 4096, seeded_generator(2))
    top = counts.argmax(1)
    p_hat = np.clip(counts.max(1) / n, 0.5, 1 - 0.5 / n)
    naive = sigma * norm.ppf(p_hat)
    wrong = (top != exact_class(signed)) | (naive > np.abs(signed))
    assert wrong.mean() > 0.3


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_predict_is_sound_by_simulation(alpha: float) -> None:
    count = 2000
    smoothed, x, signed = linear_problem(count, dim=10, sigma=0.5, seed=13, spread=1.0)
    predicted = smoothed.predict(
        x, n=512, alpha=alpha, batch_size=4096, generator=seeded_generator(3)
    )
    wrong = (predicted != ABSTAIN) & (predicted != exact_class(signed))
    assert_rate_at_most(int(wrong.sum()), count, alpha, "wrong predictions")
    assert set(np.unique(predicted)) <= {ABSTAIN, 0, 1}
    # Far from the boundary PREDICT answers, and answers right.
    far = np.abs(signed) > 0.5
    assert np.all(predicted[far] == exact_class(signed)[far])


@pytest.mark.parametrize("radius_in_sigmas", [0.0, 0.5, 1.0])
def test_certify_at_radius_is_sound_by_simulation(radius_in_sigmas: float) -> None:
    sigma, count, alpha = 0.5, 2000, 0.1
    r = radius_in_sigmas * sigma
    smoothed, x, signed = linear_problem(count, dim=10, sigma=sigma, seed=14, spread=2.5)
    decision = smoothed.certify_at_radius(
        x, r, alpha, max_n=512, batch_size=4096, generator=seeded_generator(4), n0=32
    )
    truth, exact_radius = exact_class(signed), np.abs(signed)
    wrong = decision.certified & ((decision.predicted != truth) | (exact_radius < r))
    assert_rate_at_most(int(wrong.sum()), count, alpha, f"wrong certifications at r = {r}")
    # A class shown (no abstention) is right too: established means pA > 1/2 was shown.
    assert np.all(decision.established[decision.certified])
    shown_wrong = decision.established & (decision.predicted != truth)
    assert_rate_at_most(int(shown_wrong.sum()), count, alpha, "classes shown but wrong")
    # Inputs whose exact radius is below r: any certification at r is wrong.
    at_risk = (exact_radius < r) | (decision.predicted != truth)
    assert at_risk.sum() > 100
    assert_rate_at_most(
        int(decision.certified[at_risk].sum()), int(at_risk.sum()), alpha, "at-risk inputs"
    )
    # And it certifies where it clearly should.
    easy = exact_radius > r + 0.5 * sigma
    assert decision.certified[easy].mean() > 0.95


# ------------------------------------------------------------------------------ 2. bounds


@pytest.mark.parametrize("trials", [1, 2, 7, 50, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_bounds_match_scipy_exact_interval(trials: int, alpha: float) -> None:
    ks = np.unique(np.linspace(0, trials, 41).round().astype(int))
    lower = lower_confidence_bound(ks, trials, alpha)
    upper = upper_confidence_bound(ks, trials, alpha)
    for k, low, up in zip(ks, lower, upper, strict=True):
        # The two-sided exact interval at level 1 - 2 alpha has the one-sided bounds as ends.
        ci = binomtest(int(k), trials).proportion_ci(1 - 2 * alpha, method="exact")
        assert low == pytest.approx(ci.low, abs=1e-10)
        assert up == pytest.approx(ci.high, abs=1e-10)
    # Edge cases by hand: 0 and n successes.
    assert lower[0] == 0.0
    assert upper[-1] == 1.0
    assert upper[0] == pytest.approx(1 - alpha ** (1 / trials))
    assert lower[-1] == pytest.approx(alpha ** (1 / trials))
    assert np.all(np.diff(lower) > 0) and np.all(np.diff(upper) > 0)
    assert np.all(lower < upper)


def test_bounds_broadcast_over_arrays() -> None:
    successes = np.array([[0, 3], [10, 10]])
    trials = np.array([10, 10])
    lower = lower_confidence_bound(successes, trials, 0.05)
    assert lower.shape == (2, 2)
    assert lower[0, 0] == 0.0 and lower[1, 0] == lower[1, 1] == pytest.approx(0.05**0.1)
    assert upper_confidence_bound(successes, 10, 0.05).shape == (2, 2)


@pytest.mark.parametrize("p", [0.02, 0.3, 0.5, 0.77, 0.97])
def test_bounds_cover_by_simulation(p: float) -> None:
    alpha, trials, draws = 0.05, 200, 20_000
    successes = np.random.default_rng(int(p * 1000)).binomial(trials, p, size=draws)
    lower_misses = int((lower_confidence_bound(successes, trials, alpha) > p).sum())
    upper_misses = int((upper_confidence_bound(successes, trials, alpha) < p).sum())
    assert_rate_at_most(lower_misses, draws, alpha, f"lower bound above p = {p}")
    assert_rate_at_most(upper_misses, draws, alpha, f"upper bound below p = {p}")


# ------------------------------------------------------------------------- 3. determinism


def test_same_seed_same_results_other_seed_other_counts() -> None:
    smoothed, x, _ = linear_problem(40, dim=10, sigma=0.5, seed=21, spread=0.5)

    def everything(seed: int) -> list[Any]:
        g = seeded_generator(seed)
        counts = smoothed.sample_counts(x, 300, 256, g)
        classes, radii = smoothed.certify(x, 20, 300, 0.01, 256, g)
        predicted = smoothed.predict(x, 300, 0.01, 256, g)
        d = smoothed.certify_at_radius(x, 0.1, 0.01, 400, 256, g, n0=20)
        return [counts, classes, radii, predicted, d.predicted, d.certified, d.samples]

    first, again, other = everything(5), everything(5), everything(6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert np.all(first[0].sum(1) == 300)


def _grouping_case(dim: int) -> tuple[Smoothed, torch.Tensor]:
    smoothed, x, _ = linear_problem(5, dim=dim, sigma=1.0, seed=22, spread=0.3)
    return smoothed, x


@pytest.mark.parametrize(
    "dim",
    [
        64,  # e.g. 8x8 digits: every noise batch holds a multiple of 16 numbers
        10,  # not a multiple of 16: noise is drawn in fixed per-input chunks anyway
    ],
)
def test_counts_do_not_depend_on_grouping(dim: int) -> None:
    smoothed, x, n = *_grouping_case(dim), 50
    # One input per call, each call one batch, one generator shared in input order.
    g = seeded_generator(7)
    one_by_one = np.concatenate([smoothed.sample_counts(x[i : i + 1], n, n, g) for i in range(5)])
    for batch_size in (1, 7, n - 1, n, n + 1, 2 * n, 3 * n, 5 * n, 100 * n):
        together = smoothed.sample_counts(x, n, batch_size, seeded_generator(7))
        np.testing.assert_array_equal(together, one_by_one, err_msg=f"batch_size={batch_size}")


# ------------------------------------------------------------------- 4. certify_at_radius


def test_argument_errors() -> None:
    smoothed, x, _ = linear_problem(2, dim=4, sigma=0.5, seed=23)
    with pytest.raises(ValueError, match="radius"):
        smoothed.certify_at_radius(x, -0.1, 0.01, 100, 100, seeded_generator(0))
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma"):
            Smoothed(smoothed.model, 2, sigma, "cpu")


def test_certify_at_radius_saves_samples_and_agrees_with_fixed_n() -> None:
    sigma, count, alpha, max_n = 0.5, 600, 0.01, 2048
    r = 0.25 * sigma
    smoothed, x, signed = linear_problem(count, dim=10, sigma=sigma, seed=24, spread=3.0)
    decision = smoothed.certify_at_radius(x, r, alpha, max_n, 8192, seeded_generator(8), n0=32)
    classes, radii = smoothed.certify(x, 32, max_n, alpha, 8192, seeded_generator(9))

    assert np.all((decision.samples >= 1) & (decision.samples <= max_n))
    assert np.all(decision.predicted != ABSTAIN)
    # Easy inputs (large margin either way) stop early; on average far below max_n.
    easy = np.abs(signed) > 2 * sigma
    assert easy.sum() > 100
    assert np.all(decision.samples[easy] <= 128)
    assert decision.samples.mean() < 0.3 * max_n
    # Agreement with fixed-n certification where fixed n is decisive.
    fixed = radii >= r
    decisive = (radii >= r + 0.5 * sigma) | (radii < r - 0.1 * sigma)
    agree = decision.certified[decisive] == fixed[decisive]
    assert decisive.sum() > 0.5 * count
    assert agree.mean() >= 0.95
    both = decision.certified & fixed
    assert np.all(decision.predicted[both] == classes[both])
    # As many certified as fixed n at the same budget, give or take sampling noise.
    assert decision.certified.sum() >= fixed.sum() - 3 * np.sqrt(fixed.sum())


def test_certify_at_radius_beyond_any_budget_is_never_certified() -> None:
    smoothed, x, _ = linear_problem(20, dim=4, sigma=0.5, seed=25)
    decision = smoothed.certify_at_radius(x, 10.0, 0.01, 1000, 1000, seeded_generator(0), n0=10)
    assert not decision.certified.any() and decision.samples.max() <= 16


# ----------------------------------------------------------------------------------- 5. CLI


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits smoothing example, shortened to 2 epochs of a small CNN, trained by the CLI."""
    folder = tmp_path_factory.mktemp("smoothing")
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["train"].update(epochs=2, device="cpu")
    raw["model"]["args"] = {"widths": [8, 16], "hidden": 32}
    config = folder / "digits-smoothing.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = folder / "run"
    result = run_cli("train", str(config), "--out", str(run), "--quiet")
    assert result.returncode == 0, result.stderr
    return run


def _tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def _without_time(rows: list[list[str]], header: list[str]) -> list[list[str]]:
    column = header.index("time")
    return [row[:column] + row[column + 1 :] for row in rows]


CERTIFY = ("--sigma", "0.25", "--n", "200", "--n0", "20", "--max", "5", "--quiet")


def test_cli_certify_writes_tsv_curve_and_png(trained_run: Path) -> None:
    result = run_cli("certify", str(trained_run), *CERTIFY)
    assert result.returncode == 0, result.stderr
    tsv = trained_run / "certify-sigma0.25.tsv"
    header, rows = _tsv(tsv)
    assert tsv.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert len(rows) == 5
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3, 4]
    radii, correct = [], []
    for _, label, predict, radius, hit, _time in rows:
        assert int(hit) == int(int(predict) == int(label))
        assert float(radius) >= 0 and (int(predict) != ABSTAIN or float(radius) == 0)
        radii.append(float(radius))
        correct.append(bool(int(hit)))

    curve = json.loads(tsv.with_suffix(".curve.json").read_text())
    assert curve["radii"][0] == 0.0
    assert np.all(np.diff(curve["radii"]) > 0)
    assert np.all(np.diff(curve["certified_accuracy"]) <= 0)
    assert curve["inputs"] == 5 and curve["n"] == 200 and curve["n0"] == 20
    for r, accuracy in zip(curve["radii"], curve["certified_accuracy"], strict=True):
        expected = np.mean(np.array(correct) & (np.array(radii) >= r))
        assert accuracy == pytest.approx(expected)
    png = tsv.with_suffix(".curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    # The same command again: the same TSV except the time column.
    again = run_cli("certify", str(trained_run), *CERTIFY)
    assert again.returncode == 0, again.stderr
    header_again, rows_again = _tsv(tsv)
    assert header_again == header
    assert _without_time(rows_again, header) == _without_time(rows, header)


def test_cli_certify_at_radius_adds_samples(trained_run: Path) -> None:
    result = run_cli("certify", str(trained_run), *CERTIFY, "--radius", "0.25")
    assert result.returncode == 0, result.stderr
    tsv = trained_run / "certify-sigma0.25-radius0.25.tsv"
    header, rows = _tsv(tsv)
    assert header == [*"idx label predict radius correct time samples certified".split()]
    assert len(rows) == 5
    for row in rows:
        assert 1 <= int(row[6]) <= 200  # max n 200
        assert row[7] in ("true", "false")
        assert float(row[3]) == (0.25 if row[7] == "true" else 0.0)
        # predict keeps its meaning: -1 only for an abstention, never for "not certified".
        assert row[7] == "false" or int(row[2]) != ABSTAIN
        assert int(row[4]) == int(int(row[2]) == int(row[1]))
    curve = json.loads(tsv.with_suffix(".curve.json").read_text())
    assert curve["radius"] == 0.25 and curve["radii"][0] == 0.0
    assert tsv.with_suffix(".curve.png").is_file()


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("--sigma", "0"), "--sigma"),
        (("--sigma", "0.25", "--alpha", "2"), "--alpha"),
        (("--sigma", "0.25", "--n", "0"), "--n"),
        (("--sigma", "0.25", "--radius", "-1"), "--radius"),
    ],
)
def test_cli_certify_bad_options_exit_2(
    trained_run: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], name: str
) -> None:
    before = sorted(p.name for p in trained_run.iterdir())
    assert main(["certify", str(trained_run), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {name}:")
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_cli_certify_missing_run_exits_2(tmp_path: Path) -> None:
    result = run_cli("certify", str(tmp_path / "nope"), "--sigma", "0.25", "--quiet")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: run:") and "nope" in err


def test_cli_certify_at_radius_with_small_n(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small.tsv"
    args = ["--sigma", "0.25", "--n", "50", "--n0", "10", "--max", "1", "--radius", "0.25"]
    code = main(["certify", str(trained_run), *args, "--out", str(out), "--quiet"])
    assert code == 0 or (code == 2 and "--n" in capsys.readouterr().err)


def test_cli_certify_radius_zero_keeps_the_fixed_n_results(trained_run: Path) -> None:
    args = ["certify", str(trained_run), "--sigma", "0.5", "--n", "200", "--n0", "10"]
    assert main([*args, "--max", "1", "--quiet"]) == 0
    fixed = trained_run / "certify-sigma0.5.tsv"
    header = fixed.read_text().splitlines()[0]
    assert main([*args, "--max", "1", "--quiet", "--radius", "0"]) == 0
    assert fixed.read_text().splitlines()[0] == header


def test_certify_from_counts_matches_the_papers_algorithm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cohen et al.'s CERTIFY written out independently (their core.py uses statsmodels'
    proportion_confint(nA, n, alpha=2 * alpha, method="beta")[0]; SciPy's exact two-sided
    interval at level 1 - 2 alpha has the same lower end)."""
    from scipy.stats import binomtest, norm

    sigma, alpha, n0, n = 0.37, 0.001, 100, 10_000
    rng = np.random.default_rng(4)
    selection_counts = rng.multinomial(n0, [0.6, 0.3, 0.1], size=40)
    top = selection_counts.argmax(1)
    counts = np.zeros((40, 3), dtype=np.int64)
    for i in range(40):
        counts[i, top[i]] = rng.integers(0, n + 1)
        counts[i, (top[i] + 1) % 3] = n - counts[i, top[i]]
    calls = iter([selection_counts, counts])
    monkeypatch.setattr(Smoothed, "sample_counts", lambda self, *args, **kw: next(calls))
    smoothed = Smoothed(nn.Linear(2, 3), 3, sigma, "cpu")
    predicted, radius = smoothed.certify(torch.zeros(40, 2), n0, n, alpha, 1000, None)
    for i in range(40):
        n_a = int(counts[i, top[i]])
        low = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        if low < 0.5:
            assert predicted[i] == -1 and radius[i] == 0.0
        else:
            assert predicted[i] == top[i]
            assert radius[i] == pytest.approx(sigma * norm.ppf(low), abs=1e-9)
    assert {int(p) for p in predicted} >= {-1}  # some inputs abstain in this draw
