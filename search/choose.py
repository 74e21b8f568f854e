"""python -m search.choose: the network to ship, chosen for the study's horizon.

A trial ranks candidates after a short training (the quick profile: 24,000 images);
the network shipped is trained for the horizon (search/horizon.py: 30 epochs of
the whole training set by default, 75 times longer). Short training favours small
networks that learn fast, and settings without augmentation. So the choice is
made again, longer, within a share of the search's training compute in MAC-images
(`SHARE`; a grown network costs many times a trial's MACs per image), in two steps:

1. Successive halving over the study's accuracy/size front and its best few
   networks, each with its trial's own training settings (the hand defaults of
   `TrainConfig` were tried too, and dropped: `SETTINGS`), within a third of that
   share (`FIRST`) counted in the search's images (they cost what the trials did): as many of them
   as allow a look at least two trials long, the best by their trials first (`plan`).
   Each rung spends the same part on its survivors and keeps the best 1/ETA; no run
   is longer than 1/ETA of the horizon.
2. The winner against what the search could not try (`grown`): its copies 2x and 4x
   wider and the hand designs, with its settings, within the user's limits (not the
   quick profile's MAC cap, which bounds a trial's cost), cheapest first, as many as
   the rest of the budget gives a look of two trials or more (`grow_plan`); the best
   look wins (ties: the winner, then the cheaper).

The runs train on the whole training set less the held-out validation images and
are measured on all of those (the quick profile's trials use 20,000 and 2,000 of
them): the final training sees the whole set, and networks a few tenths of a point
apart need the larger validation (on 2,000 images one standard error is 0.6 points
at 92%; on 5,000, 0.4). The test split stays out. Every run is recorded on the
study as it ends, so a stopped choice resumes where it was. The chosen network and
settings become studies/<study>/best.json, what `search.train` then trains.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from optuna.trial import FrozenTrial

from models import ArchSpec, count_macs, count_params
from models.presets import PRESETS, preset
from search.cli import Parser, add_study_args, duration, load_existing, train_command
from search.data import DataError, SearchData, load_dataset, search_split
from search.front import pareto_front
from search.horizon import Horizon, cost
from search.limits import Limits
from search.profile import PROFILES
from search.records import (
    export_trial,
    network_export,
    ranked,
    trial_arch,
    trial_training,
    write_json,
)
from search.study import StudyError
from search.trainer import OutOfMemory, TrainConfig, TrainingDiverged, resolve_device, train

ETA = 3  # each rung keeps 1/ETA
GROW = (2, 4)  # the winner's widths tried at the last look
TOP = 3  # the best trials by validation, besides the front: the short trial's near-ties
# The choice trains at most this share of the search's compute (MAC-images), FIRST of it
# for the halving of the searched networks, counted in the search's images. On the
# final_choice study (its networks at most 20M MACs, the quick profile's cap): at 0.5 no
# grown network gets a look of two trials; at 1.5 the halving is one rung of 117,000
# images (the best 3; trial 139 by 0.7 points), then 139, its 2x copy and resnet-tiny
# at 83,557 each: the 2x copy by 0.6 (94.04% at the horizon against 139's 93.31). At
# 2.0 the halving's first rung took 4 networks at 58,500 images, within 0.5 points of
# each other, and dropped 139; it shipped trial 85 at 2x width: 93.37% at the horizon
# (benchmarks/README.md#final-choice). Longer rungs beat more networks.
SHARE = 1.5
FIRST = 1 / 3
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
    grown: str = ""  # a network the search did not train ("trial 139 at 2x width"), or ""

    @property
    def name(self) -> str:
        if self.grown:
            return f"{self.grown} with trial {self.trial}'s settings"
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
    share: float = SHARE * FIRST,
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


def searched_compute(trials: list[FrozenTrial]) -> int:
    """The search's training compute in MAC-images: each trained trial's last rung times
    its network's MACs per image. The unit of the choice's budget, as networks grown
    from the winner cost many times a trial's MACs per image."""
    return sum(
        max(t.intermediate_values) * t.user_attrs["macs"] for t in trials if t.intermediate_values
    )


def widened(spec: ArchSpec, factor: int) -> ArchSpec:
    """The same network with every width (stem and stages) `factor` times wider."""
    stages = tuple(replace(s, channels=s.channels * factor) for s in spec.stages)
    return replace(spec, stem_channels=spec.stem_channels * factor, stages=stages)


