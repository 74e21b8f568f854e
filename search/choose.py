"""python -m search.choose: the network to ship, chosen for the study's horizon.

A trial ranks candidates after a short training (the quick profile: 24,000 images);
the network shipped is trained for the horizon (search/horizon.py: 30 epochs of
the whole training set by default, 75 times longer). Short training favours small
networks that learn fast, and settings without augmentation. So the choice is
made again, longer: successive halving over the study's accuracy/size front and its
best few networks, each with its trial's own training settings (the hand defaults
of `TrainConfig` were tried too, and dropped: `SETTINGS`), within half the images
the search trained (`SHARE`): as many of them as that allows a look at least two
trials long, the best by their trials first (`plan`). Its runs train on the
whole training set less the held-out validation images and are measured on all of
those (the quick profile's trials use 20,000 and 2,000 of them): the final
training sees the whole set, and networks a few tenths of a point apart need the
larger validation (on 2,000 images one standard error is 0.6 points at 92%; on
5,000, 0.4). The test split stays out.
Each rung spends the same part of that budget on its survivors and keeps the best
1/ETA; no run is longer than 1/ETA of the horizon. Every run is recorded on the study as it
ends, so a stopped choice resumes where it was. The chosen network and settings
become studies/<study>/best.json, what `search.train` then trains.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from optuna.trial import FrozenTrial

from models import ArchSpec, count_params
from search.cli import Parser, add_study_args, duration, load_existing, train_command
from search.data import DataError, SearchData, load_dataset, search_split
from search.front import pareto_front
from search.horizon import Horizon, cost
from search.records import export_trial, ranked, trial_arch, trial_training, write_json
from search.study import StudyError
from search.trainer import OutOfMemory, TrainConfig, TrainingDiverged, resolve_device, train

ETA = 3  # each rung keeps 1/ETA
TOP = 3  # the best trials by validation, besides the front: the short trial's near-ties
SHARE = 0.5  # the choice trains at most this share of the images the search trained
# The training settings each network is tried with: the trial's own. TrainConfig's hand
# defaults ("hand") were tried beside them and lost 5 of 6 networks by 5-7 points at the
# first rung (66,666 images) and the chosen network by 1.1 points at the horizon (10
# epochs, 2 seeds; benchmarks/README.md#final-choice), at twice the choice's cost.
SETTINGS: tuple[str, ...] = ("trial",)


@dataclass(frozen=True)
class Candidate:
    trial: int
    settings: str  # one of SETTINGS
    spec: ArchSpec
    cfg: TrainConfig

    @property
    def name(self) -> str:
        return f"trial {self.trial} with {self.settings} settings"


def candidates(
    trials: list[FrozenTrial], top: int = TOP, settings: tuple[str, ...] = SETTINGS
) -> list[Candidate]:
    """The front and the `top` best networks, each with each of `settings` (SETTINGS).
    A network that several trials trained (TPE refines a winner's learning rate) comes
    once, as its best trial: a longer look at each copy would cost twice as much to
    rank settings the short trial already ranked."""
    best: dict[ArchSpec, FrozenTrial] = {}  # the best trial of each network, best first
    for t in ranked(trials):
        best.setdefault(trial_arch(t), t)
    # a front trial is already its network's best: the most accurate of its size
    chosen = {t.number: t for t in [*pareto_front(trials), *list(best.values())[:top]]}
    out = []
    for t in sorted(chosen.values(), key=lambda t: (-t.value, t.number)):  # best first
        cfg = trial_training(t)
        for kind in settings:
            own = cfg if kind == "trial" else TrainConfig(seed=cfg.seed)
            out.append(Candidate(t.number, kind, trial_arch(t), own))
    return out


def plan(
    n: int,
    search_images: int,
    trial_images: int,
    horizon_images: int,
    share: float = SHARE,
    eta: int = ETA,
) -> tuple[int, list[int]]:
    """How many of `n` candidates (the best by their trials first) get a longer look,
    and the training images of each rung: successive halving within `share` of the
    images the search trained, each rung an equal part of it (budgeted halving, Karnin
    et al. 2013), no run longer than the horizon / eta (a look ahead, not the final
    training) nor shorter than two trials (a trial already measured that). As many
    candidates as that allows; (1, []) when it allows none: the trials' ranking stands."""
    budget = share * search_images
    for k in range(n, 1, -1):
        rungs = max(1, math.ceil(math.log(k, eta) - 1e-9))
        alive = [math.ceil(k / eta**r) for r in range(rungs)]
        lengths = [
            int(min(budget / rungs / a, horizon_images / eta ** (rungs - r)))
            for r, a in enumerate(alive)
        ]
        if lengths[0] >= 2 * trial_images:
            return k, lengths
    return 1, []


def searched_images(trials: list[FrozenTrial]) -> int:
    """The training images the search's trials saw: each trained one's last rung."""
    return sum(max(t.intermediate_values) for t in trials if t.intermediate_values)


def halve(
    cands: list[Candidate],
    lengths: list[int],
    run: Callable[[Candidate, int], float],
    eta: int = ETA,
) -> tuple[Candidate, list[dict]]:
    """Successive halving: each rung trains the candidates left for its length and keeps
    the best 1/eta (ties: the earlier trial). The winner and every run's row."""
    alive, rows = list(cands), []
    for rung, length in enumerate(lengths, 1):
        scored = [(run(c, length), c) for c in alive]
        rows += [{"rung": rung, "images": length, "candidate": c.name, "trial": c.trial,
                  "settings": c.settings, "validation": acc} for acc, c in scored]  # fmt: skip
        scored.sort(key=lambda s: (-s[0], s[1].trial, s[1].settings != "trial"))
        alive = [c for _, c in scored[: max(1, math.ceil(len(scored) / eta))]]
    return alive[0], rows


def run_key(candidate: str, images: int, split: str) -> str:
    """A choice run's name on the study (`choice_runs`, `choice_seconds`); `split` names
    its training and validation images, so a run on other images is never reused."""
    return f"{candidate} @ {images} on {split}"


def split_name(split: SearchData) -> str:
    return f"{len(split.train_y)}+{len(split.val_y)}"


def spent(seconds: dict[str, float], rows: list[dict], split: str) -> float | None:
    """The choice's training seconds; None when a run's time was not recorded (a choice
    begun before they were)."""
    keys = [run_key(r["candidate"], r["images"], split) for r in rows]
    return round(sum(seconds[k] for k in keys), 1) if all(k in seconds for k in keys) else None


def parse_args(argv: list[str] | None):
    ap = Parser(prog="python -m search.choose", description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--top", type=int, default=TOP, help=f"best trials besides the front ({TOP})")
    ap.add_argument("--share", type=float, default=SHARE,
                    help="the most the choice trains, as a share of the images the search "
                    f"trained ({SHARE})")  # fmt: skip
    ap.add_argument("-o", "--out", help="default studies/<study>/best.json")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error(f"--top must be at least 1, got {args.top}")
    if not args.share > 0:
        ap.error(f"--share must be above 0, got {args.share}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        study = load_existing(args)
        settings = study.user_attrs.get("settings")
        if settings is None or "horizon" not in study.user_attrs:
            raise StudyError(f"study {args.study_name!r} has no horizon: run search.run on it")
        trials = study.get_trials(deepcopy=False)
        cands = candidates(trials, args.top)
        if not cands:
            raise StudyError(f"study {args.study_name!r} has no completed trial yet")
        p = settings["profile"]
        # the trials' split without the profile's subsets: the same held-out images
        split = search_split(load_dataset(settings["dataset"], args.data_dir), settings["seed"])
    except (ValueError, DataError, StudyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    horizon = Horizon.from_dict(study.user_attrs["horizon"])
    searched = searched_images(trials)
    k, lengths = plan(len(cands), searched, p["images"], horizon.images, args.share)
    looked = cands[:k]
    print(
        f"choosing for a final training of {horizon.epochs} epochs of the "
        f"{horizon.train_images:,} training images ({horizon.images:,} images), on "
        f"{len(split.train_y):,} training and {len(split.val_y):,} validation images"
    )
    on = split_name(split)
    done: dict[str, float] = dict(study.user_attrs.get("choice_runs", {}))
    seconds: dict[str, float] = dict(study.user_attrs.get("choice_seconds", {}))

    def run(c: Candidate, length: int) -> float:
        key = run_key(c.name, length, on)
        if key not in done:
            epochs = length / len(split.train_y)
            cfg = replace(c.cfg, images=length)
            start = time.perf_counter()
            try:
                done[key] = train(c.spec, cfg, split.train_val, device=device).history[-1].val_acc
            except (TrainingDiverged, OutOfMemory) as e:
                print(f"  {c.name}: {e}; counted as 0", flush=True)
                done[key] = 0.0
            seconds[key] = round(time.perf_counter() - start, 1)
            study.set_user_attr("choice_seconds", seconds)  # what the choice cost, resumed too
            study.set_user_attr("choice_runs", done)  # kept as it ends: a stop resumes here
            print(
                f"  {length:,} images ({epochs:.1f} epochs): {c.name} "
                f"({count_params(c.spec):,} params): validation {done[key]:.4f}",
                flush=True,
            )
        return done[key]

    if not lengths:
        best = ranked(trials)[0]
        winner = Candidate(best.number, "trial", trial_arch(best), trial_training(best))
        rows: list[dict] = []
        print(
            f"{args.share:g} of the search's {searched:,} images allows no look of two "
            f"trials ({p['images']:,} images each) or more, or the horizon is too near: "
            "the trials' ranking stands (--share sets the budget)"
        )
    else:
        print(
            f"{len(cands)} networks (the front and the best {args.top}); the best {k} by "
            f"their trials, with their settings, get a longer look within {args.share:g} of "
            f"the search's {searched:,} images: rungs of "
            f"{', '.join(f'{n:,}' for n in lengths)} images, keeping 1/{ETA} at each",
            flush=True,
        )
        try:
            winner, rows = halve(looked, lengths, run)
        except KeyboardInterrupt:
            print("\ninterrupted: the runs so far are kept; run it again to go on", file=sys.stderr)
            return 130
    trial = next(t for t in trials if t.number == winner.trial)
    choice = {
        "trial": winner.trial,
        "settings": winner.settings,
        "horizon": horizon.to_dict(),
        "rungs": rows,
        "images_trained": sum(r["images"] for r in rows),
        # its runs' training time, those of earlier calls too (a resumed choice ran them)
        "seconds": spent(seconds, rows, on),
    }
    study.set_user_attr("choice", {k: v for k, v in choice.items() if k != "rungs"})
    export = export_trial(study, trial) | {"training": winner.cfg.to_dict(), "choice": choice}
    out = Path(args.out or Path("studies") / args.study_name / "best.json")
    write_json(out, export)
    print(
        f"ship: {winner.name} ({count_params(winner.spec):,} params); wrote {out}\n"
        f"next: {train_command(out, horizon.epochs, args.data_dir)}\n"
        f"      {cost(3, horizon.epochs, horizon.train_images, None)}; this choice trained "
        f"{choice['images_trained']:,} images"
        + (f" in {duration(choice['seconds'])}" if choice["seconds"] is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
