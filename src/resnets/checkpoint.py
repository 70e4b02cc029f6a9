"""Checkpoints and weight files, written atomically and read without unpickling arbitrary objects.

`last.ckpt` is a plain dict of tensors, numbers, strings, lists and dicts (model, optimizer,
schedule position, RNG states, spec, config, metrics), so `torch.load(..., weights_only=True)`
reads it. `model.safetensors` holds the weights, with the model name and spec as JSON metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Callable
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
    path = Path(path)
    tmp = temp_path(path)
    remove_stale_temps(path.parent, glob_escape(path.name))
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _Recorder(f)
            write(recorder)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a filesystem gone read-only refuses this too
            tmp.unlink(missing_ok=True)
        cause = _os_error(exc, recorder) if isinstance(exc, Exception) else None
        if cause is not None:  # full disk, quota, read-only folder, permissions...
            reason = cause.strerror or str(cause) or type(cause).__name__
            kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
            raise CheckpointError(f"could not write {path} ({reason}); {kept}") from None
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the file itself is already on disk


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save({"version": CKPT_VERSION, **state}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by `save_checkpoint`; never unpickles anything but plain data."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path} is not a resnets checkpoint (version {CKPT_VERSION})")
    return state


def spec_from_dict(d: dict) -> NetSpec:
    from .registry import list_models

    list_models()  # imports every family module, which registers the blocks a spec may name
    names = {f.name for f in fields(NetSpec)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"the stored spec has fields this version does not know: {', '.join(unknown)}")
    try:
        return NetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the stored spec is invalid: {exc}") from None


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


def load_model_file(path: str | Path) -> tuple[ResNet, dict]:
    """A model from a run's `model.safetensors` or `last.ckpt` (EMA weights where the run kept
    them), and the metadata that travels with it (name, normalisation, classes...)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise CheckpointError(f"weights file {path} does not exist") from None
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
        if "spec" not in meta:
            raise CheckpointError(f"{path} has no model spec in its metadata; it was not written by resnets")
        try:
            meta.update({k: json.loads(meta[k]) for k in JSON_KEYS if k in meta})
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    else:
        ckpt = load_checkpoint(path)
        state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
        meta = {"model": ckpt["model_name"], "spec": ckpt["spec"], **ckpt.get("data_info", {})}
    model = ResNet(spec_from_dict(meta["spec"]), name=meta.get("model") or None)
    load_state(model, state, str(path))
    return model.eval(), meta
