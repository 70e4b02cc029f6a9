"""Datasets: small ones as in-memory uint8 tensors with batched tensor augmentation, large image
folders streamed through DataLoader workers. Both expose the same batching interface."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .augment import Augment
from .cifar import load_cifar
from .digits import load_digits_data
from .folder import FolderData, load_folder
from .memory import InMemoryData

DATASETS = ("digits", "cifar10", "cifar100", "folder:DIR")

ImageData = InMemoryData | FolderData


def load_data(
    spec: str,
    data_dir: str | Path = "data",
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    image_size: int = 224,
    workers: int = 4,
) -> ImageData:
    """`digits`, `cifar10`, `cifar100` (from `data_dir`) or `folder:DIR`."""
    if spec == "digits":
        return load_digits_data()
    if spec in ("cifar10", "cifar100"):
        return load_cifar(spec, data_dir, cache_dir, download)
    if spec.startswith("folder:") and len(spec) > len("folder:"):
        return load_folder(spec[len("folder:") :], image_size, workers)
    raise DataError(f"unknown dataset {spec!r}; expected one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "Augment", "DataError", "FolderData", "ImageData", "InMemoryData", "load_data"]
