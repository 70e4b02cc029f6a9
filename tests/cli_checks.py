"""What every refusal must look like: one `error:` line, exit code 2, and the user's files as they were."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

from resnets.cli import main


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`resnets ARGV` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_one_error_line(code: int, err: str, needle: str = "") -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under `folder`: relative name -> (size, sha256); folders ("dir", "")."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        name = str(p.relative_to(folder))
        out[name] = (
            (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else ("dir", "")
        )
    return out
