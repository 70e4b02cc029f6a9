"""Hostile or broken data: images whose header claims too many pixels, CIFAR batches of the wrong
shape, type or range, and damaged caches. Each is one `DataError` line, and nothing bad is cached."""

from __future__ import annotations

import pickle
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import assert_one_error_line, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnets.analysis.common import StudyError
from resnets.analysis.inputs import load_images
from resnets.data import DataError
from resnets.data import cifar as cifar_mod
from resnets.data.cifar import load_cifar, read_image_tree
from resnets.data.images import load_rgb

pytestmark = pytest.mark.usefixtures("one_thread")


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims `width` x `height` grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000), (1, 2**31 - 1)])
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, size):
    # 20000^2 is past PIL's own error threshold; 10000^2 lies between its warning and its error,
    # where PIL would decode 100 million pixels.
    bomb = png_claiming(tmp_path / "bomb.png", *size)
    assert bomb.stat().st_size < 100
    w, h = size
    # Past twice the limit PIL refuses in Image.open already, in words of its own.
    said = rf"(it claims {w}x{h} pixels, more than|Image size \({w * h} pixels\) exceeds limit)"
    with pytest.raises(DataError, match=rf"^cannot read image {bomb}: {said}"):
        load_rgb(bomb)
    with pytest.raises(StudyError, match=said):
        load_images([str(bomb)], 32)


def test_an_image_within_the_limit_still_decodes(tmp_path):
    from PIL import Image

    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "ok.png")
    assert load_rgb(tmp_path / "ok.png").size == (300, 200)


def test_a_pixel_bomb_in_an_image_tree_is_one_error_line(tmp_path):
    from PIL import Image

    from resnets import create_model, save_weights

    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tree / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tree / split / c / "0.png")
    png_claiming(tree / "test" / "b" / "1.png", 20000, 20000)
    with pytest.raises(DataError, match="1.png: Image size"):
        read_image_tree(tree)
    save_weights(create_model("resnet20", num_classes=2), tmp_path / "m.safetensors")
    before = snapshot(tmp_path)
    for workers in ("0", "1"):
        argv = ["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--data", f"folder:{tree}"]
        code, err = run_cli([*argv, "--workers", workers])
        assert_one_error_line(code, err, "1.png: Image size (400000000 pixels) exceeds limit")
    assert snapshot(tmp_path) == before


# --- CIFAR batches ----------------------------------------------------------------------------------

N_TRAIN, N_TEST = 4, 3
NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def good_batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"x",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def good_meta() -> dict:
    return {b"label_names": [f"c{i}".encode() for i in range(10)]}


def write_cifar(folder: Path, batches: dict[str, object], meta: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        (folder / name).write_bytes(
            pickle.dumps(
                batches.get(name, good_batch(N_TEST if name == "test_batch" else N_TRAIN, NAMES.index(name))),
                protocol=2,
            )
        )
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


BAD_DATA = st.one_of(
    st.just("pixels"),
    st.integers(),
    st.lists(st.integers(0, 255), max_size=5),
    st.just(np.zeros((2, 3072), np.float32)),
    st.just(np.full((2, 3072), 300, np.int16)),
    st.just(np.full((2, 3072), -1, np.int64)),
    st.just(np.zeros((2, 3071), np.uint8)),
    st.just(np.zeros((0, 3072), np.uint8)),
    st.just(np.array([["a"] * 3072] * 2)),
)
BAD_LABELS = st.one_of(
    st.lists(st.integers(10, 2**70), min_size=2, max_size=2),
    st.lists(st.integers(-(2**70), -1), min_size=2, max_size=2),
    st.lists(st.floats(allow_nan=True), min_size=2, max_size=2),
    st.lists(st.booleans(), min_size=2, max_size=2),
    st.lists(st.text(max_size=3), min_size=2, max_size=2),
    st.lists(st.integers(0, 9), min_size=3, max_size=4),  # one label per image: 2 images here
    st.just([[1], [2]]),
    st.just(np.array([1.5, 2.5])),
    st.just("01"),
    st.none(),
)


@st.composite
def broken_cifar(draw):
    """Valid CIFAR-10 batches with one thing broken: data, labels, a key, a batch or the meta file."""
    kind = draw(st.sampled_from(["data", "labels", "no key", "not a dict", "meta"]))
    name = draw(st.sampled_from(NAMES))
    batch = good_batch(2)
    meta: object = good_meta()
    batches: dict[str, object] = {}
    if kind == "data":
        batch[b"data"] = draw(BAD_DATA)
        batches[name] = batch
    elif kind == "labels":
        batch[b"labels"] = draw(BAD_LABELS)
        batches[name] = batch
    elif kind == "no key":
        del batch[draw(st.sampled_from([b"data", b"labels"]))]
        batches[name] = batch
    elif kind == "not a dict":
        batches[name] = draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.none()))
    else:
        meta = draw(
            st.one_of(
                st.just({}),
                st.just({b"label_names": [b"a"] * 9}),
                st.just({b"label_names": b"abc"}),
                st.just({b"label_names": [1] * 10}),
                st.just({b"label_names": [b"\xff"] * 10}),
                st.lists(st.integers(), max_size=3),
            )
        )
    return batches, meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(broken_cifar())
