"""Property tests of the per-sample batch transforms in ``randkit.randomize``.

Every transform is checked for the same contract (seeded determinism, shape/dtype/device,
per-sample parameters, ``p``, value range, replay), then for its exact semantics where
those are cheap to state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from randkit import Streams
from randkit.randomize import (
    NOISE_KINDS,
    BatchTransform,
    ColorJitter,
    Compose,
    CutMix,
    HorizontalFlip,
    InputNoise,
    Mixup,
    Params,
    RandomAffine,
    RandomCrop,
    RandomErasing,
    RandomResizedCrop,
    VerticalFlip,
)
from randkit.streams import seeded_generator

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]
DTYPES = st.sampled_from([torch.float32, torch.float64])
SEEDS = st.integers(0, 2**63 - 1)
FAST = settings(max_examples=15, deadline=None)
THOROUGH = settings(max_examples=25, deadline=None)


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    # manual_seed would keep only 32 bits of a CPU seed; seeded_generator keeps all 63.
    return seeded_generator(seed, device)


def images(
    shape: tuple[int, ...], seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Random images in [0, 1): no symmetry, no ties, so any real change shows."""
    return torch.rand(shape, generator=gen(seed), dtype=dtype).to(device)


def _everyone(params: Params) -> torch.Tensor:
    return torch.ones_like(params["applied"])


def _crop_moved(pad: int) -> Callable[[Params], torch.Tensor]:
    return lambda params: (params["top"] != pad) | (params["left"] != pad)


def _mixup_changes(params: Params) -> torch.Tensor:
    own = torch.arange(len(params["partner"]), device=params["partner"].device)
    # lam within float32 rounding of 1 can leave the sample bit-for-bit unchanged.
    return (params["partner"] != own) & (params["lam"] < 0.999)


def _cutmix_changes(params: Params) -> torch.Tensor:
    own = torch.arange(len(params["partner"]), device=params["partner"].device)
    return (params["partner"] != own) & (params["lam"] < 1)


@dataclass(frozen=True)
class Case:
    """One transform under test.

    ``keys``: per-sample parameters that must vary across a batch. ``vary_p``: the ``p`` at
    which two seeds must give different outputs (a flip at p=1 ignores the seed).
    ``must_change``: the samples that cannot come out unchanged when applied.
    """

    id: str
    make: Callable[[float], BatchTransform]
    keys: tuple[str, ...] = ()
    vary_p: float = 1.0
    size: tuple[int, int] | None = None
    mixing: bool = False
    must_change: Callable[[Params], torch.Tensor] = _everyone


def _noise_case(kind: str) -> Case:
    # salt_pepper at 0.8 hits some of >= 25 pixels per sample except with probability 0.2**25.
    level = 0.8 if kind == "salt_pepper" else 0.1
    return Case(f"noise-{kind}", lambda p: InputNoise(kind, level, p=p))


