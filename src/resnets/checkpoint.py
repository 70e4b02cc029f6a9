"""Checkpoints and weight files, written atomically and read without unpickling arbitrary objects.

`last.ckpt` is a plain dict of tensors, numbers, strings, lists and dicts (model, optimizer,
schedule position, RNG states, spec, config, metrics), so `torch.load(..., weights_only=True)`
reads it. `model.safetensors` holds the weights, with the model name and spec as JSON metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from .errors import CheckpointError
from .models.net import NetSpec, ResNet

CKPT_VERSION = 1
# safetensors metadata values are strings; these keys hold JSON (the rest are plain strings).
JSON_KEYS = ("spec", "mean", "std", "classes", "image_size")


class _Recorder:
    """A file's `write` and `flush`, remembering the OSError one of them raised: `torch.save`
    reports a failed write as a RuntimeError of its own, with the OSError at most in the chain."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _os_error(exc: BaseException, recorder: _Recorder | None) -> OSError | None:
    """The OSError behind a failed write: `exc` itself, one in its chain, or one a write raised."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return recorder.error if recorder is not None else None


def temp_path(path: str | Path) -> Path:
    """Where `atomic_write` puts `path`'s next version until it is whole: `.NAME.PID.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists, it is someone else's
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str = "*") -> list[Path]:
    """Delete the temporary files (`.NAME.PID.tmp`) that a killed writer left in `folder`: those
    whose process no longer runs, so another live writer's file is never touched. Returns them.
    Nothing is raised: a file that cannot be deleted stays."""
    removed = []
    try:
        candidates = list(Path(folder).glob(f".{name}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[: -len(".tmp")].rpartition(".")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, and rename it into place, so a
    crash at any moment leaves either the old file or the new one, never half of one. A failed
    write (full disk, no permission, a read-only filesystem) raises `CheckpointError` with one
    line, and leaves the old file as it was; the temporary file is removed where the filesystem
    still allows it. Temporary files of earlier writers of `path` that were killed are removed."""
    atomic_write_files({path: write})


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block has run (then they act as they would have): the
    renames of files that belong together are not split by Ctrl-C. Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in _DEFERRED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def atomic_write_files(writes: Mapping[str | Path, Callable[[BinaryIO], None]]) -> None:
    """`atomic_write` for files that belong together (an OpenVINO model's .xml and .bin): every
    one is written whole to its temporary file first, and only then are they renamed into place,
    back to back with Ctrl-C and SIGTERM held off, so a failed write or a signal leaves all the
    old files. (Only a SIGKILL in the microseconds between two renames could split the set.)"""
    items = [(Path(p), write) for p, write in writes.items()]
    temps: list[Path] = []
    path, recorder = items[0][0], None
    try:
        for path, write in items:
            remove_stale_temps(path.parent, glob_escape(path.name))
            temps.append(temp_path(path))
            recorder = None
            with open(temps[-1], "wb") as f:
                recorder = _Recorder(f)
                write(recorder)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
        recorder = None
        with _signals_deferred() if len(items) > 1 else contextlib.nullcontext():
            for tmp, (path, _) in zip(temps, items):
                os.replace(tmp, path)
    except BaseException as exc:
        for tmp in temps:
            with contextlib.suppress(OSError):  # a filesystem gone read-only refuses this too
                tmp.unlink(missing_ok=True)
        cause = _os_error(exc, recorder) if isinstance(exc, Exception) else None
        if cause is not None:  # full disk, quota, read-only folder, permissions...
            reason = cause.strerror or str(cause) or type(cause).__name__
            kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
            raise CheckpointError(f"could not write {path} ({reason}); {kept}") from None
        raise
    for folder in dict.fromkeys(p.parent for p, _ in items):  # make the renames themselves durable
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # some filesystems cannot fsync a folder; the files themselves are already on disk


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save({"version": CKPT_VERSION, **state}, f))


def check_archive_size(path: str | Path, factor: int = 2) -> None:
    """Refuse a zip-format torch file whose entries would expand to more than `factor` times its
    size on disk (plus 1 MiB): torch writes its entries stored, so only a crafted file has
    deflated ones, and a few MB of those can inflate to gigabytes before anything checks them.
    The sizes come from the archive's directory, before anything is decompressed."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format, or not a torch file at all: torch.load says which
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return  # unreadable as a zip: torch.load reports it
    size = os.path.getsize(path)
    if total > factor * size + 2**20:
        raise CheckpointError(
            f"refusing to load {path}: its {size:,} bytes would expand to {total:,} "
            "(a torch file stores its tensors uncompressed)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by `save_checkpoint`; never unpickles anything but plain data, and
    never inflates more than `check_archive_size` allows. `validate_checkpoint` checks its fields."""
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    check_archive_size(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - a crafted file can make the reader raise anything
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path} is not a resnets checkpoint (version {CKPT_VERSION})")
    return state


# --- what a checkpoint and a weights file's metadata must hold ------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _kind(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    text = " ".join(repr(v).split())  # one line, whatever the value holds
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _tensor_dict(v: object) -> bool:
    return (
        isinstance(v, dict)
        and bool(v)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
    )


def _rng(v: object) -> bool:
    def byte_tensor(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1

    cpu = v.get("torch") if isinstance(v, dict) else None
    return (
        byte_tensor(cpu)
        and cpu.numel() == torch.get_rng_state().numel()  # what torch.set_rng_state accepts
        and ("cuda" not in v or byte_tensor(v["cuda"]))
    )


def _optimizer(v: object) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("state"), dict)
        and isinstance(v.get("param_groups"), list)
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(map(_is_int, g["params"]))
            for g in v["param_groups"]
        )
    )


# field -> (check, what it must be, required)
CHECKPOINT_FIELDS: dict[str, tuple[Callable[[object], bool], str, bool]] = {
    "model": (_tensor_dict, "a dict of tensors", True),
    "ema": (lambda v: v is None or _tensor_dict(v), "None or a dict of tensors", True),
    "ema_updates": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", True),
    "optimizer": (_optimizer, "an optimizer state dict (state, param_groups)", True),
    "scaler": (lambda v: isinstance(v, dict), "a dict", True),
    "epoch": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", True),
    "step": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", True),
    "epoch_step": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", False),
    "epoch_sums": (
        lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
        "a list of 4 numbers",
        False,
    ),
    "epoch_train_s": (lambda v: _is_number(v) and v >= 0, "a non-negative number", False),
    "rng": (_rng, "a dict of uint8 RNG states ('torch', optionally 'cuda')", True),
    "model_name": (lambda v: isinstance(v, str), "a string", True),
    "spec": (lambda v: isinstance(v, dict), "a dict", True),
    "config": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict", True),
    "data_info": (lambda v: isinstance(v, dict), "a dict", False),
    "metrics": (
        lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
        "a list of dicts",
        True,
    ),
    "train_time_s": (lambda v: _is_number(v) and v >= 0, "a non-negative number", True),
    "time_s": (lambda v: _is_number(v) and v >= 0, "a non-negative number", True),
}
# What reading the weights out of a checkpoint needs (eval, analyze): not the training state.
WEIGHT_FIELDS = ("model", "ema", "model_name", "spec", "data_info")


def _check_fields(d: dict, path: str | Path, names: tuple[str, ...] | None = None) -> None:
    for name in names or tuple(CHECKPOINT_FIELDS):
        check, what, required = CHECKPOINT_FIELDS[name]
        if name not in d:
            if required:
                raise CheckpointError(
                    f"{path} is not a complete resnets checkpoint: it has no {name!r} "
                    "(written by another version, or edited)"
                )
            continue
        if not check(d[name]):
            raise CheckpointError(f"{path}: checkpoint field {name!r} must be {what}, got {_kind(d[name])}")


def validate_checkpoint(d: dict, path: str | Path) -> None:
    """Check that `d` (from `load_checkpoint`) holds every field a resumed run reads, of the right
    type and range: model, EMA, optimizer and scaler states, counters, RNG states, spec, config,
    data info and metrics. Raises `CheckpointError` with one line naming the first bad field.
    The spec is checked as `model_from_spec` checks it, without building the model."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a resnets checkpoint (a {type(d).__name__}, not a dict)")
    _check_fields(d, path)
    spec_from_dict(d["spec"], f"{path}: the stored spec")
    if d.get("epoch_step", 0) and "epoch_sums" not in d:
        raise CheckpointError(f"{path}: a checkpoint written inside an epoch must hold 'epoch_sums'")
    if "data_info" in d:
        check_data_info(d["data_info"], path, in_chans=d["spec"].get("in_chans", 3))


def check_data_info(
    info: object, source: str | Path, in_chans: int | None = None, num_classes: int | None = None
) -> None:
    """What travels with the weights (data, classes, mean, std, image_size), where present: the
    normalisation must have one positive, finite value per input channel, the classes one name
    per output, the image size a sensible number of pixels."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{source}: the stored data info must be a dict, got {_kind(info)}")
    for key in ("mean", "std"):
        if key not in info:
            continue
        v = info[key]
        if not isinstance(v, (list, tuple)) or not v or not all(map(_is_number, v)):
            raise CheckpointError(f"{source}: the stored {key} must be a list of numbers, got {_kind(v)}")
        if in_chans is not None and len(v) != in_chans:
            raise CheckpointError(
                f"{source}: the stored {key} has {len(v)} values for a model of {in_chans} input channels"
            )
        if key == "std" and min(v) <= 0:
            raise CheckpointError(f"{source}: the stored std must be positive, got {list(v)}")
    if "classes" in info:
        v = info["classes"]
        if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v):
            raise CheckpointError(f"{source}: the stored classes must be a list of names, got {_kind(v)}")
        if num_classes is not None and len(v) != num_classes:
            raise CheckpointError(
                f"{source}: the stored classes name {len(v)}, but the model has {num_classes} outputs"
            )
    if "image_size" in info and not (
        _is_int(info["image_size"]) and 1 <= info["image_size"] <= MAX_IMAGE_SIZE
    ):
        raise CheckpointError(
            f"{source}: the stored image_size must be an integer in 1..{MAX_IMAGE_SIZE}, got {_kind(info['image_size'])}"
        )
    if "data" in info and not isinstance(info["data"], str):
        raise CheckpointError(f"{source}: the stored data must be a string, got {_kind(info['data'])}")


MAX_IMAGE_SIZE = 8192
MAX_STAGES = 16


def _spec_value_ok(annotation: str, value: object) -> bool:
    """Whether `value` fits a NetSpec field annotated `annotation` (an unknown annotation: yes,
    NetSpec itself checks it)."""
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return _is_int(value)
    if annotation == "float":
        return _is_number(value)
    if annotation.startswith("tuple[int"):  # depths, widths, strides: at least 1 each
        return (
            isinstance(value, (list, tuple))
            and 1 <= len(value) <= MAX_STAGES
            and all(_is_int(x) and x >= 1 for x in value)
        )
    return True


def spec_from_dict(d: object, source: str = "the stored spec") -> NetSpec:
    """A NetSpec from its JSON form, every field checked for type (and stage lists for range)
    before NetSpec checks the rest; `CheckpointError` naming the first bad field otherwise."""
    from .registry import list_models

    list_models()  # imports every family module, which registers the blocks a spec may name
    if not isinstance(d, dict):
        raise CheckpointError(f"{source} must be a dict of network settings, got {_kind(d)}")
    # An annotation as written: a string under postponed evaluation, else the class's name or the
    # generic alias's text ("tuple[int, ...]").
    types = {
        f.name: f.type
        if isinstance(f.type, str)
        else (f.type.__name__ if isinstance(f.type, type) else str(f.type))
        for f in fields(NetSpec)
    }
    unknown = sorted(map(repr, set(d) - set(types)))
    if unknown:
        raise CheckpointError(f"{source} has fields this version does not know: {', '.join(unknown)}")
    for name, value in d.items():
        if not _spec_value_ok(types[name], value):
            raise CheckpointError(
                f"{source}: {name} must be {types[name].replace('tuple[int, ...]', 'a list of positive integers')}, got {_kind(value)}"
            )
    try:
        return NetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except Exception as exc:  # noqa: BLE001 - NetSpec's own checks, whatever they raise
        raise CheckpointError(f"{source} is invalid: {_first_line(exc)}") from None


def model_from_spec(d: object, name: object, state: dict[str, torch.Tensor], source: str | Path) -> ResNet:
    """The network a file's spec describes, checked before any real memory is spent on it: the
    spec builds and runs on the meta device, and needs no more values than `state` holds (so a
    few bytes of metadata cannot make us allocate gigabytes). Weights are not loaded."""
    spec = spec_from_dict(d, f"{source}: the stored spec")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{source}: the stored model name must be a string, got {_kind(name)}")
    tensors = sum(isinstance(t, torch.Tensor) for t in state.values())
    if sum(spec.depths) > tensors:  # every block holds at least one tensor: a cheap first bound
        raise CheckpointError(
            f"{source}: the stored spec has {sum(spec.depths):,} blocks, but the file holds {tensors} tensors"
        )
    try:
        with torch.device("meta"):
            shape = ResNet(spec, name=name or None).eval()
            shape(torch.empty(1, spec.in_chans, 64, 64))
    except Exception as exc:  # noqa: BLE001 - a spec NetSpec accepts but the network cannot be
        raise CheckpointError(
            f"{source}: the stored spec does not describe a working network ({_first_line(exc)})"
        ) from None
    need = sum(t.numel() for t in shape.state_dict().values())
    have = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    if need > have:
        raise CheckpointError(
            f"{source}: the stored spec describes a network of {need:,} values, but the file holds {have:,}"
        )
    return ResNet(spec, name=name or None)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists what is missing and unexpected."""
    missing, unexpected = (
        sorted(set(model.state_dict()) - set(state)),
        sorted(set(state) - set(model.state_dict())),
    )
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {getattr(model, 'name', 'the model')}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shapes differ
        raise CheckpointError(
            f"{source} does not match the model: {str(exc).splitlines()[-1].strip()}"
        ) from None


def save_model_file(path: str | Path, model: ResNet, info: dict | None = None) -> None:
    """Weights as safetensors, with `model` (name) and `spec` (JSON) in the metadata, plus `info`
    (strings as they are, other values as JSON)."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (info or {}).items()}
    # The same four keys as resnets.weights.save_weights, so its load_model reads these files too.
    meta.update(
        format="resnets", layout="resnets", model=model.name or "", spec=json.dumps(asdict(model.spec))
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(blob))


def run_file(path: str | Path) -> Path:
    """The weights of a training run: `path` itself, or for a run folder its `model.safetensors`
    (the final weights) or, before the run has finished, its `last.ckpt`."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("model.safetensors", "last.ckpt"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} is a folder without model.safetensors or last.ckpt; is it a training run?")


def load_model_file(path: str | Path) -> tuple[ResNet, dict]:
    """A model from a run's `model.safetensors` or `last.ckpt` (EMA weights where the run kept
    them) or from the run folder holding them, and the metadata that travels with it (name,
    normalisation, classes...), all checked."""
    path = run_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise CheckpointError(f"weights file {path} {what}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, or what a crafted file raises
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
        if "spec" not in meta:
            raise CheckpointError(f"{path} has no model spec in its metadata; it was not written by resnets")
        try:
            meta.update({k: json.loads(meta[k]) for k in JSON_KEYS if k in meta})
        except (json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: metadata is not valid JSON ({_first_line(exc)})") from None
    else:
        ckpt = load_checkpoint(path)
        _check_fields(ckpt, path, WEIGHT_FIELDS)
        state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
        meta = {**ckpt.get("data_info", {}), "model": ckpt["model_name"], "spec": ckpt["spec"]}
    model = model_from_spec(meta["spec"], meta.get("model"), state, path)
    check_data_info(meta, path, in_chans=model.spec.in_chans, num_classes=model.num_classes)
    load_state(model, state, str(path))
    return model.eval(), meta
