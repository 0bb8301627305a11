"""The HTML report of a cross-validation run, built from synthetic run directories."""

from __future__ import annotations

import base64
import csv
import datetime
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from randkit.errors import UserError
from randkit.report import write_report

CLASSES = ["cat", "dog", "bird"]
COLUMNS = [
    "id", "fold", "repeat", "group", "seed_split", "seed_init", "seed_order", "seed_augment",
    "seed_noise", "seed_dropout", "train_size", "test_size", "accuracy", "loss", "macro_f1",
    "fit_seconds",
]  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def make_run(
    folder: Path,
    *,
    folds: int = 3,
    repeats: int = 2,
    groups: tuple[str, ...] = ("main",),
    components: bool = True,
    robustness: bool = False,
    val: bool = True,
    config: dict[str, Any] | None = None,
    trial_metrics: bool = True,
) -> Path:
    """A finished cross-validation run directory with random but fixed-seed numbers."""
    rng = np.random.default_rng(12345)
    folder.mkdir(parents=True, exist_ok=True)
    k = len(CLASSES)
    rows = []
    for group in groups:
        for repeat in range(repeats):
            for fold in range(folds):
                tid = f"{group.replace(':', '-')}-r{repeat}-f{fold}"
                accuracy = float(rng.uniform(0.8, 0.95))
                loss = float(rng.uniform(0.1, 0.6))
                seeds = [int(s) for s in rng.integers(0, 2**63, size=6)]
                rows.append(
                    [tid, fold, repeat, group, *seeds, 100, 50, accuracy, loss,
                     accuracy - 0.01, float(rng.uniform(1, 3))]
                )  # fmt: skip
                if not trial_metrics:
                    continue
                matrix = rng.integers(0, 20, size=(k, k)).tolist()
                epochs = 4
                history = []
                for epoch in range(1, epochs + 1):
                    entry = {
                        "epoch": epoch,
                        "lr": 0.01,
                        "train_loss": 1.0 / epoch + float(rng.uniform(0, 0.05)),
                        "train_accuracy": 1 - 0.5 / epoch,
                    }
                    if val:
                        entry |= {"val_loss": 1.1 / epoch, "val_accuracy": 1 - 0.6 / epoch}
                    history.append(entry)
                metrics = {
                    "id": tid,
                    "fold": fold,
                    "repeat": repeat,
                    "group": group,
                    "test": {"accuracy": accuracy, "loss": loss, "macro_f1": accuracy - 0.01},
                    "confusion_matrix": matrix,
                    "per_class": {
                        "precision": rng.uniform(0.7, 1, k).tolist(),
                        "recall": rng.uniform(0.7, 1, k).tolist(),
                        "f1": rng.uniform(0.7, 1, k).tolist(),
                        "support": [int(sum(r)) for r in matrix],
                    },
                    "history": history,
                    "fit_seconds": 1.5,
                }
                trial = folder / "trials" / tid
                trial.mkdir(parents=True)
                (trial / "metrics.json").write_text(json.dumps(metrics))
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    summary = {
        "metric": "accuracy",
        "mean": 0.876543,
        "std": 0.0234567,
        "ci95": [0.85123, 0.90187],
        "ci95_corrected": [0.83456, 0.91852],
        "n_trials": len(rows),
        "folds": folds,
        "repeats": repeats,
        "runner": "sequential",
        "classes": CLASSES,
        "per_metric": {
            "accuracy": {"mean": 0.876543, "std": 0.0234567, "ci95": [0.85123, 0.90187]},
            "loss": {"mean": 0.35, "std": 0.1, "ci95": [0.3, 0.4]},
            "macro_f1": {"mean": 0.866543, "std": 0.0234567, "ci95": [0.84, 0.89]},
        },
        "variance_components": {
            "method": "nested random effects",
            "components": {
                "split": {"variance": 4e-4, "ci": [1e-4, 9e-4], "share": 0.6},
                "init": {"variance": 2e-4, "ci": None, "share": 0.3},
                "residual": {"variance": 6e-5, "ci": [1e-5, 2e-4], "share": 0.1},
            },
        }
        if components
        else {},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(
        yaml.safe_dump(config or {"seed": 0, "cv": {"folds": folds, "repeats": repeats}})
    )
    if robustness:
        curve = [{"level": lv, "accuracy": 0.9 - lv, "loss": 0.3 + lv} for lv in (0, 0.1, 0.3)]
        (folder / "robustness.json").write_text(
            json.dumps({"noise": {"gaussian": curve, "salt_pepper": curve[:2]}})
        )
    return folder


def images(html: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in IMAGE.findall(html)]


def test_full_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "digits-cv", robustness=True)
    path = write_report(run, date=datetime.date(2030, 1, 2))
    assert path == run / "report.html"
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>")
    assert html.rstrip().endswith("</html>")
    assert "digits-cv" in html and "2030-01-02" in html
    # headline, 4 decimals
    assert "accuracy 0.8765" in html
    assert "0.0235" in html
    assert "[0.8512, 0.9019]" in html
    assert "[0.8346, 0.9185]" in html
    assert "6 trials" in html and "3 folds \u00d7 2 repeats" in html
    assert "runner sequential" in html
    # one row per trial, every column, seeds exact, metrics to 4 decimals
    assert html.count('<tr class="trial">') == 6
    for column in COLUMNS:
        assert f"<th>{column}</th>" in html
    results = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    assert f'<td class="num">{results[0]["seed_split"]}</td>' in html
    assert f"{float(results[0]['accuracy']):.4f}" in html
    assert f">{results[0]['accuracy']}<" not in html
    # classes, per-class table, variance table
    for name in CLASSES:
        assert f"<td>{name}</td>" in html
    assert "nested random effects" in html
    # variance components as SDs in points: 4e-4 of accuracy is SD 2.00 pts, CI sqrt of ends
    assert "split SD 2.00 pts, 60% of the total" in html
    assert "[1.00, 3.00 pts]" in html
    # the scores lead the trial table; the seeds sit in a folded table of their own
    header = html[html.index('<table class="trials">') :]
    header = header[: header.index("</tr>")]
    assert header.index("<th>accuracy</th>") < header.index("<th>id</th>")
    assert "seed_split" not in header
    folded = html[
        html.index('<details class="seeds">') : html.index(
            "</details>", html.index('<details class="seeds">')
        )
    ]
    assert folded.count('<tr class="seed-row">') == 6 and results[0]["seed_split"] in folded
    # strip, curves, variance, confusion, robustness
    pngs = images(html)
    assert len(pngs) == 5
    assert all(png.startswith(PNG_SIGNATURE) and len(png) > 1000 for png in pngs)
    for section in ("scores", "curves", "variance", "confusion", "per-class", "robustness"):
        assert f'<section id="{section}">' in html
    lowered = html.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script" not in lowered and "<link" not in lowered


