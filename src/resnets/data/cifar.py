"""CIFAR-10 and CIFAR-100 from a local folder, decoded once and cached as one uint8 file.

`--data-dir` may hold the official python batches (`cifar-10-batches-py/` or
`cifar-100-python/`, or their files directly) or an image tree `train/<class>/*` and
`test/<class>/*` of 32x32 images (class index = sorted folder name, as torchvision's
ImageFolder). When neither is there, the official archive is downloaded and its MD5 checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, DataError
from .images import IMAGE_EXTENSIONS, load_rgb
from .memory import InMemoryData

CACHE_VERSION = "2"  # 2: with a checksum


@dataclass(frozen=True)
class CifarSource:
    url: str
    md5: str  # the checksum torchvision publishes for the same archive
    folder: str  # the folder the archive unpacks to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str


SOURCES = {
    "cifar10": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        meta_file="batches.meta",
        names_key="label_names",
    ),
    "cifar100": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        meta_file="meta",
        names_key="fine_label_names",
    ),
}


# --- the official python batches ---------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {}
    for core in ("numpy.core", "numpy._core"):  # pickles name the module numpy wrote them with
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
    allowed[("_codecs", "encode")] = __import__("codecs").encode
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses every other global.

    The CIFAR batches are pickles, and a pickle can call any importable function. The only
    globals their format needs are numpy's array reconstruction functions, so those are the
    only ones resolved; a file asking for anything else is rejected before it can run code.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if _ArrayUnpickler._allowed is None:
            _ArrayUnpickler._allowed = _numpy_globals()
        try:
            return _ArrayUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not part of the CIFAR format"
            ) from None


def read_batch(path: Path) -> dict[str, object]:
    """One CIFAR pickle file as a dict with str keys (the official files are Python 2 pickles)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a broken pickle raises, the file is unreadable
        raise DataError(f"{path} is not a readable CIFAR batch: {_first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _batch_images(
    batch: dict, path: Path, label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images and labels, checked before anything is cached: `data` an array of
    uint8 values, whole 3x32x32 images, one integer label in [0, num_classes) per image."""
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(
                f"{path} is not a CIFAR batch: it has no {key!r} (keys: {', '.join(sorted(batch))})"
            )
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "ui":
        what = f"{data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an array of 8-bit pixels, got a {what}")
    if data.size == 0 or data.size % 3072:
        raise DataError(f"{path}: 'data' holds {data.size} values, not whole 3x32x32 images")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: pixel values {data.min()}..{data.max()} are outside 0..255")
    if isinstance(labels, np.ndarray):
        labels_arr = labels
    elif isinstance(labels, (list, tuple)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels
    ):
        # Python ints are unbounded: check the range before numpy has to hold them in 64 bits.
        if labels and (min(labels) < 0 or max(labels) >= num_classes):
            raise DataError(f"{path}: labels {min(labels)}..{max(labels)} are outside 0..{num_classes - 1}")
        labels_arr = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    else:
        raise DataError(f"{path}: {label_key!r} must be a list of integer class indices")
    if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "ui":
        raise DataError(f"{path}: {label_key!r} must be a list of integer class indices")
    n = data.size // 3072
    if len(labels_arr) != n:
        raise DataError(f"{path}: {n} images but {len(labels_arr)} labels")
    if n and (labels_arr.min() < 0 or labels_arr.max() >= num_classes):
        raise DataError(
            f"{path}: labels {labels_arr.min()}..{labels_arr.max()} are outside 0..{num_classes - 1}"
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32), dtype=np.uint8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels_arr.astype(np.int64))


def _class_names(meta: dict, path: Path, src: CifarSource, expected: int) -> list[str]:
    names = meta.get(src.names_key)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{path} is not CIFAR's meta file: {src.names_key!r} must be a list of class names")
    try:
        classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise DataError(f"{path}: a class name in {src.names_key!r} is not UTF-8") from None
    if len(classes) != expected:
        raise DataError(f"{path} names {len(classes)} classes, expected {expected}")
    return classes


def read_pickle_batches(folder: Path, src: CifarSource, num_classes: int) -> dict:
    """The official python batches of `folder` -> uint8 tensors and class names, all checked."""
    meta_path = folder / src.meta_file
    out: dict = {"classes": _class_names(read_batch(meta_path), meta_path, src, num_classes)}
    for split, files in (("train", src.train_files), ("test", src.test_files)):
        parts = [_batch_images(read_batch(folder / f), folder / f, src.label_key, num_classes) for f in files]
        out[f"{split}_x"] = torch.cat([p[0] for p in parts])
        out[f"{split}_y"] = torch.cat([p[1] for p in parts])
    return out


def _find_batches(data_dir: Path, src: CifarSource) -> Path | None:
    for folder in (data_dir / src.folder, data_dir):
        if all((folder / f).is_file() for f in (*src.train_files, *src.test_files, src.meta_file)):
            return folder
    return None


# --- an image tree -----------------------------------------------------------------------------


def _list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(p, label) for p in files]
    return classes, items


def _decode(path: Path, size: int) -> np.ndarray:
    arr = np.asarray(load_rgb(path))
    if arr.shape[:2] != (size, size):
        raise DataError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
    return arr


def read_image_tree(root: Path, size: int = 32) -> dict:
    """`root/train/<class>/*` and `root/test/<class>/*` -> uint8 tensors and class names."""
    out = {}
    classes = None
    for split in ("train", "test"):
        split_classes, items = _list_images(root / split)
        if classes is not None and split_classes != classes:
            raise DataError(f"{root}/test has classes {split_classes}, but {root}/train has {classes}")
        classes = split_classes
        if not items:
            raise DataError(f"no images under {root / split}/<class>/")
        # PIL decodes with the GIL released, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            images = list(pool.map(lambda it: _decode(it[0], size), items, chunksize=256))
        out[f"{split}_x"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    out["classes"] = classes
    return out


def _is_image_tree(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


# --- download ----------------------------------------------------------------------------------


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract only plain files and folders that stay inside `dest` (no links, no `..`)."""
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest.resolve()):
                raise DataError(f"{archive}: refusing to extract {m.name!r}")
        # The member check above already does what the "data" filter does; pass it where it exists
        # so newer Pythons do not warn.
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def download(src: CifarSource, data_dir: Path) -> None:
    """Fetch the official archive into `data_dir`, check its MD5, unpack it, delete the archive."""
    archive = data_dir / Path(src.url).name
    part = archive.with_suffix(".part")
    md5 = hashlib.md5()
    with urllib.request.urlopen(src.url, timeout=30) as resp:
        data_dir.mkdir(parents=True, exist_ok=True)  # only once the server answers
        with open(part, "wb") as f:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                f.write(chunk)
    if md5.hexdigest() != src.md5:
        part.unlink()
        raise DataError(f"download of {src.url} is corrupt: MD5 {md5.hexdigest()}, expected {src.md5}")
    os.replace(part, archive)
    _safe_extract(archive, data_dir)
    archive.unlink()


