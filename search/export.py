"""python -m search.export: a trial as JSON that rebuilds the exact model.

The file wraps the architecture (DESIGN.md's format, under "architecture")
with what it cost, how it was trained and how it scored, so `models.load_arch`
and `python -m search.train` both read it directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.cli import Parser, add_study_args, load_existing
from search.records import best_trial, export_trial, write_json
from search.study import StudyError


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
