"""Grad-CAM (Selvaraju et al. 2017): where in the image a net's decision comes from.

For a layer with activations A (C x h x w) and a class score y, the map is
ReLU(sum_c alpha_c A_c) with alpha_c = mean over positions of dy / dA_c. It lives at the
layer's resolution; it is upsampled (bilinear) to draw it over the image and to rank pixels.

Whether a map points at what the net uses is measured without boxes by the causal metrics of
Petsiuk et al. 2018 (RISE, arXiv:1806.07421, Sec. 4.1): deletion removes the pixels the map
ranks highest first and records the softmax probability of the explained class (a good map
makes it fall fast: low area under the curve); insertion starts from a blurred image and puts the
highest-ranked pixels back first (a good map makes it rise fast: high area). A random map at the
layer's resolution, upsampled the same way, gives each model its own floor: different nets are
compared by their gain over it, which also discounts how confident each net is overall.
"""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import StudyError, colours_for, pyplot, write_outputs
from .inputs import load_cifar_test, load_images, load_models, sample_test_images


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: nn.Module, target: torch.Tensor | int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps (N, h, w) at the layer's resolution, target classes (N,), softmax probabilities (N,)).

    `target` None explains each image's predicted class. The model is used as it is (call
    `.eval()` first for a trained net).
    """
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if "a" not in seen:
        raise StudyError("the chosen layer was not run by the model's forward pass")
    if target is None:
        target = logits.argmax(1)
    elif isinstance(target, int):
        target = torch.full((len(x),), target, dtype=torch.long)
    # Each image's score depends on that image only (BN in eval mode), so one backward of the
    # sum gives every image's gradient.
    score = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, seen["a"])
    acts = seen["a"].detach()
    alpha = grad.mean((2, 3), keepdim=True)
    cams = F.relu((alpha * acts).sum(1))
    probs = logits.detach().softmax(1).gather(1, target[:, None])[:, 0]
    return cams, target, probs


def mass_share(cams: torch.Tensor, cols: slice, rows: slice = slice(None)) -> torch.Tensor:
    """Share of each map's mass in the given rows and columns (NaN for an all-zero map)."""
    total = cams.sum((1, 2))
    return cams[:, rows, cols].sum((1, 2)) / total


