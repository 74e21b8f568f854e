"""python -m search.export: a trial as JSON that rebuilds the exact model.

`--budget 1M` (and `--max-macs`, `--max-bytes`) answers a smaller budget from
the same study: the best completed trial within it. `--front` writes every
trial on the accuracy/size front, smallest first, each in the export format.

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

from models.complexity import DTYPE_BYTES
from search.cli import Parser, add_study_args, load_existing, parse_bytes, parse_count
from search.front import Within, best_within, front_rows, pareto_front
from search.records import best_trial, export_trial, write_json
from search.study import StudyError

FRONT_FORMAT = "budget-nas-front/1"


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


def print_front(rows: list[dict], within: Within) -> None:
    print(f"front of validation accuracy against parameters ({within.describe()}):")
    print(
        f"{'trial':>6} {'params':>11} {'MACs':>13} {'fp32 bytes':>11} {'fp16 bytes':>11} "
        f"{'activations':>11} {'val acc':>8}  final training"
    )
    for r in rows:
        print(
            f"{r['trial']:>6} {r['params']:>11,} {r['macs']:>13,} {r['bytes_fp32']:>11,} "
            f"{r['bytes_fp16']:>11,} {r['activation_bytes_fp32']:>11,} "
            f"{r['validation']:>8.4f}  {r['train']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m search.export", description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--trial", type=int, help="trial number (default: the best)")
    ap.add_argument("--budget", type=parse_count, help="the best trial within this many params")
    ap.add_argument("--max-macs", type=parse_count, help="... and this many MACs per image")
    ap.add_argument("--max-bytes", type=parse_bytes, help="... and weights this size: 4MB")
    ap.add_argument(
        "--max-activation-bytes", type=parse_bytes, help="... and a peak of activations this size"
    )
    ap.add_argument("--weight-dtype", default="fp32", choices=list(DTYPE_BYTES))
    ap.add_argument("--front", action="store_true", help="every trial on the accuracy/size front")
    ap.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    args = ap.parse_args(argv)
    within = Within(
        args.budget, args.max_macs, args.max_bytes, args.weight_dtype, args.max_activation_bytes
    )
    if args.trial is not None and (args.front or within != Within(weight_dtype=args.weight_dtype)):
        ap.error("--trial names one trial; it does not go with --front or limits")
    try:
        study = load_existing(args)
        trials = study.get_trials(deepcopy=False)
        if args.front:
            front = pareto_front(trials, within)
            if not front:
                best_within(trials, within)  # raises, naming the smallest trial
            rows = front_rows(front, study.study_name, args.storage)
            data = {
                "format": FRONT_FORMAT,
                "study_name": study.study_name,
                "within": within.describe(),
                "rows": rows,
                "front": [export_trial(study, t) for t in front],
            }
        elif args.trial is None:
            data = export_trial(study, best_within(trials, within))
        else:
            data = export_trial(study, select_trial(study, args.trial))
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.front:
        print_front(data["rows"], within)
    if args.output:
        write_json(Path(args.output), data)
        what = (
            f"{len(data['front'])} front trials"
            if args.front
            else f"trial {data['trial']}, {data['params']:,} params, "
            f"validation accuracy {data['validation']['accuracy']:.4f}"
        )
        print(f"wrote {args.output}: {what}")
    elif not args.front:
        print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
