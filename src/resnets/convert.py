"""State-dict key maps between this package and the reference implementations.

Every layout is one table of key-prefix rules `(ours, theirs)`, read in both directions, so a
rename lives in exactly one place. A template may hold these fields:

- `{s}` our 0-based stage index and `{S}` the reference's 1-based `layerN` number (S = s + 1);
- `{i}` a block index and `{n}` any other number, both copied unchanged;
- `{sc}` (ours: `conv` or `bn` of a projection shortcut) paired with `{ds}` (theirs: the index in
  a `downsample` Sequential). Which index holds the conv depends on whether a parameter-free pool
  comes first, so towards ours it is read from the shapes (the conv's weight is 4-D) and towards
  theirs from the network's spec.

Rules are tried in order and the first matching prefix wins, so specific rules come first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from .models.net import NetSpec

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Shortcuts:
    """What decides where a shortcut conv sits in a reference `downsample`: a NetSpec has these fields."""

    shortcut: str
    block: str
    strides: tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str
    deep_stem_only: bool = False  # for a prefix of ours that has two homes depending on the stem


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    rules: tuple[Rule, ...]
    # (spec, stage) -> index of the shortcut conv in the reference's `downsample` Sequential.
    shortcut_offset: Callable[[Shortcuts, int], int] = lambda spec, stage: 0
    conv_head: bool = False  # the classifier is a 1x1 conv: weight (N, C, 1, 1) instead of (N, C)


def _pool_first_tv(spec: Shortcuts, stage: int) -> int:
    # timm's and the official Res2Net-v1b's avg-down keep a pool (an Identity at stride 1) at
    # index 0 in every stage; the official iResNet adds its max-pool only where the stage strides.
    if spec.shortcut == "avgdown":
        return 1
    if spec.shortcut == "maxpool":
        return int(spec.strides[stage] > 1)
    return 0


def _pool_first_mmpretrain(spec: Shortcuts, stage: int) -> int:
    # mmpretrain's ResNet adds the avg-pool only where the stage strides; its Res2Net always does.
    if spec.shortcut == "avgdown":
        return int(spec.block == "res2net" or spec.strides[stage] > 1)
    return 0


# timm's and the official Res2Net-v1b's deep stem: conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv).
_DEEP_STEM = (
    Rule("stem.conv1.", "conv1.0."),
    Rule("stem.bn1.", "conv1.1."),
    Rule("stem.conv2.", "conv1.3."),
    Rule("stem.bn2.", "conv1.4."),
    Rule("stem.conv3.", "conv1.6."),
)


def _tv_rules(prefix: str = "") -> tuple[Rule, ...]:
    """torchvision's stem and stage names (timm's ResNet / Res2Net and the official iResNet share them)."""
    return (
        Rule("stem.conv.", f"{prefix}conv1."),
        Rule("stem.bn.", f"{prefix}bn1."),
        Rule("stages.{s}.{i}.shortcut.{sc}.", prefix + "layer{S}.{i}.downsample.{ds}."),
        Rule("stages.{s}.{i}.", prefix + "layer{S}.{i}."),
    )


_TV = _DEEP_STEM + _tv_rules() + (Rule("head.fc.", "fc."),)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout("resnets", "this package", (Rule("", ""),)),
        Layout("torchvision", "torchvision ResNet / ResNeXt / Wide ResNet", _TV, _pool_first_tv),
        Layout("timm", "timm ResNet / ResNeXt / Res2Net, incl. deep stem and avg-down", _TV, _pool_first_tv),
        Layout("res2net_official", "official Res2Net (= timm res2net* keys)", _TV, _pool_first_tv),
        Layout("iresnet_official", "official iResNet (iduta/iresnet)", _TV, _pool_first_tv),
        Layout(
            "timm_resnetv2",
            "timm pre-activation ResNetV2",
            (
                Rule("stem.conv.", "stem.conv."),
                Rule("stem.conv{n}.", "stem.conv{n}."),
                Rule("stem.bn{n}.", "stem.norm{n}."),
                Rule("stem.bn.", "stem.norm."),
                Rule("stages.{s}.{i}.bn{n}.", "stages.{s}.blocks.{i}.norm{n}."),
                Rule("stages.{s}.{i}.shortcut.conv.", "stages.{s}.blocks.{i}.downsample.conv."),
                Rule("stages.{s}.{i}.", "stages.{s}.blocks.{i}."),
                Rule("head.norm.", "norm."),
                Rule("head.fc.", "head.fc."),
            ),
            conv_head=True,
        ),
        Layout(
            "mmpretrain",
            "mmpretrain ImageClassifier (backbone. + torchvision keys, head.fc)",
            (
                Rule("stem.conv1.", "backbone.stem.0.conv."),
                Rule("stem.bn1.", "backbone.stem.0.bn."),
                Rule("stem.conv2.", "backbone.stem.1.conv."),
                Rule("stem.bn2.", "backbone.stem.1.bn."),
                Rule("stem.conv3.", "backbone.stem.2.conv."),
                Rule("stem.bn.", "backbone.stem.2.bn.", deep_stem_only=True),
            )
            + _tv_rules("backbone.")
            + (Rule("head.fc.", "head.fc."),),
            _pool_first_mmpretrain,
        ),
    ]
}

_FIELD = re.compile(r"\{(\w+)\}")


def _regex(template: str) -> re.Pattern[str]:
    def field(name: str) -> str:
        return f"(?P<{name}>conv|bn)" if name == "sc" else rf"(?P<{name}>\d+)"

    parts = _FIELD.split(template)  # literal, field, literal, field, ...
    body = "".join(field(p) if k % 2 else re.escape(p) for k, p in enumerate(parts))
    return re.compile(body)


def _fill(template: str, values: Mapping[str, object]) -> str:
    return _FIELD.sub(lambda m: str(values[m.group(1)]), template)


def _get_layout(layout: str) -> Layout:
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}") from None


class UnmappedKeysError(KeyError):
    """Keys that no rule of the layout covers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _rename(
    state_dict: StateDict,
    layout: Layout,
    to_theirs: bool,
    fill_fields: Callable[[dict[str, object], str], None],
    reshape: Callable[[str, torch.Tensor], torch.Tensor],
    keep_unmapped: bool,
) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to each key; the one loop both directions share."""
    rules = [(r.ours, r.theirs) if to_theirs else (r.theirs, r.ours) for r in layout.rules]
    compiled = [(_regex(src), dst) for src, dst in rules]
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        for pattern, dst in compiled:
            m = pattern.match(key)
            if m is not None:
                values: dict[str, object] = dict(m.groupdict())
                fill_fields(values, m.group(0))
                new_key = _fill(dst, values) + key[m.end() :]
                out[new_key] = reshape(new_key, value)
                break
        else:
            if keep_unmapped:
                out[key] = value
            else:
                unmapped.append(key)
    if unmapped:
        direction = "ours-to-reference" if to_theirs else "reference-to-ours"
        shown = ", ".join(unmapped[:8]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 8 else "")
        raise UnmappedKeysError(
            f"{len(unmapped)} key(s) have no {direction} rule in layout {layout.name!r}: {shown}"
        )
    return out


def to_ours(state_dict: StateDict, layout: str, *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Rename a reference implementation's state dict to this package's keys.

    Tensors are not copied. With `strict=False`, keys no rule covers are kept unchanged (so that
    `load_state_dict` reports them); with `strict=True` they raise `UnmappedKeysError`.
    """
    target = _get_layout(layout)

    def fill_fields(values: dict[str, object], prefix: str) -> None:
        if "S" in values:
            values["s"] = int(values["S"]) - 1
        if "ds" in values:
            # The conv is the one entry of the Sequential with a 4-D weight; its BN follows it.
            weight = state_dict.get(f"{prefix}weight")
            values["sc"] = "conv" if weight is not None and weight.ndim == 4 else "bn"

    def reshape(key: str, value: torch.Tensor) -> torch.Tensor:
        return value.flatten(1) if target.conv_head and key == "head.fc.weight" and value.ndim == 4 else value

    return _rename(state_dict, target, False, fill_fields, reshape, keep_unmapped=not strict)


