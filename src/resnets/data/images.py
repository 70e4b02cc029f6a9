"""Reading one image file of any common mode as 8-bit RGB, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def to_rgb(im):
    """`im` (a PIL image) as mode RGB.

    PIL's own `convert("RGB")` clips 16- and 32-bit integer images at 255, which turns a 16-bit
    PNG almost white; those are scaled to 8 bits instead (the top 8 of 16 bits). Palette images
    go through RGBA first (PIL warns about transparency otherwise), and alpha is dropped, as
    torchvision's and timm's loaders do.
    """
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0  # floats in [0, 1] or already 0-255
        return Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_rgb(path: str | Path):
    """The image at `path` as a decoded RGB PIL image; `DataError` when it cannot be read
    (truncated, corrupt, not an image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        # PIL raises SyntaxError for some malformed headers (e.g. broken PNG chunks).
        raise DataError(f"cannot read image {path}: {str(exc).strip() or type(exc).__name__}") from None