def centre_share(cams: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass in the central box of half the height and width (a uniform map: 1/4).

    CIFAR objects are mostly centred, so a net that looks at the object scores above 1/4.
    """
    h, w = cams.shape[-2:]
    return mass_share(cams, slice(w // 4, w - w // 4), slice(h // 4, h - h // 4))


# --- Deletion and insertion (Petsiuk et al. 2018, arXiv:1806.07421, Sec. 4.1) -----------------

# Deletion replaces pixels by 0 in normalised space, i.e. the dataset's mean colour (Petsiuk et
# al. use a constant for deletion): a flat patch carries no class evidence and is the value BN
# statistics are centred on. Insertion starts from a blurred copy (as they do) rather than from
# that constant: the start keeps the image's colours and layout but not its detail, so the curve
# measures how fast the ranked pixels restore the evidence, not how fast any pixels do.
# Their blur (code of the paper) is a sigma-5 Gaussian cut to an 11 x 11 window, at 224 x 224; at
# CIFAR's 32 x 32 the same relative blur (sigma 0.7 px) leaves most images recognisable, so the
# default is stronger. On 300 random test
# images, CIFAR ResNet-20 / -56 after 5 epochs keep their prediction on 61% of the images
# blurred with sigma 0.7, 23-25% with sigma 2 and 16% with sigma 4; the mean probability of the
# explained class falls from 0.60-0.67 to 0.19-0.20 at sigma 2 (0.09-0.13 on the mean colour).
BLUR_SIGMA = 2.0
STEPS = 16
METRIC_IMAGES = 200
BATCH_SIZE = 256  # perturbed 32 x 32 images per forward pass (fewer for larger images)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, reflected at the borders (no dark frame)."""
    if sigma <= 0:
        return x.clone()
    h, w = x.shape[-2:]
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def salience_order(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, H*W) pixel indices of each (N, H, W) map, most salient first.

    Ties (the zeros ReLU leaves in a Grad-CAM map, or a flat map) go in random order: a fixed
    order (e.g. top-left first) would be a ranking of its own.
    """
    flat = maps.flatten(1)
    shuffle = torch.rand(flat.shape, generator=generator).argsort(1).to(flat.device)
    order = flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    return shuffle.gather(1, order)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    start: torch.Tensor,
    finish: torch.Tensor,
    order: torch.Tensor,
    target: torch.Tensor,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
) -> torch.Tensor:
    """(N, steps + 1) softmax probabilities of `target` along the path from `start` to `finish`.

    At step k the first round-down(k / steps * H * W) pixels of each image's `order` (all
    channels) come from `finish`, the rest from `start`: step 0 is `start`, step `steps` is
    `finish`. Deletion is start = image, finish = baseline; insertion is start = blurred image,
    finish = image. The (image, step) pairs are cut into forward passes of `batch_size` images;
    with the model in eval mode each image's output depends on that image only.
    """
    n, _, h, w = start.shape
    pixels = h * w
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(n, pixels))
    counts = torch.arange(steps + 1, device=order.device) * pixels // steps
    image, step = (
        t.flatten() for t in torch.meshgrid(torch.arange(n), torch.arange(steps + 1), indexing="ij")
    )
    probs = torch.empty(len(image), dtype=torch.float64)
    for lo in range(0, len(image), batch_size):
        i, k = image[lo : lo + batch_size], step[lo : lo + batch_size]
        mask = (rank[i] < counts[k, None]).view(-1, 1, h, w)
        logits = model(torch.where(mask, finish[i], start[i]))
        probs[lo : lo + len(i)] = (
            logits.softmax(1).gather(1, target[i, None].to(logits.device))[:, 0].double()
        )
    return probs.view(n, steps + 1)


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under each curve sampled at fractions 0, 1/steps, ..., 1 (trapezoid rule)."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[-1] - 1), dim=-1)


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    steps: int = STEPS,
    blur_sigma: float = BLUR_SIGMA,
    batch_size: int = BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """{"deletion", "insertion"}: (N, steps + 1) probability curves of `target` for maps (N, h, w).

    The maps are upsampled (bilinear) to the input size and rank its pixels (ties at random,
    from `generator`). Deletion sets the ranked pixels to 0 (the normalised mean); insertion
    copies them into `gaussian_blur(x, blur_sigma)`. `x` is the normalised model input.
    """
    if maps.shape[-2:] != x.shape[-2:]:
        maps = F.interpolate(maps[:, None].float(), size=x.shape[-2:], mode="bilinear")[:, 0]
    order = salience_order(maps, generator)
    return {
        "deletion": perturbation_curves(model, x, torch.zeros_like(x), order, target, steps, batch_size),
        "insertion": perturbation_curves(
            model, gaussian_blur(x, blur_sigma), x, order, target, steps, batch_size
        ),
    }


def random_maps(n: int, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, h, w) uniform random maps: drawn at the Grad-CAM map's resolution and upsampled as it
    is, they delete blobs of the same size as a Grad-CAM map does, so the two differ only in where
    the blobs are (i.i.d. random pixels would be a different, scattered perturbation)."""
    return torch.rand(n, *size, generator=generator)


def _summary(values: torch.Tensor) -> dict:
    """Mean, standard error of the mean and per-image values of one AUC."""
    n = len(values)
    se = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(values.mean()), "se": se, "per_image": values.tolist()}


