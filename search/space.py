"""The search space: the only code that calls `trial.suggest_*`.

Distributions are fixed per parameter name (per-stage names are conditional
on the stage count), so multivariate TPE models them jointly. The first width
is sampled last, as a fraction of the widths that fit the limits given
everything else (`width_frac`): candidates that cannot fit are rare, and every
width that fits stays reachable, since size grows with width. Sizes derived
from the input (the pool) are relative to it, so one space serves 28 px and
32 px images alike. Every preset that fits the limits is a point of this
space: `preset_params` gives the parameters that `suggest_arch` turns back
into it.

Training settings are sampled only for a candidate that passed the gate, so a
rejection teaches the sampler about sizes, not about learning rates. What is
sampled here and what the trainer fixes follows benchmarks/trial_recipe.py: label
smoothing stays sampled, since fixing it (at 0 or at 0.1) did not help a short
trial (benchmarks/README.md, Trial recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from models.spec import ArchSpec, StageSpec, last_side, max_stages
from search.limits import Limits, over
from search.profile import Profile
from search.trainer import TrainConfig

# Bump when a distribution changes: resuming a study made with another space
# would mix incomparable trials, so the study records this and a resume is refused.
SPACE_VERSION = "2"

WIDTH_MIN, WIDTH_MAX, WIDTH_STEP = 16, 128, 8  # the first stage's width
GROWTHS = (1.0, 1.5, 2.0)
BLOCKS = (1, 4)
STEM_KERNELS = (3, 5, 7)
KERNELS = (3, 5, 7)
SKIP_KERNELS = (1, 3)
POOL_DIVS = (1, 2, 4)  # pool = last side // div: 1 is global average pooling
ACTIVATIONS = ("relu", "gelu")
CROP_PADDINGS = (0, 2, 4)
CUTOUTS = (0, 8, 12)
LR = {"sgd": (0.01, 0.4), "adamw": (3e-4, 5e-3)}
WEIGHT_DECAY = {"sgd": (1e-5, 2e-3), "adamw": (1e-3, 0.2)}

Shape = tuple[int, int, int]  # input channels, input size, classes


def stage_widths(width: int, growth: float, n: int) -> list[int]:
    """width * growth**i, rounded to a multiple of 8."""
    return [max(8, round(width * growth**i / 8) * 8) for i in range(n)]


def widest(make: Callable[[int], ArchSpec], limits: Limits) -> int | None:
    """The widest first width that fits the limits (size grows with width), or None."""
    lo, hi = 0, (WIDTH_MAX - WIDTH_MIN) // WIDTH_STEP
    if not limits.fits(make(WIDTH_MIN)):
        return None
    while lo < hi:  # invariant: WIDTH_MIN + lo * step fits
        mid = (lo + hi + 1) // 2
        if limits.fits(make(WIDTH_MIN + mid * WIDTH_STEP)):
            lo = mid
        else:
            hi = mid - 1
    return WIDTH_MIN + lo * WIDTH_STEP


def width_at(frac: float, widest_fit: int) -> int:
    steps = (widest_fit - WIDTH_MIN) // WIDTH_STEP
    return WIDTH_MIN + round(frac * steps) * WIDTH_STEP


def suggest_arch(trial: optuna.Trial, shape: Shape, limits: Limits) -> ArchSpec:
    """An architecture; over the limits only when even the narrowest width is."""
    in_channels, size, num_classes = shape
    n = trial.suggest_int("stages", 1, max_stages(size))
    growth = trial.suggest_categorical("growth", GROWTHS)
    stages = [
        (
            trial.suggest_int(f"blocks_{i}", *BLOCKS),
            trial.suggest_categorical(f"kernel_{i}", KERNELS),
            trial.suggest_categorical(f"skip_kernel_{i}", SKIP_KERNELS),
        )
        for i in range(1, n + 1)
    ]
    pool = max(1, last_side(size, n) // trial.suggest_categorical("pool_div", POOL_DIVS))
    stem_kernel = trial.suggest_categorical("stem_kernel", STEM_KERNELS)
    activation = trial.suggest_categorical("activation", ACTIVATIONS)
    dropout = trial.suggest_float("dropout", 0.0, 0.3, step=0.05)

    def make(width: int) -> ArchSpec:
        return ArchSpec(
            stages=tuple(
                StageSpec(blocks=b, channels=c, kernel=k, skip_kernel=sk)
                for (b, k, sk), c in zip(stages, stage_widths(width, growth, n), strict=True)
            ),
            stem_channels=width,
            stem_kernel=stem_kernel,
            in_channels=in_channels,
            input_size=size,
            num_classes=num_classes,
            pool=pool,
            activation=activation,
            dropout=dropout,
        )

    frac = trial.suggest_float("width_frac", 0.0, 1.0)
    fit = widest(make, limits)
    return make(WIDTH_MIN if fit is None else width_at(frac, fit))


def suggest_training(trial: optuna.Trial, profile: Profile, n_train: int, seed: int) -> TrainConfig:
    """Training settings, sampled only for a candidate that passed the gate."""
    opt = trial.suggest_categorical("optimizer", ("sgd", "adamw"))
    return TrainConfig(
        images=profile.images,
        batch_size=trial.suggest_categorical("batch_size", profile.batch_choices(n_train)),
        optimizer=opt,
        lr=trial.suggest_float(f"lr_{opt}", *LR[opt], log=True),
        weight_decay=trial.suggest_float(f"weight_decay_{opt}", *WEIGHT_DECAY[opt], log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2, step=0.05),
        schedule=trial.suggest_categorical("schedule", ("onecycle", "cosine")),
        crop_padding=trial.suggest_categorical("crop_padding", CROP_PADDINGS),
        flip=trial.suggest_categorical("flip", (False, True)),
        cutout=trial.suggest_categorical("cutout", CUTOUTS),
        seed=seed,
    )


def preset_params(spec: ArchSpec, limits: Limits) -> dict[str, Any]:
    """The architecture parameters of a preset, for `study.enqueue_trial` (a warm start).

    Raises ValueError when the spec is not a point of the space, or does not fit
    the limits (then no `width_frac` gives it).
    """
    s, width, n = spec.stages, spec.stem_channels, len(spec.stages)
    growth = next(
        (g for g in GROWTHS if stage_widths(width, g, n) == [x.channels for x in s]), None
    )
    side = spec.feature_sizes[-1]
    pool_div = next((d for d in POOL_DIVS if max(1, side // d) == spec.pool), None)
    checks = [
        (n <= max_stages(spec.input_size), "stages"),
        (
            WIDTH_MIN <= width <= WIDTH_MAX and (width - WIDTH_MIN) % WIDTH_STEP == 0,
            "stem/first width",
        ),
        (growth is not None, "stage widths (first width x growth)"),
        (all(BLOCKS[0] <= x.blocks <= BLOCKS[1] for x in s), "blocks"),
        (all(x.kernel in KERNELS for x in s), "kernels"),
        (all(x.skip_kernel in SKIP_KERNELS for x in s), "skip kernels"),
        (spec.stem_kernel in STEM_KERNELS, "stem kernel"),
        (pool_div is not None, "pool"),
        (spec.activation in ACTIVATIONS, "activation"),
        (
            spec.dropout <= 0.3 and abs(spec.dropout / 0.05 - round(spec.dropout / 0.05)) < 1e-9,
            "dropout",
        ),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise ValueError(f"architecture is not a point of the search space: {', '.join(bad)}")
    params: dict[str, Any] = {
        "stages": n,
        "growth": growth,
        "pool_div": pool_div,
        "stem_kernel": spec.stem_kernel,
        "activation": spec.activation,
        "dropout": spec.dropout,
    }
    for i, x in enumerate(s, 1):
        params |= {
            f"blocks_{i}": x.blocks,
            f"kernel_{i}": x.kernel,
            f"skip_kernel_{i}": x.skip_kernel,
        }
    if not limits.fits(spec):
        raise ValueError(f"it does not fit the limits ({limits.describe()})")
    probe = dict(params, width_frac=0.0)
    fit = widest(lambda w: _with_width(probe, spec, w), limits)
    assert fit is not None and fit >= width  # spec fits, and size grows with width
    steps = (fit - WIDTH_MIN) // WIDTH_STEP
    params["width_frac"] = (width - WIDTH_MIN) / WIDTH_STEP / steps if steps else 0.0
    return params


def _with_width(params: dict[str, Any], spec: ArchSpec, width: int) -> ArchSpec:
    """The preset's architecture at another first width."""
    widths = stage_widths(width, params["growth"], params["stages"])
    stages = tuple(
        StageSpec(x.blocks, c, x.kernel, x.skip_kernel)
        for x, c in zip(spec.stages, widths, strict=True)
    )
    return ArchSpec(
        stages=stages,
        stem_channels=width,
        stem_kernel=spec.stem_kernel,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        num_classes=spec.num_classes,
        pool=spec.pool,
        activation=spec.activation,
        dropout=spec.dropout,
    )