def guess_shortcuts(state_dict: StateDict) -> Shortcuts:
    """Guess, from one of our state dicts, what `from_ours` needs to know about its shortcuts.

    It reads `bn0` (iResNet: max-pool shortcuts, every stage strided) and a deep stem (avg-down).
    An iResNet-18/34 has no `bn0` and the same keys as a ResNet-18/34, and a ResStage net has
    iResNet's `bn0` with ResNet's shortcuts: pass their spec instead.
    """
    keys = list(state_dict)
    n_stages = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"stages\.(\d+)\.", k))), default=0)
    block = "res2net" if any(".convs." in k for k in keys) else "bottleneck"
    if any(".bn0." in k for k in keys):
        return Shortcuts("maxpool", block, (2,) * n_stages)
    shortcut = "avgdown" if "stem.conv1.weight" in state_dict else "B"
    return Shortcuts(shortcut, block, (1,) + (2,) * (n_stages - 1))


def from_ours(
    state_dict: StateDict, layout: str, spec: NetSpec | Shortcuts | None = None
) -> dict[str, torch.Tensor]:
    """Rename this package's state dict to a reference implementation's keys.

    `spec` (the model's `.spec`) says whether a projection shortcut's conv comes after a pool in
    the reference's `downsample` Sequential; without it, `guess_shortcuts` guesses from the keys.
    """
    target = _get_layout(layout)
    shortcuts = spec if spec is not None else guess_shortcuts(state_dict)
    if "stem.conv1.weight" not in state_dict:
        target = replace(target, rules=tuple(r for r in target.rules if not r.deep_stem_only))

    def fill_fields(values: dict[str, object], prefix: str) -> None:
        if "s" in values:
            values["S"] = int(values["s"]) + 1
        if "sc" in values:
            values["ds"] = target.shortcut_offset(shortcuts, int(values["s"])) + (values["sc"] == "bn")

    def reshape(key: str, value: torch.Tensor) -> torch.Tensor:
        return (
            value[:, :, None, None]
            if target.conv_head and key == "head.fc.weight" and value.ndim == 2
            else value
        )

    return _rename(state_dict, target, True, fill_fields, reshape, keep_unmapped=False)