def grown(winner: Candidate, limits: Limits, factors: tuple[int, ...] = GROW) -> list[Candidate]:
    """What the search did not look at longer, with the winner's settings: its copies
    `factors` times wider and the hand designs (models.presets) for this input, those
    that fit the user's limits, cheapest (MACs per image) first. The short trial favours small
    networks that learn fast; at a horizon 25-75 trials long capacity pays: trial 139 of
    the final_choice study at 2x width reached 94.04% at 10 epochs against its own
    93.31% (benchmarks/README.md#final-choice)."""
    s = winner.spec
    named = [(f"trial {winner.trial} at {f}x width", widened(s, f)) for f in factors]
    for name in PRESETS:
        with contextlib.suppress(ValueError):  # too many stages for a small input
            named.append((name, preset(name, s.in_channels, s.input_size, s.num_classes)))
    out, seen = [], {s}
    for label, spec in sorted(named, key=lambda n: (count_macs(n[1]), n[0])):
        if spec not in seen and limits.fits(spec):
            seen.add(spec)
            out.append(replace(winner, spec=spec, grown=label))
    return out


def grow_plan(
    macs: list[int], compute: float, trial_images: int, horizon_images: int, eta: int = ETA
) -> tuple[int, int]:
    """How many of the networks (`macs` per image each, cheapest first, the winner first)
    one look of equal length can compare within `compute` MAC-images, and its length: the
    most networks whose look is at least two trials long (as `plan`'s: a shorter look
    favours the small networks as the trials did), at most the horizon / eta. (1, 0):
    none besides the winner fits."""
    for k in range(len(macs), 1, -1):
        length = int(min(compute / sum(macs[:k]), horizon_images / eta))
        if length >= 2 * trial_images:
            return k, length
    return 1, 0


def user_limits(settings: dict) -> Limits | None:
    """The limits the shipped network must fit, from the study's settings: the budget and
    the user's own; not the profile's cap on MACs per image (the quick profile's keeps a
    CPU trial short; it does not bound the network shipped). None under a latency limit:
    judging a grown network against it needs the table's machine, so none is grown."""
    if settings.get("max_latency_ms") is not None:
        return None
    # "quick+custom": the quick profile with the user's flags (a --max-macs among them, or
    # not: equal to the profile's cap, it is read as the cap)
    profile = PROFILES.get(settings["profile"]["name"].split("+")[0])
    profile_cap = profile.max_macs if profile else None
    macs = settings.get("max_macs")
    return Limits(
        settings["budget"],
        None if macs == profile_cap else macs,
        settings.get("max_bytes"),
        settings.get("weight_dtype", "fp32"),
        settings.get("max_activation_bytes"),
    )


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
                  "settings": c.settings, "macs": count_macs(c.spec), "validation": acc}
                 for acc, c in scored]  # fmt: skip
        # ties: the earlier trial, its own settings, then the order given (sort is stable;
        # the last look's: the winner, then the cheaper)
        scored.sort(key=lambda s: (-s[0], s[1].trial, s[1].settings != "trial"))
        alive = [c for _, c in scored[: max(1, math.ceil(len(scored) / eta))]]
    return alive[0], rows


def most(cands: list[Candidate], lengths: list[int], eta: int = ETA) -> int:
    """The most a halving of `cands` at `lengths` can cost in MAC-images: at each rung,
    its survivors the most expensive."""
    macs = sorted((count_macs(c.spec) for c in cands), reverse=True)
    return sum(n * sum(macs[: math.ceil(len(cands) / eta**r)]) for r, n in enumerate(lengths))


def runs(rows: list[dict]) -> list[dict]:
    """The rows of distinct runs: the winner's last look may be its rung's run again."""
    return list({(r["candidate"], r["images"]): r for r in rows}.values())


def compute(rows: list[dict]) -> int:
    """The choice runs' training compute in MAC-images."""
    return sum(r["images"] * r["macs"] for r in runs(rows))


def run_key(candidate: str, images: int, split: str) -> str:
    """A choice run's name on the study (`choice_runs`, `choice_seconds`); `split` names
    its training and validation images, so a run on other images is never reused."""
    return f"{candidate} @ {images} on {split}"


def split_name(split: SearchData) -> str:
    return f"{len(split.train_y)}+{len(split.val_y)}"


def spent(seconds: dict[str, float], rows: list[dict], split: str) -> float | None:
    """The choice's training seconds; None when a run's time was not recorded (a choice
    begun before they were)."""
    keys = [run_key(r["candidate"], r["images"], split) for r in runs(rows)]
    return round(sum(seconds[k] for k in keys), 1) if all(k in seconds for k in keys) else None


