"""Can the choice's short looks rank networks larger than the search's?

python -m benchmarks.horizon_looks

At the horizon (10 epochs of Fashion-MNIST, `benchmarks/final_choice`) the hand
design resnet-3stage-2221 (696,042 params, 80M MACs: four times the quick profile's
cap) beat the network the choice shipped, trial 139 (59,162 params, 9M MACs). The
choice only looks at networks the search trained. Would a look of the choice's
length (117,000 images, and a third of the horizon: 200,000), on the choice's
split, rank the larger networks above trial 139, with the hand settings and with
trial 139's? And what would each look cost against the search's compute
(MAC-images: MACs per image x training images)? Runs on the final_choice study,
which is committed; results to results/horizon_looks-cpu.json (a look already
there is kept, not repeated).

With `--horizon-seeds 0 ...`, the looks' wider copy of trial 139 is also trained for
the horizon as final_choice trains its contenders (search.final, whole training
set, test split): does the searched shape, grown, beat the hand designs? Those
runs are added to the file's `horizon_runs` (kept, not repeated).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import optuna
import torch

from benchmarks.final_choice import STUDY_DB
from benchmarks.machine import result_path, save
from models import ArchSpec, count_macs, count_params
from models.presets import preset
from search.choose import widened
from search.data import load_dataset, search_split
from search.final import train_final
from search.records import trial_arch, trial_training
from search.trainer import TrainConfig, train

NAME = "horizon_looks"
STUDY = "final-choice-s0"
CHOSEN = 139  # what search.choose shipped on that study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--horizon-seeds", type=int, nargs="*", default=None,
                    help="train the wider copy for the horizon (no looks)")  # fmt: skip
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{STUDY_DB}")
    trials = study.get_trials(deepcopy=False)
    chosen = next(t for t in trials if t.number == CHOSEN)
    spec, cfg = trial_arch(chosen), trial_training(chosen)
    split = search_split(load_dataset("fashion-mnist"), study.user_attrs["settings"]["seed"])
    three = preset("resnet-3stage-2221", 1, 28, 10)
    wide = widened(spec, 2)  # the chosen network at twice the width
    hand = TrainConfig(seed=cfg.seed)
    if args.horizon_seeds is not None:
        horizon(f"trial {CHOSEN} at 2x width, its settings", wide, cfg, args.horizon_seeds)
        return
    tiny = preset("resnet-tiny", 1, 28, 10)
    looks = [
        (f"trial {CHOSEN}, its settings", spec, cfg, 200_000),
        ("resnet-3stage-2221, hand settings", three, hand, 117_000),
        (f"resnet-3stage-2221, trial {CHOSEN}'s settings", three, cfg, 117_000),
        ("resnet-tiny, hand settings", tiny, hand, 117_000),
        (f"trial {CHOSEN} at 2x width, its settings", wide, cfg, 117_000),
        ("resnet-3stage-2221, hand settings", three, hand, 200_000),
        # a third of the choice's look: would a cheaper look rank them alike?
        (f"resnet-tiny, trial {CHOSEN}'s settings", tiny, cfg, 117_000),
        (f"trial {CHOSEN}, its settings", spec, cfg, 39_000),
        (f"resnet-3stage-2221, trial {CHOSEN}'s settings", three, cfg, 39_000),
        (f"resnet-tiny, trial {CHOSEN}'s settings", tiny, cfg, 39_000),
        (f"trial {CHOSEN} at 2x width, its settings", wide, cfg, 39_000),
    ]
    searched = sum(
        count_macs(trial_arch(t)) * max(t.intermediate_values)
        for t in trials
        if t.intermediate_values
    )
    record = saved()
    rows = record.setdefault("looks", [])
    record |= {"study": STUDY, "chosen": CHOSEN, "search_mac_images": searched}
    record["split"] = f"{len(split.train_y)}+{len(split.val_y)}"
    for name, s, c, images in looks:
        if any(r["look"] == name and r["images"] == images for r in rows):
            continue  # measured already: the file keeps it
        start = time.perf_counter()
        result = train(s, replace(c, images=images), split.train_val, device=torch.device("cpu"))
        rows.append({
            "look": name,
            "params": count_params(s),
            "macs": count_macs(s),
            "images": images,
            "validation": round(result.history[-1].val_acc, 4),
            "seconds": round(time.perf_counter() - start, 1),
            "share_of_search_mac_images": round(count_macs(s) * images / searched, 3),
        })  # fmt: skip
        print(rows[-1], flush=True)
        save(NAME, {k: v for k, v in record.items() if k not in ("benchmark", "date", "machine")})


def saved() -> dict:
    """The results so far, on any machine: the figures are accuracies (final_choice too)."""
    path = result_path(NAME)
    return json.loads(path.read_text()) if path.exists() else {}


def horizon(
    name: str, spec: ArchSpec, cfg: TrainConfig, seeds: list[int], epochs: int = 10
) -> None:
    """Train `spec` for final_choice's horizon, once per seed; add the runs to the file."""
    record = saved()
    runs = record.setdefault("horizon_runs", [])
    ds = load_dataset("fashion-mnist")
    for seed in seeds:
        if any(r["contender"] == name and r["seed"] == seed for r in runs):
            continue
        result, _ = train_final(spec, replace(cfg, seed=seed), epochs, ds, torch.device("cpu"))
        runs.append({
            "contender": name, "params": count_params(spec), "macs": count_macs(spec),
            "epochs": epochs, "seed": seed, "test_accuracy": result["test_accuracy"],
            "seconds": result["seconds"],
            "curve": [round(e["test_accuracy"], 4) for e in result["epochs"]],
            "train_accuracy": [round(e["train_accuracy"], 4) for e in result["epochs"]],
        })  # fmt: skip
        print(runs[-1], flush=True)
        save(NAME, {k: v for k, v in record.items() if k not in ("benchmark", "date", "machine")})


if __name__ == "__main__":
    main()
