"""The bad-input table (issue #18): every case is refused with exit code 2 (or
``randkit.errors.UserError`` from the Python API), exactly one line that names the field and
the value, and nothing left behind: the folder tree around the inputs (the run folder, the
image cache, the system temp folder) is the same after the refusal as before.

Cases run in-process (``randkit.cli.main``): the same exit code and stderr as the installed
command, without a 3 s interpreter start each. The bad-input section of ``docs/faults.md``
is generated from CASES: ``python tests/faults/test_bad_inputs.py --write`` rewrites it in
place (between its markers; the other suites' sections stay).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.model_selection import GroupKFold
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, as a script
import randkit
from conftest import FAST_EXPERIMENT, merged, run_cli
from randkit.cli import main
from randkit.errors import UserError


@dataclass(frozen=True)
class Inputs:
    """Where a case writes its inputs (``d``) and a small trained run (``run``)."""

    d: Path
    run: Path


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # yaml, data, cli or api: where the bad input is
    input: str  # what is wrong, for docs/faults.md
    make: Callable[[Inputs], list[str] | Callable[[], Any]]  # CLI argv, or an API call
    needles: tuple[str, ...]  # the field and the value, in the one line
    absent: tuple[str, ...] = ()  # what a weak message said instead (issue #18, 12)
    issue: str = ""  # the failure of issue #18 this case pins

    @property
    def api(self) -> bool:
        return self.surface == "api"


# -- input builders ---------------------------------------------------------------------------
Make = Callable[[Inputs], list[str]]


def _config(d: Path, raw: dict[str, Any] | str) -> Path:
    path = d / "exp.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def _cmd(command: str, raw: dict[str, Any] | str, d: Path, *flags: str) -> list[str]:
    return [command, str(_config(d, raw)), "--out", str(d / "run"), "--quiet", *flags]


def train(make_raw: Callable[[Path], dict[str, Any] | str], *flags: str) -> Make:
    return lambda i: _cmd("train", make_raw(i.d), i.d, *flags)


def cv(make_raw: Callable[[Path], dict[str, Any] | str], *flags: str) -> Make:
    return lambda i: _cmd("cv", make_raw(i.d), i.d, *flags)


def fast(**sections: Any) -> Callable[[Path], dict[str, Any]]:
    """FAST_EXPERIMENT with sections updated; a callable value is given the inputs folder."""
    return lambda d: merged(
        FAST_EXPERIMENT, **{k: v(d) if callable(v) else v for k, v in sections.items()}
    )


def yaml_text(text: str) -> Callable[[Path], str]:
    """A config as YAML text: ``.inf``, ``.nan``, comments and ``null`` as a user types them."""
    return lambda d: text


FAST_YAML = "seed: 3\ndata: {kind: digits}\nmodel: {name: mlp, args: {hidden: [8]}}\n"


def _npz(d: Path, x: np.ndarray, y: np.ndarray, **more: np.ndarray) -> dict[str, Any]:
    np.savez(d / "arrays.npz", x=x, y=y, **more)
    return {"kind": "npz", "path": str(d / "arrays.npz")}


def npz(x: Any, y: Any, **more: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda d: _npz(
        d, np.asarray(x), np.asarray(y), **{k: np.asarray(v) for k, v in more.items()}
    )


VECTORS = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
PAIRS = np.arange(40) % 2


def images(*classes: str, per_class: dict[str, int] | None = None) -> Callable[[Path], dict]:
    """An image folder of ``classes`` (3 images each unless ``per_class`` says), its cache
    in the inputs folder, so that a cache left behind shows in the tree."""

    def make(d: Path) -> dict[str, Any]:
        for name in classes:
            (d / "images" / name).mkdir(parents=True)
            for i in range((per_class or {}).get(name, 3)):
                Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(d / "images" / name / f"{i}.png")
        (d / "images").mkdir(exist_ok=True)
        return {"kind": "image_folder", "path": str(d / "images"), "cache_dir": str(d / "cache")}

    return make


def csv(body: str, header: str = "text,label", **options: str) -> Callable[[Path], dict]:
    def make(d: Path) -> dict[str, Any]:
        (d / "texts.csv").write_text(f"{header}\n{body}")
        return {"kind": "csv_text", "path": str(d / "texts.csv"), **options}

    return make


TEXT_MODEL = {"name": "text", "args": {}}
FLOAT_LABELS = "".join(f"word{i} more words,{0.137 * i + 0.01:.3f}\n" for i in range(30))
BLANK_TEXTS = "".join(f",{'pos' if i % 2 else 'neg'}\n" for i in range(30))
PUNCTUATION = "".join(f'"?! ...",{i % 2}\n' for i in range(30))
WORDS = "".join(f"{'good fine' if i % 2 else 'bad poor'} film {i},{i % 2}\n" for i in range(30))


def wide_model(d: Path) -> dict[str, Any]:
    """A ``module:factory`` that ignores ``num_classes``: 13 outputs for digits' 10 classes."""
    (d / "rk_faults_wide.py").write_text(
        "from torch import nn\n\n\ndef wide(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 13))\n"
    )
    return {"name": "rk_faults_wide:wide", "args": {}}


