"""Helpers shared by the model tests."""

from __future__ import annotations

import torch

# The iResNet paper's other nets beyond 50 layers repeat the blocks, stems and shortcuts of their
# 50-layer version, which the per-model sweeps run; the sweeps run these with `pytest -m slow`
# (tests/test_iresnet_variants.py checks their parameters against the official code by default).
DEEPER_COPIES = frozenset(
    [f"resstage{d}" for d in (101, 152, 200)]
    + [f"{f}{d}" for f in ("resgroup", "iresgroup", "resgroupfix", "iresgroupfix") for d in (101, 152)]
)


def randomise_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Random affine parameters and running statistics in every BN, so that in eval mode no BN is
    the identity and a misplaced one changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
