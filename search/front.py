"""Every smaller budget from one study: the accuracy/size front and the best under a limit.

A study searched under a 5M budget has also trained hundreds of smaller
candidates; the best completed trial within a smaller budget is as good an
answer for that budget as a new search would give at its start. The front is
the set of completed trials that nothing beats on both counts: no other is
smaller and at least as accurate.
"""

from __future__ import annotations

from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from models.complexity import count_activation_bytes, count_bytes
from search.records import ranked, trial_arch
from search.study import StudyError


@dataclass(frozen=True)
class Within:
    """Optional limits on what a trial may cost; None is no limit."""

    params: int | None = None
    macs: int | None = None
    bytes: int | None = None
    weight_dtype: str = "fp32"
    activation_bytes: int | None = None

    def admits(self, t: FrozenTrial) -> bool:
        a = t.user_attrs
        return (
            (self.params is None or a["params"] <= self.params)
            and (self.macs is None or a["macs"] <= self.macs)
            and (self.bytes is None or count_bytes(trial_arch(t), self.weight_dtype) <= self.bytes)
            and (
                self.activation_bytes is None
                or count_activation_bytes(trial_arch(t), self.weight_dtype) <= self.activation_bytes
            )
        )

    def describe(self) -> str:
        parts = [
            f"{k} {v:,}"
            for k, v in (
                ("params", self.params),
                ("MACs", self.macs),
                ("bytes", self.bytes),
                ("activation bytes", self.activation_bytes),
            )
            if v is not None
        ]
        return ", ".join(parts) or "no limit"


def pareto_front(trials: list[FrozenTrial], within: Within = Within()) -> list[FrozenTrial]:
    """Completed trials within the limits that no other dominates, smallest first.

    Dominated: another trial has no more parameters and at least the accuracy
    (and is smaller or more accurate, or the same and earlier).
    """
    done = [t for t in trials if t.state == TrialState.COMPLETE and within.admits(t)]
    front, best = [], float("-inf")
    for t in sorted(done, key=lambda t: (t.user_attrs["params"], -t.value, t.number)):
        if t.value > best:
            front.append(t)
            best = t.value
    return front


def best_within(trials: list[FrozenTrial], within: Within) -> FrozenTrial:
    """The most accurate completed trial within the limits; StudyError (naming the
    smallest completed trial) when none fits."""
    fits = [t for t in ranked(trials) if within.admits(t)]
    if fits:  # of equally accurate trials, the smallest
        return min(fits, key=lambda t: (-t.value, t.user_attrs["params"], t.number))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        raise StudyError("the study has no completed trial yet")
    small = min(done, key=lambda t: (t.user_attrs["params"], t.number))
    raise StudyError(
        f"no completed trial fits {within.describe()}; the smallest is trial {small.number} "
        f"with {small.user_attrs['params']:,} params and {small.user_attrs['macs']:,} MACs "
        f"(validation accuracy {small.value:.4f})"
    )


def train_command(study_name: str, trial: int, storage: str | None = None) -> str:
    """The command that final-trains a trial of a study (its settings, whole training set).

    A storage URL with a password is left out (the command is printed and saved):
    the command then reads it from $NAS_STORAGE, as the search did."""
    where = f" --storage {storage}" if storage and not _has_password(storage) else ""
    return f"python -m search.train --study-name {study_name}{where} --trial {trial}"


def _has_password(url: str) -> bool:
    try:
        return make_url(url).password is not None
    except ArgumentError:
        return True  # unreadable: do not print it


def front_rows(
    front: list[FrozenTrial], study_name: str, storage: str | None = None
) -> list[dict[str, object]]:
    """One row per front trial: its sizes (weight bytes at fp32 and fp16, peak
    activation bytes at fp32), its validation accuracy, and the command that
    final-trains it."""
    rows = []
    for t in front:
        spec = trial_arch(t)
        rows.append(
            {
                "trial": t.number,
                "params": t.user_attrs["params"],
                "macs": t.user_attrs["macs"],
                "bytes_fp32": count_bytes(spec, "fp32"),
                "bytes_fp16": count_bytes(spec, "fp16"),
                "activation_bytes_fp32": count_activation_bytes(spec, "fp32"),
                **{k: t.user_attrs[k] for k in ("latency_ms",) if k in t.user_attrs},
                "validation": t.value,
                "train": train_command(study_name, t.number, storage),
            }
        )
    return rows
