"""Named models: one registration per network of the papers, with the paper's own numbers."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, replace

from .models.net import FeatureExtractor, NetSpec, ResNet


@dataclass(frozen=True)
class Paper:
    """Published numbers for exactly this architecture, as printed, and where they come from.

    `params_m` and `gmacs` (1e9 multiply-adds at `Entry.input_size`) are what the tests check
    our counts against; errors are in percent. `note` explains every known gap.
    """

    cite: str
    source: str = ""
    params_m: float | None = None
    gmacs: float | None = None
    top1_err: float | None = None
    top5_err: float | None = None
    cifar10_err: float | None = None
    cifar100_err: float | None = None
    note: str = ""
    # Relative tolerance of the params check. Above 2% only for a documented gap (see `note`).
    params_tol: float = 0.02


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    spec: NetSpec
    paper: Paper
    input_size: int  # the paper's input resolution (square)


_REGISTRY: dict[str, Entry] = {}

RESNET_V1 = "He et al. 2015, Deep Residual Learning for Image Recognition, arXiv:1512.03385"
RESNET_V2 = "He et al. 2016, Identity Mappings in Deep Residual Networks, arXiv:1603.05027"
WRN = "Zagoruyko & Komodakis 2016, Wide Residual Networks, arXiv:1605.07146"
RESNEXT = "Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks, arXiv:1611.05431"
RES2NET = "Gao et al. 2019, Res2Net: A New Multi-scale Backbone Architecture, arXiv:1904.01169"
IRESNET = "Duta et al. 2020, Improved Residual Networks for Image and Video Recognition, arXiv:2004.04989"


def register(name: str, family: str, spec: NetSpec, paper: Paper, input_size: int = 224) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = Entry(name, family, spec, paper, input_size)


class UnknownModelError(KeyError):
    """An unknown model name; the message suggests the closest registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _ensure_loaded() -> None:
    import importlib

    from .models import FAMILY_MODULES

    for module in FAMILY_MODULES:  # importing a family module registers its blocks and networks
        importlib.import_module(f"resnets.models.{module}")


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_entry(name: str) -> Entry:
    """The registration of `name`: spec, family, input size and the paper record."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `resnets list`"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def resolve_spec(name: str, **overrides) -> NetSpec:
    """The spec of `name` with overrides applied; an unknown override is a TypeError naming it."""
    spec = get_entry(name).spec
    valid = NetSpec.field_names()
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise TypeError(
            f"unknown override {', '.join(map(repr, unknown))} for model {name!r}; valid: {', '.join(valid)}"
        )
    for k, v in overrides.items():
        if isinstance(getattr(spec, k), tuple) and isinstance(v, list):
            overrides[k] = tuple(v)
    return replace(spec, **overrides)


def create_model(
    name: str, *, features_only: bool = False, out_indices: tuple[int, ...] = (1, 2, 3, 4), **overrides
) -> ResNet | FeatureExtractor:
    """Build a registered network, e.g. `create_model("resnet50", num_classes=10, drop_path=0.1)`.

    `features_only=True` returns a backbone that outputs the feature maps of `out_indices`
    (0 = stem, 1..4 = stages) and lists their channels and strides in `.feature_info`;
    `output_stride=16` or `8` trades the last strides for dilation.
    """
    net = ResNet(resolve_spec(name, **overrides), name=name)
    return FeatureExtractor(net, tuple(out_indices)) if features_only else net
