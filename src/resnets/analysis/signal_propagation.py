"""Signal propagation: mean and standard deviation of the main path after every block.

The iResNet paper argues that a pre-activation net (v2) lets the main path grow un-normalised
block after block, while v1 re-normalises (through BN and ReLU) in every block, and iResNet only
at the end of each stage. This measures it: forward hooks on every block record the statistics
of the block's output, which is the main path the next block reads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..models.net import ResNet
from .common import (
    CIFAR_FAMILIES,
    build_model,
    cifar_depth_name,
    cifar_depth_spec,
    colours_for,
    family_of,
    input_size_of,
    new_figure,
    shades,
    write_outputs,
)

DEFAULT_MODELS = ("resnet110", "preact_resnet110", "iresnet110_cifar")
# The sweep's families (keys of common.CIFAR_FAMILIES) as family_of names them, and their titles.
SWEEP_FAMILIES = {"v1": "resnet", "v2": "preact_resnet", "iresnet": "iresnet"}
FAMILY_TITLES = {
    "resnet": "v1 (original ResNet, option-A shortcuts)",
    "preact_resnet": "v2 (pre-activation ResNet)",
    "iresnet": "iResNet (CIFAR-size, max-pool shortcuts)",
}


def layer_count(model: ResNet) -> int:
    """Weighted layers on the main path: two convs per basic block, three per bottleneck, plus the
    stem conv and the classifier (resnet110: 2 x 54 + 2)."""
    spec = model.spec
    return (2 if "basic" in spec.block else 3) * sum(spec.depths) + 2


@torch.no_grad()
def block_statistics(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """Mean and std (over batch, channels and positions) of the stem output and every block output.

    Index 0 is the stem, index k the k-th block; `stage` gives the stage of each entry (-1: stem).
    """
    stats: dict[str, list] = {"mean": [], "std": [], "rms": [], "stage": []}

    def record(stage: int):
        def hook(_module, _inputs, out):
            # Read the values now: a later in-place op must not change what is recorded.
            out = out.detach().double()
            stats["mean"].append(float(out.mean()))
            stats["std"].append(float(out.std()))
            stats["rms"].append(float(out.pow(2).mean().sqrt()))
            stats["stage"].append(stage)

        return hook

    handles = [model.stem.register_forward_hook(record(-1))]
    for s, stage in enumerate(model.stages):
        handles += [block.register_forward_hook(record(s)) for block in stage]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return stats


def signal(
    models: Sequence[str] | None = None,
    checkpoints: Sequence[str] = (),
    batch_size: int = 32,
    input_size: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    depths: Sequence[int] = (),
) -> dict:
    """Per-block mean and std of the main path: named models at initialisation, and each
    checkpoint both trained and at initialisation (a fresh net of the same spec).

    `depths` (each 6n+2) adds a depth sweep: the CIFAR nets of v1, v2 and iResNet at every depth
    (see common.cifar_depth_spec), after `models` and before the checkpoints; a sweep net already
    among `models` is measured once. `models=None` means DEFAULT_MODELS without a sweep and none
    with one, so `signal(depths=(20, 56))` is the sweep alone.

    At initialisation the net runs in train mode (BN uses the batch's statistics, as in the first
    training step) on N(0, 1) inputs, the scale of normalised images; it runs on a copy, so its
    running statistics are not touched. A checkpoint runs in eval mode, as deployed.
    Returns {"models": {label: {"family", "depth", "input_size", "init": stats,
    ["trained": stats]}}, "depths": the sweep's depths, "setup": ...}; stats["stage"] gives the
    stage of every entry (-1: the stem).
    """
    from .inputs import load_checkpoint_model

    def entry(model: ResNet, trained: nn.Module | None = None) -> dict:
        size = input_size or input_size_of(model)
        gen = torch.Generator().manual_seed(seed)  # the same inputs for every model
        x = torch.randn(batch_size, model.spec.in_chans, size, size, generator=gen)
        out = {"family": family_of(model), "depth": layer_count(model), "input_size": size}
        out["init"] = block_statistics(copy.deepcopy(model).train(), x)
        if trained is not None:
            out["trained"] = block_statistics(trained.eval(), x)
        return out

    depths = sorted({int(d) for d in depths})
    for d in depths:
        cifar_depth_spec("v1", d)  # a depth that is not 6n+2 fails before any net is measured
    if models is None:
        models = () if depths else DEFAULT_MODELS
    names = list(dict.fromkeys(models))
    names += [n for f in CIFAR_FAMILIES for d in depths if (n := cifar_depth_name(f, d)) not in names]
    result: dict = {"models": {}, "depths": depths}
    for name in names:
        torch.manual_seed(seed)
        result["models"][name] = entry(build_model(name))
    for path in checkpoints:
        loaded = load_checkpoint_model(path)
        torch.manual_seed(seed)
        fresh = ResNet(loaded.model.spec, name=loaded.model.name)
        # A run folder named after its model gives the model's name as label: keep the sweep's
        # (or a named model's) entry, whose init need not be this checkpoint's spec.
        label, k = loaded.label, 1
        while label in result["models"]:
            label, k = f"{loaded.label} (checkpoint{'' if k == 1 else f' {k}'})", k + 1
        result["models"][label] = entry(fresh, loaded.model) | {"checkpoint": loaded.source}
    result["setup"] = {
        "inputs": f"N(0,1), batch {batch_size}, seed {seed}",
        "init_bn": "train mode (batch statistics)",
        "trained_bn": "eval mode (running statistics)",
    }
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "signal", result, plot(result))
    return result


def plot(result: dict):
    """The sweep figure when the result has a depth sweep, else one line per model."""
    if result.get("depths"):
        return plot_sweep(result)
    names = list(result["models"])
    families = [result["models"][n]["family"] for n in names]
    colours = colours_for(names, families)
    phases = ["init"] + (["trained"] if any("trained" in e for e in result["models"].values()) else [])
    fig, axes = new_figure(2, len(phases), size=(6.4, 3.6), sharex="col")
    for j, phase in enumerate(phases):
        for name in names:
            st = result["models"][name].get(phase)
            if st is None:
                continue
            depth = range(len(st["std"]))
            style = dict(color=colours[name], label=name, lw=1.6)
            axes[0][j].plot(depth, st["std"], **style)
            axes[1][j].plot(depth, st["mean"], **style)
        title = (
            "at initialisation (BN: batch statistics)"
            if phase == "init"
            else "trained (BN: running statistics)"
        )
        axes[0][j].set_title(f"Main-path std after each block, {title}", fontsize=9)
        axes[1][j].set_title(f"Main-path mean after each block, {title}", fontsize=9)
        axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("std of activations (a.u., log scale)")
        axes[1][j].set_ylabel("mean of activations (a.u.)")
        axes[1][j].set_xlabel("block index (0 = stem output)")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def stage_ends(st: dict) -> list[int]:
    """Index of the last block of every stage in block_statistics' lists."""
    stages = st["stage"]
    return [k for k in range(1, len(stages)) if k == len(stages) - 1 or stages[k + 1] != stages[k]]


def plot_sweep(result: dict):
    """One column per family, rows std (log) and mean, against relative depth (block index /
    number of blocks), so that every depth shares the axis; dotted lines: stage boundaries.

    One line per depth, darker and thicker = deeper; trained checkpoints dashed, in their
    family's column and in the colour of their depth.
    """
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    entries = result["models"]
    present = {e["family"] for e in entries.values()}
    families = [f for f in SWEEP_FAMILIES.values() if f in present] + sorted(
        present - set(SWEEP_FAMILIES.values())
    )
    relu_std = math.sqrt(0.5 - 1 / (2 * math.pi))
    fig, axes = new_figure(2, len(families), size=(4.6, 3.4), sharex=True)
    for j, fam in enumerate(families):
        top, bottom = axes[0][j], axes[1][j]
        members = {n: e for n, e in entries.items() if e["family"] == fam}
        depths = sorted({e["depth"] for e in members.values()})
        colour = dict(zip(depths, shades(fam, len(depths))))
        width = {d: 0.9 + 0.9 * i / max(1, len(depths) - 1) for i, d in enumerate(depths)}
        boundaries: set[float] = set()
        drawn_init: set[int] = set()  # a checkpoint's fresh net only where its depth is not drawn yet
        for phase in ("init", "trained"):
            for name, e in members.items():
                st = e.get(phase)
                if st is None or (phase == "init" and "checkpoint" in e and e["depth"] in drawn_init):
                    continue
                blocks = len(st["std"]) - 1
                x = [k / blocks for k in range(blocks + 1)]
                boundaries |= {round(k / blocks, 6) for k in stage_ends(st)[:-1]}
                style = dict(color=colour[e["depth"]], lw=width[e["depth"]])
                if phase == "init":
                    drawn_init.add(e["depth"])
                    style["label"] = f"{name} ({e['depth']} layers)"
                else:
                    style.update(ls="--", label=f"{name}, trained")
                top.plot(x, st["std"], **style)
                bottom.plot(x, st["mean"], **style)
        top.axhline(relu_std, color="0.5", ls="-.", lw=0.8, label="0.584: std of ReLU(N(0, 1))")
        for ax in (top, bottom):
            for b in sorted(boundaries):
                ax.axvline(b, color="0.3", ls=":", lw=1)
            ax.grid(alpha=0.3)
        edges = [0.0, *sorted(boundaries), 1.0]
        for k in range(len(edges) - 1):  # stage names between the boundaries
            top.text(
                (edges[k] + edges[k + 1]) / 2, 1.0, f"stage {k + 1}", transform=top.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="0.3",
            )  # fmt: skip
        top.set_title(FAMILY_TITLES.get(fam, fam), fontsize=10, pad=14)
        top.set_yscale("log")
        top.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        top.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 4, 6)))
        top.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        bottom.set_xlabel("relative depth (block index / number of blocks; 0 = stem output)", fontsize=8)
        handles, labels = top.get_legend_handles_labels()
        bottom.legend(handles, labels, fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    axes[0][0].set_ylabel("main-path std after each block\n(log scale)")
    axes[1][0].set_ylabel("main-path mean after each block")
    fig.suptitle(
        "Signal propagation over depth: solid = initialisation (BN: batch statistics), "
        "dashed = trained (BN: running statistics); dotted = stage boundaries",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, e in result["models"].items():
        for phase in ("init", "trained"):
            st = e.get(phase)
            if st is None:
                continue
            # The largest std and where it is: how far the un-normalised signal grows.
            peak = max(range(len(st["std"])), key=st["std"].__getitem__)
            rows.append(
                [
                    name,
                    phase,
                    str(e.get("depth", "")),
                    f"{st['std'][0]:.3g}",
                    f"{st['std'][peak]:.3g} (block {peak})",
                    " / ".join(f"{st['std'][k]:.3g}" for k in stage_ends(st)),
                    f"{st['mean'][-1]:.3g}",
                ]
            )
    header = ["model", "weights", "depth", "std stem", "max std", "std at stage ends", "mean last block"]
    return header, rows
