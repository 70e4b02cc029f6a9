"""What every study shares: one colour per family, model building, block lists, output files."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ..config import RUNTIME_FIELDS, TrainConfig
from ..errors import ResnetsError
from ..models import ENTRIES, FAMILIES, block_family
from ..models.cifar_depths import CIFAR_FAMILIES, CIFAR_NAMES, EXTRA_SPECS, depth_spec, is_cifar_depth
from ..models.net import NetSpec, ResNet
from ..registry import create_model, get_entry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class StudyError(ResnetsError):
    """A mistake in what a study was asked to do (bad stage, no residual block, missing data)."""


# One colour per family (declared by the family module), used by every figure, so a family looks
# the same across studies.
PALETTE: dict[str, str] = {"plain": "#7f7f7f", **{f.name: f.color for f in FAMILIES.values()}}


def family_of(model: nn.Module) -> str:
    """The family a model is drawn in: its registry family, or "plain" when it has no shortcuts."""
    spec = model.spec
    if spec.shortcut == "none":
        return "plain"
    name = getattr(model, "name", None)
    if name and name not in EXTRA_SPECS:
        try:
            return get_entry(name).family
        except KeyError:
            pass
    return block_family(spec.block)


def shades(family: str, n: int) -> list[tuple[float, float, float]]:
    """n shades of a family's colour, lightest first: deeper nets of one family get darker lines."""
    from matplotlib.colors import to_rgb

    base = to_rgb(PALETTE.get(family, "#000000"))
    if n == 1:
        return [base]
    out = []
    for i in range(n):
        t = 0.45 * (1 - i / (n - 1))  # 0.45 = lightest mix with white: thin lines and labels stay readable
        out.append(tuple(c + (1 - c) * t for c in base))
    return out


def colours_for(names: list[str], families: list[str]) -> dict[str, tuple[float, float, float]]:
    """A colour per model: the family's, darker for later (deeper) members of the same family."""
    out = {}
    for fam in dict.fromkeys(families):
        members = [n for n, f in zip(names, families) if f == fam]
        for n, c in zip(members, shades(fam, len(members))):
            out[n] = c
    return out


def depth_in_name(name: str) -> int:
    """The first number in a model name, its depth by the papers' naming ("resnet110" -> 110,
    "preact_resnet164" -> 164); 0 when the name has none."""
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return int(digits[0]) if digits else 0


def cifar_depth_spec(family: str, depth: int) -> NetSpec:
    """The CIFAR net of `family` ("v1", "v2" or "iresnet") with `depth` = 6n+2 layers: (n, n, n) blocks."""
    if family not in CIFAR_FAMILIES:
        raise StudyError(f"unknown family {family!r}; known: {', '.join(CIFAR_FAMILIES)}")
    if not is_cifar_depth(depth):
        raise StudyError(f"a CIFAR depth is 6n+2 with n >= 1 (8, 14, 20, 26, ...); got {depth}")
    return depth_spec(family, depth)


def cifar_depth_name(family: str, depth: int) -> str:
    """The sweep's name of cifar_depth_spec(family, depth); build_model(name) builds exactly that net.

    "resnet{d}" / "preact_resnet{d}" / "iresnet{d}_cifar", except where the plain name is a
    registered net of another design (resnet50 is the ImageNet one): then "<name>_cifar".
    """
    spec = cifar_depth_spec(family, depth)
    name = CIFAR_NAMES[family].format(d=depth)
    if name in ENTRIES and get_entry(name).spec != spec:
        name += "_cifar"
    return name


def build_model(name: str, **overrides) -> ResNet:
    """`create_model(name)`: a registered model, or a CIFAR net of another depth that the registry
    builds by name ("resnet218", "preact_resnet56", "iresnet20_cifar"; see models.cifar_depths)."""
    return create_model(name, **overrides)


def input_size_of(model: ResNet) -> int:
    """The model's native input size: 32 for a CIFAR stem, else the registry's (224)."""
    if model.spec.stem == "cifar":
        return 32
    name = getattr(model, "name", None)
    try:
        return get_entry(name).input_size if name else 224
    except KeyError:
        return 224


def residual_blocks(model: ResNet) -> Iterator[tuple[str, nn.Module]]:
    """("stage.index", block) for every block of the network, in forward order."""
    for s, stage in enumerate(model.stages):
        for i, block in enumerate(stage):
            yield f"{s}.{i}", block


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Set every BatchNorm's running statistics to those of `x`, then switch to eval mode.

    A freshly initialised net in eval mode normalises with mean 0 / variance 1, which is not what
    it sees in training; with statistics of real inputs, each image's gradients are independent of
    the rest of the batch (unlike train mode) and still match what training would see.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for chunk in x.split(batch_size):
        model(chunk)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def radius_holding(mass: torch.Tensor, share: float = 0.9) -> float:
    """Smallest Euclidean radius (pixels) about the mass centroid whose disc holds `share` of the mass."""
    m = mass.double() / mass.sum()
    h, w = m.shape
    ys = torch.arange(h, dtype=torch.float64).view(-1, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, -1)
    cy, cx = (m * ys).sum(), (m * xs).sum()
    dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt().flatten()
    order = dist.argsort()
    cum = m.flatten()[order].cumsum(0)
    k = int(torch.searchsorted(cum, torch.tensor(share, dtype=torch.float64) - 1e-12))
    return float(dist[order][min(k, len(order) - 1)])


