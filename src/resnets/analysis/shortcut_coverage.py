"""How much of its input a downsampling shortcut uses.

iResNet argues that the 1x1 stride-2 projection of ResNet ignores 3/4 of the activations and
replaces it by a 3x3/2 max-pool followed by a 1x1 conv. Two measures, on the library's own
shortcut modules (`make_shortcut`, BN at initialisation, eval mode):

- coverage: the share of input positions (and of input elements) with a nonzero gradient, i.e.
  that change the output at all;
- reconstruction: how well a linear least-squares decoder recovers the input from the shortcut
  output (each input pixel from the 3x3 neighbourhood of output cells around it), as the error
  left on held-out inputs relative to their variance (1 = nothing recovered, 0 = all of it).

With at least as many output as input channels and a full-rank 1x1 conv, the linear decoder can
undo the 1x1 conv, so the error depends on the spatial operator (stride / max / average) only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import make_shortcut
from .common import PALETTE, StudyError, pyplot, write_outputs

KINDS: dict[str, str] = {
    "B": "1x1 conv, stride 2 (ResNet)",
    "maxpool": "3x3/2 max-pool + 1x1 (iResNet)",
    "avgdown": "2x2/2 avg-pool + 1x1 (ResNet-D)",
    "A": "stride-2 subsample + zero pad (ResNet CIFAR)",
}
# The family whose networks use each shortcut, for the shared palette.
KIND_FAMILY = {"B": "resnet", "maxpool": "iresnet", "avgdown": "res2net", "A": "plain"}
INPUTS = ("gaussian", "smooth", "smooth_relu")


def shortcut_module(kind: str, in_ch: int, out_ch: int) -> nn.Module:
    """The library's stride-2 shortcut of this kind, in eval mode (BN is then a fixed affine map)."""
    if kind not in KINDS:
        raise StudyError(f"unknown shortcut kind {kind!r}; known: {', '.join(KINDS)}")
    return make_shortcut(kind, in_ch, out_ch, 2).eval()


