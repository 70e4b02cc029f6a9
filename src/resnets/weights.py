"""Weights in and out: read any supported checkpoint safely, load it into our models, save ours.

Nothing is unpickled beyond tensors and plain containers: `.pth`/`.pt`/`.bin` files go through
`torch.load(..., weights_only=True)`, which refuses any other object, and `.safetensors` files
hold no code at all. A checkpoint may come wrapped (`{'state_dict': ...}`, `{'model': ...}`,
DataParallel's `module.`, Lightning's `model.`, torch.compile's `_orig_mod.`); the wrapper is
removed and the layout (ours, torchvision, timm, official iResNet / Res2Net, mmpretrain) is
recognised from the keys before `resnets.convert` renames them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write, check_archive_size, model_from_spec, save_model_file
from .convert import LAYOUTS, from_ours, to_ours
from .errors import CheckpointError
from .models.net import ResNet

StateDict = dict[str, torch.Tensor]
Source = str | os.PathLike | Mapping[str, Any]


class WeightsError(CheckpointError):
    """A weights file or state dict that cannot be read, or does not fit the model."""


# --- reading ------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_file(path: Path) -> tuple[Any, dict[str, str]]:
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist" if not path.exists() else f"{path} is not a file"
        )
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, or what a crafted file raises
            raise WeightsError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    check_archive_size(path)  # before torch.load inflates anything
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol of a file it then refuses
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses every global but tensors and plain containers, before calling it.
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise WeightsError(
                f"refusing to load {path}: it references {refused.group(1)}, which unpickling would "
                "call; a weights file holds only tensors and plain containers"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise WeightsError(
            f"{path} is not a PyTorch checkpoint (unreadable pickle data"
            + (f": {detail.group(1).strip()})" if detail else ")")
        ) from None
    except Exception as exc:  # noqa: BLE001 - a crafted file can make the reader raise anything
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint, truncated or corrupt ({_first_line(exc)})"
        ) from None
    return obj, {}


_WRAPPERS = ("state_dict", "model", "module", "net", "network", "weights")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any) -> StateDict:
    """The state dict inside a checkpoint: wrapper dicts and common key prefixes removed."""
    for _ in range(4):  # e.g. Lightning: {'state_dict': {'model.conv1.weight': ...}}
        if _is_tensor_dict(obj):
            break
        inner = next(
            (obj[k] for k in _WRAPPERS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not _is_tensor_dict(obj):
        top = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"no state dict found (top level: {top})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                stripped = True
    return sd


def read_weights(source: Source) -> tuple[StateDict, dict[str, Any]]:
    """The unwrapped state dict of a path or mapping, and what it says about itself.

    The metadata holds `model` (a registered name) and `spec` (a dict) where the source records
    them: our safetensors files and our training checkpoints.
    """
    if isinstance(source, Mapping):
        obj, meta = source, {}
    else:
        obj, meta = _read_file(Path(source))
    if isinstance(obj, Mapping) and isinstance(obj.get("spec"), Mapping):  # a training checkpoint of ours
        meta = {"model": obj.get("model_name", ""), "spec": dict(obj["spec"])}
    elif isinstance(meta.get("spec"), str):
        try:
            meta = {**meta, "spec": json.loads(meta["spec"])}
        except (json.JSONDecodeError, RecursionError) as exc:
            raise WeightsError(f"{source}: the stored spec is not valid JSON ({_first_line(exc)})") from None
        if not isinstance(meta["spec"], Mapping):
            kind = type(meta["spec"]).__name__
            raise WeightsError(f"{source}: the stored spec must be a dict of network settings, got {kind}")
    return unwrap(obj), meta


# --- layout detection and key reports ------------------------------------------------------------


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The layout of a state dict, from its keys; None if it is none of `resnets.convert.LAYOUTS`.

    The torchvision-style layouts convert alike, so the name only reports what the keys show: an
    official iResNet-18/34 checkpoint has no `bn0` and exactly a torchvision ResNet's keys.
    """
    keys = list(state_dict)

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    if has(r"stages\.\d+\.blocks\.\d+\."):
        return "timm_resnetv2"
    if has(r"stages\.\d+\.\d+\.") and has(r"stem\."):
        return "resnets"
    if has(r"backbone\.(layer\d|stem|conv1)"):
        return "mmpretrain"
    if not has(r"layer\d+\.\d+\.conv1\.weight"):
        return None
    if has(r"layer\d+\.\d+\.bn0\."):
        return "iresnet_official"
    if has(r"layer\d+\.\d+\.convs\."):
        return "res2net_official"
    return "timm" if has(r"conv1\.0\.weight") else "torchvision"


