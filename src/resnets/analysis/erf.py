"""Effective receptive field (Luo et al. 2016) of every stage, and of every split of a Res2Net block.

The ERF of a unit is |d unit / d input|, summed over input channels and averaged over inputs. The
theoretical receptive field only bounds it; the ERF says where the unit actually looks. Res2Net
claims that its chained splits give one block several receptive-field sizes: split i passes
through i 3x3 convs, so its ERF should grow with i.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .common import (
    StudyError,
    build_model,
    calibrate_bn,
    family_of,
    input_size_of,
    new_figure,
    radius_holding,
    support_box,
    write_outputs,
)

DEFAULT_MODELS = ("resnet50", "res2net50_26w_4s")
SHARE = 0.9  # the radius reported holds this share of the ERF mass


def centre_gradient(out: torch.Tensor, wrt: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
    """|d (sum over channels of the centre unit of `out`) / d wrt|, summed over channels, mean over batch.

    Each sample's centre unit depends on that sample only (BN in eval mode), so one backward pass
    of the batch sum gives every sample's gradient at once.
    """
    h, w = out.shape[-2:]
    (grad,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), wrt, retain_graph=retain_graph)
    return grad.abs().sum(1).mean(0)


def erf_map(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ERF (H x W, input pixels) of the centre output unit of `fn`, averaged over the batch `x`."""
    x = x.detach().clone().requires_grad_(True)
    return centre_gradient(fn(x), x, retain_graph=False)


def describe(mass: torch.Tensor, share: float = SHARE) -> dict:
    """Radius holding `share` of the mass (about its centroid) and the box of the nonzero gradient."""
    h, w = support_box(mass)
    return {"radius": radius_holding(mass, share), "support": [h, w], "size": list(mass.shape)}


def stage_erfs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """ERF (input pixels) of the centre unit of each stage's output: one forward, one backward per stage."""
    x = x.detach().clone().requires_grad_(True)
    feats = []
    h = model.stem(x)
    for stage in model.stages:
        h = stage(h)
        feats.append(h)
    return [centre_gradient(f, x, retain_graph=i < len(feats) - 1) for i, f in enumerate(feats)]


