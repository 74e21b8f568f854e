"""A small image folder: does a 6-trial quick search get a good network out of it?

python -m benchmarks.small_folder [--source fashion-mnist|digits] [--per-class 200]
    [--size 24] [--trials 6]

Writes a stratified subset of Fashion-MNIST's training images (2,000 by
default), or scikit-learn's 1,797 handwritten digits (`--source digits`, the
`bench` extra), as PNG files, one folder per class, resized to 24 px, and runs
`python -m search.run --dataset folder:PATH --quick --trials 6` on it. For a
ceiling, it then trains the search's best candidate 4x longer with 3 seeds on
the same training images and validates on the same held-out images.
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
from search.data import load_dataset, load_folder, search_split, subset
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    ap.add_argument("--per-class", type=int, default=200, help="fashion-mnist images per class")
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--trials", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"{args.source}-small"
        n = write_folder(folder, args.source, args.per_class, args.size)
        url = f"sqlite:///{tmp}/s.db"
        t0 = time.perf_counter()
        argv = ["--dataset", f"folder:{folder}", "--quick", "--trials", str(args.trials)]
        with contextlib.chdir(tmp):  # its studies/folder/best.json goes with the folder
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
            search.train(trial_arch(best), replace(cfg, images=4 * cfg.images, seed=s))
            .history[-1]
            .val_acc
            for s in range(3)
        ]
    result = {
        "source": args.source,
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
    name = "small_folder" + ("" if args.source == "fashion-mnist" else f"-{args.source}")
    print(f"wrote {save(name, result)}")


if __name__ == "__main__":
    main()
