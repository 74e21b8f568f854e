"""Datasets, splits and the batched augmentation."""

from __future__ import annotations

import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch

from search import data as D
from search.data import DataError


def write_cifar(root, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small copy of CIFAR-10 in its own pickled batch format. Its checksums stand in
    for the real ones in torchvision's CIFAR10 class (see `small_cifar`)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, per_batch))
        with (folder / name).open("wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y}, f)
        xs.append(x)
        ys.append(y)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def small_cifar(tmp_path, monkeypatch):
    """write_cifar's copy, with torchvision checking it against its own md5 sums."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    x, y = write_cifar(tmp_path)
    folder = tmp_path / CIFAR10.base_folder
    md5 = {f.name: calculate_md5(str(f)) for f in folder.iterdir()}
    for which in ("train_list", "test_list"):
        listed = [[name, md5[name]] for name, _ in getattr(CIFAR10, which)]
        monkeypatch.setattr(CIFAR10, which, listed)
    monkeypatch.setattr(CIFAR10, "meta", CIFAR10.meta | {"md5": md5["batches.meta"]})
    return tmp_path, x, y


def test_cifar10_reads_its_batch_format(small_cifar) -> None:
    tmp_path, x, y = small_cifar
    ds = D.load_dataset("cifar10", tmp_path, download=False)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (20, 3, 32, 32)
    assert (ds.channels, ds.size, ds.num_classes) == (3, 32, 10)
    assert ds.classes[0] == "airplane"
    # Row-major 3072 bytes per image: 1024 red, 1024 green, 1024 blue.
    assert torch.equal(ds.train_x[7, 1].flatten(), torch.from_numpy(x[7, 1024:2048]))
    assert ds.train_y.tolist() == y[:100].tolist()
    assert ds.test_y.tolist() == y[100:].tolist()


def test_cifar10_missing_offline_says_what_to_do(tmp_path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    def offline(*_a, **_k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(CIFAR10, "download", offline)  # what torchvision's download meets
    with pytest.raises(DataError) as err:
        D.load_dataset("cifar10", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "--data-dir" in message and "fashion-mnist" in message


def test_cifar10_incomplete_copy(small_cifar) -> None:
    tmp_path = small_cifar[0]
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        D.load_dataset("cifar10", tmp_path, download=False)


def test_cifar10_altered_copy_fails_its_checksum(small_cifar) -> None:
    tmp_path = small_cifar[0]
    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match="fails its checksum"):
        D.load_dataset("cifar10", tmp_path, download=False)


needs_fashion = pytest.mark.skipif(
    not D.DEBIAN_FASHION_MNIST.exists() and os.environ.get("CI") != "true",
    reason="apt-get install dataset-fashion-mnist",
)


@needs_fashion
def test_fashion_mnist_from_the_debian_package(tmp_path) -> None:
    ds = D.load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert 0.28 < ds.mean[0] < 0.29 and 0.35 < ds.std[0] < 0.36


def write_images(folder, sizes, mode: str = "L") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new(mode, (w, h), color=i * 20 if mode == "L" else (i * 20, 0, 255)).save(
            folder / f"{i}.png"
        )


def test_folder_dataset_keeps_grayscale_and_resizes(tmp_path) -> None:
    for c in ("cat", "dog"):
        write_images(tmp_path / c, [(30, 30), (24, 40), (28, 28), (50, 20), (28, 35)])
    ds = D.load_dataset(f"folder:{tmp_path}")
    assert ds.channels == 1 and ds.size == 28  # median shorter side
    assert ds.classes == ("cat", "dog")
    assert len(ds.train_x) + len(ds.test_x) == 10
    assert torch.bincount(ds.test_y).tolist() == [1, 1]


def test_folder_dataset_rgb_with_train_test(tmp_path) -> None:
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            write_images(tmp_path / split / c, [(16, 16)] * 3, mode="RGB")
    ds = D.load_dataset(f"folder:{tmp_path}")
    assert ds.channels == 3 and ds.size == 16 and ds.num_classes == 3
    assert len(ds.train_x) == len(ds.test_x) == 9


@pytest.mark.parametrize("problem", ["missing", "empty", "one-class", "empty-class", "broken"])
def test_bad_folders_are_clear_errors(tmp_path, problem) -> None:
    root = tmp_path / "imgs"
    expect = {
        "missing": "not a directory",
        "empty": "0 class folder",
        "one-class": "1 class",
        "empty-class": "no images in class folder(s) b",
        "broken": "cannot read image",
    }
    if problem != "missing":
        root.mkdir()
    if problem in ("one-class", "empty-class", "broken"):
        write_images(root / "a", [(8, 8)] * 2)
    if problem == "empty-class":
        (root / "b").mkdir()
    if problem == "broken":
        write_images(root / "b", [(8, 8)])
        (root / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=expect[problem].replace("(", r"\(").replace(")", r"\)")):
        D.load_dataset(f"folder:{root}")


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="cifar10, fashion-mnist"):
        D.load_dataset("imagenet")


def test_synthetic_is_deterministic() -> None:
    a, b = D.synthetic(), D.synthetic()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, D.synthetic(seed=1).train_x)


def test_split_is_disjoint_stratified_and_seeded() -> None:
    y = torch.arange(10_000) % 7
    y = y[torch.randperm(10_000, generator=torch.Generator().manual_seed(3))]
    keep, out = D.stratified_split(y, 1000, seed=0)
    assert len(out) == 1000 and len(keep) == 9000
    assert set(keep.tolist()).isdisjoint(out.tolist())
    assert sorted(keep.tolist() + out.tolist()) == list(range(10_000))
    per_class = torch.bincount(y[out]).tolist()
    expected = (torch.bincount(y).double() * 0.1).tolist()
    assert all(abs(a - b) <= 1 for a, b in zip(per_class, expected, strict=True))
    again, _ = D.stratified_split(y, 1000, seed=0)
    other, _ = D.stratified_split(y, 1000, seed=1)
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    assert len(D.stratified_split(y, 0.25, seed=0)[1]) == 2500


def test_channel_stats_match_torch() -> None:
    x = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    mean, std = D.channel_stats(x)
    f = x.double() / 255
    mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    assert torch.allclose(mean, f.mean(dim=(0, 2, 3)), atol=1e-9)
    assert torch.allclose(std, f.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)


# --- augmentation ---------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_shifts_the_image_inside_its_padding() -> None:
    x = torch.randint(1, 256, (64, 3, 16, 16), dtype=torch.uint8)
    out = D.random_crop(x, 4, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    moved = 0
    for i in range(64):
        padded = torch.nn.functional.pad(x[i], (4,) * 4)
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[:, dy : dy + 16, dx : dx + 16], out[i])
        ]
        assert hits, "every output is a window of its own padded input"
        moved += hits != [(4, 4)]
    assert moved > 48


def test_flip_mirrors_about_half() -> None:
    x = torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8)
    out = D.random_flip(x, gen())
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)]
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 150 < sum(flipped) < 250


def test_cutout_zeroes_one_square() -> None:
    x = torch.full((200, 3, 32, 32), 255, dtype=torch.uint8)
    out = D.cutout(x, 8, gen())
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros <= 64).all() and (zeros > 0).all() and (zeros == 64).sum() > 50
    assert torch.equal((out == 0).all(dim=1), (out[:, 0] == 0))  # all channels alike


def test_augment_keeps_each_image_with_its_label() -> None:
    # Constant images: whatever crop, flip or cutout does, the brightest pixel
    # of output i is still image i's value, so the batch order is untouched.
    values = torch.randperm(200, generator=gen(1))[:64].to(torch.uint8) + 50
    x = values.view(-1, 1, 1, 1).expand(64, 3, 12, 12).contiguous()
    out = D.augment(x, gen(), padding=4, flip=True, cutout_size=4)
    assert out.shape == x.shape
    assert torch.equal(out.amax(dim=(1, 2, 3)), values)
    assert (out == 0).any()
