"""HTML reports: one self-contained file per page, figures inlined as PNG, no scripts.

Example::

    from randkit.report import write_comparison, write_report
    write_report("runs/digits-cv")        # runs/digits-cv/report.html (a cross-validation)
    write_report("runs/digits")           # runs/digits/report.html (a `randkit train` run)
    write_comparison("runs/a-cv", "runs/b-cv")   # runs/a-cv/compare-b-cv.html

A cross-validation directory holds ``results.csv`` and ``summary.json`` (required), and
optionally ``config.yaml``, ``trials/<id>/metrics.json`` and ``robustness.json``; a training
run holds ``metrics.json``. A missing optional part leaves its section out of the page.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from randkit import atomic
from randkit.errors import UserError
from randkit.extras import require

require("report", "randkit.report")  # one line naming the extra instead of a traceback

import jinja2  # noqa: E402

from randkit.report.compare_page import compare_context  # noqa: E402
from randkit.report.cv_page import cv_context  # noqa: E402
from randkit.report.pages import COMPARE, TRAIN  # noqa: E402
from randkit.report.template import BASE, SECTIONS, TEMPLATE  # noqa: E402
from randkit.report.train_page import is_train_run, train_context  # noqa: E402

__all__ = ["write_comparison", "write_report"]

REPORT_NAME = "report.html"
_REQUIRED = ("results.csv", "summary.json")

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(
        {
            "base.html": BASE,
            "cv.html": TEMPLATE,
            "train.html": TRAIN,
            "compare.html": COMPARE,
            **SECTIONS,
        }
    ),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def write_report(run_dir: str | Path, *, date: datetime.date | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path: the page of a
    cross-validation, or of a training run when ``run_dir`` holds a ``randkit train`` run.

    ``date`` is the date shown under the title (default: today). Raises ``UserError`` when
    ``run_dir`` is neither (no ``results.csv``/``summary.json``, no ``metrics.json``), or
    holds a file it cannot read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run", f"{run_dir} is not a directory")
    if is_train_run(run_dir):
        context, page = train_context(run_dir), "train.html"
    else:
        missing = [name for name in _REQUIRED if not (run_dir / name).is_file()]
        if missing:
            raise UserError(
                "run",
                f"{run_dir} has no {' and no '.join(missing)}; not a finished cross-validation "
                "run (nor a training run: no metrics.json)",
            )
        context, page = cv_context(run_dir), "cv.html"
    path = run_dir / REPORT_NAME
    atomic.write_text(path, _render(page, context, date))
    return path


def write_comparison(
    run_a: str | Path,
    run_b: str | Path,
    out: str | Path | None = None,
    *,
    metric: str | None = None,
    rope: float | None = None,
    date: datetime.date | None = None,
) -> Path:
    """Write the page comparing two cross-validation runs of the same plan, atomically, to
    ``out`` (default ``run_a/compare-<name of run_b>.html``) and return its path: paired
    differences per trial, the frequentist tests and the Bayesian correlated t-test
    (``randkit.cv.compare.compare_runs``, with its ``metric`` and ``rope``)."""
    run_a, run_b = Path(run_a), Path(run_b)
    for run in (run_a, run_b):
        if not run.is_dir():
            raise UserError("run", f"{run} is not a directory")
    path = Path(out) if out is not None else run_a / f"compare-{run_b.resolve().name}.html"
    if path.is_dir():
        raise UserError("--out", f"{str(path)!r} is a directory; give a file name")
    context = compare_context(run_a, run_b, metric, rope)
    atomic.write_text(path, _render("compare.html", context, date))
    return path


def _render(page: str, context: dict[str, Any], date: datetime.date | None) -> str:
    day = (date or datetime.date.today()).isoformat()
    return _ENV.get_template(page).render(date=day, **context)