def coverage(module: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Share of input positions (any channel) and of input elements that influence the output.

    A random cotangent stands for "some output": a position influences the output iff its
    gradient under a random cotangent is nonzero (a cancellation to exactly zero has probability 0).
    """
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    gen = torch.Generator().manual_seed(1)
    cot = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    (g,) = torch.autograd.grad(y, x, cot)
    used = g != 0
    return {
        "positions": float(used.any(1).double().mean()),
        "elements": float(used.double().mean()),
    }


def _neighbourhood(y: torch.Tensor, context: int) -> torch.Tensor:
    """(N*h*w, C*(2c+1)^2 + 1): each output cell's (2c+1)^2 neighbourhood, plus a constant."""
    n, c, h, w = y.shape
    k = 2 * context + 1
    cols = F.unfold(y, k, padding=context)  # N, C*k*k, h*w
    cols = cols.transpose(1, 2).reshape(n * h * w, c * k * k)
    return torch.cat([cols, cols.new_ones(len(cols), 1)], 1)


@torch.no_grad()
def reconstruction_error(
    module: nn.Module, x_fit: torch.Tensor, x_test: torch.Tensor, context: int = 1
) -> dict[str, float | list[float]]:
    """Relative squared error of a linear decoder from the shortcut output back to the input.

    Input pixel (2i + a, 2j + b) is predicted from output cells (i + di, j + dj), |di|, |dj| <=
    context, with one decoder per phase (a, b). Fitted on `x_fit`, scored on `x_test`.
    Returns the overall error and the four per-phase errors [(0,0), (0,1), (1,0), (1,1)].
    """
    feats_fit = _neighbourhood(module(x_fit).double(), context)
    feats_test = _neighbourhood(module(x_test).double(), context)

    def targets(x: torch.Tensor) -> torch.Tensor:
        # (N*h*w, 4*C): the four phases side by side, so one solve fits all four decoders.
        c = x.shape[1]
        ts = [x[:, :, a::2, b::2].double().permute(0, 2, 3, 1).reshape(-1, c) for a in (0, 1) for b in (0, 1)]
        return torch.cat(ts, 1)

    t_fit, t_test = targets(x_fit), targets(x_test)
    # Normal equations: the features are few (C' * 9 + 1) and the rows many, so the Gram matrix
    # is small; a tiny ridge keeps it invertible when a feature is constant (e.g. dead after ReLU).
    gram = feats_fit.T @ feats_fit
    gram += 1e-8 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    coef = torch.linalg.solve(gram, feats_fit.T @ t_fit)
    err = ((feats_test @ coef - t_test) ** 2).view(len(t_test), 4, -1).sum((0, 2))
    var = ((t_test - t_fit.mean(0)) ** 2).view(len(t_test), 4, -1).sum((0, 2))
    phases = (err / var).tolist()
    sse, sst = float(err.sum()), float(var.sum())
    return {"error": sse / sst, "phases": phases}


def make_inputs(kind: str, n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Test inputs: i.i.d. N(0,1); spatially smooth fields (Gaussian blur, sigma 1.5 px, unit
    variance), like natural feature maps; and those fields after ReLU, sparse and non-negative
    like the activations a shortcut actually reads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=gen)
    if kind == "gaussian":
        return x
    if kind in ("smooth", "smooth_relu"):
        sigma, r = 1.5, 4
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k1 = torch.exp(-(t**2) / (2 * sigma**2))
        k2 = (k1[:, None] * k1[None, :]) / (k1[:, None] * k1[None, :]).norm()  # unit-variance output
        w = k2.expand(channels, 1, 2 * r + 1, 2 * r + 1)
        x = F.conv2d(F.pad(x, (r,) * 4, mode="circular"), w, groups=channels)
        return F.relu(x) if kind == "smooth_relu" else x
    raise StudyError(f"unknown input kind {kind!r}; known: {', '.join(INPUTS)}")


def shortcut(
    kinds: tuple[str, ...] | list[str] = ("B", "maxpool", "avgdown"),
    inputs: tuple[str, ...] | list[str] = INPUTS,
    channels: int = 16,
    size: int = 32,
    num_fit: int = 128,
    num_test: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict:
    """Coverage and reconstruction error of each stride-2 shortcut kind (channels -> 2 x channels).

    Returns {"kinds": {kind: {input: {"positions", "elements", "error", "phases"}}}, ...}.
    """
    if size % 2:
        raise StudyError(f"size must be even (a stride-2 shortcut halves it), got {size}")
    result: dict = {"kinds": {}, "descriptions": {k: KINDS.get(k, k) for k in kinds}}
    masks = {}
    for kind in kinds:
        torch.manual_seed(seed)
        module = shortcut_module(kind, channels, 2 * channels)
        per_input = {}
        for inp in inputs:
            x_fit = make_inputs(inp, num_fit, channels, size, seed)
            x_test = make_inputs(inp, num_test, channels, size, seed + 1)
            per_input[inp] = coverage(module, x_test) | reconstruction_error(module, x_fit, x_test)
        result["kinds"][kind] = per_input
        masks[kind] = _influence_mask(module, make_inputs("gaussian", 1, channels, size, seed))
    result["setup"] = {
        "channels": f"{channels} -> {2 * channels}",
        "size": size,
        "fit_inputs": num_fit,
        "test_inputs": num_test,
        "decoder": "linear least squares from the 3x3 output neighbourhood, one per 2x2 phase",
        "weights": "initialisation (BN in eval mode)",
    }
    if out_dir is not None:
        result["files"] = write_outputs(out_dir, "shortcut", result, plot(result, masks))
    return result


def _influence_mask(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Which positions of channel 0 of one input influence the output (for the figure)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (g,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return (g[0, 0] != 0).float()


def plot(result: dict, masks: dict):
    import numpy as np

    kinds = list(result["kinds"])
    inputs = list(next(iter(result["kinds"].values())))
    fig = pyplot().figure(figsize=(14, 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 1])
    panels = [
        ("positions", 100, "Input positions that influence the output", "positions used (%)"),
        ("elements", 100, "Input elements (channel x position) that influence it", "elements used (%)"),
        ("error", 1, "Linear reconstruction of the input", "held-out error / input variance (1 = none)"),
    ]
    width = 0.8 / len(kinds)
    xs = np.arange(len(inputs))
    for ax, (key, scale, title, ylabel) in zip(top.subplots(1, len(panels)), panels):
        for i, kind in enumerate(kinds):
            ax.bar(
                xs + (i - (len(kinds) - 1) / 2) * width,
                [scale * result["kinds"][kind][inp][key] for inp in inputs],
                width=width,
                color=PALETTE[KIND_FAMILY.get(kind, "plain")],
                label=KINDS.get(kind, kind),
            )
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs, [s.replace("_", " + ") for s in inputs])
        ax.set_xlabel("input distribution")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    top.legend(handles, labels, loc="outside lower center", ncols=len(kinds), fontsize=8)
    for ax, kind in zip(np.atleast_1d(bottom.subplots(1, len(kinds))), kinds):
        ax.imshow(masks[kind][:16, :16].numpy(), cmap="Greys", vmin=0, vmax=1)  # a corner shows the pattern
        ax.set_title(f"{KINDS.get(kind, kind)}:\nchannel-0 positions used (black), 16x16 corner", fontsize=8)
        ax.set_xlabel("x (px)", fontsize=8)
        ax.set_ylabel("y (px)", fontsize=8)
    fig.suptitle("Stride-2 shortcuts: how much of the input reaches the output", fontsize=11)
    return fig


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for kind, per_input in result["kinds"].items():
        for inp, r in per_input.items():
            rows.append(
                [
                    kind,
                    inp,
                    f"{100 * r['positions']:.1f}",
                    f"{100 * r['elements']:.1f}",
                    f"{r['error']:.3f}",
                    " ".join(f"{e:.2f}" for e in r["phases"]),
                ]
            )
    return ["shortcut", "input", "positions used %", "elements used %", "recon. error", "per phase"], rows
