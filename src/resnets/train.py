"""`train(cfg) -> dict`: one training loop, from one CPU to many GPUs.

`_train` reads top to bottom: processes and devices -> run folder and recipe (`_resolve_recipe`)
-> data (`_prepare_data`) -> speed settings -> a `_Run`: the model, optimizer and `RunState` (what
last.ckpt holds, written and restored by one table), `TrainStep` (one optimizer step, callable
alone), the outputs -> epochs of (steps, evaluation, checkpoint, log) -> final files. Only rank 0
writes; `agree` makes every rank take the same decision at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import io
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    atomic_write,
    load_checkpoint,
    load_state,
    save_checkpoint,
    save_model_file,
    validate_checkpoint,
)
from .config import MODEL_FIELDS, RUNTIME_FIELDS, TrainConfig, from_dict
from .data import Augment, load_data
from .errors import CheckpointError, ConfigError, RunStopped, TrainingError
from .evaluate import autocast, evaluate
from .registry import create_model
from .runtime import choose_speed, cpu_name

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_top1",
    "test_loss",
    "test_top1",
    "test_top5",
    "lr",
    "images_per_s",
    "skipped_steps",
    "time_s",
)
# With nonfinite = "skip", this many non-finite steps in a row end the run all the same: it diverged.
MAX_SKIPPED_IN_A_ROW = 20


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step `step` (0-based): a pure function, so resuming needs
    only the step count. A linear warm-up from 0 over `warmup_epochs`, then:
    step: x gamma at each milestone epoch; cosine: half a cosine to 0; onecycle: a straight line
    to 0 (with the warm-up, the triangle of Smith's one-cycle policy); constant."""
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup() * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr * (1 - t)  # onecycle


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict]:
    """Weight decay on conv and linear weights only: BN scales/shifts and biases are
    1-dimensional, and decaying them only fights the normalisation (Goyal et al. 2017)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 or decay_norm_bias else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of the weights and BN statistics. The decay ramps up as
    (1 + n) / (10 + n) over the first updates (as timm), so a short run is not dominated by the
    random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = self.module.state_dict()
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].lerp_(v, 1 - d)
            else:
                ema[k].copy_(v)


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """`init_process_group` from torchrun's environment.

    torchrun shares one key-value store between its rendezvous and the processes it starts, and
    keeps it across restarts; the process group's keys from before a restart are still there and
    the new processes can read the old addresses (connection refused, or a hang). Under a
    restarted torchrun the keys get a prefix per attempt, as every process of an attempt
    restarts together and sees the same count.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    from datetime import timedelta

    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,  # the torchrun agent serves this store
        timeout=timedelta(minutes=10),
    )
    store = dist.PrefixStore(f"resnets/attempt_{restart}", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device} asked for, but torch sees no CUDA device")
        return torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
    return torch.device(cfg.device)