CASES = [
    Case(
        "crop-zeros",
        lambda p: RandomCrop(3, "zeros", p=p),
        keys=("top", "left"),
        must_change=_crop_moved(3),
    ),
    Case(
        "crop-reflect",
        lambda p: RandomCrop(2, "reflect", p=p),
        keys=("top", "left"),
        must_change=_crop_moved(2),
    ),
    Case("hflip", lambda p: HorizontalFlip(p=p), keys=("applied",), vary_p=0.5),
    Case("vflip", lambda p: VerticalFlip(p=p), keys=("applied",), vary_p=0.5),
    Case("resized-crop", lambda p: RandomResizedCrop(p=p), keys=("width", "height", "cx", "cy")),
    Case(
        "resized-crop-size",
        lambda p: RandomResizedCrop(size=(6, 9), p=p),
        keys=("width", "height", "cx", "cy"),
        size=(6, 9),
    ),
    Case(
        "affine",
        lambda p: RandomAffine(20.0, (0.1, 0.2), (0.8, 1.2), p=p),
        keys=("angle", "tx", "ty", "scale"),
    ),
    Case("color", lambda p: ColorJitter(0.4, 0.4, p=p), keys=("brightness", "contrast")),
    Case(
        "erasing-number",
        lambda p: RandomErasing(value=0.0, p=p),
        keys=("top", "left", "height", "width"),
    ),
    Case(
        "erasing-random",
        lambda p: RandomErasing(value="random", p=p),
        keys=("top", "left", "height", "width"),
    ),
    Case(
        "mixup",
        lambda p: Mixup(alpha=1.0, p=p),
        keys=("lam", "partner"),
        mixing=True,
        must_change=_mixup_changes,
    ),
    Case(
        "cutmix",
        lambda p: CutMix(alpha=1.0, p=p),
        keys=("drawn_lam", "partner"),
        mixing=True,
        must_change=_cutmix_changes,
    ),
    *[_noise_case(kind) for kind in NOISE_KINDS],
]
case_params = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
SAME_SIZE = [c for c in CASES if c.size is None]
same_size_params = pytest.mark.parametrize("case", SAME_SIZE, ids=[c.id for c in SAME_SIZE])
device_params = pytest.mark.parametrize("device", DEVICES)

# Batch of N images C x H x W; sides >= 5 so reflect padding 2 and >= 25 pixels always fit.
small_batch = st.tuples(st.integers(1, 8), st.integers(1, 3), st.integers(5, 9), st.integers(5, 9))
big_batch = st.tuples(st.integers(32, 40), st.integers(1, 3), st.integers(5, 8), st.integers(5, 8))


def expected_shape(case: Case, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:2], *case.size) if case.size else tuple(shape)


# --- the contract every transform keeps -------------------------------------------------------


@case_params
@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, data_seed=SEEDS, p=st.floats(0, 1), dtype=DTYPES)
def test_same_seed_same_output(case, device, shape, seed, data_seed, p, dtype) -> None:
    x = images(shape, data_seed, device, dtype)
    t = case.make(p)
    assert torch.equal(t(x, gen(seed, device)), t(x, gen(seed, device)))


@case_params
@device_params
@FAST
@given(shape=big_batch, seed_a=SEEDS, seed_b=SEEDS, data_seed=SEEDS)
def test_different_seeds_different_output(case, device, shape, seed_a, seed_b, data_seed) -> None:
    assume(seed_a != seed_b)
    x = images(shape, data_seed, device)
    t = case.make(case.vary_p)
    assert not torch.equal(t(x, gen(seed_a, device)), t(x, gen(seed_b, device)))


@case_params
@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1), dtype=DTYPES)
def test_shape_dtype_and_device_kept(case, device, shape, seed, p, dtype) -> None:
    x = images(shape, seed, device, dtype)
    t = case.make(p)
    out = t(x, gen(seed, device))
    assert out.shape == expected_shape(case, shape)
    assert t.output_shape(shape) == out.shape
    assert out.dtype == dtype
    assert out.device == x.device
    assert out.is_floating_point() and torch.isfinite(out).all()


@case_params
@device_params
@FAST
@given(shape=big_batch, seed=SEEDS, data_seed=SEEDS)
def test_parameters_differ_across_the_batch(case, device, shape, seed, data_seed) -> None:
    t = case.make(case.vary_p)
    params = t.draw(shape, gen(seed, device), device)
    for key in ("applied", *case.keys):
        assert params[key].shape[0] == shape[0], key
    for key in case.keys:
        assert not (params[key] == params[key][0]).all(), f"{key} is the same for every sample"
    if not case.mixing:
        # Copies of one image come out different: the randomness is per sample (noise too,
        # whose only parameter is one seed for the batch).
        x = images((1, *shape[1:]), data_seed, device).expand(shape).contiguous()
        out = t.apply(x, params)
        assert not (out == out[:1]).all()


