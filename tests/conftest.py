"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-input tests.

    On 64 px inputs a second thread saves nothing, and on a busy 2-core machine its spin-waiting
    made the same forward passes up to 10x slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cifar_tree(tmp_path):
    """A CIFAR-10 image tree (train/ and test/, 10 classes) of random 32x32 images, 3 per class and
    split, for the trained studies: `cifar_tree` is its folder."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "cifar10"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(10):
            (root / split / f"k{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / f"k{c}" / f"{i}.png"
                )
    return root
