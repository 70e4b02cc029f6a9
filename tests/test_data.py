"""Datasets: digits, CIFAR from pickle batches and from image trees, folder:DIR, batching and sharding."""

import hashlib
import os
import pickle
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from resnets.data import Augment, DataError, load_data
from resnets.data import cifar as cifar_mod
from resnets.data.cifar import load_cifar, read_batch
from resnets.data.digits import load_digits_data
from resnets.data.folder import load_folder, random_resized_box

CIFAR10_JPEG = Path(__file__).resolve().parents[1] / "data" / "cifar10-jpeg"


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_and_format(digits):
    assert (digits.num_train, digits.num_test) == (1437, 360)
    assert digits.train_x.shape == (1437, 1, 32, 32) and digits.train_x.dtype == torch.uint8
    assert digits.num_classes == 10 and digits.channels == 1 and not digits.flip_ok
    assert torch.bincount(digits.test_y).min() >= 30  # every digit is in the held-out set
    assert digits.train_x.max() == 255 and digits.train_x.min() == 0
    assert 0.1 < digits.mean[0] < 0.4 and 0.2 < digits.std[0] < 0.5


def test_train_batches_cover_an_epoch_once_and_depend_on_seed_and_epoch(digits):
    aug = Augment(padding=0, flip=False)
    data = digits.subset(100, 20)

    def labels_and_images(epoch, seed=0):
        steps = list(data.train_batches(epoch, seed=seed, batch_size=16, augment=aug))
        assert len(steps) == 100 // 16 and all(len(s) == 1 for s in steps)
        return torch.cat([s[0][0] for s in steps])

    x0 = labels_and_images(0)
    assert x0.shape == (96, 1, 32, 32)
    # No image twice within an epoch (compare un-augmented images: padding is off).
    assert len({tuple(r.flatten()[::7].tolist()) for r in x0}) == 96
    assert torch.equal(x0, labels_and_images(0))
    assert not torch.equal(x0, labels_and_images(1))
    assert not torch.equal(x0, labels_and_images(0, seed=1))


