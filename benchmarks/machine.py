"""Who measured it: every benchmark result is stored with the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: str = "cpu") -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def result_path(name: str, device: str = "cpu") -> Path:
    """results/<name>-<device kind>.json: where `save` writes and a --resume reads."""
    tag = machine(device).get("gpu", "cpu").lower().replace(" ", "-")
    return RESULTS / f"{name}-{tag}.json"


def save(name: str, result: dict[str, Any], device: str = "cpu") -> Path:
    """Write the result with the machine and the date (see `result_path`)."""
    path = result_path(name, device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(device),
        **result,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
