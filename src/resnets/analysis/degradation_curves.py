"""Degradation (He et al. 2015, Fig. 1 and 6): deeper plain nets train worse; residual nets do not.

Every net is trained with the same recipe by `resnets.train`, and the per-epoch training error
(on the augmented batches, in train mode, as the paper's thin curves) and test error are plotted
against epochs. The claim holds when the deeper plain net has the *higher training* error (so
it is an optimisation problem, not overfitting) while the deeper residual net has the lower one.
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from ..registry import create_model, get_entry
from .common import (
    PAPER_CIFAR,
    StudyError,
    colours_for,
    depth_in_name,
    family_of,
    new_figure,
    train_run,
    write_outputs,
)

DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56")

# The paper's CIFAR recipe (PAPER_CIFAR, lr 0.1 per batch of 128) before its first learning-rate drop: a
# short run sees the constant-lr start of Fig. 6. The default is sized for 2 CPU cores in a few
# minutes (48 steps of 32 images per net), so it shows the first steps only; batch 32 gives the
# small subset more steps than the paper's 128.
PAPER_LR, PAPER_BATCH = 0.1, 128
CIFAR_TRAIN_IMAGES = 50_000  # the study trains on CIFAR-10 only
QUICK = PAPER_CIFAR | dict(
    epochs=3, train_subset=512, test_subset=500, batch_size=32, schedule="constant", warmup_epochs=0.0
)
# The paper's full schedule: 64k iterations of batch 128 = 164 epochs, lr / 10 at 32k and 48k.
FULL = QUICK | dict(
    epochs=164, train_subset=0, test_subset=0, batch_size=128, schedule="step", milestones=(82, 123)
)


def paper_lr(batch_size: int) -> float:
    """The paper's learning rate per image: 0.1 at batch 128, scaled linearly (Goyal et al. 2017).

    Keeping 0.1 at batch 32 is four times the paper's step per image: in a run here (1280 images,
    6 epochs) resnet56 then sat at chance (loss 2.30) through epochs 2-3 and ended at 83% training
    error, against 71% with the scaled rate.
    """
    return PAPER_LR * batch_size / PAPER_BATCH


def degradation(
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    data_dir: str | Path = "data/cifar10-jpeg",
    full: bool = False,
    overrides: dict | None = None,
    seed: int = 0,
    out_dir: str | Path = "runs/analysis",
) -> dict:
    """Train each model with one recipe (QUICK, or FULL for the paper's schedule; `overrides`
    changes any TrainConfig field; the lr follows the batch size unless given) and collect
    per-epoch training and test error.

    The training runs go to `<out_dir>/degradation_runs/<model>`; their `model.safetensors` can be
    fed to the lesion and gradcam studies. A run already there with the same recipe is resumed
    (an interrupted run finishes, a finished one is only read). Returns {"recipe", "models":
    {name: {"family", "train_err", "test_err", "final_train_loss", "final_train_err",
    "final_test_err", "run"}}, "steps_per_epoch", "verdict"}.
    """
    for name in models:  # a misspelt last name must not fail after hours of training the others
        get_entry(name)
    recipe = (FULL if full else QUICK) | dict(overrides or {})
    recipe.setdefault("lr", paper_lr(recipe["batch_size"]))
    runs = Path(out_dir) / "degradation_runs"
    result: dict = {
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        "seed": seed,
        "steps_per_epoch": steps_per_epoch(recipe),
        "models": {},
    }
    for name in models:
        run = runs / name
        summary, rows = train_run(run, recipe, data_dir, seed, model=name)
        result["models"][name] = {
            "family": family_of(create_model(name)),
            "epochs": [r["epoch"] for r in rows],
            "train_err": [1 - r["train_top1"] for r in rows],
            "test_err": [1 - r["test_top1"] for r in rows],
            "train_loss": [r["train_loss"] for r in rows],
            "final_train_loss": rows[-1]["train_loss"],
            "final_train_err": 1 - rows[-1]["train_top1"],
            "final_test_err": 1 - rows[-1]["test_top1"],
            "time_s": summary["time_s"],
            "run": str(run),
        }
    result["verdict"] = verdict(result)
    result["files"] = write_outputs(out_dir, "degradation", result, plot(result))
    return result


def degradation_seeds(
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    data_dir: str | Path = "data/cifar10-jpeg",
    full: bool = False,
    overrides: dict | None = None,
    seeds: tuple[int, ...] | list[int] = (0, 1),
    out_dir: str | Path = "runs/analysis",
) -> dict:
    """`degradation` once per seed, each a complete study in `<out_dir>/seed_<s>`, then combined:
    per model the mean curves and final errors with every seed's, the verdict on the means, and,
    per family, the gap of each seed and whether all seeds agree with the mean's verdict."""
    if not seeds:
        raise StudyError("give at least one seed")
    per_seed = [degradation(models, data_dir, full, overrides, s, Path(out_dir) / f"seed_{s}") for s in seeds]
    result: dict = {
        "recipe": per_seed[0]["recipe"],
        "seeds": list(seeds),
        "steps_per_epoch": per_seed[0]["steps_per_epoch"],
        "models": {},
    }
    for name in per_seed[0]["models"]:
        runs = [r["models"][name] for r in per_seed]
        n = min(len(e["epochs"]) for e in runs)
        entry: dict = {"family": runs[0]["family"], "epochs": runs[0]["epochs"][:n]}
        for key in ("train_err", "test_err"):
            entry[f"{key}_seeds"] = [e[key][:n] for e in runs]
            entry[key] = [statistics.fmean(e[key][i] for e in runs) for i in range(n)]
        for key in ("final_train_loss", "final_train_err", "final_test_err"):
            entry[f"{key}_seeds"] = [e[key] for e in runs]
            entry[key] = statistics.fmean(entry[f"{key}_seeds"])
        entry["time_s"] = sum(e["time_s"] for e in runs)
        entry["runs"] = [e["run"] for e in runs]
        result["models"][name] = entry
    result["verdict"] = verdict(result)
    for family, v in result["verdict"].items():
        gaps = [r["verdict"][family]["train_err_gap"] for r in per_seed]
        v["train_err_gap_seeds"] = gaps
        v["all_seeds_agree"] = all((g > 0) == v["deeper_trains_worse"] for g in gaps)
    result["files"] = write_outputs(out_dir, "degradation", result, plot(result))
    return result


