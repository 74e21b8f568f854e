"""python -m search.train: train one architecture on the whole training set, report test
accuracy; with --seeds N, N runs and their mean and standard deviation.

The architecture is a JSON file (bare or an export), a preset name, a study's
trial (`--study-name NAME --trial N`), or the best of a study's top K
(`--top K`): each of those is re-trained with every seed on the search's
training split and ranked by mean validation accuracy; only the chosen one is
then trained on the whole training set and measured on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models import ArchSpec, count_params, load_arch
from models.presets import PRESETS, preset
from search.cli import STORAGE_ENV, Parser, load_existing
from search.data import DataError, load_dataset, search_split
from search.estimate import final_images_per_s
from search.final import check_input, rank_by_validation, save_checkpoint, summarize, train_final
from search.horizon import FINAL_EPOCHS, cost
from search.records import ranked, trial_arch, trial_training, write_json
from search.study import StudyError
from search.trainer import (
    OPTIMIZERS,
    SCHEDULES,
    EvalStats,
    OutOfMemory,
    TrainConfig,
    TrainingDiverged,
    resolve_device,
)

OVERRIDES = {
    "batch-size": int,
    "lr": float,
    "weight-decay": float,
    "label-smoothing": float,
    "cutout": int,
    "crop-padding": int,
    "warmup": float,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog="python -m search.train", description=__doc__.split("\n")[0])
    ap.add_argument("arch", nargs="?", help="architecture JSON (bare or an export), or a preset")
    ap.add_argument("--study-name", help="take the architecture from this study")
    ap.add_argument("--storage", default=os.environ.get(STORAGE_ENV), help="the study's URL")
    ap.add_argument("--trial", type=int, help="with --study-name: this trial")
    ap.add_argument("--top", type=int, help="with --study-name: choose among the best K")
    ap.add_argument("--dataset", help="default: the export's dataset, else cifar10")
    ap.add_argument("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    ap.add_argument(
        "--epochs",
        type=int,
        help=f"default: the search's horizon (its export's or study's), else {FINAL_EPOCHS}",
    )
    ap.add_argument("--seeds", type=int, default=1, help="runs with seeds SEED, SEED+1, ...")
    ap.add_argument("--seed", type=int, help="the first run's seed (default: the export's, or 0)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("-o", "--out", help="output folder (default runs/<arch>-<dataset>-<time>)")
    ap.add_argument("--no-progress", action="store_true", help="a line per epoch, no bar")
    for name, kind in OVERRIDES.items():
        default = getattr(TrainConfig, name.replace("-", "_"))
        ap.add_argument(f"--{name}", type=kind, help=f"default: the export's, else {default}")
    ap.add_argument("--optimizer", choices=OPTIMIZERS)
    ap.add_argument("--schedule", choices=SCHEDULES)
    args = ap.parse_args(argv)
    for name in ("epochs", "seeds", "top"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    from_study = args.trial is not None or args.top is not None
    if (args.arch is None) == (args.study_name is None) or (args.study_name and not from_study):
        ap.error("give an architecture, or --study-name with --trial N or --top K")
    if args.trial is not None and args.top is not None:
        ap.error("--trial and --top do not go together")
    return args


def with_flags(settings: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """Saved training settings, without their length, overridden by the flags."""
    settings = dict(settings)
    settings.pop("images", None)
    for key in [*(k.replace("-", "_") for k in OVERRIDES), "optimizer", "schedule", "seed"]:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return TrainConfig.from_dict(settings)


def from_study(args: argparse.Namespace) -> tuple[dict[str, tuple[ArchSpec, TrainConfig]], dict]:
    """The trial (or the top K trials) of a study: {name: (architecture, settings)}, and
    the study's settings."""
    study = load_existing(args)
    trials = study.get_trials(deepcopy=False)
    if args.trial is not None:
        if not 0 <= args.trial < len(trials) or "training" not in trials[args.trial].user_attrs:
            raise StudyError(f"study {args.study_name!r} has no trained trial {args.trial}")
        chosen = [trials[args.trial]]
    else:
        chosen = ranked(trials)[: args.top]
        if not chosen:
            raise StudyError(f"study {args.study_name!r} has no completed trial yet")
        if len(chosen) < args.top:
            n = len(chosen)
            print(f"{args.study_name!r} has {n} completed trial(s), fewer than --top {args.top}")
    cands = {
        f"trial {t.number}": (trial_arch(t), with_flags(trial_training(t).to_dict(), args))
        for t in chosen
    }
    if "settings" not in study.user_attrs:
        raise StudyError(f"study {args.study_name!r} was not made by search.run (no settings)")
    horizon = study.user_attrs.get("horizon") or {}
    return cands, study.user_attrs["settings"] | {"horizon_epochs": horizon.get("epochs")}


def resolve(args: argparse.Namespace) -> tuple[ArchSpec | str, TrainConfig, str]:
    """Architecture (or preset name), settings and dataset from the file and the flags;
    `args.epochs`, when not given, from the export's horizon."""
    saved: dict[str, Any] = {}
    if args.arch in PRESETS and not Path(args.arch).exists():
        arch: ArchSpec | str = args.arch
    elif not Path(args.arch).exists():
        raise ValueError(f"{args.arch}: no such file, and not a preset ({', '.join(PRESETS)})")
    else:
        arch = load_arch(args.arch)
        data = json.loads(Path(args.arch).read_text())
        saved = data if isinstance(data, dict) and "architecture" in data else {}
    cfg = with_flags(saved.get("training", {}), args)
    if args.epochs is None:
        args.epochs = (saved.get("horizon") or {}).get("epochs") or FINAL_EPOCHS
    return arch, cfg, args.dataset or saved.get("dataset") or "cifar10"


