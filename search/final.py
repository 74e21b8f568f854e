"""Final training: the whole training set, the test split, one run per seed.

The test split is evaluated at every epoch's end for the learning curves;
nothing is selected on it, so the final figure stays an honest estimate. With
several seeds, the result reports the mean and the standard deviation, and
keeps every run.

A study ranks its candidates by one short run each, so its top few are near-ties.
`rank_by_validation` re-trains them with every seed and chooses on the search's
validation split, so that choosing among them does not spend the test split either.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import ArchSpec, build_model, count_macs, count_params
from search.data import Dataset, SearchData
from search.env import device_name, versions
from search.records import weight_bytes
from search.trainer import EvalStats, TrainConfig, train

RESULT_FORMAT = "budget-nas-result/1"
CHECKPOINT_FORMAT = "budget-nas-checkpoint/1"


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, classes: int) -> list[list[int]]:
    """Rows are true classes, columns predictions."""
    m = torch.bincount(y.cpu() * classes + pred.cpu(), minlength=classes * classes)
    return m.view(classes, classes).tolist()


def check_input(spec: ArchSpec, data: Dataset) -> None:
    """The architecture must take the dataset's images and classes as they are."""
    want = (spec.in_channels, spec.input_size, spec.num_classes)
    have = (data.channels, data.size, data.num_classes)
    if want != have:
        raise ValueError(
            f"the architecture takes {want[0]}x{want[1]}x{want[1]} images and {want[2]} classes, "
            f"but {data.name} has {have[0]}x{have[1]}x{have[1]} and {have[2]}; "
            "use an architecture searched on this dataset, or a preset name, which adapts"
        )


def epochs_config(cfg: TrainConfig, epochs: int, n_train: int) -> TrainConfig:
    """The settings with a length of whole epochs of this training set."""
    return replace(cfg, images=epochs * n_train)


def train_final(
    spec: ArchSpec,
    cfg: TrainConfig,
    epochs: int,
    data: Dataset,
    device: torch.device,
    on_eval: Callable[[EvalStats], None] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """One seed: train on all training images for `epochs`, test after each epoch."""
    res = train(
        spec,
        epochs_config(cfg, epochs, len(data.train_y)),
        data.train_test,
        device=device,
        rungs=[k / epochs for k in range(1, epochs + 1)],
        on_eval=on_eval,
        on_step=on_step,
    )
    last = res.history[-1]
    run = {
        "seed": cfg.seed,
        "test_accuracy": last.val_acc,
        "test_loss": last.val_loss,
        "epochs": [
            {
                "epoch": s.rung,
                "train_loss": s.train_loss,
                "train_accuracy": s.train_acc,
                "test_loss": s.val_loss,
                "test_accuracy": s.val_acc,
                "lr": s.lr,
                "seconds": s.seconds,
                "images_per_s": s.images_per_s,
            }
            for s in res.history
        ],
        "confusion_matrix": confusion_matrix(data.test_y, res.val_pred, data.num_classes),
        "seconds": res.total_seconds,
        "train_seconds": res.train_seconds,
        "images_per_s": res.images_per_s,
    }
    return run, res.model


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    spec: ArchSpec,
    cfg: TrainConfig,
    epochs: int,
    data: Dataset,
    device: torch.device,
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The result of one architecture trained with one or more seeds."""
    mean, sd = mean_sd([r["test_accuracy"] for r in runs])
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "images")}
    return {
        "format": RESULT_FORMAT,
        "architecture": spec.to_dict(),
        "params": count_params(spec),
        "macs": count_macs(spec),
        "bytes": weight_bytes(spec),
        "dataset": data.name,
        "classes": list(data.classes),
        "train_images": len(data.train_x),
        "test_images": len(data.test_x),
        "epochs": epochs,
        "training": settings,
        "seeds": [r["seed"] for r in runs],
        "test_accuracy": mean,
        "test_accuracy_std": sd,
        "runs": runs,
        "seconds": sum(r["seconds"] for r in runs),
        "device": device_name(device),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "versions": versions(),
    }


def save_checkpoint(
    path: Path, model: nn.Module, spec: ArchSpec, data: Dataset, run: dict[str, Any]
) -> None:
    """Plain tensors and JSON-like values only, so `torch.load(weights_only=True)` works."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "architecture": spec.to_dict(),
            "state_dict": state,
            "normalization": {"mean": list(data.mean), "std": list(data.std)},
            "classes": list(data.classes),
            "dataset": data.name,
            "seed": run["seed"],
            "test_accuracy": run["test_accuracy"],
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint (CPU, eval mode)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ArchSpec.from_dict(ckpt["architecture"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def train_and_validate(
    spec: ArchSpec, cfg: TrainConfig, epochs: int, split: SearchData, device: torch.device
) -> float:
    """Validation accuracy after `epochs` on the search's training split: for choosing
    among candidates without looking at the test split."""
    res = train(
        spec, epochs_config(cfg, epochs, len(split.train_y)), split.train_val, device=device
    )
    return res.history[-1].val_acc


def rank_by_validation(
    candidates: dict[str, tuple[ArchSpec, TrainConfig]],
    epochs: int,
    split: SearchData,
    seeds: list[int],
    device: torch.device,
    on_run: Callable[[str, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Every candidate trained with every seed and validated; best mean first."""
    rows = []
    for name, (spec, cfg) in candidates.items():
        accs = []
        for seed in seeds:
            accs.append(train_and_validate(spec, replace(cfg, seed=seed), epochs, split, device))
            if on_run is not None:
                on_run(name, seed, accs[-1])
        mean, sd = mean_sd(accs)
        rows.append({"name": name, "validation": accs, "val_mean": mean, "val_sd": sd})
    return sorted(rows, key=lambda r: -r["val_mean"])
