"""Image folders (one sub-folder per class), decoded once and cached as safetensors."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file

from randkit import atomic
from randkit.data.base import LabeledData, keep_cache
from randkit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("RANDKIT_CACHE", Path.home() / ".cache" / "randkit"))


def _listing(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise UserError("data.path", f"image folder not found: {str(root)!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError("data.path", f"no class sub-folders in {str(root)!r}")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            raise UserError("data.path", f"class folder {str(root / name)!r} holds no images")
        files += [(p, label) for p in found]
    return classes, files


def _decode(path: Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale else "RGB")
            # PIL takes (width, height); the config says (height, width).
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError("data.path", f"unreadable image {str(path)!r}: {exc}") from None
    return array[None] if grayscale else array.transpose(2, 0, 1)


def load_image_folder(
    root: Path,
    size: tuple[int, int],
    grayscale: bool,
    cache_dir: Path | None = None,
    defer_cache: bool = False,
) -> LabeledData:
    """The decoded images, read from the cache when it holds them; otherwise decoded and the
    cache written (``defer_cache``: held back as ``pending_cache``, see ``keep_cache``)."""
    classes, files = _listing(root)
    # The cache key covers every file's name, size and mtime, so an edit invalidates it.
    digest = hashlib.sha256(
        json.dumps(
            [
                str(root.resolve()),
                list(size),
                grayscale,
                [
                    (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                    for p, _ in files
                ],
            ]
        ).encode()
    ).hexdigest()[:24]
    cache = (cache_dir or default_cache_dir()) / f"images-{digest}.safetensors"
    if cache.is_file():
        try:
            tensors = load_file(cache)
            return LabeledData(
                tensors["images"].float() / 255.0,
                tensors["targets"],
                classes,
                "image",
                unit_range=True,
            )
        except (SafetensorError, KeyError, OSError):
            pass  # a damaged cache is rebuilt below
    images = torch.from_numpy(np.stack([_decode(p, size, grayscale) for p, _ in files]))
    targets = torch.tensor([label for _, label in files], dtype=torch.long)
    # Validated (classes, sizes) before the cache is written: data refused leaves no file.
    data = LabeledData(images.float() / 255.0, targets, classes, "image", unit_range=True)
    data.pending_cache = functools.partial(_write_cache, cache, images, targets, classes)
    if not defer_cache:
        keep_cache(data)
    return data


def _write_cache(
    cache: Path, images: torch.Tensor, targets: torch.Tensor, classes: list[str]
) -> None:
    try:
        atomic.write_safetensors(
            cache, {"images": images, "targets": targets}, {"classes": json.dumps(classes)}
        )
    except OSError:
        pass  # caching is an optimization; a read-only home must not stop training