def support_box(mass: torch.Tensor, rel_eps: float = 0.0) -> tuple[int, int]:
    """(height, width) of the bounding box of the entries above rel_eps * max (0: every nonzero)."""
    nz = (mass > rel_eps * mass.max()).nonzero()
    if len(nz) == 0:
        return 0, 0
    (y0, x0), (y1, x1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    return y1 - y0 + 1, x1 - x0 + 1


def write_outputs(out_dir: str | Path, study: str, numbers: dict, fig) -> dict[str, str]:
    """Write `<study>.json` and `<study>.png` into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{study}.json", out / f"{study}.png"
    json_path.write_text(json.dumps(_jsonable(numbers), indent=1) + "\n")
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return {"json": str(json_path), "figure": str(png_path)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN / inf
    return x


def pyplot():
    """matplotlib.pyplot drawing off-screen: studies run on servers without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.2), **kw):
    """(figure, 2-D array of axes): nrows x ncols panels, each `size` inches."""
    return pyplot().subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)


# Trained studies (degradation, ablations): a run folder per net, resumed when its recipe matches.
# The CIFAR optimiser and augmentation of He et al. 2015 (Sec. 4.2), which He et al. 2016 keep:
# SGD with momentum 0.9 (no Nesterov), weight decay 1e-4 on every parameter, pad-4 crop and flip.
# Its lr is 0.1 per batch of 128.
PAPER_CIFAR = dict(momentum=0.9, nesterov=False, weight_decay=1e-4, wd_norm_bias=True, padding=4, flip=True)
STUDY_CKPT_EVERY = 100  # steps: resnet56 takes about 3.5 minutes for 100 steps of 128 on one core


def train_run(run: Path, recipe: dict, data_dir: str | Path, seed: int, **fields) -> tuple[dict, list[dict]]:
    """Train one CIFAR-10 run of a study in `run` with the recipe's TrainConfig fields and `fields`
    (model, unit, ...): resumed from its last.ckpt when one of the same recipe is there (a finished
    run is only read back). last.ckpt is also written every STUDY_CKPT_EVERY steps, so a study
    killed mid-epoch loses at most that many. A finished run's small files alone (config.toml,
    metrics.csv, summary.json, as committed under docs/results/) are read back too, so a study can
    be completed over several machines. Returns (the run's summary, its metrics.csv rows)."""
    from ..train import train

    try:
        cfg = TrainConfig(
            **{"ckpt_every": STUDY_CKPT_EVERY, **recipe},
            **fields,
            data="cifar10",
            data_dir=str(data_dir),
            download=False,
            seed=seed,
            quiet=True,
        )
    except TypeError as exc:
        raise StudyError(f"unknown training option in the recipe: {exc}") from None
    finished = finished_run(run, cfg)
    if finished is not None:
        return finished
    cfg = replace(cfg, out=str(run), resume=same_run(run, cfg))
    summary = train(cfg)
    return summary, read_metrics(run / "metrics.csv")


def finished_run(run: Path, cfg) -> tuple[dict, list[dict]] | None:
    """(summary, metrics rows) of a run of this recipe that trained all its epochs (its small
    files; a `last.ckpt` left beside them is not read); None when `run` holds no such run."""
    files = [run / n for n in ("config.toml", "metrics.csv", "summary.json")]
    if not all(f.exists() for f in files):
        return None
    _check_recipe(run, cfg)
    summary = json.loads(files[2].read_text())
    rows = read_metrics(files[1])
    if summary.get("epochs") == cfg.epochs and len(rows) == cfg.epochs:
        return summary, rows
    if (run / "last.ckpt").exists():
        return None  # stopped after a summary of fewer epochs was written: resume it
    raise StudyError(
        f"{run} holds {len(rows)} of {cfg.epochs} epochs and no last.ckpt to resume from; "
        "move it away to train it again"
    )


def same_run(run: Path, cfg) -> bool:
    """Whether `run` holds a run of exactly this recipe (resume it); False when it holds none.

    A run of another recipe is an error rather than overwritten or silently mixed in.
    """
    if not (run / "last.ckpt").exists():
        return False
    _check_recipe(run, cfg)
    return True


def _check_recipe(run: Path, cfg) -> None:
    """StudyError when the run in `run` was trained with another recipe than `cfg`."""
    stored = tomllib.loads((run / "config.toml").read_text())
    # A field left to the run to resolve (None, "auto") matches whatever the run resolved it to.
    differ = [
        k
        for k, v in asdict(cfg).items()
        if k not in RUNTIME_FIELDS and v not in (None, "auto") and _plain(stored.get(k)) != _plain(v)
    ]
    if differ:
        raise StudyError(
            f"{run} holds a run with another recipe ({', '.join(differ)} differ); pass another --out"
        )


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [
            {k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(f)
        ]