def certify(*flags: str) -> Callable[[Inputs], list[str]]:
    return lambda i: ["certify", str(i.run), "--sigma", "0.25", "--n", "20", "--quiet", *flags]


def api(**kwargs: Any) -> Callable[[Inputs], Callable[[], Any]]:
    """``randkit.cross_validate(**kwargs)`` into ``d/run``; a callable ``data`` is given ``d``."""

    def make(i: Inputs) -> Callable[[], Any]:
        given = {k: v(i.d) if callable(v) and k == "data" else v for k, v in kwargs.items()}
        given.setdefault("out", i.d / "run")
        given.setdefault("train", {"epochs": 1})
        return lambda: randkit.cross_validate(**given)

    return make


class WideNet(torch.nn.Module):
    """A user's class that outputs 13 values whatever the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(6, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Items(Dataset):
    """A map-style Dataset of (vector, label) items with the labels given."""

    def __init__(self, labels: list[Any]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return torch.from_numpy(VECTORS[index % 40]), self.labels[index]


class NoLength(Dataset):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3), 0


class TextItems(Items):
    def __getitem__(self, index: int) -> tuple[str, int]:  # type: ignore[override]
        return "a text, not a tensor", int(self.labels[index])


def file(name: str, content: bytes, kind: str) -> Callable[[Path], dict[str, Any]]:
    """A data file of ``content`` (not what its name promises) as data.path."""

    def make(d: Path) -> dict[str, Any]:
        (d / name).write_bytes(content)
        return {"kind": kind, "path": str(d / name)}

    return make


def x_only_npz(d: Path) -> dict[str, Any]:
    np.savez(d / "a.npz", x=VECTORS)
    return {"kind": "npz", "path": str(d / "a.npz")}


def out_is_a_file(i: Inputs) -> list[str]:
    config = str(_config(i.d, FAST_YAML))
    return ["train", config, "--out", config, "--quiet"]


def export_as(fmt: str) -> Callable[[Inputs], list[str]]:
    return lambda i: [
        *("export", str(i.run), "--repository", str(i.d / "repo"), "--name", "m"),
        *("--format", fmt),
    ]


LATIN_1 = "text,label\ncafé,a\n".encode("latin-1")
NAN_AT_ROW_3 = np.where(np.arange(240).reshape(40, 6) == 20, np.nan, VECTORS)
INF_AT_ROW_7 = np.where(np.arange(240).reshape(40, 6) == 42, np.inf, VECTORS)
INF, NAN = float("inf"), float("nan")

# fmt: off
CASES: list[Case] = [
    # -- config (YAML): non-finite numbers anywhere in the schema (issue #18, 2) ------------
    Case("lr-inf", "yaml", "train.lr: .inf", train(yaml_text(FAST_YAML + "train: {lr: .inf}\n")),
         ("train.lr", "finite", "inf"), issue="2"),
    Case("lr-nan", "yaml", "train.lr: .nan", train(yaml_text(FAST_YAML + "train: {lr: .nan}\n")),
         ("train.lr", "finite", "nan"), issue="2"),
    Case("momentum-minus-inf", "yaml", "train.momentum: -.inf",
         train(yaml_text(FAST_YAML + "train: {momentum: -.inf}\n")),
         ("train.momentum", "finite", "-inf"), issue="2"),
    Case("grad-clip-inf", "yaml", "train.grad_clip: .inf (an optional number)",
         train(fast(train={"grad_clip": INF})), ("train.grad_clip", "finite", "inf"), issue="2"),
    Case("weight-decay-nan", "yaml", "train.weight_decay: .nan",
         train(fast(train={"weight_decay": NAN})), ("train.weight_decay", "finite", "nan")),
    Case("test-fraction-nan", "yaml", "data.test_fraction: .nan",
         train(fast(data={"test_fraction": NAN})), ("data.test_fraction", "finite", "nan")),
    Case("warmup-inf", "yaml", "train.warmup_epochs: .inf",
         train(fast(train={"warmup_epochs": INF})), ("train.warmup_epochs", "finite", "inf")),
    Case("noise-level-inf", "yaml", "randomize.input_noise.level: .inf",
         train(fast(randomize={"input_noise": {"kind": "gaussian", "level": INF}})),
         ("randomize.input_noise.level", "finite", "inf")),
    Case("weight-noise-inf", "yaml", "randomize.weight_noise.std: .inf",
         train(fast(randomize={"weight_noise": {"std": INF}})),
         ("randomize.weight_noise.std", "finite", "inf")),
    Case("affine-scale-inf", "yaml", "an augmentation's pair: affine scale [1, .inf]",
         train(fast(randomize={"augment": [{"kind": "affine", "scale": [1.0, INF]}]})),
         ("randomize.augment.0.affine.scale.1", "finite", "inf")),
    Case("erasing-value-minus-inf", "yaml", "erasing value -.inf (a number-or-'random' field)",
         train(fast(randomize={"augment": [{"kind": "erasing", "value": -INF}]})),
         ("randomize.augment.0.erasing.value", "finite", "-inf")),
    Case("model-arg-nan", "yaml", "model.args.dropout: .nan (free-form factory arguments)",
         cv(fast(model={"name": "mlp", "args": {"dropout": NAN}})),
         ("model.args.dropout", "finite", "nan"), issue="2"),
    Case("model-arg-list-inf", "yaml", "model.args.hidden: [8, .inf]",
         train(fast(model={"name": "mlp", "args": {"hidden": [8, INF]}})),
         ("model.args.hidden.1", "finite", "inf")),
    # -- config (YAML): the file itself (issue #18, 7) ---------------------------------------
    Case("empty-yaml", "yaml", "an empty file", train(yaml_text("")),
         ("config", "is empty", "exp.yaml"), issue="7"),
    Case("comments-only-yaml", "yaml", "a file of comments only",
         cv(yaml_text("# my experiment\n# to do\n")), ("config", "is empty", "exp.yaml"),
         issue="7"),
    Case("null-yaml", "yaml", "a file holding only `null`", train(yaml_text("null\n")),
         ("config", "is empty", "exp.yaml"), issue="7"),
    Case("list-yaml", "yaml", "a YAML list, not a mapping", train(yaml_text("- seed: 3\n")),
         ("config", "mapping", "exp.yaml")),
    # -- config (YAML): settings that contradict each other ----------------------------------
    Case("warmup-not-below-epochs", "yaml", "train.warmup_epochs >= train.epochs",
         train(fast(train={"epochs": 2, "warmup_epochs": 2})), ("train.warmup_epochs", "2")),
    Case("nesterov-without-momentum", "yaml", "nesterov SGD with momentum 0",
         train(fast(train={"optimizer": "sgd", "nesterov": True, "momentum": 0})),
         ("train.nesterov", "momentum 0")),
    Case("seed-too-large", "yaml", "seed: 2**63", train(fast(seed=2**63)), ("seed", str(2**63))),
    Case("source-seed-string", "yaml", "seeds.init: 'x'", train(fast(seeds={"init": "x"})),
         ("seeds.init", "'x'")),
    Case("image-size-zero", "yaml", "data.image_size: [0, 32]",
         train(fast(data={"kind": "digits", "image_size": [0, 32]})),
         ("data.image_size", "[0, 32]")),
    Case("folds-one", "yaml", "cv.folds: 1", cv(fast(cv={"folds": 1})), ("cv.folds", ">= 2", "1")),
    Case("five-by-two-with-folds", "yaml", "cv.splitter 5x2 with cv.folds 3",
         cv(fast(cv={"splitter": "5x2", "folds": 3})), ("cv.splitter", "'5x2'", "folds=3")),
    Case("decompose-one-repeat", "yaml", "cv.decompose with one repeat",
         cv(fast(cv={"decompose": True})), ("cv.decompose", "repeats >= 2", "1")),
    Case("vary-twice", "yaml", "cv.vary lists 'init' twice",
         cv(fast(cv={"vary": ["init", "init"]})), ("cv.vary", "twice", "'init'")),
    Case("unknown-cv-metric", "yaml", "cv.metric: auroc (not reported)",
         cv(fast(cv={"metric": "auroc"})), ("cv.metric", "'auroc'")),
    Case("group-kfold-without-groups", "yaml", "cv.splitter group_kfold on digits (no groups)",
         cv(fast(cv={"splitter": "group_kfold"})),
         ("cv.splitter", "'group_kfold'", "group labels")),
    Case("stratified-regression", "yaml", "task regression with a stratified splitter",
         cv(fast(task="regression", cv={"splitter": "stratified_kfold"})),
         ("cv.splitter", "'stratified_kfold'", "'regression'")),
    Case("regression-on-digits", "yaml", "task regression on data.kind digits",
         cv(fast(task="regression")), ("task", "'regression'", "'digits'")),
    Case("text-with-augment", "yaml", "csv_text data with image augmentation",
         train(fast(data=csv(WORDS), model=TEXT_MODEL, randomize={"augment": [{"kind": "hflip"}]})),
         ("randomize", "csv_text")),
    Case("too-many-folds", "yaml", "cv.folds 2000 for 1797 examples", cv(fast(cv={"folds": 2000})),
         ("cv.folds", "1797", "2000")),
    # -- models: wrong for the task or the data (issue #18, 3 and 12) ------------------------
    Case("output-width-train", "yaml", "a module:factory with 13 outputs for 10 classes (train)",
         train(fast(model=wide_model)),
         ("model.name", "'rk_faults_wide:wide'", "13", "10 classes"), issue="3"),
    Case("output-width-cv", "yaml", "the same model under randkit cv", cv(fast(model=wide_model)),
         ("model.name", "13", "10 classes"), issue="3"),
    Case("output-width-vectorized", "yaml", "the same model under the vectorized runner",
         cv(fast(model=wide_model, cv={"runner": "vectorized"})),
         ("model.name", "13", "10 classes"), issue="3"),
    Case("cnn-on-vectors", "data", "model cnn on vector (N, D) npz data",
         train(fast(data=npz(VECTORS, PAIRS), model={"name": "cnn", "args": {}})),
         ("model.name", "'cnn'", "[6]"), absent=("unpack",), issue="12"),
    Case("resnet-on-vectors", "data", "model resnet on vector data",
         cv(fast(data=npz(VECTORS, PAIRS), model={"name": "resnet", "args": {}})),
         ("model.name", "'resnet'", "[6]")),
    Case("cnn-on-text", "data", "model cnn on CSV text",
         train(fast(data=csv(WORDS), model={"name": "cnn", "args": {}})),
         ("model.name", "'cnn'", "[64]")),
    Case("text-model-on-images", "data", "model text on digits", train(fast(model=TEXT_MODEL)),
         ("model.name", "'text'", "[1, 8, 8]"), absent=("vocab_size",)),
    Case("missing-user-module", "yaml", "model.name of a module that does not exist",
         train(fast(model={"name": "rk_no_such_module:make"})),
         ("model.name", "'rk_no_such_module:make'")),
    # -- data: CSV text (issue #18, 8 and 12) ------------------------------------------------
    Case("csv-blank-texts", "data", "a CSV whose text is empty in every row",
         train(fast(data=csv(BLANK_TEXTS), model=TEXT_MODEL)),
         ("data.text_column", "'text'", "no words", "30 rows"), issue="8"),
    Case("csv-punctuation-texts", "data", "a CSV whose texts hold no word (only punctuation)",
         cv(fast(data=csv(PUNCTUATION), model=TEXT_MODEL)), ("data.text_column", "no words")),
    Case("csv-float-labels", "data", "a CSV with continuous float labels",
         train(fast(data=csv(FLOAT_LABELS), model=TEXT_MODEL)),
         ("data.label_column", "'label'", "continuous", "'0.010'"), absent=("test_fraction",),
         issue="12"),
    Case("csv-float-labels-cv", "data", "the same CSV under randkit cv",
         cv(fast(data=csv(FLOAT_LABELS), model=TEXT_MODEL)), ("data.label_column", "continuous"),
         absent=("cv.folds",), issue="12"),
    Case("csv-header-only", "data", "a CSV with a header and no rows",
         train(fast(data=csv(""), model=TEXT_MODEL)), ("data.path", "no rows", "texts.csv")),
    Case("csv-empty-label", "data", "a CSV row without a label",
         train(fast(data=csv("good film,pos\nbad film,\n"), model=TEXT_MODEL)),
         ("data.label_column", "line 3", "texts.csv")),
    Case("csv-missing-label-column", "data", "data.label_column not in the CSV",
         train(fast(data=csv(WORDS, label_column="sentiment"), model=TEXT_MODEL)),
         ("data.label_column", "'sentiment'", "text, label")),
    Case("csv-missing-group-column", "data", "data.group_column not in the CSV",
         cv(fast(data=csv(WORDS, group_column="user"), model=TEXT_MODEL)),
         ("data.group_column", "'user'")),
    Case("csv-not-utf8", "data", "a CSV in Latin-1 with non-ASCII bytes",
         train(fast(data=file("texts.csv", LATIN_1, "csv_text"), model=TEXT_MODEL)),
         ("data.path", "cannot read CSV", "texts.csv")),
    # -- data: image folders (issue #18, 9) --------------------------------------------------
    Case("single-class-images", "data",
         "an image folder with one class (cache must stay unwritten)",
         train(fast(data=images("cat"))), ("data", "at least 2 classes", "['cat']"), issue="9"),
    Case("single-class-images-cv", "data", "the same folder under randkit cv",
         cv(fast(data=images("cat"))), ("data", "at least 2 classes", "['cat']"), issue="9"),
    Case("one-image-class", "data", "an image folder whose class 'dog' holds one image (no cache)",
         train(fast(data=images("cat", "dog", per_class={"dog": 1}))),
         ("data.test_fraction", "at least 2 examples per class", "label 1"),
         absent=("Classes with too few members",), issue="9"),
    Case("model-refused-on-images", "data", "a model refused once images are decoded (no cache)",
         train(fast(data=images("cat", "dog"), model={"name": "text", "args": {}})),
         ("model.name", "'text'", "[3, 32, 32]"), issue="9"),
    Case("no-class-folders", "data", "an image folder without class sub-folders",
         train(fast(data=images())), ("data.path", "no class sub-folders", "images")),
    Case("image-path-is-file", "data", "data.path of an image folder names a file",
         train(fast(data=file("x.png", b"png", "image_folder"))),
         ("data.path", "not found", "x.png")),
    # -- data: npz -------------------------------------------------------------------------------
    Case("npz-without-y", "data", "an .npz without array y",
         train(fast(data=x_only_npz)),
         ("data.path", "lacks array 'y'", "a.npz")),
    Case("npz-y-two-dimensional", "data", "y of shape (N, 2) for classification",
         train(fast(data=npz(VECTORS, np.zeros((40, 2))))), ("data.path", "y (N,)", "(40, 2)")),
    Case("npz-string-x", "data", "x of strings",
         train(fast(data=npz(np.array([["a"]] * 40), PAIRS))), ("data.path", "numeric", "<U1")),
    Case("npz-inf-x", "data", "x holding inf at row 7",
         train(fast(data=npz(INF_AT_ROW_7, PAIRS))),
         ("data.path", "NaN or Inf", "row 7")),
    Case("npz-nan-y", "data", "y holding NaN",
         train(fast(data=npz(VECTORS, np.r_[np.nan, PAIRS[1:]]))), ("data.path", "y in", "NaN")),
    Case("npz-groups-shape", "data", "groups of another length than y",
         cv(fast(data=npz(VECTORS, PAIRS, groups=np.arange(39)))),
         ("data.path", "groups", "(39,)")),
    Case("npz-continuous-y", "data", "continuous float y for a classification config",
         train(fast(data=npz(VECTORS, np.linspace(0.05, 0.95, 40)))),
         ("task", "float", "continuous"), absent=("test_fraction",)),
    Case("npz-not-a-zip", "data", "a text file named .npz",
         train(fast(data=file("a.npz", b"x,y\n", "npz"))),
         ("data.path", "cannot read npz", "a.npz")),
    # -- CLI arguments -------------------------------------------------------------------------
    Case("cv-runner-flag", "cli", "randkit cv --runner gpu", cv(fast(), "--runner", "gpu"),
         ("cv.runner", "'gpu'")),
    Case("cv-workers-zero", "cli", "randkit cv --workers 0", cv(fast(), "--workers", "0"),
         ("cv.workers", ">= 1", "0")),
    Case("cv-seed-negative", "cli", "randkit cv --seed -1", cv(fast(), "--seed", "-1"),
         ("seed", ">= 0", "-1")),
    Case("epochs-not-a-number", "cli", "randkit train --epochs ten",
         train(fast(), "--epochs", "ten"), ("--epochs", "'ten'")),
    Case("train-out-is-a-file", "cli", "randkit train --out naming an existing file",
         out_is_a_file,
         ("out", "exp.yaml", "not a directory")),
    Case("certify-max-zero", "cli", "randkit certify --max 0", certify("--max", "0"),
         ("--max", ">= 1", "0"), issue="11"),
    Case("certify-max-negative", "cli", "randkit certify --max -3", certify("--max", "-3"),
         ("--max", ">= 1", "-3"), issue="11"),
    Case("certify-out-missing-folder", "cli",
         "randkit certify --out into a folder that does not exist",
         lambda i: certify("--out", str(i.d / "no" / "such" / "c.tsv"))(i),
         ("--out", "does not exist", "such"), issue="11"),
    Case("certify-out-is-a-folder", "cli", "randkit certify --out naming a folder",
         lambda i: certify("--out", str(i.d))(i), ("--out", "is a folder")),
    Case("certify-sigma-inf", "cli", "randkit certify --sigma inf",
         lambda i: [*certify()(i), "--sigma", "inf"], ("--sigma", "finite", "inf")),
    Case("certify-radius-nan", "cli", "randkit certify --radius nan", certify("--radius", "nan"),
         ("--radius", "finite", "nan")),
    Case("certify-skip-zero", "cli", "randkit certify --skip 0", certify("--skip", "0"),
         ("--skip", ">= 1", "0")),
    Case("explain-out-missing-folder", "cli", "randkit explain --out into a missing folder",
         lambda i: ["explain", str(i.run), "--out", str(i.d / "no" / "s.png")],
         ("--out", "does not exist", "no")),
    Case("explain-sigma-inf", "cli", "randkit explain --sigma inf",
         lambda i: ["explain", str(i.run), "--sigma", "inf"], ("--sigma", "finite", "inf")),
    Case("export-format", "cli", "randkit export --format zip",
         export_as("zip"),
         ("--format", "'zip'")),
    Case("evaluate-nothing-asked", "cli", "randkit evaluate without --noise or --mc",
         lambda i: ["evaluate", str(i.run)], ("noise", "--noise", "--mc")),
    Case("evaluate-bad-noise", "cli", "randkit evaluate --noise gaussian:a,b",
         lambda i: ["evaluate", str(i.run), "--noise", "gaussian:a,b", "--quiet"], ("noise", "a")),
    # -- Python API: randkit.cross_validate ------------------------------------------------------
    Case("api-lr-inf", "api", "train={'lr': inf}", api(model="mlp", train={"lr": INF}),
         ("train.lr", "finite", "inf"), issue="2"),
    Case("api-runner", "api", "runner='gpu'", api(runner="gpu"), ("runner", "'gpu'")),
    Case("api-cv-own-argument", "api", "cv={'folds': 3} (folds= is its own argument)",
         api(cv={"folds": 3}), ("cv.folds", "folds=")),
    Case("api-loss-not-callable", "api", "loss=3", api(loss=3), ("loss", "3")),
    Case("api-num-workers", "api", "num_workers=-1", api(num_workers=-1), ("num_workers", "-1")),
    Case("api-array-lengths", "api", "(x, y) of lengths 40 and 39",
         api(model="mlp", data=(VECTORS, PAIRS[:39])), ("data", "40", "39")),
    Case("api-nan-x", "api", "(x, y) arrays whose x holds NaN at row 3",
         api(model="mlp", data=(NAN_AT_ROW_3, PAIRS)), ("data", "NaN", "row 3"),
         absent=("data.npz",)),
    Case("api-string-x", "api", "(x, y) arrays whose x holds strings",
         api(model="mlp", data=(np.array([["a"] * 6] * 40), PAIRS)), ("data", "numeric", "<U1"),
         absent=("data.npz",)),
    Case("api-groups-length", "api", "groups= of 3 labels for 40 examples",
         api(model="mlp", data=(VECTORS, PAIRS), groups=np.arange(3)),
         ("data", "groups", "(40,)", "(3,)"), absent=("data.npz",)),
    Case("api-float-labels", "api", "continuous y with task='classification'",
         api(model="mlp", data=(VECTORS, np.linspace(0.05, 0.95, 40)), task="classification"),
         ("task", "integer class labels", "0.05"), absent=("test_fraction",), issue="12"),
    Case("api-group-kfold-object", "api", "splitter=GroupKFold() without groups",
         api(model="mlp", data=(VECTORS, PAIRS), splitter=GroupKFold(3)),
         ("splitter", "GroupKFold", "groups="), absent=("stratified_kfold",), issue="12"),
    Case("api-splitter-without-split", "api", "splitter=object()",
         api(model="mlp", data=(VECTORS, PAIRS), splitter=object()), ("splitter", "split()")),
    Case("api-fit-and-model", "api", "both model= and fit=",
         api(model="mlp", fit=lambda trial: {}), ("fit", "model=")),
    Case("api-cnn-on-vectors", "api",
         "model='cnn' on (x, y) vectors (out=None: no temp folder left)",
         api(model="cnn", data=(VECTORS, PAIRS), out=None), ("model.name", "'cnn'", "[6]"),
         absent=("unpack",), issue="12"),
    Case("api-wide-class", "api", "a model class with 13 outputs for 2 classes",
         api(model=WideNet, data=(VECTORS, PAIRS)), ("model", "13", "2 classes"), issue="3"),
    Case("api-unknown-task", "api", "task='clustering'",
         api(task="clustering", data=(VECTORS, PAIRS)), ("task", "'clustering'")),
    Case("api-unknown-data-name", "api", "data='mnist'", api(data="mnist"),
         ("data.kind", "'mnist'")),
    Case("api-vary-unknown", "api", "vary=['shuffle']", api(vary=["shuffle"]),
         ("cv.vary", "'shuffle'")),
    Case("api-dataset-no-length", "api", "a Dataset without __len__",
         api(model="mlp", data=lambda d: NoLength()), ("data", "NoLength")),
    Case("api-dataset-labels-gap", "api", "a Dataset whose labels are 0 and 2 (class 1 missing)",
         api(model="mlp", data=lambda d: Items([0, 2] * 20)), ("data", "0..K-1", "1")),
    Case("api-dataset-text-items", "api", "a Dataset whose inputs are strings",
         api(model="mlp", data=lambda d: TextItems([0, 1] * 20)), ("data", "str")),
    Case("api-dataset-labels-length", "api", "labels= of another length than the Dataset",
         api(model="mlp", data=lambda d: Items([0, 1] * 20), labels=[0, 1]),
         ("labels", "2", "40")),
]
# fmt: on


# -- the test ---------------------------------------------------------------------------------
def _tree(*roots: Path) -> set[str]:
    """Every file and folder under ``roots`` (Python's own ``__pycache__`` of a user module
    aside: the interpreter writes it, not randkit)."""
    return {str(p) for root in roots for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished training run for the certify, export and evaluate cases."""
    folder = tmp_path_factory.mktemp("trained")
    config = _config(
        folder,
        merged(
            FAST_EXPERIMENT, train={"epochs": 1}, model={"name": "mlp", "args": {"hidden": [8]}}
        ),
    )
    assert main(["train", str(config), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case,
    tmp_path: Path,
    trained_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # a stray relative write (runs/...) would land in the tree
    monkeypatch.setenv("RANDKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "systmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))  # cross_validate(out=None)
    action = case.make(Inputs(tmp_path, trained_run))
    before = _tree(tmp_path, trained_run)
    if case.api:
        assert callable(action)
        with pytest.raises(UserError) as caught:
            action()
        line = str(caught.value)
        assert "\n" not in line and capsys.readouterr().err == ""
    else:
        assert isinstance(action, list)
        assert main(action) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        line = lines[0]
    for needle in case.needles:
        assert needle in line, (needle, line)
    for weak in case.absent:
        assert weak not in line, (weak, line)
    assert _tree(tmp_path, trained_run) == before, "a refused input must leave nothing behind"


@pytest.mark.slow  # a fresh interpreter importing torch: seconds each
@pytest.mark.parametrize("case_id", ["lr-inf", "certify-max-negative"])
def test_the_installed_command_says_the_same(
    case_id: str, tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table runs ``randkit.cli.main`` in-process; ``python -m randkit`` in a fresh
    interpreter gives the same exit code and line (two cases: each start costs seconds)."""
    case = next(c for c in CASES if c.id == case_id)
    argv = case.make(Inputs(tmp_path, trained_run))
    assert isinstance(argv, list)
    assert main(argv) == 2
    in_process = capsys.readouterr().err
    done = run_cli(*argv, cwd=tmp_path, env={"RANDKIT_CACHE": str(tmp_path / "cache")})
    assert (done.returncode, done.stderr) == (2, in_process)


@pytest.mark.parametrize("command", [train, cv])
def test_an_accepted_image_folder_is_cached(
    command: Callable, tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the cases that leave no cache: a run that passes its checks writes
    the decoded images' cache (held back until then), for its workers and the next run."""
    monkeypatch.chdir(tmp_path)
    raw = fast(data=images("cat", "dog", per_class={"cat": 6, "dog": 6}), cv={"folds": 2})
    argv = command(raw)(Inputs(tmp_path, trained_run))
    assert main([*argv, "--epochs", "1"] if command is train else argv) == 0
    assert len(list((tmp_path / "cache").glob("images-*.safetensors"))) == 1


def test_vectorized_text_run_says_nothing_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #18, 12: the text model under the vectorized runner leaked torch's C++ warning
    about a missing vmap batching rule (EmbeddingBag); a quiet run prints nothing."""
    raw = fast(data=csv(WORDS * 2), model=TEXT_MODEL, train={"epochs": 1, "batch_size": 16})
    argv = _cmd("cv", raw(tmp_path), tmp_path, "--runner", "vectorized")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert [str(w.message) for w in caught if "batching rule" in str(w.message)] == []
    assert capsys.readouterr().err == ""


def test_every_issue_failure_has_a_case() -> None:
    assert {c.issue for c in CASES} >= {"2", "3", "7", "8", "9", "11", "12"}
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_docs_table_is_current() -> None:
    assert markdown() in DOCS.read_text(), (
        "regenerate: python tests/faults/test_bad_inputs.py --write"
    )


# -- docs/faults.md ----------------------------------------------------------------------------
SURFACES = {"yaml": "Config (YAML)", "data": "Data", "cli": "CLI arguments", "api": "Python API"}


DOCS = Path(__file__).resolve().parents[2] / "docs" / "faults.md"
START, END = "<!-- bad inputs: generated by tests/faults/test_bad_inputs.py -->", "<!-- end -->"


def markdown() -> str:
    lines = [
        START,
        "## Bad inputs",
        "",
        "Generated from `tests/faults/test_bad_inputs.py` (`python tests/faults/test_bad_inputs.py"
        " --write`); `make test` runs every row. Each input is refused with exit code 2"
        " (`randkit.errors.UserError` from `randkit.cross_validate`), exactly one line on stderr"
        " naming the field and the value, and nothing left behind: no run folder, no image cache,"
        " no temporary folder. The column *issue* names the failure of issue #18 the row pins.",
        "",
    ]
    for surface, title in SURFACES.items():
        lines += [
            f"### {title}",
            "",
            "| case | input | the line names | issue |",
            "|---|---|---|---|",
        ]
        for case in (c for c in CASES if c.surface == surface):
            names = ", ".join(f"`{n}`" for n in case.needles)
            issue = f"#18.{case.issue}" if case.issue else ""
            lines.append(f"| {case.id} | {case.input.replace('|', '/')} | {names} | {issue} |")
        lines.append("")
    return "\n".join([*lines, *BEYOND_THE_TABLE, END, ""])


BEYOND_THE_TABLE = [
    "### Beyond the table",
    "",
    "| check | test | issue |",
    "|---|---|---|",
    "| no runner (sequential, vectorized, processes, Ray) changes torch's, NumPy's or Python's"
    " global RNG | `tests/test_cv.py::test_every_runner_leaves_global_rngs_alone` | #18.4 |",
    "| the first `cross_validate` in a fresh interpreter leaves the global RNGs alone |"
    " `tests/test_cv.py::test_the_first_cross_validate_in_a_process_leaves_global_rngs_alone`"
    " | #18.5 |",
    "| a vectorized text run prints no raw torch warning |"
    " `test_vectorized_text_run_says_nothing_raw`"
    " | #18.12 |",
    "| text models of unequal vocabularies under the vectorized runner score as under the"
    " sequential one | `tests/test_cv.py::"
    "test_vectorized_runner_stacks_text_models_of_unequal_vocabularies` | |",
    "| `python -m randkit` gives the in-process exit code and line |"
    " `test_the_installed_command_says_the_same` | |",
]


def write_docs() -> None:
    """Replace this suite's section of docs/faults.md (or put it first), keep the rest."""
    text = DOCS.read_text() if DOCS.exists() else "# Faults and their outcomes\n\n"
    if START in text and END in text:
        before, _, rest = text.partition(START)
        after = rest.partition(END)[2].lstrip("\n")
        text = before + markdown() + ("\n" + after if after else "")
    else:
        head, sep, rest = text.partition("\n## ")
        text = head.rstrip("\n") + "\n\n" + markdown() + ("\n## " + rest if sep else "")
    DOCS.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_docs()
    else:
        print(markdown(), end="")
