"""What a trial, or a final training, will cost on this machine, said before it starts.

The candidates the space proposes first (a seeded random sample that fits the
limits) give the spread of MACs; two of them, timed for a few steps, give this
device's speed; the profile gives the images per trial.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from models import ArchSpec
from search import space
from search.data import Dataset, Split
from search.trainer import TrainConfig, train
from search.worker import Search


def estimate_trial_seconds(search: Search, samples: int = 24) -> tuple[float, float, float]:
    """(typical, fastest, slowest) seconds of a full trial here, for the candidates the space
    proposes first: their MACs, and this device's speed timed on two of them."""
    d, limits = search.data, search.limits
    fits = space.random_fits(d.shape, limits, search.profile, len(d.train_y), search.seed,
                             samples, 20 * samples)  # fmt: skip
    found = [(limits.measure(spec)["macs"], spec, cfg) for _, spec, cfg in fits]
    if not found:  # the limits leave little room: time the smallest candidate
        spec = space.smallest(search.data.shape)
        found = [(search.limits.measure(spec)["macs"], spec, TrainConfig(batch_size=64))]
    found.sort(key=lambda f: f[0])
    rates = [_macs_per_second(found[i][1], found[i][2], search) for i in (len(found) // 4, -1)]
    # Small networks use the device less well: interpolate the speed in MACs.
    lo, hi = found[len(found) // 4][0], found[-1][0]
    p = search.profile

    def seconds(macs: int) -> float:
        t = 0.0 if hi == lo else min(1.0, max(0.0, (macs - lo) / (hi - lo)))
        rate = rates[0] + t * (rates[1] - rates[0])
        val = len(search.data.val_y) * len(p.rungs) / 3  # a forward pass is ~1/3 of a step
        return macs * (p.images + val) / rate

    times = sorted(seconds(m) for m, _, _ in found)
    return times[len(times) // 2], times[0], times[-1]


def _macs_per_second(spec: ArchSpec, cfg: TrainConfig, search: Search) -> float:
    """Training MACs per second of one candidate, at its batch size and default settings."""
    d = search.data
    rate = images_per_s(spec, TrainConfig(batch_size=cfg.batch_size, seed=0), d.train_x,
                        d.train_y, d.mean, d.std, search.device)  # fmt: skip
    return search.limits.measure(spec)["macs"] * rate


def final_images_per_s(spec: ArchSpec, cfg: TrainConfig, data: Dataset, device: object) -> float:
    """Training images/s of `spec` with its final training's settings on this device."""
    return images_per_s(spec, cfg, data.train_x, data.train_y, data.mean, data.std, device)


def images_per_s(
    spec: ArchSpec,
    cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: object,
) -> float:
    """Training images/s of `spec` with `cfg`'s settings: 6 timed steps after 2 of
    warm-up, on the first images (a second or two)."""
    bs = min(cfg.batch_size, len(y))
    n = min(len(y), 6 * bs)
    split = Split(x[:n], y[:n], mean, std)
    train(spec, replace(cfg, images=2 * bs, batch_size=bs), split, device=device)
    return train(spec, replace(cfg, images=n, batch_size=bs), split, device=device).images_per_s
