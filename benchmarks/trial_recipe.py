"""Which parts of the trial recipe help a short trial, each measured on and off.

python -m benchmarks.trial_recipe [--candidates 6] [--seeds 2] [--variants ...]

Candidates (architecture and training settings) are drawn from the search space
by a seeded random sampler under the quick profile's limits, as a search's
first trials are; each is trained on the quick profile's Fashion-MNIST split
with the baseline recipe and with one part changed, for every seed. The figure
per variant is the mean change of final validation accuracy against the
baseline over the same (candidate, seed) pairs, with its standard error: pairs
share the data order and the initial weights, so the difference is less noisy
than either accuracy. A part is kept when it helps by more than one standard error,
or costs nothing (within one) and makes the first rung rank runs more like the
last (Spearman correlation over the runs), which is what the pruner decides on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch

from benchmarks.machine import save
from models import ArchSpec
from search import space
from search.data import load_dataset, search_split
from search.limits import Limits
from search.profile import QUICK
from search.trainer import TrainConfig
from search.worker import Search

# The baseline has every part off; each variant switches one on (or changes it).
BASELINE = {"ema": 0.0, "tta": False, "zero_init": False, "bn_lr": 1.0, "warmup": 0.2}
VARIANTS = {
    "ema 0.05": {"ema": 0.05},
    "ema 0.15": {"ema": 0.15},
    "flip tta": {"tta": True},
    "zero-init residual": {"zero_init": True},
    "bn lr x3": {"bn_lr": 3.0},
    "warmup 0.05": {"warmup": 0.05},
    "warmup 0.1": {"warmup": 0.1},
    "label smoothing 0": {"label_smoothing": 0.0},
    "label smoothing 0.1": {"label_smoothing": 0.1},
}


def candidates(search: Search, n: int, seed: int) -> list[tuple[ArchSpec, TrainConfig]]:
    """The first `n` candidates a seeded random sampler proposes that fit the limits."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out: list[tuple[ArchSpec, TrainConfig]] = []
    while len(out) < n:
        trial = study.ask()
        spec = space.suggest_arch(trial, search.data.shape, search.limits)
        if search.limits.fits(spec):
            cfg = space.suggest_training(trial, search.profile, len(search.data.train_y), 0)
            out.append((spec, replace(cfg, **BASELINE)))
        study.tell(trial, 0.0)
    return out


Curves = list[list[float]]  # validation accuracy at each rung, per (candidate, seed)


def measure(
    search: Search, cands: list[tuple[ArchSpec, TrainConfig]], seeds: list[int], change: dict
) -> Curves:
    """Validation accuracy at every rung of every (candidate, seed), `change` applied."""
    curves = []
    for spec, cfg in cands:
        for seed in seeds:
            history = search.train(spec, replace(cfg, seed=seed, **change)).history
            curves.append([h.val_acc for h in history])
    return curves


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    return statistics.correlation(ranks(a), ranks(b))


def compare(base: Curves, other: Curves) -> dict[str, float]:
    """Mean final accuracy, its paired change against the baseline (with the standard
    error), and how well the first rung ranks the runs as the last does (Spearman)."""
    diffs = [o[-1] - b[-1] for o, b in zip(other, base, strict=True)]
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {
        "mean_accuracy": statistics.mean(o[-1] for o in other),
        "mean_change": statistics.mean(diffs),
        "sem": sem,
        "first_rung_rank_correlation": spearman([o[0] for o in other], [o[-1] for o in other]),
        "curves": other,
    }


def keeps(r: dict, baseline: dict) -> bool:
    """Kept: it raises final accuracy by more than one standard error, or costs none
    (within one) and makes the first rung rank the runs more like the last does,
    which is what the pruner decides on."""
    if r["mean_change"] > r["sem"]:
        return True
    better_ranks = r["first_rung_rank_correlation"] > baseline["first_rung_rank_correlation"] + 0.03
    return r["mean_change"] > -r["sem"] and better_ranks


def kept_recipe(rows: dict[str, dict]) -> dict:
    """The kept variants, the best one per setting where several change the same one."""
    best: dict[str, tuple[float, dict]] = {}
    for name, r in rows.items():
        if r["kept"]:
            key = ",".join(sorted(VARIANTS[name]))
            if key not in best or r["mean_change"] > best[key][0]:
                best[key] = (r["mean_change"], VARIANTS[name])
    return {k: v for _, change in best.values() for k, v in change.items()}


def report(name: str, r: dict) -> None:
    print(
        f"{name:22s} {r['mean_accuracy']:.4f}  change {100 * r['mean_change']:+.2f} "
        f"+- {100 * r['sem']:.2f} points  rank corr "
        f"{r['first_rung_rank_correlation']:.2f}  {'kept' if r.get('kept') else ''}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="trial_recipe", help="results/NAME-cpu.json")
    ap.add_argument(
        "--combine",
        metavar="RESULT_JSON",
        help="decide again on a saved result, and measure only the kept parts together",
    )
    args = ap.parse_args()
    device = torch.device("cpu")
    data = search_split(
        load_dataset("fashion-mnist", args.data_dir), 0, QUICK.train_images, QUICK.val_images
    )
    search = Search(data, Limits(5_000_000, QUICK.max_macs), QUICK, 0, device)
    cands = candidates(search, args.candidates, seed=0)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    if args.combine:
        saved = json.loads(Path(args.combine).read_text())
        base, baseline = saved["baseline"]["curves"], saved["baseline"]
        rows = {
            n: {k: v for k, v in r.items() if k != "change"} for n, r in saved["variants"].items()
        }
        t0 -= saved["seconds"]
    else:
        base = measure(search, cands, seeds, {})
        baseline = compare(base, base)
        rows = {}
        for name in args.variants:
            rows[name] = compare(base, measure(search, cands, seeds, VARIANTS[name]))
    print(
        f"baseline: mean validation accuracy {baseline['mean_accuracy']:.4f}, first-rung "
        f"rank correlation {baseline['first_rung_rank_correlation']:.2f} ({len(base)} runs)",
        flush=True,
    )
    for name, r in rows.items():
        r["kept"] = keeps(r, baseline)
        report(name, r)
    kept = kept_recipe(rows)
    # Parts measured together only when all were measured (a subset re-measures its rows)
    whole = args.combine or set(args.variants) == set(VARIANTS)
    combined = compare(base, measure(search, cands, seeds, kept)) if kept and whole else None
    if combined:
        report("all kept parts", combined)
    result = {
        "profile": QUICK.to_dict(),
        "dataset": "fashion-mnist",
        "candidates": [{"architecture": s.to_dict(), "training": c.to_dict()} for s, c in cands],
        "seeds": seeds,
        "baseline": {"recipe": BASELINE, **baseline},
        "variants": {n: {"change": VARIANTS[n], **r} for n, r in rows.items()},
        "kept": kept,
        "all_kept": combined,
        "seconds": time.perf_counter() - t0,
        "not_measurable_here": {
            "bf16 autocast with fp32 BatchNorm": "CUDA only; the CPU trains in fp32",
            "fused optimizer": "CUDA only (speed, not accuracy)",
        },
    }
    print(f"wrote {save(args.name, result)}")


if __name__ == "__main__":
    main()
