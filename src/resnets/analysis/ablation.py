"""Trained ablations: one network, one recipe, variants of one of its parts, several seeds each.

- units (He et al. 2016, Table 2): the five residual units of Fig. 4 on the same CIFAR net —
  original, BN after addition, ReLU before addition, ReLU-only pre-activation and full
  pre-activation. The paper's ResNet-110 CIFAR-10 test errors: 6.61, 8.17, 7.84, 6.71, 6.37 %.
- shortcut (Duta et al. 2020, Sec. 3.3): the stride-2 shortcut of the same net as a 1x1 stride-2
  projection (ResNet option B) and as iResNet's 3x3/2 max-pool + 1x1 + BN. The paper's claim is
  that the max-pool shortcut loses less information and so gives the lower error.

Each (variant, seed) is its own `resnets train` run in `<out>/ablation_runs/<study>/<variant>_s<seed>`,
resumed when its recipe matches (so an interrupted study continues where it stopped, one run at a
time). A difference between two variants "exceeds the seed noise" when the difference of their
mean test errors is more than twice its standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b), with s the
sample standard deviation over seeds; with 2 or 3 seeds this is a rough screen, not a test.
"""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from pathlib import Path

from ..models.preact_resnet import UNIT_ERRORS
from .common import PAPER_CIFAR, StudyError, depth_in_name, new_figure, train_run, write_outputs

# The training recipe of both studies: the paper's CIFAR optimiser and augmentation (PAPER_CIFAR,
# lr 0.1 per batch of 128, no label smoothing), with a cosine schedule over the run instead of the 164-epoch step schedule, so
# a short run ends at a small learning rate as the paper's does; a linear warm-up over a tenth of
# the run, at most 1 epoch (set in `ablation`, as it depends on --epochs).
RECIPE = PAPER_CIFAR | dict(
    epochs=10, batch_size=128, lr=0.1, schedule="cosine", label_smoothing=0.0, train_subset=0, test_subset=0
)
# The paper's schedule (He et al. 2016, Sec. 4.1 / He et al. 2015, Sec. 4.2): 64k iterations of 128,
# lr / 10 at 32k and 48k. He et al. 2015 start ResNet-110 at lr 0.01 for about 400 iterations
# (Sec. 4.2): nets of 110 layers and more get a 1-epoch (390-iteration) linear warm-up instead,
# shallower ones none (`recipe_for`).
FULL = RECIPE | dict(epochs=164, schedule="step", milestones=(82, 123))
DEEP_WARMUP_LAYERS = 110


def recipe_for(model: str, full: bool = False, overrides: dict | None = None) -> dict:
    """The training recipe of `model`'s runs: RECIPE, or FULL for the paper's schedule, with
    `overrides`; a warm-up unless the overrides set one (a tenth of a short run, at most 1 epoch;
    in the full schedule 1 epoch at 110 layers and more, as the paper's ResNet-110, else none)."""
    recipe = (FULL if full else RECIPE) | dict(overrides or {})
    if full:
        recipe.setdefault("warmup_epochs", 1.0 if depth_in_name(model) >= DEEP_WARMUP_LAYERS else 0.0)
    recipe.setdefault("warmup_epochs", min(1.0, recipe["epochs"] / 10))
    return recipe


# study -> (TrainConfig field varied, {variant label: field value}, the paper's test error % per
# variant or None, the paper's claim as (better, worse) pairs)
STUDIES: dict[str, tuple[str, dict[str, str], dict[str, float] | None, list[tuple[str, str]]]] = {
    "units": (
        "unit",
        {u: u for u in UNIT_ERRORS},
        {u: errs[0] for u, errs in UNIT_ERRORS.items()},  # the ResNet-110 column
        [],  # every pair the paper orders, derived from its numbers below
    ),
    "shortcut": (
        "shortcut",
        {"projection": "B", "maxpool": "maxpool"},
        None,  # the paper's shortcut ablation is on ImageNet; it gives no CIFAR error for it
        [("maxpool", "projection")],
    ),
}
DEFAULT_MODEL = {"units": "resnet20", "shortcut": "resnet20"}


def claims(study: str) -> list[tuple[str, str]]:
    """The paper's (better, worse) pairs: for units every pair of Table 2, ordered by its errors."""
    _, _, paper, pairs = STUDIES[study]
    if paper is None:
        return pairs
    return [(a, b) if paper[a] < paper[b] else (b, a) for a, b in combinations(paper, 2)]


def ablation(
    study: str,
    model: str | None = None,
    seeds: tuple[int, ...] | list[int] = (0, 1, 2),
    data_dir: str | Path = "data/cifar10-jpeg",
    full: bool = False,
    overrides: dict | None = None,
    variants: list[str] | None = None,
    out_dir: str | Path = "runs/analysis",
) -> dict:
    """Train `model` once per (variant, seed) with one recipe and compare the final test errors.

    Returns {"study", "model", "field", "recipe", "seeds", "variants": {label: {"value",
    "runs": {seed: {...}}, "mean_test_err", "std_test_err", "n"}}, "paper", "verdict", "files"}.
    """
    if study not in STUDIES:
        raise StudyError(f"unknown ablation {study!r}; known: {', '.join(STUDIES)}")
    field, values, paper, _ = STUDIES[study]
    chosen = list(values) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in values]
    if unknown:
        raise StudyError(f"unknown {study} variant {unknown[0]!r}; known: {', '.join(values)}")
    if not seeds:
        raise StudyError("give at least one seed")
    model = model or DEFAULT_MODEL[study]
    recipe = recipe_for(model, full, overrides)
    runs = Path(out_dir) / "ablation_runs" / study
    result: dict = {
        "study": study,
        "model": model,
        "field": field,
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        "seeds": list(seeds),
        "variants": {},
        "paper": {k: paper[k] for k in chosen} if paper else None,
    }
    for label in chosen:
        entry: dict = {"value": values[label], "runs": {}}
        for seed in seeds:
            run = runs / f"{label}_s{seed}"
            summary, rows = train_run(run, recipe, data_dir, seed, model=model, **{field: values[label]})
            entry["runs"][str(seed)] = {
                "test_err": [1 - r["test_top1"] for r in rows],
                "train_err": [1 - r["train_top1"] for r in rows],
                "final_test_err": 1 - rows[-1]["test_top1"],
                "final_train_err": 1 - rows[-1]["train_top1"],
                "final_train_loss": rows[-1]["train_loss"],
                "time_s": summary["time_s"],
                "run": str(run),
            }
        entry.update(summarise([r["final_test_err"] for r in entry["runs"].values()]))
        result["variants"][label] = entry
    result["verdict"] = verdict(result, [c for c in claims(study) if c[0] in chosen and c[1] in chosen])
    result["files"] = write_outputs(out_dir, f"ablation_{study}", result, plot(result))
    return result


