"""A small image folder: does a 6-trial quick search get a good network out of it?

python -m benchmarks.small_folder [--source fashion-mnist|digits] [--per-class 200]
    [--size 24] [--trials 6] [--seeds 0 1 2]

Writes a stratified subset of Fashion-MNIST's training images (2,000 by
default), or scikit-learn's 1,797 handwritten digits (`--source digits`, the
`bench` extra), as PNG files, one folder per class, resized to 24 px, and runs
`python -m search.run --dataset folder:PATH --quick --trials 6 --seed S` on it, once
per seed (the seed also draws the held-out images). For a ceiling, it then trains
each search's best candidate 4x longer with 3 seeds on the same training images and
validates on the same held-out images. The goal (issue 23): the mean best
validation within 3 points of the mean ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
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
from search.data import Dataset, load_dataset, load_folder, search_split, subset
from search.limits import Limits
from search.profile import QUICK
from search.records import best_trial, counts, trial_arch, trial_training
from search.worker import Search


def images(source: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, H, W), labels and class names of a source."""
    if source == "digits":  # scikit-learn ships them: 1,797 scans of 8x8 px, 16 levels
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images * 255 / 16, dtype=torch.uint8)
        return x, torch.tensor(d.target), [str(c) for c in d.target_names]
    ds = load_dataset("fashion-mnist")
    idx = subset(ds.train_y, per_class * ds.num_classes, seed=0)
    return ds.train_x[idx, 0], ds.train_y[idx], ds.classes


def write_folder(root: Path, source: str, per_class: int, size: int) -> int:
    """PNG files, one folder per class, resized to `size` px."""
    x, y, classes = images(source, per_class)
    for n in range(len(y)):
        cls = root / classes[int(y[n])].replace("/", "-")
        cls.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(x[n].numpy()).resize((size, size), Image.BILINEAR)
        img.save(cls / f"{n:05d}.png")
    return len(y)


def search_once(folder: Path, ds: Dataset, tmp: Path, trials: int, seed: int) -> dict:
    """One search of the folder, and its best candidate trained 4x longer (3 seeds)."""
    url = f"sqlite:///{tmp}/s{seed}.db"
    name = f"folder-s{seed}"
    t0 = time.perf_counter()
    argv = ["--dataset", f"folder:{folder}", "--quick", "--trials", str(trials)]
    argv += ["--seed", str(seed), "--storage", url, "--study-name", name, "--no-progress"]
    with contextlib.chdir(tmp):  # its studies/<name>/best.json goes with the folder
        rc = run.main(argv)
    if rc != 0:
        raise SystemExit(f"search.run exited {rc} (seed {seed})")
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=url)
    best = best_trial(study)
    settings = study.user_attrs["settings"]
    # The ceiling: the best candidate, 4x longer, 3 seeds, the same split.
    data = search_split(ds, seed, QUICK.train_images, QUICK.val_images)
    search = Search(data, Limits(5_000_000), QUICK, seed, torch.device("cpu"))
    cfg = trial_training(best)
    longer = [
        search.train(trial_arch(best), replace(cfg, images=4 * cfg.images, seed=s))
        .history[-1]
        .val_acc
        for s in range(3)
    ]
    print(f"seed {seed}: best validation {best.value:.4f} after {trials} trials "
          f"({seconds:.0f} s); 4x longer: {', '.join(f'{a:.4f}' for a in longer)}",
          flush=True)  # fmt: skip
    return {
        "seed": seed,
        "exit_code": rc,
        "search_seconds": round(seconds, 1),
        "train_images": settings["train_images"],
        "val_images": settings["val_images"],
        "counts": counts(study.trials),
        "best_validation": best.value,
        "best_trial": best.number,
        "best_params": best.user_attrs["params"],
        "best_training": trial_training(best).to_dict(),
        "trial_values": [t.value for t in study.trials if t.value is not None],
        "ceiling_4x_longer": longer,
        "ceiling_mean": statistics.mean(longer),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    ap.add_argument("--per-class", type=int, default=200, help="fashion-mnist images per class")
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"{args.source}-small"
        n = write_folder(folder, args.source, args.per_class, args.size)
        ds = load_folder(folder)
        runs = [search_once(folder, ds, Path(tmp), args.trials, seed) for seed in args.seeds]
    result = {
        "source": args.source,
        "images": n,
        "size": args.size,
        "trials": args.trials,
        "seeds": args.seeds,
        "best_validation_mean": statistics.mean(r["best_validation"] for r in runs),
        "ceiling_mean": statistics.mean(r["ceiling_mean"] for r in runs),
        "search_seconds_mean": statistics.mean(r["search_seconds"] for r in runs),
        "runs": runs,
    }
    gap = result["ceiling_mean"] - result["best_validation_mean"]
    print(
        f"{n} images at {args.size} px, {args.trials} trials, seeds {args.seeds}: best "
        f"validation {result['best_validation_mean']:.4f} (mean); the same candidates 4x "
        f"longer {result['ceiling_mean']:.4f}; {gap * 100:.1f} points below"
    )
    name = "small_folder" + ("" if args.source == "fashion-mnist" else f"-{args.source}")
    print(f"wrote {save(name, result)}")


if __name__ == "__main__":
    main()
