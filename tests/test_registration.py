"""Registration has no side effects to wait for: blocks and networks exist right after import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import resnets
from resnets.registry import FAMILIES

MODELS = Path(resnets.__file__).parent / "models"


def test_blocks_and_registry_are_usable_right_after_import():
    code = (
        "import resnets\n"
        "from resnets.models.net import BLOCKS\n"
        "spec = resnets.NetSpec('basic', (1,), (16,), strides=(1,), stem='cifar', stem_width=16)\n"
        "print(sorted(BLOCKS)[0], spec.block, resnets.get_entry('resnet20').spec.depths)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["basic", "basic", "(3,", "3,", "3)"]


def test_models_never_import_the_registry():
    # resnets.registry imports resnets.models; the other direction would be a cycle.
    offenders = []
    for path in sorted(MODELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                if target in ("..registry", "resnets.registry") or (
                    target == ".." and any(a.name == "registry" for a in node.names)
                ):
                    offenders.append(path.name)
    assert not offenders, f"import resnets.registry from models: {offenders}"


def test_every_family_has_networks_and_an_example():
    families = {e.family for e in map(resnets.get_entry, resnets.list_models())}
    assert families == set(FAMILIES)
    for fam in FAMILIES.values():
        assert resnets.get_entry(fam.example).family == fam.name
        assert "arXiv:" in fam.cite and fam.color.startswith("#")
