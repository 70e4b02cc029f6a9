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
import sys
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
from .errors import ConfigError, TrainingError
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
    "time_s",
)


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, callback, rank, world, device)
    finally:
        torch.use_deterministic_algorithms(prev_deterministic)
        if started_dist:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, callback, rank: int, world: int, device: torch.device) -> dict:
    main = rank == 0
    if world > 1:  # rank 0 chooses the folder (numbering depends on what exists) and tells the others
        box = [resolve_out(cfg) if main else None]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    else:
        out = resolve_out(cfg)
    ckpt = None
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
    start_epoch, step, rows, train_time, run_time = 0, 0, [], 0.0, 0.0
    if ckpt is not None:
        load_state(model, ckpt["model"], "last.ckpt")
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            load_state(ema.module, ckpt["ema"], "last.ckpt (EMA)")
            ema.updates = ckpt["ema_updates"]
        start_epoch, step, rows = ckpt["epoch"], ckpt["step"], ckpt["metrics"]
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

    t_start = time.perf_counter() - run_time
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, images
        bar = tqdm(
            total=steps_per_epoch,
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
        )
        for micro in batches:
            lr = lr_at(step, cfg, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for i, (x, y) in enumerate(micro):
                x = x.contiguous(memory_format=fmt)
                # Gradients are averaged across processes once per step, on the last micro-batch.
                skip_sync = world > 1 and i < len(micro) - 1
                with net.no_sync() if skip_sync else contextlib.nullcontext():
                    with autocast(device, cfg.amp):
                        logits = net(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                    scaler.scale(loss / len(micro)).backward()
                sums += torch.stack(
                    [
                        loss.detach().double() * len(y),
                        (logits.argmax(1) == y).sum().double(),
                        sums.new_tensor(len(y)),
                    ]
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            if not bar.disable and (bar.n % 5 == 4 or bar.n == steps_per_epoch - 1):
                loss_sum, correct, seen = sums.tolist()  # a device sync, so only every few steps
                rate = seen * world / (time.perf_counter() - t0)
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}"
                )
            bar.update(1)
        if world > 1:
            dist.all_reduce(sums)
        epoch_train_s = time.perf_counter() - t0
        train_time += epoch_train_s
        loss_sum, correct, seen = sums.tolist()
        if not math.isfinite(loss_sum):
            bar.close()
            kept = f"{out / 'last.ckpt'} keeps epoch {epoch}" if epoch else "no epoch had finished"
            raise TrainingError(
                f"the training loss became {loss_sum / seen} in epoch {epoch + 1}; stopped ({kept}). "
                "Try a lower --lr"
            )
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
            "time_s": round(time.perf_counter() - t_start, 2),
        }
        rows.append(row)
        bar.set_postfix(
            loss=f"{row['train_loss']:.3f}", acc=f"{row['train_top1']:.3f}", test=f"{row['test_top1']:.4f}"
        )
        bar.close()
        if main:
            state = {
                "model": model.state_dict(),
                "ema": ema.module.state_dict() if ema else None,
                "ema_updates": ema.updates if ema else 0,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "rng": _rng_state(device),
                "model_name": cfg.model,
                "spec": asdict(model.spec),
                "config": asdict(cfg),
                "data_info": data_info,
                "metrics": rows,
                "train_time_s": train_time,
                "time_s": row["time_s"],
            }
            save_checkpoint(out / "last.ckpt", state)
            _write_metrics(out / "metrics.csv", rows)
            if cfg.quiet:
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_top1']:.4f}"
                    f"  test loss {row['test_loss']:.4f} top1 {row['test_top1']:.4f} top5 {row['test_top5']:.4f}"
                    f"  lr {lr:.4g}  {row['images_per_s']:.0f} img/s  {row['time_s']:.1f} s",
                    flush=True,
                )
        if callback is not None:
            callback(row)

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
