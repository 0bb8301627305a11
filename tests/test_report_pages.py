"""Every kind of report page, from real runs: each figure and table present, and a screenshot
in headless Chromium that is not blank (issue #17 item 6).

The screenshots go to a temporary folder; ``RANDKIT_UPDATE_SCREENSHOTS=1`` also copies them,
shrunk to a palette of 128 colours, to ``docs/img/report-*.png``:

    RANDKIT_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_report_pages.py
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from randkit.config import validate_config
from randkit.cv import run_cv
from randkit.report import write_comparison
from randkit.train import train_run

PNG = b"\x89PNG\r\n\x1a\n"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell")

BASE: dict[str, Any] = {
    "seed": 11,
    "data": {"kind": "digits", "val_fraction": 0.1},
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "train": {"epochs": 6, "batch_size": 64, "lr": 0.003, "device": "cpu"},
    "cv": {"folds": 5, "repeats": 2, "vary": ["split", "init"], "runner": "vectorized",
           "inner_val_fraction": 0.1, "threads_per_trial": 1},
}  # fmt: skip

# What each page must hold: section ids, <table class=...> and the sections with a figure.
EXPECTED = {
    "cv": {
        "sections": {"headline", "config", "trials", "scores", "curves", "variance",
                     "confusion", "per-class"},
        "tables": {"per-metric", "trials", "seeds", "variance", "per-class"},
        "figures": {"scores", "curves", "variance", "confusion"},
    },
    "train": {
        "sections": {"headline", "curves", "config", "seeds"},
        "tables": {"scores", "facts", "seeds"},
        "figures": {"curves"},
    },
    "compare": {
        "sections": {"headline", "frequentist", "bayesian", "differences"},
        "tables": {"frequentist", "bayesian", "differences"},
        "figures": {"bayesian", "differences"},
    },
}  # fmt: skip


def config(**model_args: Any) -> Any:
    raw = json.loads(json.dumps(BASE))
    raw["model"]["args"].update(model_args)
    return validate_config(raw)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cross-validation of two MLPs on digits (same plan), their comparison and a plain
    training run, each with the page randkit writes for it."""
    root = tmp_path_factory.mktemp("pages")
    wide = run_cv(config(), root / "mlp-32-cv", quiet=True)
    narrow = run_cv(config(hidden=[8]), root / "mlp-8-cv", quiet=True)
    trained = train_run(config(), root / "mlp-32", quiet=True)
    assert wide.report is not None and narrow.report is not None
    return {
        "cv": wide.report,
        "train": trained.out / "report.html",
        "compare": write_comparison(wide.out, narrow.out),
    }


class Page(HTMLParser):
    """The section ids, table classes and images (with their section) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: set[str] = set()
        self.images: dict[str, list[bytes]] = {}
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "section" and found.get("id"):
            self.sections.append(str(found["id"]))
        if tag == "table":
            self.tables.update(str(found.get("class") or "").split())
        if tag in ("script", "link", "iframe"):
            self.remote.append(tag)
        if tag == "img":
            source = str(found.get("src") or "")
            if not source.startswith("data:image/png;base64,"):
                self.remote.append(source[:60])
                return
            data = base64.b64decode(source.partition(",")[2], validate=True)
            self.images.setdefault(self.sections[-1], []).append(data)


@pytest.mark.parametrize("kind", ["cv", "train", "compare"])
def test_every_figure_and_table_is_present(pages: dict[str, Path], kind: str) -> None:
    page = Page()
    page.feed(pages[kind].read_text(encoding="utf-8"))
    expected = EXPECTED[kind]
    assert expected["sections"] <= set(page.sections), page.sections
    assert len(page.sections) == len(set(page.sections))
    assert expected["tables"] <= page.tables, page.tables
    assert expected["figures"] <= set(page.images), sorted(page.images)
    for section, pngs in page.images.items():
        for png in pngs:
            assert png.startswith(PNG) and len(png) > 2000, section
    assert page.remote == []  # everything inline: no scripts, links or remote images


def test_the_pages_say_it_plainly(pages: dict[str, Path]) -> None:
    cv = pages["cv"].read_text(encoding="utf-8")
    assert " pts, " in cv and "% of the total" in cv  # SDs in points, with their share
    assert '<details class="seeds">' in cv
    compare = pages["compare"].read_text(encoding="utf-8")
    for text in ("P(A better)", "P(equivalent)", "P(B better)", "corrected resampled t-test"):
        assert text in compare
    assert compare.count('<tr class="pair">') == 10


def test_cli_report_of_a_train_run_and_of_two_runs(pages: dict[str, Path], tmp_path: Path) -> None:
    train_dir, cv_a = pages["train"].parent, pages["cv"].parent
    done = run_cli("report", str(train_dir))
    assert done.returncode == 0, done.stderr
    assert "report.html" in done.stdout
    out = tmp_path / "a-vs-b.html"
    done = run_cli("report", str(cv_a), str(pages["compare"].parent.parent / "mlp-8-cv"),
                   "--out", str(out), "--rope", "0.02")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "&plusmn;0.02" in out.read_text(encoding="utf-8")
    done = run_cli("report", str(train_dir), "--rope", "0.02")
    assert done.returncode == 2 and "RUN_B" in done.stderr


def browser() -> str | None:
    for name in (os.environ.get("RANDKIT_CHROMIUM"), *BROWSERS):
        if name and (found := shutil.which(name)):
            return found
    return None


def screenshot(page: Path, png: Path, height: int) -> None:
    found = browser()
    if found is None:
        pytest.skip("no headless Chromium found (apt-get install chromium, or RANDKIT_CHROMIUM)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [found, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--screenshot={png}", f"--window-size=1200,{height}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert png.is_file() and png.stat().st_size > 0, done.stderr[-2000:]


@pytest.mark.parametrize(("kind", "height"), [("cv", 3400), ("train", 1500), ("compare", 2200)])
def test_screenshot_is_not_blank(
    pages: dict[str, Path], kind: str, height: int, tmp_path: Path
) -> None:
    from PIL import Image, ImageStat

    png = tmp_path / f"report-{kind}.png"
    screenshot(pages[kind], png, height)
    with Image.open(png) as image:
        grey = image.convert("L")
        assert grey.size == (1200, height)
        assert ImageStat.Stat(grey).stddev[0] > 10  # text and figures, not one flat colour
        inked = sum(grey.histogram()[:200])  # pixels darker than near-white
        assert inked > 0.02 * grey.size[0] * grey.size[1]
        if os.environ.get("RANDKIT_UPDATE_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            small = image.convert("RGB").quantize(colors=128)
            small.save(DOCS_IMG / png.name, optimize=True)