def _data_slug(data: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", data.replace("folder:", "folder-").rstrip("/").split("/")[-1])


def _numbered(base: Path) -> list[Path]:
    """`base`, `base-2`, `base-3`, ... that exist, in order."""
    found = [
        p
        for p in base.parent.glob(f"{base.name}*")
        if p.name == base.name or re.fullmatch(re.escape(base.name) + r"-\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name != base.name else 1)


def resolve_out(cfg: TrainConfig) -> Path:
    """The run folder. Default runs/<model>-<data>: a new run takes the next free number, --resume
    takes the newest. An explicit --out that already holds a run needs --resume."""
    base = Path("runs") / f"{cfg.model}-{_data_slug(cfg.data)}"
    if cfg.out:
        out = Path(cfg.out)
        if not cfg.resume and (out / "last.ckpt").exists():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or another --out")
    elif cfg.resume:
        runs = [p for p in _numbered(base) if (p / "last.ckpt").exists()]
        out = runs[-1] if runs else base
    else:
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    if cfg.resume and not (out / "last.ckpt").exists():
        raise ConfigError(f"nothing to resume: {out / 'last.ckpt'} does not exist")
    check_writable(out)
    return out


def check_writable(out: Path) -> None:
    """Refuse an out folder that cannot be one: a file, or a place where nothing can be
    written (a read-only filesystem, no permission). Writes nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    parent = out
    while not parent.exists():  # the nearest folder that exists is where the first write happens
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only filesystem" if _read_only_fs(parent) else "no permission to write"
        raise ConfigError(f"--out {out}: cannot write in {parent} ({why})")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class FolderLock:
    """An exclusive lock on a run folder for the life of a run: a second `resnets train` on the
    same folder is refused while the first runs. The kernel drops the lock when the process
    ends however it ends, so a crashed run never leaves the folder locked (flock on the folder
    itself: no lock file to clean up)."""

    def __init__(self, folder: Path):
        self.folder, self.fd = folder, None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise ConfigError(
                f"{self.folder} is in use by another resnets train run; wait for it to end or pass another --out"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _write_metrics(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _plot_curves(path: Path, rows: list[dict], title: str) -> None:
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (no window, and no
    # surprise for a notebook that called train()).
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax1.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot(epochs, [r["train_top1"] for r in rows], label="train (augmented)")
    ax2.plot(epochs, [r["test_top1"] for r in rows], label="test")
    ax2.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (`signum` is
    set); a second signal, a second or more later, stops at once with KeyboardInterrupt. Only the
    main thread can install handlers; elsewhere the signals keep their usual effect."""

    def __init__(self, announce: bool):
        self.announce, self.signum, self.first_at, self.previous = announce, 0, 0.0, {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:
            # Ctrl-C under torchrun reaches a worker twice at once (from the terminal and
            # forwarded by torchrun): only a signal that comes later is a second request.
            if time.monotonic() - self.first_at > 1.0:
                raise KeyboardInterrupt
            return
        self.signum, self.first_at = signum, time.monotonic()
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _nonfinite_message(cfg, totals: Totals, step, where, out, saved_step, streak) -> str:
    v = totals.read()
    loss = v["loss_sum"] / max(v["seen"], 1)
    what = (
        f"{streak} steps in a row had a non-finite loss" if streak > 1 else f"the training loss became {loss}"
    )
    kept = (
        f"{out / 'last.ckpt'} keeps the state after step {saved_step}"
        if saved_step is not None
        else "no checkpoint had been written yet"
    )
    hint = (
        f"resume with --resume --nonfinite skip to skip such steps, or start again with a lower --lr (now {cfg.lr})"
        if cfg.nonfinite == "stop"
        else f"start again with a lower --lr (now {cfg.lr})"
    )
    return f"{what} at step {step + 1} ({where}); stopped, {kept}. To go on: {hint}"


def _shape_error(exc: Exception, x: torch.Tensor, model: str) -> Exception:
    """A forward pass that failed on the input's shape, as a `ConfigError` that says what to
    change; any other error as it was."""
    msg = str(exc)
    if "Expected more than 1 value per channel" in msg:
        return ConfigError(
            f"{model} on a batch of {x.shape[0]} images of {x.shape[-2]}x{x.shape[-1]}: a batch-norm "
            "layer sees one value per channel (the feature map is 1x1); use a larger --batch-size "
            "(per process and micro-batch) or larger images"
        )
    if "too small" in msg or "can't be greater than actual input size" in msg:
        first = msg.strip().splitlines()[0]
        return ConfigError(f"{model} cannot take {x.shape[-2]}x{x.shape[-1]} images: {first}")
    return exc


# --- the parts of a run ------------------------------------------------------------------------


class Totals:
    """Sums over the images of a step or an epoch, kept on the device (one sync to read):
    the loss sum, correct top-1 predictions, images seen and skipped steps."""

    NAMES = ("loss_sum", "correct", "seen", "skipped")

    def __init__(self, device: torch.device, values: list[float] | None = None):
        self.tensor = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)
        if values is not None:
            self.tensor += self.tensor.new_tensor(values)

    def add_batch(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = self.tensor.new_tensor(len(y))
        correct = (logits.argmax(1) == y).sum().double()
        self.tensor += torch.stack([loss.detach().double() * n, correct, n, n.new_zeros(())])

    def add(self, other: Totals) -> None:
        self.tensor += other.tensor

    def count_skipped(self) -> None:
        self.tensor[3] += 1

    def all_reduce(self) -> None:
        dist.all_reduce(self.tensor)

    def read(self) -> dict[str, float]:
        return dict(zip(self.NAMES, self.tensor.tolist()))

    @property
    def loss_is_finite(self) -> torch.Tensor:
        return torch.isfinite(self.tensor[0])


def agree(flags: list[float], world: int, device: torch.device) -> list[int]:
    """The maximum of each flag over all processes (every process calls it at the same step), so
    that every rank takes the same decision; with one process, the flags as they are. One small
    all-reduce."""
    if world == 1:
        return [int(f) for f in flags]
    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


class RunState:
    """Everything last.ckpt holds. `state_dict()` and `load_state_dict()` read one table of
    (key, read, restore) entries, so what is written is exactly what is restored."""

    def __init__(self, model: nn.Module, optimizer, scaler, ema: EMA | None, device: torch.device):
        self.model, self.optimizer, self.scaler, self.ema, self.device = model, optimizer, scaler, ema, device
        self.epoch = 0  # whole epochs done
        self.step = 0  # optimizer steps done
        self.epoch_step = 0  # > 0: steps done of the next epoch (a checkpoint inside an epoch)
        self.epoch_sums = [0.0] * len(Totals.NAMES)  # that partial epoch's totals, over all ranks
        self.epoch_train_s = 0.0  # and its training time so far
        self.metrics: list[dict] = []
        self.train_time_s = 0.0
        self.time_s = 0.0

    def _table(self):
        ema = self.ema

        def load_ema(sd):
            if ema is not None:
                load_state(ema.module, sd, "last.ckpt (EMA)")

        def set_ema_updates(n):
            if ema is not None:
                ema.updates = n

        table = [
            ("model", self.model.state_dict, lambda sd: load_state(self.model, sd, "last.ckpt")),
            ("optimizer", self.optimizer.state_dict, self.optimizer.load_state_dict),
            ("scaler", self.scaler.state_dict, self.scaler.load_state_dict),
            ("ema", lambda: ema.module.state_dict() if ema else None, load_ema),
            ("ema_updates", lambda: ema.updates if ema else 0, set_ema_updates),
            ("rng", lambda: _rng_state(self.device), lambda st: _set_rng_state(st, self.device)),
        ]
        for name in (
            "epoch",
            "step",
            "epoch_step",
            "epoch_sums",
            "epoch_train_s",
            "metrics",
            "train_time_s",
            "time_s",
        ):
            table.append((name, lambda n=name: getattr(self, n), lambda v, n=name: setattr(self, n, v)))
        return table

    def state_dict(self) -> dict:
        return {key: read() for key, read, _ in self._table()}

    def load_state_dict(self, state: dict, source: str = "last.ckpt") -> None:
        table = self._table()
        missing = [key for key, _, _ in table if key not in state]
        if missing:
            raise CheckpointError(
                f"{source} lacks {', '.join(missing)}: not a checkpoint of this version of resnets train"
            )
        for key, _, restore in table:
            try:
                restore(state[key])
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # e.g. another model's optimizer
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{source}: its {key} state does not fit this run: {first}") from None


class TrainStep:
    """One optimizer step: forward and backward over a step's micro-batches, then, when every
    process agrees that the loss is finite, the update (and the EMA). Callable alone:

        step = TrainStep(model, optimizer)
        outcome = step([(x, y)], lr=0.1)      # outcome.totals, outcome.finite, outcome.signum
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        net: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        ema: EMA | None = None,
        criterion: Callable | None = None,
        amp: str = "off",
        memory_format: torch.memory_format = torch.contiguous_format,
        world: int = 1,
        name: str = "model",
    ):
        self.model, self.net, self.optimizer = model, net if net is not None else model, optimizer
        self.device = next(model.parameters()).device
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.ema, self.amp, self.memory_format, self.world, self.name = ema, amp, memory_format, world, name
        self.criterion = criterion if criterion is not None else F.cross_entropy

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> Totals:
        """Gradients of the step's mean loss (accumulated over the micro-batches; under DDP
        averaged across processes once, on the last micro-batch), and the step's totals."""
        totals = Totals(self.device)
        for i, (x, y) in enumerate(micro):
            x = x.contiguous(memory_format=self.memory_format)
            skip_sync = self.world > 1 and i < len(micro) - 1
            with self.net.no_sync() if skip_sync else contextlib.nullcontext():
                try:
                    with autocast(self.device, self.amp):
                        logits = self.net(x)
                except (RuntimeError, ValueError) as exc:  # ValueError: BN on one value
                    raise _shape_error(exc, x, self.name) from None
                if logits.dtype in (torch.bfloat16, torch.float16):
                    logits = logits.float()  # the loss in fp32 under autocast
                loss = self.criterion(logits, y)
                self.scaler.scale(loss / len(micro)).backward()
            totals.add_batch(loss, logits, y)
        return totals

    def __call__(self, micro, lr: float, stop_signal: int = 0) -> StepOutcome:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = self.forward_backward(micro)
        # One check per step, before the update: a non-finite loss anywhere, a stop request.
        if self.world > 1:
            bad, signum = agree([float(not totals.loss_is_finite), stop_signal], self.world, self.device)
        else:
            bad, signum = int(not totals.loss_is_finite.item()), stop_signal
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
        return StepOutcome(totals, not bad, signum)


@dataclass
class StepOutcome:
    totals: Totals  # this process's
    finite: bool  # every process's loss was finite, and the update was made
    signum: int  # a stop signal that reached any process (0: none)


class RunLog:
    """metrics.csv (rewritten whole after each epoch) and, with `tensorboard`, event files in the
    run folder: per epoch every column (`epoch/...`), and every `log_every` steps the step's loss,
    lr and images/s (`step/...`), all against the optimizer step. Rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool, log_every: int, purge_step: int | None = None):
        self.out, self.log_every, self.writer = out, log_every, None
        self._last = (None, None)  # (step, time) of the last step point
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            # purge_step: a resumed run drops the points that its previous life logged after the
            # checkpoint (steps > the checkpoint's), so the curves have no doubled stretch.
            self.writer = SummaryWriter(str(out), purge_step=purge_step)

    def step(self, step: int, totals: Totals, lr: float) -> None:
        if self.writer is None or not self.log_every or step % self.log_every:
            return
        v = totals.read()
        now = time.perf_counter()
        prev_step, prev_t = self._last
        if v["seen"]:
            self.writer.add_scalar("step/train_loss", v["loss_sum"] / v["seen"], step)
        self.writer.add_scalar("step/lr", lr, step)
        if prev_step is not None and step > prev_step:
            self.writer.add_scalar("step/images_per_s", v["seen"] * (step - prev_step) / (now - prev_t), step)
        self._last = (step, now)

    def epoch(self, rows: list[dict], step: int) -> None:
        _write_metrics(self.out / "metrics.csv", rows)
        if self.writer is not None:
            # Every point on one axis, the optimizer step, so that a resumed run's purge of what
            # came after its checkpoint applies to all of them alike.
            for k in METRIC_COLUMNS:
                if k != "time_s":
                    self.writer.add_scalar(f"epoch/{k}", rows[-1][k], step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the run ----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    callback: Callable[[dict], None] | None = None,
    *,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train `cfg.model` on `cfg.data` and write the run into its out folder (see `resolve_out`).

    Returns the summary (also written as summary.json). `callback(row)` is called after each
    epoch, once the epoch's checkpoint is on disk, with that epoch's metrics row; `on_step(n)`
    after each optimizer step with the number of steps done. `criterion(logits, labels)` replaces
    the cross-entropy with `cfg.label_smoothing`.
    """
    rank, world, local_rank = _dist_env()
    device = _device(cfg, local_rank)
    started_dist = world > 1 and not dist.is_initialized()
    if started_dist:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _init_process_group("nccl" if device.type == "cuda" else "gloo", rank, world)
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    try:
        return _train(cfg, callback, criterion, on_step, rank, world, device)
    finally:
        torch.use_deterministic_algorithms(prev_deterministic)
        torch.set_num_threads(prev_threads)
        if started_dist:
            dist.destroy_process_group()


def _check_recipe(cfg: TrainConfig, world: int, device: torch.device) -> list[str]:
    """Refuse what cannot run here; return warnings about what runs but is likely not meant."""
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps = {world * cfg.accum_steps}"
        )
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a CUDA device (loss scaling); use amp bf16 on the CPU")
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("sync_bn needs GPUs: torch's SyncBatchNorm has no CPU implementation")
    warnings = []
    late = [m for m in cfg.milestones if m >= cfg.epochs]
    if cfg.schedule == "step" and late:
        warnings.append(
            f"milestones {', '.join(map(str, late))} lie at or past the last epoch ({cfg.epochs}): "
            "the learning rate is never divided there"
        )
    return warnings


def _train(cfg, callback, criterion, on_step, rank: int, world: int, device: torch.device) -> dict:
    main = rank == 0
    cfg, out, ckpt = _resolve_recipe(cfg, world, main)
    warnings = _check_recipe(cfg, world, device)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    cfg, data = _prepare_data(cfg, device, world, main)
    # Speed settings: chosen once, for this device and the whole run, and recorded in the recipe.
    speed = choose_speed(cfg, device, cfg.epochs * data.steps_per_epoch(cfg.batch_size))
    cfg = replace(
        cfg,
        amp=speed.amp,
        channels_last="on" if speed.channels_last else "off",
        compile="on" if speed.compile else "off",
        threads=speed.threads,
    )
    if device.type == "cpu":
        torch.set_num_threads(speed.threads)

    run = _Run(cfg, out, data, speed, device, rank, world, criterion)
    if ckpt is not None:
        run.restore(ckpt)
    with run.outputs(warnings, resumed=ckpt is not None), _StopSignals(announce=main) as signals:
        for epoch in range(run.state.epoch, cfg.epochs):
            row = run.epoch(epoch, signals, on_step)
            if callback is not None:
                callback(row)
            if signals.signum and epoch + 1 < cfg.epochs:
                raise run.stopped(signals.signum)
        # The final files, still under the stop handler: a signal now lets them finish.
        return run.finish(signals)


def _resolve_recipe(cfg: TrainConfig, world: int, main: bool) -> tuple[TrainConfig, Path, dict | None]:
    """The run folder, the checkpoint to resume from (or None) and the recipe that runs: a resumed
    run goes on with the recipe it started with; only how-to-run fields may change."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and not cfg.resume:
        # torchrun restarted the processes after a failure: go on from the run's last checkpoint.
        with contextlib.suppress(ConfigError):
            resolve_out(replace(cfg, resume=True))  # raises when there is nothing to resume yet
            cfg = replace(cfg, resume=True)
    if world > 1:  # rank 0 chooses the folder (numbering depends on what exists) and tells the others
        box = [resolve_out(cfg) if main else None]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    else:
        out = resolve_out(cfg)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(out / "last.ckpt")
        validate_checkpoint(ckpt, out / "last.ckpt")  # a foreign or hand-edited file: one line
        stored = {k: v for k, v in ckpt["config"].items() if k not in RUNTIME_FIELDS}
        cfg = from_dict(
            {**asdict(cfg), **stored, **_stored_runtime(cfg, ckpt["config"])}, f"{out / 'last.ckpt'}"
        )
    return replace(cfg, out=str(out), warmup_epochs=cfg.warmup()), out, ckpt


# How-to-run fields a resumed run keeps from its start unless given again (where its data are,
# how it checkpoints, logs and treats bad steps): all but the run folder and the speed settings,
# which are chosen afresh for the machine it resumes on.
KEPT_ON_RESUME = tuple(
    f for f in RUNTIME_FIELDS if f not in ("out", "resume", "channels_last", "compile", "threads")
)


def _stored_runtime(cfg: TrainConfig, stored: dict) -> dict:
    """The KEPT_ON_RESUME fields of the run's start that `cfg` leaves at their defaults (a field
    given its default value explicitly reads the same). The data folders only while they still
    exist: a moved dataset is looked for at the place given, or the default."""
    keep = {}
    for name in KEPT_ON_RESUME:
        default, was = TrainConfig.__dataclass_fields__[name].default, stored.get(name)
        if getattr(cfg, name) != default or name not in stored or was == default:
            continue
        if name in ("data_dir", "cache_dir") and (was is None or not Path(was).is_dir()):
            continue
        keep[name] = was
    return keep


def _prepare_data(cfg: TrainConfig, device: torch.device, world: int, main: bool):
    """The dataset on `device`, subset as asked, and the recipe with its flip resolved."""
    if world > 1 and not main:
        dist.barrier()  # let rank 0 download and build the cache first, then read what it wrote
    data = load_data(
        cfg.data,
        cfg.data_dir,
        cache_dir=cfg.cache_dir,
        download=cfg.download and main,
        image_size=cfg.image_size,
        workers=cfg.workers,
    )
    if world > 1 and main:
        dist.barrier()
    data = data.subset(cfg.train_subset, cfg.test_subset).to(device)
    if cfg.flip is None:
        cfg = replace(cfg, flip=data.flip_ok)  # the resolved config says what actually ran
    if data.steps_per_epoch(cfg.batch_size) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {data.num_train} training images")
    return cfg, data


class _Run:
    """One training run once its recipe, data and speed settings are resolved: the model, its
    `RunState` and `TrainStep`, and the run's outputs. `epoch()` trains and evaluates one epoch,
    `snapshot()` writes last.ckpt at the state's position, `finish()` the final files."""

    def __init__(self, cfg, out: Path, data, speed, device: torch.device, rank: int, world: int, criterion):
        self.cfg, self.out, self.data, self.speed, self.device = cfg, out, data, speed, device
        self.rank, self.world, self.main = rank, world, rank == 0
        self.augment = Augment(cfg.padding, cfg.pad_mode, cfg.flip, cfg.cutout)
        self.steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
        self.data_info = {
            "data": cfg.data,
            "classes": data.classes,
            "mean": list(data.mean),
            "std": list(data.std),
            "image_size": data.image_size,
        }
        self.fmt = torch.channels_last if speed.channels_last else torch.contiguous_format

        torch.manual_seed(cfg.seed)
        overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS if getattr(cfg, k) not in (None, False, 0, 0.0)}
        try:
            model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.channels, **overrides)
        except (TypeError, ValueError) as exc:  # an override the network does not use, a bad value
            raise ConfigError(str(exc).splitlines()[0]) from None
        model = model.to(device, memory_format=self.fmt)
        if cfg.sync_bn and world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = torch.optim.SGD(
            param_groups(model, cfg.weight_decay, cfg.wd_norm_bias),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.model, self.eval_model = model, self.ema.module if self.ema is not None else model
        self.state = RunState(model, optimizer, scaler, self.ema, device)
        self.n_params = sum(p.numel() for p in model.parameters())

        net = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        if speed.compile:
            # On a machine with a CUDA toolkit but no GPU, inductor's import of cpp_extension logs a
            # warning that says nothing about the run.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            net = torch.compile(net)
        self.step = TrainStep(
            model,
            optimizer,
            net=net,
            scaler=scaler,
            ema=self.ema,
            criterion=criterion or functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing),
            amp=cfg.amp,
            memory_format=self.fmt,
            world=world,
            name=cfg.model,
        )
        self.log: RunLog | None = None
        self.saved_step: int | None = None  # the step last.ckpt holds (None: none written yet)
        self.first_step_s: float | None = None
        self.bad_streak = 0  # non-finite steps in a row
        self.t_start = time.perf_counter()

    def restore(self, ckpt: dict) -> None:
        self.state.load_state_dict(ckpt, str(self.out / "last.ckpt"))
        self.saved_step = self.state.step
        self.t_start = time.perf_counter() - self.state.time_s

    @contextlib.contextmanager
    def outputs(self, warnings: list[str], resumed: bool):
        """The first writes (everything before has been checked), held for the run: the folder
        and its lock, config.toml, the log. Rank 0 only; the others hold nothing."""
        cfg, out = self.cfg, self.out
        with contextlib.ExitStack() as held:
            if self.main:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(f"cannot create --out {out}: {exc.strerror or exc}") from None
                if os.name == "posix":
                    held.enter_context(FolderLock(out))
                if not resumed and (out / "last.ckpt").exists():  # another run got there first
                    raise ConfigError(
                        f"{out} already holds a run; pass --resume to continue it or another --out"
                    )
                # The resolved recipe, without where this run lives: `--config` on it trains the same
                # thing again into a new folder.
                recipe = replace(cfg, out=None, resume=False).to_toml()
                atomic_write(out / "config.toml", lambda f: f.write(recipe.encode()))
                self.log = RunLog(
                    out, cfg.tensorboard, cfg.log_every, self.state.step + 1 if resumed else None
                )
                held.callback(self.log.close)
                for w in warnings:
                    print(f"warning: {w}", file=sys.stderr, flush=True)
                print(
                    f"{cfg.model} ({self.n_params / 1e6:.2f}M params) on {cfg.data}: {self.data.num_train} train / "
                    f"{self.data.num_test} test images, {self.steps_per_epoch} steps of {cfg.batch_size} per epoch, "
                    f"{self.world} x {self.device.type}"
                    + (f", resuming after epoch {self.state.epoch}" if resumed else "")
                    + f" -> {out}",
                    flush=True,
                )
                print(self.speed.line(), flush=True)
            yield

    def snapshot(self, epoch_totals: Totals, epoch_s: float) -> None:
        """Write last.ckpt at the state's position. Collective under DDP inside an epoch (every
        rank calls it at the same step); rank 0 writes."""
        state = self.state
        if state.epoch_step:
            sums = Totals(self.device, epoch_totals.tensor.tolist())
            if self.world > 1:
                sums.all_reduce()  # the partial epoch's totals over all ranks
            state.epoch_sums, state.epoch_train_s = sums.tensor.tolist(), epoch_s
        else:
            state.epoch_sums, state.epoch_train_s = [0.0] * len(Totals.NAMES), 0.0
        state.time_s = time.perf_counter() - self.t_start
        if self.main:
            extra = {
                "model_name": self.cfg.model,
                "spec": asdict(self.model.spec),
                "config": asdict(self.cfg),
            }
            save_checkpoint(
                self.out / "last.ckpt", {**state.state_dict(), **extra, "data_info": self.data_info}
            )
        self.saved_step = state.step

    def stopped(self, signum: int) -> RunStopped:
        state, out = self.state, self.out
        where = (
            f"epoch {state.epoch + 1}, step {state.epoch_step} of {self.steps_per_epoch}"
            if state.epoch_step
            else f"end of epoch {state.epoch}"
        )
        return RunStopped(
            f"stopped by {signal.Signals(signum).name} after step {state.step} ({where}); {out / 'last.ckpt'} "
            "holds it.",
            signum,
            str(out),
        )

    def epoch(self, epoch: int, signals: _StopSignals, on_step) -> dict:
        """Train one epoch (from a resumed position inside it, if any), evaluate, checkpoint and
        log it; return its metrics row."""
        from tqdm import tqdm

        cfg, state, steps = self.cfg, self.state, self.steps_per_epoch
        self.model.train()
        first = state.epoch_step  # > 0: resumed inside this epoch
        t_begin = time.perf_counter()
        t0 = t_begin - state.epoch_train_s  # the epoch's start, resumed or not
        # A resumed partial epoch's totals (over all ranks) sit on rank 0.
        totals = Totals(self.device, state.epoch_sums if first and self.main else None)
        seen0 = totals.read()["seen"]
        # A bar on a terminal; --quiet or a log file gets one line per epoch instead.
        bar_shown = not cfg.quiet and sys.stderr.isatty()
        with tqdm(
            total=steps,
            initial=first,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not bar_shown or not self.main,
            dynamic_ncols=True,
            file=sys.stderr,
        ) as bar:
            batches = self.data.train_batches(
                epoch,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                augment=self.augment,
                rank=self.rank,
                world=self.world,
                accum=cfg.accum_steps,
                start=first,
            )
            lr = cfg.lr
            for epoch_step, micro in enumerate(batches, start=first + 1):
                lr = lr_at(state.step, cfg, steps)
                t_step = time.perf_counter()
                outcome = self.step(micro, lr, signals.signum)
                if self.first_step_s is None:
                    self.first_step_s = time.perf_counter() - t_step
                self._count(outcome, totals, epoch, epoch_step)
                state.step += 1
                state.epoch_step = epoch_step % steps
                if on_step is not None:
                    on_step(state.step)
                if self.log is not None:
                    self.log.step(state.step, outcome.totals, lr)
                if not bar.disable and (epoch_step % 5 == 0 or epoch_step == steps):
                    v = totals.read()  # a device sync, so only every few steps
                    rate = (v["seen"] - seen0) * self.world / max(time.perf_counter() - t_begin, 1e-9)
                    if v["seen"]:
                        bar.set_postfix(
                            loss=f"{v['loss_sum'] / v['seen']:.3f}",
                            acc=f"{v['correct'] / v['seen']:.3f}",
                            img_s=f"{rate:.0f}",
                        )
                bar.update(1)
                if epoch_step < steps and (
                    outcome.signum or (cfg.ckpt_every and state.step % cfg.ckpt_every == 0)
                ):
                    self.snapshot(totals, time.perf_counter() - t0)
                    if outcome.signum:
                        raise self.stopped(outcome.signum)

            # --- end of the epoch: evaluate, checkpoint, log -------------------------------------
            if self.world > 1:
                totals.all_reduce()
            epoch_train_s = time.perf_counter() - t0
            state.train_time_s += epoch_train_s
            v = totals.read()
            if not v["seen"]:
                raise TrainingError(f"every step of epoch {epoch + 1} had a non-finite loss; stopped")
            test = evaluate(
                self.eval_model,
                self.data,
                tta=cfg.tta,
                batch_size=cfg.eval_batch_size,
                amp=cfg.amp,
                memory_format=self.fmt,
            )
            row = _epoch_row(epoch + 1, v, test, lr, epoch_train_s, time.perf_counter() - self.t_start)
            state.metrics.append(row)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                acc=f"{row['train_top1']:.3f}",
                test=f"{row['test_top1']:.4f}",
            )
        state.epoch, state.epoch_step = epoch + 1, 0
        self.snapshot(totals, 0.0)
        if self.log is not None:
            self.log.epoch(state.metrics, state.step)
            if not bar_shown:
                print(_epoch_line(row, cfg.epochs), flush=True)
        return row

    def _count(self, outcome: StepOutcome, totals: Totals, epoch: int, epoch_step: int) -> None:
        """Add a step's totals, or count it skipped; a non-finite step ends the run unless the
        recipe skips them (and then a long streak of them ends it)."""
        if outcome.finite:
            self.bad_streak = 0
            totals.add(outcome.totals)
            return
        self.bad_streak += 1
        if self.cfg.nonfinite == "stop" or self.bad_streak > MAX_SKIPPED_IN_A_ROW:
            where = f"epoch {epoch + 1}, step {epoch_step} of {self.steps_per_epoch}"
            raise TrainingError(
                _nonfinite_message(
                    self.cfg,
                    outcome.totals,
                    self.state.step,
                    where,
                    self.out,
                    self.saved_step,
                    self.bad_streak,
                )
            )
        totals.count_skipped()

    def finish(self, signals: _StopSignals) -> dict:
        """model.safetensors, curves.png and summary.json; returns the summary."""
        cfg, out, rows = self.cfg, self.out, self.state.metrics
        summary = _summary(
            cfg,
            self.state,
            self.steps_per_epoch,
            self.n_params,
            self.ema is not None,
            self.speed,
            self.first_step_s,
            f"{self.world} x {_device_name(self.device)}",
            out,
        )
        if self.main:
            last, best = rows[-1], max(rows, key=lambda r: r["test_top1"])
            save_model_file(out / "model.safetensors", self.eval_model, self.data_info)
            _plot_curves(out / "curves.png", rows, f"{cfg.model} on {cfg.data}")
            atomic_write(
                out / "summary.json", lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode())
            )
            print(
                f"test top-1 {last['test_top1']:.4f} (best {best['test_top1']:.4f} at epoch {best['epoch']}), "
                f"{last['time_s']:.0f} s; wrote {out}",
                flush=True,
            )
            if signals.signum:
                print(
                    f"{signal.Signals(signals.signum).name} arrived during the final writes; they are done "
                    "and the run is complete",
                    file=sys.stderr,
                    flush=True,
                )
        return summary


