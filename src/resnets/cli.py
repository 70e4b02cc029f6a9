"""`resnets <command>`: one parser function and one command function per command.

A user mistake prints one line starting with `error:` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from .errors import RunStopped
from .registry import UnknownModelError, get_entry, list_models


class UserError(Exception):
    """A mistake of the user's: reported as one `error:` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UserError(f"{message} (see `{self.prog} --help`)")


# Largest square input a command builds an example of: 8192^2 RGB float32 is already 0.8 GB.
MAX_INPUT_SIZE = 8192
MAX_WORKERS = 256


def parse_device(text: str, flag: str = "--device") -> str:
    """`text` if it names a device this machine has (cpu, cuda, cuda:N), else a UserError; checked
    before anything runs, so a typo costs nothing."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag} {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu" and dev.index in (None, 0):
        return text
    if dev.type != "cuda":
        raise UserError(f"{flag} {text!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {text!r}: torch sees no CUDA device on this machine")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise UserError(f"{flag} {text!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return text


def check_input_size(size: int | None, flag: str = "--input-size") -> None:
    if size is not None and size < 1:
        raise UserError(f"{flag} must be positive, got {size}")
    if size is not None and size > MAX_INPUT_SIZE:
        raise UserError(f"{flag} must be at most {MAX_INPUT_SIZE}, got {size}")


def _not_writable(folder: str) -> str | None:
    """Why `folder` cannot be written to, or None."""
    import os

    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except OSError:
        pass
    return None if os.access(folder, os.W_OK) else "is not writable"


def check_output_file(path: str, flag: str) -> None:
    """A file the command will write: its folder must exist and be writable, and it must not be
    a folder itself. Checked before the work that produces it."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; name the file to write")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    why = _not_writable(folder)
    if why:
        raise UserError(f"{flag} {path}: the folder {folder} {why}")