def _ranges(values: set[int]) -> str:
    nums = sorted(values)
    if len(nums) == 1:
        return str(nums[0])
    if nums == list(range(nums[0], nums[-1] + 1)):
        return f"{{{nums[0]}-{nums[-1]}}}"
    return "{" + ",".join(map(str, nums)) + "}"


def group_keys(keys: Iterable[str], limit: int = 6) -> str:
    """`stages.{0-3}.{2-5}.bn0.{weight,bias} (40 keys); ...`: a few lines instead of hundreds."""
    groups: dict[tuple[str, ...], dict] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        parts = module.split(".") if module else []
        shape = tuple("#" if p.isdigit() else p for p in parts)
        g = groups.setdefault(shape, {"nums": [set() for _ in parts], "leaves": [], "n": 0})
        for slot, p in zip(g["nums"], parts):
            if p.isdigit():
                slot.add(int(p))
        if leaf not in g["leaves"]:
            g["leaves"].append(leaf)
        g["n"] += 1
    out = []
    for shape, g in list(groups.items())[:limit]:
        parts = [_ranges(nums) if p == "#" else p for p, nums in zip(shape, g["nums"])]
        leaves = g["leaves"][0] if len(g["leaves"]) == 1 else "{" + ",".join(g["leaves"]) + "}"
        out.append(".".join([*parts, leaves]) + (f" ({g['n']} keys)" if g["n"] > 1 else ""))
    if len(groups) > limit:
        out.append(f"... {len(groups) - limit} more groups")
    return "; ".join(out)


@dataclass
class LoadReport:
    """What `load_weights` did: the layout it read, and what it could not load."""

    layout: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {group_keys(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {group_keys(self.unexpected)}")
        if self.mismatched:
            shown = ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:4])
            more = f" and {len(self.mismatched) - 4} more" if len(self.mismatched) > 4 else ""
            parts.append(f"shape conflicts {len(self.mismatched)}: {shown}{more}")
        return " | ".join(parts)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "name", None) or type(model).__name__


def load_weights(
    model: nn.Module, source: Source, *, layout: str = "auto", strict: bool = True
) -> LoadReport:
    """Load a checkpoint of any supported layout into `model` (one of ours); returns what it did.

    `source` is a path (.pth, .pt, .bin, .safetensors) or a state dict. With `strict=True` any
    missing or unexpected key or shape conflict raises `WeightsError` naming the detected layout.
    With `strict=False` the tensors that fit are loaded and the rest is reported in a warning, e.g.
    a classifier for another number of classes stays this model's freshly initialised one.
    """
    state, _ = read_weights(source)
    where = "the state dict" if isinstance(source, Mapping) else str(source)
    return _load(model, state, layout, strict, where)


def _load(model: nn.Module, state: StateDict, layout: str, strict: bool, where: str) -> LoadReport:
    if layout == "auto":
        found = detect_layout(state)
        if found is None:
            raise WeightsError(
                f"{where} is in no known ResNet layout (first keys: {', '.join(list(state)[:4])}); "
                f"known: {', '.join(LAYOUTS)}"
            )
        layout = found
    elif layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    ours = to_ours(state, layout, strict=False)  # unknown keys stay as they are: reported below
    target = model.state_dict()
    fits = {k: v for k, v in ours.items() if k in target and v.shape == target[k].shape}
    report = LoadReport(
        layout,
        len(fits),
        missing=[k for k in target if k not in ours],
        unexpected=[k for k in ours if k not in target],
        mismatched=[
            (k, tuple(v.shape), tuple(target[k].shape))
            for k, v in ours.items()
            if k in target and k not in fits
        ],
    )
    problems = report.missing or report.unexpected or report.mismatched
    head_only = bool(report.mismatched) and {k for k, *_ in report.mismatched} <= {
        "head.fc.weight",
        "head.fc.bias",
    }
    if problems and (strict or not fits):
        hint = (
            " (another number of classes: strict=False loads the rest and keeps this classifier)"
            if head_only
            else ""
        )
        raise WeightsError(
            f"cannot load {where} into {_model_name(model)} (layout detected: {layout}): {report.describe()}{hint}"
        )
    model.load_state_dict(fits, strict=False)
    if problems:
        fresh = any(k.startswith("head.fc.") for k in report.missing + [k for k, *_ in report.mismatched])
        note = "; the classifier (head.fc) keeps its fresh initialisation" if fresh else ""
        warnings.warn(
            f"loaded {len(fits)} of {len(target)} tensors of {_model_name(model)} from {where} "
            f"(layout {layout}){note}: {report.describe()}",
            stacklevel=3,
        )
    return report