@case_params
@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, dtype=DTYPES)
def test_p0_is_the_identity(case, device, shape, seed, dtype) -> None:
    x = images(shape, seed, device, dtype)
    t = case.make(0.0)
    params = t.draw(shape, gen(seed, device), device)
    assert not params["applied"].any()
    out = t.apply(x, params)
    if case.size is None:
        assert torch.equal(out, x)
    else:
        # The output size changes anyway: p=0 is the whole image, resized.
        whole = RandomResizedCrop(size=case.size, scale=(1, 1), ratio=(1, 1), p=1.0)
        assert torch.equal(out, whole(x, gen(seed, device)))


@case_params
@device_params
@FAST
@given(shape=small_batch, seed=SEEDS)
def test_p1_always_applies(case, device, shape, seed) -> None:
    x = images(shape, seed, device)
    t = case.make(1.0)
    params = t.draw(shape, gen(seed, device), device)
    assert params["applied"].all()
    out = t.apply(x, params)
    if case.size is None:
        changed = (out != x).flatten(1).any(dim=1)
        must = case.must_change(params)
        assert changed[must].all(), "an applied sample that cannot be a no-op came out unchanged"


@same_size_params
@device_params
@FAST
@given(shape=big_batch, seed=SEEDS)
def test_samples_not_drawn_are_bitwise_unchanged(case, device, shape, seed) -> None:
    x = images(shape, seed, device)
    t = case.make(0.5)
    params = t.draw(shape, gen(seed, device), device)
    applied = params["applied"]
    assert applied.any() and not applied.all()  # p=0.5 over >= 32 samples
    out = t.apply(x, params)
    assert torch.equal(out[~applied], x[~applied])


@case_params
@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1), dtype=DTYPES)
def test_values_stay_in_unit_interval(case, device, shape, seed, p, dtype) -> None:
    x = images(shape, seed, device, dtype)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0.0, 1.0  # the edges of the range too
    out = case.make(p)(x, gen(seed, device))
    assert out.min() >= 0 and out.max() <= 1


@case_params
@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1), dtype=DTYPES)
def test_replay_from_drawn_parameters(case, device, shape, seed, p, dtype) -> None:
    x = images(shape, seed, device, dtype)
    t = case.make(p)
    params = t.draw(x.shape, gen(seed, device), x.device)
    first = t.apply(x, params)
    assert torch.equal(first, t.apply(x, params))
    assert torch.equal(first, t(x, gen(seed, device)))
    # Replaying on another batch of the same shape uses the same parameters, not new ones.
    other = images(shape, seed + 1, device, dtype)
    assert torch.equal(t.apply(other, params), t.apply(other, params))


# --- exact semantics ------------------------------------------------------------------------


@device_params
@THOROUGH
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1))
def test_flips_flip_exactly_the_applied_samples(device, shape, seed, p) -> None:
    x = images(shape, seed, device)
    for transform, dim in ((HorizontalFlip(p), -1), (VerticalFlip(p), -2)):
        params = transform.draw(shape, gen(seed, device), device)
        out = transform.apply(x, params)
        applied = params["applied"]
        assert torch.equal(out[applied], x[applied].flip(dim))
        assert torch.equal(out[~applied], x[~applied])
        # A flip is an involution: applying the same parameters twice gives x back.
        assert torch.equal(transform.apply(out, params), x)


@device_params
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@FAST
@given(shape=small_batch, seed=SEEDS)
def test_crop_with_zero_padding_is_the_identity(device, mode, shape, seed) -> None:
    x = images(shape, seed, device)
    t = RandomCrop(0, mode, p=1.0)
    params = t.draw(shape, gen(seed, device), device)
    assert params["top"].eq(0).all() and params["left"].eq(0).all()
    assert torch.equal(t.apply(x, params), x)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@THOROUGH
