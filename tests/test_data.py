"""Data loading, the stratified split and train-only preprocessing.

Every data file is generated inside the test (``tmp_path``); no test downloads anything or
draws from a global RNG.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from randkit import Streams, UserError, global_rng_guard
from randkit.config import DataConfig
from randkit.data import LabeledData, Prepared, featurize, load_and_prepare, load_data
from randkit.data import images as images_module
from randkit.data.text import Vocabulary

# ---------------------------------------------------------------------------------------------
# helpers


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def id_vectors(path: Path, counts: Sequence[int], seed: int = 0) -> Path:
    """An ``.npz`` of vectors whose column 0 is the row id, so a split can be read back."""
    rng = np.random.default_rng(seed)
    n = sum(counts)
    y = np.repeat(np.arange(len(counts)), counts)
    x = np.column_stack([np.arange(n, dtype=np.float64), rng.normal(size=(n, 2))])
    return write_npz(path, x, y)


def row_ids(part: torch.Tensor) -> list[int]:
    return [int(v) for v in part[:, 0].round().tolist()]


def split_of(prepared: Prepared) -> tuple[torch.Tensor, ...]:
    parts = [prepared.train.x, prepared.test.x]
    if prepared.val is not None:
        parts.append(prepared.val.x)
    return tuple(parts)


def same_split(a: Prepared, b: Prepared) -> bool:
    return all(torch.equal(p, q) for p, q in zip(split_of(a), split_of(b), strict=True))


def save_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def solid(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()


WHITE, BLACK, RED = (255, 255, 255), (0, 0, 0), (255, 0, 0)


def colour_folder(root: Path) -> Path:
    """Classes ``a`` (white), ``b`` (black), ``c`` (red); images of several sizes."""
    sizes = [(7, 13), (16, 5), (9, 9)]
    for name, colour in (("a", WHITE), ("b", BLACK), ("c", RED)):
        for i, (h, w) in enumerate(sizes):
            save_image(root / name / f"{i}.png", solid(h, w, colour))
    return root


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("images-*.safetensors"))


def write_csv(path: Path, rows: Sequence[Sequence[str]], header: Sequence[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def raises_user_error(field: str, call, *fragments: str) -> UserError:
    with pytest.raises(UserError) as info:
        call()
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    return err


@pytest.fixture(scope="module")
def digits() -> LabeledData:
    return load_data(DataConfig())


# ---------------------------------------------------------------------------------------------
# built-in digits


def test_builtin_digits_shape_classes_and_range(digits: LabeledData) -> None:
    assert digits.kind == "image"
    assert len(digits) == 1797
    assert digits.classes == [str(d) for d in range(10)]
    assert isinstance(digits.inputs, torch.Tensor)
    assert digits.inputs.dtype == torch.float32
    assert digits.inputs.shape == (1797, 1, 8, 8)
    assert digits.inputs.min() >= 0.0 and digits.inputs.max() <= 1.0
    # Scaled, not merely clipped: the brightest pixel reaches 1.
    assert digits.inputs.max() == 1.0
    assert torch.bincount(digits.targets, minlength=10).min() > 0
    assert int(digits.targets.max()) == 9


# ---------------------------------------------------------------------------------------------
# the stratified split


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_split_respects_test_fraction_and_class_proportions(
    digits: LabeledData, fraction: float
) -> None:
    prepared = load_and_prepare(DataConfig(test_fraction=fraction), Streams(0))
    n = len(digits)
    assert prepared.val is None
    assert len(prepared.train) + len(prepared.test) == n
    assert abs(len(prepared.test) - fraction * n) <= 1
    whole = torch.bincount(digits.targets, minlength=10).double()
    held = torch.bincount(prepared.test.y, minlength=10).double()
    # Stratified: each class contributes its share of the test part, up to rounding.
    assert torch.all((held - fraction * whole).abs() <= 1), (held, fraction * whole)
    assert prepared.classes == digits.classes
    assert prepared.input_shape == [1, 8, 8]


def test_split_with_validation_partitions_every_row(tmp_path: Path) -> None:
    counts = [100, 60, 40]
    path = id_vectors(tmp_path / "ids.npz", counts)
    cfg = DataConfig(kind="npz", path=path, test_fraction=0.2, val_fraction=0.25)
    prepared = load_and_prepare(cfg, Streams(3))
    assert prepared.val is not None
    train, val, test = (row_ids(p.x) for p in (prepared.train, prepared.val, prepared.test))
    n = sum(counts)
    assert sorted(train + val + test) == list(range(n))  # disjoint and complete
    assert abs(len(test) - 0.2 * n) <= 1
    # val_fraction is cut from what the test part leaves.
    assert abs(len(val) - 0.25 * (n - len(test))) <= 1
    for part, share in ((prepared.test, len(test) / n), (prepared.val, len(val) / n)):
        per_class = torch.bincount(part.y, minlength=3).double()
        expected = torch.tensor(counts, dtype=torch.float64) * share
        assert torch.all((per_class - expected).abs() <= 1.5), (per_class, expected)
    # Labels travel with their rows.
    labels = np.repeat(np.arange(3), counts)
    for part in (prepared.train, prepared.val, prepared.test):
        assert part.y.tolist() == labels[row_ids(part.x)].tolist()


def test_same_seed_same_split_other_seed_other_split(tmp_path: Path) -> None:
    path = id_vectors(tmp_path / "ids.npz", [50, 50, 30])
    cfg = DataConfig(kind="npz", path=path, val_fraction=0.2)
    first = load_and_prepare(cfg, Streams(7))
    again = load_and_prepare(cfg, Streams(7))
    other = load_and_prepare(cfg, Streams(8))
    assert same_split(first, again)
    assert set(row_ids(first.test.x)) != set(row_ids(other.test.x))
    assert set(row_ids(first.val.x)) != set(row_ids(other.val.x))


def test_same_digits_split_for_same_seed() -> None:
    a = load_and_prepare(DataConfig(), Streams(11))
    b = load_and_prepare(DataConfig(), Streams(11))
    c = load_and_prepare(DataConfig(), Streams(12))
    assert same_split(a, b) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.x, c.test.x)


def test_pinned_split_source_ignores_root_seed(tmp_path: Path) -> None:
    path = id_vectors(tmp_path / "ids.npz", [40, 40, 40])
    cfg = DataConfig(kind="npz", path=path, val_fraction=0.2)
    pinned_1 = load_and_prepare(cfg, Streams(1, {"split": 5}))
    pinned_2 = load_and_prepare(cfg, Streams(2, {"split": 5}))
    assert same_split(pinned_1, pinned_2)
    # The pin is what decides: another pinned value gives another split, ...
    other_pin = load_and_prepare(cfg, Streams(1, {"split": 6}))
    assert set(row_ids(pinned_1.test.x)) != set(row_ids(other_pin.test.x))
    # ... and pinning a different source leaves the split on the root seed.
    assert same_split(
        load_and_prepare(cfg, Streams(1)), load_and_prepare(cfg, Streams(1, {"init": 99}))
    )


def test_load_and_prepare_leaves_global_rng_alone(tmp_path: Path) -> None:
    path = id_vectors(tmp_path / "ids.npz", [30, 30])
    with global_rng_guard():
        load_and_prepare(DataConfig(kind="npz", path=path, val_fraction=0.3), Streams(0))
        load_and_prepare(DataConfig(), Streams(0))


def test_class_too_small_to_stratify_names_test_fraction(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "tiny.npz", np.arange(12.0).reshape(6, 2), np.array([0] * 5 + [1]))
    raises_user_error(
        "data.test_fraction",
        lambda: load_and_prepare(DataConfig(kind="npz", path=path), Streams(0)),
        "0.2",
    )


# ---------------------------------------------------------------------------------------------
# train-only preprocessing


def test_statistics_come_from_train_rows_only() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    x[20:] += 1000.0  # validation and test rows sit far away
    targets = torch.tensor([0, 1] * 15)
    data = LabeledData(torch.from_numpy(x), targets, ["0", "1"], "vector")
    train_idx, val_idx, test_idx = np.arange(20), np.arange(20, 25), np.arange(25, 30)
    prepared = featurize(data, train_idx, val_idx, test_idx, {})
    np.testing.assert_allclose(prepared.mean.numpy(), x[:20].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(prepared.std.numpy(), x[:20].std(axis=0, ddof=1), rtol=1e-5)
    assert torch.equal(prepared.test.x, torch.from_numpy(x[25:]))
    assert torch.equal(prepared.val.x, torch.from_numpy(x[20:25]))


def test_prepared_image_statistics_are_per_channel_train_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(60, 3, 4, 4)).astype(np.float32)
    x[:, 1] *= 0.5  # channels with different means
    x[:, 2] = 0.25 + 0.5 * x[:, 2]
    path = write_npz(tmp_path / "rgb.npz", x, np.array([0, 1, 2] * 20))
    prepared = load_and_prepare(DataConfig(kind="npz", path=path, val_fraction=0.25), Streams(4))
    train = prepared.train.x
    assert prepared.mean.shape == (3,) and prepared.std.shape == (3,)
    torch.testing.assert_close(prepared.mean, train.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(prepared.std, train.std(dim=(0, 2, 3)))
    everything = torch.from_numpy(x)
    assert not torch.allclose(prepared.mean, everything.mean(dim=(0, 2, 3)), rtol=0, atol=1e-6)


def test_constant_feature_is_left_unscaled(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = np.column_stack([rng.normal(size=40), np.full(40, 2.5)])
    path = write_npz(tmp_path / "const.npz", x, np.array([0, 1] * 20))
    prepared = load_and_prepare(DataConfig(kind="npz", path=path), Streams(0))
    assert prepared.std[1] == 1.0
    assert prepared.mean[1] == pytest.approx(2.5)
    assert torch.isfinite((prepared.test.x - prepared.mean) / prepared.std).all()


# ---------------------------------------------------------------------------------------------
# .npz arrays


def test_npz_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 5))
    y = np.array([7, 3, 9, 3, 7, 9, 3, 7, 9, 3, 7, 9])
    data = load_data(DataConfig(kind="npz", path=write_npz(tmp_path / "v.npz", x, y)))
    assert data.kind == "vector"
    assert data.inputs.dtype == torch.float32 and data.inputs.shape == (12, 5)
    torch.testing.assert_close(data.inputs, torch.from_numpy(x).float())
    assert data.classes == ["3", "7", "9"]
    assert [data.classes[t] for t in data.targets.tolist()] == [str(v) for v in y]
    assert data.targets.dtype == torch.long


def test_npz_string_labels(tmp_path: Path) -> None:
    y = np.array(["dog", "cat", "dog", "cat"])
    data = load_data(DataConfig(kind="npz", path=write_npz(tmp_path / "s.npz", np.eye(4), y)))
    assert data.classes == ["cat", "dog"]
    assert data.targets.tolist() == [1, 0, 1, 0]


def test_npz_grey_images_get_a_channel_axis(tmp_path: Path) -> None:
    x = np.random.default_rng(6).uniform(size=(8, 5, 7)).astype(np.float32)
    path = write_npz(tmp_path / "g.npz", x, np.array([0, 1] * 4))
    data = load_data(DataConfig(kind="npz", path=path))
    assert data.kind == "image"
    assert data.inputs.shape == (8, 1, 5, 7)
    assert torch.equal(data.inputs[:, 0], torch.from_numpy(x))


def test_npz_channel_first_images_are_kept(tmp_path: Path) -> None:
    x = np.random.default_rng(7).uniform(size=(6, 3, 4, 5)).astype(np.float32)
    path = write_npz(tmp_path / "c.npz", x, np.array([0, 1, 2] * 2))
    data = load_data(DataConfig(kind="npz", path=path))
    assert data.kind == "image"
    assert torch.equal(data.inputs, torch.from_numpy(x))
    prepared = load_and_prepare(DataConfig(kind="npz", path=path, test_fraction=0.5), Streams(0))
    assert prepared.input_shape == [3, 4, 5]


def _nan_x() -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((6, 2))
    x[3, 1] = np.nan
    return x, np.array([0, 1] * 3)


def _inf_x() -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((6, 2))
    x[4, 0] = np.inf
    return x, np.array([0, 1] * 3)


NPZ_ERRORS = {
    "missing y": (lambda: {"x": np.zeros((4, 2))}, ["'y'", "has: x"]),
    "missing x": (lambda: {"y": np.array([0, 1])}, ["'x'"]),
    "nan in x": (lambda: dict(zip("xy", _nan_x(), strict=True)), ["NaN", "row 3"]),
    "inf in x": (lambda: dict(zip("xy", _inf_x(), strict=True)), ["Inf", "row 4"]),
    "lengths differ": (
        lambda: {"x": np.zeros((5, 2)), "y": np.array([0, 1, 0, 1])},
        ["(5, 2)", "(4,)"],
    ),
    "text x": (
        lambda: {"x": np.array([["a", "b"], ["c", "d"]]), "y": np.array([0, 1])},
        ["numeric", "<U1"],
    ),
    "1-d x": (lambda: {"x": np.zeros(4), "y": np.array([0, 1, 0, 1])}, ["(4,)"]),
    "2-d y": (lambda: {"x": np.zeros((4, 2)), "y": np.zeros((4, 1))}, ["(4, 1)"]),
    "nan in y": (
        lambda: {"x": np.zeros((4, 2)), "y": np.array([0.0, 1.0, np.nan, 1.0])},
        ["y in"],
    ),
}


@pytest.mark.parametrize("case", list(NPZ_ERRORS))
def test_npz_errors_name_the_field_and_the_cause(tmp_path: Path, case: str) -> None:
    make_arrays, fragments = NPZ_ERRORS[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **make_arrays())
    raises_user_error("data.path", lambda: load_data(DataConfig(kind="npz", path=path)), *fragments)


def test_npz_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.npz"
    raises_user_error(
        "data.path", lambda: load_data(DataConfig(kind="npz", path=path)), "not found", str(path)
    )


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"definitely not a zip archive")
    raises_user_error("data.path", lambda: load_data(DataConfig(kind="npz", path=path)), str(path))


def test_npz_single_class_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "one.npz", np.zeros((5, 2)), np.full(5, 4))
    with pytest.raises(UserError) as info:
        load_data(DataConfig(kind="npz", path=path))
    assert str(info.value).startswith("data")
    assert "2 classes" in str(info.value) and "got 1" in str(info.value)


def test_labeled_data_rejects_single_class_and_length_mismatch() -> None:
    with pytest.raises(UserError, match="2 classes"):
        LabeledData(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), ["a"], "vector")
    with pytest.raises(UserError, match="3 inputs but 2 labels"):
        LabeledData(torch.zeros(3, 2), torch.tensor([0, 1]), ["a", "b"], "vector")


def test_npz_scalar_y_is_a_user_error(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "scalar.npz", np.zeros((4, 2)), np.array(1))
    raises_user_error("data.path", lambda: load_data(DataConfig(kind="npz", path=path)))


# ---------------------------------------------------------------------------------------------
# image folders


def image_cfg(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(kind="image_folder", path=root, cache_dir=cache, **kw)


def test_image_folder_resizes_to_height_width_in_rgb(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    data = load_data(image_cfg(root, tmp_path / "cache", image_size=(6, 10)))
    assert data.kind == "image"
    assert data.classes == ["a", "b", "c"]
    assert data.inputs.dtype == torch.float32
    assert data.inputs.shape == (9, 3, 6, 10)  # (N, C, height, width)
    assert data.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.inputs.min() >= 0.0 and data.inputs.max() <= 1.0
    white, black, red = data.inputs[0:3], data.inputs[3:6], data.inputs[6:9]
    assert torch.all(white == 1.0)
    assert torch.all(black == 0.0)
    assert torch.all(red[:, 0] == 1.0) and torch.all(red[:, 1:] == 0.0)  # channel order R, G, B


def test_image_folder_keeps_top_and_bottom(tmp_path: Path) -> None:
    """A tall image, white on top, black below, resized to a wide size: rows stay rows."""
    root = tmp_path / "imgs"
    half = np.zeros((20, 12), dtype=np.uint8)
    half[:10] = 255
    save_image(root / "a" / "half.png", half)
    save_image(root / "b" / "x.png", solid(3, 3, BLACK))
    data = load_data(image_cfg(root, tmp_path / "cache", image_size=(4, 8), grayscale=True))
    image = data.inputs[0, 0]
    assert image.shape == (4, 8)
    assert torch.all(image[0] == 1.0) and torch.all(image[-1] == 0.0)
    assert torch.all(image == image[:, :1])  # constant along each row


def test_image_folder_grayscale_gives_one_channel(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    data = load_data(image_cfg(root, tmp_path / "cache", image_size=(5, 3), grayscale=True))
    assert data.inputs.shape == (9, 1, 5, 3)
    assert torch.all(data.inputs[0:3] == 1.0) and torch.all(data.inputs[3:6] == 0.0)
    # ITU-R 601 luma of pure red: 0.299.
    assert torch.allclose(data.inputs[6:9], torch.tensor(0.299), atol=2 / 255)


def test_image_folder_ignores_hidden_files_and_non_images(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    save_image(root / ".ipynb_checkpoints" / "0.png", solid(4, 4, WHITE))
    (root / "a" / "notes.txt").write_text("not an image")
    save_image(root / "loose.png", solid(4, 4, WHITE))  # not inside a class folder
    (root / "b" / "._0.png").write_bytes(b"macOS AppleDouble metadata, not an image")
    data = load_data(image_cfg(root, tmp_path / "cache", image_size=(4, 4)))
    assert data.classes == ["a", "b", "c"]
    assert len(data) == 9


def test_image_folder_load_and_prepare(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    for name, colour in (("a", WHITE), ("b", BLACK), ("c", RED)):
        for i in range(3, 6):
            save_image(root / name / f"{i}.png", solid(4 + i, 9 - i, colour))
    cfg = image_cfg(root, tmp_path / "cache", image_size=(8, 6), test_fraction=1 / 3)
    prepared = load_and_prepare(cfg, Streams(0))
    assert prepared.kind == "image"
    assert prepared.input_shape == [3, 8, 6]
    assert len(prepared.test) == 6
    assert torch.bincount(prepared.test.y).tolist() == [2, 2, 2]
    assert prepared.mean.shape == (3,)


def test_image_cache_is_written_once_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = colour_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    cfg = image_cfg(root, cache, image_size=(6, 10))
    first = load_data(cfg)
    (cached,) = cache_files(cache)
    stat = cached.stat()

    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("a cached folder must not be decoded again")

    monkeypatch.setattr(images_module, "_decode", no_decoding)
    second = load_data(cfg)
    assert torch.equal(first.inputs, second.inputs)
    assert torch.equal(first.targets, second.targets)
    assert first.classes == second.classes
    assert cache_files(cache) == [cached]
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten


def test_editing_an_image_invalidates_the_cache(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    (root / "a" / "0.png").unlink()
    # BMP: the file size depends only on the dimensions, so the edit keeps the byte size.
    edited = save_image(root / "a" / "0.bmp", solid(7, 13, WHITE))
    cache = tmp_path / "cache"
    cfg = image_cfg(root, cache, image_size=(6, 10))
    before = load_data(cfg)
    assert torch.all(before.inputs[0] == 1.0)
    old = edited.stat()
    save_image(edited, solid(7, 13, BLACK))
    later = old.st_mtime_ns + 2_000_000_000  # as if edited two seconds later
    os.utime(edited, ns=(later, later))
    assert edited.stat().st_size == old.st_size
    after = load_data(cfg)
    assert torch.all(after.inputs[0] == 0.0)
    assert torch.equal(after.inputs[1:], before.inputs[1:])
    assert len(cache_files(cache)) == 2


def test_adding_an_image_invalidates_the_cache(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    cfg = image_cfg(root, cache, image_size=(6, 10))
    assert len(load_data(cfg)) == 9
    save_image(root / "b" / "new.png", solid(3, 4, WHITE))
    grown = load_data(cfg)
    assert len(grown) == 10
    assert grown.targets.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert torch.all(grown.inputs[6] == 1.0)  # sorted: b/0, b/1, b/2, b/new
    assert len(cache_files(cache)) == 2


def test_size_and_colour_mode_do_not_share_a_cache_entry(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    assert load_data(image_cfg(root, cache, image_size=(6, 10))).inputs.shape == (9, 3, 6, 10)
    gray = load_data(image_cfg(root, cache, image_size=(6, 10), grayscale=True))
    assert gray.inputs.shape == (9, 1, 6, 10)
    assert load_data(image_cfg(root, cache, image_size=(10, 6))).inputs.shape == (9, 3, 10, 6)
    assert len(cache_files(cache)) == 3


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    cfg = image_cfg(root, cache, image_size=(6, 10))
    original = load_data(cfg)
    (cached,) = cache_files(cache)
    cached.write_bytes(b"\x00garbage" * 4)
    rebuilt = load_data(cfg)
    assert torch.equal(rebuilt.inputs, original.inputs)
    assert torch.equal(load_data(cfg).inputs, original.inputs)  # and the rewritten cache reads


def test_unwritable_cache_does_not_stop_loading(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    data = load_data(image_cfg(root, blocker, image_size=(6, 10)))
    assert data.inputs.shape == (9, 3, 6, 10)


def test_image_folder_missing(tmp_path: Path) -> None:
    root = tmp_path / "no-such-folder"
    raises_user_error(
        "data.path", lambda: load_data(image_cfg(root, tmp_path / "cache")), str(root)
    )


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    save_image(root / "a.png", solid(4, 4, WHITE))
    raises_user_error(
        "data.path",
        lambda: load_data(image_cfg(root, tmp_path / "cache")),
        "no class sub-folders",
        str(root),
    )


def test_image_folder_with_an_empty_class(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "imgs")
    (root / "d_empty").mkdir()
    (root / "d_empty" / "readme.txt").write_text("no pictures here")
    raises_user_error(
        "data.path",
        lambda: load_data(image_cfg(root, tmp_path / "cache")),
        "d_empty",
        "no images",
    )


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(8).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize(
    "content", [b"this is not a PNG at all", _truncated_png()], ids=["garbage", "truncated"]
)
def test_unreadable_image_is_named(tmp_path: Path, content: bytes) -> None:
    root = colour_folder(tmp_path / "imgs")
    broken = root / "b" / "broken.png"
    broken.write_bytes(content)
    raises_user_error(
        "data.path",
        lambda: load_data(image_cfg(root, tmp_path / "cache", image_size=(6, 10))),
        "unreadable",
        str(broken),
    )


# ---------------------------------------------------------------------------------------------
# CSV text


def test_csv_text_reads_named_columns(tmp_path: Path) -> None:
    rows = [
        ("1", "Great film, loved it", "pos"),
        ("2", "boring", "neg"),
        ("3", "", "neg"),
        ("4", "Loved it, great!", "pos"),
    ]
    path = write_csv(tmp_path / "reviews.csv", rows, ("id", "review", "sentiment"))
    data = load_data(
        DataConfig(kind="csv_text", path=path, text_column="review", label_column="sentiment")
    )
    assert data.kind == "text"
    assert data.inputs == [r[1] for r in rows]  # raw strings, tokenized only after the split
    assert data.classes == ["neg", "pos"]
    assert data.targets.tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    ("field", "overrides", "missing"),
    [
        ("data.text_column", {"text_column": "body"}, "body"),
        ("data.label_column", {"label_column": "target"}, "target"),
    ],
)
def test_csv_missing_column(tmp_path: Path, field: str, overrides: dict, missing: str) -> None:
    path = write_csv(tmp_path / "t.csv", [("hi", "a"), ("yo", "b")], ("text", "label"))
    cfg = DataConfig(kind="csv_text", path=path, **overrides)
    raises_user_error(field, lambda: load_data(cfg), repr(missing), "text, label")


def test_csv_empty_label(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "t.csv", [("hi", "a"), ("yo", "  "), ("hey", "b")], ("text", "label")
    )
    raises_user_error(
        "data.label_column",
        lambda: load_data(DataConfig(kind="csv_text", path=path)),
        "line 3",
        str(path),
    )


def test_csv_missing_file_and_no_rows(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    raises_user_error(
        "data.path", lambda: load_data(DataConfig(kind="csv_text", path=missing)), str(missing)
    )
    header_only = write_csv(tmp_path / "empty.csv", [], ("text", "label"))
    raises_user_error(
        "data.path", lambda: load_data(DataConfig(kind="csv_text", path=header_only)), "no rows"
    )


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("text,label\nhello there,a\ngood bye,b\n", encoding="utf-8-sig")
    data = load_data(DataConfig(kind="csv_text", path=path))
    assert data.inputs == ["hello there", "good bye"]


def test_vocabulary_never_sees_test_rows() -> None:
    texts = [f"shared words row{i}" for i in range(6)] + ["shared zebra", "zebra shared"]
    data = LabeledData(texts, torch.tensor([0, 1] * 4), ["a", "b"], "text")
    prepared = featurize(
        data, np.arange(6), None, np.array([6, 7]), {"max_length": 4, "min_freq": 1}
    )
    tokens = prepared.preprocessing["vocabulary"]["tokens"]
    assert tokens[:2] == ["<pad>", "<unk>"]
    assert "zebra" not in tokens
    assert {"shared", "words", "row0", "row5"} <= set(tokens)
    assert prepared.vocab_size == len(tokens)
    shared = tokens.index("shared")
    assert prepared.test.x.tolist() == [[shared, 1, 0, 0], [1, shared, 0, 0]]


def test_prepared_text_vocabulary_comes_from_the_train_part(tmp_path: Path) -> None:
    # Every row carries one word found in no other row: after the split, exactly the
    # training rows' words are known, and each held-out row has exactly one unknown (id 1).
    n = 40
    rows = [(f"common text uniq{i:03d}", "ab"[i % 2]) for i in range(n)]
    path = write_csv(tmp_path / "t.csv", rows, ("text", "label"))
    cfg = DataConfig(kind="csv_text", path=path, val_fraction=0.25, max_length=5)
    prepared = load_and_prepare(cfg, Streams(0))
    tokens = prepared.preprocessing["vocabulary"]["tokens"]
    unique_words = [t for t in tokens if t.startswith("uniq")]
    assert len(unique_words) == len(prepared.train)
    assert prepared.train.x.shape == (len(prepared.train), 5)
    assert not (prepared.train.x == 1).any()
    for part in (prepared.val, prepared.test):
        assert part.x.shape == (len(part), 5)
        assert (part.x == 1).sum(dim=1).tolist() == [1] * len(part)
        assert torch.all(part.x[:, 2] == 1) and torch.all(part.x[:, 3:] == 0)
    assert prepared.input_shape == [5]
    assert prepared.vocab_size == len(tokens)
    assert prepared.mean is None and prepared.std is None
    assert len(prepared.train) + len(prepared.val) + len(prepared.test) == n


def test_encoding_pads_and_truncates_to_max_length() -> None:
    vocab = Vocabulary.fit(["one two three four five six", "one"], max_length=4)
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    encoded = vocab.encode(["one two three four five six", "One", "", "two mystery"])
    assert encoded.dtype == torch.long
    assert encoded.shape == (4, 4)
    assert encoded[0].tolist() == [ids["one"], ids["two"], ids["three"], ids["four"]]
    assert encoded[1].tolist() == [ids["one"], 0, 0, 0]  # lower-cased, padded with 0
    assert encoded[2].tolist() == [0, 0, 0, 0]
    assert encoded[3].tolist() == [ids["two"], 1, 0, 0]  # unknown word -> 1


def test_vocabulary_frequency_order_caps_and_row_order() -> None:
    texts = ["b b b a a c", "c d", "a e"]
    vocab = Vocabulary.fit(texts, max_length=8)
    assert vocab.tokens == ["<pad>", "<unk>", "a", "b", "c", "d", "e"]  # count, then name
    assert Vocabulary.fit(list(reversed(texts)), max_length=8).tokens == vocab.tokens
    assert Vocabulary.fit(texts, max_length=8, min_freq=2).tokens == [
        "<pad>",
        "<unk>",
        "a",
        "b",
        "c",
    ]
    assert Vocabulary.fit(texts, max_length=8, max_vocab=4).tokens == ["<pad>", "<unk>", "a", "b"]


def test_text_options_reach_the_vocabulary(tmp_path: Path) -> None:
    rows = [("alpha beta gamma delta", "x"), ("alpha beta", "y")] * 6 + [("rare", "x")]
    path = write_csv(tmp_path / "t.csv", rows, ("text", "label"))
    cfg = DataConfig(kind="csv_text", path=path, max_length=3, max_vocab=4, test_fraction=0.25)
    prepared = load_and_prepare(cfg, Streams(0))
    vocabulary = prepared.preprocessing["vocabulary"]
    assert vocabulary["max_length"] == 3
    assert vocabulary["tokens"] == ["<pad>", "<unk>", "alpha", "beta"]
    assert prepared.vocab_size == 4
    assert prepared.train.x.shape == (len(prepared.train), 3)
    assert int(prepared.train.x.max()) <= 3
