"""Lesion study (Veit et al. 2016; the Wide ResNet paper's "diminishing feature reuse").

Remove one residual block at a time, keeping only its shortcut, and measure test accuracy; and
measure per block how large the residual branch is next to the shortcut. If most blocks of a
deep thin net contribute little, most lesions cost little accuracy and most ratios are small.
Then (Veit et al. 2016, Fig. 5) remove k random identity blocks at once, k = 1, 2, 3, ...: if
the net behaves like an ensemble of many paths, accuracy falls smoothly with k, not abruptly.
Several trained nets (`lesion_compare`) are set side by side: the claim is about depth, so what
decides it is whether a deeper net of the same family, trained alike, loses less per block.

Every residual block of the library applies its `drop_path` module to the residual branch right
before the add, so a forward hook that turns that module's output into zeros removes exactly the
branch and nothing else (any BN-ReLU after the add, as in v1 and iResNet end blocks, stays).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import random
import statistics
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


def has_identity_shortcut(block: nn.Module) -> bool:
    """A residual block whose shortcut is the identity: it keeps the shape (no stride, no new
    channels) and its shortcut is `nn.Identity` (layers.make_shortcut builds that wherever the
    shape is unchanged and the kind is not "C", which projects everywhere)."""
    return has_branch_and_shortcut(block) and isinstance(block.shortcut, nn.Identity)


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


def identity_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """("stage.index", block) for every block with an identity shortcut, in forward order."""
    return [(label, block) for label, block in residual_blocks(model) if has_identity_shortcut(block)]


def _subsets(n: int, k: int, samples: int, rng: random.Random) -> list[tuple[int, ...]]:
    """`samples` distinct k-subsets of range(n) (each sorted), or all C(n, k) of them if fewer."""
    if math.comb(n, k) <= samples:
        return list(itertools.combinations(range(n), k))
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < samples:  # terminates: there are more than `samples` distinct subsets
        subset = tuple(sorted(rng.sample(range(n), k)))
        if subset not in seen:
            seen.add(subset)
            out.append(subset)
    return out


def _check_counts(max_removed: int, samples: int) -> None:
    if max_removed < 0:
        raise StudyError(f"max_removed must be >= 0, got {max_removed}")
    if samples < 1:
        raise StudyError(f"samples must be a positive integer, got {samples}")


def lesion_k(model: nn.Module, batches, max_removed: int = 3, samples: int = 20, seed: int = 0) -> dict:
    """Accuracy with k identity blocks removed at once, k = 1..max_removed (Veit et al. 2016, Fig. 5).

    Only blocks with an identity shortcut are drawn from (`has_identity_shortcut`): lesioning a
    downsampling block leaves only its projection or zero-padded subsample of the input, which
    is not the "delete a layer, keep the identity path" lesion of the paper (and option "C" nets,
    whose every shortcut is a projection, have no such block). Blocks whose tail holds more than
    the add are still drawn: an iResNet end block keeps its BN-ReLU after the add, and with
    `official_quirks` the block after a start block passes ReLU(x) on.

    For each k, `samples` distinct random subsets of k blocks (no block twice in a subset) are
    drawn with random.Random(seed), one generator for all k; where C(n, k) <= samples, all
    subsets are used (itertools.combinations order). k stops at the number of identity blocks.
    Returns {str(k): {"subsets": [[label, ...], ...], "accuracies": [...], "mean", "std",
    "min", "max", "count"}}; accuracies are fractions, std is the population std (ddof 0) over
    the subsets evaluated.
    """
    _check_counts(max_removed, samples)
    blocks = identity_blocks(model)
    if max_removed and not blocks:
        raise StudyError(f"{getattr(model, 'name', 'the model')} has no block with an identity shortcut")
    rng = random.Random(seed)
    out = {}
    for k in range(1, min(max_removed, len(blocks)) + 1):
        subsets, accs = [], []
        for subset in _subsets(len(blocks), k, samples, rng):
            with contextlib.ExitStack() as stack:
                for i in subset:
                    stack.enter_context(lesioned(blocks[i][1]))
                accs.append(accuracy(model, batches))
            subsets.append([blocks[i][0] for i in subset])
        out[str(k)] = {
            "subsets": subsets,
            "accuracies": accs,
            "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs),
            "min": min(accs),
            "max": max(accs),
            "count": len(accs),
        }
    return out


def lesion(
    checkpoint: str | Path,
    data_dir: str | Path = "data/cifar10-jpeg",
    num_test: int = 1000,
    batch_size: int = 250,
    out_dir: str | Path | None = None,
    max_removed: int = 3,
    samples: int = 20,
    seed: int = 0,
    test_data=None,
) -> dict:
    """Test accuracy with each residual block removed, and branch / shortcut ratios, for a trained run.

    `num_test` images of the CIFAR-10 test split in `data_dir` (a fixed random subset; 0 = all).
    Then, as `lesion_k`, accuracy with k = 1..`max_removed` random identity blocks removed at
    once, `samples` subsets per k drawn with `seed` (max_removed=0 skips this part; a net with
    no identity block gets an empty "removed"). `test_data`: that subset already loaded
    (`inputs.load_cifar_test`), so that several runs share one load.
    """
    from .inputs import load_checkpoint_model, load_cifar_test

    m = load_checkpoint_model(checkpoint)
    data = load_cifar_test(data_dir, num_test) if test_data is None else test_data
    batches = [
        (m.normalise(data.test_x[i : i + batch_size]), data.test_y[i : i + batch_size])
        for i in range(0, data.num_test, batch_size)
    ]
    _check_counts(max_removed, samples)
    base, per_block = lesion_accuracies(m.model, batches)
    n_identity = len(identity_blocks(m.model))
    removed = lesion_k(m.model, batches, max_removed, samples, seed) if n_identity else {}
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
    result.update(identity_blocks=n_identity, samples=samples, seed=seed, removed=removed)
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "lesion", result, plot(result))
    return result


def lesion_compare(
    checkpoints: list[str | Path],
    data_dir: str | Path = "data/cifar10-jpeg",
    num_test: int = 1000,
    out_dir: str | Path | None = None,
    max_removed: int = 3,
    samples: int = 20,
    seed: int = 0,
) -> dict:
    """`lesion` for each of several trained runs on the same test images, and one figure comparing
    them: the sorted single-block drops against the fraction of blocks (Veit et al. 2016, Fig. 3
    asks how many blocks matter) and the accuracy against the fraction of identity blocks removed
    at once (their Fig. 5)."""
    from .inputs import load_cifar_test

    if len(checkpoints) < 2:
        raise StudyError("comparing lesions needs at least two checkpoints")
    data = load_cifar_test(data_dir, num_test)
    nets = [
        lesion(c, max_removed=max_removed, samples=samples, seed=seed, test_data=data) for c in checkpoints
    ]
    result = {"nets": nets, "num_test": nets[0]["num_test"], "samples": samples, "seed": seed}
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "lesion", result, plot_compare(result))
    return result


def _drop_profile(net: dict) -> tuple[list[float], list[float]]:
    """(fraction of blocks, drop in points), drops sorted from the largest: a quantile curve."""
    drops = sorted((100 * b["drop"] for b in net["blocks"].values()), reverse=True)
    n = len(drops)
    return [(i + 0.5) / n for i in range(n)], drops


def plot_compare(result: dict):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.8, 4.8))
    nets = result["nets"]
    by_family = collections.Counter(net["family"] for net in nets)
    colours = {fam: iter(shades(fam, n)) for fam, n in by_family.items()}
    markers = itertools.cycle("osD^v")
    for net in nets:
        colour, marker = next(colours[net["family"]]), next(markers)
        n_blocks = len(net["blocks"])
        label = f"{net['model']}: {n_blocks} blocks, intact {100 * net['accuracy']:.1f}%"
        xs, drops = _drop_profile(net)
        ax1.plot(xs, drops, marker=marker, ms=4, color=colour, label=label)
        removed = net.get("removed") or {}
        if removed:
            n_id = net["identity_blocks"]
            ks, means, lo, hi = _removed_series(net, removed)
            ax2.errorbar(
                [k / n_id for k in ks],
                means,
                yerr=[lo, hi],
                color=colour,
                marker=marker,
                ms=4,
                capsize=3,
                lw=1,
                label=f"{net['model']}: k = 0..{ks[-1]} of {n_id}",
            )
    ax1.set_xlabel("fraction of residual blocks, sorted by the damage their removal does")
    ax1.set_ylabel("accuracy drop when the block is removed (points)")
    ax1.set_title(f"Remove one block at a time ({result['num_test']} test images)", fontsize=10)
    ax2.set_xlabel("fraction of identity-shortcut blocks removed at once (k / count)")
    ax2.set_ylabel("test accuracy (%); bars: min..max over subsets")
    ax2.set_title(f"Remove k random blocks at once (up to {result['samples']} subsets per k)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(result: dict):
    labels = list(result["blocks"])
    stages = sorted({lab.split(".")[0] for lab in labels})
    stage_colour = dict(zip(stages, shades(result["family"], len(stages))))  # lightest first
    colours = [stage_colour[lab.split(".")[0]] for lab in labels]
    removed = result.get("removed") or {}
    plt = pyplot()
    fig = plt.figure(figsize=(max(6.4, 0.22 * len(labels) + 2), 9.6 if removed else 6.4))
    rows = 3 if removed else 2
    ax1 = fig.add_subplot(rows, 1, 1)
    ax2 = fig.add_subplot(rows, 1, 2, sharex=ax1)
    ax1.tick_params(labelbottom=False)
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
    axes = [ax1, ax2]
    if removed:
        axes.append(_plot_removed(fig.add_subplot(rows, 1, 3), result, removed))
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _removed_series(result: dict, removed: dict) -> tuple[list[int], list[float], list[float], list[float]]:
    """k = 0 (intact), 1, 2, ...; mean accuracy (%) at each k; the distances (points) from the mean
    down to the worst and up to the best subset: an errorbar's x, y and yerr."""
    ks = [0, *(int(k) for k in removed)]
    stats = [removed[str(k)] for k in ks[1:]]
    means = [100 * result["accuracy"], *(100 * r["mean"] for r in stats)]
    lows = [0.0, *(100 * (r["mean"] - r["min"]) for r in stats)]
    highs = [0.0, *(100 * (r["max"] - r["mean"]) for r in stats)]
    return ks, means, lows, highs