@given(shape=small_batch, seed=SEEDS, pad=st.integers(1, 4))
def test_crop_equals_a_manual_crop_of_the_padded_image(mode, shape, seed, pad) -> None:
    x = images(shape, seed)
    t = RandomCrop(pad, mode, p=1.0)
    params = t.draw(shape, gen(seed), "cpu")
    out = t.apply(x, params)
    h, w = shape[-2:]
    np_mode = "constant" if mode == "zeros" else "reflect"
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=np_mode)
    for i in range(shape[0]):
        top, left = int(params["top"][i]), int(params["left"][i])
        assert 0 <= top <= 2 * pad and 0 <= left <= 2 * pad
        expected = padded[i, :, top : top + h, left : left + w]
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_reflect_padding_larger_than_the_image_is_refused() -> None:
    x = images((2, 1, 3, 3), 0)
    with pytest.raises(ValueError, match="padding"):
        RandomCrop(3, "reflect")(x, gen(0))


@pytest.mark.parametrize("value", [0.0, 1.0, "random"])
@THOROUGH
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1))
def test_erasing_erases_exactly_the_drawn_box(value, shape, seed, p) -> None:
    # Pixels in [0.25, 0.75]: a fill of 0 or 1 always shows; random fill with probability 1.
    x = 0.25 + 0.5 * images(shape, seed)
    t = RandomErasing(value=value, p=p)
    params = t.draw(shape, gen(seed), "cpu")
    out = t.apply(x, params)
    n, c, h, w = shape
    for i in range(n):
        box = torch.zeros(h, w, dtype=torch.bool)
        if params["applied"][i]:
            top, left = int(params["top"][i]), int(params["left"][i])
            eh, ew = int(params["height"][i]), int(params["width"][i])
            assert 1 <= eh and top + eh <= h and 1 <= ew and left + ew <= w
            box[top : top + eh, left : left + ew] = True
        changed = out[i] != x[i]
        assert torch.equal(changed, box.expand(c, h, w))
        assert int(changed.sum()) == c * int(box.sum())
        if isinstance(value, float):
            assert (out[i][changed] == value).all()
    assert out.min() >= 0 and out.max() <= 1


@THOROUGH
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1), classes=st.integers(2, 6))
def test_mixup_mixes_images_and_targets_with_the_same_lambda(shape, seed, p, classes) -> None:
    x = images(shape, seed, dtype=torch.float64)
    labels = torch.randint(0, classes, (shape[0],), generator=gen(seed + 1))
    onehot = torch.nn.functional.one_hot(labels, classes).double()
    t = Mixup(alpha=0.4, p=p)
    params = t.draw(shape, gen(seed), "cpu")
    lam = torch.where(params["applied"], params["lam"], 1.0).double()
    partner = params["partner"]
    assert sorted(partner.tolist()) == list(range(shape[0]))  # a permutation of the batch
    assert ((params["lam"] >= 0) & (params["lam"] <= 1)).all()
    out = t.apply(x, params)
    view = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, view * x + (1 - view) * x[partner], rtol=0, atol=1e-6)
    soft = t.apply_targets(onehot, params)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(shape[0], dtype=torch.float64))
    mixed = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner]
    torch.testing.assert_close(soft, mixed, rtol=0, atol=1e-6)
    # Compose turns integer labels into one-hots and gives the same soft targets.
    composed = Compose([t], num_classes=classes)
    out2, soft2 = composed(x, gen(seed), labels)
    assert torch.equal(out2, out)
    torch.testing.assert_close(soft2.double(), mixed, rtol=0, atol=1e-6)


