"""One trial: sample -> budget gate -> train -> report and prune.

The gate counts parameters (and MACs) in closed form; a candidate over the
limit is rejected before any model or tensor exists, and its excess is set as
a constraint so TPE learns how far over it was.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from models import ArchSpec, count_macs, count_params
from search import space
from search.data import Dataset, channel_stats, stratified_split, subset
from search.env import device_name
from search.train import (
    EpochStats,
    OutOfMemory,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    train,
)


@dataclass(frozen=True)
class SearchData:
    """The training and validation split the trials see; the test split stays out."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, size, classes): what the sampled architectures must take."""
        return self.train_x.shape[1], self.train_x.shape[2], self.num_classes


def search_split(
    ds: Dataset, seed: int, train_images: int | None = None, val_images: int | None = None
) -> SearchData:
    """Hold out a stratified validation split (5,000 images from 50,000+, else 10%).

    `train_images` / `val_images` shrink both to stratified subsets (--quick).
    """
    n = len(ds.train_y)
    keep, val = stratified_split(ds.train_y, 5000 if n >= 50_000 else 0.1, seed)
    if train_images:
        keep = keep[subset(ds.train_y[keep], train_images, seed)]
    if val_images:
        val = val[subset(ds.train_y[val], val_images, seed)]
    x, y = ds.train_x[keep], ds.train_y[keep]
    mean, std = channel_stats(x)
    return SearchData(ds.name, x, y, ds.train_x[val], ds.train_y[val], mean, std, ds.num_classes)


def fit(
    spec: ArchSpec,
    cfg: TrainConfig,
    data: SearchData,
    device: torch.device,
    on_epoch: Callable[[EpochStats, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train on the search's training split, validating on its validation split."""
    return train(
        spec,
        cfg,
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
        mean=data.mean,
        std=data.std,
        device=device,
        on_epoch=on_epoch,
    )


@dataclass(frozen=True)
class Limits:
    budget: int  # parameters
    max_macs: int | None = None  # per image; None: no compute limit

    def violations(self, params: int, macs: int) -> dict[str, int]:
        """Constraint values: > 0 is over the limit by that much."""
        out = {"params": params - self.budget}
        if self.max_macs is not None:
            out["macs"] = macs - self.max_macs
        return out


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process trained a trial


def trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number) % 2**31


def gate(trial: optuna.Trial, spec: ArchSpec, limits: Limits) -> str | None:
    """Record size and constraints; the reason it is over a limit, or None."""
    params, macs = count_params(spec), count_macs(spec)
    trial.set_user_attr("params", params)
    trial.set_user_attr("macs", macs)
    trial.set_user_attr("arch", spec.to_json(indent=None))
    over = []
    for key, excess in limits.violations(params, macs).items():
        trial.set_constraint(key, excess)
        if excess > 0:
            limit = limits.budget if key == "params" else limits.max_macs
            over.append(f"{key} {excess + limit:,} > {limit:,}")
    return "over the limit: " + ", ".join(over) if over else None


class StudyFull(Exception):
    """Every training slot of the study is taken; this candidate is not trained."""


class Objective:
    """Callable for `study.optimize`; holds the data on the training device.

    `claim(trial)` is asked before training a candidate that passed the gate;
    it returns False when the study's global trial count is reached.
    """

    def __init__(
        self,
        data: SearchData,
        limits: Limits,
        epochs: int,
        seed: int,
        device: torch.device,
        claim: Callable[[optuna.Trial], bool] | None = None,
        artifacts: Path | None = None,
    ) -> None:
        self.data, self.limits, self.epochs, self.seed = data, limits, epochs, seed
        self.device, self.claim = device, claim
        self.device_name = device_name(device)
        self.artifacts = artifacts

    def __call__(self, trial: optuna.Trial) -> float:
        spec = space.suggest_arch(trial, *self.data.shape)
        cfg = space.suggest_training(trial, self.epochs, trial_seed(self.seed, trial.number))
        reason = gate(trial, spec, self.limits)
        if reason is not None:
            trial.set_user_attr("rejected", reason)
            raise optuna.TrialPruned(reason)
        if self.claim is not None and not self.claim(trial):
            trial.set_user_attr("failed", "not trained: the study reached its trial count")
            raise StudyFull(f"trial {trial.number}: the study reached its trial count")
        trial.set_user_attr("training", cfg.to_dict())
        trial.set_user_attr("seed", cfg.seed)
        trial.set_user_attr("device", self.device_name)
        trial.set_user_attr("worker", WORKER)
        curve: list[float] = []

        def report(stats: EpochStats, _model: torch.nn.Module) -> None:
            curve.append(stats.val_acc)
            trial.report(stats.val_acc, stats.epoch)
            if trial.should_prune():
                why = (
                    f"median rule at epoch {stats.epoch}: validation accuracy "
                    f"{stats.val_acc:.4f} is below the median of earlier trials"
                )
                trial.set_user_attr("pruned", why)
                trial.set_user_attr("val_curve", curve)
                raise optuna.TrialPruned(why)

        try:
            result = fit(spec, cfg, self.data, self.device, on_epoch=report)
        except TrainingDiverged as e:
            trial.set_user_attr("pruned", f"diverged: {e}")
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except OutOfMemory as e:
            trial.set_user_attr("failed", str(e))
            raise
        trial.set_user_attr("val_curve", curve)
        trial.set_user_attr("val_loss", result.history[-1].val_loss)
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        trial.set_user_attr("images_per_s", round(result.images_per_s, 1))
        if self.artifacts is not None:
            attach_arch(trial, spec, self.artifacts)
        return curve[-1]


def attach_arch(trial: optuna.Trial, spec: ArchSpec, artifacts: Path) -> None:
    """The trial's architecture JSON as an artifact that optuna-dashboard shows."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trial-{trial.number}-arch.json"
        path.write_text(spec.to_json() + "\n")
        upload_artifact(
            artifact_store=FileSystemArtifactStore(str(artifacts)),
            file_path=str(path),
            study_or_trial=trial,
            mimetype="application/json",
        )


def trial_arch(trial: optuna.trial.FrozenTrial) -> ArchSpec:
    """The exact architecture a trial recorded."""
    return ArchSpec.from_dict(json.loads(trial.user_attrs["arch"]))


def replay(trial: optuna.trial.FrozenTrial, data: SearchData, device: torch.device) -> float:
    """Train a recorded trial again from its architecture, settings and seed."""
    cfg = TrainConfig.from_dict(trial.user_attrs["training"])
    return fit(trial_arch(trial), cfg, data, device).history[-1].val_acc
