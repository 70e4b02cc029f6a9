"""What the studies read: models (by name or from a training run) and images (files or CIFAR)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .common import StudyError, build_model, calibrate_bn, family_of, input_size_of


@dataclass
class LoadedModel:
    """A model with what it needs to read images: its normalisation and class names."""

    model: nn.Module
    label: str
    source: str  # "init" or the checkpoint path
    mean: tuple[float, ...] | None = None  # None: normalise by the images' own statistics
    std: tuple[float, ...] | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return family_of(self.model)

    @property
    def input_size(self) -> int:
        return input_size_of(self.model)

    @property
    def trained(self) -> bool:
        return self.source != "init"

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the float input the model expects."""
        channels = getattr(getattr(self.model, "spec", None), "in_chans", pixels.shape[1])
        if pixels.shape[1] != channels:
            raise StudyError(
                f"{self.label} takes {channels}-channel images, but these images have "
                f"{pixels.shape[1]} channels"
            )
        x = pixels.float() / 255
        if self.mean is None:
            mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
        else:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def prepare(self, x: torch.Tensor) -> None:
        """Eval mode; an untrained model first takes its BN statistics from `x` (see calibrate_bn)."""
        if self.trained:
            self.model.eval()
        else:
            calibrate_bn(self.model, x)

    def class_name(self, i: int) -> str:
        return self.classes[i] if i < len(self.classes) else str(i)


def load_checkpoint_model(path: str | Path) -> LoadedModel:
    """The model of a training run (`model.safetensors` or `last.ckpt`), with its normalisation."""
    from ..checkpoint import load_model_file

    path = Path(path)
    if path.is_dir():  # a run folder: its final weights
        path = path / "model.safetensors"
    model, meta = load_model_file(path)
    name = model.name or "model"
    # The run folder tells runs of one model apart; it adds nothing when it is the model's name.
    label = name if path.parent.name in ("", name) else f"{name} ({path.parent.name})"
    mean, std = meta.get("mean"), meta.get("std")
    return LoadedModel(
        model.eval(),
        label,
        str(path),
        tuple(mean) if mean else None,
        tuple(std) if std else None,
        list(meta.get("classes") or []),
    )


def load_models(
    names: list[str] | tuple[str, ...], checkpoints: list[str] | tuple[str, ...]
) -> list[LoadedModel]:
    """Registered names (weights at initialisation) followed by checkpoints, in the order given."""
    out = []
    for name in names:
        torch.manual_seed(0)
        out.append(LoadedModel(build_model(name), name, "init"))
    out += [load_checkpoint_model(p) for p in checkpoints]
    return out


def load_images(paths: list[str] | tuple[str, ...], size: int) -> torch.Tensor:
    """Image files as uint8 (N, 3, size, size): shorter side resized to `size`, centre crop."""
    from PIL import Image

    from ..data.images import load_rgb
    from ..errors import DataError

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise StudyError(f"image {p} does not exist")
        try:
            im = load_rgb(p)  # any mode as 8-bit RGB; corrupt files and pixel bombs refused
        except DataError as exc:
            raise StudyError(str(exc)) from None
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def load_cifar_test(data_dir: str | Path, num_test: int = 0):
    """The CIFAR-10 data in `data_dir` (image tree or python batches), test split cut to `num_test`
    images (a fixed random subset; 0 = all). Never downloads: the studies measure local data."""
    from ..data import load_data

    data = load_data("cifar10", data_dir, download=False)
    return data.subset(num_test=num_test)


def sample_test_images(
    data_dir: str | Path, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n CIFAR test images, one class after another (a random image of each), with labels."""
    data = load_cifar_test(data_dir)
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for i in range(n):
        members = (data.test_y == i % data.num_classes).nonzero()[:, 0]
        picks.append(int(members[torch.randint(len(members), (1,), generator=gen)]))
    idx = torch.tensor(picks)
    return data.test_x[idx], data.test_y[idx], list(data.classes)