@THOROUGH
@given(shape=small_batch, seed=SEEDS, p=st.floats(0, 1), alpha=st.sampled_from([0.3, 1.0, 3.0]))
def test_cutmix_lambda_is_the_fraction_of_pixels_kept(shape, seed, p, alpha) -> None:
    n, c, h, w = shape
    # Each sample one distinct constant, so a pixel's origin can be read off its value.
    x = ((torch.arange(n, dtype=torch.float32) + 1) / (n + 1)).view(n, 1, 1, 1).expand(shape)
    t = CutMix(alpha=alpha, p=p)
    params = t.draw(shape, gen(seed), "cpu")
    out = t.apply(x.contiguous(), params)
    partner = params["partner"]
    for i in range(n):
        kept = out[i] == x[i]
        pasted = out[i] == x[int(partner[i])]
        assert (kept | pasted).all()
        if not params["applied"][i]:
            assert kept.all()
            continue
        top, bottom = int(params["top"][i]), int(params["bottom"][i])
        left, right = int(params["left"][i]), int(params["right"][i])
        assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
        if int(partner[i]) != i:
            box = torch.zeros(h, w, dtype=torch.bool)
            box[top:bottom, left:right] = True
            assert torch.equal(pasted, box.expand(c, h, w))
            assert float(params["lam"][i]) == pytest.approx(kept.double().mean().item(), abs=1e-6)
    onehot = torch.eye(n)
    soft = t.apply_targets(onehot, params)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(n))
    lam = torch.where(params["applied"], params["lam"], 1.0)
    expected = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner]
    torch.testing.assert_close(soft, expected)


@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, dtype=DTYPES)
def test_affine_without_motion_is_the_identity(device, shape, seed, dtype) -> None:
    x = images(shape, seed, device, dtype)
    t = RandomAffine(degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0), p=1.0)
    torch.testing.assert_close(t(x, gen(seed, device)), x, rtol=0, atol=1e-5)


def test_affine_quarter_turn_is_a_rigid_rotation_also_for_wide_images() -> None:
    t = RandomAffine(degrees=90.0)

    def turned(x: torch.Tensor) -> torch.Tensor:
        params = t.draw(x.shape, gen(0), "cpu")
        params["angle"] = torch.full_like(params["angle"], 90.0)
        params["scale"] = torch.ones_like(params["scale"])
        return t.apply(x, params)

    def error(out: torch.Tensor, ref: torch.Tensor) -> float:
        return min(float((out - torch.rot90(ref, k, (-2, -1))).abs().max()) for k in (1, -1))

    square = images((2, 3, 6, 6), 1)
    assert error(turned(square), square) < 1e-5
    # A wide image: the central square turns rigidly (no stretch from the aspect ratio).
    wide = images((2, 3, 8, 16), 2)
    assert error(turned(wide)[..., 4:12], wide[..., 4:12]) < 1e-5


def test_affine_translation_by_whole_pixels_shifts_the_content() -> None:
    x = images((2, 1, 8, 10), 3)
    t = RandomAffine(translate=(0.5, 0.5))
    params = t.draw(x.shape, gen(0), "cpu")
    params["tx"] = torch.full_like(params["tx"], 2 / 10)  # two pixels along the width
    params["ty"] = torch.zeros_like(params["ty"])
    out = t.apply(x, params)
    right = torch.zeros_like(x)
    right[..., 2:] = x[..., :-2]
    left = torch.zeros_like(x)
    left[..., :-2] = x[..., 2:]
    assert min(float((out - ref).abs().max()) for ref in (right, left)) < 1e-5


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_resized_crop_of_a_quadrant_is_that_quadrant(corner: str) -> None:
    x = images((3, 2, 8, 12), 4)
    t = RandomResizedCrop(size=(4, 6))
    params = t.draw(x.shape, gen(0), "cpu")
    sign = -1.0 if corner == "top-left" else 1.0
    for key, value in (("width", 0.5), ("height", 0.5), ("cx", 0.5 * sign), ("cy", 0.5 * sign)):
        params[key] = torch.full_like(params[key], value)
    quadrant = x[..., :4, :6] if corner == "top-left" else x[..., 4:, 6:]
    torch.testing.assert_close(t.apply(x, params), quadrant, rtol=0, atol=1e-5)