class Bar:
    """Progress within an epoch (loss, accuracy so far, time left), or a line per epoch."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.bar: tqdm | None = None
        self.seed = 0

    def step(self, step: int, total: int, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        per_epoch = max(1, total // self.epochs)
        if self.bar is None:
            epoch = min(self.epochs, step // per_epoch + 1)
            desc = f"seed {self.seed} epoch {epoch}/{self.epochs}"
            self.bar = tqdm(total=per_epoch, desc=desc, unit="step", file=sys.stderr, leave=False)
        self.bar.update(1)
        if step % 10 == 0:
            self.bar.set_postfix_str(f"loss {loss.item():.4f}", refresh=False)

    def epoch(self, s: EvalStats) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(
            f"seed {self.seed} epoch {s.rung:3d}/{self.epochs}  loss {s.train_loss:.4f}  "
            f"train {100 * s.train_acc:5.2f}%  test {100 * s.val_acc:5.2f}%  "
            f"{s.seconds:6.1f}s  {s.images_per_s:8,.0f} img/s",
            flush=True,
        )


def choose(cands, args, data, settings, device) -> tuple[str, list[dict[str, Any]] | None]:
    """The candidate to train: the only one, or the best mean validation accuracy of
    the top K on the search's training split (the test split is not looked at)."""
    if len(cands) == 1:
        return next(iter(cands)), None
    split = search_split(data, settings["seed"])
    seeds = [(args.seed or 0) + i for i in range(args.seeds)]
    print(
        f"choosing among {', '.join(cands)}: {args.epochs} epochs on {len(split.train_y):,} "
        f"training images, validated on {len(split.val_y):,}, seeds {seeds}",
        flush=True,
    )
    rows = rank_by_validation(
        cands,
        args.epochs,
        split,
        seeds,
        device,
        on_run=lambda n, seed, acc: print(f"{n} seed {seed}: validation {acc:.4f}", flush=True),
    )
    for i, r in enumerate(rows, 1):
        each = ", ".join(f"{a:.4f}" for a in r["validation"])
        print(f"{i}. {r['name']}: validation {r['val_mean']:.4f} +- {r['val_sd']:.4f} ({each})")
    return rows[0]["name"], rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings: dict[str, Any] = {}
    try:
        device = resolve_device(args.device)
        if args.study_name:
            cands, settings = from_study(args)
            args.epochs = args.epochs or settings["horizon_epochs"] or FINAL_EPOCHS
            dataset = args.dataset or settings["dataset"]
            data = load_dataset(dataset, args.data_dir)
        else:
            arch, cfg, dataset = resolve(args)
            data = load_dataset(dataset, args.data_dir)
            spec = (
                arch
                if isinstance(arch, ArchSpec)
                else preset(arch, data.channels, data.size, data.num_classes)
            )
            name = args.arch if isinstance(arch, str) else Path(args.arch).stem
            cands = {name: (spec, cfg)}
        for spec, _ in cands.values():
            check_input(spec, data)
    except (ValueError, DataError, StudyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        name, selection = choose(cands, args, data, settings, device)
    except (TrainingDiverged, OutOfMemory) as e:
        print(f"error: while choosing: {e}; lower --lr or --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted while choosing: nothing written", file=sys.stderr)
        return 130
    spec, cfg = cands[name]
    if args.study_name and args.seed is None:
        cfg = TrainConfig.from_dict(cfg.to_dict() | {"seed": 0})
    label = (
        name.replace(" ", "-")
        if not args.study_name
        else f"{args.study_name}-{name.replace(' ', '')}"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/{label}-{dataset.replace(':', '_').replace('/', '_')}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + i for i in range(args.seeds)]
    print(
        f"training {name} ({count_params(spec):,} params) on {data.name}: "
        f"{len(data.train_x):,} train / {len(data.test_x):,} test images, {args.epochs} epochs, "
        f"{cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, seeds {seeds}, device {device}",
        flush=True,
    )
    speed = final_images_per_s(spec, cfg, data, device)
    print(f"final training: {cost(len(seeds), args.epochs, len(data.train_y), speed)} "
          "(timed here)", flush=True)  # fmt: skip
    bar, runs = Bar(args.epochs, enabled=not args.no_progress), []
    try:
        for seed in seeds:
            bar.seed = seed
            run, model = train_final(
                spec,
                TrainConfig.from_dict(cfg.to_dict() | {"seed": seed}),
                args.epochs,
                data,
                device,
                on_eval=bar.epoch,
                on_step=bar.step,
            )
            run["checkpoint"] = str(out / f"model-seed{seed}.pt")
            save_checkpoint(Path(run["checkpoint"]), model, spec, data, run)
            runs.append(run)
            print(f"seed {seed}: test accuracy {100 * run['test_accuracy']:.2f}%", flush=True)
    except (TrainingDiverged, OutOfMemory) as e:
        print(f"error: {e}; lower --lr or --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(runs)} finished run(s) kept in {out}", file=sys.stderr)
        return 130
    result = summarize(spec, cfg, args.epochs, data, device, runs)
    if selection is not None:
        result["selection"] = selection
        result["chosen"] = name
    write_json(out / "result.json", result)
    each = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in runs)
    print(
        f"test accuracy {100 * result['test_accuracy']:.2f}% +- "
        f"{100 * result['test_accuracy_std']:.2f} over {len(runs)} seed(s) ({each}) in "
        f"{result['seconds']:.0f}s on {result['device']}"
    )
    print(f"wrote {out / 'result.json'} and {len(runs)} checkpoint(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
