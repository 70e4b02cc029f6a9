"""What a model expects of an image, as one record: read from a training run's weights file (or the
model's own defaults), written into the metadata of every exported file, and applied by `predict`.

The record's metadata form is a flat map of strings, the same keys in every format (ONNX
`metadata_props`, TorchScript extra files, OpenVINO `rt_info`); see `METADATA_KEYS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .data.augment import normalize
from .data.folder import EVAL_CROP_PCT
from .data.images import resize_center_crop, to_rgb
from .errors import CheckpointError

# key -> what its value says (all values are strings; lists are JSON)
METADATA_KEYS = {
    "model": "registered model name, e.g. resnet20 (empty for an unregistered spec)",
    "data": "what it was trained on: digits, cifar10, cifar100, folder:DIR (empty: not a training run)",
    "num_classes": "number of outputs (logits)",
    "in_chans": "input channels: 3 = RGB, 1 = grayscale",
    "input_size": "square input size in pixels the model was trained (or exported) at",
    "mean": "JSON list, per channel, on the [0, 1] pixel scale: input = (pixels / 255 - mean) / std",
    "std": "JSON list, per channel, on the [0, 1] pixel scale",
    "classes": "JSON list of the class names, one per output",
    "crop_pct": "resize the shorter side to input_size / crop_pct, then take the centre square",
    "interpolation": "the resize filter (bilinear)",
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: grayscale or RGB, resized so its shorter side is
    `input_size / crop_pct`, the centre `input_size` square, then `(pixels / 255 - mean) / std`."""

    model: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    data: str = ""

    def metadata(self) -> dict[str, str]:
        """The record as `METADATA_KEYS` strings."""
        out = {}
        for key in METADATA_KEYS:
            value = getattr(self, key)
            out[key] = json.dumps(list(value)) if isinstance(value, tuple) else str(value)
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Preprocessing:
        """The record back from an exported file's metadata (what `metadata` wrote)."""
        missing = [k for k in METADATA_KEYS if k not in meta]
        if missing:
            raise CheckpointError(f"the metadata has no {', '.join(missing)}; it was not written by resnets")
        return cls(
            model=meta["model"],
            num_classes=int(meta["num_classes"]),
            in_chans=int(meta["in_chans"]),
            input_size=int(meta["input_size"]),
            mean=tuple(json.loads(meta["mean"])),
            std=tuple(json.loads(meta["std"])),
            classes=tuple(json.loads(meta["classes"])),
            crop_pct=float(meta["crop_pct"]),
            interpolation=meta["interpolation"],
            data=meta["data"],
        )

    def with_input_size(self, size: int | None) -> Preprocessing:
        return self if size is None else replace(self, input_size=size)

    def image_mode(self) -> str:
        """The PIL mode images are read in: RGB, or L (grayscale) for a 1-channel model."""
        if self.in_chans not in (1, 3):
            raise CheckpointError(
                f"{self.model or 'the model'} takes {self.in_chans}-channel input; images are read "
                "as RGB (3 channels) or grayscale (1)"
            )
        return "L" if self.in_chans == 1 else "RGB"

    def pixels(self, im) -> torch.Tensor:
        """A PIL image (any mode) as the uint8 (C, S, S) tensor the model's test images were."""
        im = to_rgb(im)  # 16-bit and float images scaled to 8 bits, palette and alpha resolved
        if self.image_mode() == "L":
            im = im.convert("L")
        im = resize_center_crop(im, self.input_size, self.crop_pct)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return t.view(self.input_size, self.input_size, self.in_chans).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, S, S) -> the float input the model expects."""
        return normalize(pixels, self.mean, self.std)


def default_input_size(model: nn.Module) -> int:
    """The paper's input size for a registered name, else the model's data config (32 for a
    CIFAR stem, 224 otherwise)."""
    from .registry import ENTRIES

    name = getattr(model, "name", None)
    if name in ENTRIES:
        return ENTRIES[name].input_size
    return int(model.pretrained_cfg["input_size"][-1])


def preprocessing_for(model: nn.Module, meta: Mapping[str, Any] | None = None) -> Preprocessing:
    """What `model` expects: the training run's data info in `meta` (a run's weights-file
    metadata: data, classes, mean, std, image_size) where there is one, else the model's
    `pretrained_cfg` (ImageNet or CIFAR statistics)."""
    if not (hasattr(model, "spec") and hasattr(model, "pretrained_cfg")):
        raise TypeError(
            f"preprocessing_for takes a resnets ResNet, got {type(model).__name__}; give a Preprocessing instead"
        )
    meta = meta or {}
    cfg = model.pretrained_cfg
    spec = model.spec
    data = str(meta.get("data") or "")
    if data:  # a training run: its test images were resized and cropped as its data set does
        crop_pct = EVAL_CROP_PCT if data.startswith("folder:") else 1.0
    else:
        crop_pct = float(cfg["crop_pct"])
    classes = meta.get("classes") or [str(i) for i in range(spec.num_classes)]
    return Preprocessing(
        model=getattr(model, "name", None) or "",
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        input_size=int(meta.get("image_size") or default_input_size(model)),
        mean=tuple(float(v) for v in meta.get("mean") or cfg["mean"]),
        std=tuple(float(v) for v in meta.get("std") or cfg["std"]),
        classes=tuple(classes),
        crop_pct=crop_pct,
        interpolation=str(cfg["interpolation"]),
        data=data,
    )