def training_params(cfg: TrainConfig) -> dict[str, Any]:
    """The trial parameters of training settings, to enqueue next to an architecture."""
    return {
        "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size,
        f"lr_{cfg.optimizer}": cfg.lr,
        f"weight_decay_{cfg.optimizer}": cfg.weight_decay,
        "label_smoothing": cfg.label_smoothing,
        "schedule": cfg.schedule,
        "crop_padding": cfg.crop_padding,
        "flip": cfg.flip,
        "cutout": cfg.cutout,
    }


def random_fits(
    shape: Shape, limits: Limits, profile: Profile, n_train: int, seed: int, n: int, asks: int
) -> list[tuple[int, ArchSpec, TrainConfig]]:
    """The first `n` candidates (trial number, architecture, training settings) that a
    seeded random start proposes within the limits, in at most `asks` asks: what a
    search's random start trains first."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    found: list[tuple[int, ArchSpec, TrainConfig]] = []
    for _ in range(asks):
        if len(found) == n:
            break
        trial = study.ask()
        spec = suggest_arch(trial, shape, limits)
        if limits.fits(spec):
            found.append((trial.number, spec, suggest_training(trial, profile, n_train, 0)))
        study.tell(trial, 0.0)
    return found


def check_room(shape: Shape, limits: Limits) -> None:
    """ValueError (what the smallest candidate costs) when nothing in the space fits."""
    floor = smallest(shape)
    if not limits.fits(floor):
        sizes = limits.measure(floor)
        raise ValueError(
            f"nothing in the search space fits: the smallest candidate has {sizes['params']:,} "
            f"params, {sizes['macs']:,} MACs, {sizes['bytes']:,} bytes ("
            f"{over(limits, sizes)}); raise the limits"
        )


def smallest(shape: Shape) -> ArchSpec:
    """The point of the space with the fewest parameters and MACs."""
    params = {
        "stages": 1,
        "growth": GROWTHS[0],
        "blocks_1": BLOCKS[0],
        "kernel_1": min(KERNELS),
        "skip_kernel_1": min(SKIP_KERNELS),
        "pool_div": POOL_DIVS[0],
        "stem_kernel": min(STEM_KERNELS),
        "activation": ACTIVATIONS[0],
        "dropout": 0.0,
        "width_frac": 0.0,
    }
    return suggest_arch(optuna.trial.FixedTrial(params), shape, Limits(params=10**12))
