"""Is the search's winner better than the hand designs under the same final training?

python -m benchmarks.nas_vs_hand [--study-name NAME --storage URL] [--epochs 3] [--seeds 0 1 2]
    [--designs "search winner" resnet18-2111 ...] [--resume]

The winner is the best trial of a quick Fashion-MNIST search (an existing study,
or a new `search.run --quick --trials 100` equivalent run first). It and the
hand designs (the presets that fit the 5M budget) are each trained with
search.final on the whole Fashion-MNIST training set for the same number of
epochs, with the same trainer and recipe, once per seed, and measured on the
test split. The winner uses the training settings the search found for it; a
hand design uses the hand-picked defaults of TrainConfig (SGD-Nesterov 0.1,
batch 256, label smoothing 0.1, crop and flip, one-cycle), as a person would.
Every run is saved as it ends; --resume keeps the saved runs of the same
length (a winner run only if it trained this study's winner).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import optuna
import torch

from benchmarks.machine import result_path, save
from models import ArchSpec, count_params
from models.presets import preset
from search.data import Dataset, load_dataset, search_split
from search.final import mean_sd, train_final
from search.limits import Limits
from search.profile import QUICK
from search.records import best_trial, trial_arch, trial_training
from search.signals import Stop
from search.slots import Slots
from search.study import DEFAULT_PRUNER, make_pruner, open_study
from search.trainer import TrainConfig
from search.worker import Search, run_worker

HAND = ("resnet18-2111", "resnet-3stage-2221", "resnet-tiny")
WINNER = "search winner"
BUDGET = 5_000_000


def quick_search(ds: Dataset, url: str, name: str, trials: int) -> optuna.Study:
    """The quick profile's search, as `search.run --quick` runs it."""
    data = search_split(ds, 0, QUICK.train_images, QUICK.val_images)
    study = open_study(
        url, name, pruner=make_pruner(DEFAULT_PRUNER, QUICK.rung_images()), heartbeat=None
    )
    search = Search(data, Limits(BUDGET, QUICK.max_macs), QUICK, 0, torch.device("cpu"))
    run_worker(study, search, Slots(study, trials, url), Stop(), url=url)
    return study


def training(cfg: TrainConfig) -> dict:
    """The settings that make a design's runs alike (not the seed, not the length)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "images")}


Design = tuple[ArchSpec, TrainConfig]


def load_runs(epochs: int, designs: dict[str, Design]) -> list[dict]:
    """Runs saved by an earlier invocation with the same final training length; a run
    of a design about to train counts only if it trained the same network and settings
    (a winner run: the winner of this study)."""
    path = result_path("nas_vs_hand")
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("epochs") != epochs:
        return []
    same = {name: (spec.to_dict(), training(cfg)) for name, (spec, cfg) in designs.items()}
    return [
        r
        for r in saved.get("runs", [])
        if r["design"] not in same or (r["architecture"], r["training"]) == same[r["design"]]
    ]


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per design: parameters, settings, and the mean and sd over its seeds."""
    out: dict[str, dict] = {}
    for r in runs:
        d = out.setdefault(r["design"], {k: r[k] for k in ("params", "architecture", "training")})
        d.setdefault("runs", []).append(r)
    for d in out.values():
        accs = [r["test_accuracy"] for r in d.pop("runs")]
        d["test_mean"], d["test_sd"] = mean_sd(accs)
        d["test_accuracy"] = accs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default="sqlite:///studies/nas-vs-hand.db")
    ap.add_argument("--study-name", default="nas-vs-hand", help="an existing study, or made")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--designs", nargs="+", default=[WINNER, *HAND], choices=[WINNER, *HAND])
    ap.add_argument("--resume", action="store_true", help="keep the runs already saved")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ds = load_dataset("fashion-mnist")
    shape = (ds.channels, ds.size, ds.num_classes)
    designs: dict[str, Design] = {
        name: (preset(name, *shape), TrainConfig()) for name in args.designs if name in HAND
    }
    study_info = None
    if WINNER in args.designs:
        t0 = time.perf_counter()
        try:
            study = open_study(args.storage, args.study_name, create=False, heartbeat=None)
        except Exception:
            print(f"running the quick search ({args.trials} trials) ...", flush=True)
            study = quick_search(ds, args.storage, args.study_name, args.trials)
        winner = best_trial(study)
        study_info = {
            "name": args.study_name,
            "trial": winner.number,
            "validation": winner.value,
            "search_seconds": time.perf_counter() - t0,
        }
        designs = {WINNER: (trial_arch(winner), trial_training(winner))} | designs
    runs = load_runs(args.epochs, designs) if args.resume else []
    done = {(r["design"], r["seed"]) for r in runs}
    device = torch.device("cpu")
    for name, (spec, cfg) in designs.items():
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            run, _ = train_final(spec, replace(cfg, seed=seed), args.epochs, ds, device)
            runs.append(
                {
                    "design": name,
                    "seed": seed,
                    "params": count_params(spec),
                    "architecture": spec.to_dict(),
                    "training": training(cfg),
                    "test_accuracy": run["test_accuracy"],
                    "seconds": run["seconds"],
                    "epochs_curve": [e["test_accuracy"] for e in run["epochs"]],
                }
                | ({"study": study_info} if name == WINNER else {})
            )
            print(
                f"{name:20s} seed {seed}: test accuracy {run['test_accuracy']:.4f} "
                f"({run['seconds']:.0f} s)",
                flush=True,
            )
            # Saved after every run: a run cut short keeps what it measured (--resume).
            save("nas_vs_hand", {"complete": False, "epochs": args.epochs, "runs": runs})
    results = summarize(runs)
    for name, d in results.items():
        mean, sd = 100 * d["test_mean"], 100 * d["test_sd"]
        print(f"{name:20s} {mean:.2f}% +- {sd:.2f} ({d['params']:,} params)")
    seeds = sorted({r["seed"] for r in runs})
    complete = all(sum(r["design"] == name for r in runs) >= 3 for name in (WINNER, *HAND))
    hand = {k: v for k, v in results.items() if k != WINNER}
    result: dict = {"complete": complete, "dataset": "fashion-mnist", "epochs": args.epochs}
    result |= {"seeds": seeds, "budget": BUDGET, "designs": results}
    if WINNER in results and hand:
        best_hand = max(hand, key=lambda k: hand[k]["test_mean"])
        winner_run = next(r for r in runs if r["design"] == WINNER)
        result |= {
            "study": winner_run["study"],
            "winner_test_mean": results[WINNER]["test_mean"],
            "best_hand_test_mean": hand[best_hand]["test_mean"],
            "hand_design": best_hand,
        }
        print(
            f"winner {100 * result['winner_test_mean']:.2f}% vs best hand design {best_hand} "
            f"{100 * result['best_hand_test_mean']:.2f}%"
        )
    result["median_seconds_per_run"] = statistics.median(r["seconds"] for r in runs)
    result["runs"] = runs
    print(f"wrote {save('nas_vs_hand', result)}")


if __name__ == "__main__":
    main()
