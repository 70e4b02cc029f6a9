"""`folder:DIR`: ImageNet-style class folders of any image size, streamed through DataLoader workers.

`DIR/train/<class>/*` for training, `DIR/val/<class>/*` (or `DIR/test/`) for evaluation. Training
takes a random-resized crop (scale 0.08-1, aspect 3/4-4/3, as torchvision) and a random flip;
evaluation resizes the shorter side to size / 0.875 and takes the centre crop (256 -> 224).
Workers decode to uint8; normalisation happens on the training device, batched.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .augment import Augment, normalize
from .images import IMAGE_EXTENSIONS, load_rgb, resize_center_crop
from .memory import Batch, epoch_generator, rank_chunks, shard_bounds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Evaluation resizes the shorter side to size / EVAL_CROP_PCT and keeps the centre (256 -> 224).
EVAL_CROP_PCT = 0.875


def random_resized_box(w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random crop covering 8-100% of the area, aspect 3/4-4/3;
    after 10 misses, the largest centred crop of aspect within range (torchvision's rule)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    ratio = w / h
    if ratio < 3 / 4:
        cw, ch = w, round(w / (3 / 4))
    elif ratio > 4 / 3:
        cw, ch = round(h * 4 / 3), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


class _Images(Dataset):
    """Decodes one image per index. A train index is `(i, sample_seed)`, so the crop an image
    gets depends on the run's seed, epoch and position, not on which worker decodes it."""

    def __init__(self, items: list[tuple[Path, int]], size: int, train: bool, flip: bool):
        self.items, self.size, self.train, self.flip = items, size, train, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        from PIL import Image

        i, sample_seed = key if self.train else (key, 0)
        path, label = self.items[i]
        im = load_rgb(path)
        s = self.size
        if self.train:
            rng = random.Random(sample_seed)
            left, top, cw, ch = random_resized_box(im.width, im.height, rng)
            im = im.resize((s, s), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            if self.flip and rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            im = resize_center_crop(im, s, EVAL_CROP_PCT)
        arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), label


def _iterate(loader: DataLoader) -> Iterator:
    """The batches of `loader`. An unreadable image in a worker, or a worker that died (killed,
    out of memory), ends the run with one `DataError` line instead of a worker traceback."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DataError as exc:  # re-raised from a worker, with the worker's traceback as message
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise DataError(re.sub(r"^[\w.]*DataError: ", "", lines[-1] if lines else "")) from None
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            first = str(exc).strip().splitlines()[0]
            raise DataError(
                f"{first.rstrip('.')}; rerun with --workers 0 to see the error in the main process"
            ) from None
        yield batch


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


def _scan(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    classes = classes or found
    if found != classes:
        raise DataError(f"{split_dir} has classes {found[:5]}..., but train/ has {classes[:5]}...")
    items = []
    for label, name in enumerate(classes):
        items += [
            (p, label) for p in sorted((split_dir / name).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
    if not items:
        raise DataError(f"no images under {split_dir}/<class>/")
    return classes, items


@dataclass
class FolderData:
    """Class folders streamed from disk; the same batching interface as `InMemoryData`."""

    name: str
    classes: list[str]
    train_items: list[tuple[Path, int]]
    test_items: list[tuple[Path, int]]
    image_size: int = 224
    workers: int = 4
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    flip_ok: bool = True
    channels: int = 3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train_items)

    @property
    def num_test(self) -> int:
        return len(self.test_items)

    def to(self, device: torch.device | str) -> FolderData:
        return replace(self, device=torch.device(device))

    def subset(self, num_train: int = 0, num_test: int = 0) -> FolderData:
        def pick(items: list, n: int) -> list:
            if n <= 0 or n >= len(items):
                return items
            idx = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:n]
            return [items[i] for i in sorted(idx.tolist())]

        return replace(
            self, train_items=pick(self.train_items, num_train), test_items=pick(self.test_items, num_test)
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_train // batch_size

    def _loader(self, dataset: Dataset, batches: list[list]) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )

    def train_batches(
        self,
        epoch: int,
        *,
        seed: int,
        batch_size: int,
        augment: Augment,
        rank: int = 0,
        world: int = 1,
        accum: int = 1,
        start: int = 0,
    ) -> Iterator[list[Batch]]:
        """As `InMemoryData.train_batches`; padding and cutout do not apply to this pipeline. Each
        image's crop depends only on its position in the epoch, so skipping `start` steps is exact."""
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(self.num_train, generator=gen).tolist()
        base = (seed * 1_000_003 + epoch) * 1_000_000_007  # + position: each image's crop seed
        batches = []
        for step in range(start, self.steps_per_epoch(batch_size)):
            for sel in rank_chunks(batch_size, rank, world, accum):
                positions = range(step * batch_size + sel.start, step * batch_size + sel.stop)
                batches.append([(order[p], base + p) for p in positions])
        ds = _Images(self.train_items, self.image_size, train=True, flip=augment.flip)
        micro = []
        for x, y in _iterate(self._loader(ds, batches)):
            x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std)
            micro.append((x, y.to(self.device, non_blocking=True)))
            if len(micro) == accum:
                yield micro
                micro = []

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        lo, hi = shard_bounds(self.num_test, rank, world)
        batches = [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]
        ds = _Images(self.test_items, self.image_size, train=False, flip=False)
        for x, y in _iterate(self._loader(ds, batches)):
            yield normalize(x.to(self.device, non_blocking=True), self.mean, self.std), y.to(self.device)


def load_folder(root: str | Path, image_size: int = 224, workers: int = 4) -> FolderData:
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise DataError(f"folder:{root} needs {root}/train/<class>/ and {root}/val/<class>/ (or test/)")
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"folder:{root} has train/ but neither val/ nor test/")
    classes, train_items = _scan(root / "train", None)
    _, test_items = _scan(eval_dir, classes)
    return FolderData(f"folder:{root}", classes, train_items, test_items, image_size, workers)