def test_rank_shards_equal_single_process_micro_batches(digits):
    data = digits.subset(64, 10)
    aug = Augment(padding=4, flip=True, cutout=5)
    single = list(data.train_batches(2, seed=5, batch_size=16, augment=aug, accum=2))
    ranks = [list(data.train_batches(2, seed=5, batch_size=16, augment=aug, rank=r, world=2)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for step in range(4):
        for r in (0, 1):
            (xr, yr), (xs, ys) = ranks[r][step][0], single[step][r]
            assert xr.shape == (8, 1, 32, 32)
            assert torch.equal(xr, xs) and torch.equal(yr, ys)


def test_eval_shards_cover_the_test_set_once(digits):
    full = torch.cat([y for _, y in digits.eval_batches(100)])
    parts = [torch.cat([y for _, y in digits.eval_batches(50, rank=r, world=3)]) for r in range(3)]
    assert torch.equal(torch.cat(parts), full) and len(full) == 360


# --- CIFAR: python batches -------------------------------------------------------------------


def _write_batches(folder: Path, n_train=20, n_test=10, protocol=2, classes=10):
    """Tiny CIFAR-10-format batches: 5 train files and a test file of bytes-keyed dicts."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = rng.integers(0, classes, n).tolist()
        images[name], labels[name] = data, lab
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"batch_label": b"x", b"labels": lab, b"data": data, b"filenames": [b"a"] * n}, f, protocol
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(classes)]}, f, protocol)
    return images, labels


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_batches_are_read_exactly_and_cached(tmp_path, protocol):
    images, labels = _write_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = load_cifar("cifar10", tmp_path, allow_download=False)
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
    assert data.classes == [f"c{i}" for i in range(10)]
    expected = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data.train_x.numpy(), expected)
    assert data.train_y.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert np.array_equal(data.test_x.numpy().reshape(10, -1), images["test_batch"])
    flat = torch.from_numpy(expected).permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    assert data.mean == pytest.approx(flat.mean(1).tolist(), abs=6e-5)  # rounded to 4 places
    assert data.std == pytest.approx(flat.std(1).tolist(), abs=6e-5)
    caches = list((tmp_path / "cifar-10-batches-py").glob("cifar10-*.uint8.safetensors"))
    assert len(caches) == 1
    # The second load reads the cache: spoil a batch file and the data is still the same.
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"spoiled")
    again = load_cifar("cifar10", tmp_path, allow_download=False)
    assert torch.equal(again.train_x, data.train_x) and again.mean == data.mean


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_reader_refuses_anything_but_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({"data": _Boom(), "labels": [1]}, protocol=2))
    with pytest.raises(DataError, match="refusing to load (posix|os).system"):
        read_batch(bad)
    assert not (tmp_path / "pwned").exists()


def test_missing_cifar_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", tmp_path / "nowhere", allow_download=False)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg and "train/<class>" in msg


def test_offline_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="download failed: network is unreachable"):
        load_cifar("cifar10", tmp_path)


def _archive(tmp_path: Path) -> Path:
    _write_batches(tmp_path / "src" / "cifar-10-batches-py", n_train=4, n_test=4)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_download_checks_the_md5_and_unpacks(tmp_path, monkeypatch):
    archive = _archive(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    src = cifar_mod.SOURCES["cifar10"]
    monkeypatch.setitem(cifar_mod.SOURCES, "cifar10", replace(src, url=archive.as_uri(), md5="0" * 32))
    with pytest.raises(DataError, match="corrupt"):
        load_cifar("cifar10", tmp_path / "dl")
    assert not list((tmp_path / "dl").glob("*.part"))
    monkeypatch.setitem(cifar_mod.SOURCES, "cifar10", replace(src, url=archive.as_uri(), md5=md5))
    data = load_cifar("cifar10", tmp_path / "dl")
    assert data.num_train == 20 and data.num_test == 4
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()


# --- CIFAR: image tree -----------------------------------------------------------------------


def _write_tree(root: Path, classes=("cat", "airplane", "dog"), per_class=3, size=32, ext=".png"):
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = {}
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:04d}{ext}")
                pixels[(split, c, i)] = arr
    return pixels


def test_image_tree_is_decoded_exactly_with_sorted_class_order(tmp_path):
    pixels = _write_tree(tmp_path / "tree", classes=[f"k{i}" for i in range(10)][::-1], per_class=2)
    data = load_cifar("cifar10", tmp_path / "tree", cache_dir=tmp_path / "cache", allow_download=False)
    assert data.classes == [f"k{i}" for i in range(10)]
    assert data.num_train == 20 and data.num_test == 20
    # Image 1 of class k3 in the test split: index 3 * 2 + 1.
    assert np.array_equal(data.test_x[7].permute(1, 2, 0).numpy(), pixels[("test", "k3", 1)])
    assert data.test_y[7] == 3
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_image_tree_with_wrong_size_or_class_count_is_refused(tmp_path):
    _write_tree(tmp_path / "small", size=16, classes=[f"k{i}" for i in range(10)], per_class=1)
    with pytest.raises(DataError, match="16x16, expected 32x32"):
        load_cifar("cifar10", tmp_path / "small", allow_download=False)
    _write_tree(tmp_path / "three", per_class=1)
    with pytest.raises(DataError, match="3 classes, which is not cifar10"):
        load_cifar("cifar10", tmp_path / "three", allow_download=False)


@pytest.mark.skipif(not CIFAR10_JPEG.is_dir(), reason=f"CIFAR-10 JPEG tree not extracted at {CIFAR10_JPEG}")
def test_real_cifar10_jpeg_tree():
    data = load_data("cifar10", CIFAR10_JPEG)
    assert (data.num_train, data.num_test) == (50000, 10000)
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert all(abs(m - e) < 0.02 for m, e in zip(data.mean, (0.4914, 0.4822, 0.4465)))


# --- folder:DIR --------------------------------------------------------------------------------


def test_random_resized_box_stays_inside_the_image():
    import random

    rng = random.Random(0)
    for w, h in [(50, 30), (30, 50), (7, 200), (224, 224)]:
        for _ in range(200):
            left, top, cw, ch = random_resized_box(w, h, rng)
            assert 0 <= left and 0 <= top and 0 < cw and 0 < ch
            assert left + cw <= w and top + ch <= h


def test_folder_streams_crops_of_the_requested_size(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("val", 4)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                # Sizes differ per image: the pipeline must resize and crop.
                Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (200, 10 * i, 50)).save(
                    tmp_path / split / c / f"{i}.jpg"
                )
    data = load_data(f"folder:{tmp_path}", image_size=24, workers=0)
    assert data.classes == ["a", "b"] and (data.num_train, data.num_test) == (12, 8)
    steps = list(data.train_batches(0, seed=0, batch_size=4, augment=Augment()))
    assert len(steps) == 3
    x, y = steps[0][0]
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.shape == (4,)
    again = list(data.train_batches(0, seed=0, batch_size=4, augment=Augment()))
    assert torch.equal(again[0][0][0], x)  # crops depend on (seed, epoch, position) only
    ev = list(data.eval_batches(5))
    assert [len(b[1]) for b in ev] == [5, 3] and ev[0][0].shape == (5, 3, 24, 24)
    # A uniform image stays uniform: the red channel is 200 everywhere after any crop.
    red = ev[0][0][:, 0] * data.std[0] + data.mean[0]
    torch.testing.assert_close(red, torch.full_like(red, 200 / 255), atol=2 / 255, rtol=0)


def test_folder_without_eval_split_and_unknown_specs_are_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="neither val/ nor test/"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_data("mnist")