def _epoch_row(epoch: int, v: dict, test: dict, lr: float, train_s: float, time_s: float) -> dict:
    """One line of metrics.csv: the epoch's training totals `v`, its evaluation `test`."""
    return {
        "epoch": epoch,
        "train_loss": round(v["loss_sum"] / v["seen"], 6),
        "train_top1": round(v["correct"] / v["seen"], 6),
        "test_loss": round(test["loss"], 6),
        "test_top1": round(test["top1"], 6),
        "test_top5": round(test["top5"], 6),
        "lr": round(lr, 8),
        "images_per_s": round(v["seen"] / train_s, 1),
        "skipped_steps": int(v["skipped"]),
        "time_s": round(time_s, 2),
    }


def _epoch_line(row: dict, epochs: int) -> str:
    """The epoch's line of a run without a progress bar (--quiet, or not on a terminal)."""
    return (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_top1']:.4f}"
        f"  test loss {row['test_loss']:.4f} top1 {row['test_top1']:.4f} top5 {row['test_top5']:.4f}"
        f"  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['time_s']:.1f} s"
        + (f"  {row['skipped_steps']} steps skipped" if row["skipped_steps"] else "")
    )


def _summary(
    cfg,
    state: RunState,
    steps_per_epoch: int,
    n_params: int,
    ema: bool,
    speed,
    first_step_s,
    device: str,
    out: Path,
) -> dict:
    """summary.json: the last and the best epoch, the run's speed and where it ran."""
    rows = state.metrics
    last, best = rows[-1], max(rows, key=lambda r: r["test_top1"])
    return {
        "model": cfg.model,
        "data": cfg.data,
        "epochs": cfg.epochs,
        "test_top1": last["test_top1"],
        "test_top5": last["test_top5"],
        "test_loss": last["test_loss"],
        "best_test_top1": best["test_top1"],
        "best_epoch": best["epoch"],
        "train_loss": last["train_loss"],
        "train_top1": last["train_top1"],
        "time_s": last["time_s"],
        "train_images_per_s": round(len(rows) * steps_per_epoch * cfg.batch_size / state.train_time_s, 1),
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in rows),
        "params": n_params,
        "ema": ema,
        "tta": cfg.tta,
        "speed": speed.as_dict(),
        "first_step_s": round(first_step_s, 3) if first_step_s is not None else None,
        "device": device,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "out": str(out),
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
