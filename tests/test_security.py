"""No code path unpickles arbitrary objects or evaluates strings: a scan of the source tree.

Flags `torch.load` without `weights_only=True`, `pickle.load(s)`, `marshal.load(s)`,
`numpy.load(..., allow_pickle=True)`, `yaml.load` without a safe loader, the builtins `eval`,
`exec` and `compile` (but not `torch.compile`), and `pickle.Unpickler` subclasses that do not
restrict `find_class`. The scanner is itself tested on code that does each of these.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["src", "benchmarks", "scripts"]


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """`file:line what` for each unsafe use in `source`."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            what = None
            if name in ("torch.load",) and not _is_true(_kw(node, "weights_only")):
                what = "torch.load without weights_only=True"
            elif name in (
                "pickle.load",
                "pickle.loads",
                "marshal.load",
                "marshal.loads",
                "dill.load",
                "dill.loads",
            ):
                what = name
            elif name in ("np.load", "numpy.load") and _is_true(_kw(node, "allow_pickle")):
                what = f"{name} with allow_pickle=True"
            elif name == "yaml.load" and "Safe" not in _dotted(_kw(node, "Loader") or ast.Name("?")):
                what = "yaml.load without a safe loader"
            elif name in ("eval", "exec", "compile") and isinstance(node.func, ast.Name):
                what = f"builtin {name}"
            if what:
                found.append(f"{filename}:{node.lineno} {what}")
        elif isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler"}:
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if "find_class" not in methods:
                    found.append(f"{filename}:{node.lineno} Unpickler subclass without find_class")
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "marshal"):
            names = {a.name for a in node.names}
            if names & {"load", "loads"}:
                found.append(f"{filename}:{node.lineno} from {node.module} import {sorted(names)}")
    return found


BAD = """
import pickle, torch, marshal, yaml
import numpy as np
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
pickle.loads(b"")
marshal.load(f)
np.load("x.npy", allow_pickle=True)
yaml.load(text, Loader=yaml.Loader)
eval("1 + 1")
exec("x = 1")
compile("x", "f", "exec")
from pickle import loads
class U(pickle.Unpickler):
    pass
"""

GOOD = """
import pickle, torch, yaml
import numpy as np
torch.load("x.pt", weights_only=True)
torch.load("x.pt", map_location="cpu", weights_only=True)
model.eval()
torch.compile(model)
np.load("x.npy")
yaml.load(text, Loader=yaml.SafeLoader)
class U(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(name)
U(f).load()
"""


def test_the_scanner_finds_each_unsafe_pattern_and_nothing_else():
    found = unsafe_calls(BAD)
    lines = sorted(int(hit.split(":")[1].split()[0]) for hit in found)
    assert lines == list(range(4, 15)), found  # every line of BAD after the imports, once
    assert unsafe_calls(GOOD) == []


@pytest.mark.parametrize("folder", SCANNED)
def test_no_unsafe_loading_or_evaluation_in_the_source(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files or folder != "src"
    found = [hit for f in files for hit in unsafe_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []
