"""The page comparing two cross-validation runs of the same plan (``randkit report A B``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from randkit.cv.compare import compare_runs
from randkit.report import compare_figures
from randkit.report import reading as rd


def compare_context(
    run_a: Path, run_b: Path, metric: str | None = None, rope: float | None = None
) -> dict[str, Any]:
    """Everything the comparison template shows; the numbers are ``compare_runs``'s."""
    result = compare_runs(run_a, run_b, metric, rope=rope)
    names = (run_a.resolve().name, run_b.resolve().name)
    columns, rows = rd.read_results(run_a / "results.csv")
    _, rows_b = rd.read_results(run_b / "results.csv")
    metric = result["metric"]
    # compare_runs pairs the trials in A's order; read the same rows to label them.
    ids = rd.column(columns, rows, "id")
    index = columns.index(metric)
    by_id_b = {row[columns.index("id")]: row for row in rows_b}
    repeats = rd.column(columns, rows, "repeat") or ["0"] * len(rows)
    folds = rd.column(columns, rows, "fold") or [""] * len(rows)
    table = [
        {
            "id": tid, "fold": fold, "repeat": repeat,
            "a": rd.num(float(row[index])), "b": rd.num(float(by_id_b[tid][index])),
            "difference": f"{diff:+.4f}",
        }
        for tid, fold, repeat, row, diff in zip(
            ids, folds, repeats, rows, result["differences"], strict=True
        )
    ]  # fmt: skip
    test = result["corrected_t_test"]
    bayes = result["bayesian_correlated_t_test"]
    post = bayes["posterior"]
    figures = {
        "differences": rd.uri(
            compare_figures.paired_differences(
                result["differences"],
                [f"repeat {r}" for r in repeats],
                metric,
                rd.pair(test.get("ci")),
                float(bayes["rope"]),
            )
        ),
        "posterior": rd.uri(
            compare_figures.posterior(post["mean"], post["scale"], post["df"], bayes["rope"], names)
        ),
    }
    return {
        "kind": "comparison",
        "name": f"{names[0]} vs {names[1]}",
        "names": names,
        "metric": metric,
        "result": result,
        "means": (rd.num(result["mean_a"]), rd.num(result["mean_b"])),
        "frequentist": _frequentist(result),
        "bayes": {
            "a": f"{bayes['p_a_better']:.3f}",
            "equivalent": f"{bayes['p_equivalent']:.3f}",
            "b": f"{bayes['p_b_better']:.3f}",
            "rope": f"{bayes['rope']:.4g}",
            "rope_chosen": str(bayes.get("rope_chosen", "")),
            "posterior": f"Student t, location {post['mean']:+.4f}, scale {post['scale']:.4f}, "
            f"{post['df']} degrees of freedom (rho = {bayes['rho']:.3f})",
            "verdict": result["bayesian_verdict"],
        },
        "table": table,
        "figures": figures,
    }


def _frequentist(result: dict[str, Any]) -> list[dict[str, str]]:
    """One row per frequentist test: its statistic, p-value and CI of the difference."""
    test = result["corrected_t_test"]
    rows = [
        {
            "test": "Nadeau-Bengio corrected resampled t-test",
            "statistic": f"t = {test['t']:.3f}, df = {test['df']}",
            "p": f"{test['p_value']:.4g}",
            "ci": rd.interval(test.get("ci")),
        }
    ]
    five = result.get("five_by_two_t_test")
    if isinstance(five, dict):
        rows.append({
            "test": "Dietterich 5x2cv t-test",
            "statistic": f"t = {five['t']:.3f}",
            "p": f"{five['p_value']:.4g}",
            "ci": "",
        })  # fmt: skip
    return rows
