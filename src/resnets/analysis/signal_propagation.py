"""Signal propagation: mean and standard deviation of the main path after every block.

The iResNet paper argues that a pre-activation net (v2) lets the main path grow un-normalised
block after block, while v1 re-normalises (through BN and ReLU) in every block, and iResNet only
at the end of each stage. This measures it: forward hooks on every block record the statistics
of the block's output, which is the main path the next block reads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..models.net import ResNet
from .common import build_model, colours_for, family_of, input_size_of, new_figure, write_outputs

DEFAULT_MODELS = ("resnet110", "preact_resnet110", "iresnet110_cifar")


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
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    checkpoints: tuple[str, ...] | list[str] = (),
    batch_size: int = 32,
    input_size: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict:
    """Per-block mean and std of the main path: registered models at initialisation, and each
    checkpoint both trained and at initialisation (a fresh net of the same spec).

    At initialisation the net runs in train mode (BN uses the batch's statistics, as in the first
    training step) on N(0, 1) inputs, the scale of normalised images; it runs on a copy, so its
    running statistics are not touched. A checkpoint runs in eval mode, as deployed.
    Returns {"models": {label: {"family", "init": stats, ["trained": stats]}}, "setup": ...}.
    """
    from .inputs import load_checkpoint_model

    def entry(model: ResNet, trained: nn.Module | None = None) -> dict:
        size = input_size or input_size_of(model)
        gen = torch.Generator().manual_seed(seed)  # the same inputs for every model
        x = torch.randn(batch_size, model.spec.in_chans, size, size, generator=gen)
        out = {"family": family_of(model), "input_size": size}
        out["init"] = block_statistics(copy.deepcopy(model).train(), x)
        if trained is not None:
            out["trained"] = block_statistics(trained.eval(), x)
        return out

    result: dict = {"models": {}}
    for name in models:
        torch.manual_seed(seed)
        result["models"][name] = entry(build_model(name))
    for path in checkpoints:
        loaded = load_checkpoint_model(path)
        torch.manual_seed(seed)
        fresh = ResNet(loaded.model.spec, name=loaded.model.name)
        result["models"][loaded.label] = entry(fresh, loaded.model) | {"checkpoint": loaded.source}
    result["setup"] = {
        "inputs": f"N(0,1), batch {batch_size}, seed {seed}",
        "init_bn": "train mode (batch statistics)",
        "trained_bn": "eval mode (running statistics)",
    }
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "signal", result, plot(result))
    return result


def plot(result: dict):
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
                    f"{st['std'][0]:.3g}",
                    f"{st['std'][peak]:.3g} (block {peak})",
                    f"{st['std'][-1]:.3g}",
                    f"{st['mean'][-1]:.3g}",
                ]
            )
    return ["model", "weights", "std stem", "max std", "std last block", "mean last block"], rows
