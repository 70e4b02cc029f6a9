"""`resnets analyze <study>`: one sub-command per study, each printing a short table.

Kept apart from `resnets.cli` so the command line stays one small entry per command; the heavy
imports (matplotlib, the studies) happen only when a study runs.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_OUT = "runs/analysis"
DEFAULT_DATA = "data/cifar10-jpeg"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder for <study>.json and <study>.png (default {DEFAULT_OUT})"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return n


MAX_SIZE = 2048  # the studies hold batches of inputs and every activation of them


def _size(value: str) -> int:
    n = _positive(value)
    if n > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SIZE}, got {value}")
    return n


def _block(value: str) -> tuple[int, int]:
    try:
        stage, index = (int(v) for v in value.split("."))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE.INDEX such as 2.1, got {value!r}") from None
    return stage, index


def add_study_parsers(parser: argparse.ArgumentParser) -> None:
    from ..config import AMP_MODES
    from .degradation_curves import DEFAULT_MODELS as DEGRADATION_MODELS
    from .erf import DEFAULT_MODELS as ERF_MODELS
    from .grad_cam import BLUR_SIGMA, METRIC_IMAGES, STEPS
    from .shortcut_coverage import INPUTS, KINDS
    from .signal_propagation import DEFAULT_MODELS as SIGNAL_MODELS

    sub = parser.add_subparsers(dest="study", required=True, parser_class=type(parser))

    p = sub.add_parser("signal", help="main-path mean / std after every block (iResNet, v2)")
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        help=f"models at initialisation (default: {' '.join(SIGNAL_MODELS)})",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=[],
        help="training runs (folder or model.safetensors): trained and init",
    )
    p.add_argument(
        "--depths",
        nargs="+",
        type=int,
        default=[],
        help="depth sweep: CIFAR v1, v2 and iResNet nets of these depths (6n+2, e.g. 20 56 110 218); "
        "without --model, the sweep replaces the default models",
    )
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--input-size", type=_size, default=None, help="default: each model's own (32 CIFAR, 224)")
    _common(p)

    p = sub.add_parser("receptive-field", help="effective receptive field per stage and per Res2Net split")
    p.add_argument("--model", nargs="+", default=list(ERF_MODELS))
    p.add_argument(
        "--input-size", type=_size, default=None, help="default: each model's own (224 for ImageNet nets)"
    )
    p.add_argument(
        "--num-inputs", type=_positive, default=8, help="random inputs the gradient is averaged over"
    )
    p.add_argument(
        "--split-block",
        type=_block,
        default=(2, 1),
        help="Res2Net block STAGE.INDEX whose splits are measured",
    )
    _common(p)

    p = sub.add_parser("shortcut", help="how much of its input a stride-2 shortcut uses (iResNet)")
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=["B", "maxpool", "avgdown"])
    p.add_argument("--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS))
    p.add_argument(
        "--channels", type=_positive, default=16, help="input channels (the output has twice as many)"
    )
    p.add_argument("--size", type=_size, default=32, help="input height and width (even)")
    p.add_argument("--num-fit", type=_positive, default=128, help="inputs the linear decoder is fitted on")
    p.add_argument("--num-test", type=_positive, default=64, help="held-out inputs it is scored on")
    _common(p)

    p = sub.add_parser("gradcam", help="Grad-CAM overlays, one row per model")
    p.add_argument("--model", nargs="+", default=[], help="registered models (weights at initialisation)")
    p.add_argument("--checkpoint", nargs="+", default=[], help="training runs (folder or model.safetensors)")
    p.add_argument(
        "--image", nargs="+", default=[], help="image files (default: CIFAR test images from --data-dir)"
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA, help=f"CIFAR-10 folder (default {DEFAULT_DATA})")
    p.add_argument("--num-images", type=_positive, default=8, help="images drawn in the figure (default 8)")
    p.add_argument(
        "--stage", type=int, default=-1, help="stage whose output is explained (default: the last)"
    )
    p.add_argument(
        "--metric-images",
        type=_non_negative,
        default=METRIC_IMAGES,
        help=f"test images (drawn at random with --seed) or first files scored by deletion / insertion "
        f"(Petsiuk et al. 2018) against random maps (default {METRIC_IMAGES}; 0 = skip)",
    )
    p.add_argument(
        "--steps",
        type=_positive,
        default=STEPS,
        help=f"steps of each deletion / insertion curve, 1/steps of the pixels each (default {STEPS})",
    )
    p.add_argument(
        "--blur-sigma",
        type=float,
        default=BLUR_SIGMA,
        help=f"Gaussian blur (pixels) of the image insertion starts from (default {BLUR_SIGMA})",
    )
    _common(p)

    p = sub.add_parser(
        "lesion",
        help="accuracy with each residual block removed, and with k random ones at once; "
        "branch / shortcut ratio",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="a training run (folder or model.safetensors); several: compared in one figure",
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA, help=f"CIFAR-10 folder (default {DEFAULT_DATA})")
    p.add_argument(
        "--num-test", type=int, default=1000, help="test images (fixed random subset; 0 = all 10000)"
    )
    p.add_argument(
        "--max-removed",
        type=_non_negative,
        default=3,
        help="remove k = 1..N random identity blocks at once (default 3; 0 = skip)",
    )
    p.add_argument(
        "--samples",
        type=_positive,
        default=20,
        help="random subsets of blocks per k, drawn with --seed (default 20; all if fewer exist)",
    )
    _common(p)

    p = sub.add_parser("degradation", help="train plain and residual nets with one recipe: error vs epochs")
    p.add_argument("--model", nargs="+", default=list(DEGRADATION_MODELS))
    p.add_argument("--data-dir", default=DEFAULT_DATA, help=f"CIFAR-10 folder (default {DEFAULT_DATA})")
    p.add_argument(
        "--full",
        action="store_true",
        help="the paper's recipe: all images, batch 128, 164 epochs, lr / 10 at 82, 123",
    )
    p.add_argument("--epochs", type=_positive, default=None)
    p.add_argument("--train-subset", type=int, default=None, help="training images (0 = all 50000)")
    p.add_argument("--test-subset", type=int, default=None, help="test images (0 = all 10000)")
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument(
        "--lr", type=float, default=None, help="default: 0.1 x batch / 128, the paper's lr per image"
    )
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="mixed precision of the runs (default auto: bf16 where the hardware has it); a run "
        "read back must match unless auto",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=_non_negative,
        default=None,
        help="one study per seed in <out>/seed_<s>, combined in <out> (mean, range); replaces --seed",
    )
    _common(p)

    from .ablation import RECIPE, STUDIES

    p = sub.add_parser(
        "ablation",
        help="train one net with each variant of one part, several seeds: units (v2 Table 2), shortcut (iResNet)",
    )
    p.add_argument(
        "ablation",
        choices=list(STUDIES),
        help="units: the five residual units; shortcut: projection vs max-pool",
    )
    p.add_argument("--model", default=None, help="CIFAR net to vary (default resnet20)")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the variants (default all)")
    p.add_argument("--seeds", nargs="+", type=_non_negative, default=[0, 1, 2], help="default 0 1 2")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help=f"CIFAR-10 folder (default {DEFAULT_DATA})")
    p.add_argument("--full", action="store_true", help="the paper's schedule: 164 epochs, lr / 10 at 82, 123")
    p.add_argument("--epochs", type=_positive, default=None, help=f"default {RECIPE['epochs']} (cosine)")
    p.add_argument("--batch-size", type=_positive, default=None, help=f"default {RECIPE['batch_size']}")
    p.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder for ablation_<study>.json / .png (default {DEFAULT_OUT})"
    )


def _ablation(args: argparse.Namespace) -> dict:
    from .ablation import ablation

    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    return ablation(
        args.ablation,
        args.model,
        args.seeds,
        args.data_dir,
        args.full,
        overrides,
        args.variants,
        args.out,
    )


def _degradation(args: argparse.Namespace) -> dict:
    from .degradation_curves import degradation

    overrides = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("train_subset", args.train_subset),
            ("test_subset", args.test_subset),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            ("amp", args.amp),
        )
        if v is not None
    }
    if args.seeds:
        from .degradation_curves import degradation_seeds

        return degradation_seeds(args.model, args.data_dir, args.full, overrides, args.seeds, args.out)
    return degradation(args.model, args.data_dir, args.full, overrides, args.seed, args.out)


def _signal(args: argparse.Namespace) -> dict:
    from .signal_propagation import DEFAULT_MODELS, signal

    # With checkpoints or a depth sweep, the defaults are not added: the user asked about those nets.
    asked = args.checkpoint or args.depths
    models = args.model if args.model is not None else ([] if asked else list(DEFAULT_MODELS))
    return signal(
        models, args.checkpoint, args.batch_size, args.input_size, args.seed, args.out, depths=args.depths
    )


def _receptive_field(args: argparse.Namespace) -> dict:
    from .erf import receptive_field

    return receptive_field(
        args.model, args.input_size, args.num_inputs, args.split_block, args.seed, args.out
    )


def _shortcut(args: argparse.Namespace) -> dict:
    from .shortcut_coverage import shortcut

    return shortcut(
        args.kinds, args.inputs, args.channels, args.size, args.num_fit, args.num_test, args.seed, args.out
    )


def _gradcam(args: argparse.Namespace) -> dict:
    from .grad_cam import gradcam

    return gradcam(
        args.model,
        args.checkpoint,
        args.image,
        args.data_dir,
        args.num_images,
        args.stage,
        args.seed,
        args.out,
        metric_images=args.metric_images,
        steps=args.steps,
        blur_sigma=args.blur_sigma,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def _lesion(args: argparse.Namespace) -> dict:
    from .lesioning import lesion, lesion_compare

    kw = dict(out_dir=args.out, max_removed=args.max_removed, samples=args.samples, seed=args.seed)
    if len(args.checkpoint) > 1:
        return lesion_compare(args.checkpoint, args.data_dir, args.num_test, **kw)
    return lesion(args.checkpoint[0], args.data_dir, args.num_test, **kw)


# study -> (runner, module whose `table(result)` formats the printout)
STUDIES = {
    "signal": (_signal, "signal_propagation"),
    "receptive-field": (_receptive_field, "erf"),
    "shortcut": (_shortcut, "shortcut_coverage"),
    "gradcam": (_gradcam, "grad_cam"),
    "lesion": (_lesion, "lesioning"),
    "degradation": (_degradation, "degradation_curves"),
    "ablation": (_ablation, "ablation"),
}


def run_study(args: argparse.Namespace) -> int:
    """Run the chosen study, print its table and where the files went."""
    import importlib

    from ..cli import UserError, _table, check_output_folder
    from ..errors import ResnetsError

    check_output_folder(args.out, "--out")
    runner, module = STUDIES[args.study]
    try:
        result = runner(args)
    except ResnetsError as exc:  # StudyError, DataError, CheckpointError: the user can fix them
        raise UserError(str(exc)) from None
    header, rows = importlib.import_module(f"{__package__}.{module}").table(result)
    print(_table(rows, header))
    print(f"wrote {result['files']['json']} and {result['files']['figure']}")
    return 0