@FAST
@given(shape=small_batch, seed=SEEDS)
def test_resized_crop_of_the_whole_image_is_the_identity(shape, seed) -> None:
    x = images(shape, seed)
    t = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0), p=1.0)
    torch.testing.assert_close(t(x, gen(seed)), x, rtol=0, atol=1e-5)


@FAST
@given(shape=small_batch, seed=SEEDS)
def test_resized_crop_stays_inside_the_image(shape, seed) -> None:
    params = RandomResizedCrop(scale=(0.08, 1.0), ratio=(0.5, 2.0)).draw(shape, gen(seed))
    assert ((params["width"] > 0) & (params["width"] <= 1)).all()
    assert ((params["height"] > 0) & (params["height"] <= 1)).all()
    assert (params["cx"].abs() <= 1 - params["width"] + 1e-6).all()
    assert (params["cy"].abs() <= 1 - params["height"] + 1e-6).all()


# --- Compose ----------------------------------------------------------------------------------


def _pipeline(num_classes: int | None = None) -> Compose:
    return Compose(
        [
            HorizontalFlip(0.5),
            RandomCrop(2, "reflect"),
            RandomResizedCrop(size=(7, 6), scale=(0.5, 1.0)),
            RandomAffine(10.0, (0.1, 0.1)),
            ColorJitter(0.2, 0.2, p=0.8),
            RandomErasing(value="random", p=0.5),
            Mixup(0.4, p=0.5),
            CutMix(1.0, p=0.5),
            InputNoise("gaussian", 0.05),
        ],
        num_classes=num_classes,
    )


@device_params
@FAST
@given(shape=small_batch, seed=SEEDS, dtype=DTYPES)
def test_compose_replays_like_the_transforms_one_by_one(device, shape, seed, dtype) -> None:
    x = images(shape, seed, device, dtype)
    labels = torch.randint(0, 5, (shape[0],), generator=gen(seed)).to(device)
    compose = _pipeline(num_classes=5)
    out, soft = compose(x, gen(seed, device), labels)
    assert out.shape == (shape[0], shape[1], 7, 6) and out.dtype == dtype
    assert out.device == x.device

    g = gen(seed, device)
    step, targets = x, torch.nn.functional.one_hot(labels, 5).float()
    for transform in compose.transforms:
        params = transform.draw(step.shape, g, device)
        step = transform.apply(step, params)
        targets = transform.apply_targets(targets, params)
    assert torch.equal(out, step)
    assert torch.equal(soft, targets)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(shape[0], device=device))

    params = compose.draw(x.shape, gen(seed, device), device)
    assert len(params) == len(compose.transforms)
    assert torch.equal(compose.apply(x, params), out)
    assert torch.equal(compose.apply(x, params), compose.apply(x, params))
    assert torch.equal(compose.apply_targets(labels, params), soft)
    assert torch.equal(compose(x, gen(seed, device)), out)
    assert not torch.equal(compose(x, gen(seed + 1, device)), out)


IN_PLACE_CAPABLE = [c for c in SAME_SIZE if not c.mixing]


@pytest.mark.parametrize("case", IN_PLACE_CAPABLE, ids=[c.id for c in IN_PLACE_CAPABLE])
@pytest.mark.parametrize("first", ["copying-crop", "in-place-first"])
@FAST
@given(shape=big_batch, seed=SEEDS, p=st.sampled_from([0.0, 0.5, 1.0]), dtype=DTYPES)
def test_compose_works_in_place_only_on_its_own_tensors(case, first, shape, seed, p, dtype) -> None:
    # After a transform that makes a new tensor (a crop), Compose lets the next ones write in
    # place; that must give the same bits as apply() and never touch the caller's batch.
    x = images(shape, seed, dtype=dtype)
    original = x.clone()
    stages = [case.make(p), InputNoise("gaussian", 0.1, p=p), RandomErasing(p=p)]
    if first == "copying-crop":
        stages.insert(0, RandomCrop(1, p=1.0))
    compose = Compose(stages)
    params = compose.draw(x.shape, gen(seed), "cpu")
    out = compose.apply(x, params)
    expected = x
    for transform, drawn in zip(compose.transforms, params, strict=True):
        expected = transform.apply(expected, drawn)
    assert torch.equal(out, expected)
    assert torch.equal(x, original)


