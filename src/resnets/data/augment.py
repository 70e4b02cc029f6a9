"""Batched augmentation on uint8 image tensors: crop, flip, cutout and normalisation as tensor ops.

Every op takes a whole batch `(N, C, H, W)` and its random choices as tensors. `Augment.draw`
makes those choices with a CPU `torch.Generator`: a few numbers per image, and a CPU generator
gives the same sequence whatever device trains, which keeps runs reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_MODES = ("zeros", "reflect")


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    # Mirror without repeating the edge pixel, as F.pad(mode="reflect"): -1 -> 1, size -> size - 2.
    idx = idx.abs()
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def crop_at(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mode: str = "zeros") -> torch.Tensor:
    """Shift each image by (dy, dx) pixels and keep its size: the same result as padding by
    `max(|dy|, |dx|)` and cropping at offset (pad + dy, pad + dx), without building the padded batch.

    Done as one gather with per-image row and column indices, so it costs one pass over the batch.
    The result is channels-last in memory (the gather's natural layout); values are exact.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device) + dy[:, None]  # (n, h) source row of each output row
    cols = torch.arange(w, device=x.device) + dx[:, None]
    if mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
        valid = None
    else:
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c): advanced dims come first
    if valid is not None:
        out = out * valid[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return x.flip(-1)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose `mask` entry is True."""
    return torch.where(mask[:, None, None, None], hflip(x), x)


def cutout_at(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a `size` x `size` square centred at (cy, cx) in each image; it may reach past the edge."""
    h, w = x.shape[-2:]
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device)[None, :]
    c = torch.arange(w, device=x.device)[None, :]
    inside = ((r >= top[:, None]) & (r < top[:, None] + size))[:, :, None] & (
        (c >= left[:, None]) & (c < left[:, None] + size)
    )[:, None, :]
    return x.masked_fill(inside[:, None], 0)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 in [0, 255] -> float, per channel (x / 255 - mean) / std."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255
    # Written into a plain NCHW tensor whatever the input's layout (a crop comes out channels-last),
    # so the model sees the layout the training loop asks for, not one left over from a gather.
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return torch.sub(x, m, out=out).div_(s)


@dataclass(frozen=True)
class Augment:
    """The training augmentation of the in-memory datasets: pad-and-crop, flip, cutout.

    `draw` takes all random numbers of one (global) batch at once; `apply` uses a slice of
    them, so every rank of a distributed run draws the same numbers and augments only its shard,
    exactly as a single process would augment those images.
    """

    padding: int = 4
    pad_mode: str = "zeros"
    flip: bool = True
    cutout: int = 0

    def draw(self, n: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        p = self.padding
        if self.pad_mode == "reflect" and p >= min(h, w):
            raise ValueError(f"reflection padding {p} needs images larger than {p} px, got {h}x{w}")
        params = {
            "dy": torch.randint(-p, p + 1, (n,), generator=gen),
            "dx": torch.randint(-p, p + 1, (n,), generator=gen),
            "flip": torch.rand(n, generator=gen) < 0.5,
        }
        if self.cutout > 0:
            params["cy"] = torch.randint(0, h, (n,), generator=gen)
            params["cx"] = torch.randint(0, w, (n,), generator=gen)
        return params

    def apply(
        self,
        x: torch.Tensor,
        params: dict[str, torch.Tensor],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> torch.Tensor:
        """uint8 batch -> augmented, normalised float batch. Cutout comes after normalisation so
        that its zeros are the mean colour (as DeVries & Taylor's code)."""
        params = {k: v.to(x.device, non_blocking=True) for k, v in params.items()}
        if self.padding > 0:
            x = crop_at(x, params["dy"], params["dx"], self.pad_mode)
        if self.flip:
            x = flip_where(x, params["flip"])
        x = normalize(x, mean, std)
        if self.cutout > 0:
            x = cutout_at(x, params["cy"], params["cx"], self.cutout)
        return x
