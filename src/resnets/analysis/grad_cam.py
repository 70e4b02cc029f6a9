"""Grad-CAM (Selvaraju et al. 2017): where in the image a net's decision comes from.

For a layer with activations A (C x h x w) and a class score y, the map is
ReLU(sum_c alpha_c A_c) with alpha_c = mean over positions of dy / dA_c. It lives at the
layer's resolution; it is upsampled (bilinear) only to draw it over the image.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import StudyError, colours_for, pyplot, write_outputs
from .inputs import load_images, load_models, sample_test_images


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


def gradcam(
    models: tuple[str, ...] | list[str] = (),
    checkpoints: tuple[str, ...] | list[str] = (),
    images: tuple[str, ...] | list[str] = (),
    data_dir: str | Path | None = None,
    num_images: int = 8,
    stage: int = -1,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict:
    """Grad-CAM maps of the output of `stage` (default the last) for each model, on the same images.

    Models are registered names (weights at initialisation, BN calibrated on the images) and/or
    checkpoints (`model.safetensors` / `last.ckpt` of a training run). Images are `images` (any
    files, resized and centre-cropped to the model's input size) or `num_images` images sampled
    from the CIFAR test split in `data_dir`, one class after another.
    """
    loaded = load_models(models, checkpoints)
    if not loaded:
        raise StudyError("give at least one model or checkpoint")
    size = loaded[0].input_size
    if any(m.input_size != size for m in loaded):
        raise StudyError("all models must take the same input size to share the images")
    if images:
        pixels, labels, classes = load_images(images, size), None, None
        names = [Path(p).name for p in images]
    elif data_dir is not None:
        pixels, labels, classes = sample_test_images(data_dir, num_images, seed)
        names = [f"test image {i}" for i in range(len(pixels))]
    else:
        raise StudyError("give --image files or a CIFAR --data-dir to sample test images from")
    result: dict = {"images": names, "stage": stage, "models": {}}
    if labels is not None:
        result["labels"] = [classes[i] for i in labels.tolist()]
    overlays = {}
    for m in loaded:
        n_stages = len(m.model.stages)
        if not -n_stages <= stage < n_stages:
            raise StudyError(f"{m.label} has stages 0..{n_stages - 1}; got --stage {stage}")
        if classes and not m.classes:  # an untrained net: name its outputs after the data's classes
            m.classes = classes
        x = m.normalise(pixels)
        m.prepare(x)
        cams, target, probs = grad_cam(m.model, x, m.model.stages[stage])
        w = cams.shape[-1]
        entry = {
            "family": m.family,
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
        result["models"][m.label] = entry
        overlays[m.label] = F.interpolate(cams[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0]
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "gradcam", result, plot(result, pixels, overlays))
    return result


def plot(result: dict, pixels: torch.Tensor, overlays: dict[str, torch.Tensor]):
    labels = list(result["models"])
    colours = colours_for(labels, [result["models"][k]["family"] for k in labels])
    n = len(pixels)
    fig, axes = pyplot().subplots(
        len(labels) + 1, n, figsize=(1.6 * n + 1, 1.7 * (len(labels) + 1)), squeeze=False
    )
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
        axes[i][0].set_ylabel(label, fontsize=8, color=colours[label])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    stage = result["stage"]
    fig.suptitle(
        f"Grad-CAM of {'the last stage' if stage == -1 else f'stage {stage}'} for the predicted class "
        "(row label colour = family; title: prediction, softmax probability)",
        fontsize=9,
    )
    fig.tight_layout()
    if labels:
        fig.colorbar(im, ax=axes, shrink=0.5, label="Grad-CAM (relative to the image's maximum)")
    return fig


def _mean(values: list[float] | None) -> float | None:
    finite = [v for v in values or [] if v == v]  # all-zero maps give NaN
    return sum(finite) / len(finite) if finite else None


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for label, e in result["models"].items():
        left, centre = _mean(e["left_half_share"]), _mean(e["centre_share"])
        rows.append(
            [
                label,
                e["source"] if e["source"] == "init" else Path(e["source"]).parent.name,
                "x".join(map(str, e["map_size"])),
                f"{100 * e['accuracy']:.0f}" if "accuracy" in e else "-",
                f"{sum(e['probability']) / len(e['probability']):.2f}",
                f"{100 * left:.0f}" if left is not None else "-",
                f"{100 * centre:.0f}" if centre is not None else "-",
            ]
        )
    header = [
        "model",
        "weights (run)",
        "map",
        "accuracy %",
        "mean prob.",
        "left-half share %",
        "centre share %",
    ]
    return header, rows