# --- cache and entry point ---------------------------------------------------------------------


def _cache_path(name: str, source: Path, cache_dir: Path | None) -> Path:
    # One cache file per source folder, so two trees of the same dataset never share one.
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    if cache_dir is None:
        cache_dir = source if os.access(source, os.W_OK) else Path.home() / ".cache" / "resnets"
    return cache_dir / f"{name}-{key}.uint8.safetensors"


TENSORS = ("train_x", "train_y", "test_x", "test_y")


def _checksum(arrays: dict, source: str) -> str:
    """sha256 of the tensors (bytes, dtype and shape), the class names, statistics and source."""
    h = hashlib.sha256()
    for k in TENSORS:
        t = arrays[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps([arrays["classes"], list(arrays["mean"]), list(arrays["std"]), source]).encode())
    return h.hexdigest()


def _read_cache(path: Path) -> dict | None:
    """The cached arrays, or None when the cache is absent, from another version, or does not
    match its checksum (a flipped byte, a partial copy): then the data is decoded again."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != CACHE_VERSION:
                return None
            out = {k: f.get_tensor(k) for k in TENSORS}
        out["classes"] = json.loads(meta["classes"])
        out["mean"], out["std"] = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
        return out if _checksum(out, meta.get("source", "")) == meta.get("sha256") else None
    except Exception:  # noqa: BLE001 - a damaged cache of any kind is rebuilt, never trusted
        return None


def _write_cache(path: Path, arrays: dict, source: str) -> None:
    from safetensors.torch import save

    from ..checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "source": source, "sha256": _checksum(arrays, source)}
    meta.update({k: json.dumps(list(arrays[k])) for k in ("classes", "mean", "std")})
    blob = save({k: arrays[k].contiguous() for k in TENSORS}, metadata=meta)
    atomic_write(path, lambda f: f.write(blob))  # a reader never sees half a cache file


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, from a 256-bin histogram per channel: exact,
    and without a float copy of the whole set (1.2 GB for CIFAR in float64)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].flatten(), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(round(mean.item(), 4))
        stds.append(round(((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt().item(), 4))
    return tuple(means), tuple(stds)


def load_cifar(
    name: str,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> InMemoryData:
    """CIFAR-10 or CIFAR-100 as an `InMemoryData`, from the cache, the files, or a download."""
    src = SOURCES[name]
    data_dir = Path(data_dir).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else None
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    tree = _is_image_tree(data_dir)
    folder = None if tree else _find_batches(data_dir, src)
    if not tree and folder is None:
        if not allow_download:
            raise DataError(_missing(name, src, data_dir, "downloading is off"))
        try:
            download(src, data_dir)
        except OSError as exc:  # no network, DNS, HTTP error, read-only folder
            raise DataError(_missing(name, src, data_dir, f"download failed: {exc}")) from None
        folder = _find_batches(data_dir, src)
        if folder is None:
            raise DataError(f"the archive from {src.url} did not contain {src.folder}/")
    source = data_dir if tree else folder
    path = _cache_path(name, source, cache)
    arrays = _read_cache(path)
    num_classes = {"cifar10": 10, "cifar100": 100}[name]
    if arrays is None:
        arrays = read_image_tree(data_dir) if tree else read_pickle_batches(folder, src, num_classes)
        if len(arrays["classes"]) != num_classes:  # checked before anything is cached
            raise DataError(f"{source} has {len(arrays['classes'])} classes, which is not {name}")
        arrays["mean"], arrays["std"] = _channel_stats(arrays["train_x"])
        try:
            _write_cache(path, arrays, str(source))
        except (OSError, CheckpointError):
            pass  # a read-only place costs a decode next time, nothing else
    if len(arrays["classes"]) != num_classes:
        raise DataError(f"{source} has {len(arrays['classes'])} classes, which is not {name}")
    return InMemoryData(
        name=name,
        classes=arrays["classes"],
        train_x=arrays["train_x"],
        train_y=arrays["train_y"],
        test_x=arrays["test_x"],
        test_y=arrays["test_y"],
        mean=arrays["mean"],
        std=arrays["std"],
        flip_ok=True,
    )


def _missing(name: str, src: CifarSource, data_dir: Path, why: str) -> str:
    return (
        f"{name} is not in {data_dir} ({why}). Put the python batches there (the {src.folder}/ folder "
        f"of {src.url}) or an image tree {data_dir}/train/<class>/*.png and {data_dir}/test/<class>/*.png, "
        f"or pass --data-dir pointing at them"
    )