def test_compose_needs_num_classes_for_integer_targets() -> None:
    x = images((4, 1, 6, 6), 0)
    labels = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="num_classes"):
        _pipeline()(x, gen(0), labels)
    # Soft targets need no num_classes and pass through unmixed transforms as they are.
    soft = torch.full((4, 3), 1 / 3)
    _, out = Compose([HorizontalFlip(1.0)])(x, gen(0), soft)
    assert torch.equal(out, soft)


def test_compose_knows_whether_it_mixes_labels() -> None:
    assert _pipeline().mixes_labels
    assert not Compose([HorizontalFlip(), RandomCrop(), InputNoise()]).mixes_labels


# --- argument checks ----------------------------------------------------------------------------

INVALID = [
    (lambda: HorizontalFlip(p=1.5), "p"),
    (lambda: VerticalFlip(p=-0.1), "p"),
    (lambda: RandomCrop(p=1.5), "p"),
    (lambda: Mixup(p=2.0), "p"),
    (lambda: RandomCrop(padding=-1), "padding"),
    (lambda: RandomCrop(padding_mode="circular"), "padding_mode"),
    (lambda: RandomResizedCrop(scale=(0.9, 0.1)), "scale"),
    (lambda: RandomResizedCrop(scale=(0.5, 1.5)), "scale"),
    (lambda: RandomResizedCrop(ratio=(2.0, 1.0)), "ratio"),
    (lambda: RandomAffine(scale=(1.2, 0.8)), "scale"),
    (lambda: RandomAffine(degrees=-1.0), "degrees"),
    (lambda: RandomAffine(translate=(0.1, 1.5)), "translate"),
    (lambda: ColorJitter(brightness=1.5), "brightness"),
    (lambda: ColorJitter(contrast=-0.1), "contrast"),
    (lambda: RandomErasing(scale=(0.4, 0.2)), "scale"),
    (lambda: RandomErasing(value="noise"), "value"),
    (lambda: Mixup(alpha=0.0), "alpha"),
    (lambda: CutMix(alpha=-1.0), "alpha"),
    (lambda: InputNoise("pink"), "kind"),
    (lambda: InputNoise("salt_pepper", 1.5), "level"),
    (lambda: InputNoise("gaussian", -0.1), "level"),
]


@pytest.mark.parametrize(
    ("build", "name"), INVALID, ids=[f"{i}-{n}" for i, (_, n) in enumerate(INVALID)]
)
def test_invalid_arguments_name_the_argument(build: Callable[[], object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        build()


# --- known bugs -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_seeds_that_differ_give_different_noise(kind: str) -> None:
    x = images((4, 1, 8, 8), 0)
    t = InputNoise(kind, 0.5, p=1.0)
    params = t.draw(x.shape, gen(0))
    other = {**params, "seed": params["seed"] + 2**32}
    assert not torch.equal(t.apply(x, params), t.apply(x, other))


def test_augmentation_generators_of_different_steps_differ() -> None:
    # Streams(0).seed("augment", epoch=55, step=71) and (epoch=69, step=147) share their low
    # 32 bits: a birthday collision, expected once in ~2**16 steps of one run.
    streams = Streams(0)
    a = streams.seed("augment", epoch=55, step=71)
    b = streams.seed("augment", epoch=69, step=147)
    assert a != b  # the streams are distinct by design
    crop = RandomCrop(4)
    x = images((64, 3, 8, 8), 1)
    out_a = crop(x, streams.torch("augment", epoch=55, step=71))
    out_b = crop(x, streams.torch("augment", epoch=69, step=147))
    assert not torch.equal(out_a, out_b)
