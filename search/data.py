"""Datasets as uint8 tensors (N, C, H, W) with int64 labels, and seeded splits.

The trainer moves these whole onto the training device once; nothing here
runs per sample at training time. Every failure a user can cause (no copy
offline, a bad image folder) is a `DataError` with what to do about it.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("cifar10", "fashion-mnist", "folder:PATH", "synthetic")


class DataError(Exception):
    """A dataset that cannot be loaded, with a message that says what to do."""


@dataclass(frozen=True)
class Split:
    """What one training run sees: its training images, the images it is evaluated on
    (none: no evaluation), and the normalisation of its training images."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_x: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None


@dataclass(frozen=True)
class Dataset:
    """Train and test images (uint8, N x C x H x W) and labels (int64)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def size(self) -> int:
        return self.train_x.shape[2]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images, computed once."""
        return channel_stats(self.train_x)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training images on the [0, 1] scale."""
        return self.stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self.stats[1]

    @property
    def train_test(self) -> Split:
        """All training images, evaluated on the test split: the final training."""
        return Split(self.train_x, self.train_y, self.mean, self.std, self.test_x, self.test_y)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, in float64 chunks (no 4x copy)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64).div_(255)
        total += c.sum(dim=(0, 2, 3))
        squares += c.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-6).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def default_data_dir() -> Path:
    return Path(os.environ.get("NAS_DATA_DIR", "data"))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """`cifar10`, `fashion-mnist`, `folder:PATH` or `synthetic`."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "cifar10":
        return load_cifar10(root, download)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if name.startswith("folder:"):
        return load_folder(Path(name.removeprefix("folder:")))
    if name == "synthetic":
        return synthetic()
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


# --- CIFAR-10 -------------------------------------------------------------------------


