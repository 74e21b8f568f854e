"""Which training settings should a search's first candidates train with?

python -m benchmarks.start_settings [--seeds 100 101 102 103 104] [--archs 3] [--resume]

The random start samples training settings at random, and most random settings
are poor on a short trial (issue 23: a run whose start never recovered; a 6-trial
search whose one finished candidate reached 0.78 where its folder allows 0.86).
This measures, on the architectures a random start proposes (the first `--archs`
that fit each task's limits, per seed), the validation accuracy and seconds of a
quick-profile trial under the random settings the start drew for them and under
each fixed candidate for the start settings (STARTS). Seeds 100-104 by default:
the settings are chosen on these, and the peers are reported on seeds 0-4.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, replace

import optuna
import torch

from benchmarks.machine import save, saved_for_resume
from benchmarks.peers import TASKS
from models import ArchSpec, count_params
from search import space
from search.data import SearchData, load_dataset, search_split
from search.profile import QUICK
from search.sampler import START
from search.trainer import TrainConfig, TrainingDiverged, train

NAME = "start_settings"
ASKS = 100_000  # under a 50k budget a random start fits about 1 ask in 80
BATCH = max(QUICK.batch_sizes)  # the hand default's 256 is not a quick-profile batch size
SHORT = TrainConfig(images=QUICK.images, crop_padding=0, flip=False)  # no augmentation
# The candidates: the hand defaults of TrainConfig at the profile's largest batch; the
# same without augmentation (a short trial barely sees each image once); SGD at the
# smallest batch (more steps; the front of a quick search, seed 0, trained at batch 32
# with lr 0.03-0.06); AdamW as its documentation's usual start.
STARTS = {
    "hand": TrainConfig(images=QUICK.images, batch_size=BATCH),
    "hand, no augmentation": replace(SHORT, batch_size=BATCH),
    "sgd batch 32, no augmentation": replace(START, images=QUICK.images),  # the product's
    "adamw, no augmentation": replace(
        SHORT, batch_size=BATCH, optimizer="adamw", lr=2e-3, weight_decay=0.05
    ),
}


def measure(spec: ArchSpec, cfg: TrainConfig, data: SearchData) -> dict:
    t0 = time.perf_counter()
    try:
        res = train(spec, cfg, data.train_val, device="cpu")
        acc = res.history[-1].val_acc
    except TrainingDiverged:
        acc = 0.0
    return {"val_acc": round(acc, 4), "seconds": round(time.perf_counter() - t0, 1)}


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for task in sorted({r["task"] for r in runs}):
        rows = [r for r in runs if r["task"] == task]
        out[task] = {}
        for s in ["random", *STARTS]:
            accs = [r["val_acc"] for r in rows if r["settings"] == s]
            secs = [r["seconds"] for r in rows if r["settings"] == s]
            if accs:
                out[task][s] = {
                    "n": len(accs),
                    "mean": round(statistics.mean(accs), 4),
                    "median": round(statistics.median(accs), 4),
                    "min": min(accs),
                    "max": max(accs),
                    "median_seconds": statistics.median(secs),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    ap.add_argument("--archs", type=int, default=3, help="architectures per seed and task")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--resume", action="store_true", help="keep the runs already saved")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    saved = saved_for_resume(NAME) if args.resume else {}
    runs: list[dict] = saved.get("runs", [])
    done = {(r["task"], r["seed"], r["trial"], r["settings"]) for r in runs}
    data = search_split(load_dataset("fashion-mnist"), 0, QUICK.train_images, QUICK.val_images)
    for task in args.tasks:
        for seed in args.seeds:
            fits = space.random_fits(data.shape, TASKS[task], QUICK, len(data.train_y), seed,
                                     args.archs, ASKS)  # fmt: skip
            for number, spec, random_cfg in fits:
                for name, cfg in [("random", random_cfg), *STARTS.items()]:
                    if (task, seed, number, name) in done:
                        continue
                    r = measure(spec, replace(cfg, seed=seed), data)
                    runs.append({"task": task, "seed": seed, "trial": number, "settings": name,
                                 "params": count_params(spec), **r})  # fmt: skip
                    print(f"{task} seed {seed} trial {number:3d} {name:24s} "
                          f"{r['val_acc']:.4f} ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
                    record = {"seeds": args.seeds, "profile": QUICK.to_dict(),
                              "starts": {k: asdict(v) for k, v in STARTS.items()},
                              "summary": summarize(runs), "runs": runs}  # fmt: skip
                    save(NAME, record)
    for task, rows in summarize(runs).items():
        print(task)
        for s, v in rows.items():
            print(f"  {s:24s} mean {v['mean']:.4f} median {v['median']:.4f} "
                  f"[{v['min']:.4f}, {v['max']:.4f}] {v['median_seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