def faithfulness(
    model: nn.Module,
    x: torch.Tensor,
    layer: nn.Module,
    steps: int = STEPS,
    blur_sigma: float = BLUR_SIGMA,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """Deletion and insertion AUCs of the Grad-CAM maps of `layer` on `x` (the predicted class),
    and of random maps at the same resolution (seeded by `seed`): per image, mean and s.e.,
    the mean curves, and the gains over random (random deletion AUC - deletion AUC and insertion
    AUC - random insertion AUC, paired per image; > 0: the map beats chance)."""
    # `batch_size` counts 32 x 32 images: larger ones go in fewer per pass, the same pixels in all.
    batch_size = max(1, batch_size * 32 * 32 // x[0, 0].numel())
    cams, target = [], []
    for chunk in x.split(max(1, batch_size // 8)):  # a backward pass keeps every activation: fewer
        c, t, _ = grad_cam(model, chunk, layer)
        cams.append(c)
        target.append(t)
    cams, target = torch.cat(cams), torch.cat(target)
    gen = torch.Generator().manual_seed(seed)
    noise = random_maps(len(x), tuple(cams.shape[-2:]), gen)
    curves = {
        "gradcam": deletion_insertion(model, x, cams, target, steps, blur_sigma, batch_size, gen),
        "random": deletion_insertion(model, x, noise, target, steps, blur_sigma, batch_size, gen),
    }
    out: dict = {"predicted": target.tolist()}
    aucs = {m: {k: auc(v) for k, v in c.items()} for m, c in curves.items()}
    for m, c in curves.items():
        part = out if m == "gradcam" else out.setdefault("random", {})
        for k, v in c.items():
            part[k] = {**_summary(aucs[m][k]), "curve": v.mean(0).tolist()}
    out["deletion_gain"] = _summary(aucs["random"]["deletion"] - aucs["gradcam"]["deletion"])
    out["insertion_gain"] = _summary(aucs["gradcam"]["insertion"] - aucs["random"]["insertion"])
    return out


def metric_test_images(
    data_dir: str | Path, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """n CIFAR test images drawn at random (seeded) from the whole split, with labels and indices.

    The test split is stored class after class, so its first n images would be one or two classes.
    """
    data = load_cifar_test(data_dir)
    n = min(n, len(data.test_y))
    idx = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(seed))[:n]
    return data.test_x[idx], data.test_y[idx], idx.tolist()


def gradcam(
    models: tuple[str, ...] | list[str] = (),
    checkpoints: tuple[str, ...] | list[str] = (),
    images: tuple[str, ...] | list[str] = (),
    data_dir: str | Path | None = None,
    num_images: int = 8,
    stage: int = -1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    metric_images: int = METRIC_IMAGES,
    steps: int = STEPS,
    blur_sigma: float = BLUR_SIGMA,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Grad-CAM maps of the output of `stage` (default the last) for each model, on the same images,
    and their deletion / insertion AUCs against random maps (see the module docstring).

    Models are registered names (weights at initialisation, BN calibrated on the images) and/or
    checkpoints (`model.safetensors` / `last.ckpt` of a training run). Images are `images` (any
    files, resized and centre-cropped to the model's input size) or `num_images` images sampled
    from the CIFAR test split in `data_dir`, one class after another. The metric runs on
    `metric_images` other test images drawn at random with `seed` (the same for every model), or
    on the first `metric_images` files; 0 skips it. Curves have `steps` steps of 1/steps of the
    pixels each; insertion starts from a Gaussian blur of `blur_sigma` pixels. `log` receives a
    line as each model's metric starts and ends (the metric is most of the study's time).
    """
    if steps < 1:
        raise StudyError(f"steps must be a positive integer, got {steps}")
    if not 0 <= blur_sigma < math.inf:
        raise StudyError(f"the blur sigma must be a non-negative number of pixels, got {blur_sigma}")
    loaded = load_models(models, checkpoints)
    if not loaded:
        raise StudyError("give at least one model or checkpoint")
    size = loaded[0].input_size
    if any(m.input_size != size for m in loaded):
        raise StudyError("all models must take the same input size to share the images")
    metric_pixels = metric_labels = None
    if images:
        pixels, labels, classes = load_images(images, size), None, None
        names = [Path(p).name for p in images]
        if metric_images:
            metric_pixels, metric_names = pixels[:metric_images], names[:metric_images]
    elif data_dir is not None:
        pixels, labels, classes = sample_test_images(data_dir, num_images, seed)
        names = [f"test image {i}" for i in range(len(pixels))]
        if metric_images:
            metric_pixels, metric_labels, metric_names = metric_test_images(data_dir, metric_images, seed)
    else:
        raise StudyError("give --image files or a CIFAR --data-dir to sample test images from")
    result: dict = {"images": names, "stage": stage, "models": {}}
    if labels is not None:
        result["labels"] = [classes[i] for i in labels.tolist()]
    if metric_pixels is not None:
        result["metric"] = {
            "images": metric_names,  # test-set indices, or file names
            "steps": steps,
            "deletion_baseline": "0 in normalised space (the mean colour)",
            "insertion_start": "Gaussian blur",
            "blur_sigma": blur_sigma,
            "random_maps": "uniform at the Grad-CAM map's resolution, upsampled bilinearly",
            "seed": seed,
        }
    overlays = {}
    for m in loaded:
        n_stages = len(m.model.stages)
        if not -n_stages <= stage < n_stages:
            raise StudyError(f"{m.label} has stages 0..{n_stages - 1}; got --stage {stage}")
        if classes and not m.classes:  # an untrained net: name its outputs after the data's classes
            m.classes = classes
        x = m.normalise(pixels)
        xm = None if metric_pixels is None else m.normalise(metric_pixels)
        # An untrained net takes its BN statistics from every image the study shows it.
        m.prepare(x if xm is None or m.trained else torch.cat([x, xm]))
        cams, target, probs = grad_cam(m.model, x, m.model.stages[stage])
        w = cams.shape[-1]
        entry = {
            "family": m.family,
            "model": getattr(m.model, "name", None) or m.label,
            "source": m.source,
            "predicted": [m.class_name(int(t)) for t in target],
            "probability": probs.tolist(),
            "map_size": list(cams.shape[-2:]),
            # Where the evidence sits: share of the map in the left half (at the map's resolution).
            "left_half_share": mass_share(cams, slice(0, w // 2)).tolist() if w % 2 == 0 else None,
            "centre_share": centre_share(cams).tolist(),
            "maps": cams.tolist(),
        }
        if labels is not None:
            entry["accuracy"] = float((target == labels).double().mean())
        if xm is not None:
            start = time.perf_counter()
            if log is not None:  # two maps (Grad-CAM, random) x two curves x (steps + 1) images each
                log(
                    f"{m.label}: deletion and insertion on {len(xm)} images, {4 * (steps + 1) * len(xm)} forward images"
                )
            metric = faithfulness(m.model, xm, m.model.stages[stage], steps, blur_sigma, seed)
            if log is not None:
                log(f"{m.label}: done in {time.perf_counter() - start:.0f} s")
            if metric_labels is not None:
                metric["accuracy"] = float(
                    (torch.tensor(metric["predicted"]) == metric_labels).double().mean()
                )
            metric["predicted"] = [m.class_name(t) for t in metric["predicted"]]
            entry["metric"] = metric
        result["models"][m.label] = entry
        overlays[m.label] = F.interpolate(cams[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0]
    if metric_pixels is not None and len(loaded) > 1:
        result["metric"]["versus_first"] = versus_first(result["models"])
        runs = by_model(result["models"])
        if any(len(g["runs"]) > 1 for g in runs.values()):
            result["metric"]["by_model"] = runs
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "gradcam", result, plot(result, pixels, overlays))
    return result


def versus_first(entries: dict) -> dict:
    """Each later model minus the first, paired over the metric images: mean and s.e. of the
    per-image differences of the AUCs and of the gains over random (the images are shared, so
    pairing removes the spread between easy and hard images)."""
    first, *rest = entries
    out = {}
    for label in rest:
        a, b = entries[first]["metric"], entries[label]["metric"]
        diff = {}
        for key in ("deletion", "insertion", "deletion_gain", "insertion_gain"):
            d = torch.tensor(b[key]["per_image"]) - torch.tensor(a[key]["per_image"])
            diff[key] = {k: v for k, v in _summary(d).items() if k != "per_image"}
        out[label] = {"reference": first, **diff}
    return out


def by_model(entries: dict) -> dict:
    """The runs of each model (e.g. one per training seed) together: mean, std and per-run values
    of their mean AUCs and gains. The spread between runs of one model is the noise an
    architecture comparison has to beat; the s.e. over images of one run does not contain it."""
    groups: dict[str, list[str]] = {}
    for label, e in entries.items():
        groups.setdefault(e["model"], []).append(label)
    out = {}
    for name, labels in groups.items():
        row: dict = {"runs": labels}
        for key in ("deletion", "insertion", "deletion_gain", "insertion_gain"):
            means = torch.tensor([entries[label]["metric"][key]["mean"] for label in labels])
            std = float(means.std()) if len(means) > 1 else float("nan")
            row[key] = {"mean": float(means.mean()), "std": std, "per_run": means.tolist()}
        out[name] = row
    return out


def plot(result: dict, pixels: torch.Tensor, overlays: dict[str, torch.Tensor]):
    labels = list(result["models"])
    colours = colours_for(labels, [result["models"][k]["family"] for k in labels])
    n = len(pixels)
    curves = "metric" in result
    rows = len(labels) + 1 + curves
    # Each image takes two grid columns, so the curve row splits into two halves for any n.
    width = max(1.6 * n + 1, 9.0 if curves else 0.0)  # two curve panels need room for their labels
    fig = pyplot().figure(figsize=(width, 1.7 * (len(labels) + 1) + 3.2 * curves))
    grid = fig.add_gridspec(rows, 2 * n, height_ratios=[1] * (len(labels) + 1) + [1.9] * curves)
    axes = [[fig.add_subplot(grid[i, 2 * j : 2 * j + 2]) for j in range(n)] for i in range(len(labels) + 1)]
    images = pixels.permute(0, 2, 3, 1).numpy()
    for j in range(n):
        axes[0][j].imshow(images[j])
        axes[0][j].set_title(result.get("labels", result["images"])[j], fontsize=7)
    axes[0][0].set_ylabel("image", fontsize=8)
    for i, label in enumerate(labels, start=1):
        e = result["models"][label]
        for j in range(n):
            cam = overlays[label][j]
            cam = cam / cam.max() if cam.max() > 0 else cam
            axes[i][j].imshow(images[j])
            im = axes[i][j].imshow(cam.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[i][j].set_title(f"{e['predicted'][j]} ({e['probability'][j]:.2f})", fontsize=7)
        axes[i][0].set_ylabel(_row_label(label), fontsize=6, color=colours[label])
    for ax in (a for row in axes for a in row):
        ax.set_xticks([])
        ax.set_yticks([])
    if curves:
        pair = [fig.add_subplot(grid[-1, :n]), fig.add_subplot(grid[-1, n:])]
        _plot_curves(pair, result, colours)
    stage = result["stage"]
    fig.suptitle(
        f"Grad-CAM of {'the last stage' if stage == -1 else f'stage {stage}'} for the predicted class "
        "(row label colour = family; title: prediction, softmax probability)",
        fontsize=9,
    )
    fig.tight_layout()
    if labels:
        fig.colorbar(
            im,
            ax=[a for row in axes for a in row],
            shrink=0.5,
            label="Grad-CAM (relative to the image's maximum)",
        )
    return fig


def _row_label(label: str, width: int = 34) -> str:
    """A row's label in lines short enough to stay beside its own row: "model (run)" splits
    into the model and the run, and each part wraps at `width` characters."""
    parts = label.replace(" (", "\n(").split("\n")
    return "\n".join(textwrap.fill(p, width) for p in parts)


def _plot_curves(pair, result: dict, colours: dict) -> None:
    """Mean deletion and insertion curves per model (solid) and of its random maps (dashed)."""
    metric = result["metric"]
    fraction = [k / metric["steps"] for k in range(metric["steps"] + 1)]
    for ax, kind, better in zip(pair, ("deletion", "insertion"), ("lower", "higher")):
        for label, e in result["models"].items():
            got, rnd = e["metric"][kind], e["metric"]["random"][kind]
            ax.plot(fraction, got["curve"], color=colours[label], label=f"{label}: AUC {got['mean']:.3f}")
            ax.plot(
                fraction,
                rnd["curve"],
                color=colours[label],
                ls="--",
                lw=1,
                label=f"random: {rnd['mean']:.3f}",
            )
        verb = "set to the mean colour" if kind == "deletion" else "put back into the blurred image"
        ax.set_xlabel(f"fraction of pixels {verb}, most salient first", fontsize=7)
        ax.set_ylabel("probability of the explained class", fontsize=7)
        ax.set_title(f"{kind}: {better} AUC = better map ({len(metric['images'])} images)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)


def _mean(values: list[float] | None) -> float | None:
    finite = [v for v in values or [] if v == v]  # all-zero maps give NaN
    return sum(finite) / len(finite) if finite else None


def _auc_cell(m: dict, kind: str) -> str:
    """'AUC+-s.e. (random AUC)' of one model's deletion or insertion."""
    got, rnd = m[kind], m["random"][kind]
    return f"{got['mean']:.3f}+-{got['se']:.3f} ({rnd['mean']:.3f})"


def _diff_cell(d: dict, kind: str) -> str:
    auc_d, gain_d = d[kind], d[f"{kind}_gain"]
    return f"{auc_d['mean']:+.3f}+-{auc_d['se']:.3f} ({gain_d['mean']:+.3f}+-{gain_d['se']:.3f})"


def _runs_cell(g: dict, kind: str) -> str:
    def pm(d: dict) -> str:
        return f"{d['mean']:.3f}" + (f"+-{d['std']:.3f}" if d["std"] == d["std"] else "")  # NaN: one run

    return f"{pm(g[kind])} ({pm(g[f'{kind}_gain'])})"


def _accuracy_cell(e: dict) -> str:
    """Accuracy on the drawn images, and in brackets on the metric's images (labelled ones only)."""
    cell = f"{100 * e['accuracy']:.0f}" if "accuracy" in e else "-"
    if "accuracy" in e.get("metric", {}):
        cell += f" ({100 * e['metric']['accuracy']:.0f})"
    return cell


def _side_row(first: str, second: str, deletion: str, insertion: str) -> list[str]:
    """A row of a block below the models: the map columns left empty."""
    return [first, second, "", "", "", "", "", deletion, insertion]


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    metric = "metric" in result
    rows = []
    for label, e in result["models"].items():
        left, centre = _mean(e["left_half_share"]), _mean(e["centre_share"])
        rows.append(
            [
                label,
                e["source"] if e["source"] == "init" else Path(e["source"]).parent.name,
                "x".join(map(str, e["map_size"])),
                _accuracy_cell(e),
                f"{sum(e['probability']) / len(e['probability']):.2f}",
                f"{100 * left:.0f}" if left is not None else "-",
                f"{100 * centre:.0f}" if centre is not None else "-",
            ]
            + ([_auc_cell(e["metric"], "deletion"), _auc_cell(e["metric"], "insertion")] if metric else [])
        )
    header = [
        "model",
        "weights (run)",
        "map",
        "accuracy %" + (" (metric images)" if metric else ""),
        "mean prob.",
        "left-half share %",
        "centre share %",
    ]
    if metric:
        n = len(result["metric"]["images"])
        header += [
            f"deletion AUC, lower better (random), {n} images",
            "insertion AUC, higher better (random)",
        ]
    versus = result.get("metric", {}).get("versus_first") or {}
    if versus:  # a second block under its own header row: paired differences from the first model
        first = next(iter(versus.values()))["reference"]
        rows.append([""] * len(header))
        rows.append(
            _side_row(f"minus {first}", "", "deletion AUC (gain over random)", "insertion AUC (gain)")
        )
        for label, d in versus.items():
            rows.append(_side_row(label, "", _diff_cell(d, "deletion"), _diff_cell(d, "insertion")))
    groups = result.get("metric", {}).get("by_model") or {}
    if groups:  # a third block: the runs of each model (training seeds) together
        rows.append([""] * len(header))
        rows.append(_side_row("runs of one model", "runs", "mean+-std over runs (gain)", "mean+-std (gain)"))
        for name, g in groups.items():
            rows.append(
                _side_row(name, str(len(g["runs"])), _runs_cell(g, "deletion"), _runs_cell(g, "insertion"))
            )
    return header, rows
