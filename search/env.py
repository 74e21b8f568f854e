"""What produced a number: library versions and the device, stored with every result."""

from __future__ import annotations

import platform
from importlib import metadata

import torch


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("budget-nas", "torch", "torchvision", "optuna"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    """`NVIDIA H100 80GB HBM3` on CUDA; the CPU model and thread count otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
