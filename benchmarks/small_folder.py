"""A small image folder: does a 6-trial quick search get a good network out of it?

python -m benchmarks.small_folder [--per-class 200] [--size 24] [--trials 6]

Writes a stratified subset of Fashion-MNIST's training images as PNG files,
one folder per class, resized to 24 px (2,000 images by default), and runs
`python -m search.run --dataset folder:PATH --quick --trials 6` on it. For a
ceiling, it then trains the search's best candidate 4x longer with 3 seeds on
the same training images and validates on the same held-out images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from PIL import Image

from benchmarks.machine import save
from search import run
from search.data import load_dataset, load_folder, search_split, subset
from search.limits import Limits
from search.profile import QUICK
from search.records import best_trial, counts, trial_arch, trial_training
from search.worker import Search, fit


def write_folder(root: Path, per_class: int, size: int) -> int:
    ds = load_dataset("fashion-mnist")
    idx = subset(ds.train_y, per_class * ds.num_classes, seed=0)
    for n, i in enumerate(idx.tolist()):
        cls = root / ds.classes[int(ds.train_y[i])].replace("/", "-")
        cls.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(ds.train_x[i, 0].numpy()).resize((size, size), Image.BILINEAR)
        img.save(cls / f"{n:05d}.png")
    return len(idx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--trials", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fashion-small"
        n = write_folder(folder, args.per_class, args.size)
        url = f"sqlite:///{tmp}/s.db"
        t0 = time.perf_counter()
        argv = ["--dataset", f"folder:{folder}", "--quick", "--trials", str(args.trials)]
        rc = run.main([*argv, "--storage", url, "--study-name", "folder", "--no-progress"])
        seconds = time.perf_counter() - t0
        study = optuna.load_study(study_name="folder", storage=url)
        best = best_trial(study)
        settings = study.user_attrs["settings"]
        # The ceiling: the best candidate, 4x longer, 3 seeds, the same split.
        data = search_split(load_folder(folder), 0, QUICK.train_images, QUICK.val_images)
        search = Search(data, Limits(5_000_000), QUICK, 0, torch.device("cpu"))
        cfg = trial_training(best)
        longer = [
            fit(trial_arch(best), replace(cfg, images=4 * cfg.images, seed=s), search)
            .history[-1]
            .val_acc
            for s in range(3)
        ]
    result = {
        "images": n,
        "size": args.size,
        "trials": args.trials,
        "exit_code": rc,
        "search_seconds": seconds,
        "train_images": settings["train_images"],
        "val_images": settings["val_images"],
        "counts": counts(study.trials),
        "best_validation": best.value,
        "best_trial": best.number,
        "best_params": best.user_attrs["params"],
        "trial_values": [t.value for t in study.trials if t.value is not None],
        "ceiling_4x_longer": longer,
        "ceiling_mean": statistics.mean(longer),
    }
    print(
        f"{n} images at {args.size} px: best validation accuracy {best.value:.4f} after "
        f"{args.trials} trials ({seconds:.0f} s); the same candidate 4x longer: "
        f"{', '.join(f'{a:.4f}' for a in longer)}"
    )
    print(f"wrote {save('small_folder', result)}")


if __name__ == "__main__":
    main()
