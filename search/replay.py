"""python -m search.replay: train a stored trial again from its record and compare.

The record holds everything a trial depends on: the architecture, the
training settings with the trial's seed, and the study's settings (dataset,
split seed and sizes, profile). On the CPU, with the same thread count, the
recomputed validation accuracy equals the stored one bit for bit (exit 0). On a
GPU it cannot (see CUDA_TOLERANCE), so there it passes within a stated tolerance.
Otherwise the command says how far apart they are (exit 1).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any

import torch
from optuna.trial import FrozenTrial, TrialState

from search.cli import Parser, add_study_args, load_existing
from search.data import DataError, load_dataset, search_split
from search.limits import Limits
from search.profile import Profile
from search.records import trial_arch, trial_training
from search.study import StudyError
from search.trainer import EvalStats, OutOfMemory, TrainingDiverged, resolve_device
from search.worker import Search


def replay(trial: FrozenTrial, search: Search) -> tuple[float, float]:
    """Train a recorded trial again from its record: (stored, recomputed) validation
    accuracy at the last rung it reached (a pruned trial stops where it was pruned)."""
    reached = max(trial.intermediate_values)
    stored = (
        trial.value if trial.state == TrialState.COMPLETE else trial.intermediate_values[reached]
    )
    seen: list[float] = []

    class Reached(Exception):
        pass

    def at_rung(s: EvalStats) -> None:
        seen.append(s.val_acc)
        if s.images >= reached:
            raise Reached

    with contextlib.suppress(Reached):
        search.train(trial_arch(trial), trial_training(trial), at_rung)
    return stored, seen[-1]


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
    # search.env.device_name: "<CPU model> (N threads)" on a CPU, the GPU's name on CUDA
    recorded_on_cpu = trial.user_attrs.get("device", "").endswith("threads)")
    ok, verdict = judge(stored, again, recorded_on_cpu and device.type == "cpu")
    print(verdict)
    return 0 if ok else 1


# cudnn.benchmark picks kernels by timing them, and some CUDA backward kernels add in
# whatever order threads finish: a trial that ran on a GPU, or a replay on one, cannot be
# bit-exact, so it is judged within this much validation accuracy. Provisional: one
# point, not yet measured on a GPU (benchmarks/README.md says when it is).
CUDA_TOLERANCE = 0.01


def judge(stored: float, again: float, both_on_cpu: bool) -> tuple[bool, str]:
    """Whether a replay reproduces the stored accuracy, and the line that says so: bit
    for bit when the trial and its replay ran on a CPU, else within CUDA_TOLERANCE."""
    if stored == again:
        return True, "equal: the trial replays exactly"
    diff = again - stored
    if not both_on_cpu:
        ok = abs(diff) <= CUDA_TOLERANCE
        return ok, (
            f"they differ by {diff:+.6f}: {'within' if ok else 'outside'} the GPU tolerance "
            f"of {CUDA_TOLERANCE} (GPU kernels are not bit-exact)"
        )
    return False, (
        f"they differ by {diff:+.6f}; on the CPU a replay is exact with the same torch and "
        "thread count, so something else changed"
    )


if __name__ == "__main__":
    sys.exit(main())
