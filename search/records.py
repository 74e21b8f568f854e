"""What a study recorded, read back: outcomes, rankings, a trial's architecture and
settings, and the export record (best.json) that rebuilds the exact model."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from models import ArchSpec, count_macs, count_params
from models.complexity import count_activation_bytes, count_bytes
from search.env import versions
from search.slots import is_trained
from search.trainer import TrainConfig

EXPORT_FORMAT = "budget-nas-export/1"
OUTCOMES = (
    "complete",
    "pruned",
    "rejected",
    "failed",
    "interrupted",
    "unused",  # ready to train when another worker took the study's last slot
    "running",
    "waiting",
)


def over_limits(t: FrozenTrial) -> list[str]:
    """Which limits a rejected trial was over: params, macs, bytes or memory."""
    return [k for k, v in t.constraints.items() if v > 0]


def outcome(t: FrozenTrial) -> str:
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "pruned" if is_trained(t) else "rejected"
    if t.state == TrialState.FAIL:
        for why in ("interrupted", "unused"):
            if why in t.user_attrs:
                return why
        return "failed"
    return "running" if t.state == TrialState.RUNNING else "waiting"


def counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by outcome, and `trained` (complete + pruned): what --trials counts."""
    c = dict.fromkeys(OUTCOMES, 0)
    for t in trials:
        c[outcome(t)] += 1
    c["trained"] = c["complete"] + c["pruned"]
    return c


def rejections(trials: list[FrozenTrial]) -> dict[str, int]:
    """Rejected trials by the limit they were over (one trial can be over several)."""
    out: dict[str, int] = {}
    for t in trials:
        if outcome(t) == "rejected":
            for key in over_limits(t):
                out[key] = out.get(key, 0) + 1
    return out


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials, best validation accuracy first (earlier trial first on ties)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(done, key=lambda t: (-t.value, t.number))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial, or None before the first one finishes."""
    best = ranked(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return best[0] if best else None


def trial_arch(trial: FrozenTrial) -> ArchSpec:
    """The exact architecture a trial recorded."""
    return ArchSpec.from_dict(json.loads(trial.user_attrs["arch"]))


def trial_training(trial: FrozenTrial) -> TrainConfig:
    """The exact training settings (seed included) a trial ran with."""
    return TrainConfig.from_dict(trial.user_attrs["training"])


def weight_bytes(spec: ArchSpec) -> dict[str, int]:
    """The saved weights' size at each width a user may ship."""
    return {dtype: count_bytes(spec, dtype) for dtype in ("fp32", "fp16", "int8")}


def network_export(spec: ArchSpec) -> dict[str, Any]:
    """The export's members that describe the network (search.choose ships a network
    grown from a trial's with these replaced)."""
    return {
        "architecture": spec.to_dict(),
        "params": count_params(spec),
        "macs": count_macs(spec),
        "bytes": weight_bytes(spec),
        "activation_bytes": {d: count_activation_bytes(spec, d) for d in ("fp32", "fp16", "int8")},
    }


def export_trial(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The export format: the architecture, what it costs, how it was trained and scored."""
    attrs, settings = trial.user_attrs, study.user_attrs.get("settings", {})
    return {
        "format": EXPORT_FORMAT,
        **network_export(trial_arch(trial)),
        "budget": settings.get("budget"),
        "dataset": settings.get("dataset"),
        "training": attrs["training"],
        "validation": {
            "accuracy": trial.value,
            "curve": attrs.get("val_curve"),
            "loss": attrs.get("val_loss"),
            "images": settings.get("val_images"),
            "train_images": settings.get("train_images"),
        },
        "study_name": study.study_name,
        "trial": trial.number,
        "seed": attrs.get("seed"),
        "search_seed": settings.get("seed"),
        "sampler_seed": attrs.get("sampler_seed"),
        "horizon": study.user_attrs.get("horizon"),  # the final training it was chosen for
        "space_version": settings.get("space_version"),
        "train_seconds": attrs.get("train_seconds"),
        "device": attrs.get("device"),
        "versions": versions(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: workers on several machines may write the same file at once.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    Path(tmp).replace(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def attach(target: optuna.Study | optuna.Trial, name: str, text: str, artifacts: Path) -> str:
    """A JSON file as an artifact that optuna-dashboard shows; its artifact id."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        return upload_artifact(
            artifact_store=FileSystemArtifactStore(str(artifacts)),
            file_path=str(path),
            study_or_trial=target,
            mimetype="application/json",
        )


def write_best(study: optuna.Study, out_dir: Path, artifacts: Path | None) -> Path | None:
    """studies/<study>/best.json; attached to the study for the dashboard when it changed."""
    best = best_trial(study)
    if best is None:
        return None
    path = out_dir / "best.json"
    data = export_trial(study, best)
    write_json(path, data)
    if artifacts is not None and study.user_attrs.get("best_artifact_trial") != best.number:
        attach(study, "best.json", json.dumps(data, indent=2) + "\n", artifacts)
        study.set_user_attr("best_artifact_trial", best.number)
    return path


def summary_table(trials: list[FrozenTrial], rejected_by: dict[str, int], top: int = 5) -> str:
    """The outcome counts and the best few trials, as the end of a run prints them."""
    c = counts(trials)
    why = ", ".join(f"{n} over {k}" for k, n in sorted(rejected_by.items())) or "none"
    if sum(rejected_by.values()) > c["rejected"]:
        why += "; some over several limits"
    lines = [
        f"trials: {c['trained']} trained ({c['complete']} complete, {c['pruned']} pruned), "
        f"{c['rejected']} rejected before training ({why}), {c['failed']} failed, "
        f"{c['interrupted']} interrupted"
        + (
            f", {c['unused']} sampled but unused (the last slot went to another worker)"
            if c["unused"]
            else ""
        )
    ]
    best = ranked(trials)[:top]
    if best:
        lines.append(
            f"{'trial':>6} {'val acc':>8} {'params':>11} {'MACs':>13} {'fp32 bytes':>11} "
            f"{'activations':>11} {'blocks':>10} {'widths':>20}  optimizer"
        )
    for t in best:
        arch, tr = trial_arch(t), t.user_attrs["training"]
        lines.append(
            f"{t.number:>6} {t.value:>8.4f} {t.user_attrs['params']:>11,} "
            f"{t.user_attrs['macs']:>13,} {count_bytes(arch):>11,} "
            f"{count_activation_bytes(arch):>11,} "
            f"{'-'.join(str(s.blocks) for s in arch.stages):>10} "
            f"{'-'.join(str(s.channels) for s in arch.stages):>20}  "
            f"{tr['optimizer']} lr {tr['lr']:.3g} batch {tr['batch_size']}"
        )
    return "\n".join(lines)
