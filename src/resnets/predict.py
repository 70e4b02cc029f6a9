"""Class predictions for image files from a trained model, each image prepared as the training
run's test images were: the run's channels (grayscale for a 1-channel model), size, centre crop
and normalisation, all read from its weights file (`resnets.preprocess`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.images import IMAGE_EXTENSIONS, load_rgb
from .errors import DataError
from .preprocess import Preprocessing, preprocessing_for

Image = Any  # a PIL image; PIL is imported only where images are read
DEFAULT_BATCH = 64


def load_predictor(
    source: str | os.PathLike, device: str = "cpu", deploy: bool = False
) -> tuple[nn.Module, Preprocessing]:
    """A training run's model (its folder, `model.safetensors` or `last.ckpt`) on `device`, in eval
    mode or through `resnets.deploy`, and the preprocessing its file records."""
    from .checkpoint import load_model_file

    model, meta = load_model_file(source)
    prep = preprocessing_for(model, meta)
    prep.image_mode()  # refuses a model whose input is no image, before any is read
    return _ready(model, device, deploy), prep


def _ready(model: nn.Module, device: str, deploy: bool) -> nn.Module:
    model = model.to(device).eval()
    if deploy:
        from .deploy import deploy as make_deployed

        model = make_deployed(model)
    return model


def image_files(items: Iterable[str | os.PathLike | Image]) -> list[str | Image]:
    """`items` with each folder replaced by the image files under it (sorted, all depths); files
    and PIL images stay as they are. A folder without images stays, to be reported."""
    out: list[str | Image] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            found = sorted(
                str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            out += found or [str(item)]
        else:
            out.append(item if not isinstance(item, os.PathLike) else str(item))
    return out


def read_image(item: str | Image, prep: Preprocessing) -> torch.Tensor:
    """One image as the model's uint8 (C, S, S) pixels; `DataError` with one line when it cannot be."""
    if not isinstance(item, str):
        return prep.pixels(item)
    path = Path(item)
    if path.is_dir():
        raise DataError(f"{item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if not path.exists():
        raise DataError(f"cannot read image {item}: it does not exist")
    return prep.pixels(load_rgb(path))


def _label(item: str | Image, i: int) -> str:
    return item if isinstance(item, str) else f"<image {i}>"


def iter_predictions(
    model: nn.Module,
    prep: Preprocessing,
    images: list[str | Image],
    top: int = 5,
    batch_size: int = DEFAULT_BATCH,
    pad: bool = False,
) -> Iterator[dict]:
    """For each of `images` (files or PIL images), in order, `{"image", "top": [{"class", "index",
    "prob"}, ...]}` with the `top` most probable classes, or `{"image", "error"}` when the image
    cannot be read. The model sees batches of `batch_size`; `pad=True` fills the last one up to the
    same shape (a compiled model then compiles once)."""
    device = next(model.parameters()).device
    k = min(top, prep.num_classes)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        results: list[dict] = []
        pixels = []
        for i, item in enumerate(chunk, start):
            try:
                pixels.append(read_image(item, prep))
                results.append({"image": _label(item, i)})
            except DataError as exc:
                results.append({"image": _label(item, i), "error": str(exc)})
        if pixels:
            x = torch.stack(pixels)
            if pad:
                x = torch.cat([x, x.new_zeros(min(batch_size, len(images)) - len(x), *x.shape[1:])])
            with torch.inference_mode():
                logits = model(prep.normalize(x.to(device)))[: len(pixels)]
            probs, index = logits.float().softmax(1).topk(k, dim=1)
            ok = iter(zip(probs.tolist(), index.tolist()))
            for r in results:
                if "error" not in r:
                    p, ix = next(ok)
                    r["top"] = [{"class": prep.classes[j], "index": j, "prob": q} for q, j in zip(p, ix)]
        yield from results


def predict(
    model_or_path: nn.Module | str | os.PathLike,
    images: str | os.PathLike | Image | Iterable[str | os.PathLike | Image],
    top: int = 5,
    *,
    batch_size: int = DEFAULT_BATCH,
    device: str = "cpu",
    deploy: bool = False,
    preprocessing: Preprocessing | None = None,
) -> list[dict]:
    """The `top` classes of each image (files, folders of them, or PIL images), as
    `iter_predictions` gives them: the probabilities of a softmax over the model's logits, the
    class names of its training run. `model_or_path` is a training run (folder, `model.safetensors`
    or `last.ckpt`), whose file says how to prepare images, or a model (prepared as
    `preprocessing`, default its own data config). An unreadable image gets an "error" entry."""
    if isinstance(model_or_path, nn.Module):
        model, prep = _ready(model_or_path, device, deploy), preprocessing or preprocessing_for(model_or_path)
    else:
        model, prep = load_predictor(model_or_path, device, deploy)
        prep = preprocessing or prep
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):  # one path or PIL image
        images = [images]
    files = image_files(images)
    return list(iter_predictions(model, prep, files, top, batch_size, pad=deploy))
