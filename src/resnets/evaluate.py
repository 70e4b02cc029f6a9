"""Top-1, top-5 and loss of a model on a test set, optionally with flip test-time augmentation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data.augment import hflip

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for `amp` in ("off", "bf16", "fp16") on `device`'s type."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    *,
    tta: bool = False,
    batch_size: int = 500,
    amp: str = "off",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """{"top1", "top5", "loss", "n"} of `model` (in eval mode) on `data`'s test split.

    `data` is a dataset of `resnets.data` (its test split, shared out over the processes of a
    distributed run and summed back), or any iterable of normalised `(images, labels)` batches.
    `tta` averages the logits of each image and its mirror image. The loss is the plain
    cross-entropy, without the label smoothing training may use.
    """
    distributed = dist.is_available() and dist.is_initialized() and hasattr(data, "eval_batches")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    batches: Iterable = data.eval_batches(batch_size, rank, world) if hasattr(data, "eval_batches") else data
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Sums stay on the device, so a GPU run synchronises once, at the end.
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    for x, y in batches:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
            if tta:
                logits = (logits + model(hflip(x))) / 2
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(1).sum().double(),
                torch.tensor(len(y), dtype=torch.float64, device=device),
            ]
        )
    if distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluate() got no test images")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": int(n)}


def evaluate_file(
    path: str,
    data: str | None = None,
    *,
    data_dir: str = "data",
    cache_dir: str | None = None,
    tta: bool = False,
    batch_size: int = 500,
    device: str = "cpu",
    amp: str = "off",
    workers: int = 4,
) -> dict:
    """Evaluate a run's `model.safetensors` or `last.ckpt` on `data` (default: what it was trained
    on), normalising with the statistics stored next to the weights."""
    from dataclasses import replace

    from .checkpoint import load_model_file
    from .data import load_data
    from .errors import CheckpointError

    model, meta = load_model_file(path)
    spec = data or meta.get("data")
    if not spec:
        raise CheckpointError(f"{path} does not say which data it was trained on; pass --data")
    image_size = int(meta.get("image_size", 224))
    dataset = load_data(spec, data_dir, cache_dir=cache_dir, image_size=image_size, workers=workers)
    if (dataset.num_classes, dataset.channels) != (model.num_classes, model.spec.in_chans):
        raise CheckpointError(
            f"{path} is a model for {model.num_classes} classes of {model.spec.in_chans}-channel images, "
            f"but {spec} has {dataset.num_classes} classes of {dataset.channels}-channel images"
        )
    if "mean" in meta and "std" in meta:  # the training run's normalisation, not this data's own
        dataset = replace(dataset, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    dev = torch.device(device)
    result = evaluate(model.to(dev), dataset.to(dev), tta=tta, batch_size=batch_size, amp=amp)
    return {
        "model": model.name,
        "data": spec,
        **{f"test_{k}": v for k, v in result.items() if k != "n"},
        "n": result["n"],
        "tta": tta,
    }
