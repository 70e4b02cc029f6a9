"""Parameter and multiply-add counts, as the papers count them (conv + linear layers)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, get_entry


def _input_size(model: nn.Module, input_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if input_size is None:
        name = getattr(model, "name", None)
        input_size = get_entry(name).input_size if name else 224
    return (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)


def _meta_model(model_or_name: nn.Module | str) -> nn.Module:
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            return create_model(model_or_name)
    return model_or_name


def count_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-adds of one forward pass of `module` on `x` (FlopCounterMode counts 2 FLOPs per MAC).

    Runs on the meta device whatever device the module's weights are on: the weights are swapped
    for meta tensors for the call, so nothing is computed and nothing is copied.
    """
    meta = {k: torch.empty_like(v, device="meta") for k, v in module.state_dict(keep_vars=True).items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = torch.func.functional_call(module, meta, (x.to("meta"),))
    return counter.get_total_flops() // 2, out


def count_params_macs(
    model_or_name: nn.Module | str, input_size: int | tuple[int, int] | None = None
) -> tuple[int, int]:
    """(parameters, multiply-adds) for one image at `input_size` (default: the paper's input size).

    Counted on the meta device: a name is built there, a model's weights are swapped for meta
    tensors during the count, so even iresnet1001 costs no memory or time.
    """
    model = _meta_model(model_or_name)
    h, w = _input_size(model, input_size)
    params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, model.spec.in_chans if hasattr(model, "spec") else 3, h, w, device="meta")
    was_training = model.training
    model.eval()
    try:
        macs, _ = count_macs(model, x)
    finally:
        model.train(was_training)
    return params, macs


def stage_table(
    model_or_name: nn.Module | str, input_size: int | tuple[int, int] | None = None
) -> list[dict]:
    """Per part of the net (stem, each stage, head): output shape, parameters and multiply-adds."""
    model = _meta_model(model_or_name)
    h, w = _input_size(model, input_size)
    x = torch.zeros(1, model.spec.in_chans, h, w, device="meta")
    parts = [("stem", model.stem)] + [(f"stage{i + 1}", s) for i, s in enumerate(model.stages)]
    parts.append(("head", model.head))
    rows = []
    was_training = model.training
    model.eval()
    try:
        for name, part in parts:
            macs, x = count_macs(part, x)
            rows.append(
                {
                    "part": name,
                    "output_shape": list(x.shape[1:]),
                    "params": sum(p.numel() for p in part.parameters()),
                    "macs": macs,
                }
            )
    finally:
        model.train(was_training)
    return rows