def load_cifar10(root: Path, download: bool = True) -> Dataset:
    """CIFAR-10 through torchvision: its download when online, and its checksum of every
    file, so that a partial or altered copy is an error, not another dataset."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list]
    missing = [n for n in [*names, CIFAR10.meta["filename"]] if not (folder / n).exists()]
    try:  # a download only where files are missing: an altered copy is an error
        train = CIFAR10(str(root), train=True, download=download and bool(missing))
        test = CIFAR10(str(root), train=False)
    except RuntimeError:  # torchvision's "not found or corrupted", without a download
        missing = [n for n in [*names, CIFAR10.meta["filename"]] if not (folder / n).exists()]
        if missing:
            raise DataError(
                f"CIFAR-10 under {folder} lacks {', '.join(missing)}; "
                "pass --data-dir to a complete copy or use --dataset fashion-mnist"
            ) from None
        raise DataError(
            f"CIFAR-10 under {folder} fails its checksum (a partial or altered copy); "
            f"extract cifar-10-python.tar.gz into {root} again"
        ) from None
    except Exception as e:  # offline: URLError, socket errors, a partial archive
        raise DataError(
            f"CIFAR-10 is not under {folder} (or fails its checksum) and could not be "
            f"downloaded ({e}); extract cifar-10-python.tar.gz into {root}, pass --data-dir "
            "to where 'cifar-10-batches-py' is, or use --dataset fashion-mnist"
        ) from None

    def chw(x: np.ndarray) -> torch.Tensor:  # torchvision keeps N x H x W x C
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    return Dataset(
        "cifar10",
        chw(train.data),
        torch.tensor(train.targets, dtype=torch.int64),
        chw(test.data),
        torch.tensor(test.targets, dtype=torch.int64),
        tuple(train.classes),
    )


# --- Fashion-MNIST --------------------------------------------------------------------


def _stage_debian_fashion_mnist(root: Path) -> bool:
    """Unpack Debian's dataset-fashion-mnist files into torchvision's layout."""
    raw = root / "FashionMNIST" / "raw"
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    if all((raw / n).exists() for n in names):
        return True
    if not all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        if not (raw / n).exists():
            # Write then rename: an interrupted unpack never leaves a truncated file.
            tmp = raw / f".{n}.partial"
            with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(raw / n)
    return True


def load_fashion_mnist(root: Path, download: bool = True) -> Dataset:
    from torchvision.datasets import FashionMNIST

    found = _stage_debian_fashion_mnist(root)
    try:
        train = FashionMNIST(str(root), train=True, download=download and not found)
        test = FashionMNIST(str(root), train=False, download=download and not found)
    except Exception as e:
        raise DataError(
            f"Fashion-MNIST is not under {root / 'FashionMNIST'} and could not be downloaded "
            f"({e}); install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir"
        ) from None
    return Dataset(
        "fashion-mnist",
        train.data.unsqueeze(1),
        train.targets.long(),
        test.data.unsqueeze(1),
        test.targets.long(),
        tuple(train.classes),
    )


# --- an image folder --------------------------------------------------------------------


def _read_images(samples: list[tuple[str, int]], size: int, mode: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(samples), size, size, 1 if mode == "L" else 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as im:
                im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im).reshape(size, size, -1)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _scan_folder(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not path.is_dir():
        raise DataError(f"folder dataset {path} is not a directory")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataError(
            f"folder dataset {path} has {len(classes)} class folder(s); it needs one "
            "subfolder per class, at least two (ImageFolder layout)"
        )
    index = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(path), index, IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([y for _, y in samples], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise DataError(f"folder dataset {path}: no images in class folder(s) {', '.join(empty)}")
    return classes, samples


def _image_geometry(samples: list[tuple[str, int]]) -> tuple[int, str]:
    """The common side (median of the shorter sides) and colour mode (grayscale kept)."""
    from PIL import Image

    sides, modes = [], set()
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
                modes.add("L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB")
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    return int(np.median(sides)), ("L" if modes == {"L"} else "RGB")


def load_folder(path: Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """ImageFolder layout; `train/` and `test/` subfolders are used if present,
    else a stratified, seeded `test_fraction` is held out."""
    split_dirs = (path / "train").is_dir() and (path / "test").is_dir()
    classes, samples = _scan_folder(path / "train" if split_dirs else path)
    if split_dirs:
        test_classes, test_samples = _scan_folder(path / "test")
        if test_classes != classes:
            raise DataError(f"{path}/train and {path}/test have different class folders")
    size, mode = _image_geometry(samples + (test_samples if split_dirs else []))
    x = _read_images(samples, size, mode)
    y = torch.tensor([c for _, c in samples], dtype=torch.int64)
    if split_dirs:
        tx = _read_images(test_samples, size, mode)
        ty = torch.tensor([c for _, c in test_samples], dtype=torch.int64)
        return Dataset(f"folder:{path}", x, y, tx, ty, tuple(classes))
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return Dataset(
        f"folder:{path}", x[train_idx], y[train_idx], x[test_idx], y[test_idx], tuple(classes)
    )


# --- synthetic ------------------------------------------------------------------------


def synthetic(
    n_train: int = 2048,
    n_test: int = 512,
    channels: int = 3,
    size: int = 32,
    classes: int = 10,
    noise: float = 60.0,
    seed: int = 0,
) -> Dataset:
    """Deterministic and learnable: each class is a smooth random template plus noise.

    The templates are low-frequency (upsampled 4x4), so they survive random
    crops and flips, and a small network separates them in an epoch or two.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    templates = (
        torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bilinear", align_corners=False
        )
        * 255
    )

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
        x = templates[y] + noise * torch.randn(n, channels, size, size, generator=g)
        return x.clamp(0, 255).round().to(torch.uint8), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return Dataset(
        "synthetic", train_x, train_y, test_x, test_y, tuple(f"class{i}" for i in range(classes))
    )


# --- splits ---------------------------------------------------------------------------


