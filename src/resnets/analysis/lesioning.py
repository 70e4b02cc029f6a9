"""Lesion study (Veit et al. 2016; the Wide ResNet paper's "diminishing feature reuse").

Remove one residual block at a time, keeping only its shortcut, and measure test accuracy; and
measure per block how large the residual branch is next to the shortcut. If most blocks of a
deep thin net contribute little, most lesions cost little accuracy and most ratios are small.

Every residual block of the library applies its `drop_path` module to the residual branch right
before the add, so a forward hook that turns that module's output into zeros removes exactly the
branch and nothing else (any BN-ReLU after the add, as in v1 and iResNet end blocks, stays).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .common import StudyError, pyplot, residual_blocks, shades, write_outputs


def has_branch_and_shortcut(block: nn.Module) -> bool:
    """A residual block: a shortcut (None in plain nets) and the drop-path its branch goes through."""
    return getattr(block, "shortcut", None) is not None and isinstance(
        getattr(block, "drop_path", None), nn.Module
    )


@contextlib.contextmanager
def lesioned(block: nn.Module) -> Iterator[None]:
    """Within the context, `block` outputs what its shortcut alone gives (the branch is zero)."""
    if not has_branch_and_shortcut(block):
        raise StudyError("only a block with a shortcut can be lesioned (a plain block has nothing left)")
    handle = block.drop_path.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        yield
    finally:
        handle.remove()


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten(1).norm(dim=1)


@torch.no_grad()
def branch_shortcut_ratios(model: nn.Module, batches) -> dict[str, float]:
    """Per residual block: mean over images of ||residual branch|| / ||shortcut||.

    The branch is the drop-path output; the shortcut is the shortcut module's output, or the
    block's input where the block adds its input without calling the module (identity path of
    pre-activation blocks). Norms are over channels and positions of one image, taken inside the
    hooks: blocks may add the shortcut into the branch's tensor in place right after.
    """
    sums: dict[str, float] = {}
    count = 0
    handles = []
    current: dict[str, dict[str, torch.Tensor]] = {}

    for label, block in residual_blocks(model):
        if not has_branch_and_shortcut(block):
            continue
        sums[label] = 0.0

        def pre(_m, args, label=label):
            current[label] = {"input": _norms(args[0])}

        def short(_m, _i, out, label=label):
            current[label]["shortcut"] = _norms(out)

        def branch(_m, _i, out, label=label):
            current[label]["branch"] = _norms(out)

        handles += [
            block.register_forward_pre_hook(pre),
            block.shortcut.register_forward_hook(short),
            block.drop_path.register_forward_hook(branch),
        ]
    try:
        model.eval()
        for x, _ in batches:
            current.clear()
            model(x)
            for label, rec in current.items():
                s = rec.get("shortcut", rec["input"])
                sums[label] += float((rec["branch"] / s.clamp_min(1e-12)).sum())
            count += len(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy (fraction) of `model` in eval mode over (images, labels) batches."""
    model.eval()
    hits, n = 0, 0
    for x, y in batches:
        hits += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return hits / n


def lesion_accuracies(model: nn.Module, batches) -> tuple[float, dict[str, float]]:
    """(intact accuracy, {block: accuracy with that block lesioned}) on a list of batches."""
    base = accuracy(model, batches)
    per_block = {}
    for label, block in residual_blocks(model):
        if has_branch_and_shortcut(block):
            with lesioned(block):
                per_block[label] = accuracy(model, batches)
    if not per_block:
        raise StudyError(f"{getattr(model, 'name', 'the model')} has no residual block to lesion")
    return base, per_block


def lesion(
    checkpoint: str | Path,
    data_dir: str | Path = "data/cifar10-jpeg",
    num_test: int = 1000,
    batch_size: int = 250,
    out_dir: str | Path | None = None,
) -> dict:
    """Test accuracy with each residual block removed, and branch / shortcut ratios, for a trained run.

    `num_test` images of the CIFAR-10 test split in `data_dir` (a fixed random subset; 0 = all).
    """
    from .inputs import load_checkpoint_model, load_cifar_test

    m = load_checkpoint_model(checkpoint)
    data = load_cifar_test(data_dir, num_test)
    batches = [
        (m.normalise(data.test_x[i : i + batch_size]), data.test_y[i : i + batch_size])
        for i in range(0, data.num_test, batch_size)
    ]
    base, per_block = lesion_accuracies(m.model, batches)
    ratios = branch_shortcut_ratios(m.model, batches)
    result = {
        "model": m.label,
        "family": m.family,
        "checkpoint": m.source,
        "num_test": data.num_test,
        "accuracy": base,
        "blocks": {
            label: {"accuracy": acc, "drop": base - acc, "branch_shortcut_ratio": ratios[label]}
            for label, acc in per_block.items()
        },
    }
    drops = sorted(b["drop"] for b in result["blocks"].values())
    result["median_drop"] = drops[len(drops) // 2]
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "lesion", result, plot(result))
    return result


def plot(result: dict):
    labels = list(result["blocks"])
    stages = sorted({lab.split(".")[0] for lab in labels})
    stage_colour = dict(zip(stages, shades(result["family"], len(stages))))  # lightest first
    colours = [stage_colour[lab.split(".")[0]] for lab in labels]
    fig, (ax1, ax2) = pyplot().subplots(2, 1, figsize=(max(6.4, 0.22 * len(labels) + 2), 6.4), sharex=True)
    xs = range(len(labels))
    ax1.bar(xs, [100 * result["blocks"][k]["accuracy"] for k in labels], color=colours)
    ax1.axhline(
        100 * result["accuracy"],
        color="black",
        ls="--",
        lw=1,
        label=f"intact: {100 * result['accuracy']:.1f}%",
    )
    ax1.set_ylabel("test accuracy with the block removed (%)")
    ax1.set_title(
        f"{result['model']}: remove one residual block at a time ({result['num_test']} test images)",
        fontsize=10,
    )
    ax1.legend(fontsize=8)
    ax2.bar(xs, [result["blocks"][k]["branch_shortcut_ratio"] for k in labels], color=colours)
    ax2.set_ylabel("||residual branch|| / ||shortcut|| (ratio)")
    ax2.set_title("Residual branch magnitude relative to the shortcut, per block", fontsize=10)
    ax2.set_xticks(list(xs), labels, rotation=90, fontsize=7)
    ax2.set_xlabel("block (stage.index); darker = later stage")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = [["intact", f"{100 * result['accuracy']:.2f}", "-", "-"]]
    for label, b in result["blocks"].items():
        rows.append(
            [
                label,
                f"{100 * b['accuracy']:.2f}",
                f"{100 * b['drop']:+.2f}",
                f"{b['branch_shortcut_ratio']:.3f}",
            ]
        )
    return ["block removed", "accuracy %", "drop (points)", "branch/shortcut"], rows