def split_erfs(model: nn.Module, x: torch.Tensor, stage: int, index: int) -> dict[str, list[torch.Tensor]]:
    """ERFs of each split y_1..y_s of one Res2Net block, w.r.t. the image and w.r.t. the block's input.

    The splits are read where the block concatenates them (the input of its last 1x1 conv), so no
    part of the block's code is replaced.
    """
    try:
        block = model.stages[stage][index]
    except IndexError:
        raise StudyError(f"no block {stage}.{index} in {model.name}") from None
    if not hasattr(block, "convs") or getattr(block, "scale", 1) < 2:
        raise StudyError(f"block {stage}.{index} of {model.name} is not a Res2Net block with scale > 1")
    seen: dict[str, torch.Tensor] = {}
    h1 = block.register_forward_pre_hook(lambda _m, args: seen.__setitem__("input", args[0]))
    h2 = block.conv3.register_forward_pre_hook(lambda _m, args: seen.__setitem__("splits", args[0]))
    x = x.detach().clone().requires_grad_(True)
    try:
        h = model.stem(x)
        for s in range(stage + 1):
            h = model.stages[s](h)
    finally:
        h1.remove()
        h2.remove()
    out: dict[str, list[torch.Tensor]] = {"image": [], "block_input": []}
    parts = seen["splits"].split(block.width, 1)
    for i, part in enumerate(parts):
        h, w = part.shape[-2:]
        unit = part[:, :, h // 2, w // 2].sum()
        g_img, g_blk = torch.autograd.grad(unit, (x, seen["input"]), retain_graph=i < len(parts) - 1)
        out["image"].append(g_img.abs().sum(1).mean(0))
        out["block_input"].append(g_blk.abs().sum(1).mean(0))
    return out


def receptive_field(
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    input_size: int | None = None,
    num_inputs: int = 8,
    split_block: tuple[int, int] = (2, 1),
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict:
    """ERF radius (holding 90% of the mass) and support per stage; per split for Res2Net models.

    Weights are at initialisation, inputs N(0, 1); BN statistics are calibrated on those inputs
    and the net runs in eval mode (see `calibrate_bn`). `split_block` = (stage, index) of the
    Res2Net block whose splits are measured; the default is a non-first block (where the splits
    are chained) of the 14x14 stage.
    """
    result: dict = {"models": {}, "share": SHARE}
    maps: dict[str, dict] = {}
    for name in models:
        torch.manual_seed(seed)
        model = build_model(name)
        size = input_size or input_size_of(model)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(num_inputs, model.spec.in_chans, size, size, generator=gen)
        calibrate_bn(model, x)
        stages = stage_erfs(model, x)
        entry = {"family": family_of(model), "input_size": size}
        entry["stages"] = [describe(m) for m in stages]
        maps[name] = {"stages": stages}
        if model.spec.block == "res2net" and model.spec.scale > 1:
            splits = split_erfs(model, x, *split_block)
            entry["splits"] = {
                "block": f"{split_block[0]}.{split_block[1]}",
                "image": [describe(m) for m in splits["image"]],
                "block_input": [describe(m) for m in splits["block_input"]],
            }
            maps[name]["splits"] = splits
        result["models"][name] = entry
    result["setup"] = {"inputs": f"N(0,1), {num_inputs} images, seed {seed}", "weights": "initialisation"}
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "receptive_field", result, plot(result, maps))
    return result


def _heatmap(ax, mass: torch.Tensor, info: dict, title: str, unit: str):
    from matplotlib.patches import Circle

    m = mass / mass.max()
    im = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=1)
    h, w = mass.shape
    ys, xs = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    p = mass / mass.sum()
    cy, cx = float((p * ys).sum()), float((p * xs).sum())
    ax.add_patch(Circle((cx, cy), info["radius"], fill=False, color="cyan", lw=1))
    ax.set_title(f"{title}\nr{int(SHARE * 100)} = {info['radius']:.1f} {unit}", fontsize=8)
    ax.set_xlabel(f"x ({unit})", fontsize=7)
    ax.set_ylabel(f"y ({unit})", fontsize=7)
    ax.tick_params(labelsize=6)
    return im


def plot(result: dict, maps: dict):
    rows = []
    for name, m in maps.items():
        rows.append(
            [
                (mp, result["models"][name]["stages"][i], f"{name}\nstage {i + 1}", "px")
                for i, mp in enumerate(m["stages"])
            ]
        )
        if "splits" in m:
            sp = result["models"][name]["splits"]
            for key, unit in (("image", "px"), ("block_input", "cells")):
                rows.append(
                    [
                        (
                            mp,
                            sp[key][i],
                            f"{name} block {sp['block']}\nsplit y{i + 1} w.r.t. {key.replace('_', ' ')}",
                            unit,
                        )
                        for i, mp in enumerate(m["splits"][key])
                    ]
                )
    ncols = max(len(r) for r in rows)
    fig, axes = new_figure(len(rows), ncols, size=(2.6, 2.8))
    im = None
    for r, row in enumerate(rows):
        for c in range(ncols):
            if c < len(row):
                im = _heatmap(axes[r][c], *row[c])
            else:
                axes[r][c].axis("off")
    fig.suptitle(
        f"Effective receptive field (|gradient| of the centre unit, normalised to its max); "
        f"circle holds {int(SHARE * 100)}% of the mass",
        fontsize=10,
    )
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.3, label="relative |gradient| (max = 1)")
    return fig


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, e in result["models"].items():
        for i, st in enumerate(e["stages"]):
            rows.append([name, f"stage {i + 1}", f"{st['radius']:.1f} px", "x".join(map(str, st["support"]))])
        sp = e.get("splits")
        if sp:
            for i, (a, b) in enumerate(zip(sp["image"], sp["block_input"])):
                rows.append(
                    [
                        name,
                        f"block {sp['block']} split y{i + 1}",
                        f"{a['radius']:.1f} px ({b['radius']:.2f} cells)",
                        f"{'x'.join(map(str, a['support']))} px ({'x'.join(map(str, b['support']))} cells)",
                    ]
                )
    return ["model", "unit", f"r{int(SHARE * 100)} (ERF radius)", "gradient support"], rows