def stratified_split(
    labels: torch.Tensor, holdout: float | int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): each class held out in proportion, seeded.

    `holdout` is a fraction (< 1) or a count; CIFAR-10's 45,000 / 5,000 is
    `stratified_split(y, 5000, seed)`.
    """
    n = len(labels)
    n_out = round(holdout * n) if holdout < 1 else int(holdout)
    if not 0 < n_out < n:
        raise ValueError(f"cannot hold out {holdout} of {n} samples")
    g = torch.Generator().manual_seed(seed)
    keep, out = [], []
    classes, counts = torch.unique(labels, return_counts=True)
    # Largest-remainder apportionment: per-class counts sum exactly to n_out.
    quota = counts.double() * n_out / n
    take = quota.floor().long()
    short = n_out - int(take.sum())
    take[torch.argsort(quota - take, descending=True)[:short]] += 1
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        out.append(idx[:k])
        keep.append(idx[k:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(out)).values


def subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A stratified, seeded sample of `n` indices (all of them when n >= len)."""
    if n >= len(labels):
        return torch.arange(len(labels))
    return stratified_split(labels, n, seed)[1]


@dataclass(frozen=True)
class SearchData:
    """The training and validation split the trials see; the test split stays out."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, size, classes): what the sampled architectures must take."""
        return self.train_x.shape[1], self.train_x.shape[2], self.num_classes

    @property
    def train_val(self) -> Split:
        """The search's training split, evaluated on its validation split: a trial."""
        return Split(self.train_x, self.train_y, self.mean, self.std, self.val_x, self.val_y)

    def to(self, device: torch.device) -> SearchData:
        """The same split on `device`, moved once for all the trials of a worker."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            val_x=self.val_x.to(device),
            val_y=self.val_y.to(device),
        )


def search_split(
    ds: Dataset, seed: int, train_images: int | None = None, val_images: int | None = None
) -> SearchData:
    """Hold out a stratified validation split (5,000 images from 50,000+, else 10%).

    The search seed chooses it, so it is part of a study's settings.
    `train_images` / `val_images` shrink both to stratified subsets.
    """
    n = len(ds.train_y)
    keep, val = stratified_split(ds.train_y, 5000 if n >= 50_000 else 0.1, seed)
    if train_images:
        keep = keep[subset(ds.train_y[keep], train_images, seed)]
    if val_images:
        val = val[subset(ds.train_y[val], val_images, seed)]
    x, y = ds.train_x[keep], ds.train_y[keep]
    mean, std = channel_stats(x)
    return SearchData(ds.name, x, y, ds.train_x[val], ds.train_y[val], mean, std, ds.num_classes)


# --- batched augmentation on the training device ----------------------------------------


def random_crop(
    x: torch.Tensor, padding: int, g: torch.Generator, flip: bool = False
) -> torch.Tensor:
    """Zero-pad by `padding` and take a random HxW window per image: two gathers.
    With `flip`, a random half is also mirrored, within the same gathers (the
    column index runs backwards): the result of random_flip after the crop,
    the same random draws, two fewer passes over the batch."""
    if padding <= 0:
        return random_flip(x, g) if flip else x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=g)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    j = torch.arange(w, device=x.device)
    if flip:
        mirrored = torch.rand(b, device=x.device, generator=g) < 0.5
        j = torch.where(mirrored[:, None], w - 1 - j, j)
    cols = (dx + j)[:, None, None, :]
    x = padded.gather(2, rows.expand(b, c, h, w + 2 * padding))
    return x.gather(3, cols.expand(b, c, h, w))


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left to right."""
    flip = torch.rand(x.shape[0], device=x.device, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred anywhere (it may be clipped)."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), device=x.device, generator=g) - size // 2
    cx = torch.randint(0, w, (b, 1), device=x.device, generator=g) - size // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= cy) & (ys < cy + size)
    in_x = (xs >= cx) & (xs < cx + size)
    return x.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], 0)


def augment(
    x: torch.Tensor, g: torch.Generator, padding: int = 4, flip: bool = True, cutout_size: int = 0
) -> torch.Tensor:
    """The training augmentation of one uint8 batch, all on its device."""
    return cutout(random_crop(x, padding, g, flip), cutout_size, g)
