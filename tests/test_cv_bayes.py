"""randkit.cv.bayes: the Bayesian correlated t-test, checked against ``baycomp``.

``baycomp.two_on_single(x, y, rope, runs)`` (Benavoli et al.'s reference code) takes K-fold
CV repeated ``runs`` times, so n_test / n_train = 1 / (K - 1); randkit's function takes the
sizes. Both must give the same three probabilities within 1e-6.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from randkit.cli import main
from randkit.cv.bayes import bayesian_correlated_ttest, bayesian_verdict, default_rope
from randkit.cv.compare import compare_runs
from randkit.errors import UserError

baycomp = pytest.importorskip("baycomp")


def ours(a: np.ndarray, b: np.ndarray, folds: int, rope: float) -> tuple[float, ...]:
    r = bayesian_correlated_ttest(a - b, n_train=folds - 1, n_test=1, rope=rope)
    return r["p_a_better"], r["p_equivalent"], r["p_b_better"]


def theirs(a: np.ndarray, b: np.ndarray, runs: int, rope: float) -> tuple[float, ...]:
    probs = baycomp.two_on_single(a, b, rope=rope, runs=runs)
    if rope == 0:  # baycomp returns (left, right) without a ROPE
        return probs[0], 0.0, probs[1]
    return tuple(float(p) for p in probs)


@pytest.mark.parametrize(("folds", "runs"), [(10, 1), (5, 10), (2, 5), (3, 2)])
@pytest.mark.parametrize("rope", [0.0, 0.01, 0.05])
def test_equals_baycomp_on_random_scores(folds: int, runs: int, rope: float) -> None:
    rng = np.random.default_rng(folds * 100 + runs + int(rope * 1000))
    for _ in range(20):
        a = rng.uniform(0.7, 0.95, folds * runs)
        b = np.clip(a + rng.normal(rng.uniform(-0.03, 0.03), 0.02, a.size), 0, 1)
        assert ours(a, b, folds, rope) == pytest.approx(theirs(a, b, runs, rope), abs=1e-6)


@pytest.mark.parametrize(
    ("a", "b", "rope"),
    [
        ([0.9] * 10, [0.9] * 10, 0.01),  # identical runs: all equivalent
        ([0.9] * 10, [0.9] * 10, 0.0),  # no ROPE, exact tie: 0.5 / 0.5 as baycomp
        ([1.0] * 10, [0.5] * 10, 0.01),  # constant difference 0.5 > rope: A better
        ([0.5] * 10, [1.0] * 10, 0.0),  # constant difference -0.5: B better
        ([0.75] * 10, [0.75] * 5 + [0.5] * 5, 0.01),  # one run constant, the other not
        ([1.0, 0.5] * 5, [1.0, 0.5] * 5, 0.05),  # varying scores, zero difference
    ],
)
def test_equals_baycomp_at_zero_variance(a: list[float], b: list[float], rope: float) -> None:
    x, y = np.array(a), np.array(b)
    assert ours(x, y, 10, rope) == pytest.approx(theirs(x, y, 1, rope), abs=1e-6)


def test_zero_variance_is_a_point_mass_without_division() -> None:
    r = bayesian_correlated_ttest([0.02] * 6, 5, 1, rope=0.01)
    assert r["posterior"]["scale"] == 0.0 and r["p_a_better"] == 1.0
    assert bayesian_correlated_ttest([0.005] * 6, 5, 1, rope=0.01)["p_equivalent"] == 1.0
    with pytest.raises(ValueError, match="rope must be a non-negative number"):
        bayesian_correlated_ttest([0.01, 0.02], 5, 1, rope=-0.1)


def test_default_rope_and_verdict() -> None:
    assert default_rope(True, 0.9, 0.8) == (0.01, "1 point on a [0, 1] metric")
    assert default_rope(False, 2.0, 4.0)[0] == pytest.approx(0.03)
    undecided = {"p_a_better": 0.6, "p_equivalent": 0.3, "p_b_better": 0.1, "rope": 0.01}
    assert bayesian_verdict(undecided, ("x", "y")).startswith("no decision at P > 0.95")


# ---------------------------------------------------------------- compare_runs and the CLI


def fake_run(path: Path, accuracy: list[float], rmse: list[float]) -> Path:
    """A finished 5-fold x 2-repeat run as compare reads it: results.csv and summary.json."""
    path.mkdir()
    fields = ["id", "fold", "repeat", "seed_split", "train_size", "test_size", "accuracy", "rmse"]
    with open(path / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for i, (acc, err) in enumerate(zip(accuracy, rmse, strict=True)):
            writer.writerow([f"t{i}", i % 5, i // 5, 100 + i // 5, 80, 20, acc, err])
    summary = {"metric": "accuracy", "splitter": "stratified_kfold", "vary": ["split"]}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    acc_a = np.round(rng.uniform(0.85, 0.95, 10), 4)
    acc_b = np.round(acc_a - rng.normal(0.01, 0.01, 10), 4)
    a = fake_run(tmp_path / "run-a", acc_a.tolist(), (1 - acc_a).tolist())
    b = fake_run(tmp_path / "run-b", acc_b.tolist(), (1 - acc_b).tolist())
    return a, b, acc_a, acc_b


def test_compare_reports_the_bayesian_test_beside_the_frequentist_ones(runs) -> None:
    a, b, acc_a, acc_b = runs
    result = compare_runs(a, b)
    bayes = result["bayesian_correlated_t_test"]
    assert bayes["rope"] == 0.01 and "corrected_t_test" in result
    expected = baycomp.two_on_single(acc_a, acc_b, rope=0.01, runs=2)
    got = (bayes["p_a_better"], bayes["p_equivalent"], bayes["p_b_better"])
    assert got == pytest.approx(expected, abs=1e-6)
    # a loss: positive differences still favour A, and the default ROPE is relative
    loss = compare_runs(a, b, metric="rmse")["bayesian_correlated_t_test"]
    assert loss["rope_chosen"] == "1% of the runs' mean absolute score"
    assert loss["rope"] == pytest.approx(0.01 * (2 - acc_a.mean() - acc_b.mean()) / 2)
    expected = baycomp.two_on_single(-(1 - acc_a), -(1 - acc_b), rope=loss["rope"], runs=2)
    got = (loss["p_a_better"], loss["p_equivalent"], loss["p_b_better"])
    assert got == pytest.approx(expected, abs=1e-6)
    assert compare_runs(a, b, rope=0.0)["bayesian_correlated_t_test"]["p_equivalent"] == 0.0
    with pytest.raises(UserError, match="--rope"):
        compare_runs(a, b, rope=-1.0)


def test_cli_compare_prints_the_three_probabilities(runs, tmp_path: Path, capsys) -> None:
    a, b, _, _ = runs
    out = tmp_path / "c.json"
    assert main(["compare", str(a), str(b), "--rope", "0.02", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Bayesian correlated t-test (ROPE +-0.02, given (--rope))" in printed
    assert "P(run-a better)" in printed and "P(equivalent)" in printed
    saved = json.loads(out.read_text())
    assert saved["bayesian_correlated_t_test"]["rope"] == 0.02 and saved["bayesian_verdict"]
    assert main(["compare", str(a), str(b), "--rope", "-1"]) == 2
