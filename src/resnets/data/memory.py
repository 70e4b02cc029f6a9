"""Small datasets held in memory as uint8 tensors, batched and augmented by tensor ops."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from .augment import Augment, normalize

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch (order and augmentation), a function of (seed, epoch) only:
    a resumed run draws exactly what the uninterrupted run drew, without saving generator state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous part `rank` of `world` nearly equal parts of range(n)."""
    return n * rank // world, n * (rank + 1) // world


def rank_chunks(batch_size: int, rank: int, world: int, accum: int) -> list[slice]:
    """This rank's micro-batches as slices of a global batch.

    The global batch is cut into `world * accum` equal chunks and rank r takes chunks
    r*accum ... r*accum + accum - 1, so a run on W ranks and a single-process run with
    `accum = W` see the same images in the same micro-batches.
    """
    chunk = batch_size // (world * accum)
    return [slice((rank * accum + a) * chunk, (rank * accum + a + 1) * chunk) for a in range(accum)]


@dataclass
class InMemoryData:
    """Train and test images as uint8 `(N, C, H, W)` tensors with int64 labels.

    `flip_ok` says whether a mirrored image keeps its label (not for digits). `mean` and `std`
    are per channel, on the [0, 1] scale.
    """

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip_ok: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def num_test(self) -> int:
        return len(self.test_y)

    def to(self, device: torch.device | str) -> InMemoryData:
        """The same data on `device` (on a GPU the whole set fits and never crosses the bus again)."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def subset(self, num_train: int = 0, num_test: int = 0) -> InMemoryData:
        """A fixed random subset (0 = all) of each split, for quick runs; classes stay mixed even
        where the files are sorted by class."""

        def pick(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            if n <= 0 or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
            idx = idx.sort().values.to(y.device)
            return x[idx], y[idx]

        train_x, train_y = pick(self.train_x, self.train_y, num_train)
        test_x, test_y = pick(self.test_x, self.test_y, num_test)
        return replace(self, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    def steps_per_epoch(self, batch_size: int) -> int:
        # The last partial batch is dropped: every step has the same shape (torch.compile, BN,
        # equal shards per rank) and a different subset is dropped in each shuffled epoch.
        return self.num_train // batch_size

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
        """Per optimizer step, this rank's `accum` micro-batches of one global batch (see
        `rank_chunks`), augmented and normalised. `start` skips the first steps of the epoch (a
        run resumed mid-epoch): their random draws are made and dropped, so the steps that follow
        get exactly the images and augmentation they would have had."""
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(self.num_train, generator=gen).to(self.train_y.device)
        chunks = rank_chunks(batch_size, rank, world, accum)
        h, w = self.train_x.shape[-2:]
        for step in range(self.steps_per_epoch(batch_size)):
            params = augment.draw(batch_size, h, w, gen)  # for the whole global batch, as every rank
            if step < start:
                continue
            idx = order[step * batch_size : (step + 1) * batch_size]
            micro = []
            for sel in chunks:
                x = augment.apply(
                    self.train_x[idx[sel]], {k: v[sel] for k, v in params.items()}, self.mean, self.std
                )
                micro.append((x, self.train_y[idx[sel]]))
            yield micro

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """This rank's contiguous share of the test set, normalised, in order."""
        lo, hi = shard_bounds(self.num_test, rank, world)
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            yield normalize(self.test_x[i:j], self.mean, self.std), self.test_y[i:j]