# --- our own files ------------------------------------------------------------------------------


def _metadata(model: ResNet, layout: str) -> dict[str, str]:
    return {
        "format": "resnets",
        "layout": layout,
        "model": model.name or "",
        "spec": json.dumps(asdict(model.spec)),
    }


def _write(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors for `.safetensors`, a plain `torch.save`d state dict for `.pth`/`.pt`/`.bin`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        blob = save(tensors, metadata=metadata)
    elif path.suffix in (".pth", ".pt", ".bin"):
        import io

        buf = io.BytesIO()
        torch.save(tensors, buf)
        blob = buf.getvalue()
    else:
        raise WeightsError(f"{path}: unknown extension {path.suffix!r}; use .safetensors, .pth, .pt or .bin")
    try:
        atomic_write(path, lambda f: f.write(blob))  # never half a file at `path`
    except OSError as exc:
        raise WeightsError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_weights(model: ResNet, path: str | os.PathLike) -> None:
    """Write the weights as safetensors, with the model name and spec (JSON) in the metadata."""
    if not isinstance(model, ResNet):
        raise TypeError(f"save_weights takes a resnets ResNet, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: save_weights writes safetensors; name the file *.safetensors")
    save_model_file(path, model, {"format": "resnets", "layout": "resnets"})


def load_model(path: str | os.PathLike) -> ResNet:
    """Rebuild a model from a file that records its spec (`save_weights` output), in eval mode."""
    state, meta = read_weights(path)
    if not isinstance(meta.get("spec"), Mapping):
        raise WeightsError(
            f"{path} does not record which model it holds; build it with create_model(NAME) and "
            "load_weights(model, path) instead"
        )
    model = model_from_spec(meta["spec"], meta.get("model"), state, str(path))
    _load(model, state, meta.get("layout", "resnets"), strict=True, where=str(path))
    return model.eval()


def target_layout(model: ResNet, to: str) -> str:
    """The layout name for `--to`: timm keeps pre-activation nets in its ResNetV2 layout."""
    if to == "timm" and model.spec.block.startswith("preact"):
        return "timm_resnetv2"
    if to not in LAYOUTS:
        raise WeightsError(f"unknown target layout {to!r}; known: {', '.join(LAYOUTS)}")
    return to


def model_from_weights(source: Source, model_name: str | None = None) -> tuple[ResNet, str]:
    """The model a checkpoint holds, built and loaded (strictly), and the layout it was read in.

    The model is `model_name` or, failing that, the one the checkpoint records; the number of
    classes follows the checkpoint's classifier, the input channels its first convolution.
    """
    from .registry import create_model

    state, meta = read_weights(source)
    where = "the state dict" if isinstance(source, Mapping) else str(source)
    layout = detect_layout(state)
    if layout is None:
        raise WeightsError(f"{where} is in no known ResNet layout (first keys: {', '.join(list(state)[:4])})")
    if model_name:
        ours = to_ours(state, layout, strict=False)
        fc = ours.get("head.fc.weight")
        sizes = {"num_classes": fc.shape[0]} if fc is not None and fc.ndim >= 1 and fc.shape[0] else {}
        conv = ours.get("stem.conv.weight", ours.get("stem.conv1.weight"))  # plain or deep stem
        if conv is not None and conv.ndim == 4 and conv.shape[1]:
            sizes["in_chans"] = conv.shape[1]
        try:
            model = create_model(model_name, **sizes)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise WeightsError(f"cannot build {model_name} for {where}: {_first_line(exc)}") from None
    elif isinstance(meta.get("spec"), Mapping):
        model = model_from_spec(meta["spec"], meta.get("model"), state, where)
    else:
        raise WeightsError(f"{where} does not record which model it holds; give its name (--model NAME)")
    _load(model, state, layout, strict=True, where=where)
    return model.eval(), layout


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None, to: str = "resnets"
) -> dict[str, Any]:
    """Read `src` in any supported layout, check it against the model, write it in layout `to`
    (the format follows `dst`'s extension). Returns what was done, for the CLI to report."""
    model, layout = model_from_weights(src, model_name)
    target = target_layout(model, to)
    try:
        out = from_ours(model.state_dict(), target, model.spec)
    except KeyError as exc:
        raise WeightsError(f"{model.name} has no {to} layout: {exc}") from None
    _write(out, Path(dst), _metadata(model, target))
    return {"model": model.name, "from": layout, "to": target, "tensors": len(out), "dst": str(dst)}
