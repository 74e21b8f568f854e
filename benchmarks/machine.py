"""Who measured it: every benchmark result is stored with the machine it ran on."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from search.env import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if gpu := gpu_name(device):
        info["gpu"] = gpu
    else:
        info["isa"] = torch.backends.cpu.get_cpu_capability()
        info["trial_images_per_s"] = round(trial_speed())
    return info


def gpu_name(device: str) -> str | None:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None


@functools.cache
def trial_speed() -> float:
    """Training images/s of this project's trainer on the CPU: resnet-tiny, 28 px, batch 64,
    the stuff of a quick trial (about 7 s). Two VMs that both say "AMD EPYC" trained 4x
    apart (2026-11-29), so the model name cannot tell whether timings compare."""
    from models.presets import preset
    from search.data import Split
    from search.trainer import TrainConfig, train

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1024, 1, 28, 28), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (1024,), generator=gen)
    cfg = TrainConfig(images=2048, batch_size=64, lr=0.05)
    res = train(preset("resnet-tiny", 1, 28), cfg, Split(x, y, (0.5,), (0.25,)), rungs=(0.5, 1))
    return res.history[-1].images_per_s  # the second epoch: warmed up


def comparable(saved: dict[str, Any], device: str = "cpu", tolerance: float = 0.25) -> str | None:
    """Why timings saved on the `saved` machine must not be mixed with new ones; None if
    they may (same device kind, trial speed within `tolerance`)."""
    here = machine(device)
    if saved.get("gpu") != here.get("gpu"):
        return (
            f"they ran on {saved.get('gpu', 'the CPU')}, this run on {here.get('gpu', 'the CPU')}"
        )
    if "gpu" in here:
        return None
    if "trial_images_per_s" not in saved:
        return "the saved runs predate the record of their machine's trial speed"
    ratio = here["trial_images_per_s"] / saved["trial_images_per_s"]
    if abs(ratio - 1) > tolerance:
        return (
            f"the saved runs' machine trained {saved['trial_images_per_s']} images/s, this one "
            f"{here['trial_images_per_s']} ({ratio:.2f}x), so their times do not compare"
        )
    return None


def result_path(name: str, device: str = "cpu") -> Path:
    """results/<name>-<device kind>.json: where `save` writes and a --resume reads."""
    tag = (gpu_name(device) or "cpu").lower().replace(" ", "-")
    return RESULTS / f"{name}-{tag}.json"


def save(
    name: str, result: dict[str, Any], device: str = "cpu", info: dict[str, Any] | None = None
) -> Path:
    """Write the result with the machine (`info`, when already measured: a CPU's reading
    times a trial) and the date (see `result_path`)."""
    path = result_path(name, device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": info or machine(device),
        **result,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def saved_for_resume(name: str, device: str = "cpu") -> dict[str, Any]:
    """The saved result that a --resume extends ({} when none). ValueError when its
    timings would not compare with this machine's."""
    path = result_path(name, device)
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    why = comparable(saved.get("machine", {}), device)
    if why:
        raise ValueError(
            f"cannot --resume {path}: {why}. Resume on a machine like theirs, or run without "
            "--resume, which overwrites that file (copy it first to keep its runs)"
        )
    return saved