def check_output_folder(path: str, flag: str) -> None:
    """A folder the command will create or write into: not a file, and writable where it exists
    (or where its nearest existing parent is)."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    why = _not_writable(existing)
    if why:
        raise UserError(f"{flag} {path}: {existing} {why}")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --- list -------------------------------------------------------------------------------------


def add_list_parser(sub) -> None:
    p = sub.add_parser("list", help="registered models with their counts and the paper's")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_list)


def model_rows(pattern: str) -> list[dict]:
    from .registry import model_counts

    rows = []
    for name in list_models(pattern):
        e = get_entry(name)
        params, macs = model_counts(name)  # shipped with the package: no counting
        rows.append(
            {
                "name": name,
                "family": e.family,
                "input_size": e.input_size,
                "num_classes": e.spec.num_classes,
                "params": params,
                "gmacs": round(macs / 1e9, 4),
                "paper_params_m": e.paper.params_m,
                "paper_gmacs": e.paper.gmacs,
                "source": e.paper.source,
                "note": e.paper.note,
            }
        )
    return rows


def cmd_list(args) -> int:
    if not any(c in args.pattern for c in "*?["):
        get_entry(args.pattern)  # an exact name: unknown names get suggestions
    rows = model_rows(args.pattern)
    if not rows:
        raise UserError(f"no model matches {args.pattern!r}; `resnets list` shows them all")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [
        [
            r["name"],
            r["family"],
            r["input_size"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['gmacs']:.3f}",
            _fmt(r["paper_params_m"]),
            _fmt(r["paper_gmacs"]),
            r["source"][:48],
            r["note"][:60],
        ]
        for r in rows
    ]
    header = [
        "name",
        "family",
        "input",
        "params_m",
        "gmacs",
        "paper_params_m",
        "paper_gmacs",
        "source",
        "note",
    ]
    print(_table(table, header))
    return 0


# --- info -------------------------------------------------------------------------------------


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="per-stage output shape, parameters and multiply-adds of one model")
    p.add_argument("name")
    p.add_argument("--input-size", type=int, default=None, help="square input size (default: the paper's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .complexity import stage_table

    entry = get_entry(args.name)
    size = entry.input_size if args.input_size is None else args.input_size
    check_input_size(size)
    try:
        rows = stage_table(args.name, size)
    except RuntimeError as exc:  # e.g. an input too small for the network's strides
        raise UserError(
            f"{args.name} cannot run on {size}x{size} input: {str(exc).splitlines()[0]}"
        ) from None
    total = {"params": sum(r["params"] for r in rows), "macs": sum(r["macs"] for r in rows)}
    if args.json:
        out = {"name": args.name, "family": entry.family, "input_size": size, "stages": rows, "total": total}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.name} ({entry.family}) at {size}x{size}, {entry.paper.cite}")
    table = [
        [r["part"], "x".join(map(str, r["output_shape"])), f"{r['params']:,}", f"{r['macs'] / 1e9:.4f}"]
        for r in rows
    ]
    table.append(["total", "", f"{total['params']:,}", f"{total['macs'] / 1e9:.4f}"])
    print(_table(table, ["part", "output (CxHxW)", "params", "gmacs"]))
    if entry.paper.note:
        print(f"note: {entry.paper.note}")
    return 0


# --- train ------------------------------------------------------------------------------------


def add_train_parser(sub) -> None:
    from .config import add_config_arguments

    p = sub.add_parser(
        "train",
        help="train a model; with no arguments resnet20 on the digits (about two minutes on a CPU)",
        description="Train from a TOML recipe (--config) and flags; a flag overrides the recipe. "
        "Writes config.toml, metrics.csv, last.ckpt, model.safetensors, curves.png and summary.json "
        "into --out. Under torchrun every process trains its shard (DistributedDataParallel).",
    )
    p.add_argument("--config", metavar="RECIPE.toml", help="a recipe, e.g. configs/cifar10_resnet56.toml")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .config import RUNTIME_FIELDS, given_fields, load_config
    from .errors import ResnetsError, RunStopped
    from .train import train

    flags = given_fields(args)
    if flags.get("resume"):
        fixed = [k for k in flags if k not in RUNTIME_FIELDS]
        if args.config or fixed:
            what = "--config" if args.config else "--" + fixed[0].replace("_", "-")
            raise UserError(f"--resume continues a run with its own recipe; {what} cannot change it")
    try:
        train(load_config(args.config, flags))
    except ResnetsError as exc:
        raise UserError(str(exc)) from None
    except RunStopped as stop:  # SIGINT / SIGTERM: the checkpoint is written, say how to go on
        print(stop, file=sys.stderr, flush=True)
        return 128 + stop.signum
    return 0


# --- eval -------------------------------------------------------------------------------------


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1, top-5 and loss of a trained model on a test set")
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a run's model.safetensors or last.ckpt"
    )
    p.add_argument("--data", help="digits, cifar10, cifar100 or folder:DIR (default: what it was trained on)")
    p.add_argument("--data-dir", default="data", help="where cifar10/cifar100 live [data]")
    p.add_argument("--cache-dir", default=None, help="where decoded datasets are cached")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror image")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--workers", type=int, default=4, help="folder: DataLoader workers")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_eval)


def check_range(flag: str, value: int, low: int, high: int | None = None) -> None:
    """One `error:` line when an integer flag lies outside [low, high]."""
    if high is None and value < low:
        raise UserError(f"{flag} must be at least {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high}, got {value}")


def cmd_eval(args) -> int:
    from .errors import ResnetsError
    from .evaluate import evaluate_file

    check_range("--batch-size", args.batch_size, 1)
    check_range("--workers", args.workers, 0, MAX_WORKERS)
    parse_device(args.device)
    try:
        r = evaluate_file(
            args.checkpoint,
            args.data,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            tta=args.tta,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
        )
    except ResnetsError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['model']} on {r['data']} ({r['n']} test images{', flip TTA' if r['tta'] else ''}): "
            f"top-1 {r['test_top1']:.4f}  top-5 {r['test_top5']:.4f}  loss {r['test_loss']:.4f}"
        )
    return 0


# --- bench ------------------------------------------------------------------------------------


def add_bench_parser(sub) -> None:
    from .bench import add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="measured latency, images/s and GFLOP/s next to the MACs; --peers: ours/torchvision-timm",
        description="Warm up, then time until the spread is small; --peers times the torchvision / timm "
        "network interleaved with ours, with the same weights where they map.",
    )
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench import BenchError, bench_from_args, format_report

    parse_device(args.device)
    check_input_size(args.input_size)
    if args.plot:  # before the benchmark, not after it
        check_output_file(args.plot, "--plot")
    try:
        report = bench_from_args(args)
    except BenchError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


# --- analyze ----------------------------------------------------------------------------------


def add_analyze_parser(sub) -> None:
    from .analysis.commands import add_study_parsers

    p = sub.add_parser(
        "analyze",
        help="check the papers' claims: signal, receptive-field, shortcut, gradcam, lesion, degradation",
        description="Each study writes <study>.json and <study>.png into --out and prints a table.",
    )
    add_study_parsers(p)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from .analysis.commands import run_study

    return run_study(args)


# --- convert / export -------------------------------------------------------------------------


def add_convert_parser(sub) -> None:
    from .convert import LAYOUTS

    p = sub.add_parser(
        "convert",
        help="convert weights between layouts: ours, torchvision, timm, official iResNet / Res2Net, mmpretrain",
        description="Reads SRC in any supported layout (recognised from its keys, wrappers removed), checks "
        "it against the model and writes DST in the --to layout; DST's extension picks the format "
        "(.safetensors, or .pth/.pt/.bin for a torch.save'd state dict). Only tensors are ever unpickled.",
    )
    p.add_argument("src", help="weights file (.pth, .pt, .bin, .safetensors)")
    p.add_argument("dst", help="output file (.safetensors, .pth, .pt or .bin)")
    p.add_argument("--model", help="registered model name; needed when SRC does not record it")
    p.add_argument("--to", default="resnets", choices=list(LAYOUTS), help="layout of DST [resnets]")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .errors import ResnetsError
    from .weights import convert_file

    check_output_file(args.dst, "DST")
    try:
        r = convert_file(args.src, args.dst, args.model, args.to)
    except ResnetsError as exc:
        raise UserError(str(exc)) from None
    print(f"{r['model']}: {r['tensors']} tensors, {r['from']} -> {r['to']} layout, written to {r['dst']}")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as ONNX, TorchScript or OpenVINO IR, with its preprocessing in the file",
        description="MODEL is a training run (its folder, model.safetensors or last.ckpt: the network, "
        "normalisation, input size and class names come from the file) or a registered name (with "
        "--weights in any supported layout; without, random weights). The file takes any batch and "
        "image size unless --static, carries the preprocessing in its metadata, and is run against "
        "PyTorch on one batch before it is written.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="a training run (folder, .safetensors, .ckpt) or a model name"
    )
    p.add_argument(
        "out", help="output file: *.onnx, *.pt (TorchScript) or *.xml (OpenVINO; its .bin beside it)"
    )
    p.add_argument(
        "--format", choices=["onnx", "torchscript", "openvino"], help="default: from OUT's extension"
    )
    p.add_argument("--weights", metavar="PATH", help="with a model name: weights in any supported layout")
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="example input size (default: the run's, else the paper's)",
    )
    p.add_argument("--static", action="store_true", help="fix batch and image size to the example's")
    p.add_argument("--batch-size", type=int, default=None, help="with --static: the fixed batch [1]")
    p.set_defaults(func=cmd_export)


MAX_EXPORT_BATCH = 4096


def cmd_export(args) -> int:
    from .errors import ResnetsError
    from .export import check_request, export, load_source, output_files

    try:
        fmt = check_request(args.format, args.out, args.static)
    except ResnetsError as exc:
        raise UserError(str(exc)) from None
    check_input_size(args.input_size)
    if args.batch_size is not None and not args.static:
        raise UserError("--batch-size fixes the batch of a --static export; a dynamic one takes any batch")
    if args.batch_size is not None:
        check_range("--batch-size", args.batch_size, 1, MAX_EXPORT_BATCH)
    for path in output_files(args.out, fmt):
        check_output_file(str(path), "OUT")
    try:
        model, prep, kind = load_source(args.model, args.weights)
        r = export(
            model,
            args.out,
            fmt,
            args.input_size,
            preprocessing=prep,
            static=args.static,
            batch_size=args.batch_size or 1,
        )
    except ResnetsError as exc:
        raise UserError(str(exc)) from None
    except (RuntimeError, OSError) as exc:  # e.g. an input too small for the net
        raise UserError(f"cannot export {args.model}: {str(exc).strip().splitlines()[0]}") from None
    name = prep.model or "model"
    shape = " x ".join(map(str, r["input"]))
    print(f"{name}: {fmt} written to {' + '.join(r['files'])} (input {shape}, preprocessing in its metadata)")
    print(
        f"checked with {r['runtime']} on a batch of {'x'.join(map(str, r['checked_on']))}: "
        f"max abs difference from PyTorch {r['max_abs_diff']:.2g}"
    )
    if kind == "random":  # after the work, so that a refusal stays one line
        print(
            f"warning: {name} has random weights (no --weights given); the export only shows the pipeline",
            file=sys.stderr,
        )
    return 0


# --- predict ----------------------------------------------------------------------------------


def add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="the top classes of images from a trained model, prepared as its training run's test images",
        description="Reads the run's model and preprocessing (channels, size, crop, mean/std, class "
        "names) from its file and prints each image's most probable classes. An unreadable image is "
        "reported on stderr and the others are still predicted; the exit code is then 1.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="a training run: its folder, model.safetensors or last.ckpt",
    )
    p.add_argument("--top", type=int, default=5, help="how many classes per image [5]")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line (JSON lines)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass [64]")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--deploy", action="store_true", help="run resnets.deploy(model): BN folded, compiled")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


MAX_PREDICT_BATCH = 65536


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from .errors import ResnetsError
    from .predict import image_files, iter_predictions, load_predictor

    check_range("--top", args.top, 1)
    check_range("--batch-size", args.batch_size, 1, MAX_PREDICT_BATCH)
    parse_device(args.device)
    try:
        model, prep = load_predictor(args.checkpoint, args.device, args.deploy)
    except ResnetsError as exc:
        raise UserError(str(exc)) from None
    files = image_files(args.images)
    k = min(args.top, prep.num_classes)
    image_width = max(len("image"), *map(len, files))
    cell = max(map(len, prep.classes)) + len(" (0.000)")
    if not args.json:
        header = ["image".ljust(image_width), *(f"top-{i + 1}".ljust(cell) for i in range(k))]
        print("  ".join(header).rstrip())
        print("  ".join("-" * len(h) for h in header))
    bar = tqdm(total=len(files), unit="image", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty())
    failed = 0
    for r in iter_predictions(model, prep, files, args.top, args.batch_size, pad=args.deploy):
        bar.update(1)
        if "error" in r:
            failed += 1
            bar.write(f"error: {r['error']}", file=sys.stderr)
        elif args.json:
            bar.write(json.dumps(r), file=sys.stdout)
        else:
            cells = [f"{t['class']} ({t['prob']:.3f})".ljust(cell) for t in r["top"]]
            bar.write("  ".join([r["image"].ljust(image_width), *cells]).rstrip(), file=sys.stdout)
    bar.close()
    if failed:
        print(f"error: {failed} of {len(files)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


# --- main -------------------------------------------------------------------------------------

PARSERS = [
    add_list_parser,
    add_info_parser,
    add_train_parser,
    add_eval_parser,
    add_bench_parser,
    add_analyze_parser,
    add_convert_parser,
    add_export_parser,
    add_predict_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resnets", description="The residual-network family: models, training, analysis.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in PARSERS:
        add(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a write in progress removes its temporary file."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt(command: str | None):
    """Outside `train` (which handles its own signals), SIGTERM unwinds like Ctrl-C instead of
    killing the process where it stands, so no temporary file is left behind."""
    if command == "train" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with _sigterm_as_interrupt(args.command):
            return args.func(args)
    except (UserError, UnknownModelError) as exc:
        # One line, whatever the message quotes (an argument may hold a newline).
        one_line = str(exc).strip().replace("\r", "\\r").replace("\n", "\\n")
        print(f"error: {one_line}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # a study's run, stopped by a signal after writing its checkpoint
        print(f"{stop.where} Run the same command again to continue.", file=sys.stderr)
        return 128 + stop.signum
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`resnets list --json | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