def summarise(errors: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one seed) and count of per-seed errors."""
    return {
        "mean_test_err": statistics.fmean(errors),
        "std_test_err": statistics.stdev(errors) if len(errors) > 1 else 0.0,
        "n": len(errors),
    }


def compare(a: dict, b: dict) -> dict:
    """Whether variant a ends with the lower mean test error than b, by how much, and whether the
    difference exceeds twice its standard error (never with one seed each: no spread to compare)."""
    diff = b["mean_test_err"] - a["mean_test_err"]
    se = math.sqrt(a["std_test_err"] ** 2 / a["n"] + b["std_test_err"] ** 2 / b["n"])
    return {
        "holds": diff > 0,
        "diff": diff,
        "se": se,
        "beyond_noise": a["n"] > 1 and b["n"] > 1 and abs(diff) > 2 * se,
    }


def verdict(result: dict, pairs: list[tuple[str, str]]) -> dict:
    """Each of the paper's (better, worse) pairs checked against the measured means, and, for a
    study with the paper's numbers, the rank correlation of measured and published errors."""
    v = result["variants"]
    checks = [{"better": a, "worse": b, **compare(v[a], v[b])} for a, b in pairs]
    out: dict = {
        "pairs": checks,
        "agree": sum(c["holds"] for c in checks),
        "agree_beyond_noise": sum(c["holds"] and c["beyond_noise"] for c in checks),
        "contradict_beyond_noise": sum(not c["holds"] and c["beyond_noise"] for c in checks),
        "of": len(checks),
    }
    paper = result.get("paper")
    if paper and len(v) > 2:
        out["spearman_vs_paper"] = spearman([v[k]["mean_test_err"] for k in v], [paper[k] for k in v])
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share the mean of their ranks
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks, ties averaged); 0 when a side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def plot(result: dict):
    """Left: final test error per variant, one dot per seed, the mean as a bar with +-1 s.d., the
    paper's numbers (different net and schedule) as open diamonds on their own axis. Right: the
    mean test-error curve of each variant over epochs."""
    labels = list(result["variants"])
    fig, axes = new_figure(1, 2, size=(5.6, 4.2))
    ax, curves = axes[0]
    colours = [f"C{i}" for i in range(len(labels))]
    for i, (label, c) in enumerate(zip(labels, colours)):
        e = result["variants"][label]
        errs = [100 * r["final_test_err"] for r in e["runs"].values()]
        ax.bar(i, 100 * e["mean_test_err"], width=0.6, color=c, alpha=0.35)
        ax.errorbar(i, 100 * e["mean_test_err"], yerr=100 * e["std_test_err"], color=c, capsize=4)
        ax.plot([i] * len(errs), errs, "o", color=c, ms=4)
        epochs = range(1, 1 + min(len(r["test_err"]) for r in e["runs"].values()))
        mean_curve = [statistics.fmean(r["test_err"][k - 1] for r in e["runs"].values()) for k in epochs]
        curves.plot(list(epochs), [100 * m for m in mean_curve], color=c, lw=1.8, label=label)
    lows = [100 * min(r["final_test_err"] for r in result["variants"][k]["runs"].values()) for k in labels]
    ax.set_ylim(bottom=max(0.0, min(lows) - 2.0))
    ax.set_xticks(range(len(labels)), [label.replace("_", "\n") for label in labels], fontsize=8)
    ax.set_ylabel(f"{result['model']} test error (%)")
    ax.grid(axis="y", alpha=0.3)
    n = len(result["seeds"])
    ax.set_title(f"final test error, {n} seed{'s' if n > 1 else ''} (dots), mean +- s.d.", fontsize=9)
    if result.get("paper"):
        twin = ax.twinx()
        twin.plot(range(len(labels)), [result["paper"][k] for k in labels], "D", mfc="none", color="k")
        twin.set_ylabel("paper, ResNet-110, 164 epochs (open diamonds, %)")
    curves.set_xlabel("epoch")
    curves.set_ylabel("test error (%), mean over seeds")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    r = result["recipe"]
    fig.suptitle(
        f"CIFAR-10, {result['model']}, {r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']}, "
        f"{r['schedule']} schedule",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    paper = result.get("paper") or {}
    rows = []
    for label, e in result["variants"].items():
        errs = ", ".join(f"{100 * r['final_test_err']:.2f}" for r in e["runs"].values())
        rows.append(
            [
                label,
                f"{100 * e['mean_test_err']:.2f} +- {100 * e['std_test_err']:.2f}",
                errs,
                f"{paper[label]:.2f}" if label in paper else "-",
            ]
        )
    return ["variant", "test error % (mean +- s.d.)", "per seed", "paper %"], rows
