"""The speed settings of a training run, chosen for its device and length when it starts.

`choose_speed(cfg, device, total_steps)` resolves the `auto` values of `amp`, `channels_last`,
`compile` and `threads`; each is a setting that changes how fast a run goes, not what it learns
(bf16 autocast changes the numerics; measured over seeds it did not cost accuracy: README, "bf16
against fp32"). An explicit on/off or a named dtype is kept as given.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import COMPILE_MIN_STEPS, TrainConfig


@dataclass(frozen=True)
class Speed:
    """The resolved settings and, for each, why."""

    amp: str
    channels_last: bool
    compile: bool
    threads: int
    why: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        parts = [
            f"amp {self.amp}",
            f"channels_last {'on' if self.channels_last else 'off'}",
            f"compile {'on' if self.compile else 'off'}",
            f"{self.threads} thread{'s' if self.threads != 1 else ''}",
        ]
        keys = ("amp", "channels_last", "compile", "threads")
        return "speed: " + ", ".join(
            f"{p} ({self.why[k]})" if self.why.get(k) else p for p, k in zip(parts, keys)
        )

    def as_dict(self) -> dict:
        return {
            "amp": self.amp,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "threads": self.threads,
            "why": dict(self.why),
        }


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes in bf16 natively (not emulated in fp32), and what says so."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return True, f"compute capability {major}.{minor}"
        return False, f"compute capability {major}.{minor} < 8.0"
    if device.type != "cpu":
        return False, f"{device.type} device"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        has_amx, has_avx = bool(amx()), bool(avx())
    else:  # older torch: the kernel's flags
        flags = _cpu_flags()
        has_amx, has_avx = "amx_bf16" in flags, "avx512_bf16" in flags
    if has_amx:
        return True, "CPU has AMX"
    if has_avx:
        return True, "CPU has AVX-512 BF16"
    return False, "CPU has no native bf16"


def compiler_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile's default backend can build kernels for `device`."""
    if device.type == "cuda":
        ok = importlib.util.find_spec("triton") is not None
        return ok, "triton" if ok else "no triton"
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in names:
        if shutil.which(name):
            return True, name
    return False, "no C++ compiler"


def auto_threads() -> tuple[int, str]:
    """OMP_NUM_THREADS where set (torchrun sets it for its workers); else the physical cores
    shared out over this machine's processes of the run; else torch's current setting."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        cores = getattr(torch.cpu, "get_capabilities", lambda: {})().get("num_physical_cores") or (
            os.cpu_count() or 1
        )
        return max(1, cores // local), f"{cores} cores / {local} processes"
    return torch.get_num_threads(), ""


def choose_speed(cfg: TrainConfig, device: torch.device, total_steps: int) -> Speed:
    """Resolve the `auto` speed settings of `cfg` for `device` and a run of `total_steps`
    optimizer steps (this process's, from the start of the run)."""
    why = {}
    amp = cfg.amp
    if amp == "auto":
        # bf16 autocast changes the numerics; on ResNet-20 / CIFAR-10 (10 epochs, 2 seeds each) it
        # ended level with fp32 (83.82% against 83.81%, README "bf16 against fp32"), so auto uses
        # it wherever the hardware computes bf16 natively.
        ok, reason = native_bf16(device)
        amp, why["amp"] = ("bf16" if ok else "off"), reason
    # NHWC is what oneDNN's and cuDNN's fastest conv kernels read: 1.3x for a resnet20 training
    # step on a CPU (benchmarks/train_speed.py), so auto means on.
    channels_last = cfg.channels_last != "off"
    compile_ = cfg.compile == "on"
    if cfg.compile == "auto":
        has_compiler, tool = compiler_available(device)
        if cfg.deterministic:
            why["compile"] = "deterministic run"
        elif not has_compiler:
            why["compile"] = tool
        elif total_steps < COMPILE_MIN_STEPS:
            why["compile"] = f"{total_steps} steps < {COMPILE_MIN_STEPS}"
        else:
            compile_, why["compile"] = True, f"{total_steps} steps >= {COMPILE_MIN_STEPS}"
    if cfg.threads:
        threads = cfg.threads
    else:
        threads, reason = auto_threads()
        if reason:
            why["threads"] = reason
    return Speed(amp, channels_last, compile_, threads, why)