def _plot_removed(ax, result: dict, removed: dict):
    """Accuracy against the number of identity blocks removed at once (Veit et al. 2016, Fig. 5)."""
    colour = shades(result["family"], 1)[0]
    ks, means, lows, highs = _removed_series(result, removed)
    stats = [removed[str(k)] for k in ks[1:]]
    for k, r in zip(ks[1:], stats):
        n = len(r["accuracies"])
        jitter = [0.0] if n == 1 else [0.25 * (i / (n - 1) - 0.5) for i in range(n)]
        ax.scatter(
            [k + j for j in jitter],
            [100 * a for a in r["accuracies"]],
            s=12,
            color=colour,
            alpha=0.35,
            lw=0,
            label="one subset" if k == 1 else None,
        )
    ax.errorbar(
        ks,
        means,
        yerr=[lows, highs],
        color="black",
        marker="o",
        ms=4,
        capsize=3,
        lw=1,
        label="mean; bars: min..max over subsets",
    )
    ax.set_xticks(ks, ["0\n(intact)", *(str(k) for k in ks[1:])])
    ax.set_xlabel("identity blocks removed at once (count)")
    ax.set_ylabel("test accuracy (%)")
    counts = sorted({r["count"] for r in stats})
    per_k = str(counts[0]) if len(counts) == 1 else f"{counts[0]}..{counts[-1]}"
    ax.set_title(
        f"Remove k random blocks at once: {per_k} subsets per k (at most {result.get('samples', '?')}),\n"
        f"drawn from the {result.get('identity_blocks', '?')} identity-shortcut blocks only",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return ax


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    if "nets" in result:
        return _compare_table(result)
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
    removed = result.get("removed") or {}
    if removed:  # a second block under its own header row; columns reused: mean +- std, min, max
        rows.append(["", "", "", ""])
        rows.append([f"k of {result['identity_blocks']} identity", "mean +- std %", "min %", "max %"])
        for k, r in removed.items():
            rows.append(
                [
                    f"{k} at once ({r['count']} subsets)",
                    f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}",
                    f"{100 * r['min']:.2f}",
                    f"{100 * r['max']:.2f}",
                ]
            )
    return ["block removed", "accuracy %", "drop (points)", "branch/shortcut"], rows


def _compare_table(result: dict) -> tuple[list[str], list[list[str]]]:
    ks = sorted({int(k) for net in result["nets"] for k in (net.get("removed") or {})})
    header = ["net", "blocks", "intact %", "median drop", "max drop", *(f"{k} removed %" for k in ks)]
    rows = []
    for net in result["nets"]:
        drops = [100 * b["drop"] for b in net["blocks"].values()]
        removed = net.get("removed") or {}
        rows.append(
            [
                net["model"],
                str(len(drops)),
                f"{100 * net['accuracy']:.2f}",
                f"{100 * net['median_drop']:.2f}",
                f"{max(drops):.2f}",
                *(
                    f"{100 * removed[str(k)]['mean']:.1f} +- {100 * removed[str(k)]['std']:.1f}"
                    if str(k) in removed
                    else "-"
                    for k in ks
                ),
            ]
        )
    return header, rows
