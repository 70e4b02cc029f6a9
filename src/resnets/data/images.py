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


def check_pixels(im, path: str | Path) -> None:
    """Refuse an image whose header claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (89.5
    million by default), before it is decoded: a few bytes of PNG can claim 20000x20000."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        raise DataError(
            f"cannot read image {path}: it claims {im.width}x{im.height} pixels, more than the "
            f"{limit:,} an image may have (PIL.Image.MAX_IMAGE_PIXELS)"
        )


def load_rgb(path: str | Path):
    """The image at `path` as a decoded RGB PIL image; `DataError` when it cannot be read
    (truncated, corrupt, not an image, or more pixels than `check_pixels` allows)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that PIL only warns; check_pixels refuses those.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_pixels(im, path)
                im.load()  # decode now: a truncated file fails here, not later
                return to_rgb(im)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        # PIL raises SyntaxError for some malformed headers (e.g. broken PNG chunks).
        raise DataError(f"cannot read image {path}: {str(exc).strip() or type(exc).__name__}") from None


def resize_center_crop(im, size: int, crop_pct: float = 1.0):
    """`im` (a PIL image) with its shorter side resized (bilinear) to `size / crop_pct`, then the
    centre `size` x `size` square: the test-time transform of the image-folder data (crop_pct
    0.875) and, with crop_pct 1.0, of the small in-memory sets, whose images are already `size`
    square and pass through unchanged."""
    from PIL import Image

    if crop_pct == 1.0 and im.size == (size, size):
        return im
    scale = round(size / crop_pct) / min(im.width, im.height)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))
