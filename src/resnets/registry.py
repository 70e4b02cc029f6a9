"""Named models: look-up and construction. The family modules register their networks in
`resnets.models.zoo` when `resnets.models` is imported; this module only reads that store."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn

from .models import ENTRIES, FAMILIES, Entry, Family, Paper
from .models.cifar_depths import sweep_spec
from .models.net import FeatureExtractor, NetSpec, ResNet
from .models.zoo import register

__all__ = ["ENTRIES", "FAMILIES", "Entry", "Family", "Paper", "UnknownModelError", "register"]


class UnknownModelError(KeyError):
    """An unknown model name; the message suggests the closest registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in a name by value: resnet18 < resnet50 < resnet101."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, in natural order (resnet18 before resnet101)."""
    return sorted((n for n in ENTRIES if fnmatch.fnmatchcase(n, pattern)), key=natural_key)


@functools.cache
def _shipped_counts() -> dict[str, dict[str, int]]:
    return json.loads((Path(__file__).parent / "counts.json").read_text())


def model_counts(name: str) -> tuple[int, int]:
    """(parameters, multiply-adds at the paper's input size) of a registered model.

    Read from the counts that ship with the package (tests/test_registry.py checks them against
    live counts); counted on the meta device for a model the file does not list.
    """
    row = _shipped_counts().get(name)
    if row is not None and row["input_size"] == get_entry(name).input_size:
        return row["params"], row["macs"]
    from .complexity import count_params_macs

    return count_params_macs(name)


def get_entry(name: str) -> Entry:
    """The registration of `name`: spec, family, input size and the paper record."""
    try:
        return ENTRIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(ENTRIES), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `resnets list`"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def resolve_spec(name: str, **overrides) -> NetSpec:
    """The spec of `name` with overrides applied.

    An unknown override is a TypeError naming it; an invalid value, or a field the model's block
    does not use (which would build the default network), a ValueError naming the model. Besides
    the registered names, the CIFAR nets of other depths in `models.cifar_depths` ("resnet32",
    "preact_resnet56", "iresnet20_cifar") are built by name.
    """
    spec = sweep_spec(name) or get_entry(name).spec
    valid = NetSpec.field_names()
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise TypeError(
            f"unknown override {', '.join(map(repr, unknown))} for model {name!r}; valid: {', '.join(valid)}"
        )
    for k, v in overrides.items():
        if isinstance(getattr(spec, k), tuple) and isinstance(v, list):
            overrides[k] = tuple(v)
    try:
        return replace(spec, **overrides)
    except ValueError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None


def create_model(
    name: str,
    *,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    norm_layer: Callable[[int], nn.Module] | None = None,
    act_layer: Callable[..., nn.Module] | None = None,
    **overrides,
) -> ResNet | FeatureExtractor:
    """Build a registered network, e.g. `create_model("resnet50", num_classes=10, drop_path=0.1)`,
    or a CIFAR net of any depth 6n+2 by name ("preact_resnet56", "iresnet20_cifar").

    `features_only=True` returns a backbone that outputs the feature maps of `out_indices`
    (0 = stem, 1..4 = stages) and lists their channels and strides in `.feature_info`;
    `output_stride=16` or `8` trades the last strides for dilation. `norm_layer` (a class or
    callable taking the channel count, e.g. torchvision.ops.FrozenBatchNorm2d) and `act_layer`
    (e.g. nn.SiLU) replace BatchNorm2d and ReLU everywhere.
    """
    net = ResNet(resolve_spec(name, **overrides), name=name, norm_layer=norm_layer, act_layer=act_layer)
    return FeatureExtractor(net, tuple(out_indices)) if features_only else net
