"""python -m search.export: a trial as JSON that rebuilds the exact model.

The file wraps the architecture (DESIGN.md's format, under "architecture")
with what it cost, how it was trained and how it scored, so `models.load_arch`
and `python -m search.train` both read it directly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.cli import Parser, add_study_args, load_existing, write_atomic
from search.env import versions
from search.objective import trial_arch
from search.study import StudyError, best_trial

EXPORT_FORMAT = "budget-nas-export/1"


def export_trial(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    spec = trial_arch(trial)
    attrs, meta = trial.user_attrs, study.user_attrs
    return {
        "format": EXPORT_FORMAT,
        "architecture": spec.to_dict(),
        "params": attrs["params"],
        "macs": attrs["macs"],
        "budget": meta.get("budget"),
        "dataset": meta.get("dataset"),
        "training": attrs["training"],
        "validation": {
            "accuracy": trial.value,
            "curve": attrs.get("val_curve"),
            "loss": attrs.get("val_loss"),
            "images": meta.get("val_images"),
            "train_images": meta.get("train_images"),
        },
        "study_name": study.study_name,
        "trial": trial.number,
        "seed": attrs.get("seed"),
        "search_seed": meta.get("seed"),
        "space_version": meta.get("space_version"),
        "train_seconds": attrs.get("train_seconds"),
        "device": attrs.get("device"),
        "versions": versions(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def select_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    if number is None:
        best = best_trial(study)
        if best is None:
            raise StudyError(f"study {study.study_name!r} has no completed trial yet")
        return best
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise StudyError(f"study {study.study_name!r} has no trial {number} (it has {len(trials)})")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        raise StudyError(
            f"trial {number} is {t.state.name}, not COMPLETE; only completed "
            "trials have a final validation accuracy to export"
        )
    return t


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m search.export", description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--trial", type=int, help="trial number (default: the best)")
    ap.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    args = ap.parse_args(argv)
    try:
        study = load_existing(args)
        data = export_trial(study, select_trial(study, args.trial))
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        write_json(Path(args.output), data)
        print(
            f"wrote {args.output}: trial {data['trial']}, {data['params']:,} params, "
            f"validation accuracy {data['validation']['accuracy']:.4f}"
        )
    else:
        print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