def steps_per_epoch(recipe: dict) -> int:
    """Optimizer steps in one epoch of the recipe (the trainer drops the last partial batch)."""
    return (recipe.get("train_subset") or CIFAR_TRAIN_IMAGES) // recipe["batch_size"]


def verdict(result: dict) -> dict:
    """Per family, whether the deepest net ends with a higher training error than the shallowest."""
    out = {}
    by_family: dict[str, list[str]] = {}
    for name, e in result["models"].items():
        by_family.setdefault(e["family"], []).append(name)
    for family, names in by_family.items():
        if len(names) < 2:
            continue
        shallow, deep = min(names, key=depth_in_name), max(names, key=depth_in_name)
        a, b = result["models"][shallow], result["models"][deep]
        out[family] = {
            "shallow": shallow,
            "deep": deep,
            "deeper_trains_worse": b["final_train_err"] > a["final_train_err"],
            "train_err_gap": b["final_train_err"] - a["final_train_err"],
        }
    return out


PANEL_TITLES = {"plain": "plain nets (no shortcuts)", "resnet": "residual nets (ResNet v1)"}


def plot(result: dict):
    from matplotlib.ticker import MaxNLocator

    names = sorted(result["models"], key=depth_in_name)
    colours = colours_for(names, [result["models"][n]["family"] for n in names])
    families = list(dict.fromkeys(result["models"][n]["family"] for n in names))
    steps = steps_per_epoch(result["recipe"])
    fig, axes = new_figure(1, len(families), size=(6.0, 4.4), sharey=True)
    for ax, family in zip(axes[0], families):  # one panel per family, as the paper's Fig. 6
        for name in names:
            e = result["models"][name]
            if e["family"] == family:
                style = dict(color=colours[name])
                for key in ("train_err", "test_err"):  # several seeds: their range as a band
                    if f"{key}_seeds" in e:
                        curves = e[f"{key}_seeds"]
                        low = [100 * min(c[i] for c in curves) for i in range(len(e["epochs"]))]
                        high = [100 * max(c[i] for c in curves) for i in range(len(e["epochs"]))]
                        ax.fill_between(e["epochs"], low, high, alpha=0.15, lw=0, **style)
                ax.plot(
                    e["epochs"],
                    [100 * v for v in e["train_err"]],
                    "--",
                    lw=1.2,
                    label=f"{name} train",
                    **style,
                )
                ax.plot(
                    e["epochs"], [100 * v for v in e["test_err"]], "-", lw=2.2, label=f"{name} test", **style
                )
        ax.set_title(PANEL_TITLES.get(family, f"{family} nets"), fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        ax.set_xlabel("epoch (one pass over the training images)")
        # Fig. 6 counts iterations: the same x axis in thousands of steps, on top
        top = ax.secondary_xaxis("top", functions=(lambda e: e * steps / 1e3, lambda k: k * 1e3 / steps))
        top.set_xlabel(f"iterations (thousands, batch {result['recipe']['batch_size']})", fontsize=8)
        top.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("top-1 error (%)")
    r = result["recipe"]
    subset = f"{r['train_subset']} training images" if r.get("train_subset") else "all training images"
    seeds = result.get("seeds")
    over = f"; mean of seeds {', '.join(map(str, seeds))}, band = their range" if seeds else ""
    title = (
        f"CIFAR-10 training (dashed) and test (solid) error with one recipe: {subset}, batch {r['batch_size']}, "
        f"lr {r['lr']}, {r['schedule']} schedule{over}"
    )
    fig.suptitle(textwrap.fill(title, 80 * len(families)), fontsize=10)  # as wide as the panels
    fig.tight_layout()
    return fig


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    def cell(e: dict, key: str, fmt: str) -> str:
        text = format(100 * e[key], fmt)
        if f"{key}_seeds" in e:  # the mean, then each seed's
            text += " (" + ", ".join(format(100 * v, fmt) for v in e[f"{key}_seeds"]) + ")"
        return text

    rows = [
        [
            name,
            f"{e['final_train_loss']:.3f}",
            cell(e, "final_train_err", ".1f"),
            cell(e, "final_test_err", ".1f"),
            f"{e['time_s']:.0f}",
        ]
        for name, e in result["models"].items()
    ]
    return ["model", "final train loss", "train error %", "test error %", "time s"], rows
