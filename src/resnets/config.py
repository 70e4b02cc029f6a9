"""The training recipe: a frozen dataclass, read from a TOML file, then overridden by --flags.

Every field is a recipe key and a flag (`batch_size` <-> `--batch-size`). Unknown keys, wrong
types and values out of range raise `ConfigError` with the key named.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEDULES = ("step", "cosine", "onecycle", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
# Speed settings that change how fast a run goes, not what it learns: auto (chosen for the device
# and the run at its start), on or off. A recipe may also write true/false.
TRISTATE = ("auto", "on", "off")
TRISTATE_FIELDS = ("channels_last", "compile")
# compile = auto compiles a run of at least this many optimizer steps: compiling resnet20 takes about
# 35 s on a 2-core CPU and saves about 20 ms a step at batch 128, so it pays after about 1,600 steps
# (benchmarks/train_speed.py measures both).
COMPILE_MIN_STEPS = 2000
PAD_MODES = ("zeros", "reflect")
# Fields that say how to run, not what to train: they may differ when a run is resumed.
RUNTIME_FIELDS = (
    "out",
    "resume",
    "quiet",
    "workers",
    "eval_batch_size",
    "data_dir",
    "cache_dir",
    "download",
    "ckpt_every",
    "nonfinite",
    "channels_last",
    "compile",
    "threads",
    "tensorboard",
    "log_every",
)
NONFINITE = ("stop", "skip")
# Fields applied on top of the registered model's spec (`create_model(model, **those set)`).
MODEL_FIELDS = ("dropout", "drop_path", "zero_init_last", "unit", "shortcut")
# Bounds beyond which a value is a typo, not a recipe: a learning rate over 1000 diverges in the
# first step, and seeds beyond 32 bits overflow the per-epoch generator seeds derived from them.
MAX_LR = 1000.0
MAX_SEED = 2**32 - 1
MAX_WORKERS = 256  # DataLoader processes


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the no-argument run: resnet20 on the digits, which
    reaches >= 95% held-out accuracy in under two minutes on 2 CPU cores."""

    # what to train on
    model: str = _f("resnet20", "registered model name (`resnets list`)")
    data: str = _f("digits", "digits, cifar10, cifar100 or folder:DIR")
    data_dir: str = _f(
        "data", "where cifar10/cifar100 live (python batches or train/ and test/ image folders)"
    )
    cache_dir: str | None = _f(None, "where decoded datasets are cached (default: next to the data)")
    download: bool = _f(True, "download cifar10/cifar100 when absent")
    train_subset: int = _f(0, "train on a fixed random subset of this many images (0 = all)")
    test_subset: int = _f(0, "evaluate on a fixed random subset of this many images (0 = all)")
    image_size: int = _f(224, "folder: training crop size")
    workers: int = _f(4, "folder: DataLoader worker processes")
    # model options (applied on top of the registered spec)
    dropout: float = _f(0.0, "dropout between the convs of wide blocks (WRN)")
    drop_path: float = _f(0.0, "stochastic depth rate at the last block")
    zero_init_last: bool = _f(False, "start every residual branch at zero")
    unit: str | None = _f(
        None,
        "basic-block unit (He et al. 2016, Fig. 4): original, bn_after_add, relu_before_add, "
        "relu_only_preact or full_preact (default: the model's own)",
    )
    shortcut: str | None = _f(
        None, "shortcut where the shape changes: A, B, C, avgdown or maxpool (default: the model's own)"
    )
    # optimisation
    epochs: int = _f(12, "training epochs")
    batch_size: int = _f(64, "images per optimizer step, over all processes")
    accum_steps: int = _f(1, "split each step into this many micro-batches (gradient accumulation)")
    lr: float = _f(0.2, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    wd_norm_bias: bool = _f(False, "also decay BN weights and biases (the papers' code did)")
    schedule: str = _f("onecycle", "step, cosine, onecycle or constant")
    warmup_epochs: float | None = _f(
        None, "linear warm-up from 0 (onecycle: the rising half); default a quarter of the run, at most 3"
    )
    milestones: tuple[int, ...] = _f((), "step schedule: epochs at which lr is multiplied by gamma")
    gamma: float = _f(0.1, "step schedule factor")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy")
    ema_decay: float = _f(0.0, "exponential moving average of the weights (0 = off, e.g. 0.999)")
    # augmentation and evaluation
    padding: int = _f(4, "random crop after padding by this many pixels (0 = off)")
    pad_mode: str = _f("zeros", "zeros or reflect")
    flip: bool | None = _f(None, "random horizontal flip (default: where the dataset allows it)")
    cutout: int = _f(0, "cutout square side in pixels (0 = off)")
    tta: bool = _f(False, "evaluate on the image and its mirror image")
    eval_batch_size: int = _f(500, "evaluation batch size")
    # how to run
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    amp: str = _f(
        "auto",
        "mixed precision: auto (bf16 where the CPU or GPU has native bf16, else off), off, bf16, "
        "or fp16 (GPU, with loss scaling)",
    )
    channels_last: str = _f("auto", "NHWC memory layout: auto (on), on or off")
    compile: str = _f(
        "auto",
        f"torch.compile the model: auto (when the run has >= {COMPILE_MIN_STEPS} steps and a compiler exists), on or off",
    )
    threads: int = _f(0, "CPU threads per process (0 = the physical cores shared out over local processes)")
    deterministic: bool = _f(False, "deterministic kernels (bit-exact reruns and resumes)")
    sync_bn: bool = _f(False, "synchronise batch norm across processes (GPU)")
    seed: int = _f(0, "random seed (initialisation, data order, augmentation)")
    out: str | None = _f(None, "output folder (default: runs/<model>-<data>, numbered if taken)")
    resume: bool = _f(False, "continue the run in --out from its last.ckpt")
    ckpt_every: int = _f(0, "also write last.ckpt every this many steps within an epoch (0 = at epoch ends)")
    nonfinite: str = _f(
        "stop", "on a NaN or infinite loss: stop (last.ckpt keeps the last good state) or skip the step"
    )
    quiet: bool = _f(False, "one line per epoch instead of a progress bar")
    tensorboard: bool = _f(False, "also write TensorBoard event files into the run folder")
    log_every: int = _f(
        50, "TensorBoard: a point every this many steps besides each epoch's (0 = epochs only)"
    )

    def __post_init__(self):
        _check_types(self)
        for name, t in field_types().items():
            value = getattr(self, name)
            if t is float and value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        positive = ("epochs", "batch_size", "accum_steps", "image_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "train_subset",
            "test_subset",
            "workers",
            "padding",
            "cutout",
            "weight_decay",
            "warmup_epochs",
            "ckpt_every",
            "threads",
            "log_every",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.workers > MAX_WORKERS:
            raise ConfigError(f"workers must be at most {MAX_WORKERS}, got {self.workers}")
        for name in ("momentum", "label_smoothing", "ema_decay", "dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (0 < self.lr <= MAX_LR):
            raise ConfigError(f"lr must be a positive number of at most {MAX_LR:g}, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if self.gamma <= 0:
            raise ConfigError(f"gamma must be positive, got {self.gamma}")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("amp", AMP_MODES),
            ("pad_mode", PAD_MODES),
            ("nonfinite", NONFINITE),
            *((name, TRISTATE) for name in TRISTATE_FIELDS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}"
            )
        if self.schedule == "step" and not self.milestones:
            raise ConfigError("the step schedule needs milestones, e.g. milestones = [82, 123]")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ConfigError(f"milestones must be increasing positive epochs, got {list(self.milestones)}")
        if (
            self.warmup_epochs is not None
            and self.warmup_epochs >= self.epochs
            and self.schedule != "constant"
        ):
            raise ConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs})"
            )

    def warmup(self) -> float:
        """The warm-up in epochs: as set, or, when unset, a quarter of the run and at most 3 epochs
        (so `--epochs 1` warms up over a quarter of its one epoch)."""
        return self.warmup_epochs if self.warmup_epochs is not None else min(3.0, self.epochs / 4)

    def to_toml(self) -> str:
        """The config as TOML (unset optional fields are left out, as TOML has no null)."""
        lines = [f"{k} = {_toml_value(v)}" for k, v in asdict(self).items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is
    (JSON's escapes would write characters outside the BMP as surrogate pairs, which TOML refuses)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


@functools.cache  # the dataclass never changes; get_type_hints is not cheap
def field_types() -> dict[str, object]:
    """Field name -> its type (`int`, `float`, `str`, `bool`, `tuple`), optional types unwrapped."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, t in hints.items():
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[name] = tuple if typing.get_origin(t) is tuple else (args[0] if args else t)
    return out


def _check_types(cfg: TrainConfig) -> None:
    optional = {f.name for f in fields(TrainConfig) if f.default is None}
    for name, t in field_types().items():
        v = getattr(cfg, name)
        if v is None and name in optional:
            continue
        ok = {
            bool: isinstance(v, bool),
            int: isinstance(v, int) and not isinstance(v, bool),
            float: isinstance(v, (int, float)) and not isinstance(v, bool),
            # Lone surrogates: undecodable bytes of a command-line argument; not writable as UTF-8.
            str: isinstance(v, str) and not any("\ud800" <= c <= "\udfff" for c in v),
            tuple: isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        }[t]
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "valid text"}
            raise ConfigError(f"{name} must be {kind.get(t, 'a list of integers')}, got {v!r}")


def from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A config from plain values (a TOML table, flags, a checkpoint); unknown keys are errors."""
    valid = [f.name for f in fields(TrainConfig)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, valid, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown key {k!r} in {source}{hint}")
    values = dict(values)
    for k, v in values.items():
        if field_types()[k] is tuple and isinstance(v, list):
            values[k] = tuple(v)
        elif field_types()[k] is float and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
        elif k in TRISTATE_FIELDS and isinstance(v, bool):
            values[k] = "on" if v else "off"
    try:
        return TrainConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist (see configs/ for the shipped ones)") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the recipe at `path`, then `overrides` (the flags given on the command line)."""
    values = read_toml(path) if path else {}
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{path}: tables are not part of a recipe ([{nested[0]}]); use plain keys")
    cfg = from_dict(values, str(path) if path else "config")
    if overrides:
        cfg = from_dict(
            {**{k: v for k, v in asdict(cfg).items() if v is not None}, **overrides}, "command line"
        )
    return cfg


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


_int_list.__name__ = "integer list"  # argparse names the type in its error: "invalid integer list value"


def add_config_arguments(parser) -> None:
    """One flag per field (`batch_size` -> `--batch-size`). Defaults are suppressed, so the parsed
    namespace holds only the flags actually given: those override the recipe."""
    import argparse

    types = field_types()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = types[f.name]
        default = "unset" if f.default is None else f.default
        help = f"{f.metadata['help']} [{default}]"
        if f.name in TRISTATE_FIELDS:
            parser.add_argument(
                flag, nargs="?", const="on", choices=TRISTATE, default=argparse.SUPPRESS, help=help
            )
            parser.add_argument(
                "--no-" + flag[2:],
                dest=f.name,
                action="store_const",
                const="off",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        elif t is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help
            )
        elif t is tuple:
            parser.add_argument(flag, type=_int_list, default=argparse.SUPPRESS, metavar="N,N", help=help)
        else:
            parser.add_argument(
                flag, type=t, default=argparse.SUPPRESS, metavar=t.__name__.upper(), help=help
            )


def given_fields(namespace) -> dict:
    """The config fields present in an argparse namespace built by `add_config_arguments`."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(namespace).items() if k in names}