def parse_args(argv: list[str] | None):
    ap = Parser(prog="python -m search.choose", description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--top", type=int, default=TOP, help=f"best trials besides the front ({TOP})")
    ap.add_argument("--share", type=float, default=SHARE,
                    help="the most the choice trains, as a share of the search's training "
                    f"compute in MAC-images ({SHARE})")  # fmt: skip
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
    searched, whole = searched_images(trials), searched_compute(trials)
    budget = args.share * whole
    # The searched networks cost what the trials did: FIRST of the budget, counted in images
    # (fewer of them if their MACs could take more than the whole budget).
    n = len(cands)
    while True:
        k, lengths = plan(n, searched, p["images"], horizon.images, args.share * FIRST)
        if not lengths or most(cands[:k], lengths) <= budget:
            break
        n = k - 1
    print(
        f"choosing for a final training of {horizon.epochs} epochs of the "
        f"{horizon.train_images:,} training images ({horizon.images:,} images), on "
        f"{len(split.train_y):,} training and {len(split.val_y):,} validation images, "
        f"within {args.share:g}x the search's compute ({budget:.3g} MAC-images)"
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

    try:
        if not lengths:
            best = ranked(trials)[0]
            winner = Candidate(best.number, "trial", trial_arch(best), trial_training(best))
            rows: list[dict] = []
            print(
                f"{args.share * FIRST:.2g}x the search's {searched:,} images allow no look of "
                f"two trials ({p['images']:,} images each) or more at its networks, or the "
                f"horizon is too near: no halving, the best trial is trial {best.number}"
            )
        else:
            print(
                f"{len(cands)} networks (the front and the best {args.top}); the best {k} by "
                f"their trials, with their settings, get a longer look within "
                f"{args.share * FIRST:.2g}x the search's {searched:,} images: rungs of "
                f"{', '.join(f'{n:,}' for n in lengths)} images, keeping 1/{ETA} at each",
                flush=True,
            )
            winner, rows = halve(cands[:k], lengths, run)
        limits = user_limits(settings)
        pool = [winner, *grown(winner, limits)] if limits else [winner]
        left = budget - compute(rows)
        g, length = grow_plan([count_macs(c.spec) for c in pool], left, p["images"], horizon.images)
        if limits is None:
            print("a latency limit: no wider or hand-designed network is tried (it would need "
                  "the latency table's machine to time it)")  # fmt: skip
        elif len(pool) == 1:
            print("no wider or hand-designed network fits the limits")
        elif g < 2:
            print(
                f"the rest of the budget ({max(left, 0):.3g} MAC-images) allows no look of two "
                f"trials at the {len(pool) - 1} wider or hand-designed networks that fit"
            )
        if g < 2:
            if not rows:
                print("the trials' ranking stands (--share sets the budget)")
        else:
            print(
                f"{winner.name} against {g - 1} networks the search could not try, with its "
                f"settings, cheapest first: {', '.join(c.grown for c in pool[1:g])}; "
                f"{length:,} images each",
                flush=True,
            )
            winner, more = halve(pool[:g], [length], run, eta=g)
            rows += [r | {"rung": len(lengths) + 1} for r in more]
    except KeyboardInterrupt:
        print("\ninterrupted: the runs so far are kept; run it again to go on", file=sys.stderr)
        return 130
    trial = next(t for t in trials if t.number == winner.trial)
    once, used = runs(rows), compute(rows)
    choice = {
        "trial": winner.trial,
        "settings": winner.settings,
        "network": winner.name,
        "grown": winner.grown or None,
        "horizon": horizon.to_dict(),
        "rungs": rows,
        "images_trained": sum(r["images"] for r in once),
        "compute": used,  # MAC-images
        "share_of_search_compute": round(used / whole, 3),
        # its runs' training time, those of earlier calls too (a resumed choice ran them)
        "seconds": spent(seconds, rows, on),
    }
    study.set_user_attr("choice", {k: v for k, v in choice.items() if k != "rungs"})
    export = export_trial(study, trial) | {"training": winner.cfg.to_dict(), "choice": choice}
    if winner.grown:  # what describes the network and its score is the last look's
        look = run_key(winner.name, rows[-1]["images"], on)
        export |= network_export(winner.spec) | {
            "validation": {"accuracy": done[look], "curve": None, "loss": None,
                           "images": len(split.val_y), "train_images": len(split.train_y),
                           "images_trained": rows[-1]["images"]},
            "train_seconds": seconds.get(look), "device": str(device),
        }  # fmt: skip
    out = Path(args.out or Path("studies") / args.study_name / "best.json")
    write_json(out, export)
    print(
        f"ship: {winner.name} ({count_params(winner.spec):,} params); wrote {out}\n"
        f"next: {train_command(out, horizon.epochs, args.data_dir)}\n"
        f"      {cost(3, horizon.epochs, horizon.train_images, None)}; this choice trained "
        f"{choice['images_trained']:,} images, {choice['share_of_search_compute']:g}x the "
        "search's compute"
        + (f", in {duration(choice['seconds'])}" if choice["seconds"] is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