def test_broken_cifar_batches_are_one_error_and_nothing_is_cached(case):
    batches, meta = case
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_cifar(root / "cifar-10-batches-py", batches, meta)
        before = snapshot(root)
        with pytest.raises(DataError) as info:
            load_cifar("cifar10", root, cache_dir=root / "cache", allow_download=False)
        assert "\n" not in str(info.value)
        assert snapshot(root) == before  # no cache of bad data, no other file


@pytest.mark.parametrize("labels", [[0, 2**63], [-(2**63) - 1, 0], [10, 2**70]])
def test_labels_beyond_64_bits_are_one_error(tmp_path, labels):
    # Python ints are unbounded; numpy refused them with an OverflowError before the range check.
    batch = good_batch(2)
    batch[b"labels"] = labels
    write_cifar(tmp_path / "cifar-10-batches-py", {"data_batch_1": batch}, good_meta())
    with pytest.raises(DataError, match=r"data_batch_1: labels .* are outside 0..9"):
        load_cifar("cifar10", tmp_path, cache_dir=tmp_path / "cache", allow_download=False)
    assert not (tmp_path / "cache").exists()


def test_the_unbroken_batches_load(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", {}, good_meta())
    data = load_cifar("cifar10", tmp_path, cache_dir=tmp_path / "cache", allow_download=False)
    assert (
        data.train_x.shape == (5 * N_TRAIN, 3, 32, 32)
        and data.test_y.tolist() == good_batch(N_TEST, 5)[b"labels"]
    )
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_cifar_batches_as_numpy_label_arrays_load(tmp_path):
    batch = good_batch(N_TRAIN)
    batch[b"labels"] = np.asarray(batch[b"labels"], dtype=np.uint8)
    write_cifar(tmp_path / "b", {"data_batch_2": batch}, good_meta())
    data = load_cifar("cifar10", tmp_path / "b", cache_dir=tmp_path / "cache", allow_download=False)
    assert data.train_y[N_TRAIN : 2 * N_TRAIN].tolist() == batch[b"labels"].tolist()


# --- the cache ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A CIFAR-10 folder, its data, and the bytes of its cache."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "cifar-10-batches-py", {}, good_meta())
    data = load_cifar("cifar10", root, cache_dir=root / "cache", allow_download=False)
    (cache,) = (root / "cache").iterdir()
    return root, data, cache, cache.read_bytes()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_cache_with_any_byte_flipped_is_rebuilt(cached, draw):
    root, data, cache, good = cached
    pos = draw.draw(st.integers(0, len(good) - 1), label="position")
    flip = draw.draw(st.integers(1, 255), label="xor")
    damaged = bytearray(good)
    damaged[pos] ^= flip
    cache.write_bytes(bytes(damaged))
    again = load_cifar("cifar10", root, cache_dir=root / "cache", allow_download=False)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, k), getattr(data, k)), (pos, k)
    assert again.classes == data.classes and again.mean == data.mean and again.std == data.std
    # The damage is gone: the next run reads a cache that matches its checksum.
    assert cifar_mod._read_cache(cache) is not None
    cache.write_bytes(good)


def test_a_cache_whose_checksum_fails_is_rebuilt_not_trusted(cached):
    root, data, cache, good = cached
    # A flipped pixel leaves a cache that safetensors reads without complaint: only the checksum
    # catches it.
    arrays = cifar_mod._read_cache(cache)
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    arrays["train_x"][0, 0, 0, 0] ^= 1
    damaged = save({k: arrays[k] for k in cifar_mod.TENSORS}, metadata=meta)
    cache.write_bytes(damaged)
    assert cifar_mod._read_cache(cache) is None
    again = load_cifar("cifar10", root, cache_dir=root / "cache", allow_download=False)
    assert torch.equal(again.train_x, data.train_x)
    assert cache.read_bytes() != bytes(damaged) and cifar_mod._read_cache(cache) is not None
    cache.write_bytes(good)