def test_optional_parts_omitted(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", components=False, robustness=False, val=False)
    html = write_report(run).read_text()
    assert date_today() in html
    assert len(images(html)) == 3  # strip, curves, confusion
    assert 'id="variance"' not in html
    assert 'id="robustness"' not in html
    assert 'id="curves"' in html


def test_without_trial_metrics_or_config(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", components=False, trial_metrics=False)
    (run / "config.yaml").unlink()
    html = write_report(run).read_text()
    assert len(images(html)) == 1  # the strip plot only
    assert html.count('<tr class="trial">') == 6
    for section in ("config", "curves", "confusion", "per-class"):
        assert f'id="{section}"' not in html


def test_robustness_only_when_file_exists(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", robustness=True)
    html = write_report(run).read_text()
    assert '<section id="robustness">' in html
    assert len(images(html)) == 5
    (run / "robustness.json").unlink()
    html = write_report(run).read_text()
    assert 'id="robustness"' not in html
    assert len(images(html)) == 4


def test_grouped_trials(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", folds=2, repeats=1, groups=("main", "vary:init"))
    html = write_report(run).read_text()
    assert html.count('<tr class="trial">') == 4
    assert "<td>vary:init</td>" in html
    assert "by group" in html


def test_text_from_files_is_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    run = make_run(tmp_path / "run", config={"name": evil, "note": "a & b"})
    summary = json.loads((run / "summary.json").read_text())
    summary["runner"] = "<b>bold</b>"
    summary["classes"] = ["<img src=x>", "$x^2$", "ok"]
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run).read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    assert "a &amp; b" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<img src=x>" not in html and "&lt;img src=x&gt;" in html
    assert "$x^2$" in html  # shown as written in the table, and plotted without mathtext


@pytest.mark.parametrize("name", ["summary.json", "results.csv"])
def test_missing_required_file(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path / "run")
    (run / name).unlink()
    with pytest.raises(UserError, match=re.escape(name)) as info:
        write_report(run)
    assert info.value.field == "run"
    assert not (run / "report.html").exists()


def test_unreadable_files_are_user_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match=r"summary\.json"):
        write_report(run)
    run = make_run(tmp_path / "other")
    trial = next((run / "trials").iterdir()) / "metrics.json"
    metrics = json.loads(trial.read_text())
    metrics["confusion_matrix"] = [[1, 2], [3, 4]]
    trial.write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="confusion_matrix"):
        write_report(run)
    with pytest.raises(UserError, match="not a directory"):
        write_report(tmp_path / "nowhere")


def test_rewrite_is_atomic_and_overwrites(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    first = write_report(run).read_text()
    summary = json.loads((run / "summary.json").read_text())
    summary["mean"] = 0.123456
    (run / "summary.json").write_text(json.dumps(summary))
    second = write_report(run).read_text()
    assert "accuracy 0.8765" in first
    assert "accuracy 0.1235" in second and "accuracy 0.8765" not in second
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert sorted(p.name for p in run.glob("report*")) == ["report.html"]


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", robustness=True)
    day = datetime.date(2030, 1, 2)
    first = write_report(run, date=day).read_bytes()
    assert write_report(run, date=day).read_bytes() == first


def date_today() -> str:
    return datetime.date.today().isoformat()


def test_comparison_page_of_two_5x2_runs(tmp_path: Path) -> None:
    """Both verdicts, the 5x2cv test beside the corrected one, a row and a point per trial."""
    from randkit.report import write_comparison

    runs = [make_run(tmp_path / name, folds=2, repeats=5) for name in ("a", "b")]
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        summary |= {"splitter": "5x2", "vary": ["split", "init"]}
        (run / "summary.json").write_text(json.dumps(summary))
    rows = list(csv.reader((runs[1] / "results.csv").read_text().splitlines()))
    column = rows[0].index("accuracy")
    for number, row in enumerate(rows[1:]):
        row[column] = repr(float(row[column]) - 0.02 - 0.003 * number)  # B a little worse
    with open(runs[1] / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    path = write_comparison(runs[0], runs[1], date=datetime.date(2030, 1, 2))
    assert path == runs[0] / "compare-b.html"
    html = path.read_text(encoding="utf-8")
    assert "Dietterich 5x2cv t-test" in html and "Nadeau-Bengio corrected" in html
    assert "P(A better)" in html and "&plusmn;0.01" in html  # the default ROPE: 1 point
    assert html.count('<tr class="pair">') == 10
    assert len(images(html)) == 2  # the paired differences and the posterior
    with pytest.raises(UserError, match="not a directory"):
        write_comparison(runs[0], tmp_path / "nowhere")
    loss = write_comparison(runs[0], runs[1], tmp_path / "loss.html", metric="loss").read_text()
    assert "loss: A" in loss and "1% of the runs" in loss  # no natural unit: a relative ROPE


def test_a_train_run_gets_its_own_page(tmp_path: Path) -> None:
    run = tmp_path / "train"
    run.mkdir()
    history = [{"epoch": e, "lr": 0.1, "train_loss": 1 / e, "train_accuracy": 1 - 0.5 / e,
                "val_loss": 1.2 / e, "val_accuracy": 1 - 0.6 / e} for e in (1, 2, 3)]  # fmt: skip
    metrics = {
        "test": {"loss": 0.3, "accuracy": 0.9, "macro_f1": 0.89},
        "history": history, "epochs_run": 3, "steps": 30, "stopped_early": False,
        "classes": CLASSES, "sizes": {"train": 100, "test": 50, "val": 10},
        "seeds": {"init": 123456789012345678},
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    html = write_report(run).read_text()
    assert "test accuracy 0.9000" in html and "Clopper-Pearson" in html
    assert len(images(html)) == 1 and '<section id="curves">' in html
    assert "123456789012345678" in html and '<section id="config">' not in html
