"""The search space: the only code that calls `trial.suggest_*`.

Distributions are fixed per parameter name (per-stage names are conditional
on the stage count), so multivariate TPE models them jointly. Sizes derived
from the input (the pool) are expressed relative to it, so one space serves
28 px and 32 px images alike. Every preset is a point of this space:
`preset_params` gives the parameters that `suggest_arch` turns back into it.
"""

from __future__ import annotations

from typing import Any

import optuna

from models.spec import ArchSpec, StageSpec, last_side, max_stages
from search.train import TrainConfig

# Bump when a distribution changes: resuming a study made with another space
# would mix incomparable trials, so the study records this and run.py refuses.
SPACE_VERSION = "1"

WIDTHS = (16, 128, 8)  # first width: low, high, step
GROWTHS = (1.0, 1.5, 2.0)
STEM_KERNELS = (3, 5, 7)
KERNELS = (3, 5, 7)
SKIP_KERNELS = (1, 3)
POOL_DIVS = (1, 2, 4)  # pool = last side // div: 1 is global average pooling
ACTIVATIONS = ("relu", "gelu")
BATCH_SIZES = (128, 256, 512)
CUTOUTS = (0, 8, 12)
LR = {"sgd": (0.01, 0.4), "adamw": (3e-4, 5e-3)}
WEIGHT_DECAY = {"sgd": (1e-5, 2e-3), "adamw": (1e-3, 0.2)}


def stage_widths(width: int, growth: float, n: int) -> list[int]:
    """width * growth**i, rounded to a multiple of 8."""
    return [max(8, round(width * growth**i / 8) * 8) for i in range(n)]


def suggest_arch(trial: optuna.Trial, in_channels: int, size: int, num_classes: int) -> ArchSpec:
    n = trial.suggest_int("stages", 1, max_stages(size))
    width = trial.suggest_int("width", *WIDTHS[:2], step=WIDTHS[2])
    growth = trial.suggest_categorical("growth", GROWTHS)
    stages = tuple(
        StageSpec(
            blocks=trial.suggest_int(f"blocks_{i + 1}", 1, 4),
            channels=c,
            kernel=trial.suggest_categorical(f"kernel_{i + 1}", KERNELS),
            skip_kernel=trial.suggest_categorical(f"skip_kernel_{i + 1}", SKIP_KERNELS),
        )
        for i, c in enumerate(stage_widths(width, growth, n))
    )
    side = last_side(size, n)
    pool_div = trial.suggest_categorical("pool_div", POOL_DIVS)
    return ArchSpec(
        stages=stages,
        stem_channels=width,
        stem_kernel=trial.suggest_categorical("stem_kernel", STEM_KERNELS),
        in_channels=in_channels,
        input_size=size,
        num_classes=num_classes,
        pool=max(1, side // pool_div),
        activation=trial.suggest_categorical("activation", ACTIVATIONS),
        dropout=trial.suggest_float("dropout", 0.0, 0.3, step=0.05),
    )


def suggest_training(trial: optuna.Trial, epochs: int, seed: int) -> TrainConfig:
    opt = trial.suggest_categorical("optimizer", ("sgd", "adamw"))
    return TrainConfig(
        epochs=epochs,
        batch_size=trial.suggest_categorical("batch_size", BATCH_SIZES),
        optimizer=opt,
        lr=trial.suggest_float(f"lr_{opt}", *LR[opt], log=True),
        weight_decay=trial.suggest_float(f"weight_decay_{opt}", *WEIGHT_DECAY[opt], log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2, step=0.05),
        schedule=trial.suggest_categorical("schedule", ("onecycle", "cosine")),
        cutout=trial.suggest_categorical("cutout", CUTOUTS),
        seed=seed,
    )


def preset_params(spec: ArchSpec, training: TrainConfig | None = None) -> dict[str, Any]:
    """The trial parameters of a preset, for `study.enqueue_trial` (a warm start).

    Raises ValueError when the spec is not a point of the space.
    """
    s = spec.stages
    width, n = spec.stem_channels, len(s)
    growth = next(
        (g for g in GROWTHS if stage_widths(width, g, n) == [x.channels for x in s]), None
    )
    side = spec.feature_sizes[-1]
    pool_div = next((d for d in POOL_DIVS if max(1, side // d) == spec.pool), None)
    checks = [
        (n <= max_stages(spec.input_size), "stages"),
        (WIDTHS[0] <= width <= WIDTHS[1] and width % WIDTHS[2] == 0, "stem/first width"),
        (growth is not None, "stage widths (first width x growth)"),
        (all(1 <= x.blocks <= 4 for x in s), "blocks"),
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
        "width": width,
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
    t = training or TrainConfig()
    params |= {
        "optimizer": t.optimizer,
        "batch_size": t.batch_size,
        f"lr_{t.optimizer}": t.lr,
        f"weight_decay_{t.optimizer}": t.weight_decay,
        "label_smoothing": t.label_smoothing,
        "schedule": t.schedule,
        "cutout": t.cutout,
    }
    return params


def smallest(in_channels: int, size: int, num_classes: int) -> ArchSpec:
    """The point of the space with the fewest parameters and MACs."""
    params = {
        "stages": 1,
        "width": WIDTHS[0],
        "growth": GROWTHS[0],
        "blocks_1": 1,
        "kernel_1": min(KERNELS),
        "skip_kernel_1": min(SKIP_KERNELS),
        "pool_div": POOL_DIVS[0],
        "stem_kernel": min(STEM_KERNELS),
        "activation": ACTIVATIONS[0],
        "dropout": 0.0,
    }
    return suggest_arch(optuna.trial.FixedTrial(params), in_channels, size, num_classes)
