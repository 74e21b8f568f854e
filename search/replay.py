"""python -m search.replay: train a stored trial again from its record and compare.

The record holds everything a trial depends on: the architecture, the
training settings with the trial's seed, and the study's settings (dataset,
split seed and sizes, profile). On the CPU, with the same thread count, the
recomputed validation accuracy equals the stored one bit for bit (exit 0);
otherwise the command says how far apart they are (exit 1).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
from optuna.trial import TrialState

from search.cli import Parser, add_study_args, load_existing
from search.data import DataError, load_dataset, search_split
from search.limits import Limits
from search.profile import Profile
from search.study import StudyError
from search.trainer import OutOfMemory, TrainingDiverged, resolve_device
from search.worker import Search, replay


def profile_of(settings: dict[str, Any]) -> Profile:
    p = dict(settings["profile"])
    return Profile(**p | {"rungs": tuple(p["rungs"]), "batch_sizes": tuple(p["batch_sizes"])})


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m search.replay", description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--trial", type=int, required=True, help="the trial number")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    args = ap.parse_args(argv)
    try:
        study = load_existing(args)
        trials = study.get_trials(deepcopy=False)
        if not 0 <= args.trial < len(trials):
            raise StudyError(f"study {args.study_name!r} has no trial {args.trial}")
        trial = trials[args.trial]
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not (
            trial.intermediate_values
        ):
            raise StudyError(f"trial {args.trial} was never trained ({trial.state.name})")
        settings = study.user_attrs["settings"]
        device = resolve_device(args.device)
        profile = profile_of(settings)
        ds = load_dataset(settings["dataset"], args.data_dir)
    except (StudyError, DataError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = re.search(r"\((\d+) threads\)", trial.user_attrs.get("device", ""))
    if device.type == "cpu" and threads:
        torch.set_num_threads(int(threads.group(1)))  # CPU sums depend on the thread count
    data = search_split(ds, settings["seed"], profile.train_images, profile.val_images)
    search = Search(data.to(device), Limits(settings["budget"]), profile, settings["seed"], device)
    print(
        f"replaying trial {trial.number} of {study.study_name!r} ({trial.state.name}, "
        f"{trial.user_attrs['params']:,} params) on {trial.user_attrs.get('device')} ...",
        flush=True,
    )
    try:
        stored, again = replay(trial, search)
    except (TrainingDiverged, OutOfMemory) as e:
        print(f"error: the replay did not finish: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"stored validation accuracy {stored!r}, recomputed {again!r}")
    if stored == again:
        print("equal: the trial replays exactly")
        return 0
    print(f"they differ by {again - stored:+.6f} (GPU kernels are not bit-exact)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
