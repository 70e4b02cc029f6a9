"""The store of named networks and families. Family modules write to it when they are imported;
`resnets.registry` reads it. This module imports nothing else of the package, so any family module
can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from .net import NetSpec


@dataclass(frozen=True)
class Paper:
    """Published numbers for exactly this architecture, as printed, and where they come from.

    `params_m` and `gmacs` (1e9 multiply-adds at `Entry.input_size`) are what the tests check
    our counts against; errors are in percent. `note` explains every known gap.
    """

    cite: str
    source: str = ""
    params_m: float | None = None
    gmacs: float | None = None
    top1_err: float | None = None
    top5_err: float | None = None
    cifar10_err: float | None = None
    cifar100_err: float | None = None
    note: str = ""
    # Relative tolerance of the params check. Above 2% only for a documented gap (see `note`).
    params_tol: float = 0.02


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    spec: NetSpec
    paper: Paper
    input_size: int  # the paper's input resolution (square)


@dataclass(frozen=True)
class Family:
    """What the package needs to know about a family beyond its networks.

    `cite` is the paper every registration of the family names; `color` is the family's colour in
    every figure; `example` is an ImageNet network (four stages) that stands for the family in tests.
    """

    name: str
    cite: str
    color: str
    example: str


ENTRIES: dict[str, Entry] = {}
# Filled by `resnets.models` from its tuple of family modules, in that order (tables follow it).
FAMILIES: dict[str, Family] = {}


def register(name: str, family: Family, spec: NetSpec, paper: Paper, input_size: int = 224) -> None:
    if name in ENTRIES:
        raise ValueError(f"model {name!r} is registered twice")
    ENTRIES[name] = Entry(name, family.name, spec, paper, input_size)
