"""Is the search's winner better than the hand designs under the same final training?

python -m benchmarks.nas_vs_hand [--study-name NAME --storage URL] [--epochs 3] [--seeds 0 1 2]

The winner is the best trial of a quick Fashion-MNIST search (an existing study,
or a new `search.run --quick --trials 100` equivalent run first). It and the
hand designs (the presets that fit the 5M budget) are each trained with
search.final on the whole Fashion-MNIST training set for the same number of
epochs, with the same trainer and recipe, once per seed, and measured on the
test split. The winner uses the training settings the search found for it; a
hand design uses the hand-picked defaults of TrainConfig (SGD-Nesterov 0.1,
batch 256, label smoothing 0.1, crop and flip, one-cycle), as a person would.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import optuna
import torch

from benchmarks.machine import save
from models import count_params
from models.presets import preset
from search.data import load_dataset, search_split
from search.final import mean_sd, run_once
from search.limits import Limits
from search.profile import QUICK
from search.records import best_trial, trial_arch, trial_training
from search.signals import Stop
from search.slots import Slots
from search.study import DEFAULT_PRUNER, make_pruner, open_study
from search.trainer import TrainConfig
from search.worker import Search, run_worker

HAND = ("resnet18-2111", "resnet-3stage-2221", "resnet-tiny")
BUDGET = 5_000_000


def quick_search(url: str, name: str, trials: int) -> optuna.Study:
    """The quick profile's search, as `search.run --quick` runs it."""
    ds = load_dataset("fashion-mnist")
    data = search_split(ds, 0, QUICK.train_images, QUICK.val_images)
    rungs = [round(f * QUICK.images) for f in QUICK.rungs]
    study = open_study(url, name, pruner=make_pruner(DEFAULT_PRUNER, rungs), heartbeat=None)
    search = Search(data, Limits(BUDGET, QUICK.max_macs), QUICK, 0, torch.device("cpu"))
    run_worker(study, search, Slots(study, trials, url), Stop(), url=url)
    return study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default="sqlite:///studies/nas-vs-hand.db")
    ap.add_argument("--study-name", default="nas-vs-hand", help="an existing study, or made")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hand", nargs="+", default=list(HAND))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    t0 = time.perf_counter()
    try:
        study = open_study(args.storage, args.study_name, create=False, heartbeat=None)
    except Exception:
        print(f"running the quick search ({args.trials} trials) ...", flush=True)
        study = quick_search(args.storage, args.study_name, args.trials)
    search_seconds = time.perf_counter() - t0
    winner = best_trial(study)
    ds = load_dataset("fashion-mnist")
    shape = (ds.channels, ds.size, ds.num_classes)
    designs = {"search winner": (trial_arch(winner), trial_training(winner))}
    designs |= {name: (preset(name, *shape), TrainConfig()) for name in args.hand}
    device, results = torch.device("cpu"), {}
    for name, (spec, cfg) in designs.items():
        runs = []
        for seed in args.seeds:
            run, _ = run_once(spec, replace(cfg, seed=seed), args.epochs, ds, device)
            runs.append(run)
            print(
                f"{name:20s} seed {seed}: test accuracy {run['test_accuracy']:.4f} "
                f"({run['seconds']:.0f} s)",
                flush=True,
            )
        mean, sd = mean_sd([r["test_accuracy"] for r in runs])
        results[name] = {
            "params": count_params(spec),
            "architecture": spec.to_dict(),
            "training": {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "images")},
            "test_mean": mean,
            "test_sd": sd,
            "test_accuracy": [r["test_accuracy"] for r in runs],
            "seconds": [r["seconds"] for r in runs],
            "epochs_curve": [[e["test_accuracy"] for e in r["epochs"]] for r in runs],
        }
        print(f"{name:20s} {100 * mean:.2f}% +- {100 * sd:.2f} ({count_params(spec):,} params)")
        # Saved after every design: a run cut short keeps what it measured.
        save("nas_vs_hand", {"complete": False, "epochs": args.epochs, "designs": results})
    hand = {k: v for k, v in results.items() if k != "search winner"}
    best_hand = max(hand, key=lambda k: hand[k]["test_mean"])
    result = {
        "complete": True,
        "dataset": "fashion-mnist",
        "epochs": args.epochs,
        "seeds": args.seeds,
        "budget": BUDGET,
        "study": {
            "name": args.study_name,
            "trial": winner.number,
            "validation": winner.value,
            "search_seconds": search_seconds,
        },
        "winner_test_mean": results["search winner"]["test_mean"],
        "best_hand_test_mean": hand[best_hand]["test_mean"],
        "hand_design": best_hand,
        "designs": results,
        "median_seconds_per_run": statistics.median(
            s for r in results.values() for s in r["seconds"]
        ),
    }
    print(
        f"winner {100 * result['winner_test_mean']:.2f}% vs best hand design {best_hand} "
        f"{100 * result['best_hand_test_mean']:.2f}%"
    )
    print(f"wrote {save('nas_vs_hand', result)}")


if __name__ == "__main__":
    main()
