"""Regenerate src/resnets/counts.json (exact params and MACs per model) and print what changed.

    python scripts/update_golden.py          # show the diff only
    python scripts/update_golden.py --write  # show it and write the file

The file catches accidental changes to any architecture (tests/test_registry.py compares it with
live counts) and is what `resnets list` shows without counting; change it only on purpose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from resnets import count_params_macs, get_entry, list_models

GOLDEN = Path(__file__).resolve().parent.parent / "src" / "resnets" / "counts.json"


def current_counts() -> dict[str, dict[str, int]]:
    out = {}
    for name in list_models():
        params, macs = count_params_macs(name)
        out[name] = {"input_size": get_entry(name).input_size, "params": params, "macs": macs}
    return out


def diff(old: dict, new: dict) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            lines.append(f"- {name}: removed")
        elif name not in old:
            lines.append(f"+ {name}: {new[name]}")
        elif old[name] != new[name]:
            changed = {k: (old[name].get(k), v) for k, v in new[name].items() if old[name].get(k) != v}
            lines.append(f"~ {name}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the new counts")
    args = ap.parse_args()
    old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    new = current_counts()
    lines = diff(old, new)
    print("\n".join(lines) if lines else "no change")
    if args.write and lines:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
