"""`train(cfg) -> dict`: one straight-line training loop, from one CPU to many GPUs.

distributed setup -> data -> model -> optimizer -> lr_at(step) -> resume -> wrap (channels_last,
DDP, compile) -> epochs of (train, evaluate, checkpoint) -> final files. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write, load_checkpoint, load_state, save_checkpoint, save_model_file
from .config import RUNTIME_FIELDS, TrainConfig, from_dict
from .data import Augment, load_data
from .errors import ConfigError, RunStopped, TrainingError
from .evaluate import autocast, evaluate
from .registry import create_model

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
    warm = round(cfg.warmup_epochs * steps_per_epoch)
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
    return out


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


def _nonfinite_message(cfg, part, step, where, out, saved_step, streak) -> str:
    loss = part[0].item() / max(part[2].item(), 1)
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


def train(cfg: TrainConfig, callback: Callable[[dict], None] | None = None) -> dict:
    """Train `cfg.model` on `cfg.data` and write the run into its out folder (see `resolve_out`).

    Returns the summary (also written as summary.json). `callback(row)` is called after each
    epoch, once the epoch's checkpoint is on disk, with that epoch's metrics row.
    """
    # --- processes and devices -----------------------------------------------------------------
    rank, world, local_rank = _dist_env()
    device = _device(cfg, local_rank)
    started_dist = world > 1 and not dist.is_initialized()
    if started_dist:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _init_process_group("nccl" if device.type == "cuda" else "gloo", rank, world)
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, callback, rank, world, device)
    finally:
        torch.use_deterministic_algorithms(prev_deterministic)
        if started_dist:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, callback, rank: int, world: int, device: torch.device) -> dict:
    main = rank == 0
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
    if main and out.is_dir():  # temporary files of a write that a crash cut short
        for tmp in out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    if cfg.resume:
        ckpt = load_checkpoint(out / "last.ckpt")
        # The run goes on with the recipe it started with; only how-to-run fields may change.
        stored = {k: v for k, v in ckpt["config"].items() if k not in RUNTIME_FIELDS}
        cfg = from_dict({**asdict(cfg), **stored}, f"{out / 'last.ckpt'}")
    cfg = replace(cfg, out=str(out))
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps = {world * cfg.accum_steps}"
        )
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a CUDA device (loss scaling); use amp bf16 on the CPU")
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("sync_bn needs GPUs: torch's SyncBatchNorm has no CPU implementation")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic

    # --- data ------------------------------------------------------------------------------------
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
    augment = Augment(cfg.padding, cfg.pad_mode, cfg.flip, cfg.cutout)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {data.num_train} training images")
    data_info = {
        "data": cfg.data,
        "classes": data.classes,
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": data.image_size,
    }

    # --- model, optimizer, state -----------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    overrides = {k: getattr(cfg, k) for k in ("dropout", "drop_path", "zero_init_last") if getattr(cfg, k)}
    model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.channels, **overrides)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.wd_norm_bias),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start_epoch, start_step, step, rows, train_time, run_time = 0, 0, 0, [], 0.0, 0.0
    if ckpt is not None:
        load_state(model, ckpt["model"], "last.ckpt")
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            load_state(ema.module, ckpt["ema"], "last.ckpt (EMA)")
            ema.updates = ckpt["ema_updates"]
        start_epoch, step, rows = ckpt["epoch"], ckpt["step"], ckpt["metrics"]
        start_step = ckpt.get("epoch_step", 0)  # > 0: the checkpoint was written inside an epoch
        train_time, run_time = ckpt["train_time_s"], ckpt["time_s"]
        _set_rng_state(ckpt["rng"], device)
    n_params = sum(p.numel() for p in model.parameters())

    # --- wrap ------------------------------------------------------------------------------------
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    eval_model = ema.module if ema is not None else model

    if main:
        out.mkdir(parents=True, exist_ok=True)
        # The resolved recipe, without where this run lives: `--config` on it trains the same thing
        # again into a new folder.
        recipe = replace(cfg, out=None, resume=False).to_toml()
        atomic_write(out / "config.toml", lambda f: f.write(recipe.encode()))
        print(
            f"{cfg.model} ({n_params / 1e6:.2f}M params) on {cfg.data}: {data.num_train} train / "
            f"{data.num_test} test images, {steps_per_epoch} steps of {cfg.batch_size} per epoch, "
            f"{world} x {device.type}"
            + (f", resuming after epoch {start_epoch}" if ckpt else "")
            + f" -> {out}",
            flush=True,
        )

    # --- loop ------------------------------------------------------------------------------------
    from tqdm import tqdm

    def snapshot(epoch_done: int, epoch_step: int, sums: torch.Tensor, epoch_s: float) -> None:
        """Write last.ckpt: after `epoch_done` whole epochs and `epoch_step` steps of the next.
        Collective under DDP (every rank calls it at the same step); rank 0 writes."""
        nonlocal saved_step
        if epoch_step and world > 1:
            sums = sums.clone()
            dist.all_reduce(sums)  # the partial epoch's totals over all ranks
        if main:
            state = {
                "model": model.state_dict(),
                "ema": ema.module.state_dict() if ema else None,
                "ema_updates": ema.updates if ema else 0,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch_done,
                "step": step,
                "epoch_step": epoch_step,
                "epoch_sums": sums.tolist() if epoch_step else [0.0] * 4,
                "epoch_train_s": epoch_s if epoch_step else 0.0,
                "rng": _rng_state(device),
                "model_name": cfg.model,
                "spec": asdict(model.spec),
                "config": asdict(cfg),
                "data_info": data_info,
                "metrics": rows,
                "train_time_s": train_time,
                "time_s": time.perf_counter() - t_start,
            }
            save_checkpoint(out / "last.ckpt", state)
        saved_step = step

    def stopped(signum: int, epoch: int, epoch_step: int) -> RunStopped:
        where = (
            f"epoch {epoch + 1}, step {epoch_step} of {steps_per_epoch}"
            if epoch_step
            else f"end of epoch {epoch}"
        )
        return RunStopped(
            f"stopped by {signal.Signals(signum).name} after step {step} ({where}); {out / 'last.ckpt'} "
            f"holds it. Resume with: resnets train --out {out} --resume",
            signum,
            str(out),
        )

    t_start = time.perf_counter() - run_time
    saved_step = step if ckpt is not None else None
    bad_streak = 0
    with _StopSignals(announce=main) as signals:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            first = start_step if epoch == start_epoch else 0
            t_begin = time.perf_counter()
            t0 = t_begin - (ckpt["epoch_train_s"] if first else 0.0)  # the epoch's start, resumed or not
            # loss, correct, images, skipped steps; a resumed partial epoch's totals sit on rank 0
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            if first and main:
                sums += sums.new_tensor(ckpt["epoch_sums"])
            seen0 = sums[2].item()
            bar = tqdm(
                total=steps_per_epoch,
                initial=first,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=cfg.quiet or not main,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            batches = data.train_batches(
                epoch,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                augment=augment,
                rank=rank,
                world=world,
                accum=cfg.accum_steps,
                start=first,
            )
            for epoch_step, micro in enumerate(batches, start=first + 1):
                lr = lr_at(step, cfg, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                part = torch.zeros(4, dtype=torch.float64, device=device)
                for i, (x, y) in enumerate(micro):
                    x = x.contiguous(memory_format=fmt)
                    # Gradients are averaged across processes once per step, on the last micro-batch.
                    skip_sync = world > 1 and i < len(micro) - 1
                    with net.no_sync() if skip_sync else contextlib.nullcontext():
                        try:
                            with autocast(device, cfg.amp):
                                logits = net(x)
                        except (RuntimeError, ValueError) as exc:  # ValueError: BN on one value
                            raise _shape_error(exc, x, cfg.model) from None
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                        scaler.scale(loss / len(micro)).backward()
                    part += torch.stack(
                        [
                            loss.detach().double() * len(y),
                            (logits.argmax(1) == y).sum().double(),
                            part.new_tensor(len(y)),
                            part.new_zeros(()),
                        ]
                    )
                # One check per step, before the update: a non-finite loss, a stop request. Under
                # DDP every rank must decide alike, so the flags are reduced over the ranks.
                finite = torch.isfinite(part[0])
                if world > 1:
                    flags = torch.stack([(~finite).double(), part.new_tensor(signals.signum)])
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    bad, signum = (int(v) for v in flags.tolist())
                else:
                    bad, signum = not finite.item(), signals.signum
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    bad_streak += 1
                    if cfg.nonfinite == "stop" or bad_streak > MAX_SKIPPED_IN_A_ROW:
                        bar.close()
                        raise TrainingError(
                            _nonfinite_message(
                                cfg,
                                part,
                                step,
                                f"epoch {epoch + 1}, step {epoch_step} of {steps_per_epoch}",
                                out,
                                saved_step,
                                bad_streak,
                            )
                        )
                    sums[3] += 1
                else:
                    bad_streak = 0
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
                    sums += part
                step += 1
                if not bar.disable and (epoch_step % 5 == 0 or epoch_step == steps_per_epoch):
                    loss_sum, correct, seen = sums[:3].tolist()  # a device sync, so only every few steps
                    rate = (seen - seen0) * world / max(time.perf_counter() - t_begin, 1e-9)
                    if seen:
                        bar.set_postfix(
                            loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}"
                        )
                bar.update(1)
                if epoch_step < steps_per_epoch and (
                    signum or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
                ):
                    snapshot(epoch, epoch_step, sums, time.perf_counter() - t0)
                    if signum:
                        bar.close()
                        raise stopped(signum, epoch, epoch_step)
            if world > 1:
                dist.all_reduce(sums)
            epoch_train_s = time.perf_counter() - t0
            train_time += epoch_train_s
            loss_sum, correct, seen, skipped = sums.tolist()
            if not seen:
                bar.close()
                raise TrainingError(f"every step of epoch {epoch + 1} had a non-finite loss; stopped")
            test = evaluate(
                eval_model, data, tta=cfg.tta, batch_size=cfg.eval_batch_size, amp=cfg.amp, memory_format=fmt
            )
            row = {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / seen, 6),
                "train_top1": round(correct / seen, 6),
                "test_loss": round(test["loss"], 6),
                "test_top1": round(test["top1"], 6),
                "test_top5": round(test["top5"], 6),
                "lr": round(lr, 8),
                "images_per_s": round(seen / epoch_train_s, 1),
                "skipped_steps": int(skipped),
                "time_s": round(time.perf_counter() - t_start, 2),
            }
            rows.append(row)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                acc=f"{row['train_top1']:.3f}",
                test=f"{row['test_top1']:.4f}",
            )
            bar.close()
            snapshot(epoch + 1, 0, sums, 0.0)
            if main:
                _write_metrics(out / "metrics.csv", rows)
                if cfg.quiet:
                    print(
                        f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_top1']:.4f}"
                        f"  test loss {row['test_loss']:.4f} top1 {row['test_top1']:.4f} top5 {row['test_top5']:.4f}"
                        f"  lr {lr:.4g}  {row['images_per_s']:.0f} img/s  {row['time_s']:.1f} s"
                        + (f"  {row['skipped_steps']} steps skipped" if skipped else ""),
                        flush=True,
                    )
            if callback is not None:
                callback(row)
            if signals.signum and epoch + 1 < cfg.epochs:
                raise stopped(signals.signum, epoch + 1, 0)

    # --- final files -----------------------------------------------------------------------------
    last, best = rows[-1], max(rows, key=lambda r: r["test_top1"])
    summary = {
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
        "train_images_per_s": round(len(rows) * steps_per_epoch * cfg.batch_size / train_time, 1),
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in rows),
        "params": n_params,
        "ema": ema is not None,
        "tta": cfg.tta,
        "device": f"{world} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
        "torch": torch.__version__,
        "out": str(out),
    }
    if main:
        save_model_file(out / "model.safetensors", eval_model, data_info)
        _plot_curves(out / "curves.png", rows, f"{cfg.model} on {cfg.data}")
        atomic_write(out / "summary.json", lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
        print(
            f"test top-1 {last['test_top1']:.4f} (best {best['test_top1']:.4f} at epoch {best['epoch']}), "
            f"{last['time_s']:.0f} s; wrote {out}",
            flush=True,
        )
    return summary
